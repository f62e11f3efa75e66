//! End-to-end tests of the whoami backend: a real server on 127.0.0.1:0, real clients (reqwest,
//! hyper HTTP/1.1 and HTTP/2 prior knowledge, tokio-tungstenite).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_proxy::whoami;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

type ClientBody = UnsyncBoxBody<Bytes, Infallible>;

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(name: &str) -> Server {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(whoami::serve(listener, name.to_owned(), shutdown.clone()));
    Server {
        addr,
        shutdown,
        task,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A request body fed from a channel, so a test can send pieces one at a time.
fn channel_body() -> (mpsc::Sender<Bytes>, ClientBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    (tx, StreamBody::new(stream).boxed_unsync())
}

fn full(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into()).boxed_unsync()
}

async fn h1_sender(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<ClientBody> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h2c_sender(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<ClientBody> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Reads the next data frame, skipping none; panics on trailers or end.
async fn next_data(body: &mut Incoming) -> Bytes {
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("a frame within 5s")
        .expect("body not finished")
        .unwrap();
    frame.into_data().expect("a data frame")
}

fn grpc_message(payload: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

#[tokio::test]
async fn any_path_answers_with_what_was_received() {
    let server = start("alpha").await;
    let response = client()
        .post(format!("http://{}/some/path?x=1&y=two", server.addr))
        .header("x-test", "one")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[whoami::NAME_HEADER], "alpha");
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["name"], "alpha");
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/some/path");
    assert_eq!(json["query"], "x=1&y=two");
    assert_eq!(json["host"], server.addr.to_string());
    assert_eq!(json["version"], "HTTP/1.1");
    assert_eq!(json["headers"]["x-test"], serde_json::json!(["one"]));
    assert_eq!(json["headers"]["x-multi"], serde_json::json!(["a", "b"]));
    assert_eq!(json["body_bytes"], 1000);
    let client_addr: SocketAddr = json["client"].as_str().unwrap().parse().unwrap();
    assert_eq!(client_addr.ip().to_string(), "127.0.0.1");
}

#[tokio::test]
async fn health_status_and_bytes() {
    let server = start("beta").await;
    let c = client();
    let base = format!("http://{}", server.addr);

    let health = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok\n");

    let teapot = c.get(format!("{base}/status/418")).send().await.unwrap();
    assert_eq!(teapot.status().as_u16(), 418);
    let no_content = c.get(format!("{base}/status/204")).send().await.unwrap();
    assert_eq!(no_content.status(), StatusCode::NO_CONTENT);
    assert!(no_content.bytes().await.unwrap().is_empty());
    let unavailable = c.get(format!("{base}/status/503")).send().await.unwrap();
    assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    for bad in ["/status/99", "/status/600", "/status/x"] {
        assert_eq!(
            c.get(format!("{base}{bad}")).send().await.unwrap().status(),
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }

    let bytes = c.get(format!("{base}/bytes/100000")).send().await.unwrap();
    assert_eq!(bytes.content_length(), Some(100_000));
    let body = bytes.bytes().await.unwrap();
    assert_eq!(body.len(), 100_000);
    assert!(body.iter().all(|b| *b == b'x'));
    let zero = c
        .get(format!("{base}/bytes/0"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(zero.is_empty());
}

#[tokio::test]
async fn delay_waits_then_answers() {
    let server = start("gamma").await;
    let started = Instant::now();
    let response = client()
        .get(format!("http://{}/delay/0.3", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let json: serde_json::Value = response.json().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(json["path"], "/delay/0.3");
    let bad = client()
        .get(format!("http://{}/delay/-1", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_while_the_stream_is_still_open() {
    let server = start("sse").await;
    let started = Instant::now();
    let response = client()
        .get(format!("http://{}/sse?count=3&interval=700", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        arrivals.push(started.elapsed());
    }
    // The first event came long before the last was written: the stream was not buffered.
    assert!(
        arrivals[0] < Duration::from_millis(600),
        "first event after {:?}",
        arrivals[0]
    );
    assert!(
        *arrivals.last().unwrap() >= Duration::from_millis(1400),
        "{arrivals:?}"
    );
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    for (n, event) in events.iter().enumerate() {
        assert!(
            event.starts_with(&format!("id: {n}\nevent: tick\ndata: ")),
            "{event}"
        );
        let data: serde_json::Value =
            serde_json::from_str(event.rsplit("data: ").next().unwrap()).unwrap();
        assert_eq!(data["n"], n);
        assert_eq!(data["name"], "sse");
    }
}

#[tokio::test]
async fn ndjson_lines_stream() {
    let server = start("nd").await;
    let started = Instant::now();
    let response = client()
        .get(format!(
            "http://{}/ndjson?count=4&interval=600",
            server.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["n"], 3);
    let bad = client()
        .get(format!("http://{}/ndjson?count=x", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn echo_streams_the_body_back_as_it_arrives() {
    let server = start("echo").await;
    let mut sender = h1_sender(server.addr).await;
    let (tx, body) = channel_body();
    let request = Request::post("/echo")
        .header("host", "echo.test")
        .header("content-type", "text/x-test")
        .body(body)
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/x-test");
    let mut body = response.into_body();
    // Each piece comes back before the next one is sent: nothing waits for the whole body.
    for piece in ["first piece", "second piece", "third"] {
        tx.send(Bytes::from(piece)).await.unwrap();
        assert_eq!(next_data(&mut body).await, piece);
    }
    drop(tx);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let server = start("h2").await;
    let mut sender = h2c_sender(server.addr).await;
    let request = Request::get(format!(
        "http://app.phoenix.test:{}/h2/path",
        server.addr.port()
    ))
    .body(full(Bytes::new()))
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(json["path"], "/h2/path");
    assert_eq!(
        json["host"],
        format!("app.phoenix.test:{}", server.addr.port())
    );
}

#[tokio::test]
async fn websocket_echoes_text_and_binary() {
    let server = start("ws").await;
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()[whoami::NAME_HEADER], "ws");
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.send(Message::Ping(Bytes::from_static(b"p")))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong(Bytes::from_static(b"p"))
    );
    ws.close(None).await.unwrap();
    // The server acknowledges the close and ends the stream.
    while let Some(m) = ws.next().await {
        if let Ok(Message::Close(_)) | Err(_) = m {
            break;
        }
    }

    let plain = client()
        .get(format!("http://{}/ws", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn grpc_unary_echo_ends_with_trailers() {
    let server = start("grpc").await;
    let mut sender = h2c_sender(server.addr).await;
    let message = grpc_message(b"unary payload");
    let request = Request::post(format!(
        "http://127.0.0.1:{}/echo.Echo/Unary",
        server.addr.port()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(full(message.clone()))
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let collected = response.into_body().collect().await.unwrap();
    let trailers: HeaderMap = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), message);
}

#[tokio::test]
async fn grpc_streaming_echo_answers_each_message_as_it_arrives() {
    let server = start("grpc").await;
    let mut sender = h2c_sender(server.addr).await;
    let (tx, body) = channel_body();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "http://127.0.0.1:{}/echo.Echo/Stream",
            server.addr.port()
        ))
        .header("content-type", "application/grpc+proto")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["content-type"], "application/grpc+proto");
    let mut body = response.into_body();
    for payload in [&b"one"[..], b"two two", b""] {
        let message = grpc_message(payload);
        tx.send(message.clone()).await.unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < message.len() {
            echoed.extend_from_slice(&next_data(&mut body).await);
        }
        assert_eq!(echoed, message);
    }
    drop(tx);
    let trailers = loop {
        let frame = body
            .frame()
            .await
            .expect("trailers before the end")
            .unwrap();
        if let Ok(trailers) = frame.into_trailers() {
            break trailers;
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test]
async fn grpc_request_ending_inside_a_message_gets_an_error_status() {
    let server = start("grpc").await;
    let mut sender = h2c_sender(server.addr).await;
    let mut truncated = grpc_message(b"0123456789").to_vec();
    truncated.truncate(8);
    let request = Request::post(format!("http://127.0.0.1:{}/x.Y/Z", server.addr.port()))
        .header("content-type", "application/grpc")
        .body(full(truncated))
        .unwrap();
    let collected = sender
        .send_request(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "13");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let server = start("bye").await;
    let ok = client()
        .get(format!("http://{}/health", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    server.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .expect("serve returns");
    result.unwrap().unwrap();
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "listener closed"
    );
}
