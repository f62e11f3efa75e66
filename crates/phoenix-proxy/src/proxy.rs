//! The request path: from a request a client sent to the response it gets back.
//!
//! For each request: find the host (HTTP/2 `:authority` or `Host`, lowercase, without port), match
//! the route in the current table snapshot, run the route's middlewares, rewrite the headers
//! (`forward`), send it to the route's service and stream the response back. Nothing is buffered:
//! request and response bodies are passed through frame by frame (hyper supplies back-pressure), so an
//! SSE event or a gRPC message reaches the other side as soon as it was sent, and trailers pass too.
//! Upgrades (WebSocket) are joined byte for byte once both sides switched protocols.
//!
//! Route tables are immutable snapshots in an `ArcSwap`: a request loads the current one once and
//! keeps it to the end, so a reload never changes what an in-flight request sees.
//!
//! Errors the proxy answers itself (404, 413, 502, 504, 403 for refused client certificates) are
//! short `text/plain` bodies with the request id; upstream details go to the log, never to clients.

use std::borrow::Cow;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{self, BoxError, UpstreamBody};
use crate::config::{ListenerLimits, RetryConfig};
use crate::forward::{self, ForwardInfo, X_REQUEST_ID};
use crate::metrics::{Metrics, RouteMetrics, UpstreamHealth};
use crate::middleware::RequestContext;
use crate::plain::WireFields;
use crate::rule::RequestView;
use crate::table::{RouteTable, RouteTarget};
use crate::upstream::{Service, UpstreamError, Upstreamed};

/// How a proxy listener behaves, besides its routes.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub limits: ListenerLimits,
    /// Peers whose forwarding headers are believed (appended to rather than replaced).
    pub trusted_proxies: Vec<IpNet>,
    /// One JSON line per request, through tracing target `access`.
    pub access_log: bool,
    /// With mTLS: DNS names of which a client certificate must carry one; empty allows any
    /// certificate the TLS layer accepted.
    pub allowed_client_names: Vec<String>,
    /// `"mesh"` or `"gateway"`: the `role` label of metrics and logs.
    pub role: &'static str,
    /// Answer 421 Misdirected Request when the request's host (`Host`, or `:authority` in HTTP/2)
    /// is not the TLS SNI name the connection was opened for. The gateway sets it: clients reach it
    /// by the service's own name, so a disagreement means connection reuse for a name the TLS
    /// session was not made for, or a routing trick. The mesh leaves it off: the gateway reaches
    /// it by the mesh's name and routes by `Host`.
    pub require_host_matches_sni: bool,
}

/// A proxy: settings, the current route table and the metrics it reports to. Listeners are served
/// by `serve_tls` / `serve_plain` (see `server`).
pub struct Proxy {
    pub(crate) settings: ProxySettings,
    table: Arc<ArcSwap<RouteTable>>,
    pub(crate) metrics: Arc<Metrics>,
    /// The shutdown token of the first listener, so that services of reloaded tables start their
    /// health checks under it.
    health_shutdown: OnceLock<CancellationToken>,
    /// Peers that may ask for hop traces (`trace_networks`); loopback until set.
    trace_networks: OnceLock<Vec<IpNet>>,
    /// Metrics of requests answered before a route was found (empty route and service labels).
    unrouted: RouteMetrics,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("role", &self.settings.role)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(settings: ProxySettings, table: RouteTable, metrics: Arc<Metrics>) -> Arc<Proxy> {
        let table = Arc::new(ArcSwap::from_pointee(table));
        let weak = Arc::downgrade(&table);
        metrics.watch_upstreams(Arc::new(move || {
            let Some(table) = weak.upgrade() else {
                return Vec::new();
            };
            let table = table.load();
            table
                .services()
                .flat_map(|svc| {
                    svc.servers().into_iter().map(|s| UpstreamHealth {
                        service: svc.name().to_owned(),
                        server: s.url,
                        up: s.healthy,
                    })
                })
                .collect()
        }));
        Arc::new(Proxy {
            unrouted: metrics.route(settings.role, &Arc::from(""), &Arc::from("")),
            settings,
            table,
            metrics,
            health_shutdown: OnceLock::new(),
            trace_networks: OnceLock::new(),
        })
    }

    /// Swaps in a new route table. Requests in flight finish with the table they started with.
    pub fn reload(&self, table: RouteTable) {
        if let Some(shutdown) = self.health_shutdown.get() {
            table.start_health_checks(shutdown);
        }
        self.table.store(Arc::new(table));
    }

    /// Sets the networks whose clients may ask for hop traces (see `trace`); the default is
    /// loopback. Only the first call counts: listeners read it per request.
    pub fn set_trace_networks(&self, networks: Vec<IpNet>) {
        let _ = self.trace_networks.set(networks);
    }

    pub fn table(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// Starts health checks of the current table (and of every table swapped in later) under
    /// `shutdown`. Called by the listeners; calling it again does nothing.
    pub(crate) fn start_health_checks(&self, shutdown: &CancellationToken) {
        if self.health_shutdown.set(shutdown.clone()).is_ok() {
            self.table.load().start_health_checks(shutdown);
        }
    }

    /// State of every service and server, for `/health`.
    pub fn health(&self) -> serde_json::Value {
        let table = self.table.load();
        let services: Vec<serde_json::Value> = table
            .services()
            .map(|svc| {
                let servers = svc.servers();
                let healthy = servers.iter().filter(|s| s.healthy).count();
                serde_json::json!({
                    "name": svc.name(),
                    "healthy": healthy,
                    "servers": servers,
                })
            })
            .collect();
        serde_json::json!({ "role": self.settings.role, "services": services })
    }

    /// Handles one request of a connection.
    /// `ambiguous`: the framing scanner found this HTTP/1.1 request's framing ambiguous (see
    /// `framing`); it is answered 400 and the connection closed, and counted and logged like any
    /// other refusal.
    pub(crate) async fn handle<B>(
        self: &Arc<Self>,
        mut req: Request<B>,
        conn: &Arc<ConnInfo>,
        ambiguous: Option<crate::framing::Ambiguity>,
    ) -> Response<UpstreamBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let request_id = forward::ensure_request_id(req.headers_mut());
        let traced = crate::trace::begin(
            &mut req,
            conn.peer,
            &conn.trace,
            conn.sni.as_deref(),
            self.trace_networks
                .get_or_init(crate::trace::default_trace_networks),
        );
        // Host and path are copied only for the access log line; metrics use the other fields.
        let access_log = self.settings.access_log;
        let mut log = AccessLog {
            role: self.settings.role,
            client: conn.peer,
            method: req.method().clone(),
            host: String::new(),
            path: if access_log {
                req.uri().path().to_owned()
            } else {
                String::new()
            },
            target: None,
            upstream: None,
            tls_version: conn.tls_version,
            request_id: request_id.clone(),
            status: 0,
            started,
        };
        let guard = conn.enter();

        if let Some(reason) = &conn.denied {
            tracing::warn!(peer = %conn.peer, reason = %reason, "request on a connection whose client certificate is not allowed");
            let resp = error_response(
                StatusCode::FORBIDDEN,
                "client certificate not allowed",
                &request_id,
            );
            return self.finish(resp, log, guard);
        }

        if let Some(reason) = ambiguous {
            tracing::debug!(peer = %conn.peer, reason = %reason, "ambiguous request framing; refused");
            let mut resp = error_response(StatusCode::BAD_REQUEST, reason.message(), &request_id);
            // The bytes after an ambiguous message cannot be trusted to start a request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return self.finish(resp, log, guard);
        }

        if let Some((status, message)) = self.check_request_target(&req, conn) {
            tracing::debug!(peer = %conn.peer, %status, message, "request refused before routing");
            let mut resp = error_response(status, message, &request_id);
            close_after(&mut resp, req.version());
            return self.finish(resp, log, guard);
        }

        // Host: the URI authority (HTTP/2) wins over the Host header (RFC 9112 3.2.2); absolute-form
        // HTTP/1 targets were refused above. Kept as a header value, which outlives `req` and is
        // ready to be the upstream's Host: cloning the Host header shares its bytes.
        let host_value: Option<HeaderValue> = match req.uri().authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => req.headers().get(header::HOST).cloned(),
        };
        // With port, as the client gave it (check_request_target refused a Host that is not text).
        let host_full: Option<&str> = host_value.as_ref().and_then(|h| h.to_str().ok());
        let host = host_full.map(host_without_port).unwrap_or_default();
        if access_log {
            log.host = host.clone().into_owned();
        }
        let client_ip = forward::client_ip(
            conn.peer.ip(),
            req.headers(),
            &self.settings.trusted_proxies,
        );

        let table = self.table.load_full();
        let target: Arc<RouteTarget> = {
            let view = RequestView {
                method: req.method(),
                host: &host,
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
                client_ip,
            };
            match table.route(&view) {
                Some(t) => t.clone(),
                None => {
                    let msg = format!("no route for {}{}", host, req.uri().path());
                    let resp = error_response(StatusCode::NOT_FOUND, &msg, &request_id);
                    return self.finish(resp, log, guard);
                }
            }
        };
        drop(table);
        log.target = Some(target.clone());

        let upgrade =
            req.version() == Version::HTTP_11 && forward::is_upgrade_request(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, incoming) = req.into_parts();
        forward::remove_hop_by_hop(&mut parts.headers, upgrade);
        if !parts.headers.contains_key(header::HOST) {
            // HTTP/2 clients send only :authority; an HTTP/1.1 upstream needs the Host header.
            if let Some(value) = host_value.clone() {
                parts.headers.insert(header::HOST, value);
            }
        }
        let peer_trusted = forward::is_trusted(conn.peer.ip(), &self.settings.trusted_proxies);
        forward::set_forwarded(
            &mut parts.headers,
            &ForwardInfo {
                peer: conn.peer.ip(),
                peer_trusted,
                proto: conn.scheme,
                host: host_full,
            },
        );
        let ctx = RequestContext {
            client_ip,
            scheme: conn.scheme,
            host: host.into_owned(),
        };
        if let Err(resp) = target.chain.on_request(&mut parts, &ctx) {
            let (mut rparts, full) = resp.into_parts();
            rparts.headers.insert(&X_REQUEST_ID, request_id.clone());
            let resp = Response::from_parts(rparts, body::boxed(full));
            return self.finish(resp, log, guard);
        }

        // Body size limit: the smaller of the listener's and the route's.
        let limit = match (
            self.settings.limits.max_body_size,
            target.chain.max_body_size(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(limit), Some(len)) = (limit, declared) {
            if len > limit {
                let mut resp = error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body larger than {limit} bytes"),
                    &request_id,
                );
                // The unread body is still on the connection; closing beats reading it all.
                close_after(&mut resp, parts.version);
                return self.finish(resp, log, guard);
            }
        }
        let body_fault = Arc::new(BodyFault::default());
        let empty_body = incoming.is_end_stream();
        let version = parts.version;
        let request_body = LimitedBody::new(incoming, limit, body_fault.clone()).boxed();
        let retry = if empty_body && !upgrade {
            target.chain.retry()
        } else {
            None
        };
        let template = retry.as_ref().map(|_| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.version,
                parts.headers.clone(),
            )
        });
        let upstream_req = Request::from_parts(parts, request_body);
        self.exchange(
            Exchange {
                target,
                request: upstream_req,
                request_id,
                traced: traced.map(Box::new),
                client_upgrade,
                body_fault,
                retry,
                template,
                version,
                fields: None,
                log,
                guard,
            },
            conn,
        )
        .await
        .0
    }

    /// Takes a plain HTTP/1.1 request by the plain path (see `plain`) when nothing in it needs
    /// the header-map path: its head is `head`, its fields at `spans`, its target at `target`, and
    /// all of its body is `body`. `None` leaves it to `handle`, which also answers every refusal.
    pub(crate) fn plain(
        self: &Arc<Self>,
        conn: &Arc<ConnInfo>,
        head: &Bytes,
        spans: &[[usize; 4]],
        method: &Method,
        target: std::ops::Range<usize>,
        body: Bytes,
    ) -> Option<Exchange> {
        let started = Instant::now();
        let limits = &self.settings.limits;
        if conn.denied.is_some()
            || target.len() > limits.max_uri_length
            || *method == Method::CONNECT
            || limits
                .max_body_size
                .is_some_and(|max| body.len() as u64 > max)
        {
            return None;
        }
        let table = self.table.load();
        if table.reads_headers() {
            return None;
        }
        let scan = crate::plain::scan(head, spans)?;
        let host_full = scan.host;
        let host = host_without_port(host_full);
        if self.settings.require_host_matches_sni
            && conn
                .sni
                .as_deref()
                .is_some_and(|sni| !sni.eq_ignore_ascii_case(&host))
        {
            return None;
        }
        let uri = http::Uri::from_maybe_shared(head.slice(target)).ok()?;
        // The client behind trusted proxies is resolved only for a table that routes by it.
        let client_ip = if table.reads_client_ip() {
            forward::client_ip_of(
                conn.peer.ip(),
                scan.x_forwarded_for,
                &self.settings.trusted_proxies,
            )
        } else {
            conn.peer.ip()
        };
        static NO_FIELDS: OnceLock<http::HeaderMap> = OnceLock::new();
        let view = RequestView {
            method,
            host: &host,
            path: uri.path(),
            query: uri.query(),
            headers: NO_FIELDS.get_or_init(http::HeaderMap::new),
            client_ip,
        };
        let route = table.route(&view)?;
        if !route.chain.is_empty() {
            return None;
        }
        let route = route.clone();
        drop(table);

        let incoming_id = scan
            .request_id()
            .map(|[start, end]| head.slice(start..end))
            .filter(|id| forward::is_request_id(id));
        let (request_id, new_id) = match incoming_id {
            Some(id) => (HeaderValue::from_maybe_shared(id).ok()?, false),
            None => (forward::new_request_id(), true),
        };
        let info = ForwardInfo {
            peer: conn.peer.ip(),
            peer_trusted: forward::is_trusted(conn.peer.ip(), &self.settings.trusted_proxies),
            proto: conn.scheme,
            host: Some(host_full),
        };
        // The head's own length is a close bound of what is written: the fields, less the request
        // line, plus this hop's forwarding fields.
        let mut fields = Vec::with_capacity(head.len() + 160);
        scan.write_fields(
            &mut fields,
            head,
            spans,
            &info,
            new_id.then(|| request_id.as_bytes()),
        );
        let fields = WireFields::request(Bytes::from(fields));
        let mut request = Request::new(body::boxed(http_body_util::Full::new(body)));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;

        let access_log = self.settings.access_log;
        let log = AccessLog {
            role: self.settings.role,
            client: conn.peer,
            method: method.clone(),
            host: if access_log {
                host.into_owned()
            } else {
                String::new()
            },
            path: if access_log {
                request.uri().path().to_owned()
            } else {
                String::new()
            },
            target: Some(route.clone()),
            upstream: None,
            tls_version: conn.tls_version,
            request_id: request_id.clone(),
            status: 0,
            started,
        };
        Some(Exchange {
            target: route,
            request,
            request_id,
            traced: None,
            client_upgrade: None,
            body_fault: Arc::new(BodyFault::default()),
            retry: None,
            template: None,
            version: Version::HTTP_11,
            fields: Some(fields),
            log,
            guard: conn.enter(),
        })
    }

    /// Sends a request that is routed and rewritten to its service, and makes the response the
    /// client gets of what comes back, with the fields of a plain request's response that are not
    /// in its header map (see `plain`).
    ///
    /// The exchange is taken apart before the `async` block: an `async fn` would keep it twice in
    /// its state (as its argument and as the locals it is taken apart into), and this state is
    /// copied into the request's box (`h1_server::start`).
    pub(crate) fn exchange<'a>(
        self: &'a Arc<Self>,
        exchange: Exchange,
        conn: &'a Arc<ConnInfo>,
    ) -> impl Future<Output = (Response<UpstreamBody>, Option<WireFields>)> + 'a {
        let Exchange {
            target,
            request: upstream_req,
            request_id,
            traced,
            client_upgrade,
            body_fault,
            retry,
            template,
            version,
            fields,
            mut log,
            guard,
        } = exchange;
        let started = log.started;
        async move {
            let sent_at = traced.as_ref().map(|_| Instant::now());
            // The retry loop is boxed: its state (the request's template, the back-off timer) is
            // larger than the rest of this future, which hyper moves into its connection state for
            // every request. A single attempt's state is small: `send_with` boxes the upstream
            // exchange itself.
            let result = match (retry, template) {
                (Some(retry), Some(template)) => {
                    Box::pin(send_retrying(
                        &target.service,
                        upstream_req,
                        retry,
                        template,
                    ))
                    .await
                }
                _ => {
                    target
                        .service
                        .send_with(upstream_req, fields.as_ref())
                        .await
                }
            };
            let upstream_time = sent_at.map(|t| t.elapsed());
            match result {
                Ok(Upstreamed {
                    mut response,
                    server,
                }) => {
                    log.upstream = Some(server);
                    let lines = response.body_mut().take_lines();
                    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                    if switching {
                        if let (Some(client), Some(upstream)) =
                            (client_upgrade, response.body_mut().take_upgrade())
                        {
                            conn.spawn_tunnel(client, upstream);
                        }
                    }
                    let (mut rparts, rbody) = response.into_parts();
                    forward::remove_hop_by_hop(&mut rparts.headers, switching);
                    target.chain.on_response(&mut rparts);
                    match traced {
                        Some(traced) => {
                            let used = rparts.extensions.get::<crate::trace::UpstreamConn>();
                            let verified = used
                                .filter(|u| u.tls.is_some())
                                .map(|_| crate::trace::verification(target.service.config()));
                            crate::trace::finish(
                                *traced,
                                &mut rparts.headers,
                                self.settings.role,
                                used,
                                verified,
                                None,
                                started.elapsed(),
                                upstream_time,
                            );
                        }
                        None => crate::trace::strip(&mut rparts.headers),
                    }
                    let mut lines = lines;
                    crate::plain::set_request_id(&mut rparts.headers, lines.as_mut(), request_id);
                    let resp = Response::from_parts(rparts, rbody);
                    (self.finish(resp, log, guard), lines)
                }
                Err(error) => {
                    let exceeded = body_fault.exceeded.load(Ordering::Relaxed);
                    let malformed = body_fault.malformed.load(Ordering::Relaxed);
                    let client_fault = exceeded || malformed;
                    let (status, text) = if exceeded {
                        (StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
                    } else if malformed {
                        // The client's body broke (bad chunk size, connection cut): the client's
                        // fault, not the upstream's, and the rest of its byte stream is not trusted.
                        (StatusCode::BAD_REQUEST, "malformed request body")
                    } else if error.is_timeout() {
                        (StatusCode::GATEWAY_TIMEOUT, "upstream timeout")
                    } else {
                        (StatusCode::BAD_GATEWAY, "upstream unreachable")
                    };
                    log.upstream = error.server().map(Arc::from);
                    tracing::warn!(
                        route = %target.name, service = %target.service_name, request_id = ?request_id,
                        error = %error, "upstream request failed"
                    );
                    let mut resp = error_response(status, text, &request_id);
                    if client_fault {
                        close_after(&mut resp, version);
                    }
                    if let Some(traced) = traced {
                        crate::trace::finish(
                            *traced,
                            resp.headers_mut(),
                            self.settings.role,
                            None,
                            None,
                            Some(error.to_string()),
                            started.elapsed(),
                            upstream_time,
                        );
                    }
                    (self.finish(resp, log, guard), None)
                }
            }
        }
    }

    /// Refuses requests whose target or host could be read two ways by two parsers (request
    /// smuggling, cache poisoning, routing confusion), before any routing. hyper already refuses
    /// malformed framing (bad `Content-Length`, `Transfer-Encoding` other than `chunked`, obs-fold,
    /// control characters); this adds what hyper accepts but a reverse proxy should not:
    /// - HTTP/1 absolute-form (`GET http://other/ HTTP/1.1`), asterisk-form (`OPTIONS *`) and
    ///   `CONNECT`: a reverse proxy is an origin server, and with absolute-form the `Host` header
    ///   that a next hop may prefer would be ignored here;
    /// - an HTTP/1.1 request without exactly one `Host` (RFC 9112 section 3.2 requires 400);
    /// - a `Host` header that disagrees with HTTP/2 `:authority` (RFC 9113 section 8.3.1);
    /// - a request target longer than `max_uri_length` (414);
    /// - with `require_host_matches_sni`, a host other than the SNI name (421, RFC 9110 15.5.20).
    fn check_request_target<B>(
        &self,
        req: &Request<B>,
        conn: &ConnInfo,
    ) -> Option<(StatusCode, &'static str)> {
        let uri = req.uri();
        let target_len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_len > self.settings.limits.max_uri_length {
            return Some((StatusCode::URI_TOO_LONG, "request target too long"));
        }
        let hosts = req.headers().get_all(header::HOST);
        let mut host_values = hosts.iter();
        let host_header = host_values.next();
        if host_values.next().is_some() {
            return Some((StatusCode::BAD_REQUEST, "more than one Host header"));
        }
        if req.method() == Method::CONNECT {
            return Some((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported"));
        }
        let http1 = matches!(
            req.version(),
            Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
        );
        if http1 {
            if uri.scheme().is_some() || uri.authority().is_some() {
                return Some((StatusCode::BAD_REQUEST, "absolute-form request target"));
            }
            if !uri.path().starts_with('/') {
                return Some((StatusCode::BAD_REQUEST, "request target is not origin-form"));
            }
            if req.version() == Version::HTTP_11 && host_header.is_none() {
                return Some((StatusCode::BAD_REQUEST, "HTTP/1.1 request without Host"));
            }
        }
        let header_host = match host_header.map(|h| h.to_str()) {
            Some(Ok(h)) => Some(host_without_port(h)),
            Some(Err(_)) => return Some((StatusCode::BAD_REQUEST, "Host is not ASCII")),
            None => None,
        };
        let authority_host = uri.authority().map(|a| host_without_port(a.as_str()));
        if let (Some(a), Some(h)) = (&authority_host, &header_host) {
            if a != h {
                return Some((StatusCode::BAD_REQUEST, "Host disagrees with :authority"));
            }
        }
        if self.settings.require_host_matches_sni {
            if let (Some(sni), Some(host)) = (&conn.sni, authority_host.or(header_host)) {
                if !sni.eq_ignore_ascii_case(&host) {
                    return Some((
                        StatusCode::MISDIRECTED_REQUEST,
                        "host is not the TLS server name of this connection",
                    ));
                }
            }
        }
        None
    }

    /// Records metrics and wraps the body so the access log line is written when it ends.
    fn finish<B>(
        &self,
        resp: Response<B>,
        mut log: AccessLog,
        guard: InFlightGuard,
    ) -> Response<UpstreamBody>
    where
        B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
    {
        let status = resp.status().as_u16();
        log.status = status;
        let metrics = match &log.target {
            Some(target) => target.metrics(&self.metrics, self.settings.role),
            None => &self.unrouted,
        };
        metrics.record(status, log.started.elapsed());
        let access = self.settings.access_log.then(|| Box::new(log));
        resp.map(|inner| {
            TrackedBody {
                inner,
                bytes: 0,
                access,
                _guard: guard,
            }
            .boxed()
        })
    }
}

/// What the request template of a retried request keeps (see `send_retrying`).
type Template = (Method, http::Uri, Version, http::HeaderMap);

/// A request routed and rewritten, ready for its service, with what its response needs.
pub(crate) struct Exchange {
    target: Arc<RouteTarget>,
    request: Request<UpstreamBody>,
    request_id: HeaderValue,
    /// Boxed: it is large, and only a traced request has one.
    traced: Option<Box<crate::trace::Traced>>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    body_fault: Arc<BodyFault>,
    retry: Option<RetryConfig>,
    template: Option<Template>,
    /// The client's HTTP version.
    version: Version,
    /// A plain request's fields, which are not in its header map (see `plain`).
    fields: Option<WireFields>,
    log: AccessLog,
    guard: InFlightGuard,
}

/// Sends with the route's retry policy (only for requests without a body, which can be rebuilt
/// from `template`; such a request is never a plain one, whose fields are not in its map).
async fn send_retrying(
    service: &Arc<Service>,
    req: Request<UpstreamBody>,
    retry: RetryConfig,
    (method, uri, version, headers): Template,
) -> Result<Upstreamed, UpstreamError> {
    let mut wait = retry.initial_interval;
    let mut attempt = 1;
    let mut req = req;
    loop {
        match service.send(req).await {
            Ok(r) => return Ok(r),
            // A timeout already used the request's time budget; trying again would double it.
            Err(e) if e.is_timeout() || attempt >= retry.attempts => return Err(e),
            Err(e) => {
                tracing::debug!(service = %service.name(), attempt, error = %e, "retrying after upstream error");
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
                attempt += 1;
                let mut next = Request::new(body::empty());
                *next.method_mut() = method.clone();
                *next.uri_mut() = uri.clone();
                *next.version_mut() = version;
                *next.headers_mut() = headers.clone();
                req = next;
            }
        }
    }
}

/// `host[:port]` -> lowercase host; IPv6 literals keep their brackets.
fn host_without_port(authority: &str) -> Cow<'_, str> {
    // One pass over the bytes (this runs for every request): every delimiter is ASCII. A `@`
    // starts the host over (userinfo before it is dropped).
    let bytes = authority.as_bytes();
    let (mut start, mut colon, mut upper) = (0, None, false);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'@' => (start, colon, upper) = (i + 1, None, false),
            b':' => colon = Some(i),
            b'A'..=b'Z' => upper = true,
            _ => {}
        }
    }
    let host = if bytes.get(start) == Some(&b'[') {
        let literal = &authority[start..];
        let host = match literal.find(']') {
            Some(end) => &literal[..=end],
            None => literal,
        };
        upper = host.bytes().any(|b| b.is_ascii_uppercase());
        host
    } else {
        match colon {
            // Digits after the colon are a port; they hold no uppercase letter that `upper` counted.
            Some(colon) if bytes[colon + 1..].iter().all(u8::is_ascii_digit) => {
                &authority[start..colon]
            }
            _ => &authority[start..],
        }
    };
    let host = host.trim_end_matches('.');
    if upper {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Asks hyper to close an HTTP/1 connection after this response: after a refused request the
/// rest of the byte stream cannot be trusted to start at a request boundary. (HTTP/2 frames its
/// streams itself, and `Connection` is illegal there.)
fn close_after(resp: &mut Response<UpstreamBody>, version: Version) {
    if version < Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A short text response the proxy writes itself.
pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    request_id: &HeaderValue,
) -> Response<UpstreamBody> {
    let id = request_id.to_str().unwrap_or("");
    let text = format!("{message}\nrequest id: {id}\n");
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(&X_REQUEST_ID, request_id.clone());
    resp
}

// ---------------------------------------------------------------------------------------------
// Connection state shared with the request path
// ---------------------------------------------------------------------------------------------

/// What the request path knows about the connection a request came on.
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) scheme: &'static str,
    pub(crate) tls_version: Option<&'static str>,
    /// The TLS SNI name the client asked for, lowercase without a trailing dot.
    pub(crate) sni: Option<String>,
    /// Why requests on this connection are refused (client certificate not on the allow-list).
    pub(crate) denied: Option<String>,
    /// Addresses and TLS details reported to traced requests.
    pub(crate) trace: crate::trace::ConnTrace,
    /// Requests whose response has not ended yet, and when the last one ended: the idle timer.
    pub(crate) in_flight: AtomicUsize,
    pub(crate) last_active: Mutex<Instant>,
    /// Upgraded tunnels outlive the HTTP connection; they are tracked for the drain and hold the
    /// connection's admission (`_admission`: its permit, its worker's load) so they count against
    /// `max_connections` and in the balance of workers.
    pub(crate) tasks: TaskTracker,
    pub(crate) force_close: CancellationToken,
    pub(crate) _admission: Option<crate::server::Admission>,
    pub(crate) open_gauge: Option<prometheus_client::metrics::gauge::Gauge>,
}

impl Drop for ConnInfo {
    fn drop(&mut self) {
        if let Some(g) = &self.open_gauge {
            g.dec();
        }
    }
}

impl ConnInfo {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }

    pub(crate) fn is_idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            Some(*self.last_active.lock().expect("idle lock"))
        } else {
            None
        }
    }

    fn spawn_tunnel(
        self: &Arc<Self>,
        client: hyper::upgrade::OnUpgrade,
        mut upstream: crate::upstream::Upgraded,
    ) {
        let conn = self.clone();
        let peer = self.peer;
        self.tasks.spawn(async move {
            let force = conn.force_close.clone();
            let joined = async {
                let mut client = hyper_util::rt::TokioIo::new(client.await?);
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .map_err(|e| -> BoxError { e.into() })?;
                Ok::<_, BoxError>(())
            };
            tokio::select! {
                result = joined => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "upgraded connection ended with an error");
                    }
                }
                _ = force.cancelled() => {}
            }
            drop(conn);
        });
    }
}

/// Marks a request in flight on its connection until its response body is done.
pub(crate) struct InFlightGuard(Arc<ConnInfo>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        *self.0.last_active.lock().expect("idle lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

struct AccessLog {
    role: &'static str,
    client: SocketAddr,
    method: Method,
    host: String,
    path: String,
    /// The route the request took; `None` when it was answered before routing.
    target: Option<Arc<RouteTarget>>,
    upstream: Option<Arc<str>>,
    tls_version: Option<&'static str>,
    request_id: HeaderValue,
    status: u16,
    started: Instant,
}

impl AccessLog {
    fn emit(&self, bytes: u64, complete: bool) {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let client: IpAddr = self.client.ip();
        tracing::info!(
            target: "access",
            time = %time,
            client = %client,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes,
            complete,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            route = self.target.as_ref().map_or("", |t| &*t.name),
            service = self.target.as_ref().map_or("", |t| &*t.service_name),
            upstream = self.upstream.as_deref().unwrap_or(""),
            tls_version = self.tls_version.unwrap_or(""),
            request_id = self.request_id.to_str().unwrap_or(""),
            role = self.role,
        );
    }
}

/// Response body that counts bytes, writes the access log line when it ends (or is dropped: the
/// client went away), and keeps the request "in flight" on its connection until then. Generic, so
/// that an upstream's body is wrapped and boxed once.
struct TrackedBody<B: Body> {
    inner: B,
    bytes: u64,
    access: Option<Box<AccessLog>>,
    _guard: InFlightGuard,
}

impl<B> TrackedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
{
    fn boxed(self) -> UpstreamBody {
        http_body_util::BodyExt::boxed_unsync(self)
    }
}

impl<B> Body for TrackedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.access.take() {
                    log.emit(this.bytes, true);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        if let Some(log) = self.access.take() {
            // An empty body hyper never polled ended normally; anything else was cut short.
            let complete = self.inner.is_end_stream();
            log.emit(self.bytes, complete);
        }
    }
}

/// The request body error when a client sends more than the size limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// Request body that fails once more than `limit` bytes went through, so an oversized upload is
/// cut while streaming instead of being buffered to be measured. It also notes when the client's
/// body itself failed (`malformed`: a bad chunk size, a cut connection), so that the answer is a
/// 400 for the client rather than a 502 blaming the upstream.
struct LimitedBody<B> {
    inner: B,
    remaining: u64,
    limit: Option<u64>,
    fault: Arc<BodyFault>,
}

/// What went wrong with a request body, as `LimitedBody` saw it, for the request path to answer
/// when the upstream request fails. One allocation shared by both flags.
#[derive(Debug, Default)]
struct BodyFault {
    /// More than the size limit was sent.
    exceeded: AtomicBool,
    /// The client's body itself failed.
    malformed: AtomicBool,
}

impl<B> LimitedBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    fn new(inner: B, limit: Option<u64>, fault: Arc<BodyFault>) -> Self {
        Self {
            inner,
            remaining: limit.unwrap_or(u64::MAX),
            limit,
            fault,
        }
    }

    fn boxed(self) -> UpstreamBody {
        http_body_util::BodyExt::boxed_unsync(self)
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.fault.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit.unwrap_or(u64::MAX),
                        }))));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.fault.malformed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalised() {
        assert_eq!(
            host_without_port("App.Phoenix.Test:8443"),
            "app.phoenix.test"
        );
        assert_eq!(host_without_port("app.phoenix.test."), "app.phoenix.test");
        assert_eq!(host_without_port("[::1]:443"), "[::1]");
        assert_eq!(host_without_port("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_without_port("user@App.test:80"), "app.test");
        assert_eq!(host_without_port("app.test:"), "app.test");
        assert_eq!(host_without_port("app.test:8x"), "app.test:8x");
        assert_eq!(host_without_port("[::1"), "[::1");
        // Only what follows the last `@` counts: its colons, its letters.
        assert_eq!(host_without_port("A:B@c.Test"), "c.test");
        assert_eq!(host_without_port("a:1@B:2@Host.Test.:8"), "host.test");
        assert!(matches!(
            host_without_port("USER:PW@lower.test"),
            Cow::Borrowed("lower.test")
        ));
        assert_eq!(host_without_port("[FE80::1]:80"), "[fe80::1]");
        assert_eq!(host_without_port("x@[::1]:443"), "[::1]");
        assert!(matches!(
            host_without_port("lower.test:1"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn error_body_carries_request_id_and_nothing_else() {
        let id = HeaderValue::from_static("abc123");
        let resp = error_response(StatusCode::BAD_GATEWAY, "upstream unreachable", &id);
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()["x-request-id"], "abc123");
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    }
}
