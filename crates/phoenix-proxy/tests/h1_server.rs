//! Phoenix's own HTTP/1.1 server (`h1_server`) and its handover to hyper, over real TLS on
//! loopback: which requests each one serves must not show to a client, on one connection or many.

mod hardening_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hardening_support::*;
use phoenix_proxy::config::ListenerLimits;
use phoenix_proxy::tls::ALPN_HTTP11;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(3);
const HOST: &str = "app.phoenix.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_both_servers_share_one_connection_in_order() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let proxy = start_proxy(&pki, Role::Mesh, ListenerLimits::default(), backend.addr).await;
    // Plain requests first (this server), then a chunked upload (hyper's from there on), then a
    // plain request again, all pipelined in one write.
    let bytes = format!(
        "GET /a HTTP/1.1\r\nHost: {HOST}\r\n\r\n\
         HEAD /b HTTP/1.1\r\nHost: {HOST}\r\n\r\n\
         POST /c HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello\
         PUT /d HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
         GET /e HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    );
    let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
    assert_eq!(got.responses(), 5, "{}", got.text);
    assert!(got.closed, "Connection: close was honoured");
    let statuses: Vec<&str> = got
        .text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &got.text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200"; 5]);
    // Every response carries a Date, whoever served it; the HEAD response has no body, so the
    // responses follow each other exactly (four bodies of "ok").
    assert_eq!(got.text.matches("\r\ndate: ").count(), 5, "{}", got.text);
    assert_eq!(got.text.matches("\r\n\r\nok").count(), 4, "{}", got.text);
    let seen: Vec<(String, String, Vec<u8>)> = backend
        .requests()
        .into_iter()
        .map(|r| (r.method, r.target, r.body))
        .collect();
    let want: Vec<(String, String, Vec<u8>)> = [
        ("GET", "/a", &b""[..]),
        ("HEAD", "/b", b""),
        ("POST", "/c", b"hello"),
        ("PUT", "/d", b"abc"),
        ("GET", "/e", b""),
    ]
    .iter()
    .map(|(m, t, b)| (m.to_string(), t.to_string(), b.to_vec()))
    .collect();
    assert_eq!(seen, want);
}

/// A backend that reads one request head and never answers; `closed` turns true when the proxy
/// closes that connection.
async fn silent_backend() -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        flag.store(true, Ordering::SeqCst);
    });
    (addr, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_upstream_request() {
    let pki = Pki::new();
    let (backend, closed) = silent_backend().await;
    let proxy = start_proxy(&pki, Role::Mesh, ListenerLimits::default(), backend).await;
    let mut tls = tls_connect(&pki, proxy.addr, HOST, ALPN_HTTP11).await;
    tls.write_all(format!("GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!closed.load(Ordering::SeqCst), "the request is in flight");
    drop(tls);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !closed.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream request outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A backend that answers every request with a chunked body and a trailer, as HTTP/1.1.
async fn trailer_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        read.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                                       5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_chunked_with_trailers_for_clients_that_take_them() {
    let pki = Pki::new();
    let backend = trailer_backend().await;
    let proxy = start_proxy(&pki, Role::Mesh, ListenerLimits::default(), backend).await;
    for (te, trailer) in [("TE: trailers\r\n", true), ("", false)] {
        let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n{te}Connection: close\r\n\r\n");
        let got = raw_http1(&pki, proxy.addr, HOST, request.as_bytes(), WAIT).await;
        assert_eq!(got.status, Some(200), "{}", got.text);
        assert!(
            got.text.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{}",
            got.text
        );
        let (_, body) = got.text.split_once("\r\n\r\n").expect("a head");
        let want = if trailer {
            "5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n"
        } else {
            "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        };
        assert_eq!(body, want);
        assert!(got.closed);
    }
}

/// `ClientIP` routes by the client behind trusted proxies (the rightmost `X-Forwarded-For` entry
/// that is not one of them), and by the TCP peer when the peer is not trusted, on requests this
/// server takes. (The address is resolved only for a table with a `ClientIP` rule.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_routing_resolves_the_client_behind_trusted_proxies() {
    let pki = Pki::new();
    let near = Recorder::start().await;
    let far = Recorder::start().await;
    let mut routing = routing_to(near.addr);
    let mut service = routing.services[0].clone();
    service.name = "far".to_owned();
    service.servers = vec![phoenix_proxy::config::ServerConfig::Url(format!(
        "http://{}",
        far.addr
    ))];
    routing.services.push(service);
    let mut route = routing.routes[0].clone();
    route.name = Some("far".to_owned());
    route.rule = "ClientIP(`203.0.113.7`)".to_owned();
    route.service = "far".to_owned();
    route.priority = Some(100);
    routing.routes.push(route);
    let requests = format!(
        "GET /a HTTP/1.1\r\nHost: {HOST}\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n\
         GET /b HTTP/1.1\r\nHost: {HOST}\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n\
         GET /c HTTP/1.1\r\nHost: {HOST}\r\n\r\n\
         GET /d HTTP/1.1\r\nHost: {HOST}\r\nX-Forwarded-For: 203.0.113.7, 127.0.0.9\r\n\r\n\
         GET /e HTTP/1.1\r\nHost: {HOST}\r\nX-Forwarded-For: 203.0.113.7, 198.51.100.1\r\nConnection: close\r\n\r\n"
    );
    let targets = |recorder: &Recorder| -> Vec<String> {
        let seen = recorder.requests().into_iter().map(|r| r.target).collect();
        recorder.clear();
        seen
    };

    let loopback = vec!["127.0.0.0/8".parse().unwrap()];
    let proxy = start_proxy_trusting(
        &pki,
        Role::Mesh,
        ListenerLimits::default(),
        &routing,
        loopback,
    )
    .await;
    let got = raw_http1(&pki, proxy.addr, HOST, requests.as_bytes(), WAIT).await;
    assert_eq!(got.responses(), 5, "{}", got.text);
    assert_eq!(targets(&far), ["/a", "/d"]);
    assert_eq!(targets(&near), ["/b", "/c", "/e"]);

    // From a peer that is not trusted, its forwarding fields say nothing about the client.
    let proxy = start_proxy_with(&pki, Role::Mesh, ListenerLimits::default(), &routing).await;
    let got = raw_http1(&pki, proxy.addr, HOST, requests.as_bytes(), WAIT).await;
    assert_eq!(got.responses(), 5, "{}", got.text);
    assert_eq!(targets(&far), Vec::<String>::new());
    assert_eq!(targets(&near), ["/a", "/b", "/c", "/d", "/e"]);
}
