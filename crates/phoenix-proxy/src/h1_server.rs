//! HTTP/1.1 from clients: Phoenix's own server for the common request, hyper's for the rest.
//!
//! hyper's server is most of what a proxied request costs in each hop once the upstream side is
//! Phoenix's own (`upstream::h1`): its dispatcher, its buffers and the channel that carries the
//! request body. Nearly every request a proxy sees is a plain one: HTTP/1.1, a head, and either no
//! body or a short one that came with the head. This module serves those on the connection's own
//! task: it parses the head with httparse into a request whose header values share the read buffer,
//! hands it to `Proxy::handle`, and writes the response, its head and each body frame as one write.
//!
//! Everything else goes to hyper, at a request boundary and with the bytes already read
//! ([`Served::Handover`]): a head that does not parse or is too long (hyper answers 400 or 431 as
//! before), HTTP/1.0, `Transfer-Encoding`, `Expect`, `Upgrade`, more than one `Content-Length`, a
//! body that is not all in the buffer yet. From there hyper serves the rest of the connection, so
//! a connection is never served by both at once, and every refusal keeps hyper's wording.
//!
//! The connection's time limits are the same as under hyper (`server::serve_http`): the idle
//! timeout between requests, the header-read timeout from a head's first byte (or the end of the
//! previous exchange, whichever is later), no answer when either passes. While a request is in
//! flight the socket is still read, so that a client that leaves cancels its upstream request, as
//! it does under hyper; bytes of a pipelined request wait in the buffer.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::body::UpstreamBody;
use crate::forward::list_elements;
use crate::framing::Verdicts;
use crate::gate::Gate;
use crate::plain::WireFields;
use crate::proxy::{ConnInfo, Proxy};
use crate::readiness::{Drained, ReadReadiness};
use crate::wire::{decimal, fields, push_decimal, push_field, push_hex, span};

/// What one read of the socket asks for at least.
const READ_SIZE: usize = 8 * 1024;
/// Response bytes gathered before they are written (one TLS record holds 16 KiB).
const WRITE_BATCH: usize = 16 * 1024;

/// How a connection left this server.
pub(crate) enum Served<I> {
    /// It is over: closed by either side, timed out, shut down.
    Closed,
    /// A request this server does not take: hyper serves the connection from here on, starting with
    /// these bytes, none of which was consumed.
    Handover(I, BytesMut),
}

/// The limits of the listener that matter here.
pub(crate) struct Limits {
    /// Longest head taken here; a longer one goes to hyper, which refuses it.
    pub(crate) max_head: usize,
    pub(crate) max_headers: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// A request head this server takes, parsed; its fields are in the connection's `spans`.
struct Head {
    /// Bytes of the head, and of the body after it.
    len: usize,
    body: usize,
    method: Method,
    target: std::ops::Range<usize>,
    /// The client asked to close after this exchange.
    close: bool,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
}

/// What became of the head at the start of the buffer.
enum Parsed {
    Complete(Head),
    Partial,
    /// Not for this server (see the module documentation).
    Hyper,
}

/// Serves `io` until it closes or needs hyper. `read` holds bytes already read from it.
pub(crate) async fn serve<I>(
    proxy: &Arc<Proxy>,
    info: &Arc<ConnInfo>,
    io: I,
    verdicts: &Verdicts,
    limits: &Limits,
    shutdown: &CancellationToken,
    force: &CancellationToken,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + ReadReadiness + Unpin,
{
    let mut conn = Conn {
        io,
        read: BytesMut::new(),
        write: Vec::new(),
        written: 0,
        drained: Drained::default(),
    };
    let gate = Gate::new();
    let mut shutdown = pin!(shutdown.cancelled());
    let mut force = pin!(force.cancelled());
    let mut timer = pin!(tokio::time::sleep_until(Instant::now().into()));
    let mut draining = false;
    let mut spans = Vec::new();
    loop {
        // The head: the idle timeout until its first byte, then the header-read timeout. The
        // second is set only for a head that its first read does not complete, which is rare:
        // shortening a timer moves it in tokio's wheel, while `reset` to a later time does not.
        let mut began = !conn.read.is_empty();
        let mut head_timed = began;
        let limit = match began {
            true => limits.header_read_timeout,
            false => limits.idle_timeout,
        };
        timer.as_mut().reset((Instant::now() + limit).into());
        gate.open();
        let head = loop {
            if !conn.read.is_empty() {
                match parse(&conn.read, limits, &mut spans) {
                    Parsed::Complete(head) if head.len <= limits.max_head => break head,
                    Parsed::Partial if conn.read.len() <= limits.max_head => {
                        // Right after the read that began the head: timed from its first byte.
                        if !head_timed {
                            head_timed = true;
                            let deadline = Instant::now() + limits.header_read_timeout;
                            timer.as_mut().reset(deadline.into());
                            gate.open();
                        }
                    }
                    // Too long, or not for this server: hyper answers as it always did.
                    _ => return Served::Handover(conn.io, conn.read),
                }
            }
            let event = poll_fn(|cx| {
                if let Poll::Ready(read) = conn.poll_fill(cx) {
                    return Poll::Ready(Waiting::Read(read));
                }
                gate.poll(cx, |cx| {
                    if !draining && shutdown.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Waiting::Shutdown);
                    }
                    if force.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Waiting::Force);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Waiting::Timer);
                    }
                    Poll::Pending
                })
            })
            .await;
            match event {
                // Idle past the idle timeout: closed as a server does, with TLS close_notify.
                Waiting::Timer if !began => {
                    conn.close().await;
                    return Served::Closed;
                }
                // A head not complete within the header-read timeout: cut, with no answer.
                Waiting::Read(Ok(0) | Err(_)) | Waiting::Force | Waiting::Timer => {
                    return Served::Closed
                }
                Waiting::Read(Ok(_)) => began = true,
                Waiting::Shutdown => {
                    draining = true;
                    if conn.read.is_empty() {
                        conn.close().await;
                        return Served::Closed;
                    }
                }
            }
        };

        // The request, with its body (all of it is in the buffer). In a block, so that no more of
        // it than the boxed future outlives the block in this (long-lived) function's state.
        let head_request = head.method == Method::HEAD;
        let mut handling = {
            let bytes = conn.read.split_to(head.len).freeze();
            // A request without a body (most) takes no share of the buffer: each share costs
            // an atomic count when it is cloned and dropped.
            let body = match head.body {
                0 => Bytes::new(),
                length => conn.read.split_to(length).freeze(),
            };
            match start(proxy, info, verdicts, &bytes, &body, &head, &spans) {
                Some(handling) => handling,
                None => {
                    // A field or target the http types refuse: hyper answers it, from its first
                    // byte.
                    let mut read =
                        BytesMut::with_capacity(bytes.len() + body.len() + conn.read.len());
                    read.extend_from_slice(&bytes);
                    read.extend_from_slice(&body);
                    read.extend_from_slice(&conn.read);
                    return Served::Handover(conn.io, read);
                }
            }
        };
        // The exchange's state is an allocation of its own, like the request's future: an idle
        // connection holds only what waiting for a head needs.
        let exchange = Box::pin(async {
            // A shutdown while the request is in flight lets it finish, then closes.
            let (response, lines) = loop {
                let event = poll_fn(|cx| {
                    if let Poll::Ready(response) = handling.as_mut().poll(cx) {
                        return Poll::Ready(InFlight::Answered(response));
                    }
                    if conn.watch(cx).is_ready() {
                        return Poll::Ready(InFlight::Left);
                    }
                    gate.poll(cx, |cx| {
                        if !draining && shutdown.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(InFlight::Shutdown);
                        }
                        if force.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(InFlight::Force);
                        }
                        Poll::Pending
                    })
                })
                .await;
                match event {
                    InFlight::Answered(answer) => break answer,
                    InFlight::Shutdown => draining = true,
                    InFlight::Left | InFlight::Force => return None,
                }
            };
            let close = head.close
                || draining
                || response
                    .headers()
                    .get_all(header::CONNECTION)
                    .iter()
                    .any(|v| has_token(v, "close"));
            let written = conn
                .write_response(
                    (response, lines),
                    head_request,
                    close,
                    head.trailers,
                    &gate,
                    &mut force,
                )
                .await;
            Some((written, close))
        });
        let Some((written, close)) = exchange.await else {
            return Served::Closed;
        };
        if !matches!(written, Ok(true)) || close {
            // A close after an answer tells the client; one after a failure is cut short.
            if written.is_ok() {
                conn.close().await;
            }
            return Served::Closed;
        }
    }
}

/// The response, and the fields of a plain exchange's response not in its map (`plain`).
type Answer = (Response<UpstreamBody>, Option<WireFields>);

/// Starts the request of `head` (its bytes `bytes`, its body `body`): by the plain path when it
/// takes it, by the header-map path otherwise; `None` when the http types refuse a field or the
/// target, for hyper to answer. The future is boxed, as hyper boxes it: inline, it (several KB)
/// would be part of every connection, the idle ones included; and this is a function of its own
/// so that what it builds is not part of `serve`'s state either. Each path has a box of its own
/// size: boxing copies the whole future, and the header-map path's is about twice the plain
/// path's.
fn start<'a>(
    proxy: &'a Arc<Proxy>,
    info: &'a Arc<ConnInfo>,
    verdicts: &Verdicts,
    bytes: &Bytes,
    body: &Bytes,
    head: &Head,
    spans: &[[usize; 4]],
) -> Option<Pin<Box<dyn Future<Output = Answer> + Send + 'a>>> {
    let plain = proxy.plain(
        info,
        bytes,
        spans,
        &head.method,
        head.target.clone(),
        body.clone(),
    );
    let request = match plain {
        Some(exchange) => Ok(exchange),
        None => Err(request(bytes, head, spans)?.map(|()| Full::new(body.clone()))),
    };
    // Counted only now: a request handed over to hyper is counted there. (The framing scanner
    // sleeps while this server serves the connection, so it refuses none of these; see `framing`.)
    let refused = verdicts.next_request();
    Some(match request {
        Ok(exchange) => Box::pin(proxy.exchange(exchange, info)),
        Err(request) => Box::pin(async move { (proxy.handle(request, info, refused).await, None) }),
    })
}

/// What woke a connection waiting for a request head.
enum Waiting {
    Read(io::Result<usize>),
    Shutdown,
    Force,
    Timer,
}

/// What woke a connection whose request is in flight. (The answer is moved out once per request;
/// boxing it to even out the variants would cost an allocation per request instead.)
#[allow(clippy::large_enum_variant)]
enum InFlight {
    Answered(Answer),
    /// The client closed its side (or the connection failed).
    Left,
    Shutdown,
    Force,
}

/// Whether a list header's value holds `token`.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    list_elements([value]).any(|t| t.eq_ignore_ascii_case(token))
}

/// Parses the head at the start of `read`, and decides whether this server takes it.
fn parse(read: &BytesMut, limits: &Limits, spans: &mut Vec<[usize; 4]>) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let fields = &mut fields[..limits.max_headers.min(128)];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(read, fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    if parsed.version != Some(1) {
        return Parsed::Hyper;
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Parsed::Hyper;
    };
    if !target.starts_with('/') {
        return Parsed::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    let target_at = target.as_ptr() as usize - read.as_ptr() as usize;
    let target_span = target_at..target_at + target.len();
    let mut body = 0;
    let mut lengths = 0;
    let mut close = false;
    let mut trailers = false;
    spans.clear();
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            match parse_length(field.value) {
                Some(n) if lengths == 1 => body = n,
                _ => return Parsed::Hyper,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Hyper;
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= tokens(field.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case(b"te") {
            trailers |= tokens(field.value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        }
        spans.push(span(read, field));
    }
    if read.len() - len < body {
        return Parsed::Hyper;
    }
    Parsed::Complete(Head {
        len,
        body,
        method,
        target: target_span,
        close,
        trailers,
    })
}

/// The request of `head`, whose bytes are `bytes`: the target and the field values share them.
fn request(bytes: &Bytes, head: &Head, spans: &[[usize; 4]]) -> Option<Request<()>> {
    let uri = Uri::from_maybe_shared(bytes.slice(head.target.clone())).ok()?;
    // Room for the fields the proxy adds (`X-Forwarded-*`, `Forwarded`, `X-Request-Id`, trace
    // context) without growing the map mid-request.
    let headers = fields(bytes, spans, 8)?;
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// The comma-separated elements of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// A `Content-Length` this server takes: digits only, at most 15 of them (no list: hyper's).
fn parse_length(value: &[u8]) -> Option<usize> {
    decimal(value, 15).map(|n| n as usize)
}

struct Conn<I> {
    io: I,
    read: BytesMut,
    /// Bytes to write, from `written` on.
    write: Vec<u8>,
    written: usize,
    /// Whether the next read asks the socket's readiness first (see `readiness`).
    drained: Drained,
}

impl<I: AsyncRead + AsyncWrite + ReadReadiness + Unpin> Conn<I> {
    /// Reads more into `read`. A read after one that left the stream drained asks the socket's
    /// readiness first: the task is woken by the upstream and by body frames too (see `readiness`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.drained.skip(&self.io, cx) {
            return Poll::Pending;
        }
        let read = self.poll_read_more(cx);
        self.drained.after(read)
    }

    /// One read: the bytes read, and the room there was for them.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(usize, usize)>> {
        if self.read.capacity() == 0 {
            // A connection that has sent nothing yet holds no buffer: ten thousand idle ones
            // would otherwise hold 80 MB. The first bytes land on the stack.
            let mut first = [0u8; 1024];
            let mut buf = ReadBuf::new(&mut first);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            self.read.reserve(READ_SIZE);
            self.read.extend_from_slice(buf.filled());
            return Poll::Ready(Ok((buf.filled().len(), first.len())));
        }
        if self.read.capacity() - self.read.len() < READ_SIZE / 4 {
            self.read.reserve(READ_SIZE);
        }
        let room = self.read.capacity() - self.read.len();
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
            .map_ok(|n| (n, room))
    }

    /// Closes the connection as a server does (TLS close_notify), without waiting long for a
    /// client that does not read.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }

    /// Reads while a request is in flight: ready when the client closed its side (or the
    /// connection failed). What a client pipelines meanwhile waits in the buffer, up to a bound.
    fn watch(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.read.len() < READ_SIZE {
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        Poll::Pending
    }

    /// Writes out what is buffered, then flushes.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.write.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.write.clear();
        self.written = 0;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Writes `response`; true when the connection can carry another exchange.
    /// Writes `answer`: the response, and the fields of a plain exchange's response that are not in
    /// its map (see `plain`).
    async fn write_response(
        &mut self,
        (response, lines): (Response<UpstreamBody>, Option<WireFields>),
        head_request: bool,
        close: bool,
        trailers: bool,
        gate: &Gate,
        force: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> io::Result<bool> {
        let (parts, body) = response.into_parts();
        let mut framing = encode_head(
            &mut self.write,
            &parts,
            lines.as_ref(),
            &body,
            head_request,
            close,
        );
        let mut body = pin!(body);
        if framing == Framing::None {
            // HEAD, 204, 304: the body is not sent, whatever it holds.
            return poll_fn(|cx| self.poll_flush_out(cx)).await.map(|()| true);
        }
        // False once the body broke its framing: the connection cannot go on.
        let mut whole = true;
        poll_fn(|cx| loop {
            // Frames that are ready go out with the head (and with each other) in one write.
            if framing != Framing::Ended && self.write.len() < WRITE_BATCH {
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if !encode_frame(&mut self.write, &mut framing, frame, trailers) {
                            // More than the declared length: the client cannot tell where it ends.
                            return Poll::Ready(Ok(false));
                        }
                        continue;
                    }
                    Poll::Ready(None) => {
                        // Less than the declared length: what came is sent, then the connection
                        // ends, and the client sees the body cut short.
                        whole = encode_end(&mut self.write, &mut framing);
                        continue;
                    }
                    // The upstream failed mid-body: cut the connection, the client sees the end.
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(Ok(false)),
                    Poll::Pending => {
                        // Streamed bodies (SSE, tokens) go out frame by frame; while the next
                        // frame is awaited, a client that leaves or a forced close ends it.
                        ready!(self.poll_flush_out(cx))?;
                        if self.watch(cx).is_ready() {
                            return Poll::Ready(Ok(false));
                        }
                        if gate.poll(cx, |cx| force.as_mut().poll(cx)).is_ready() {
                            return Poll::Ready(Ok(false));
                        }
                        return Poll::Pending;
                    }
                }
            }
            ready!(self.poll_flush_out(cx))?;
            if framing == Framing::Ended {
                return Poll::Ready(Ok(whole));
            }
        })
        .await
    }
}

/// How the response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`: the bytes still to send.
    Length(u64),
    Chunked,
    /// The body was sent whole.
    Ended,
}

/// Writes the response head; the body's framing.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    lines: Option<&WireFields>,
    body: &UpstreamBody,
    head_request: bool,
    close: bool,
) -> Framing {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // A plain response whose fields are all lines says its length beside them (see `plain`).
    let mut declared = lines.and_then(|l| l.framing).and_then(|f| f.length);
    let mut closing = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            match parse_length(value.as_bytes()) {
                Some(n) if declared.is_none() => declared = Some(n as u64),
                // A length that is not one number is not passed on; the body is chunked instead.
                _ => continue,
            }
        }
        if name == header::CONNECTION {
            closing |= has_token(value, "close");
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // A plain exchange's ordinary fields (see `plain`): none of them frames or closes.
    if let Some(lines) = lines {
        lines.write_response(out);
    }
    if !(parts.headers.contains_key(header::DATE) || lines.is_some_and(|l| l.date)) {
        date::with(|date| push_field(out, b"date", date));
    }
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = body
        .is_end_stream()
        .then_some(0)
        .or(body.size_hint().exact())
    {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, n);
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if close && !closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Adds one body frame; false when it does not fit the declared length.
fn encode_frame(
    out: &mut Vec<u8>,
    framing: &mut Framing,
    frame: Frame<Bytes>,
    trailers: bool,
) -> bool {
    match frame.into_data() {
        Ok(data) => match framing {
            Framing::Length(left) => {
                if data.len() as u64 > *left {
                    return false;
                }
                *left -= data.len() as u64;
                out.extend_from_slice(&data);
                true
            }
            Framing::Chunked => {
                if !data.is_empty() {
                    push_hex(out, data.len() as u64);
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                }
                true
            }
            Framing::None | Framing::Ended => true,
        },
        Err(frame) => {
            // Trailers end a chunked body, for a client that said it takes them.
            if let (Ok(fields), Framing::Chunked) = (frame.into_trailers(), *framing) {
                out.extend_from_slice(b"0\r\n");
                if trailers {
                    for (name, value) in &fields {
                        push_field(out, name.as_str().as_bytes(), value.as_bytes());
                    }
                }
                out.extend_from_slice(b"\r\n");
                *framing = Framing::Ended;
            }
            true
        }
    }
}

/// Ends the body; false when it fell short of its declared length.
fn encode_end(out: &mut Vec<u8>, framing: &mut Framing) -> bool {
    let complete = match *framing {
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n\r\n");
            true
        }
        Framing::Length(left) => left == 0,
        Framing::None | Framing::Ended => true,
    };
    *framing = Framing::Ended;
    complete
}

/// The `Date` header, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::SystemTime;

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub(super) fn with<R>(f: impl FnOnce(&[u8]) -> R) -> R {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second || cached.1.is_empty() {
                *cached = (second, httpdate::fmt_http_date(now));
            }
            f(cached.1.as_bytes())
        })
    }
}
