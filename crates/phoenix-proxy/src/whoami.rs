//! `whoami`: a small backend for demos and tests that answers with what it received.
//!
//! It speaks HTTP/1.1 and HTTP/2 cleartext with prior knowledge (h2c) on one listener, so the mesh
//! can be tested against `http://` and `h2c://` servers alike. Every streaming endpoint produces its
//! body a piece at a time and never buffers, so tests can see whether a proxy in front of it streams
//! too. Endpoints:
//!
//! | request | answer |
//! |---|---|
//! | any path | JSON `{name, method, path, query, host, version, headers, client, body_bytes}` |
//! | `/health` | `200 ok` |
//! | `/sse?count=N&interval=MS` | `text/event-stream`, one event every `interval` ms, `count` events |
//! | `/ndjson?count=N&interval=MS` | `application/x-ndjson`, one JSON line every `interval` ms |
//! | `/ws` | WebSocket echo of text and binary messages |
//! | `/delay/N` | the JSON answer after `N` seconds (fractions allowed) |
//! | `/status/N` | status `N` |
//! | `/bytes/N` | `N` bytes, streamed in chunks |
//! | `/echo` | the request body streamed back as it arrives |
//! | `content-type: application/grpc*`, any path | every gRPC message echoed as it arrives, then trailers `grpc-status: 0` |
//!
//! Every response carries `x-whoami-name: <name>`, so load-balancing tests can count servers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Header carrying the server's name on every response.
pub const NAME_HEADER: &str = "x-whoami-name";

/// How long in-flight requests may run on after shutdown before the server returns anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds on the streaming endpoints' parameters, so a typo cannot make a stream run for days.
const MAX_EVENTS: u64 = 1_000_000;
const MAX_INTERVAL_MS: u64 = 60_000;
const MAX_DELAY_SECS: f64 = 3600.0;
/// Size of the chunks `/bytes/N` is sent in.
const CHUNK: usize = 16 * 1024;
static FILL: [u8; CHUNK] = [b'x'; CHUNK];

struct State {
    name: String,
    name_header: Option<HeaderValue>,
    shutdown: CancellationToken,
}

/// Serves until `shutdown` is cancelled, then stops accepting, lets running requests finish (at most
/// five seconds; HTTP/2 connections get a GOAWAY) and returns.
pub async fn serve(
    listener: TcpListener,
    name: String,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = Arc::new(State {
        name_header: HeaderValue::from_str(&name).ok(),
        name,
        shutdown: shutdown.clone(),
    });
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_millis(5);
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::debug!(error = %e, "whoami accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| handle(req, peer, state.clone()));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "whoami connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("whoami drain timed out; remaining connections are dropped");
    }
    Ok(())
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: Arc<State>,
) -> Result<Response<Body>, Infallible> {
    let mut response = route(req, peer, &state).await;
    if let Some(name) = &state.name_header {
        response
            .headers_mut()
            .insert(HeaderName::from_static(NAME_HEADER), name.clone());
    }
    Ok(response)
}

async fn route(req: Request<Incoming>, peer: SocketAddr, state: &State) -> Response<Body> {
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc {
        return grpc_echo(req);
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    match path.as_str() {
        "/health" => text(StatusCode::OK, "ok\n"),
        "/sse" => ticker(query.as_deref(), state, Format::Sse),
        "/ndjson" => ticker(query.as_deref(), state, Format::NdJson),
        "/ws" => websocket(req, state),
        "/echo" => echo(req),
        _ => {
            if let Some(n) = path.strip_prefix("/delay/") {
                return delay(n, req, peer, state).await;
            }
            if let Some(n) = path.strip_prefix("/status/") {
                return status(n, req.method());
            }
            if let Some(n) = path.strip_prefix("/bytes/") {
                return bytes(n);
            }
            describe(req, peer, state).await
        }
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

fn headers_json(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        map.entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    map
}

/// The default answer: what was received. The body is read (and counted, not kept) first so that a
/// client uploading to any path gets its answer after the upload, as from a real backend.
async fn describe(req: Request<Incoming>, peer: SocketAddr, state: &State) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body failed: {e}\n"),
                )
            }
        }
    }
    let host = parts
        .headers
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    json_response(&serde_json::json!({
        "name": state.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "host": host,
        "version": version_name(parts.version),
        "headers": headers_json(&parts.headers),
        "client": peer.to_string(),
        "body_bytes": body_bytes,
    }))
}

fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Copy)]
enum Format {
    Sse,
    NdJson,
}

/// `/sse` and `/ndjson`: `count` events, the first at once, then one every `interval` ms. Each event
/// is its own body frame, so hyper writes it to the socket as soon as it is produced.
fn ticker(query: Option<&str>, state: &State, format: Format) -> Response<Body> {
    let parse = |key: &str, default: u64, max: u64| -> Result<u64, String> {
        match query_param(query, key) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= max => Ok(n),
                _ => Err(format!("{key} must be an integer from 0 to {max}\n")),
            },
        }
    };
    let (count, interval) = match (
        parse("count", 5, MAX_EVENTS),
        parse("interval", 200, MAX_INTERVAL_MS),
    ) {
        (Ok(c), Ok(i)) => (c, Duration::from_millis(i)),
        (Err(message), _) | (_, Err(message)) => return text(StatusCode::BAD_REQUEST, message),
    };
    let name = state.name.clone();
    let shutdown = state.shutdown.clone();
    let events = futures_util::stream::unfold(0u64, move |n| {
        let name = name.clone();
        let shutdown = shutdown.clone();
        async move {
            if n >= count {
                return None;
            }
            if n > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
            let data = serde_json::json!({ "n": n, "name": name, "time_ms": unix_millis() });
            let chunk = match format {
                Format::Sse => format!("id: {n}\nevent: tick\ndata: {data}\n\n"),
                Format::NdJson => format!("{data}\n"),
            };
            Some((Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))), n + 1))
        }
    });
    let mut response = Response::new(StreamBody::new(events).boxed_unsync());
    let content_type = match format {
        Format::Sse => "text/event-stream",
        Format::NdJson => "application/x-ndjson",
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `/echo`: the request body is the response body, so each piece goes back as it arrives.
fn echo(req: Request<Incoming>) -> Response<Body> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let mut response = Response::new(req.into_body().map_err(BoxError::from).boxed_unsync());
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

async fn delay(
    arg: &str,
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &State,
) -> Response<Body> {
    let seconds = match arg.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=MAX_DELAY_SECS).contains(&s) => s,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("delay must be seconds from 0 to {MAX_DELAY_SECS}\n"),
            )
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(seconds)) => describe(req, peer, state).await,
        _ = state.shutdown.cancelled() => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

fn status(arg: &str, method: &Method) -> Response<Body> {
    let code = match arg
        .parse::<u16>()
        .ok()
        .and_then(|n| StatusCode::from_u16(n).ok())
    {
        // 1xx are not final answers; hyper could not send them as one.
        Some(code) if (200..=599).contains(&code.as_u16()) => code,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "status must be a number from 200 to 599\n",
            )
        }
    };
    if code == StatusCode::NO_CONTENT || code == StatusCode::NOT_MODIFIED || method == Method::HEAD
    {
        let mut response = Response::new(empty());
        *response.status_mut() = code;
        return response;
    }
    text(
        code,
        format!(
            "{} {}\n",
            code.as_u16(),
            code.canonical_reason().unwrap_or("")
        ),
    )
}

/// `/bytes/N`: `N` bytes of `x` in 16 KiB frames, with a Content-Length.
fn bytes(arg: &str) -> Response<Body> {
    let Ok(total) = arg.parse::<u64>() else {
        return text(
            StatusCode::BAD_REQUEST,
            "bytes must be a non-negative integer\n",
        );
    };
    let chunks = futures_util::stream::unfold(total, |left| async move {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK as u64) as usize;
        Some((
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(&FILL[..n]))),
            left - n as u64,
        ))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// `/ws`: answers the RFC 6455 handshake, then echoes text and binary messages on the upgraded
/// connection until the client closes it or the server shuts down.
fn websocket(req: Request<Incoming>, state: &State) -> Response<Body> {
    let has_token = |name: HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(key), true, true, true) = (
        key,
        has_token(header::UPGRADE, "websocket"),
        has_token(header::CONNECTION, "upgrade"),
        version_ok,
    ) else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade, Sec-WebSocket-Key, \
             Sec-WebSocket-Version: 13)\n",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "whoami websocket upgrade failed");
                return;
            }
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        loop {
            let message = tokio::select! {
                m = ws.next() => m,
                _ = shutdown.cancelled() => {
                    let _ = ws.close(None).await;
                    return;
                }
            };
            let reply = match message {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => m,
                // Pings are answered by tungstenite itself; a close is acknowledged by it too.
                Some(Ok(Message::Close(_))) | None => return,
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "whoami websocket read failed");
                    return;
                }
            };
            if let Err(e) = ws.send(reply).await {
                tracing::debug!(error = %e, "whoami websocket write failed");
                return;
            }
        }
    });
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    response
}

/// Tracks gRPC length-prefixed message boundaries (1 byte flag, 4 bytes big-endian length, payload)
/// across body frames, so the echo can tell whether the request ended cleanly between messages.
#[derive(Debug, Default)]
struct GrpcFraming {
    prefix: [u8; 5],
    prefix_len: usize,
    payload_left: u64,
    messages: u64,
}

impl GrpcFraming {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len() as u64);
                self.payload_left -= n;
                data = &data[n as usize..];
                if self.payload_left == 0 {
                    self.messages += 1;
                }
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                if len == 0 {
                    self.messages += 1;
                } else {
                    self.payload_left = u64::from(len);
                }
            }
        }
    }

    fn between_messages(&self) -> bool {
        self.prefix_len == 0 && self.payload_left == 0
    }
}

/// gRPC echo on any path: every data frame of the request goes straight back (the bytes are the
/// length-prefixed messages, so messages are echoed as they arrive, unary and streaming alike), and the
/// response ends with `grpc-status: 0` trailers - or 13 if the request stopped inside a message.
fn grpc_echo(req: Request<Incoming>) -> Response<Body> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let encoding = req.headers().get("grpc-encoding").cloned();
    let body = req.into_body();
    let frames =
        futures_util::stream::unfold(Some((body, GrpcFraming::default())), |state| async move {
            let (mut body, mut framing) = state?;
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            framing.feed(&data);
                            return Some((Ok(Frame::data(data)), Some((body, framing))));
                        }
                        // Request trailers carry nothing the echo needs.
                        Err(_trailers) => continue,
                    },
                    Some(Err(e)) => return Some((Err(BoxError::from(e)), None)),
                    None => {
                        let mut trailers = HeaderMap::new();
                        if framing.between_messages() {
                            trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        } else {
                            trailers.insert("grpc-status", HeaderValue::from_static("13"));
                            trailers.insert(
                                "grpc-message",
                                HeaderValue::from_static("request ended inside a message"),
                            );
                        }
                        tracing::debug!(messages = framing.messages, "whoami grpc echo finished");
                        return Some((Ok(Frame::trailers(trailers)), None));
                    }
                }
            }
        });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/grpc")),
    );
    if let Some(encoding) = encoding {
        headers.insert("grpc-encoding", encoding);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_framing_follows_messages_split_across_frames() {
        let mut framing = GrpcFraming::default();
        // Two messages: 3 bytes and 0 bytes, fed in awkward pieces.
        let wire = [0u8, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0];
        framing.feed(&wire[..2]);
        assert!(!framing.between_messages());
        framing.feed(&wire[2..6]);
        assert!(!framing.between_messages());
        framing.feed(&wire[6..8]);
        assert!(framing.between_messages());
        assert_eq!(framing.messages, 1);
        framing.feed(&wire[8..]);
        assert!(framing.between_messages());
        assert_eq!(framing.messages, 2);
        framing.feed(&[0, 0, 0, 1]);
        assert!(!framing.between_messages());
    }

    #[test]
    fn query_params_are_found_by_key() {
        assert_eq!(
            query_param(Some("count=3&interval=10"), "interval"),
            Some("10")
        );
        assert_eq!(query_param(Some("xcount=3"), "count"), None);
        assert_eq!(query_param(None, "count"), None);
    }
}
