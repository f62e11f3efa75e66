//! One upstream server: its address, its connections and its counters.
//!
//! Connections are built directly on hyper 1's `client::conn` so that the proxy controls pooling and
//! can use `try_send_request`, which hands back a request that was provably never written, making a
//! retry safe even for a POST.
//!
//! - **HTTP/1.1** (`http://`, `https://` without h2): an idle list per server and worker thread (see
//!   `crate::workers`), newest last (LIFO keeps
//!   few connections warm and lets the rest expire), at most [`MAX_IDLE`] of them, each reused for at
//!   most [`IDLE_TIMEOUT`]. That timeout is short on purpose: common backends (Node.js, uvicorn) close
//!   idle keep-alive connections after 5 s, and a request written into a connection the server is
//!   closing fails in a way that cannot always be retried (a POST). Connections are built
//!   `.with_upgrades()` so a WebSocket handshake can take one over; it then never returns.
//! - **HTTP/2** (`h2c://`, and `https://` when ALPN selects h2): one shared multiplexed connection per
//!   server. Concurrent requests that find none wait for a single connect instead of each opening their
//!   own; a connection that received GOAWAY or closed is replaced on the next request.
//!
//! Over `https://` the protocol follows the request: an HTTP/2 request offers ALPN `h2, http/1.1`, an
//! HTTP/1.x request offers only `http/1.1`. gRPC (HTTP/2 with trailers) thus stays HTTP/2 end to end,
//! while HTTP/1.1 clients get one upstream connection each, as with nginx, which spreads the work over
//! all cores instead of funnelling it through one HTTP/2 connection task. A server that does not
//! select h2 is remembered and then always spoken to in HTTP/1.1.
//!
//! Every connection has TCP_NODELAY (requests are small writes that must not wait for Nagle) and is
//! established within the connect timeout (TCP and TLS together).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use super::h1::{H1Conn, SendError, UpstreamIo};
use super::health::HealthState;
use super::response::{InFlight, ResponseBody};
use super::target::{Protocol, Target};
use crate::body::{BoxError, UpstreamBody};
use crate::plain::WireFields;

/// Idle HTTP/1.1 connections kept per server.
pub(crate) const MAX_IDLE: usize = 512;
/// How long an idle HTTP/1.1 connection may be reused (see the module doc for why it is short).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Attempts on fresh connections after a pooled one turned out to be dead.
const STALE_RETRIES: u32 = 2;

/// TLS settings of an `https://` server.
pub(crate) struct TlsSettings {
    /// Offers `h2, http/1.1` (HTTP/2 requests).
    pub(crate) h2: TlsConnector,
    /// Offers only `http/1.1`.
    pub(crate) h1: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
}

enum Conn {
    H1(H1Conn),
    /// With the generation of the shared slot it came from (0 before it is stored).
    H2(http2::SendRequest<UpstreamBody>, u64),
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

#[derive(Default)]
struct H2Slot {
    conn: Option<http2::SendRequest<UpstreamBody>>,
    /// Counts stored connections, so a failed one is forgotten only if it is still the current one.
    generation: u64,
    connecting: bool,
}

/// Why one attempt on one server failed, and whether the request came back.
pub(crate) enum AttemptError {
    /// No connection could be made; the request was never sent.
    Connect {
        req: Request<UpstreamBody>,
        source: BoxError,
    },
    /// hyper gave the request back: it was not written.
    NotSent {
        req: Request<UpstreamBody>,
        source: BoxError,
    },
    /// The request was (maybe partly) written and no response headers came. `resend`: the request
    /// again, when it may be sent again (`replayable`).
    Sent {
        source: BoxError,
        resend: Option<Request<UpstreamBody>>,
    },
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect { source, .. } => write!(f, "connect failed: {source}"),
            AttemptError::NotSent { source, .. } | AttemptError::Sent { source, .. } => {
                write!(f, "{source}")
            }
        }
    }
}

/// A copy of a request's head, to send it again (HTTP/2: hyper keeps a request it has begun to send).
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(req: &Request<UpstreamBody>) -> Replay {
        Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn build(self) -> Request<UpstreamBody> {
        let mut req = Request::new(crate::body::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// One server of a service.
pub(crate) struct Endpoint {
    pub(crate) url: Arc<str>,
    pub(crate) service: Arc<str>,
    pub(crate) weight: u32,
    pub(crate) target: Target,
    pub(crate) health: HealthState,
    pub(crate) in_flight: AtomicUsize,
    tls: Option<TlsSettings>,
    connect_timeout: Duration,
    /// Idle HTTP/1.1 connections, one list per worker (`crate::workers::slot`): a connection is
    /// driven by the runtime whose reactor registered its socket.
    h1_idle: Box<[Mutex<VecDeque<Idle>>]>,
    h2: Mutex<H2Slot>,
    h2_changed: Notify,
    /// The server did not select h2 in ALPN: speak HTTP/1.1 to it from now on.
    h2_refused: AtomicBool,
}

impl Endpoint {
    pub(crate) fn new(
        url: &str,
        service: Arc<str>,
        weight: u32,
        target: Target,
        tls: Option<TlsSettings>,
        connect_timeout: Duration,
        active_health: bool,
    ) -> Endpoint {
        Endpoint {
            url: Arc::from(url),
            service,
            weight,
            target,
            health: HealthState::new(active_health),
            in_flight: AtomicUsize::new(0),
            tls,
            connect_timeout,
            h1_idle: (0..crate::workers::slots())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            h2: Mutex::new(H2Slot::default()),
            h2_changed: Notify::new(),
            h2_refused: AtomicBool::new(false),
        }
    }

    /// `Host` for requests the proxy makes itself (health checks).
    pub(crate) fn host_header(&self) -> HeaderValue {
        HeaderValue::from_str(self.target.authority.as_str())
            .expect("an Authority is a valid header value")
    }

    /// Sends one request to this server. `h2_wanted`: the client spoke HTTP/2 (matters for
    /// `https://`). A dead pooled connection is replaced transparently: when the request comes back
    /// unsent, or when `replayable` (an idempotent request without a body) allows sending it again.
    /// (An `async` block, not an `async fn`, for the reason given at `H1Conn::send`.)
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    pub(crate) fn send<'a>(
        self: &'a Arc<Self>,
        mut req: Request<UpstreamBody>,
        mut fields: Option<&'a WireFields>,
        h2_wanted: bool,
        upgrade: bool,
        replayable: bool,
    ) -> impl Future<Output = Result<Response<ResponseBody>, AttemptError>> + 'a {
        async move {
            let in_flight = InFlight::enter(self);
            // A traced request goes over a fresh connection whose handshake is recorded (see `trace`).
            let traced = req
                .extensions()
                .get::<crate::trace::TraceRequested>()
                .is_some();
            let mut used: Option<crate::trace::UpstreamConn> = None;
            let mut stale = 0;
            loop {
                let use_h2 = match self.target.protocol {
                    Protocol::Http1 => false,
                    // An Upgrade cannot travel over HTTP/2; try HTTP/1.1, which most h2c servers also speak.
                    Protocol::H2c => !upgrade,
                    Protocol::Https => {
                        h2_wanted && !upgrade && !self.h2_refused.load(Ordering::Relaxed)
                    }
                };
                let acquired = if traced {
                    self.connect_recorded(use_h2, &mut used)
                        .await
                        .map(|c| (c, false))
                } else if use_h2 {
                    self.h2_conn().await
                } else {
                    self.h1_conn(stale > 0).await
                };
                let (conn, reused) = match acquired {
                    Ok(c) => c,
                    Err(source) => return Err(AttemptError::Connect { req, source }),
                };
                let mut h2_generation = None;
                // What failed; the request if it came back unsent, or if it may be sent again.
                let (unsent, resend, source): (_, _, BoxError) = match conn {
                    Conn::H1(conn) => {
                        prepare_h1(&mut req, fields.is_some(), &self.target);
                        match conn.send(req, fields, upgrade).await {
                            Ok((mut resp, lines)) => {
                                if let Some(used) = used.take() {
                                    resp.extensions_mut().insert(used);
                                }
                                return Ok(resp.map(|b| ResponseBody::h1(b, lines, in_flight)));
                            }
                            Err(SendError::NotSent(req, e)) => (Some(*req), None, Box::new(e)),
                            Err(SendError::Sent(e, head)) => {
                                let resend = head
                                    .filter(|_| replayable)
                                    .map(|head| Request::from_parts(*head, crate::body::empty()));
                                (None, resend, Box::new(e))
                            }
                        }
                    }
                    Conn::H2(mut tx, generation) => {
                        h2_generation = Some(generation);
                        // `Service::send_with` gives h2c services a plain request's fields in its map;
                        // should any still come, they go into the map once.
                        if let Some(fields) = fields.take() {
                            fields.append_to(req.headers_mut());
                        }
                        prepare_h2(&mut req, &self.target);
                        let copy = replayable.then(|| Replay::of(&req));
                        match tx.try_send_request(req).await {
                            Ok(mut resp) => {
                                if let Some(used) = used.take() {
                                    resp.extensions_mut().insert(used);
                                }
                                return Ok(resp.map(|b| ResponseBody::h2(b, in_flight)));
                            }
                            Err(mut e) => {
                                let unsent = e.take_message();
                                if unsent.is_some() {
                                    // Unsent means the connection takes no more streams (GOAWAY, closed):
                                    // make the next request connect instead of finding it again.
                                    self.forget_h2(generation);
                                }
                                (unsent, copy.map(Replay::build), Box::new(e.into_error()))
                            }
                        }
                    }
                };
                let again = reused && stale < STALE_RETRIES;
                match (unsent, resend) {
                    (Some(back), _) | (None, Some(back)) if again => req = back,
                    (Some(req), _) => return Err(AttemptError::NotSent { req, source }),
                    (None, resend) => return Err(AttemptError::Sent { source, resend }),
                }
                tracing::debug!(server = %self.url, error = %source, "pooled connection was dead, trying a fresh one");
                if let Some(generation) = h2_generation {
                    self.forget_h2(generation);
                }
                stale += 1;
            }
        }
    }

    /// A pooled HTTP/1.1 connection, or a new one. `fresh`: skip the pool (a pooled one just failed).
    async fn h1_conn(&self, fresh: bool) -> Result<(Conn, bool), BoxError> {
        if !fresh {
            if let Some(conn) = self.h1_checkout() {
                return Ok((Conn::H1(conn), true));
            }
        }
        Ok((self.connect(false).await?, false))
    }

    /// The newest idle HTTP/1.1 connection, unless it is too old. Whether the server closed it in
    /// the meantime shows when the request is about to be written (see `h1`).
    fn h1_checkout(&self) -> Option<H1Conn> {
        let now = Instant::now();
        let mut idle = self.idle_list().lock().unwrap_or_else(|p| p.into_inner());
        let entry = idle.pop_back()?;
        if now.duration_since(entry.since) > IDLE_TIMEOUT {
            // newest is too old, so are all the others
            idle.clear();
            return None;
        }
        Some(entry.conn)
    }

    /// Closes idle HTTP/1.1 connections past [`IDLE_TIMEOUT`].
    pub(crate) fn close_expired_idle(&self) {
        let now = Instant::now();
        for list in &self.h1_idle {
            let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| now.duration_since(c.since) <= IDLE_TIMEOUT);
        }
    }

    /// The idle list of the current thread's worker.
    fn idle_list(&self) -> &Mutex<VecDeque<Idle>> {
        &self.h1_idle[crate::workers::slot() % self.h1_idle.len()]
    }

    /// Called by [`ResponseBody`] when a response on `conn` ended cleanly.
    pub(crate) fn return_h1(&self, conn: H1Conn) {
        let now = Instant::now();
        let mut idle = self.idle_list().lock().unwrap_or_else(|p| p.into_inner());
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle { conn, since: now });
    }

    /// The shared HTTP/2 connection, connecting when there is none (only one connect at a time).
    async fn h2_conn(&self) -> Result<(Conn, bool), BoxError> {
        loop {
            if self.h2_refused.load(Ordering::Relaxed) {
                return self.h1_conn(false).await;
            }
            let wait = {
                let mut slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tx) = &slot.conn {
                    if !tx.is_closed() {
                        return Ok((Conn::H2(tx.clone(), slot.generation), true));
                    }
                    slot.conn = None;
                }
                if slot.connecting {
                    // Registered while the lock is held, so the connector's wake-up cannot be missed.
                    Some(self.h2_changed.notified())
                } else {
                    slot.connecting = true;
                    None
                }
            };
            match wait {
                Some(notified) => notified.await,
                None => break,
            }
        }
        // This task connects; the guard lets the waiters go even if this future is dropped.
        let guard = Connecting(self);
        let conn = match self.connect(true).await? {
            Conn::H2(tx, _) => {
                let mut slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                slot.generation += 1;
                slot.conn = Some(tx.clone());
                Conn::H2(tx, slot.generation)
            }
            h1 => h1,
        };
        drop(guard);
        Ok((conn, false))
    }

    fn forget_h2(&self, generation: u64) {
        let mut slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if slot.generation == generation {
            slot.conn = None;
        }
    }

    /// TCP (+ TLS) + HTTP handshake within the connect timeout.
    ///
    /// The handshake's state machine (a TLS client connection among others) is boxed: it is many
    /// kilobytes, and unboxed it would be part of the future of every request sent through this
    /// endpoint, which is moved into a box per request (`Service::send`), where it cost a copy of
    /// that size even when a pooled connection is used.
    async fn connect(&self, h2: bool) -> Result<Conn, BoxError> {
        let connect = Box::pin(self.connect_inner(h2, None));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(format!("no connection within {:?}", self.connect_timeout).into()),
        }
    }

    /// A new connection, not pooled by this call, whose details are written to `used` (traces).
    async fn connect_recorded(
        &self,
        h2: bool,
        used: &mut Option<crate::trace::UpstreamConn>,
    ) -> Result<Conn, BoxError> {
        let connect = Box::pin(self.connect_inner(h2, Some(used)));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(format!("no connection within {:?}", self.connect_timeout).into()),
        }
    }

    async fn connect_inner(
        &self,
        h2: bool,
        record: Option<&mut Option<crate::trace::UpstreamConn>>,
    ) -> Result<Conn, BoxError> {
        let tcp = self.tcp_connect().await?;
        // Recording costs a copy of the peer's chain: only for traced requests.
        let recording = record.is_some();
        let peer = record.as_ref().and_then(|_| tcp.peer_addr().ok());
        let local = record.as_ref().and_then(|_| tcp.local_addr().ok());
        let mut record = record;
        let mut note =
            |scheme: &'static str, http2: bool, tls: Option<crate::trace::UpstreamTls>| {
                if let Some(slot) = record.as_deref_mut() {
                    *slot = Some(crate::trace::UpstreamConn {
                        local,
                        peer,
                        scheme,
                        http: if http2 { "HTTP/2" } else { "HTTP/1.1" },
                        tls,
                    });
                }
            };
        match (self.target.protocol, &self.tls) {
            (Protocol::Https, Some(tls)) => {
                let connector = if h2 { &tls.h2 } else { &tls.h1 };
                let stream = connector.connect(tls.server_name.clone(), tcp).await?;
                let alpn_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                note(
                    "https",
                    alpn_h2,
                    recording.then(|| {
                        crate::trace::UpstreamTls::of(
                            stream.get_ref().1,
                            tls.server_name.to_str().into_owned(),
                        )
                    }),
                );
                if alpn_h2 {
                    handshake_h2(stream).await
                } else {
                    if h2 && !self.h2_refused.swap(true, Ordering::Relaxed) {
                        tracing::debug!(server = %self.url, "server did not select h2; using HTTP/1.1");
                    }
                    Ok(Conn::H1(H1Conn::new(UpstreamIo::Tls(Box::new(stream)))))
                }
            }
            (Protocol::Https, None) => Err("https server without TLS settings".into()),
            (Protocol::H2c, _) if h2 => {
                note("h2c", true, None);
                handshake_h2(tcp).await
            }
            (Protocol::H2c | Protocol::Http1, _) => {
                let scheme = if self.target.protocol == Protocol::H2c {
                    "h2c"
                } else {
                    "http"
                };
                note(scheme, false, None);
                Ok(Conn::H1(H1Conn::new(UpstreamIo::Tcp(tcp))))
            }
        }
    }

    async fn tcp_connect(&self) -> Result<TcpStream, BoxError> {
        let t = &self.target;
        let stream = match t.ip {
            Some(ip) => connect_addr(SocketAddr::new(ip, t.port)).await?,
            None => {
                let mut last: Option<std::io::Error> = None;
                let mut found = None;
                for addr in tokio::net::lookup_host((t.host.as_str(), t.port)).await? {
                    match connect_addr(addr).await {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                match (found, last) {
                    (Some(s), _) => s,
                    (None, Some(e)) => return Err(e.into()),
                    (None, None) => return Err(format!("{} resolves to no address", t.host).into()),
                }
            }
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

async fn connect_addr(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{addr}: {e}")))
}

/// Resets `connecting` and wakes waiters when the connecting task finishes or is cancelled.
struct Connecting<'a>(&'a Endpoint);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0
            .h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connecting = false;
        self.0.h2_changed.notify_waiters();
    }
}

async fn handshake_h2<I>(io: I) -> Result<Conn, BoxError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Detects a dead peer on a connection that stays open for hours.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        // Large streamed bodies (model downloads, uploads) need more than the 64 KiB default window.
        .adaptive_window(true)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(Conn::H2(tx, 0))
}

/// HTTP/1.1: origin-form URI; `Host` kept as the client sent it, or taken from an HTTP/2 client's
/// `:authority`, or the server's own authority. Idempotent: a request given back unsent can be
/// prepared again for another server.
/// `fields`: the request has a plain request's fields, which hold its Host (see `plain`).
fn prepare_h1(req: &mut Request<UpstreamBody>, fields: bool, target: &Target) {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    let has_host = fields || req.headers().contains_key(header::HOST);
    if !has_host {
        let authority = parts.authority.as_ref().unwrap_or(&target.authority);
        if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(header::HOST, value);
        }
    }
    parts.scheme = None;
    parts.authority = None;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
    *req.version_mut() = Version::HTTP_11;
}

/// HTTP/2: absolute URI with the server's scheme; `:authority` is the client's host (from `Host` or
/// the client's own `:authority`), so the backend sees the same host as over HTTP/1.1. Connection
/// headers, forbidden in HTTP/2, are dropped here rather than by hyper, which would log each one.
fn prepare_h2(req: &mut Request<UpstreamBody>, target: &Target) {
    let host = req.headers_mut().remove(header::HOST);
    let headers = req.headers_mut();
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    let authority = host
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| parts.authority.take())
        .unwrap_or_else(|| target.authority.clone());
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
    *req.version_mut() = Version::HTTP_2;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::target::parse;

    fn req(uri: &str, host: Option<&str>) -> Request<UpstreamBody> {
        let mut r = Request::new(crate::body::empty());
        *r.uri_mut() = uri.parse().unwrap();
        if let Some(h) = host {
            r.headers_mut()
                .insert(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        r
    }

    #[test]
    fn h1_gets_origin_form_and_keeps_the_client_host() {
        let t = parse("http://10.0.0.1:8080").unwrap();
        let mut r = req("/a/b?c=d", Some("app.phoenix.test"));
        prepare_h1(&mut r, false, &t);
        assert_eq!(r.uri(), "/a/b?c=d");
        assert_eq!(r.headers()[header::HOST], "app.phoenix.test");
        assert_eq!(r.version(), Version::HTTP_11);
        // from an HTTP/2 client: authority becomes Host
        let mut r = req("https://api.phoenix.test/x", None);
        prepare_h1(&mut r, false, &t);
        assert_eq!(r.uri(), "/x");
        assert_eq!(r.headers()[header::HOST], "api.phoenix.test");
        // nothing at all: the server's authority
        let mut r = req("/", None);
        prepare_h1(&mut r, false, &t);
        assert_eq!(r.headers()[header::HOST], "10.0.0.1:8080");
    }

    #[test]
    fn h2_gets_absolute_form_with_upstream_scheme_and_client_authority() {
        let t = parse("h2c://10.0.0.1:50051").unwrap();
        let mut r = req("/pkg.Svc/Call", Some("grpc.phoenix.test"));
        r.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        prepare_h2(&mut r, &t);
        assert_eq!(r.uri(), "http://grpc.phoenix.test/pkg.Svc/Call");
        assert!(r.headers().get(header::HOST).is_none());
        assert!(r.headers().get(header::CONNECTION).is_none());
        assert_eq!(r.headers()[header::TE], "trailers");
        assert_eq!(r.version(), Version::HTTP_2);
        // prepared twice (request given back, sent to another server): same result
        let t2 = parse("https://10.0.0.2").unwrap();
        prepare_h2(&mut r, &t2);
        assert_eq!(r.uri(), "https://grpc.phoenix.test/pkg.Svc/Call");
        prepare_h1(&mut r, false, &t2);
        assert_eq!(r.uri(), "/pkg.Svc/Call");
        assert_eq!(r.headers()[header::HOST], "grpc.phoenix.test");
    }
}
