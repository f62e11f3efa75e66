//! Listeners of a proxy: the accept loop and one task per connection.
//!
//! The accept loop takes a permit of the connection cap before it accepts, so with `max_connections`
//! open further clients wait in the kernel backlog instead of being accepted and starved. Accept
//! errors that concern one connection are ignored; the others (out of file descriptors) are logged
//! and retried with a growing pause, so a full descriptor table does not become a busy loop.
//!
//! Each connection runs in its own task under a tracing span with both addresses: TLS handshake
//! (bounded by the header-read timeout), the mTLS allow-list check, then, on a TLS connection that is
//! not HTTP/2, Phoenix's own server for plain HTTP/1.1 requests (`h1_server`), which hands the
//! connection to hyper-util's automatic HTTP/1.1 + HTTP/2 server with upgrades at the first request
//! it does not take; HTTP/2 and plaintext connections go to hyper at once. Between the stream and
//! hyper sits `framing::FramingIo`, which follows HTTP/1.1 message boundaries so that a request with
//! ambiguous framing (Content-Length with Transfer-Encoding, a repeated Content-Length) is answered
//! 400 and the connection closed, where hyper would have normalised it. Under `h1_server`, which
//! takes no such request, it sleeps, and starts at the handover. Limits: largest request head,
//! number of header fields, an idle timeout: a connection with no request in flight for
//! `idle_timeout` is closed gracefully (HTTP/2 GOAWAY); and a header-read timeout: an HTTP/1.1
//! request head must be complete within `header_read_timeout` of its first byte (the first head: of
//! the connection's start), or the connection is cut. The scanner tells where heads begin, so this
//! timer is ours rather than hyper's, whose timer would also run while a keep-alive connection
//! waits for its next request and so cut idle connections at the shorter timeout.
//!
//! Shutdown: the loop stops accepting, every connection is told to finish gracefully (GOAWAY, or
//! `Connection: close` after the current response), and the listener waits up to `drain_timeout` for
//! them (and for upgraded tunnels) before closing whatever is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use http::{header, Request, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ProtocolVersion;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ListenerLimits;
use crate::framing::{FramingIo, Verdicts};
use crate::gate::Gate;
use crate::h1_server::{self, Served};
use crate::prefixed::Prefixed;
use crate::proxy::{ConnInfo, Proxy};
use crate::readiness::ReadReadiness;
use crate::tls;
use bytes::BytesMut;

type Builder = auto::Builder<TokioExecutor>;

impl Proxy {
    /// Serves HTTPS on `listener` until `shutdown`, then drains (see the module documentation).
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        serve(self, listener, Some(TlsAcceptor::from(tls)), shutdown).await
    }

    /// Serves plain HTTP on `listener` (tests, or a mesh behind a TLS-terminating peer on loopback).
    pub async fn serve_plain(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        serve(self, listener, None, shutdown).await
    }

    /// Serves HTTPS on `listener` from `workers` threads, each with its own single-threaded runtime
    /// (see [`crate::workers`]), until `shutdown`; returns when every worker has drained. The
    /// connection cap is shared by all workers.
    pub async fn serve_tls_on_workers(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        workers: usize,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        // Health checks live on the caller's runtime, which outlives the workers' connections.
        self.start_health_checks(&shutdown);
        let semaphore = connection_cap(&self.settings.limits);
        let local = listener.local_addr()?;
        let role = self.settings.role;
        let mut workers = {
            let (proxy, stop) = (self.clone(), shutdown.clone());
            let tls = TlsAcceptor::from(tls);
            crate::workers::Workers::start(role, workers, &shutdown, move |inbox| {
                serve_handoffs(proxy.clone(), inbox, tls.clone(), local, stop.clone())
            })?
        };
        // Accepted here, on the caller's runtime, and handed to the least loaded worker: workers
        // that each accepted from the shared socket took connections in very uneven numbers (the
        // busiest worker, awake already, won most races), see `crate::workers`.
        let mut backoff = Backoff::default();
        while let Some((stream, peer, permit)) =
            accept(&listener, &semaphore, &shutdown, &mut backoff).await
        {
            workers.hand_off(stream, peer, permit);
        }
        drop(listener);
        workers.join(&shutdown).await
    }
}

/// A worker's side of [`Proxy::serve_tls_on_workers`]: serves the connections handed to it until
/// the accept loop closes the inbox, then drains them.
async fn serve_handoffs(
    proxy: Arc<Proxy>,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<crate::workers::Handoff>,
    tls: TlsAcceptor,
    local: SocketAddr,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let connections = Connections::new(proxy, Some(tls), local, shutdown);
    while let Some(handoff) = inbox.recv().await {
        match TcpStream::from_std(handoff.stream) {
            Ok(stream) => connections.start(
                stream,
                handoff.peer,
                Admission::new(handoff.permit, Some(handoff.load)),
            ),
            Err(e) => tracing::debug!(error = %e, "handed-over connection could not be registered"),
        }
    }
    connections.drain().await;
    Ok(())
}

fn connection_cap(limits: &ListenerLimits) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(limits.max_connections.max(1)))
}

/// The HTTP server settings of a listener.
fn builder(limits: &ListenerLimits) -> Builder {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's own timer also runs while a keep-alive connection waits for its next request,
        // which would cut idle connections at this timeout instead of `idle_timeout`; the
        // framing scanner knows when a head begins, so `serve_http` times heads itself.
        .header_read_timeout(None)
        // hyper refuses buffers under 8 KiB; the head must fit in the buffer, so this bounds it.
        .max_buf_size(read_buffer_size(limits))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        // Written out rather than left to the defaults, because they are defences: a cap on
        // concurrent streams, and GOAWAY ENHANCE_YOUR_CALM for rapid reset (CVE-2023-44487:
        // streams reset before they are served) and for streams the server itself had to reset.
        // CONTINUATION floods are bounded by the header-list size above (h2 counts the frames).
        // Tested in tests/hardening_h2_slow.rs.
        .max_concurrent_streams(200)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024);
    builder
}

/// hyper's HTTP/1 read buffer, which bounds the request head (it must fit).
fn read_buffer_size(limits: &ListenerLimits) -> usize {
    limits.max_header_size.max(8192)
}

async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    proxy.start_health_checks(&shutdown);
    let semaphore = connection_cap(&proxy.settings.limits);
    accept_loop(proxy, listener, tls, semaphore, shutdown).await
}

/// Accepts connections on `listener` while a permit of `semaphore` is free, until `shutdown`;
/// then drains them (see the module documentation).
async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    semaphore: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let connections = Connections::new(proxy, tls, local, shutdown.clone());
    let mut backoff = Backoff::default();
    while let Some((stream, peer, permit)) =
        accept(&listener, &semaphore, &shutdown, &mut backoff).await
    {
        connections.start(stream, peer, Admission::new(permit, None));
    }
    drop(listener);
    connections.drain().await;
    Ok(())
}

/// Accepts the next connection once a permit of `semaphore` is free; `None` at `shutdown`.
/// Errors that concern one connection are skipped; the others pause the loop, longer each time.
async fn accept(
    listener: &TcpListener,
    semaphore: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        _ = shutdown.cancelled() => return None,
        permit = semaphore.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                let _ = stream.set_nodelay(true);
                return Some((stream, peer, permit));
            }
            Err(e) if is_per_connection_error(&e) => {
                tracing::debug!(error = %e, "accept failed for one connection");
            }
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The pause after an accept error that is not about one connection (out of file descriptors):
/// 5 ms, doubling up to a second, back to 5 ms after a success.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(Duration::from_millis(5))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
        pause
    }

    fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// What admits a connection: its permit of the connection cap and, on a worker, its place in the
/// worker's load (see [`crate::workers::LoadGuard`]). Held by the connection and its upgraded tunnels.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _load: Option<crate::workers::LoadGuard>,
}

impl Admission {
    fn new(permit: OwnedSemaphorePermit, load: Option<crate::workers::LoadGuard>) -> Admission {
        Admission {
            _permit: permit,
            _load: load,
        }
    }
}

/// The connections of one listener on one runtime: started one task each, drained together.
struct Connections {
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    builder: Arc<Builder>,
    local: SocketAddr,
    shutdown: CancellationToken,
    /// Cancelled when the drain timeout ran out: the connections left are closed.
    force: CancellationToken,
    tracker: TaskTracker,
}

impl Connections {
    fn new(
        proxy: Arc<Proxy>,
        tls: Option<TlsAcceptor>,
        local: SocketAddr,
        shutdown: CancellationToken,
    ) -> Connections {
        tracing::info!(role = proxy.settings.role, %local, tls = tls.is_some(), "listening");
        Connections {
            builder: Arc::new(builder(&proxy.settings.limits)),
            proxy,
            tls,
            local,
            shutdown,
            force: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    fn start(&self, stream: TcpStream, peer: SocketAddr, admission: Admission) {
        let role = self.proxy.settings.role;
        let span = tracing::debug_span!("conn", role, %peer, local = %self.local);
        let task = connection(
            self.proxy.clone(),
            self.builder.clone(),
            stream,
            peer,
            self.tls.clone(),
            admission,
            self.shutdown.clone(),
            self.force.clone(),
            self.tracker.clone(),
            self.local,
        );
        self.tracker.spawn(task.instrument(span));
    }

    /// Waits for the connections (and upgraded tunnels) to finish after shutdown, up to the drain
    /// timeout, then closes whatever is left.
    async fn drain(self) {
        let (role, local) = (self.proxy.settings.role, self.local);
        self.tracker.close();
        let drain_timeout = self.proxy.settings.limits.drain_timeout;
        if tokio::time::timeout(drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                role,
                %local,
                left = self.tracker.len(),
                "drain timeout reached; closing the remaining connections"
            );
            self.force.cancel();
            self.tracker.wait().await;
        }
        tracing::info!(role, %local, "listener stopped");
    }
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the arguments
async fn connection(
    proxy: Arc<Proxy>,
    builder: Arc<Builder>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    admission: Admission,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
    local: SocketAddr,
) {
    let Some(acceptor) = tls else {
        let info = conn_info(
            &proxy,
            peer,
            "http",
            None,
            None,
            None,
            crate::trace::ConnTrace { local, tls: None },
            admission,
            force.clone(),
            tracker,
        );
        // Plaintext: HTTP/2 with prior knowledge is possible, and only hyper tells.
        serve_http(proxy, builder, stream, info, shutdown, force, false).await;
        return;
    };
    // The handshake's state (several KB) is an allocation of its own, freed when it ends, and
    // the stream it gives is boxed: a task's future is as large as its largest state for as long
    // as the connection lasts, and an idle TLS connection should hold only what waiting for a
    // request needs. (A boxed stream also moves as a pointer, not as 1.2 KB.)
    let handshake = tls_handshake(
        &proxy, acceptor, stream, peer, local, admission, &shutdown, &force, tracker,
    );
    let Some((stream, info, h1)) = Box::pin(handshake).await else {
        return;
    };
    serve_http(proxy, builder, stream, info, shutdown, force, h1).await;
}

/// The TLS handshake of a connection, within the header-read timeout, and what it tells about
/// the connection: its stream (boxed), its information, and whether it speaks HTTP/1.1. `None`
/// when there is nothing to serve: the handshake failed or timed out, a shutdown came first, or
/// it was an `acme-tls/1` validation.
#[allow(clippy::too_many_arguments)] // one call site, the connection's parts
async fn tls_handshake(
    proxy: &Arc<Proxy>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    admission: Admission,
    shutdown: &CancellationToken,
    force: &CancellationToken,
    tracker: TaskTracker,
) -> Option<(Box<TlsStream<TcpStream>>, Arc<ConnInfo>, bool)> {
    let limits = &proxy.settings.limits;
    let handshake = tokio::select! {
        result = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)) => result,
        _ = shutdown.cancelled() => return None,
    };
    let mut stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return None;
        }
    };
    let session = stream.get_ref().1;
    if session.alpn_protocol() == Some(tls::ALPN_ACME_TLS) {
        // RFC 8737 section 3: the validation is the handshake itself; no application data follows.
        tracing::debug!(
            sni = session.server_name(),
            "acme-tls/1 validation handshake done"
        );
        let _ = stream.shutdown().await;
        return None;
    }
    let h1 = session.alpn_protocol() != Some(b"h2");
    let tls_version = session.protocol_version().map(version_name);
    let sni = session
        .server_name()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
    let denied = check_client_name(session, &proxy.settings.allowed_client_names);
    if let Some(reason) = &denied {
        tracing::warn!(%peer, reason = %reason, "client certificate refused; requests get 403");
    }
    let info = conn_info(
        proxy,
        peer,
        "https",
        tls_version,
        sni,
        denied,
        crate::trace::ConnTrace {
            local,
            tls: tls_version.map(|v| crate::trace::DownstreamTls::of(session, v)),
        },
        admission,
        force.clone(),
        tracker,
    );
    Some((Box::new(stream), info, h1))
}

#[allow(clippy::too_many_arguments)] // plain data for one struct literal
fn conn_info(
    proxy: &Proxy,
    peer: SocketAddr,
    scheme: &'static str,
    tls_version: Option<&'static str>,
    sni: Option<String>,
    denied: Option<String>,
    trace: crate::trace::ConnTrace,
    admission: Admission,
    force_close: CancellationToken,
    tasks: TaskTracker,
) -> Arc<ConnInfo> {
    let gauge = proxy.metrics.connections_open(proxy.settings.role);
    gauge.inc();
    Arc::new(ConnInfo {
        peer,
        scheme,
        tls_version,
        sni,
        denied,
        trace,
        in_flight: AtomicUsize::new(0),
        last_active: Mutex::new(Instant::now()),
        tasks,
        force_close,
        _admission: Some(admission),
        open_gauge: Some(gauge),
    })
}

pub(crate) fn version_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::TLSv1_2 => "TLSv1.2",
        ProtocolVersion::TLSv1_3 => "TLSv1.3",
        _ => "other",
    }
}

/// With an allow-list, the client certificate (already verified against the roots by rustls) must
/// carry one of the allowed DNS names.
fn check_client_name(session: &rustls::ServerConnection, allowed: &[String]) -> Option<String> {
    if allowed.is_empty() {
        return None;
    }
    let Some(cert) = session.peer_certificates().and_then(|certs| certs.first()) else {
        return Some("no client certificate, but allowed_clients is set".to_owned());
    };
    let names = tls::dns_names(cert);
    let ok = names.iter().any(|name| {
        allowed
            .iter()
            .any(|a| a.trim_end_matches('.').eq_ignore_ascii_case(name))
    });
    if ok {
        None
    } else {
        Some(format!(
            "client certificate names {names:?} are not in allowed_clients"
        ))
    }
}

async fn serve_http<I>(
    proxy: Arc<Proxy>,
    builder: Arc<Builder>,
    stream: I,
    info: Arc<ConnInfo>,
    shutdown: CancellationToken,
    force: CancellationToken,
    h1: bool,
) where
    I: AsyncRead + AsyncWrite + ReadReadiness + Unpin + Send + 'static,
{
    let idle_timeout = proxy.settings.limits.idle_timeout;
    let header_read_timeout = proxy.settings.limits.header_read_timeout;
    // Ambiguous HTTP/1.1 framing is found on the way into hyper and refused here (see
    // `framing`). hyper checks its buffer limit only before it reads more, and one read can fill
    // the buffer to nearly twice the limit, so a head it accepts can be that long; the scanner
    // follows heads up to twice the limit, so that it never stops on a head hyper accepts.
    let verdicts = Arc::new(Verdicts::new(Instant::now()));
    let max_head = 2 * read_buffer_size(&proxy.settings.limits);
    // HTTP/1.1 connections start on Phoenix's own server, which hands what it does not take to
    // hyper (see `h1_server`); the scanner starts there.
    let io = if h1 {
        let io = FramingIo::dormant(stream, max_head, verdicts.clone());
        let limits = &proxy.settings.limits;
        let h1_limits = h1_server::Limits {
            max_head: read_buffer_size(limits),
            max_headers: limits.max_headers,
            header_read_timeout,
            idle_timeout,
        };
        // Boxed, like hyper's connection below: each is several KB, and a connection task that
        // held both inline would carry the one it does not use.
        let served = Box::pin(h1_server::serve(
            &proxy, &info, io, &verdicts, &h1_limits, &shutdown, &force,
        ))
        .await;
        match served {
            Served::Closed => return,
            Served::Handover(mut io, read) => {
                io.start(&read);
                Prefixed::new(read, io)
            }
        }
    } else {
        Prefixed::new(
            BytesMut::new(),
            FramingIo::new(stream, max_head, verdicts.clone()),
        )
    };
    let io = TokioIo::new(io);
    let service = {
        let info = info.clone();
        let verdicts = verdicts.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            // Counted here, when hyper hands the request over, not in the future: HTTP/1 requests
            // come one at a time and in order, which is what the scanner's indices assume.
            let refused = if req.version() < Version::HTTP_2 {
                verdicts.next_request()
            } else {
                None
            };
            // hyper switches protocols after a 101 to an Upgrade request; the scanner must then
            // stop reading the tunnel as HTTP/1.1. (CONNECT, the other way to a tunnel, is refused
            // by the proxy.)
            let may_switch =
                req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
            let switch = may_switch.then(|| verdicts.clone());
            let proxy = proxy.clone();
            let info = info.clone();
            async move {
                let resp = proxy.handle(req, &info, refused).await;
                if let Some(verdicts) = switch {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        verdicts.switched_protocols();
                    }
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    // Boxed: inline, hyper's connection state (several KB) would be part of every connection's
    // task, those that `h1_server` serves to the end and the idle ones included.
    let mut conn = Box::pin(builder.serve_connection_with_upgrades(io, service));
    // Shutdown, forced close, a head that began and the timer are polled only when one of them was
    // woken, not on every wake-up of the connection (see `gate`).
    let gate = Gate::new();
    let mut shutdown = pin!(shutdown.cancelled());
    let mut force = pin!(force.cancelled());
    let mut head_changed = pin!(verdicts.head_changed());
    let mut timer = pin!(tokio::time::sleep_until(Instant::now().into()));
    let mut armed: Option<Instant> = None;
    let mut draining = false;
    loop {
        let head = verdicts.head_since();
        let wake = match (head, info.is_idle_since()) {
            // A head is under way, and no request is in flight: it has the header-read timeout,
            // counted from its first byte or from the end of the last exchange, whichever is later
            // (hyper reads ahead, so a pipelined head can begin while a response is being sent).
            (Some(head), Some(idle)) => Some(head.max(idle) + header_read_timeout),
            // A head is under way behind a request in flight: its time starts when the response
            // is done, which nothing signals here; look again a quarter of the timeout later.
            (Some(_), None) => Some(Instant::now() + header_read_timeout / 4),
            (None, _) if draining => None,
            (None, Some(idle)) => Some(idle + idle_timeout),
            // While requests are in flight, look again one idle period later.
            (None, None) => Some(Instant::now() + idle_timeout),
        };
        if wake != armed {
            if let Some(at) = wake {
                timer.as_mut().reset(at.into());
            }
            armed = wake;
            gate.open();
        }
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(result));
            }
            gate.poll(cx, |cx| {
                if !draining && shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
                if force.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Force);
                }
                if head_changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::HeadChanged);
                }
                if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Timer);
                }
                Poll::Pending
            })
        })
        .await;
        match event {
            Event::Ended(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            Event::Shutdown => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            Event::Force => break,
            // A head began or ended (or the scanner stopped): the deadline is computed again at
            // the top of the loop.
            Event::HeadChanged => head_changed.set(verdicts.head_changed()),
            Event::Timer => {
                armed = None;
                let idle = info.is_idle_since();
                match verdicts.head_since() {
                    Some(head) => {
                        if idle.is_some_and(|idle| head.max(idle).elapsed() >= header_read_timeout)
                        {
                            // Like hyper's own header timeout: no answer, the connection is cut.
                            tracing::debug!("header read timeout; closing the connection");
                            break;
                        }
                    }
                    None => {
                        if !draining && idle.is_some_and(|since| since.elapsed() >= idle_timeout) {
                            tracing::debug!("idle timeout; closing the connection");
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        }
    }
}

/// What woke the connection loop of `serve_http`.
enum Event<E> {
    Ended(Result<(), E>),
    Shutdown,
    Force,
    HeadChanged,
    Timer,
}
