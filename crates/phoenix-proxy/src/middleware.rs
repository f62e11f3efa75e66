//! Middlewares: per-route request and response transformations and guards.
//!
//! Each `[middleware.NAME]` section of the topology file sets exactly one kind; a route lists the
//! middlewares it uses, in order, and the route table builds a [`Chain`] of them. The proxy calls
//! [`Chain::on_request`] before contacting the upstream (a guard may answer instead: 401, 403, 413,
//! 429, 307/308) and [`Chain::on_response`] on the response head, in reverse order. Two kinds are
//! policies rather than transformations and are read by the proxy: [`Chain::max_body_size`] (also
//! enforced while streaming) and [`Chain::retry`].
//!
//! Everything that can be checked is checked when the middleware is built, so a request never meets
//! an invalid header name or prefix. Middlewares hold state that must survive across requests (rate
//! limit buckets, verified basic-auth credentials) and are shared behind `Arc`; a reload builds new
//! ones, which drops that state together with the configuration it belonged to.

// `Result<(), Response>` is the shape the proxy expects from `on_request` (see the crate architecture);
// the error is the rare path and lives only until it is written out, so boxing it buys nothing.
#![allow(clippy::result_large_err)]

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Response, StatusCode};
use http_body_util::Full;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::config::{MiddlewareConfig, Problem, RetryConfig};

/// A short answer produced by a middleware instead of the upstream's.
pub type EarlyResponse = Response<Full<Bytes>>;

/// Facts about the request that are not in its head: who sent it and how.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The client as the proxy believes it (see `trusted_proxies`).
    pub client_ip: IpAddr,
    /// Scheme the client used to reach this listener: `"https"` or `"http"`.
    pub scheme: &'static str,
    /// Lowercase host the client asked for, without port.
    pub host: String,
}

/// One built middleware.
#[derive(Debug)]
pub struct Middleware {
    name: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    StripPrefix(Vec<String>),
    AddPrefix(String),
    Headers(HeaderRules),
    RedirectScheme {
        scheme: &'static str,
        permanent: bool,
        port: Option<u16>,
    },
    BasicAuth(BasicAuth),
    IpAllowlist(Vec<IpNet>),
    RateLimit(RateLimiter),
    MaxBodySize(u64),
    Retry(RetryConfig),
}

#[derive(Debug, Default)]
struct HeaderRules {
    request_set: Vec<(HeaderName, HeaderValue)>,
    request_remove: Vec<HeaderName>,
    response_set: Vec<(HeaderName, HeaderValue)>,
    response_remove: Vec<HeaderName>,
}

impl Middleware {
    /// Builds a middleware from its section, reporting every problem found (place `middleware.NAME`).
    pub fn build(name: &str, cfg: &MiddlewareConfig) -> Result<Middleware, Vec<Problem>> {
        let place = format!("middleware.{name}");
        let set: Vec<&str> = [
            ("strip_prefix", cfg.strip_prefix.is_some()),
            ("add_prefix", cfg.add_prefix.is_some()),
            ("headers", cfg.headers.is_some()),
            ("redirect_scheme", cfg.redirect_scheme.is_some()),
            ("basic_auth", cfg.basic_auth.is_some()),
            ("ip_allowlist", cfg.ip_allowlist.is_some()),
            ("rate_limit", cfg.rate_limit.is_some()),
            ("max_body_size", cfg.max_body_size.is_some()),
            ("retry", cfg.retry.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, present)| present.then_some(kind))
        .collect();
        if set.len() != 1 {
            let message = if set.is_empty() {
                "sets no middleware kind; exactly one is needed".to_owned()
            } else {
                format!(
                    "sets {} kinds ({}); exactly one is allowed per middleware",
                    set.len(),
                    set.join(", ")
                )
            };
            return Err(vec![Problem::new(place, message).with_hint(
                "give each kind its own [middleware.NAME] section and list them in the route's `middlewares`, \
                 e.g. strip_prefix, add_prefix, headers, redirect_scheme, basic_auth, ip_allowlist, rate_limit, \
                 max_body_size, retry",
            )]);
        }
        let mut problems = Vec::new();
        let kind = if let Some(prefixes) = &cfg.strip_prefix {
            if prefixes.is_empty() {
                problems.push(Problem::new(
                    format!("{place}.strip_prefix"),
                    "lists no prefix",
                ));
            }
            for (i, p) in prefixes.iter().enumerate() {
                if !p.starts_with('/')
                    || PathAndQuery::try_from(p.as_str()).is_err()
                    || p.contains('?')
                {
                    problems.push(
                        Problem::new(
                            format!("{place}.strip_prefix[{i}]"),
                            format!("`{p}` is not a path prefix"),
                        )
                        .with_hint("prefixes start with `/`, e.g. \"/v1\""),
                    );
                }
            }
            Kind::StripPrefix(prefixes.clone())
        } else if let Some(prefix) = &cfg.add_prefix {
            if !prefix.starts_with('/')
                || PathAndQuery::try_from(prefix.as_str()).is_err()
                || prefix.contains('?')
            {
                problems.push(
                    Problem::new(
                        format!("{place}.add_prefix"),
                        format!("`{prefix}` is not a path prefix"),
                    )
                    .with_hint("prefixes start with `/`, e.g. \"/api\""),
                );
            }
            Kind::AddPrefix(prefix.trim_end_matches('/').to_owned())
        } else if let Some(h) = &cfg.headers {
            let place = format!("{place}.headers");
            let names =
                |list: &[String], field: &str, problems: &mut Vec<Problem>| -> Vec<HeaderName> {
                    list.iter()
                        .filter_map(|n| {
                            HeaderName::from_bytes(n.as_bytes())
                                .map_err(|_| {
                                    problems.push(Problem::new(
                                        format!("{place}.{field}"),
                                        format!("invalid header name `{n}`"),
                                    ))
                                })
                                .ok()
                        })
                        .collect()
                };
            let pairs = |map: &std::collections::BTreeMap<String, String>,
                         field: &str,
                         problems: &mut Vec<Problem>| {
                map.iter()
                    .filter_map(|(n, v)| {
                        let name = HeaderName::from_bytes(n.as_bytes())
                            .map_err(|_| {
                                problems.push(Problem::new(
                                    format!("{place}.{field}"),
                                    format!("invalid header name `{n}`"),
                                ))
                            })
                            .ok();
                        let value = HeaderValue::from_str(v)
                            .map_err(|_| {
                                problems.push(Problem::new(
                                    format!("{place}.{field}.{n}"),
                                    "invalid header value (control characters are not allowed)",
                                ))
                            })
                            .ok();
                        Some((name?, value?))
                    })
                    .collect()
            };
            Kind::Headers(HeaderRules {
                request_set: pairs(&h.request_set, "request_set", &mut problems),
                request_remove: names(&h.request_remove, "request_remove", &mut problems),
                response_set: pairs(&h.response_set, "response_set", &mut problems),
                response_remove: names(&h.response_remove, "response_remove", &mut problems),
            })
        } else if let Some(r) = &cfg.redirect_scheme {
            let scheme = match r.scheme.to_ascii_lowercase().as_str() {
                "https" => "https",
                "http" => "http",
                other => {
                    problems.push(
                        Problem::new(
                            format!("{place}.redirect_scheme.scheme"),
                            format!("unknown scheme `{other}`"),
                        )
                        .with_hint("use \"https\" or \"http\""),
                    );
                    "https"
                }
            };
            if r.port == Some(0) {
                problems.push(Problem::new(
                    format!("{place}.redirect_scheme.port"),
                    "port 0 cannot be redirected to",
                ));
            }
            Kind::RedirectScheme {
                scheme,
                permanent: r.permanent,
                port: r.port,
            }
        } else if let Some(b) = &cfg.basic_auth {
            match BasicAuth::build(&place, b) {
                Ok(auth) => Kind::BasicAuth(auth),
                Err(mut p) => {
                    problems.append(&mut p);
                    Kind::MaxBodySize(0)
                }
            }
        } else if let Some(nets) = &cfg.ip_allowlist {
            if nets.is_empty() {
                problems.push(
                    Problem::new(
                        format!("{place}.ip_allowlist"),
                        "is empty, which would refuse every client",
                    )
                    .with_hint("list networks such as \"10.0.0.0/8\", or remove the middleware"),
                );
            }
            Kind::IpAllowlist(nets.iter().map(IpNet::trunc).collect())
        } else if let Some(r) = &cfg.rate_limit {
            let burst = r.burst.unwrap_or(r.average);
            if r.average == 0 {
                problems.push(
                    Problem::new(format!("{place}.rate_limit.average"), "must be at least 1")
                        .with_hint("to block everyone use an ip_allowlist instead"),
                );
            }
            if burst == 0 {
                problems.push(Problem::new(
                    format!("{place}.rate_limit.burst"),
                    "must be at least 1",
                ));
            }
            if r.period.is_zero() {
                problems.push(Problem::new(
                    format!("{place}.rate_limit.period"),
                    "must be longer than zero",
                ));
            }
            Kind::RateLimit(RateLimiter::new(r.average, burst, r.period))
        } else if let Some(max) = cfg.max_body_size {
            Kind::MaxBodySize(max)
        } else if let Some(retry) = &cfg.retry {
            if retry.attempts == 0 {
                problems.push(
                    Problem::new(
                        format!("{place}.retry.attempts"),
                        "must be at least 1 (it counts the first attempt)",
                    )
                    .with_hint("attempts = 1 means no retry; 3 means up to two retries"),
                );
            }
            Kind::Retry(retry.clone())
        } else {
            unreachable!("exactly one kind is set, checked above")
        };
        if problems.is_empty() {
            Ok(Middleware {
                name: name.to_owned(),
                kind,
            })
        } else {
            Err(problems)
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kind as written in the file, e.g. `"strip_prefix"`.
    pub fn kind(&self) -> &'static str {
        match self.kind {
            Kind::StripPrefix(_) => "strip_prefix",
            Kind::AddPrefix(_) => "add_prefix",
            Kind::Headers(_) => "headers",
            Kind::RedirectScheme { .. } => "redirect_scheme",
            Kind::BasicAuth(_) => "basic_auth",
            Kind::IpAllowlist(_) => "ip_allowlist",
            Kind::RateLimit(_) => "rate_limit",
            Kind::MaxBodySize(_) => "max_body_size",
            Kind::Retry(_) => "retry",
        }
    }

    fn on_request(
        &self,
        req: &mut http::request::Parts,
        ctx: &RequestContext,
        now: Instant,
    ) -> Result<(), EarlyResponse> {
        match &self.kind {
            Kind::StripPrefix(prefixes) => {
                let path = req.uri.path();
                // The first listed prefix that matches wins, as in Traefik.
                if let Some(prefix) = prefixes.iter().find(|p| path.starts_with(p.as_str())) {
                    let rest = &path[prefix.len()..];
                    let new_path = if rest.starts_with('/') {
                        rest.to_owned()
                    } else {
                        format!("/{rest}")
                    };
                    let prefix_value =
                        HeaderValue::from_str(prefix).expect("validated as a URI path at build");
                    set_path(req, &new_path)?;
                    req.headers
                        .insert(HeaderName::from_static("x-forwarded-prefix"), prefix_value);
                }
                Ok(())
            }
            Kind::AddPrefix(prefix) => {
                let new_path = format!("{prefix}{}", req.uri.path());
                set_path(req, &new_path)
            }
            Kind::Headers(rules) => {
                for name in &rules.request_remove {
                    req.headers.remove(name);
                }
                for (name, value) in &rules.request_set {
                    req.headers.insert(name.clone(), value.clone());
                }
                Ok(())
            }
            Kind::RedirectScheme {
                scheme,
                permanent,
                port,
            } => {
                if ctx.scheme == *scheme {
                    return Ok(());
                }
                if ctx.host.is_empty() {
                    // HTTP/1.0 without Host: there is nowhere to redirect to.
                    return Err(plain(
                        StatusCode::BAD_REQUEST,
                        "a redirect needs a Host header\n",
                    ));
                }
                let default_port = if *scheme == "https" { 443 } else { 80 };
                let host = if ctx.host.contains(':') && !ctx.host.starts_with('[') {
                    format!("[{}]", ctx.host)
                } else {
                    ctx.host.clone()
                };
                let port = port
                    .filter(|p| *p != default_port)
                    .map(|p| format!(":{p}"))
                    .unwrap_or_default();
                let path = req.uri.path_and_query().map_or("/", PathAndQuery::as_str);
                let location = format!("{scheme}://{host}{port}{path}");
                let status = if *permanent {
                    StatusCode::PERMANENT_REDIRECT
                } else {
                    StatusCode::TEMPORARY_REDIRECT
                };
                let mut response = plain(status, format!("redirecting to {location}\n"));
                match HeaderValue::from_str(&location) {
                    Ok(v) => response.headers_mut().insert(header::LOCATION, v),
                    Err(_) => {
                        return Err(plain(
                            StatusCode::BAD_REQUEST,
                            "invalid host for a redirect\n",
                        ))
                    }
                };
                Err(response)
            }
            Kind::BasicAuth(auth) => auth.check(req),
            Kind::IpAllowlist(nets) => {
                let ip = ctx.client_ip.to_canonical();
                if nets.iter().any(|n| n.contains(&ip)) {
                    Ok(())
                } else {
                    Err(plain(StatusCode::FORBIDDEN, "forbidden\n"))
                }
            }
            Kind::RateLimit(limiter) => limiter.check(ctx.client_ip, now).map_err(|wait| {
                // Whole seconds, rounded up, at least one: clients that retry after it will pass.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut response = plain(StatusCode::TOO_MANY_REQUESTS, "too many requests\n");
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                response
            }),
            Kind::MaxBodySize(max) => {
                let declared = req
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
                match declared {
                    Some(len) if len > *max => Err(plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("request body of {len} bytes is over the limit of {max} bytes\n"),
                    )),
                    _ => Ok(()),
                }
            }
            Kind::Retry(_) => Ok(()),
        }
    }

    fn on_response(&self, resp: &mut http::response::Parts) {
        if let Kind::Headers(rules) = &self.kind {
            for name in &rules.response_remove {
                resp.headers.remove(name);
            }
            for (name, value) in &rules.response_set {
                resp.headers.insert(name.clone(), value.clone());
            }
        }
    }
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> EarlyResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Replaces the path of the request URI, keeping its query, scheme and authority.
fn set_path(req: &mut http::request::Parts, new_path: &str) -> Result<(), EarlyResponse> {
    let path_and_query = match req.uri.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path.to_owned(),
    };
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(path_and_query).ok();
    match parts
        .path_and_query
        .is_some()
        .then(|| Uri::from_parts(parts))
    {
        Some(Ok(uri)) => {
            req.uri = uri;
            Ok(())
        }
        // Unreachable with prefixes validated at build time; answer rather than panic on the data path.
        _ => Err(plain(
            StatusCode::BAD_REQUEST,
            "the rewritten path is not a valid URI\n",
        )),
    }
}

/// The middlewares of one route, in order. Cloning is cheap (one `Arc`).
#[derive(Debug, Clone, Default)]
pub struct Chain {
    items: Arc<[Arc<Middleware>]>,
}

impl Chain {
    pub fn new(items: Vec<Arc<Middleware>>) -> Chain {
        Chain {
            items: items.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Middleware>> {
        self.items.iter()
    }

    /// Request phase, in order. `Err(response)` short-circuits: the proxy sends that response and does
    /// not contact the upstream (401 basic-auth with `WWW-Authenticate`, 403 ip-allowlist, 429
    /// rate-limit with `Retry-After`, 413 by `Content-Length`, 308/307 redirect-scheme).
    pub fn on_request(
        &self,
        req: &mut http::request::Parts,
        ctx: &RequestContext,
    ) -> Result<(), EarlyResponse> {
        let now = Instant::now();
        self.items
            .iter()
            .try_for_each(|m| m.on_request(req, ctx, now))
    }

    /// Response phase, in reverse order (header set/remove).
    pub fn on_response(&self, resp: &mut http::response::Parts) {
        self.items.iter().rev().for_each(|m| m.on_response(resp));
    }

    /// Smallest `max_body_size` of the chain; the proxy enforces it while streaming the body too.
    pub fn max_body_size(&self) -> Option<u64> {
        self.items
            .iter()
            .filter_map(|m| match m.kind {
                Kind::MaxBodySize(max) => Some(max),
                _ => None,
            })
            .min()
    }

    /// Retry policy of the first `retry` middleware of the chain, for the proxy's upstream calls.
    pub fn retry(&self) -> Option<RetryConfig> {
        self.items.iter().find_map(|m| match &m.kind {
            Kind::Retry(r) => Some(r.clone()),
            _ => None,
        })
    }
}

// ---------------------------------------------------------------------------------------------------
// Basic authentication

/// Successful verifications remembered per middleware; bcrypt takes tens of milliseconds on purpose,
/// and a browser sends the same credentials with every request.
const AUTH_CACHE_CAPACITY: usize = 1024;

struct BasicAuth {
    /// `(user, bcrypt hash)` in configuration order.
    users: Vec<(String, String)>,
    challenge: HeaderValue,
    remove_header: bool,
    verified: Mutex<VerifiedCache>,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes stay out of logs.
        f.debug_struct("BasicAuth")
            .field(
                "users",
                &self.users.iter().map(|u| &u.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Bounded set of SHA-256 digests of (user, password, stored hash) that bcrypt accepted, evicted
/// oldest first. The password never stays in memory; the digest is only useful to someone who
/// already knows the password.
#[derive(Default)]
struct VerifiedCache {
    set: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

impl VerifiedCache {
    fn insert(&mut self, digest: [u8; 32]) {
        if !self.set.insert(digest) {
            return;
        }
        self.order.push_back(digest);
        if self.order.len() > AUTH_CACHE_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// Compares without stopping at the first difference, so timing does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl BasicAuth {
    fn build(place: &str, cfg: &crate::config::BasicAuthConfig) -> Result<BasicAuth, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut users: Vec<(String, String)> = Vec::new();
        if cfg.users.is_empty() {
            problems.push(
                Problem::new(format!("{place}.basic_auth.users"), "lists no user").with_hint(
                    "add entries \"user:$2y$...\" made with `htpasswd -nbB user password`",
                ),
            );
        }
        for (i, entry) in cfg.users.iter().enumerate() {
            let field = format!("{place}.basic_auth.users[{i}]");
            let Some((user, hash)) = entry.split_once(':').filter(|(u, _)| !u.is_empty()) else {
                problems.push(
                    Problem::new(field, "is not `user:hash`")
                        .with_hint("make entries with `htpasswd -nbB user password`"),
                );
                continue;
            };
            if hash.parse::<bcrypt::HashParts>().is_err() {
                problems.push(
                    Problem::new(field, format!("the password of `{user}` is not a bcrypt hash"))
                        .with_hint("only bcrypt ($2y$, $2b$, $2a$) is accepted; make one with `htpasswd -nbB user password`"),
                );
                continue;
            }
            if users.iter().any(|(u, _)| u == user) {
                problems.push(Problem::new(
                    field,
                    format!("user `{user}` is listed twice"),
                ));
                continue;
            }
            users.push((user.to_owned(), hash.to_owned()));
        }
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{}\", charset=\"UTF-8\"", cfg.realm))
                .ok()
                .filter(|_| !cfg.realm.contains('"') && !cfg.realm.contains('\\'));
        if challenge.is_none() {
            problems.push(Problem::new(
                format!("{place}.basic_auth.realm"),
                "may not contain quotes, backslashes or control characters",
            ));
        }
        match challenge {
            Some(challenge) if problems.is_empty() => Ok(BasicAuth {
                users,
                challenge,
                remove_header: cfg.remove_header,
                verified: Mutex::new(VerifiedCache::default()),
            }),
            _ => Err(problems),
        }
    }

    fn check(&self, req: &mut http::request::Parts) -> Result<(), EarlyResponse> {
        let credentials = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| parse_basic(v.as_bytes()));
        let ok = credentials.is_some_and(|(user, password)| self.verify(&user, &password));
        if !ok {
            let mut response = plain(StatusCode::UNAUTHORIZED, "authentication required\n");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, self.challenge.clone());
            return Err(response);
        }
        if self.remove_header {
            req.headers.remove(header::AUTHORIZATION);
        }
        Ok(())
    }

    fn verify(&self, user: &[u8], password: &[u8]) -> bool {
        // Look at every user with a constant-time comparison, so timing does not reveal which user
        // names exist (or how much of one matched).
        let mut found: Option<&(String, String)> = None;
        for entry in &self.users {
            if constant_time_eq(entry.0.as_bytes(), user) {
                found = Some(entry);
            }
        }
        // An unknown user still costs one bcrypt run (against the first user's hash, result ignored)
        // so that it takes as long as a wrong password for a known user.
        let hash = found.map_or(self.users[0].1.as_str(), |(_, h)| h.as_str());
        let mut hasher = Sha256::new();
        hasher.update(user);
        hasher.update([0]);
        hasher.update(password);
        hasher.update([0]);
        hasher.update(hash.as_bytes());
        let digest: [u8; 32] = hasher.finalize().into();
        // The set is keyed by digests of attacker-chosen input; an early-exit comparison of digests
        // can at most reveal a digest prefix, which does not help find a password.
        if found.is_some()
            && self
                .verified
                .lock()
                .expect("auth cache lock")
                .set
                .contains(&digest)
        {
            return true;
        }
        let accepted =
            run_blocking(|| bcrypt::verify(password, hash).unwrap_or(false)) && found.is_some();
        if accepted {
            self.verified
                .lock()
                .expect("auth cache lock")
                .insert(digest);
        }
        accepted
    }
}

/// `Basic base64(user:password)` -> (user, password).
fn parse_basic(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// Runs CPU-heavy work (bcrypt) so that, on a multi-threaded runtime, other tasks of this worker move
/// to other threads meanwhile. On a current-thread runtime (or none) it just runs.
fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

// ---------------------------------------------------------------------------------------------------
// Rate limiting

/// Most client buckets kept per middleware. A bucket is ~48 bytes, so this bounds memory at a few MB
/// whatever the number of clients.
const MAX_BUCKETS: usize = 65_536;

/// Token bucket per client: `burst` tokens at most, refilled at `average` per `period`; a request
/// takes one token. IPv6 clients are keyed by their /64, since one host can use any address in it.
#[derive(Debug)]
struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    max_buckets: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(average: u32, burst: u32, period: Duration) -> Self {
        RateLimiter {
            per_second: f64::from(average) / period.as_secs_f64().max(f64::MIN_POSITIVE),
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
            max_buckets: MAX_BUCKETS,
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
            v4 => v4,
        }
    }

    fn refill(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        (bucket.tokens + elapsed * self.per_second).min(self.burst)
    }

    /// Takes a token for `ip` at time `now`, or says how long until one is available.
    fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = Self::key(ip);
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        if buckets.len() >= self.max_buckets && !buckets.contains_key(&key) {
            self.evict(&mut buckets, now);
        }
        let bucket = match buckets.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Bucket {
                tokens: self.burst,
                last: now,
            }),
        };
        let tokens = self.refill(bucket, now);
        bucket.last = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
        }
    }

    /// Makes room for a new client. Buckets that have refilled completely are dropped first: a new
    /// bucket starts full, so forgetting them changes nothing. If every bucket is in use, the one
    /// idle longest goes (that client gets a fresh burst - the price of bounded memory).
    fn evict(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        buckets.retain(|_, b| self.refill(b, now) < self.burst);
        if buckets.len() >= self.max_buckets {
            if let Some(oldest) = buckets.iter().min_by_key(|(_, b)| b.last).map(|(k, _)| *k) {
                buckets.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BasicAuthConfig, HeadersConfig, RateLimitConfig, RedirectSchemeConfig};
    use http::Request;
    use std::net::Ipv6Addr;

    fn ctx(ip: impl Into<IpAddr>) -> RequestContext {
        RequestContext {
            client_ip: ip.into(),
            scheme: "https",
            host: "app.phoenix.test".to_owned(),
        }
    }

    fn parts(uri: &str) -> http::request::Parts {
        Request::get(uri).body(()).unwrap().into_parts().0
    }

    fn chain(cfgs: &[MiddlewareConfig]) -> Chain {
        Chain::new(
            cfgs.iter()
                .enumerate()
                .map(|(i, c)| Arc::new(Middleware::build(&format!("m{i}"), c).unwrap()))
                .collect(),
        )
    }

    fn one(cfg: MiddlewareConfig) -> Chain {
        chain(&[cfg])
    }

    #[test]
    fn exactly_one_kind_is_required() {
        let none = Middleware::build("empty", &MiddlewareConfig::default()).unwrap_err();
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].place, "middleware.empty");
        assert!(
            none[0].message.contains("no middleware kind"),
            "{}",
            none[0]
        );

        let two = MiddlewareConfig {
            strip_prefix: Some(vec!["/a".into()]),
            max_body_size: Some(10),
            ..Default::default()
        };
        let problems = Middleware::build("both", &two).unwrap_err();
        assert!(
            problems[0]
                .message
                .contains("2 kinds (strip_prefix, max_body_size)"),
            "{}",
            problems[0]
        );
        assert!(problems[0].hint.is_some());
    }

    #[test]
    fn strip_prefix_keeps_query_and_sets_forwarded_prefix() {
        let c = one(MiddlewareConfig {
            strip_prefix: Some(vec!["/v2".into(), "/v1".into()]),
            ..Default::default()
        });
        let cases = [
            ("/v1/users?id=3&x", "/users?id=3&x", Some("/v1")),
            ("/v1", "/", Some("/v1")),
            ("/v1?q=1", "/?q=1", Some("/v1")),
            ("/v2/a", "/a", Some("/v2")),
            // A plain string prefix, and the result always starts with `/`, as in Traefik.
            ("/v1abc", "/abc", Some("/v1")),
            ("/other/v1", "/other/v1", None),
        ];
        for (uri, want, prefix) in cases {
            let mut p = parts(uri);
            c.on_request(&mut p, &ctx([127, 0, 0, 1])).unwrap();
            assert_eq!(p.uri.path_and_query().unwrap().as_str(), want, "{uri}");
            assert_eq!(
                p.headers
                    .get("x-forwarded-prefix")
                    .map(|v| v.to_str().unwrap()),
                prefix,
                "{uri}"
            );
        }
        // HTTP/2 requests carry an absolute URI; scheme and authority stay.
        let mut p = parts("https://app.phoenix.test/v1/x?y=1");
        c.on_request(&mut p, &ctx([127, 0, 0, 1])).unwrap();
        assert_eq!(p.uri.to_string(), "https://app.phoenix.test/x?y=1");
    }

    #[test]
    fn add_prefix_keeps_query() {
        let c = one(MiddlewareConfig {
            add_prefix: Some("/api/".into()),
            ..Default::default()
        });
        let mut p = parts("/users?page=2");
        c.on_request(&mut p, &ctx([127, 0, 0, 1])).unwrap();
        assert_eq!(
            p.uri.path_and_query().unwrap().as_str(),
            "/api/users?page=2"
        );
        let mut p = parts("/");
        c.on_request(&mut p, &ctx([127, 0, 0, 1])).unwrap();
        assert_eq!(p.uri.path(), "/api/");
    }

    #[test]
    fn prefixes_are_validated() {
        let bad = MiddlewareConfig {
            strip_prefix: Some(vec!["v1".into(), "/ok".into(), "/a b".into()]),
            ..Default::default()
        };
        let problems = Middleware::build("s", &bad).unwrap_err();
        let places: Vec<_> = problems.iter().map(|p| p.place.as_str()).collect();
        assert_eq!(
            places,
            [
                "middleware.s.strip_prefix[0]",
                "middleware.s.strip_prefix[2]"
            ]
        );
        let bad = MiddlewareConfig {
            add_prefix: Some("api".into()),
            ..Default::default()
        };
        assert_eq!(
            Middleware::build("a", &bad).unwrap_err()[0].place,
            "middleware.a.add_prefix"
        );
    }

    #[test]
    fn headers_are_set_and_removed_in_both_directions() {
        let mut h = HeadersConfig::default();
        h.request_set.insert("X-Env".into(), "prod".into());
        h.request_remove.push("x-secret".into());
        h.response_set.insert(
            "Strict-Transport-Security".into(),
            "max-age=63072000".into(),
        );
        h.response_remove.push("server".into());
        let c = one(MiddlewareConfig {
            headers: Some(h),
            ..Default::default()
        });
        let mut p = parts("/");
        p.headers
            .insert("x-secret", HeaderValue::from_static("s3cret"));
        p.headers.insert("x-env", HeaderValue::from_static("dev"));
        c.on_request(&mut p, &ctx([127, 0, 0, 1])).unwrap();
        assert_eq!(p.headers["x-env"], "prod");
        assert!(p.headers.get("x-secret").is_none());

        let mut r = Response::new(()).into_parts().0;
        r.headers
            .insert("server", HeaderValue::from_static("nginx"));
        c.on_response(&mut r);
        assert!(r.headers.get("server").is_none());
        assert_eq!(r.headers["strict-transport-security"], "max-age=63072000");

        let mut bad = HeadersConfig::default();
        bad.request_set.insert("bad name".into(), "v".into());
        bad.response_set.insert("x-ok".into(), "line\nbreak".into());
        bad.response_remove.push("(nope)".into());
        let problems = Middleware::build(
            "h",
            &MiddlewareConfig {
                headers: Some(bad),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn response_phase_runs_in_reverse_order() {
        let set = |v: &str| {
            let mut h = HeadersConfig::default();
            h.response_set.insert("x-order".into(), v.into());
            MiddlewareConfig {
                headers: Some(h),
                ..Default::default()
            }
        };
        let c = chain(&[set("first"), set("second")]);
        let mut r = Response::new(()).into_parts().0;
        c.on_response(&mut r);
        // The first middleware of the route is the outermost: it sees the response last.
        assert_eq!(r.headers["x-order"], "first");
    }

    #[test]
    fn redirect_scheme() {
        let redirect = |scheme: &str, permanent: bool, port: Option<u16>| {
            one(MiddlewareConfig {
                redirect_scheme: Some(RedirectSchemeConfig {
                    scheme: scheme.into(),
                    permanent,
                    port,
                }),
                ..Default::default()
            })
        };
        let http_ctx = RequestContext {
            client_ip: IpAddr::from([1, 2, 3, 4]),
            scheme: "http",
            host: "app.phoenix.test".into(),
        };

        let mut p = parts("/a/b?c=d");
        let r = redirect("https", true, None)
            .on_request(&mut p, &http_ctx)
            .unwrap_err();
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()["location"], "https://app.phoenix.test/a/b?c=d");

        let r = redirect("https", false, Some(8443))
            .on_request(&mut parts("/"), &http_ctx)
            .unwrap_err();
        assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(r.headers()["location"], "https://app.phoenix.test:8443/");

        // Default port is left out.
        let r = redirect("https", true, Some(443))
            .on_request(&mut parts("/"), &http_ctx)
            .unwrap_err();
        assert_eq!(r.headers()["location"], "https://app.phoenix.test/");

        // Already on the target scheme: passes.
        redirect("https", true, None)
            .on_request(&mut parts("/"), &ctx([1, 2, 3, 4]))
            .unwrap();

        let no_host = RequestContext {
            host: String::new(),
            ..http_ctx.clone()
        };
        let r = redirect("https", true, None)
            .on_request(&mut parts("/"), &no_host)
            .unwrap_err();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);

        let v6 = RequestContext {
            host: "::1".into(),
            ..http_ctx.clone()
        };
        let r = redirect("https", true, None)
            .on_request(&mut parts("/"), &v6)
            .unwrap_err();
        assert_eq!(r.headers()["location"], "https://[::1]/");

        let bad = MiddlewareConfig {
            redirect_scheme: Some(RedirectSchemeConfig {
                scheme: "ftp".into(),
                permanent: true,
                port: None,
            }),
            ..Default::default()
        };
        assert!(Middleware::build("r", &bad).unwrap_err()[0]
            .message
            .contains("ftp"));
    }

    #[test]
    fn ip_allowlist() {
        let c = one(MiddlewareConfig {
            ip_allowlist: Some(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ]),
            ..Default::default()
        });
        let cases: [(IpAddr, bool); 5] = [
            (IpAddr::from([10, 1, 2, 3]), true),
            (IpAddr::from([11, 0, 0, 1]), false),
            ("fd00::5".parse().unwrap(), true),
            (Ipv6Addr::LOCALHOST.into(), false),
            ("::ffff:10.9.9.9".parse().unwrap(), true),
        ];
        for (ip, allowed) in cases {
            let result = c.on_request(&mut parts("/"), &ctx(ip));
            assert_eq!(result.is_ok(), allowed, "{ip}");
            if let Err(r) = result {
                assert_eq!(r.status(), StatusCode::FORBIDDEN);
            }
        }
        let empty = MiddlewareConfig {
            ip_allowlist: Some(vec![]),
            ..Default::default()
        };
        assert!(Middleware::build("i", &empty).is_err());
    }

    #[test]
    fn max_body_size_by_content_length() {
        let c = chain(&[
            MiddlewareConfig {
                max_body_size: Some(1000),
                ..Default::default()
            },
            MiddlewareConfig {
                max_body_size: Some(100),
                ..Default::default()
            },
        ]);
        assert_eq!(c.max_body_size(), Some(100));
        let with_length = |n: &str| {
            let mut p = parts("/");
            p.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from_str(n).unwrap());
            p
        };
        assert!(c
            .on_request(&mut with_length("100"), &ctx([1, 1, 1, 1]))
            .is_ok());
        let r = c
            .on_request(&mut with_length("101"), &ctx([1, 1, 1, 1]))
            .unwrap_err();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // No Content-Length (chunked): left to the streaming limit.
        assert!(c.on_request(&mut parts("/"), &ctx([1, 1, 1, 1])).is_ok());
        assert_eq!(Chain::default().max_body_size(), None);
    }

    #[test]
    fn retry_policy_is_exposed() {
        let retry = RetryConfig {
            attempts: 3,
            initial_interval: Duration::from_millis(50),
        };
        let c = chain(&[
            MiddlewareConfig {
                max_body_size: Some(10),
                ..Default::default()
            },
            MiddlewareConfig {
                retry: Some(retry.clone()),
                ..Default::default()
            },
        ]);
        assert_eq!(c.retry(), Some(retry));
        assert!(c.on_request(&mut parts("/"), &ctx([1, 1, 1, 1])).is_ok());
        assert_eq!(Chain::default().retry(), None);
        let zero = MiddlewareConfig {
            retry: Some(RetryConfig {
                attempts: 0,
                initial_interval: Duration::ZERO,
            }),
            ..Default::default()
        };
        assert!(Middleware::build("r", &zero).unwrap_err()[0]
            .place
            .ends_with("retry.attempts"));
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[test]
    fn basic_auth_with_a_real_bcrypt_hash() {
        // Cost 4 (bcrypt's minimum) keeps the test fast; verification is the same code path.
        let hash = bcrypt::hash("correct horse", 4).unwrap();
        let other = bcrypt::hash("other", 4).unwrap();
        let cfg = MiddlewareConfig {
            basic_auth: Some(BasicAuthConfig {
                users: vec![format!("alice:{hash}"), format!("bob:{other}")],
                realm: "phoenix".into(),
                remove_header: true,
            }),
            ..Default::default()
        };
        let middleware = Arc::new(Middleware::build("auth", &cfg).unwrap());
        let c = Chain::new(vec![middleware.clone()]);
        let attempt = |value: Option<HeaderValue>| {
            let mut p = parts("/");
            if let Some(v) = value {
                p.headers.insert(header::AUTHORIZATION, v);
            }
            c.on_request(&mut p, &ctx([1, 1, 1, 1])).map(|()| p)
        };
        let passed = attempt(Some(basic("alice", "correct horse"))).unwrap();
        assert!(
            passed.headers.get(header::AUTHORIZATION).is_none(),
            "header removed before forwarding"
        );
        assert!(attempt(Some(basic("bob", "other"))).is_ok());
        for bad in [
            basic("alice", "wrong"),
            basic("mallory", "correct horse"),
            basic("bob", "correct horse"),
            HeaderValue::from_static("Basic !!!"),
            HeaderValue::from_static("Bearer x"),
        ] {
            let r = attempt(Some(bad.clone())).unwrap_err();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
            assert_eq!(
                r.headers()["www-authenticate"],
                "Basic realm=\"phoenix\", charset=\"UTF-8\""
            );
        }
        assert_eq!(
            attempt(None).unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
        // Successful credentials are cached (two users so far); failures are not.
        let Kind::BasicAuth(auth) = &middleware.kind else {
            unreachable!()
        };
        assert_eq!(auth.verified.lock().unwrap().set.len(), 2);
        assert!(attempt(Some(basic("alice", "correct horse"))).is_ok());
        assert_eq!(auth.verified.lock().unwrap().set.len(), 2);
    }

    #[test]
    fn basic_auth_configuration_is_checked() {
        let cfg = MiddlewareConfig {
            basic_auth: Some(BasicAuthConfig {
                users: vec![
                    "nocolon".into(),
                    "carol:{SHA}abc".into(),
                    ":$2y$05$x".into(),
                ],
                realm: "bad\"realm".into(),
                remove_header: true,
            }),
            ..Default::default()
        };
        let problems = Middleware::build("auth", &cfg).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[1].message.contains("not a bcrypt hash"));
        assert!(problems[3].place.ends_with("realm"));
    }

    #[test]
    fn verified_cache_is_bounded() {
        let mut cache = VerifiedCache::default();
        for i in 0..(AUTH_CACHE_CAPACITY + 10) {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_be_bytes());
            cache.insert(digest);
        }
        assert_eq!(cache.set.len(), AUTH_CACHE_CAPACITY);
        assert_eq!(cache.order.len(), AUTH_CACHE_CAPACITY);
        assert!(!cache.set.contains(&[0u8; 32]), "oldest evicted first");
    }

    #[test]
    fn rate_limit_token_bucket_with_explicit_clock() {
        let limiter = RateLimiter::new(2, 3, Duration::from_secs(1)); // 2/s, burst 3
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(a, t0).is_ok());
        }
        let wait = limiter.check(a, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another client has its own bucket.
        assert!(limiter.check(b, t0).is_ok());
        // Half a second later one token has come back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(limiter.check(a, t1).is_ok());
        assert!(limiter.check(a, t1).is_err());
        // Long idle: refilled to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check(a, t2).is_ok());
        }
        assert!(limiter.check(a, t2).is_err());
    }

    #[test]
    fn rate_limit_keys_ipv6_by_64_and_bounds_memory() {
        let limiter = RateLimiter::new(1, 1, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(limiter
            .check("2001:db8:1:2::1".parse().unwrap(), t0)
            .is_ok());
        assert!(
            limiter
                .check("2001:db8:1:2::ffff".parse().unwrap(), t0)
                .is_err(),
            "same /64"
        );
        assert!(
            limiter
                .check("2001:db8:1:3::1".parse().unwrap(), t0)
                .is_ok(),
            "other /64"
        );

        let mut small = RateLimiter::new(1, 1, Duration::from_secs(1));
        small.max_buckets = 4;
        for i in 0..100u8 {
            let _ = small.check(
                IpAddr::from([10, 0, 1, i]),
                t0 + Duration::from_millis(u64::from(i)),
            );
            assert!(small.buckets.lock().unwrap().len() <= 4);
        }
        // Buckets that refilled completely are dropped first when room is needed.
        let later = t0 + Duration::from_secs(10);
        let _ = small.check(IpAddr::from([10, 0, 2, 1]), later);
        assert_eq!(small.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn rate_limit_answers_429_with_retry_after() {
        let c = one(MiddlewareConfig {
            rate_limit: Some(RateLimitConfig {
                average: 1,
                burst: Some(1),
                period: Duration::from_secs(10),
            }),
            ..Default::default()
        });
        assert!(c.on_request(&mut parts("/"), &ctx([1, 2, 3, 4])).is_ok());
        let r = c
            .on_request(&mut parts("/"), &ctx([1, 2, 3, 4]))
            .unwrap_err();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((9..=10).contains(&retry_after), "{retry_after}");
        let zero = MiddlewareConfig {
            rate_limit: Some(RateLimitConfig {
                average: 0,
                burst: None,
                period: Duration::ZERO,
            }),
            ..Default::default()
        };
        // average 0, burst 0 (defaults to average), period 0: three problems at once.
        assert_eq!(Middleware::build("rl", &zero).unwrap_err().len(), 3);
    }

    #[test]
    fn guards_short_circuit_later_middlewares() {
        let mut h = HeadersConfig::default();
        h.request_set.insert("x-after".into(), "1".into());
        let c = chain(&[
            MiddlewareConfig {
                ip_allowlist: Some(vec!["10.0.0.0/8".parse().unwrap()]),
                ..Default::default()
            },
            MiddlewareConfig {
                headers: Some(h),
                ..Default::default()
            },
        ]);
        let mut p = parts("/");
        assert!(c.on_request(&mut p, &ctx([192, 168, 0, 1])).is_err());
        assert!(p.headers.get("x-after").is_none());
        let mut p = parts("/");
        assert!(c.on_request(&mut p, &ctx([10, 0, 0, 1])).is_ok());
        assert_eq!(p.headers["x-after"], "1");
    }
}
