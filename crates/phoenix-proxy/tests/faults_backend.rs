//! A backend killed in the middle of a streamed response, behind the proxy over real TLS on
//! loopback, with HTTP/1.1 and HTTP/2 clients: the client of the killed backend sees its response
//! end in an error (never a truncated body passed off as complete, never a hang), clients of
//! another backend streaming at the same time get every byte, and afterwards the dead backend's
//! route answers a prompt 502 while the other keeps serving.

mod hardening_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use hardening_support::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use phoenix_proxy::config::{
    ListenerLimits, RouteConfig, RoutingConfig, ServerConfig, ServiceConfig,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TICKS: usize = 40;
const TICK: &str = "tick 00\n";

/// A backend streaming `TICKS` lines 25 ms apart on `/stream`; `kill` drops every connection at
/// once and closes the listener, as a crashed process would.
struct Ticker {
    addr: SocketAddr,
    kill: CancellationToken,
}

async fn ticker() -> Ticker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let kill = CancellationToken::new();
    let k = kill.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = k.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let k = k.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let body = if req.uri().path() == "/stream" {
                        let ticks = futures_util::stream::iter(0..TICKS).then(|i| async move {
                            tokio::time::sleep(Duration::from_millis(25)).await;
                            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("tick {i:02}\n"))))
                        });
                        BodyExt::boxed(StreamBody::new(ticks))
                    } else {
                        http_body_util::Full::new(Bytes::from_static(b"ok")).boxed()
                    };
                    Ok::<_, Infallible>(hyper::Response::new(body))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = k.cancelled() => {} // dropped: the socket closes mid-response
                }
            });
        }
    });
    Ticker { addr, kill }
}

fn routing(dying: SocketAddr, steady: SocketAddr) -> RoutingConfig {
    let service = |name: &str, addr: SocketAddr| ServiceConfig {
        name: name.to_owned(),
        servers: vec![ServerConfig::Url(format!("http://{addr}"))],
        load_balancer: Default::default(),
        health: None,
        timeout: None,
        tls_root: None,
        tls_server_name: None,
        tls_insecure_skip_verify: false,
        retries: 1,
    };
    let route = |host: &str, service: &str| RouteConfig {
        name: Some(service.to_owned()),
        rule: format!("Host(`{host}`)"),
        service: service.to_owned(),
        priority: None,
        middlewares: Vec::new(),
    };
    RoutingConfig {
        domain: Some("phoenix.test".to_owned()),
        services: vec![service("dying", dying), service("steady", steady)],
        routes: vec![
            route("dying.phoenix.test", "dying"),
            route("steady.phoenix.test", "steady"),
        ],
        middlewares: Default::default(),
    }
}

/// Reads a streamed body; returns the bytes received and whether it ended cleanly.
async fn read_stream(client: reqwest::Client, url: String) -> (usize, Result<(), String>) {
    let resp = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) => return (0, Err(e.to_string())),
    };
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = 0;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => got += c.len(),
            Err(e) => return (got, Err(e.to_string())),
        }
    }
    (got, Ok(()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_stream_errors_its_client_only() {
    let pki = Pki::new();
    for http1 in [true, false] {
        let (dying, steady) = (ticker().await, ticker().await);
        let proxy = start_proxy_with(
            &pki,
            Role::Gateway,
            ListenerLimits::default(),
            &routing(dying.addr, steady.addr),
        )
        .await;
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(pki.root_pem().as_bytes()).unwrap(),
            )
            .resolve("dying.phoenix.test", proxy.addr)
            .resolve("steady.phoenix.test", proxy.addr)
            .timeout(Duration::from_secs(10));
        if http1 {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let url = |host: &str, path: &str| format!("https://{host}:{}{path}", proxy.addr.port());

        let victim = tokio::spawn(read_stream(
            client.clone(),
            url("dying.phoenix.test", "/stream"),
        ));
        let others: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn(read_stream(
                    client.clone(),
                    url("steady.phoenix.test", "/stream"),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        dying.kill.cancel();
        let killed_at = Instant::now();

        let (got, ended) = victim.await.unwrap();
        assert!(
            killed_at.elapsed() < Duration::from_secs(3),
            "http1={http1}: the victim's response hung for {:?}",
            killed_at.elapsed()
        );
        assert!(
            ended.is_err(),
            "http1={http1}: a response cut by the backend's death ended as if complete ({got} bytes)"
        );
        assert!(
            got > 0 && got < TICKS * TICK.len(),
            "http1={http1}: got {got} bytes"
        );
        for other in others {
            let (got, ended) = other.await.unwrap();
            assert_eq!(
                ended,
                Ok(()),
                "http1={http1}: a stream from the other backend broke"
            );
            assert_eq!(got, TICKS * TICK.len(), "http1={http1}");
        }

        let started = Instant::now();
        let resp = client
            .get(url("dying.phoenix.test", "/ok"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "http1={http1}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let resp = client
            .get(url("steady.phoenix.test", "/ok"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "http1={http1}");
        assert_eq!(resp.text().await.unwrap(), "ok");
        steady.kill.cancel();
    }
}
