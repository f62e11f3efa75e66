//! Upstream services: the servers behind a route, how one is chosen, and how requests reach it.
//!
//! A [`Service`] is built from one `[[service]]` of the topology file. It owns one pool of connections
//! per server (`endpoint`), a load balancer (`balance`: smooth weighted round robin or least requests
//! with two random choices), the health state of every server (`health`: active checks and passive
//! ejection) and the retry policy. [`Service::send`] is the only thing the request path calls.
//!
//! Choices worth knowing:
//! - **When every server is ejected, they are all tried anyway.** A health check can be wrong (the
//!   health endpoint broke, the real one did not) and a certain 502 is worse than a likely one.
//! - **Retries**: a request goes to another server (or, with one server, again to the same) after a
//!   failed connect or when hyper gives it back unsent, whatever its method; an idempotent request
//!   with an empty body is also sent again after an upstream error before response headers. Never more
//!   than `retries` extra attempts, and never after response headers arrived or after the timeout.
//! - **Timeout**: `service.timeout` (else the context's default) bounds the time until response
//!   headers, across all attempts; the body may then stream for as long as it needs (SSE, LLM tokens).
//! - **In flight** counts a request from the moment a server is picked until its response body ends
//!   or is dropped (see `response`), so least-requests sees long streams as the load they are.
//! - **Passive ejection** happens on connect errors only: a 500 or a reset from a live server says
//!   nothing about the next request.
//! - **Protocols**: `http://` speaks HTTP/1.1, `h2c://` HTTP/2 with prior knowledge, `https://`
//!   follows the client (HTTP/2 when the client used it and the server agrees in ALPN, else
//!   HTTP/1.1). Requests with `Upgrade` always go over HTTP/1.1.
//! - **Dead keep-alive connections** are not the server's fault: a request that fails on a reused
//!   connection is tried again on a fresh connection to the same server when that is safe (unsent, or
//!   idempotent without a body), without using up a retry.

mod balance;
mod endpoint;
mod h1;
mod health;
mod response;
mod target;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Version};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::body::{BoxError, UpstreamBody};
use crate::config::{Problem, ServiceConfig};
use crate::plain::WireFields;
use crate::tls;
use balance::Balancer;
use endpoint::{AttemptError, Endpoint, TlsSettings};
pub use h1::Upgraded;
use health::Transition;
pub use response::ResponseBody;

/// What every service of a role shares.
#[derive(Debug, Clone)]
pub struct UpstreamContext {
    /// Roots that verify `https://` servers when the service names no `tls_root` (the internal CA).
    pub internal_roots: Option<Arc<rustls::RootCertStore>>,
    /// Time to establish a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time to response headers when the service sets no `timeout`.
    pub default_timeout: Duration,
    /// Client certificate presented to `https://` servers that ask for one (the gateway's mTLS to the
    /// mesh); chosen at each handshake so renewed certificates are used without a reload.
    pub client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
}

/// A response from an upstream server.
#[derive(Debug)]
pub struct Upstreamed {
    /// Its body releases the server's connection and in-flight count when it ends or is dropped.
    pub response: http::Response<ResponseBody>,
    /// URL of the server that answered, as configured (for logs).
    pub server: Arc<str>,
}

/// State of one server, for metrics and `/health`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerStatus {
    pub url: String,
    pub healthy: bool,
    pub in_flight: usize,
    pub weight: u32,
}

/// Why a request got no upstream response. The proxy answers 504 for [`UpstreamError::Timeout`]
/// and 502 for everything else; the messages are for logs, not for clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No server of the service can take requests. [`Service::new`] refuses the configurations where
    /// this could happen (no servers, every weight 0), so a running proxy should never see it.
    #[error("no upstream server can take requests")]
    NoHealthyServer,
    /// The last attempt could not connect (TCP, TLS, or the HTTP/2 handshake).
    #[error("cannot connect to upstream {server}: {source}")]
    Connect {
        server: Arc<str>,
        #[source]
        source: BoxError,
    },
    /// No response headers within the service's timeout.
    #[error("upstream {server} sent no response headers in time")]
    Timeout { server: Arc<str> },
    /// The connection failed after the request was (maybe) sent, before response headers.
    #[error("upstream {server} failed before responding: {source}")]
    Protocol {
        server: Arc<str>,
        #[source]
        source: BoxError,
    },
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout { .. })
    }

    /// The server of the last attempt, if one was made.
    pub fn server(&self) -> Option<&str> {
        match self {
            UpstreamError::NoHealthyServer => None,
            UpstreamError::Connect { server, .. }
            | UpstreamError::Timeout { server }
            | UpstreamError::Protocol { server, .. } => Some(server),
        }
    }
}

/// A named pool of upstream servers with load balancing, health checks and retries.
pub struct Service {
    config: ServiceConfig,
    endpoints: Box<[Arc<Endpoint>]>,
    weights: Box<[u32]>,
    balancer: Balancer,
    timeout: Duration,
    checks_started: AtomicBool,
    reaper_started: AtomicBool,
    /// Some server is reached over h2c, where a plain request's fields must be in its map.
    h2c: bool,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.config.name)
            .field(
                "servers",
                &self.endpoints.iter().map(|e| &*e.url).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Checks the configuration and builds the pools (no connection is made yet). Every problem is
    /// returned at once.
    pub fn new(cfg: &ServiceConfig, ctx: &UpstreamContext) -> Result<Arc<Service>, Vec<Problem>> {
        let place = format!("service {:?}", cfg.name);
        let mut problems = Vec::new();
        if cfg.servers.is_empty() {
            problems.push(
                Problem::new(&place, "has no servers")
                    .with_hint("add servers = [\"http://10.0.0.5:8080\"]"),
            );
        }
        let mut targets = Vec::with_capacity(cfg.servers.len());
        for (i, server) in cfg.servers.iter().enumerate() {
            match target::parse(server.url()) {
                Ok(t) => targets.push(t),
                Err(message) => {
                    problems.push(Problem::new(format!("{place}.servers[{i}]"), message))
                }
            }
        }
        if !cfg.servers.is_empty() && cfg.servers.iter().all(|s| s.weight() == 0) {
            problems.push(
                Problem::new(
                    format!("{place}.servers"),
                    "every server has weight 0, so none gets traffic",
                )
                .with_hint("give at least one server a weight of 1 or more"),
            );
        }
        if cfg.timeout == Some(Duration::ZERO) {
            problems.push(Problem::new(
                format!("{place}.timeout"),
                "must be longer than 0s",
            ));
        }
        if let Some(h) = &cfg.health {
            if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
                problems.push(
                    Problem::new(
                        format!("{place}.health.path"),
                        format!("{:?} is not a request path", h.path),
                    )
                    .with_hint("write it like \"/health\""),
                );
            }
            if h.interval.is_zero() {
                problems.push(Problem::new(
                    format!("{place}.health.interval"),
                    "must be longer than 0s",
                ));
            }
            if h.timeout.is_zero() {
                problems.push(Problem::new(
                    format!("{place}.health.timeout"),
                    "must be longer than 0s",
                ));
            }
            if let Some(status) = h.status {
                if !(100..=599).contains(&status) {
                    problems.push(Problem::new(
                        format!("{place}.health.status"),
                        format!("{status} is not an HTTP status (100-599)"),
                    ));
                }
            }
        }

        let https = targets.iter().any(|t| !t.protocol.is_plaintext());
        let connectors = if https {
            tls_connectors(cfg, ctx, &place, &mut problems)
        } else {
            None
        };
        let server_name_override = match (&cfg.tls_server_name, https) {
            (Some(name), true) => match ServerName::try_from(name.clone()) {
                Ok(n) => Some(n),
                Err(e) => {
                    problems.push(Problem::new(
                        format!("{place}.tls_server_name"),
                        format!("{name:?} is not a DNS name or IP address: {e}"),
                    ));
                    None
                }
            },
            _ => None,
        };

        let service_name: Arc<str> = Arc::from(cfg.name.as_str());
        let mut endpoints = Vec::with_capacity(targets.len());
        if problems.is_empty() {
            for (i, (server, target)) in cfg.servers.iter().zip(targets).enumerate() {
                let tls = if target.protocol.is_plaintext() {
                    None
                } else {
                    let server_name = match &server_name_override {
                        Some(n) => n.clone(),
                        None => match ServerName::try_from(target.host.clone()) {
                            Ok(n) => n,
                            Err(e) => {
                                problems.push(Problem::new(
                                    format!("{place}.servers[{i}]"),
                                    format!(
                                        "{:?} cannot be verified as a TLS server name: {e}",
                                        target.host
                                    ),
                                ));
                                continue;
                            }
                        },
                    };
                    connectors.as_ref().map(|(h2, h1)| TlsSettings {
                        h2: h2.clone(),
                        h1: h1.clone(),
                        server_name,
                    })
                };
                endpoints.push(Arc::new(Endpoint::new(
                    server.url(),
                    service_name.clone(),
                    server.weight(),
                    target,
                    tls,
                    ctx.connect_timeout,
                    cfg.health.is_some(),
                )));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        if cfg.tls_insecure_skip_verify && https {
            tracing::warn!(
                service = %cfg.name,
                "tls_insecure_skip_verify is set: certificates of this service's https:// servers are NOT \
                 verified, so anyone on the path can impersonate them; give the service a tls_root instead"
            );
        }
        let weights: Box<[u32]> = endpoints.iter().map(|e| e.weight).collect();
        let h2c = endpoints
            .iter()
            .any(|e| e.target.protocol == target::Protocol::H2c);
        Ok(Arc::new(Service {
            config: cfg.clone(),
            balancer: Balancer::new(cfg.load_balancer, endpoints.len()),
            endpoints: endpoints.into(),
            weights,
            timeout: cfg.timeout.unwrap_or(ctx.default_timeout),
            checks_started: AtomicBool::new(false),
            reaper_started: AtomicBool::new(false),
            h2c,
        }))
    }

    /// The configuration this service was built from (a reload keeps the service when it is equal).
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Starts the active health checks, if the service has any; later calls do nothing. The checks
    /// stop at `shutdown` or when the service is dropped.
    pub fn start_health_checks(self: &Arc<Self>, shutdown: CancellationToken) {
        if let Some(cfg) = &self.config.health {
            if !self.checks_started.swap(true, Ordering::Relaxed) {
                health::spawn_checker(self, cfg.clone(), shutdown);
            }
        }
    }

    /// Current state of every server, in configuration order.
    pub fn servers(&self) -> Vec<ServerStatus> {
        self.endpoints
            .iter()
            .map(|e| ServerStatus {
                url: e.url.to_string(),
                healthy: e.health.is_healthy(),
                in_flight: e.in_flight.load(Ordering::Relaxed),
                weight: e.weight,
            })
            .collect()
    }

    /// Sends one request to a server of this service; see the module documentation for the policy.
    /// The request's version says what the client spoke: an HTTP/2 request goes over HTTP/2 to an
    /// `https://` server that offers it. Requests with an `Upgrade` header always use HTTP/1.1.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Upstreamed, UpstreamError> {
        self.send_with(req, None).await
    }

    /// `send`, for a plain request whose `fields` are not in its header map (see `plain`).
    ///
    /// (`async` blocks, not `async fn`s, here and in `send_with_retries`, for the reason given at
    /// `H1Conn::send`.)
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    pub(crate) fn send_with<'a>(
        &'a self,
        mut req: Request<UpstreamBody>,
        fields: Option<&'a WireFields>,
    ) -> impl Future<Output = Result<Upstreamed, UpstreamError>> + 'a {
        async move {
            // HTTP/1.1 servers get the fields as they are; an h2c server needs them in the map.
            let fields = match fields {
                Some(fields) if self.h2c => {
                    fields.append_to(req.headers_mut());
                    None
                }
                fields => fields,
            };
            if !self.reaper_started.load(Ordering::Relaxed) {
                self.start_reaper();
            }
            let mut last = None;
            // Boxed so that wrapping it in the timeout moves a pointer, not the attempt's state machine.
            let attempts = Box::pin(self.send_with_retries(req, fields, &mut last));
            match crate::timers::timeout(self.timeout, attempts).await {
                Ok(result) => result,
                Err(_) => Err(UpstreamError::Timeout {
                    server: last.map_or_else(
                        || Arc::from(self.config.name.as_str()),
                        |i| self.endpoints[i].url.clone(),
                    ),
                }),
            }
        }
    }

    /// Closes idle connections past their idle timeout even when no request comes to do it. Started
    /// by the first request (not in `new`, which may run outside a runtime, e.g. `phoenix check`);
    /// ends when the service is dropped.
    fn start_reaper(&self) {
        if self.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let endpoints: Vec<_> = self.endpoints.iter().map(Arc::downgrade).collect();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(endpoint::IDLE_TIMEOUT);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let mut alive = false;
                for ep in endpoints.iter().filter_map(std::sync::Weak::upgrade) {
                    ep.close_expired_idle();
                    alive = true;
                }
                if !alive {
                    break;
                }
            }
        });
    }

    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    fn send_with_retries<'a>(
        &'a self,
        mut req: Request<UpstreamBody>,
        fields: Option<&'a WireFields>,
        last: &'a mut Option<usize>,
    ) -> impl Future<Output = Result<Upstreamed, UpstreamError>> + 'a {
        async move {
            let upgrade = req.headers().contains_key(header::UPGRADE);
            let h2_wanted = req.version() == Version::HTTP_2;
            // May be sent again after it was written: idempotent, no body. Even with `retries = 0`: a
            // dead keep-alive connection is not a server failure (see the module doc).
            let replayable = !upgrade
                && is_idempotent(req.method())
                && http_body::Body::is_end_stream(req.body());
            let mut retries_left = self.config.retries;
            let mut tried: Vec<usize> = Vec::new();
            loop {
                let i = self.pick(&tried).ok_or(UpstreamError::NoHealthyServer)?;
                *last = Some(i);
                let ep = &self.endpoints[i];
                let error = match ep.send(req, fields, h2_wanted, upgrade, replayable).await {
                    Ok(response) => {
                        if ep.health.request_succeeded() == Transition::Up {
                            tracing::info!(service = %ep.service, server = %ep.url, "upstream server answers again and is back in rotation");
                        }
                        return Ok(Upstreamed {
                            response,
                            server: ep.url.clone(),
                        });
                    }
                    Err(e) => e,
                };
                tracing::debug!(service = %ep.service, server = %ep.url, error = %error, "upstream attempt failed");
                let (again, error) = match error {
                    AttemptError::Connect { req, source } => {
                        if ep.health.connect_failed() == Transition::Down {
                            tracing::info!(service = %ep.service, server = %ep.url, error = %source, "upstream server refused a connection and leaves rotation");
                        }
                        (
                            Some(req),
                            UpstreamError::Connect {
                                server: ep.url.clone(),
                                source,
                            },
                        )
                    }
                    AttemptError::NotSent { req, source } => (
                        Some(req),
                        UpstreamError::Protocol {
                            server: ep.url.clone(),
                            source,
                        },
                    ),
                    AttemptError::Sent { source, resend } => (
                        resend,
                        UpstreamError::Protocol {
                            server: ep.url.clone(),
                            source,
                        },
                    ),
                };
                match again {
                    Some(r) if retries_left > 0 => {
                        retries_left -= 1;
                        tried.push(i);
                        req = r;
                    }
                    _ => return Err(error),
                }
            }
        }
    }

    /// Picks a server not tried yet for this request, preferring healthy ones; when all are ejected or
    /// tried, any server with a weight (see the module documentation).
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let eps = &self.endpoints;
        let in_flight = |i: usize| eps[i].in_flight.load(Ordering::Relaxed);
        self.balancer
            .pick(
                &self.weights,
                |i| !tried.contains(&i) && eps[i].health.is_available(),
                in_flight,
            )
            .or_else(|| {
                self.balancer
                    .pick(&self.weights, |i| !tried.contains(&i), in_flight)
            })
            .or_else(|| self.balancer.pick(&self.weights, |_| true, in_flight))
    }
}

fn is_idempotent(method: &Method) -> bool {
    // RFC 9110 section 9.2.2
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The two TLS connectors (ALPN `h2, http/1.1` and `http/1.1`) of a service with https servers.
fn tls_connectors(
    cfg: &ServiceConfig,
    ctx: &UpstreamContext,
    place: &str,
    problems: &mut Vec<Problem>,
) -> Option<(TlsConnector, TlsConnector)> {
    const H2: &[&[u8]] = &[tls::ALPN_H2, tls::ALPN_HTTP11];
    const H1: &[&[u8]] = &[tls::ALPN_HTTP11];
    if cfg.tls_insecure_skip_verify {
        return Some((
            TlsConnector::from(tls::dangerous_insecure_client_config(H2)),
            TlsConnector::from(tls::dangerous_insecure_client_config(H1)),
        ));
    }
    let roots = match (&cfg.tls_root, &ctx.internal_roots) {
        (Some(path), _) => match tls::load_roots(path) {
            Ok(roots) => Arc::new(roots),
            Err(e) => {
                problems.push(
                    Problem::new(format!("{place}.tls_root"), e.to_string()).with_hint(
                        "point tls_root at a PEM file with the root certificate(s) of the servers",
                    ),
                );
                return None;
            }
        },
        (None, Some(roots)) => roots.clone(),
        (None, None) => {
            problems.push(
                Problem::new(place, "has https:// servers but there is no root to verify them against")
                    .with_hint("set tls_root = \"/path/to/root.pem\" on the service, or configure the internal CA root"),
            );
            return None;
        }
    };
    Some((
        TlsConnector::from(tls::client_config_with_identity(
            roots.clone(),
            H2,
            ctx.client_cert.clone(),
        )),
        TlsConnector::from(tls::client_config_with_identity(
            roots,
            H1,
            ctx.client_cert.clone(),
        )),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthConfig, LoadBalancer, ServerConfig};

    fn ctx() -> UpstreamContext {
        UpstreamContext {
            internal_roots: None,
            connect_timeout: Duration::from_secs(1),
            default_timeout: Duration::from_secs(5),
            client_cert: None,
        }
    }

    fn service(servers: &[&str]) -> ServiceConfig {
        ServiceConfig {
            name: "app".into(),
            servers: servers
                .iter()
                .map(|s| ServerConfig::Url(s.to_string()))
                .collect(),
            load_balancer: LoadBalancer::RoundRobin,
            health: None,
            timeout: None,
            tls_root: None,
            tls_server_name: None,
            tls_insecure_skip_verify: false,
            retries: 2,
        }
    }

    #[test]
    fn reports_every_problem_at_once() {
        let mut cfg = service(&[
            "http://127.0.0.1:1",
            "ftp://x",
            "https://backend.lan",
            "http://a/b",
        ]);
        cfg.health = Some(HealthConfig {
            path: "health".into(),
            interval: Duration::ZERO,
            timeout: Duration::from_secs(1),
            status: Some(42),
        });
        let problems = Service::new(&cfg, &ctx()).unwrap_err();
        let places: Vec<&str> = problems.iter().map(|p| p.place.as_str()).collect();
        assert_eq!(
            places,
            [
                "service \"app\".servers[1]",
                "service \"app\".servers[3]",
                "service \"app\".health.path",
                "service \"app\".health.interval",
                "service \"app\".health.status",
                "service \"app\"", // https without a root
            ],
            "{problems:#?}"
        );
    }

    /// The future of one request to a service is moved into a box per request (`Service::send`),
    /// so its size is copied every time; the connect path, which would make it many kilobytes, is
    /// boxed separately (`Endpoint::connect`). Without that this future was 9.5 KB
    /// (2.2 KB with it, in a release build).
    #[test]
    fn the_per_request_future_stays_small() {
        let service = Service::new(&service(&["http://127.0.0.1:1"]), &ctx()).unwrap();
        let mut last = None;
        let req = Request::new(crate::body::empty());
        let future = service.send_with_retries(req, None, &mut last);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 3072, "send_with_retries future is {size} bytes");
    }

    #[test]
    fn empty_or_all_zero_weight_services_are_refused() {
        assert!(Service::new(&service(&[]), &ctx()).is_err());
        let mut cfg = service(&[]);
        cfg.servers = vec![ServerConfig::Weighted {
            url: "http://127.0.0.1:1".into(),
            weight: 0,
        }];
        assert!(Service::new(&cfg, &ctx()).is_err());
    }

    #[test]
    fn builds_and_reports_status() {
        let mut cfg = service(&["http://127.0.0.1:1"]);
        cfg.servers.push(ServerConfig::Weighted {
            url: "h2c://[::1]:2".into(),
            weight: 3,
        });
        let svc = Service::new(&cfg, &ctx()).unwrap();
        assert_eq!(svc.name(), "app");
        assert_eq!(svc.config(), &cfg);
        assert_eq!(
            svc.servers(),
            vec![
                ServerStatus {
                    url: "http://127.0.0.1:1".into(),
                    healthy: true,
                    in_flight: 0,
                    weight: 1
                },
                ServerStatus {
                    url: "h2c://[::1]:2".into(),
                    healthy: true,
                    in_flight: 0,
                    weight: 3
                },
            ]
        );
    }

    #[test]
    fn send_and_its_results_can_cross_threads() {
        // The proxy runs `send` inside hyper's per-connection tasks, which tokio may move between
        // worker threads; this fails to compile if a lock guard or a !Send body is held across an await.
        fn assert_send<T: Send>(_: &T) {}
        fn assert_send_sync<T: Send + Sync>() {}
        let svc = Service::new(&service(&["http://127.0.0.1:1"]), &ctx()).unwrap();
        let fut = svc.send(Request::new(crate::body::empty()));
        assert_send(&fut);
        assert_send_sync::<Service>();
        assert_send_sync::<UpstreamError>();
        fn assert_body_send<T: Send + 'static>() {}
        assert_body_send::<ResponseBody>();
    }

    #[test]
    fn idempotent_methods_per_rfc_9110() {
        assert!(
            is_idempotent(&Method::GET)
                && is_idempotent(&Method::PUT)
                && is_idempotent(&Method::DELETE)
        );
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }
}
