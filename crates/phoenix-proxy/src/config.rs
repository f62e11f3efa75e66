//! Configuration of the data plane, as written in the topology file.
//!
//! These are the serde shapes of the `[[service]]`, `[[route]]` and `[middleware.NAME]` sections and of
//! the listener settings shared by the gateway and the mesh. They carry documented defaults and units;
//! turning them into running objects (route tables, upstream pools) happens elsewhere and reports every
//! problem at once. Durations are written as humantime strings (`"1s"`, `"15m"`), sizes as integers of
//! bytes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Settings of one TLS listener that terminates client connections and proxies them (gateway or mesh).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerLimits {
    /// Time a client has to send a complete request head. Default 10s.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time an idle keep-alive connection is kept open. Default 75s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request head (request line + headers) in bytes. Default 64 KiB.
    #[serde(default = "default_max_header_size")]
    pub max_header_size: usize,
    /// Most header fields in one request. Default 100.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Longest request target (path and query) in bytes; longer gets 414. Default 8 KiB.
    #[serde(default = "default_max_uri_length")]
    pub max_uri_length: usize,
    /// Concurrent client connections accepted; further ones wait in the kernel backlog. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request body in bytes; `None` means no limit. Default none.
    #[serde(default)]
    pub max_body_size: Option<u64>,
    /// Time allowed to establish a connection to an upstream (TCP + TLS). Default 5s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// Time an upstream has to send response headers, unless the service sets its own `timeout`.
    /// Default 60s.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub upstream_response_timeout: Duration,
    /// Grace period for in-flight requests at shutdown. Default 30s.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_header_size: default_max_header_size(),
            max_headers: default_max_headers(),
            max_uri_length: default_max_uri_length(),
            max_connections: default_max_connections(),
            max_body_size: None,
            upstream_connect_timeout: default_connect_timeout(),
            upstream_response_timeout: default_response_timeout(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(75)
}
fn default_max_header_size() -> usize {
    64 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_max_uri_length() -> usize {
    8 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The `[mesh]` section: the internal router.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// TLS listener for traffic from the gateway, e.g. `"127.0.0.1:9443"`.
    pub listen: SocketAddr,
    /// Admin listener for `/health` and `/metrics`. Default `127.0.0.1:9901` (loopback only).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The mesh's DNS name (on its certificate). Default `mesh.<domain>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Certificate chain PEM (leaf first) and its key, when not obtained over ACME.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Base URL of the Phoenix CA, for certificates over ACME and for the root.
    #[serde(default)]
    pub ca_url: Option<String>,
    /// SHA-256 fingerprint of the CA root (hex), trust bootstrap with `ca_url`.
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
    /// PEM file of the internal root, instead of `ca_url` + `ca_fingerprint`.
    #[serde(default)]
    pub ca_root: Option<PathBuf>,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are believed; from anyone else they are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Networks into which plaintext (`http://`, `h2c://`) backends are allowed. Default none.
    #[serde(default)]
    pub plaintext_networks: Vec<IpNet>,
    /// Clients that may ask for hop traces (`phoenix trace`, header `X-Phoenix-Trace`). Anyone
    /// else gets no trace data. Default loopback (`127.0.0.0/8`, `::1`). The `mesh` role also
    /// answers its `trusted_proxies` (the gateway, which only forwards allowed traces).
    #[serde(default = "crate::trace::default_trace_networks")]
    pub trace_networks: Vec<IpNet>,
    /// Require a client certificate issued by the internal root (mTLS).
    #[serde(default)]
    pub require_client_cert: bool,
    /// With mTLS: DNS names a client certificate must carry one of. Empty = any name under the root.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// JSON access log on standard output. Default true.
    #[serde(default = "default_true")]
    pub access_log: bool,
    #[serde(default)]
    pub limits: ListenerLimits,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_true() -> bool {
    true
}

/// One `[[service]]`: a named pool of upstream servers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name; also routed as `Host(<name>.<domain>)`.
    pub name: String,
    /// Upstream URLs: `http://`, `h2c://` (HTTP/2 cleartext, gRPC) or `https://`.
    pub servers: Vec<ServerConfig>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Total time for one request, overriding the listener's `upstream_response_timeout`
    /// (LLM requests run for minutes).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Root PEM file to verify `https://` servers; default the internal root.
    #[serde(default)]
    pub tls_root: Option<PathBuf>,
    /// Server name to verify on `https://` servers; default the URL's host.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Skip certificate verification of `https://` servers. Insecure; logged at every start.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    /// Attempts on another server after a connect failure (and, for idempotent methods, after an
    /// upstream error before any response byte). Default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_retries() -> u32 {
    2
}

/// A server: either a bare URL or `{ url = "...", weight = 3 }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ServerConfig {
    Url(String),
    Weighted {
        url: String,
        #[serde(default = "default_weight")]
        weight: u32,
    },
}

impl ServerConfig {
    pub fn url(&self) -> &str {
        match self {
            ServerConfig::Url(url) | ServerConfig::Weighted { url, .. } => url,
        }
    }
    pub fn weight(&self) -> u32 {
        match self {
            ServerConfig::Url(_) => default_weight(),
            ServerConfig::Weighted { weight, .. } => *weight,
        }
    }
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Least outstanding requests, choosing the better of two random servers (power of two choices).
    LeastRequests,
}

/// Active health check of every server of a service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path requested with GET, e.g. `/health`.
    pub path: String,
    /// Time between checks. Default 10s.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time a check may take. Default 2s.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Expected status; default any 2xx or 3xx.
    #[serde(default)]
    pub status: Option<u16>,
}

fn default_health_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}

/// One `[[route]]`: a rule in the Traefik rule language and the service it sends to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Optional name for logs and metrics; default `route-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// e.g. ``Host(`api.phoenix.test`) && PathPrefix(`/v1`)``.
    pub rule: String,
    pub service: String,
    /// Higher wins; default the rule's length.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Names of `[middleware.NAME]` sections, applied in order.
    #[serde(default)]
    pub middlewares: Vec<String>,
}

/// One `[middleware.NAME]` section. Exactly one kind must be set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MiddlewareConfig {
    /// Remove the first matching prefix from the path; sets `X-Forwarded-Prefix`.
    #[serde(default)]
    pub strip_prefix: Option<Vec<String>>,
    /// Prepend a prefix to the path.
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Set or remove request/response headers.
    #[serde(default)]
    pub headers: Option<HeadersConfig>,
    /// Redirect to another scheme (e.g. https).
    #[serde(default)]
    pub redirect_scheme: Option<RedirectSchemeConfig>,
    /// HTTP basic authentication against bcrypt-hashed passwords (`user:$2y$...`, as htpasswd -B).
    #[serde(default)]
    pub basic_auth: Option<BasicAuthConfig>,
    /// Only clients in these networks pass; others get 403.
    #[serde(default)]
    pub ip_allowlist: Option<Vec<IpNet>>,
    /// Token bucket per client IP; over the limit gets 429.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Largest request body in bytes; larger gets 413.
    #[serde(default)]
    pub max_body_size: Option<u64>,
    /// Retry on upstream errors.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    #[serde(default)]
    pub request_set: BTreeMap<String, String>,
    #[serde(default)]
    pub request_remove: Vec<String>,
    #[serde(default)]
    pub response_set: BTreeMap<String, String>,
    #[serde(default)]
    pub response_remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSchemeConfig {
    /// `https` or `http`.
    pub scheme: String,
    /// 308 Permanent Redirect when true (default), 307 Temporary Redirect otherwise.
    #[serde(default = "default_true")]
    pub permanent: bool,
    /// Port in the Location; default the scheme's default port.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// `user:bcrypt-hash` entries.
    pub users: Vec<String>,
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Remove the Authorization header before forwarding. Default true.
    #[serde(default = "default_true")]
    pub remove_header: bool,
}

fn default_realm() -> String {
    "phoenix".to_owned()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests allowed per `period` on average.
    pub average: u32,
    /// Requests allowed in a burst. Default `average`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Default 1s.
    #[serde(default = "default_period", with = "humantime_serde")]
    pub period: Duration,
}

fn default_period() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts, including the first.
    pub attempts: u32,
    /// Wait before the first retry, doubled each time. Default 100ms.
    #[serde(default = "default_retry_interval", with = "humantime_serde")]
    pub initial_interval: Duration,
}

fn default_retry_interval() -> Duration {
    Duration::from_millis(100)
}

/// Everything the data plane of one role needs to build a route table: the services, routes and
/// middlewares of the topology file, and the domain under which each service gets its own host name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingConfig {
    pub domain: Option<String>,
    pub services: Vec<ServiceConfig>,
    pub routes: Vec<RouteConfig>,
    pub middlewares: BTreeMap<String, MiddlewareConfig>,
}

/// One configuration problem, found while building a route table or checking a file. `place` names the
/// item in the file (`route[2].rule`, `service "app".servers[0]`, `middleware.strip-v1`) so the binary can
/// point at its line; `hint` says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub place: String,
    pub message: String,
    pub hint: Option<String>,
}

impl Problem {
    pub fn new(place: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            place: place.into(),
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.place, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}
