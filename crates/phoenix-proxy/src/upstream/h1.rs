//! HTTP/1.1 to upstream servers: Phoenix's own client side of the protocol.
//!
//! hyper's `client::conn` splits a connection into a `SendRequest` handle and a `Connection` future
//! that does the I/O, and passes the request, the response and every body chunk between them
//! through channels. That machinery was about 14 000 instructions per proxied request and hop, a
//! quarter of the mesh's user-space work (docs/BENCHMARKS.md), for a protocol that carries one
//! exchange at a time on a connection. Here the task that proxies the request writes it to the socket
//! and reads the response from it, with nothing in between:
//!
//! - [`H1Conn::send`] writes the request head, then the request body while it waits for the
//!   response head (an exchange is full duplex: a server may answer before it has read the whole
//!   body), and returns the response with an [`H1Body`] that owns the connection;
//! - reading that body goes on writing the rest of the request body, if any;
//! - at the clean end of an exchange, [`H1Body::into_reusable`] hands the connection back for the
//!   next request only if nothing about it is in doubt: the server keeps it alive, the request was
//!   written whole, the response was read whole, and no stray byte followed it. In every other case
//!   the connection is closed, since a connection whose framing is in doubt could serve one
//!   client's response to another.
//!
//! What is accepted from a server follows RFC 9112 strictly, as the framing of the client side is
//! (see `framing`): `Transfer-Encoding` other than `chunked`, a `Content-Length` that is not one
//! number, obsolete line folding, bare LF line endings and control characters are errors (a 502),
//! not guesses. A response head is at most [`MAX_HEAD`] bytes with [`MAX_HEADERS`] fields.
//!
//! A pooled connection is idle, and nobody reads it. A close by the server shows at the next
//! checkout: [`H1Conn::send`] looks at the socket before it writes, and a connection that ended
//! gives its request back unsent (`SendError::NotSent`), which makes a retry safe for any method.
//! A `101 Switching Protocols` response hands the socket, with any bytes read past the head, to the
//! tunnel ([`H1Body::into_upgraded`]).

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::{BoxError, UpstreamBody};
use crate::forward::list_elements;
use crate::plain::{split_response, WireFields};
use crate::readiness::{Drained, ReadReadiness};
use crate::wire::{decimal, fields, push_decimal, push_field, push_hex, span};

/// Largest response head accepted from a server.
pub(crate) const MAX_HEAD: usize = 128 * 1024;
/// Most header fields accepted in a response head (hyper's limit too).
pub(crate) const MAX_HEADERS: usize = 100;
/// Largest trailer section of a chunked response.
const MAX_TRAILERS: usize = 16 * 1024;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Interim (1xx) responses skipped before the final one.
const MAX_INTERIM: usize = 16;
/// What one read of the socket asks for at least.
const READ_SIZE: usize = 16 * 1024;
/// Body frames up to this size are copied behind their chunk header and written with it; larger
/// ones are written from their own buffer.
const COPY_LIMIT: usize = 8 * 1024;

/// The socket under an upstream HTTP/1.1 connection.
pub enum UpstreamIo {
    Tcp(TcpStream),
    /// Boxed: a TLS stream is large, and connections move in and out of the idle pool.
    Tls(Box<TlsStream<TcpStream>>),
}

/// What went wrong in an exchange.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection {0}")]
    Closed(&'static str),
    #[error("malformed response from upstream: {0}")]
    Malformed(&'static str),
    #[error("request body: {0}")]
    RequestBody(&'static str),
    /// The body that was being sent failed (client went away, size limit); its own error.
    #[error("{0}")]
    Body(BoxError),
}

/// A request that failed, and whether it can be sent elsewhere.
pub(crate) enum SendError {
    /// Nothing of it was written: it comes back whole.
    NotSent(Box<Request<UpstreamBody>>, H1Error),
    /// It was (maybe partly) written, and no response head came. The head comes back when the
    /// request had no body, so that an idempotent one can be sent again without a copy made in
    /// advance for the rare failure.
    Sent(H1Error, Option<Box<http::request::Parts>>),
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    /// `Content-Length`: the bytes still to come.
    Length(u64),
    Chunked,
}

/// The request body still to be written.
struct Sending {
    body: UpstreamBody,
    encoder: Encoder,
}

/// One HTTP/1.1 connection to a server, between exchanges or in one.
pub(crate) struct H1Conn {
    io: UpstreamIo,
    /// Bytes read and not consumed yet.
    read: BytesMut,
    /// Bytes to write, from `written` on.
    write: Vec<u8>,
    written: usize,
    /// A large body frame, written after `write`, and whether a CRLF ends its chunk.
    write_frame: Option<Bytes>,
    frame_crlf: bool,
    /// Written bytes that a flush has not pushed out yet (TLS).
    unflushed: bool,
    sending: Option<Sending>,
    /// Where the fields of a response head are, while it is parsed (see `parse_head`).
    spans: Vec<[usize; 4]>,
    /// False once this connection must not carry another exchange.
    reusable: bool,
    /// Whether the next read asks the socket's readiness first (see `readiness`).
    drained: Drained,
}

impl H1Conn {
    pub(crate) fn new(io: UpstreamIo) -> H1Conn {
        H1Conn {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            written: 0,
            write_frame: None,
            frame_crlf: false,
            unflushed: false,
            sending: None,
            spans: Vec::new(),
            reusable: true,
            drained: Drained::default(),
        }
    }

    /// Sends `req` (origin-form, with `Host`; see `endpoint::prepare_h1`) and waits for the final
    /// response head. `fields`: a plain request's fields, written after those of its map (see
    /// `plain`); its response then keeps its ordinary fields as lines, given beside it.
    /// `upgrade`: the request asks to switch protocols, and a 101 is expected.
    ///
    /// An `async` block rather than an `async fn`: an `async fn` keeps its arguments twice in its
    /// state (as arguments and as locals), and this state is copied into every request's boxed
    /// future (`Service::send_with`).
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    pub(crate) fn send(
        mut self,
        req: Request<UpstreamBody>,
        fields: Option<&WireFields>,
        upgrade: bool,
    ) -> impl Future<Output = Result<Answer, SendError>> + '_ {
        async move {
            // An idle connection the server closed (or wrote to, which it must not) is not used.
            if let Some(error) = self.ended_while_idle() {
                return Err(SendError::NotSent(Box::new(req), error));
            }
            let encoder = match encode_head(&req, fields, &mut self.write) {
                Ok(encoder) => encoder,
                Err(error) => return Err(SendError::NotSent(Box::new(req), error)),
            };
            // Until the first byte is out, the request can still go elsewhere.
            if let Err(error) = poll_fn(|cx| self.poll_write_some(cx)).await {
                return Err(SendError::NotSent(Box::new(req), error));
            }
            let (parts, body) = req.into_parts();
            match encoder {
                Some(encoder) => self.sending = Some(Sending { body, encoder }),
                None => drop(body),
            }
            let head_request = parts.method == Method::HEAD;
            let plain = fields.is_some();
            let mut write_error = None;
            let mut interim = 0;
            let head = poll_fn(|cx| {
                if write_error.is_none() {
                    match self.poll_send(cx) {
                        // The request cannot be completed: the exchange is over.
                        Poll::Ready(Err(e @ (H1Error::Body(_) | H1Error::RequestBody(_)))) => {
                            return Poll::Ready(Err(e));
                        }
                        // The server may have answered and closed before it read everything (an early
                        // response); the answer is read below, the error is kept for when none comes.
                        Poll::Ready(Err(e)) => write_error = Some(e),
                        _ => {}
                    }
                }
                self.poll_head(cx, head_request, upgrade, plain, &mut interim)
            })
            .await;
            let error = match head {
                Ok((head, decoder, lines)) => {
                    let response = head.map(|()| H1Body {
                        conn: self,
                        decoder,
                    });
                    return Ok((response, lines));
                }
                Err(H1Error::Closed(_)) if write_error.is_some() => write_error.expect("checked"),
                Err(error) => error,
            };
            Err(SendError::Sent(
                error,
                encoder.is_none().then(|| Box::new(parts)),
            ))
        }
    }

    /// Why an idle connection cannot take a request: the server closed it, or sent bytes
    /// nobody asked for. Looks without waiting.
    fn ended_while_idle(&mut self) -> Option<H1Error> {
        if !self.reusable {
            return Some(H1Error::Closed("earlier"));
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_fill(&mut cx) {
            Poll::Pending => None,
            Poll::Ready(Ok(0)) => Some(H1Error::Closed("while it was idle")),
            Poll::Ready(Ok(_)) => Some(H1Error::Malformed("bytes sent on an idle connection")),
            Poll::Ready(Err(e)) => Some(H1Error::Io(e)),
        }
    }

    /// Reads what the socket has into `read`; `Ok(0)` at its end. A read after one that left the
    /// stream drained asks the socket's readiness first: the request's task is woken by the
    /// client's side too (see `readiness`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.drained.skip(&self.io, cx) {
            return Poll::Pending;
        }
        if self.read.capacity() - self.read.len() < READ_SIZE / 4 {
            self.read.reserve(READ_SIZE);
        }
        let room = self.read.capacity() - self.read.len();
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
            .map_ok(|n| (n, room));
        self.drained.after(read)
    }

    /// Reads more of a chunked body's framing, which must fit in `limit` bytes.
    fn fill_or_fail(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<Result<(), H1Error>> {
        if self.read.len() >= limit {
            return Poll::Ready(Err(H1Error::Malformed("chunk framing too long")));
        }
        if ready!(self.poll_fill(cx))? == 0 {
            return Poll::Ready(Err(H1Error::Closed("in the middle of the response body")));
        }
        Poll::Ready(Ok(()))
    }

    /// One write of buffered bytes (at least one is written).
    fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
        }
        self.written += n;
        self.unflushed = true;
        Poll::Ready(Ok(()))
    }

    /// Writes out what is buffered, then flushes.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        loop {
            while self.written < self.write.len() {
                ready!(self.poll_write_some(cx))?;
            }
            self.write.clear();
            self.written = 0;
            let Some(frame) = self.write_frame.as_mut() else {
                break;
            };
            while !frame.is_empty() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, frame))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                frame.advance(n);
                self.unflushed = true;
            }
            self.write_frame = None;
            if std::mem::take(&mut self.frame_crlf) {
                self.write.extend_from_slice(b"\r\n");
            }
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the request: what is buffered, then the body as it comes. Ready when all is written.
    /// An error marks the connection unusable.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        let result = self.poll_send_inner(cx);
        if let Poll::Ready(Err(_)) = result {
            self.sending = None;
            self.reusable = false;
        }
        result
    }

    fn poll_send_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        loop {
            ready!(self.poll_flush_out(cx))?;
            let Some(sending) = self.sending.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(&mut sending.body).poll_frame(cx)) {
                None => {
                    match sending.encoder {
                        Encoder::Chunked => self.write.extend_from_slice(b"0\r\n\r\n"),
                        Encoder::Length(0) => {}
                        Encoder::Length(_) => {
                            return Poll::Ready(Err(H1Error::RequestBody(
                                "shorter than its Content-Length",
                            )))
                        }
                    }
                    self.sending = None;
                }
                Some(Err(e)) => return Poll::Ready(Err(H1Error::Body(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        match &mut sending.encoder {
                            Encoder::Length(left) => {
                                if data.len() as u64 > *left {
                                    return Poll::Ready(Err(H1Error::RequestBody(
                                        "longer than its Content-Length",
                                    )));
                                }
                                *left -= data.len() as u64;
                                self.queue(data, false);
                            }
                            Encoder::Chunked => {
                                push_hex(&mut self.write, data.len() as u64);
                                self.write.extend_from_slice(b"\r\n");
                                self.queue(data, true);
                            }
                        }
                    }
                    Err(frame) => {
                        // Trailers end a chunked body; a body with a length has nowhere to put them.
                        if let (Ok(trailers), Encoder::Chunked) =
                            (frame.into_trailers(), sending.encoder)
                        {
                            self.write.extend_from_slice(b"0\r\n");
                            push_fields(&mut self.write, &trailers);
                            self.write.extend_from_slice(b"\r\n");
                            self.sending = None;
                        }
                    }
                },
            }
        }
    }

    /// Queues one body frame, followed by the end of its chunk when `chunk_end`.
    fn queue(&mut self, data: Bytes, chunk_end: bool) {
        if data.len() <= COPY_LIMIT {
            self.write.extend_from_slice(&data);
            if chunk_end {
                self.write.extend_from_slice(b"\r\n");
            }
        } else {
            // Written from its own buffer after what is buffered, then the chunk's end.
            self.write_frame = Some(data);
            self.frame_crlf = chunk_end;
        }
    }

    /// Reads until the final response head is parsed.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        upgrade: bool,
        plain: bool,
        interim: &mut usize,
    ) -> Poll<Result<ParsedHead, H1Error>> {
        loop {
            if !self.read.is_empty() {
                if let Some((response, decoder, lines)) = parse_head(
                    &mut self.read,
                    &mut self.spans,
                    head_request,
                    upgrade,
                    plain,
                )? {
                    if response.status().is_informational()
                        && response.status() != StatusCode::SWITCHING_PROTOCOLS
                    {
                        // 100 Continue, 103 Early Hints: the final response follows.
                        *interim += 1;
                        if *interim > MAX_INTERIM {
                            return Poll::Ready(Err(H1Error::Malformed("too many 1xx responses")));
                        }
                        continue;
                    }
                    let options = match lines.as_ref().and_then(|l| l.framing) {
                        Some(framing) => (framing.close, framing.keep_alive),
                        None => connection_options(response.headers()),
                    };
                    if !keeps_alive(response.version(), options) {
                        self.reusable = false;
                    }
                    if decoder == Decoder::Eof {
                        self.reusable = false;
                    }
                    return Poll::Ready(Ok((response, decoder, lines)));
                }
                if self.read.len() > MAX_HEAD {
                    return Poll::Ready(Err(H1Error::Malformed("response head too large")));
                }
            }
            if ready!(self.poll_fill(cx))? == 0 {
                self.reusable = false;
                return Poll::Ready(Err(H1Error::Closed("before the response head")));
            }
        }
    }
}

/// Writes the request head into `out`; the body's framing, `None` when there is no body.
fn encode_head(
    req: &Request<UpstreamBody>,
    fields: Option<&WireFields>,
    out: &mut Vec<u8>,
) -> Result<Option<Encoder>, H1Error> {
    let headers = req.headers();
    let declared = match headers.get(header::CONTENT_LENGTH) {
        Some(value) => Some(
            parse_length(value.as_bytes())
                .ok_or(H1Error::RequestBody("Content-Length is not a number"))?,
        ),
        None => None,
    };
    let body = req.body();
    let empty = body.is_end_stream();
    let (encoder, framing): (Option<Encoder>, Option<u64>) = match declared {
        Some(n) => (
            Some(Encoder::Length(n)).filter(|_| !(empty && n == 0)),
            None,
        ),
        None if empty => {
            // RFC 9110 8.6: a request that usually has content says it has none.
            let payload = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
            (None, payload.then_some(0))
        }
        None => match body.size_hint().exact() {
            Some(n) => (Some(Encoder::Length(n)), Some(n)),
            None => (Some(Encoder::Chunked), None),
        },
    };
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        // The framing is this side's to choose.
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // A plain request's fields, written as they are (see `plain`; none of them frames the body).
    if let Some(fields) = fields {
        out.extend_from_slice(&fields.lines);
    }
    if let Some(n) = framing {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, n);
        out.extend_from_slice(b"\r\n");
    }
    if encoder == Some(Encoder::Chunked) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(encoder)
}

fn push_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// A `Content-Length` value: digits only (a list of equal values, which RFC 9110 8.6 lets a
/// recipient take as one, included).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for item in value.split(|&b| b == b',') {
        let n = decimal(item.trim_ascii(), 19)?;
        match found {
            Some(m) if m != n => return None,
            _ => found = Some(n),
        }
    }
    found
}

/// Whether the server keeps the connection open after this response (RFC 9112 9.3).
/// Whether `Connection` says `close`, and whether it says `keep-alive`.
fn connection_options(headers: &HeaderMap) -> (bool, bool) {
    let mut close = false;
    let mut keep_alive = false;
    for token in list_elements(headers.get_all(header::CONNECTION)) {
        close |= token.eq_ignore_ascii_case("close");
        keep_alive |= token.eq_ignore_ascii_case("keep-alive");
    }
    (close, keep_alive)
}

/// Whether the connection carries another exchange, by the response's version and its
/// `Connection` options (`close`, `keep-alive`).
fn keeps_alive(version: Version, (close, keep_alive): (bool, bool)) -> bool {
    match version {
        Version::HTTP_11 => !close,
        _ => keep_alive && !close,
    }
}

/// A response, and its fields not in its header map (see `plain`).
pub(crate) type Answer = (Response<H1Body>, Option<WireFields>);

/// A response head: the response without its body, how the body is delimited, and the fields
/// kept as lines (`plain`).
type ParsedHead = (Response<()>, Decoder, Option<WireFields>);

/// Parses a response head at the start of `read`, and consumes it when it is complete.
/// `spans` is scratch space kept by the connection, so that a head costs no allocation for it.
/// `plain`: the response of a plain request, whose ordinary fields may stay lines (see `plain`).
fn parse_head(
    read: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    head_request: bool,
    upgrade: bool,
    plain: bool,
) -> Result<Option<ParsedHead>, H1Error> {
    // Uninitialised: a zeroed array of 100 fields would cost more than parsing a short head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let parsing = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        read,
        &mut slots,
    );
    let len = match parsing {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Malformed("too many header fields"))
        }
        Err(_) => return Err(H1Error::Malformed("invalid response head")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Malformed("invalid status code"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Where each field is in the buffer, so that the values can share it once it is frozen.
    spans.clear();
    spans.extend(parsed.headers.iter().map(|field| span(read, field)));
    let head = read.split_to(len).freeze();
    let (headers, lines) = match plain.then(|| split_response(&head, spans)).flatten() {
        Some((headers, lines)) => (headers, Some(lines)),
        None => {
            let headers =
                fields(&head, spans, 0).ok_or(H1Error::Malformed("invalid header field"))?;
            (headers, None)
        }
    };
    let decoder = match lines.as_ref().and_then(|l| l.framing) {
        // Every field is a line; the length is the one field that delimits the body.
        Some(framing) => decoder(status, head_request, upgrade, || {
            Ok(framing
                .length
                .map_or(Delimited::Unframed, Delimited::Length))
        })?,
        None => framing(status, head_request, upgrade, &headers)?,
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Some((response, decoder, lines)))
}

/// How the response body is delimited (RFC 9112 6.3).
fn framing(
    status: StatusCode,
    head_request: bool,
    upgrade: bool,
    headers: &HeaderMap,
) -> Result<Decoder, H1Error> {
    decoder(status, head_request, upgrade, || {
        if headers.contains_key(header::TRANSFER_ENCODING) {
            let mut codings = list_elements(headers.get_all(header::TRANSFER_ENCODING));
            let chunked = codings
                .next()
                .is_some_and(|c| c.eq_ignore_ascii_case("chunked"));
            // Any other coding would reach the client undecoded under a removed header.
            if !chunked || codings.next().is_some() {
                return Err(H1Error::Malformed("Transfer-Encoding other than chunked"));
            }
            return Ok(Delimited::Chunked);
        }
        let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
        let Some(first) = lengths.next() else {
            return Ok(Delimited::Unframed);
        };
        let n =
            parse_length(first.as_bytes()).ok_or(H1Error::Malformed("invalid Content-Length"))?;
        if lengths.any(|v| parse_length(v.as_bytes()) != Some(n)) {
            return Err(H1Error::Malformed("conflicting Content-Length"));
        }
        Ok(Delimited::Length(n))
    })
}

/// What a response's fields say about its body's end, before its status has its say.
enum Delimited {
    Chunked,
    Length(u64),
    /// Neither: the body lasts until the connection closes.
    Unframed,
}

/// The decoder of a response's body: by its status first, then by `delimited`, which reads the
/// fields (only when the status lets the body have any, so that their errors do not count then).
fn decoder(
    status: StatusCode,
    head_request: bool,
    upgrade: bool,
    delimited: impl FnOnce() -> Result<Delimited, H1Error>,
) -> Result<Decoder, H1Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade {
            return Err(H1Error::Malformed(
                "101 to a request that asked for no upgrade",
            ));
        }
        return Ok(Decoder::Upgrade);
    }
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Decoder::Done);
    }
    Ok(match delimited()? {
        Delimited::Chunked => Decoder::Chunked(Chunk::Size),
        Delimited::Length(0) => Decoder::Done,
        Delimited::Length(n) => Decoder::Length(n),
        Delimited::Unframed => Decoder::Eof,
    })
}

/// Where the reading of a response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// `Content-Length`: bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the server closes the connection.
    Eof,
    /// `101 Switching Protocols`: what follows belongs to the tunnel.
    Upgrade,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    Size,
    /// Bytes of the current chunk still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// The body of a response from an [`H1Conn`], which it owns until the exchange is over.
pub(crate) struct H1Body {
    conn: H1Conn,
    decoder: Decoder,
}

impl H1Body {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        if self.conn.sending.is_some()
            || !self.conn.write.is_empty()
            || self.conn.write_frame.is_some()
        {
            match self.conn.poll_send(cx) {
                Poll::Ready(Err(e @ (H1Error::Body(_) | H1Error::RequestBody(_)))) => {
                    return Poll::Ready(Some(Err(e)))
                }
                // The server stopped reading the request; its response goes on.
                Poll::Ready(Err(_)) | Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        let result = self.poll_decode(cx);
        if let Poll::Ready(Some(Err(_))) = result {
            self.conn.reusable = false;
            self.decoder = Decoder::Done;
        }
        result
    }

    fn poll_decode(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let conn = &mut self.conn;
        loop {
            match self.decoder {
                Decoder::Done | Decoder::Upgrade => return Poll::Ready(None),
                Decoder::Length(left) | Decoder::Chunked(Chunk::Data(left)) => {
                    if conn.read.is_empty() && ready!(conn.poll_fill(cx)).map_err(H1Error::Io)? == 0
                    {
                        return Poll::Ready(Some(Err(H1Error::Closed(
                            "in the middle of the response body",
                        ))));
                    }
                    let n = left.min(conn.read.len() as u64);
                    let data = conn.read.split_to(n as usize).freeze();
                    self.decoder = match (self.decoder, left - n) {
                        (Decoder::Length(_), 0) => Decoder::Done,
                        (Decoder::Length(_), left) => Decoder::Length(left),
                        (_, 0) => Decoder::Chunked(Chunk::DataEnd),
                        (_, left) => Decoder::Chunked(Chunk::Data(left)),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Eof => {
                    if conn.read.is_empty() && ready!(conn.poll_fill(cx)).map_err(H1Error::Io)? == 0
                    {
                        self.decoder = Decoder::Done;
                        return Poll::Ready(None);
                    }
                    let data = conn.read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Chunked(Chunk::Size) => match chunk_size(&conn.read)? {
                    Some((line, size)) => {
                        conn.read.advance(line);
                        self.decoder = Decoder::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                    }
                    None => ready!(conn.fill_or_fail(cx, MAX_CHUNK_LINE))?,
                },
                Decoder::Chunked(Chunk::DataEnd) => {
                    if conn.read.len() >= 2 {
                        if &conn.read[..2] != b"\r\n" {
                            return Poll::Ready(Some(Err(H1Error::Malformed(
                                "chunk not followed by CRLF",
                            ))));
                        }
                        conn.read.advance(2);
                        self.decoder = Decoder::Chunked(Chunk::Size);
                    } else {
                        ready!(conn.fill_or_fail(cx, 2))?;
                    }
                }
                Decoder::Chunked(Chunk::Trailers) => {
                    if conn.read.starts_with(b"\r\n") {
                        conn.read.advance(2);
                        self.decoder = Decoder::Done;
                        return Poll::Ready(None);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; 64];
                    match httparse::parse_headers(&conn.read, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields.iter() {
                                let name = HeaderName::from_bytes(field.name.as_bytes());
                                let value = HeaderValue::from_bytes(field.value);
                                match (name, value) {
                                    (Ok(name), Ok(value)) => {
                                        trailers.append(name, value);
                                    }
                                    _ => {
                                        return Poll::Ready(Some(Err(H1Error::Malformed(
                                            "invalid trailer field",
                                        ))))
                                    }
                                }
                            }
                            conn.read.advance(len);
                            self.decoder = Decoder::Done;
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) => {
                            ready!(conn.fill_or_fail(cx, MAX_TRAILERS))?
                        }
                        Err(_) => {
                            return Poll::Ready(Some(Err(H1Error::Malformed("invalid trailers"))))
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done | Decoder::Upgrade)
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done | Decoder::Upgrade => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// The connection, if the exchange ended cleanly and it can carry the next one.
    pub(crate) fn into_reusable(self) -> Option<H1Conn> {
        let conn = self.conn;
        let clean = self.decoder == Decoder::Done
            && conn.reusable
            && conn.sending.is_none()
            && conn.write.is_empty()
            && conn.write_frame.is_none()
            && !conn.unflushed
            // Bytes after the response: the server's framing and this side's disagree.
            && conn.read.is_empty();
        clean.then_some(conn)
    }

    /// The socket of a `101 Switching Protocols` response, with what was read past its head.
    pub(crate) fn into_upgraded(self) -> Option<Upgraded> {
        (self.decoder == Decoder::Upgrade)
            .then(|| crate::prefixed::Prefixed::new(self.conn.read, self.conn.io))
    }
}

impl fmt::Debug for H1Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Body")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

/// A chunk-size line at the start of `read`: its length with the CRLF, and the size.
fn chunk_size(read: &[u8]) -> Result<Option<(usize, u64)>, H1Error> {
    let Some(lf) = read.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = &read[..lf];
    let line = line
        .strip_suffix(b"\r")
        .ok_or(H1Error::Malformed("chunk size line without CRLF"))?;
    // The size, then optional chunk extensions after `;` (ignored; RFC 9112 7.1.1).
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 15 {
        return Err(H1Error::Malformed("invalid chunk size"));
    }
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b < 0x20 && b != b'\t') {
        return Err(H1Error::Malformed("invalid chunk size"));
    }
    let size = digits.iter().fold(0u64, |n, &d| {
        n << 4 | u64::from((d as char).to_digit(16).expect("hex digit"))
    });
    Ok(Some((lf + 1, size)))
}

/// The upstream side of a switched-protocol connection (WebSocket): the bytes read past the 101's
/// head, then the socket.
pub type Upgraded = crate::prefixed::Prefixed<UpstreamIo>;

impl ReadReadiness for UpstreamIo {
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            UpstreamIo::Tcp(s) => s.poll_read_hint(cx),
            UpstreamIo::Tls(s) => s.poll_read_hint(cx),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connection, and the server's end of it, which each test scripts byte by byte.
    async fn pair() -> (H1Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (
            H1Conn::new(UpstreamIo::Tcp(client.unwrap())),
            accepted.unwrap().0,
        )
    }

    /// Reads from the server's end until what was read ends with `end`.
    async fn read_until(server: &mut TcpStream, end: &[u8]) -> String {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(end) {
            assert_eq!(
                server.read(&mut byte).await.unwrap(),
                1,
                "client closed early"
            );
            got.push(byte[0]);
        }
        String::from_utf8(got).unwrap()
    }

    fn get(path: &str) -> Request<UpstreamBody> {
        Request::get(path)
            .header("host", "backend.test")
            .body(crate::body::empty())
            .unwrap()
    }

    /// The body's data and trailers.
    async fn collect(body: &mut H1Body) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = poll_fn(|cx| body.poll_frame(cx)).await {
            match frame?.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok((data, trailers))
    }

    /// Sends `req` on `conn`; the server answers `response` once it has read the request head.
    async fn exchange(
        conn: H1Conn,
        server: &mut TcpStream,
        req: Request<UpstreamBody>,
        response: &[u8],
    ) -> (Result<Answer, SendError>, String) {
        exchange_with(conn, server, req, None, response).await
    }

    /// `exchange`, for a plain request with `fields`.
    async fn exchange_with(
        conn: H1Conn,
        server: &mut TcpStream,
        req: Request<UpstreamBody>,
        fields: Option<&WireFields>,
        response: &[u8],
    ) -> (Result<Answer, SendError>, String) {
        let respond = async {
            let head = read_until(server, b"\r\n\r\n").await;
            server.write_all(response).await.unwrap();
            head
        };
        tokio::join!(conn.send(req, fields, false), respond)
    }

    fn sent(result: Result<Answer, SendError>) -> Response<H1Body> {
        match result {
            Ok((response, _)) => response,
            Err(SendError::NotSent(_, e) | SendError::Sent(e, _)) => panic!("exchange failed: {e}"),
        }
    }

    #[tokio::test]
    async fn a_response_with_a_length_is_read_and_its_connection_reused() {
        let (conn, mut server) = pair().await;
        let mut req = get("/a?b=c");
        req.headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let (result, head) = exchange(
            conn,
            &mut server,
            req,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\nX-Up: 2\r\n\r\nhello",
        )
        .await;
        assert_eq!(
            head,
            "GET /a?b=c HTTP/1.1\r\nhost: backend.test\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
        let mut response = sent(result);
        assert_eq!(response.status(), StatusCode::OK);
        let values: Vec<_> = response.headers().get_all("x-up").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(response.body().size_hint().exact(), Some(5));
        let (data, trailers) = collect(response.body_mut()).await.unwrap();
        assert_eq!(data, b"hello");
        assert!(trailers.is_none());
        let conn = response.into_body().into_reusable().expect("reusable");

        // The same connection carries the next exchange.
        let (result, head) = exchange(
            conn,
            &mut server,
            get("/next"),
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno",
        )
        .await;
        assert!(head.starts_with("GET /next HTTP/1.1\r\n"));
        let mut response = sent(result);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(collect(response.body_mut()).await.unwrap().0, b"no");
    }

    #[tokio::test]
    async fn a_chunked_response_is_decoded_with_its_trailers() {
        let (conn, mut server) = pair().await;
        let (result, _) = exchange(
            conn,
            &mut server,
            get("/"),
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\ngrpc-status: 0\r\n\r\n",
        )
        .await;
        let mut response = sent(result);
        let (data, trailers) = collect(response.body_mut()).await.unwrap();
        assert_eq!(data, b"hello, world");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        assert!(response.into_body().into_reusable().is_some());
    }

    #[tokio::test]
    async fn a_chunked_response_split_across_reads_is_decoded() {
        let (conn, mut server) = pair().await;
        let body = async {
            let head = read_until(&mut server, b"\r\n\r\n").await;
            for piece in [
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"[..],
                b"\r\n1",
                b"0\r\n0123456789abc",
                b"def\r",
                b"\n0\r",
                b"\n\r\n",
            ] {
                server.write_all(piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            head
        };
        let exchange = async {
            let mut response = sent(conn.send(get("/"), None, false).await);
            let data = collect(response.body_mut()).await.unwrap().0;
            (data, response.into_body().into_reusable().is_some())
        };
        let (_, (data, reusable)) = tokio::join!(body, exchange);
        assert_eq!(data, b"0123456789abcdef");
        assert!(reusable);
    }

    #[tokio::test]
    async fn a_response_without_length_lasts_until_close_and_ends_the_connection() {
        let (conn, mut server) = pair().await;
        let (result, _) = exchange(
            conn,
            &mut server,
            get("/"),
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nstreamed ",
        )
        .await;
        let mut response = sent(result);
        assert!(!response.body().is_end_stream());
        let finish = async {
            server.write_all(b"until close").await.unwrap();
            drop(server);
        };
        let (collected, ()) = tokio::join!(collect(response.body_mut()), finish);
        assert_eq!(collected.unwrap().0, b"streamed until close");
        assert!(response.into_body().into_reusable().is_none());
    }

    #[tokio::test]
    async fn head_204_and_304_responses_have_no_body_whatever_their_length_says() {
        let (mut conn, mut server) = pair().await;
        for (req, response) in [
            (
                Request::head("/")
                    .header("host", "h")
                    .body(crate::body::empty())
                    .unwrap(),
                &b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"[..],
            ),
            (get("/"), b"HTTP/1.1 204 No Content\r\n\r\n"),
            (
                get("/"),
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            ),
        ] {
            let (result, _) = exchange(conn, &mut server, req, response).await;
            let response = sent(result);
            assert!(response.body().is_end_stream(), "{}", response.status());
            // Nothing was read as a body: the connection is clean for the next exchange.
            conn = response.into_body().into_reusable().expect("reusable");
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (conn, mut server) = pair().await;
        let (result, _) = exchange(
            conn,
            &mut server,
            get("/"),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let response = sent(result);
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(response.headers().get("link").is_none());
        assert!(response.into_body().into_reusable().is_some());
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_end_the_connection_after_the_exchange() {
        for (response, reusable) in [
            (
                &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nconnection: x, Close\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
            (
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
                true,
            ),
        ] {
            // A plain request's response reads its connection options from its lines.
            let plain = WireFields::request(Bytes::from_static(b"x-plain: 1\r\n"));
            for fields in [None, Some(&plain)] {
                let (conn, mut server) = pair().await;
                let (result, head) =
                    exchange_with(conn, &mut server, get("/"), fields, response).await;
                assert_eq!(head.contains("x-plain: 1\r\n"), fields.is_some(), "{head}");
                let (response_head, lines) = result.as_ref().ok().unwrap();
                // `connection: x, Close` names a field: that response gets a whole map.
                let all_lines = lines.as_ref().and_then(|l| l.framing).is_some();
                assert_eq!(
                    all_lines,
                    fields.is_some() && !response_head.headers().contains_key("connection"),
                );
                let reused = sent(result).into_body().into_reusable().is_some();
                let text = String::from_utf8_lossy(response);
                assert_eq!(reused, reusable, "{text}, plain: {}", fields.is_some());
            }
        }
    }

    /// The body of a plain request's response is delimited by the length among its lines, or by the
    /// end of the connection when it has none.
    #[tokio::test]
    async fn a_plain_response_is_delimited_by_the_length_among_its_lines() {
        let plain = WireFields::request(Bytes::from_static(b"x-plain: 1\r\n"));
        for (response, body, reusable) in [
            (
                &b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\n\r\nhelloXX"[..],
                &b"hello"[..],
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                b"ok",
                true,
            ),
        ] {
            let (conn, mut server) = pair().await;
            let (result, _) =
                exchange_with(conn, &mut server, get("/"), Some(&plain), response).await;
            let (mut head, lines) = result.ok().unwrap();
            assert!(head.headers().is_empty(), "all fields are lines");
            let lines = lines.unwrap();
            let expected = match response.starts_with(b"HTTP/1.1 200 OK\r\nServer") {
                true => &b"Server: s\r\n"[..],
                false => b"",
            };
            assert_eq!(lines.lines, expected);
            assert_eq!(lines.framing.unwrap().length, Some(body.len() as u64));
            let data = collect(head.body_mut()).await.unwrap().0;
            assert_eq!(data, body);
            // Bytes after the declared length are stray: the connection is not reused.
            assert_eq!(head.into_body().into_reusable().is_some(), reusable);
        }
        let (conn, mut server) = pair().await;
        let respond = async {
            read_until(&mut server, b"\r\n\r\n").await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\nuntil close")
                .await
                .unwrap();
            drop(server);
        };
        let (result, ()) = tokio::join!(conn.send(get("/"), Some(&plain), false), respond);
        let (mut head, _) = result.ok().unwrap();
        assert_eq!(collect(head.body_mut()).await.unwrap().0, b"until close");
        assert!(head.into_body().into_reusable().is_none());
    }

    #[tokio::test]
    async fn ambiguous_or_malformed_responses_are_errors_not_guesses() {
        let bad_heads: [&[u8]; 9] = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-folded: a\r\n b\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        ];
        for response in bad_heads {
            let (conn, mut server) = pair().await;
            let (result, _) = exchange(conn, &mut server, get("/"), response).await;
            match result {
                Err(SendError::Sent(H1Error::Malformed(_), _)) => {}
                Err(SendError::Sent(e, _)) => panic!("{e}"),
                _ => panic!("accepted: {}", String::from_utf8_lossy(response)),
            }
        }
        let bad_bodies: [&[u8]; 4] = [
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
        ];
        for chunks in bad_bodies {
            let (conn, mut server) = pair().await;
            let response = [
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                chunks,
            ]
            .concat();
            let (result, _) = exchange(conn, &mut server, get("/"), &response).await;
            let mut response = sent(result);
            match collect(response.body_mut()).await {
                Err(H1Error::Malformed(_)) => {}
                other => panic!(
                    "{}: {:?}",
                    String::from_utf8_lossy(chunks),
                    other.map(|d| d.0)
                ),
            }
            assert!(response.into_body().into_reusable().is_none());
        }
    }

    #[tokio::test]
    async fn a_response_head_is_bounded() {
        let (conn, mut server) = pair().await;
        let mut response = b"HTTP/1.1 200 OK\r\n".to_vec();
        while response.len() <= MAX_HEAD {
            response
                .extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let respond = async {
            read_until(&mut server, b"\r\n\r\n").await;
            // The client stops reading; a write that cannot finish is not an error here.
            let _ = server.write_all(&response).await;
        };
        let (result, ()) = tokio::join!(conn.send(get("/"), None, false), respond);
        assert!(matches!(
            result,
            Err(SendError::Sent(H1Error::Malformed(_), _))
        ));
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let (conn, mut server) = pair().await;
        let (result, _) = exchange(
            conn,
            &mut server,
            get("/"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf",
        )
        .await;
        let mut response = sent(result);
        drop(server);
        assert!(matches!(
            collect(response.body_mut()).await,
            Err(H1Error::Closed(_))
        ));
    }

    #[tokio::test]
    async fn stray_bytes_after_a_response_end_the_connection() {
        let (conn, mut server) = pair().await;
        let (result, _) = exchange(
            conn,
            &mut server,
            get("/"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        )
        .await;
        let mut response = sent(result);
        assert_eq!(collect(response.body_mut()).await.unwrap().0, b"ok");
        assert!(response.into_body().into_reusable().is_none());
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_gives_the_request_back_unsent() {
        let (conn, mut server) = pair().await;
        let (result, _) = exchange(
            conn,
            &mut server,
            get("/"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let conn = sent(result).into_body().into_reusable().unwrap();
        drop(server);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut req = get("/again");
        req.headers_mut()
            .insert("x-id", HeaderValue::from_static("42"));
        match conn.send(req, None, false).await {
            Err(SendError::NotSent(req, H1Error::Closed(_))) => {
                assert_eq!(req.uri(), "/again");
                assert_eq!(req.headers()["x-id"], "42");
            }
            _ => panic!("the request did not come back"),
        }
    }

    /// A body of `pieces`, one frame each, with no length known in advance.
    fn streamed(pieces: &'static [&'static [u8]]) -> UpstreamBody {
        let frames = pieces
            .iter()
            .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p))));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_their_length_or_chunked() {
        // No length known: chunked, small and large frames alike.
        static LARGE: [u8; COPY_LIMIT + 1] = [b'x'; COPY_LIMIT + 1];
        static PIECES: [&[u8]; 3] = [b"hello", b"", &LARGE];
        let (conn, mut server) = pair().await;
        let req = Request::post("/upload")
            .header("host", "h")
            .body(streamed(&PIECES))
            .unwrap();
        let respond = async {
            let head = read_until(&mut server, b"\r\n\r\n").await;
            let body = read_until(&mut server, b"0\r\n\r\n").await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            (head, body)
        };
        let (result, (head, body)) = tokio::join!(conn.send(req, None, false), respond);
        assert!(
            head.ends_with("transfer-encoding: chunked\r\n\r\n"),
            "{head}"
        );
        let large = String::from_utf8(LARGE.to_vec()).unwrap();
        assert_eq!(body, format!("5\r\nhello\r\n2001\r\n{large}\r\n0\r\n\r\n"));
        let conn = sent(result).into_body().into_reusable().expect("reusable");

        // A declared length: the body as it is.
        let req = Request::put("/put")
            .header("host", "h")
            .header("content-length", "5")
            .body(streamed(&[b"he", b"llo"]))
            .unwrap();
        let respond = async {
            let head = read_until(&mut server, b"\r\n\r\n").await;
            let body = read_until(&mut server, b"hello").await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            (head, body)
        };
        let (result, (head, body)) = tokio::join!(conn.send(req, None, false), respond);
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert_eq!(body, "hello");
        let conn = sent(result).into_body().into_reusable().expect("reusable");

        // An empty POST says so; an empty GET says nothing.
        let req = Request::post("/empty")
            .header("host", "h")
            .body(crate::body::empty())
            .unwrap();
        let (result, head) = exchange(
            conn,
            &mut server,
            req,
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(
            head,
            "POST /empty HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
        );
        let conn = sent(result).into_body().into_reusable().unwrap();
        let (_, head) = exchange(
            conn,
            &mut server,
            get("/"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(head, "GET / HTTP/1.1\r\nhost: backend.test\r\n\r\n");
    }

    #[tokio::test]
    async fn a_body_longer_than_its_length_fails_the_exchange() {
        let (conn, mut server) = pair().await;
        let req = Request::put("/")
            .header("host", "h")
            .header("content-length", "3")
            .body(streamed(&[b"toolong"]))
            .unwrap();
        let server_side = async {
            read_until(&mut server, b"\r\n\r\n").await;
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
            rest
        };
        let (result, rest) = tokio::join!(conn.send(req, None, false), server_side);
        assert!(matches!(
            result,
            Err(SendError::Sent(H1Error::RequestBody(_), None))
        ));
        assert!(rest.is_empty(), "nothing past the length was written");
    }

    #[tokio::test]
    async fn an_early_response_arrives_while_the_body_is_still_being_sent() {
        let (conn, mut server) = pair().await;
        // A body that never ends, like an upload the server refuses at once.
        let never = futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        let req = Request::post("/upload")
            .header("host", "h")
            .body(http_body_util::StreamBody::new(never).boxed_unsync())
            .unwrap();
        let respond = async {
            read_until(&mut server, b"\r\n\r\n").await;
            server
                .write_all(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbig")
                .await
                .unwrap();
        };
        let (result, ()) = tokio::join!(conn.send(req, None, false), respond);
        let mut response = sent(result);
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(collect(response.body_mut()).await.unwrap().0, b"big");
        assert!(response.into_body().into_reusable().is_none());
    }

    #[tokio::test]
    async fn an_upgrade_hands_over_the_socket_with_the_bytes_read_past_the_head() {
        let (conn, mut server) = pair().await;
        let mut req = get("/ws");
        req.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        req.headers_mut()
            .insert("upgrade", HeaderValue::from_static("echo"));
        let respond = async {
            read_until(&mut server, b"\r\n\r\n").await;
            // The new protocol's first bytes come in the same write as the 101.
            server
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\nfirst")
                .await
                .unwrap();
        };
        let (result, ()) = tokio::join!(conn.send(req, None, true), respond);
        let response = sent(result);
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = response.into_body().into_upgraded().expect("upgraded");
        let mut buf = [0u8; 5];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"first");
        io.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.unwrap();
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }

    #[test]
    fn lengths_and_chunk_sizes_parse_strictly() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"42, 42"), Some(42));
        for bad in [
            &b""[..],
            b"4 2",
            b"+1",
            b"42, 43",
            b"99999999999999999999",
            b",",
        ] {
            assert_eq!(parse_length(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(chunk_size(b"1a\r\n").unwrap(), Some((4, 26)));
        assert_eq!(chunk_size(b"A ; name=\"v\"\r\n").unwrap(), Some((14, 10)));
        assert_eq!(chunk_size(b"1a").unwrap(), None);
        for bad in [&b"\r\n"[..], b" 1\r\n", b"1 x\r\n", b"-1\r\n", b"1\n"] {
            assert!(chunk_size(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut out = Vec::new();
        push_hex(&mut out, 0x2001);
        out.push(b' ');
        push_decimal(&mut out, 1_234_567_890);
        out.push(b' ');
        push_decimal(&mut out, 0);
        assert_eq!(out, b"2001 1234567890 0");
    }
}
