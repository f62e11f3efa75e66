//! End-to-end tests of `phoenix_proxy::upstream::Service` against real backends on loopback.
//!
//! The backends are small hyper servers written here (HTTP/1.1 and h2c on one port, optionally TLS)
//! that count accepted TCP connections and served requests, so that load balancing, keep-alive reuse,
//! health and retries are observed from the backend's side, not inferred from the client's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_proxy::body::{self, UpstreamBody};
use phoenix_proxy::config::{HealthConfig, LoadBalancer, ServerConfig, ServiceConfig};
use phoenix_proxy::upstream::{Service, UpstreamContext, UpstreamError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

// ------------------------------------------------------------------------------------------------
// Test backend
// ------------------------------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    /// TCP connections accepted.
    accepted: AtomicUsize,
    /// Requests served, health checks excluded.
    hits: AtomicUsize,
    /// Status of /health (200 unless a test changes it).
    health_status: AtomicU16,
}

struct Backend {
    addr: SocketAddr,
    name: &'static str,
    delay: Duration,
    tls: Option<TlsAcceptor>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    reserved: Option<ClosedPort>,
}

type TestBody = BoxBody<Bytes, Infallible>;

fn text(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).boxed()
}

impl Backend {
    async fn start(name: &'static str) -> Backend {
        Backend::start_with(name, Duration::ZERO, None).await
    }

    async fn start_with(name: &'static str, delay: Duration, tls: Option<TlsAcceptor>) -> Backend {
        Backend::start_on("127.0.0.1:0".parse().unwrap(), name, delay, tls).await
    }

    async fn start_on(
        addr: SocketAddr,
        name: &'static str,
        delay: Duration,
        tls: Option<TlsAcceptor>,
    ) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let counters = Arc::new(Counters::default());
        counters.health_status.store(200, Ordering::Relaxed);
        let mut backend = Backend {
            addr: listener.local_addr().unwrap(),
            name,
            delay,
            tls,
            counters,
            stop: CancellationToken::new(),
            task: None,
            reserved: None,
        };
        backend.serve(listener);
        backend
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.counters.hits.load(Ordering::Relaxed)
    }

    fn accepted(&self) -> usize {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every open connection, like a killed process.
    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        // keep the port, so that no other test's listener takes it meanwhile
        self.reserved = Some(ClosedPort::reserve(self.addr));
    }

    /// Listens again on the same port.
    async fn restart(&mut self) {
        self.reserved = None;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.stop = CancellationToken::new();
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let (name, delay, tls, counters, stop) = (
            self.name,
            self.delay,
            self.tls.clone(),
            self.counters.clone(),
            self.stop.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                let (counters, stop, tls) = (counters.clone(), stop.clone(), tls.clone());
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(req, name, delay, counters.clone()));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                            tokio::select! { _ = conn => {}, _ = stop.cancelled() => {} }
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            tokio::select! { _ = conn => {}, _ = stop.cancelled() => {} }
                        }
                    }
                });
            }
            // dropping the listener and aborting the connections closes every socket
            drop(listener);
            connections.shutdown().await;
        }));
    }
}

async fn handle(
    mut req: Request<Incoming>,
    name: &'static str,
    delay: Duration,
    counters: Arc<Counters>,
) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/health" {
        let status = StatusCode::from_u16(counters.health_status.load(Ordering::Relaxed)).unwrap();
        return Ok(Response::builder()
            .status(status)
            .body(text("health"))
            .unwrap());
    }
    counters.hits.fetch_add(1, Ordering::Relaxed);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = match path.as_str() {
        "/trailers" => {
            // a gRPC-like answer: data, then trailers
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("x-served-by", HeaderValue::from_static(name));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"payload"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
                .unwrap()
        }
        "/upgrade" if req.headers().contains_key(header::UPGRADE) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on_upgrade.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "echo")
                .body(text(""))
                .unwrap()
        }
        _ => Response::builder()
            .header("x-version", format!("{:?}", req.version()))
            // HTTP/2 carries the host as :authority, HTTP/1.1 as Host
            .header(
                "x-host",
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or(req.uri().authority().map(|a| a.as_str()))
                    .unwrap_or(""),
            )
            .body(text(name))
            .unwrap(),
    };
    Ok(response)
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn ctx() -> UpstreamContext {
    UpstreamContext {
        internal_roots: None,
        connect_timeout: Duration::from_secs(2),
        default_timeout: Duration::from_secs(10),
        client_cert: None,
    }
}

fn service_config(servers: Vec<ServerConfig>) -> ServiceConfig {
    ServiceConfig {
        name: "app".into(),
        servers,
        load_balancer: LoadBalancer::RoundRobin,
        health: None,
        timeout: None,
        tls_root: None,
        tls_server_name: None,
        tls_insecure_skip_verify: false,
        retries: 2,
    }
}

fn url(u: String) -> ServerConfig {
    ServerConfig::Url(u)
}

fn get(path: &str) -> Request<UpstreamBody> {
    Request::builder()
        .uri(path)
        .header(header::HOST, "app.phoenix.test")
        .body(body::empty())
        .unwrap()
}

/// Sends a GET and returns status, response headers and the whole body as text.
async fn fetch(
    service: &Service,
    req: Request<UpstreamBody>,
) -> Result<(StatusCode, HeaderMap, String), UpstreamError> {
    let upstreamed = service.send(req).await?;
    let (parts, body) = upstreamed.response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
    ))
}

/// A port on which nothing listens.
/// A port that refuses connections: bound (so no other listener can take it while tests run in
/// parallel) but not listening.
struct ClosedPort {
    addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    fn new() -> ClosedPort {
        ClosedPort::reserve("127.0.0.1:0".parse().unwrap())
    }

    fn reserve(addr: SocketAddr) -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        ClosedPort {
            addr: socket.local_addr().unwrap(),
            _socket: socket,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Load balancing
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_is_within_five_percent_over_1000_requests() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let cfg = service_config(vec![
        ServerConfig::Weighted {
            url: a.url("http"),
            weight: 1,
        },
        ServerConfig::Weighted {
            url: b.url("http"),
            weight: 3,
        },
    ]);
    let service = Service::new(&cfg, &ctx()).unwrap();
    let mut served_by_b = 0;
    for _ in 0..1000 {
        let (status, _, name) = fetch(&service, get("/")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        served_by_b += usize::from(name == "b");
    }
    let share = served_by_b as f64 / 1000.0;
    assert!(
        (share - 0.75).abs() <= 0.05,
        "b served {share:.3} of requests, expected 0.75 +- 0.05"
    );
    // and the backends agree with what the client saw
    assert_eq!(a.hits() + b.hits(), 1000);
    assert_eq!(b.hits(), served_by_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_prefers_the_idle_server_when_one_is_slow() {
    let slow = Backend::start_with("slow", Duration::from_millis(300), None).await;
    let fast = Backend::start("fast").await;
    let mut cfg = service_config(vec![url(slow.url("http")), url(fast.url("http"))]);
    cfg.load_balancer = LoadBalancer::LeastRequests;
    let service = Service::new(&cfg, &ctx()).unwrap();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let service = service.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..25 {
                fetch(&service, get("/")).await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let (s, f) = (slow.hits(), fast.hits());
    assert_eq!(s + f, 200);
    // Round robin would give the slow server 100 of 200; least requests keeps it to the few requests
    // it can hold at a time (typically under 10%; the bound leaves room for a loaded machine, where
    // the fast server is slower too).
    assert!(s * 4 < s + f, "slow server got {s} of {} requests", s + f);
    // in-flight counts are back to zero once every body has been read
    assert!(
        service.servers().iter().all(|st| st.in_flight == 0),
        "{:?}",
        service.servers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_lasts_until_the_response_body_ends() {
    let a = Backend::start("a").await;
    let service = Service::new(&service_config(vec![url(a.url("http"))]), &ctx()).unwrap();
    let upstreamed = service.send(get("/")).await.unwrap();
    assert_eq!(&*upstreamed.server, a.url("http"));
    assert_eq!(
        service.servers()[0].in_flight,
        1,
        "headers arrived but the body is unread"
    );
    let body = upstreamed
        .response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"a");
    assert_eq!(service.servers()[0].in_flight, 0);
    // dropping an unread body releases too
    let upstreamed = service.send(get("/")).await.unwrap();
    assert_eq!(service.servers()[0].in_flight, 1);
    drop(upstreamed);
    assert_eq!(service.servers()[0].in_flight, 0);
}

// ------------------------------------------------------------------------------------------------
// Health and retries
// ------------------------------------------------------------------------------------------------

const INTERVAL: Duration = Duration::from_millis(300);
/// Scheduling slack on a loaded CI machine, on top of the two intervals the requirement allows.
const SLACK: Duration = Duration::from_millis(250);

async fn wait_for(service: &Service, server: usize, healthy: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    while service.servers()[server].healthy != healthy {
        assert!(
            start.elapsed() < limit,
            "server {server} not {} after {:?}",
            if healthy { "healthy" } else { "ejected" },
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

fn health(path: &str) -> Option<HealthConfig> {
    Some(HealthConfig {
        path: path.into(),
        interval: INTERVAL,
        timeout: Duration::from_millis(200),
        status: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_is_ejected_and_returns_without_failed_requests() {
    let a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    let mut cfg = service_config(vec![url(a.url("http")), url(b.url("http"))]);
    cfg.health = health("/health");
    let service = Service::new(&cfg, &ctx()).unwrap();
    let shutdown = CancellationToken::new();
    service.start_health_checks(shutdown.clone());

    // a client sending GETs all along
    let served: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let client_stop = CancellationToken::new();
    let client = {
        let (service, served, failures, stop) = (
            service.clone(),
            served.clone(),
            failures.clone(),
            client_stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                match fetch(&service, get("/")).await {
                    Ok((StatusCode::OK, _, name)) => {
                        served.lock().unwrap().push((Instant::now(), name))
                    }
                    Ok((status, _, _)) => failures.lock().unwrap().push(status.to_string()),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };

    tokio::time::sleep(INTERVAL).await;
    b.stop().await;
    let ejected_after = wait_for(&service, 1, false, 2 * INTERVAL + SLACK).await;
    let stopped_at = Instant::now();
    tokio::time::sleep(INTERVAL).await;
    b.restart().await;
    let restarted = Instant::now();
    let returned_after = wait_for(&service, 1, true, 2 * INTERVAL + SLACK).await;
    tokio::time::sleep(INTERVAL).await;
    client_stop.cancel();
    client.await.unwrap();
    shutdown.cancel();

    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let served = served.lock().unwrap();
    let during_outage = served
        .iter()
        .filter(|(t, _)| *t > stopped_at && *t < restarted);
    assert!(
        during_outage.clone().count() > 10,
        "the client kept being served"
    );
    assert!(
        during_outage.clone().all(|(_, n)| n == "a"),
        "b served while stopped"
    );
    let after_return = served
        .iter()
        .filter(|(t, n)| *t > restarted + returned_after && n == "b")
        .count();
    assert!(
        after_return > 5,
        "b got {after_return} requests after it returned"
    );
    eprintln!("ejected after {ejected_after:?}, returned after {returned_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_ejects_without_any_traffic_and_success_restores() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut cfg = service_config(vec![url(a.url("http")), url(b.url("http"))]);
    cfg.health = health("/health");
    let service = Service::new(&cfg, &ctx()).unwrap();
    let shutdown = CancellationToken::new();
    service.start_health_checks(shutdown.clone());
    service.start_health_checks(shutdown.clone()); // a second call must not double the checks
    tokio::time::sleep(INTERVAL / 2).await;
    assert!(service.servers().iter().all(|s| s.healthy));

    b.counters.health_status.store(503, Ordering::Relaxed);
    wait_for(&service, 1, false, 2 * INTERVAL + SLACK).await;
    assert!(service.servers()[0].healthy);
    for _ in 0..10 {
        assert_eq!(fetch(&service, get("/")).await.unwrap().2, "a");
    }
    b.counters.health_status.store(204, Ordering::Relaxed); // any 2xx counts
    wait_for(&service, 1, true, 2 * INTERVAL + SLACK).await;
    let names: Vec<String> =
        futures_util::future::join_all((0..10).map(|_| fetch(&service, get("/"))))
            .await
            .into_iter()
            .map(|r| r.unwrap().2)
            .collect();
    assert!(names.iter().any(|n| n == "b"), "{names:?}");

    // expected status: 204 configured, 200 is then a failure
    shutdown.cancel();
    let mut cfg = service_config(vec![url(a.url("http"))]);
    cfg.health = health("/health");
    cfg.health.as_mut().unwrap().status = Some(204);
    let strict = Service::new(&cfg, &ctx()).unwrap();
    let shutdown = CancellationToken::new();
    strict.start_health_checks(shutdown.clone());
    wait_for(&strict, 0, false, 2 * INTERVAL + SLACK).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_on_the_other_server() {
    let closed = ClosedPort::new();
    let dead = closed.addr;
    let live = Backend::start("live").await;
    // round robin with equal weights starts with the first server: the dead one
    let cfg = service_config(vec![url(format!("http://{dead}")), url(live.url("http"))]);
    let service = Service::new(&cfg, &ctx()).unwrap();
    for _ in 0..10 {
        let (status, _, name) = fetch(&service, get("/")).await.unwrap();
        assert_eq!((status, name.as_str()), (StatusCode::OK, "live"));
    }
    assert!(
        !service.servers()[0].healthy,
        "the refused server was ejected passively"
    );
    assert_eq!(live.hits(), 10);

    // a POST with a body is retried too: it was never sent
    let cfg = service_config(vec![url(format!("http://{dead}")), url(live.url("http"))]);
    let service = Service::new(&cfg, &ctx()).unwrap();
    let post = Request::post("/").body(body::full("data")).unwrap();
    assert_eq!(fetch(&service, post).await.unwrap().2, "live");

    // without retries the error surfaces, naming the server
    let mut cfg = service_config(vec![url(format!("http://{dead}"))]);
    cfg.retries = 0;
    let service = Service::new(&cfg, &ctx()).unwrap();
    match service.send(get("/")).await {
        Err(e @ UpstreamError::Connect { .. }) => {
            assert!(!e.is_timeout());
            assert_eq!(e.server(), Some(format!("http://{dead}").as_str()));
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_health_checks_an_ejected_server_is_probed_again_after_back_off() {
    let closed = ClosedPort::new();
    let late = closed.addr;
    let live = Backend::start("live").await;
    let cfg = service_config(vec![url(format!("http://{late}")), url(live.url("http"))]);
    let service = Service::new(&cfg, &ctx()).unwrap();
    fetch(&service, get("/")).await.unwrap();
    assert!(
        !service.servers()[0].healthy,
        "ejected by the refused connect"
    );
    let ejected = Instant::now();
    // the server comes up; within the first back-off (1 s) it gets nothing
    drop(closed);
    let late = Backend::start_on(late, "late", Duration::ZERO, None).await;
    while ejected.elapsed() < Duration::from_millis(800) {
        assert_eq!(fetch(&service, get("/")).await.unwrap().2, "live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // after it, the next pick probes it, and success restores it
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(fetch(&service, get("/")).await.unwrap().2);
    }
    assert!(names.iter().any(|n| n == "late"), "{names:?}");
    assert!(service.servers()[0].healthy);
    assert!(late.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_is_reported_as_timeout() {
    let slow = Backend::start_with("slow", Duration::from_secs(3), None).await;
    let mut cfg = service_config(vec![url(slow.url("http"))]);
    cfg.timeout = Some(Duration::from_millis(200));
    let service = Service::new(&cfg, &ctx()).unwrap();
    let start = Instant::now();
    let err = service.send(get("/")).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(matches!(err, UpstreamError::Timeout { .. }));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(slow.hits(), 1, "a timed-out request is not retried");
    assert_eq!(service.servers()[0].in_flight, 0);

    // the context default applies when the service sets none
    let cfg = service_config(vec![url(slow.url("http"))]);
    let ctx = UpstreamContext {
        default_timeout: Duration::from_millis(150),
        ..ctx()
    };
    let service = Service::new(&cfg, &ctx).unwrap();
    assert!(service.send(get("/")).await.unwrap_err().is_timeout());
}

// ------------------------------------------------------------------------------------------------
// Connections and protocols
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_one_connection() {
    let a = Backend::start("a").await;
    let service = Service::new(&service_config(vec![url(a.url("http"))]), &ctx()).unwrap();
    for _ in 0..100 {
        let (_, headers, _) = fetch(&service, get("/")).await.unwrap();
        assert_eq!(headers["x-version"], "HTTP/1.1");
        assert_eq!(headers["x-host"], "app.phoenix.test", "Host passed through");
    }
    assert_eq!(a.accepted(), 1, "100 sequential requests on one connection");

    // h2c: one multiplexed connection, even for concurrent first requests
    let b = Backend::start("b").await;
    let service = Service::new(&service_config(vec![url(b.url("h2c"))]), &ctx()).unwrap();
    let results = futures_util::future::join_all((0..20).map(|_| fetch(&service, get("/")))).await;
    for r in results {
        let (_, headers, _) = r.unwrap();
        assert_eq!(headers["x-version"], "HTTP/2.0");
        assert_eq!(
            headers["x-host"], "app.phoenix.test",
            "Host became :authority"
        );
    }
    for _ in 0..100 {
        fetch(&service, get("/")).await.unwrap();
    }
    assert_eq!(b.accepted(), 1, "120 requests on one HTTP/2 connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_do_not_churn_connections() {
    let a = Backend::start("a").await;
    let service = Service::new(&service_config(vec![url(a.url("http"))]), &ctx()).unwrap();
    let start = Instant::now();
    let workers: Vec<_> = (0..50)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                for _ in 0..40 {
                    fetch(&service, get("/")).await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    eprintln!(
        "2000 requests over {} connections in {:?}",
        a.accepted(),
        start.elapsed()
    );
    assert_eq!(a.hits(), 2000);
    // at most one connection per concurrent client, however the pool interleaves them
    assert!(
        a.accepted() <= 50,
        "{} connections for 50 concurrent clients",
        a.accepted()
    );
    assert!(service.servers()[0].in_flight == 0);
}

/// A server that answers the first request of each connection and closes the connection when the
/// second one arrives, without an answer: as one does that reaches its keep-alive limit while a
/// request is on the way. Counts the connections it accepted.
async fn closes_on_the_second_request() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                let mut heads = 0;
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        read.drain(..end + 4);
                        heads += 1;
                        if heads > 1 {
                            return; // closes, unanswered
                        }
                        socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_on_a_pooled_connection_is_sent_again_only_if_idempotent() {
    let (addr, accepted) = closes_on_the_second_request().await;
    let mut cfg = service_config(vec![url(format!("http://{addr}"))]);
    cfg.retries = 0; // the pool must cope on its own
    let service = Service::new(&cfg, &ctx()).unwrap();
    fetch(&service, get("/")).await.unwrap();
    // Written into the pooled connection, which closes unanswered: sent again on a fresh one.
    let (status, _, body) = fetch(&service, get("/again")).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // The same for a POST: the server may have acted on it, so it is not sent twice.
    let post = Request::post("/")
        .header(header::HOST, "app.phoenix.test")
        .body(body::empty())
        .unwrap();
    assert!(fetch(&service, post).await.is_err());
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connections_are_replaced_without_a_failed_request() {
    for scheme in ["http", "h2c"] {
        let mut backend = Backend::start("a").await;
        let mut cfg = service_config(vec![url(backend.url(scheme))]);
        cfg.retries = 0; // no help from service-level retries: the pool must cope on its own
        let service = Service::new(&cfg, &ctx()).unwrap();
        for round in 1..=3 {
            fetch(&service, get("/")).await.unwrap();
            // the backend restarts: the pooled connection is now dead, maybe not yet noticed
            backend.stop().await;
            backend.restart().await;
            let (status, _, _) = fetch(&service, get("/"))
                .await
                .unwrap_or_else(|e| panic!("{scheme} round {round}: {e}"));
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                backend.accepted(),
                round + 1,
                "{scheme}: one fresh connection per restart"
            );
            fetch(&service, get("/")).await.unwrap();
        }
        assert!(service.servers()[0].healthy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_backend_trailers_arrive_through_send() {
    let backend = Backend::start("grpc").await;
    let service = Service::new(&service_config(vec![url(backend.url("h2c"))]), &ctx()).unwrap();
    let mut req = get("/trailers");
    req.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    let upstreamed = service.send(req).await.unwrap();
    assert_eq!(upstreamed.response.version(), Version::HTTP_2);
    let collected = upstreamed.response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-served-by"], "grpc");
    assert_eq!(&collected.to_bytes()[..], b"payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_takes_over_an_http1_connection() {
    let backend = Backend::start("ws").await;
    let service = Service::new(&service_config(vec![url(backend.url("http"))]), &ctx()).unwrap();
    // warm the pool so the upgrade runs on a reused connection
    fetch(&service, get("/")).await.unwrap();
    let mut req = get("/upgrade");
    req.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    req.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("echo"));
    let upstreamed = service.send(req).await.unwrap();
    assert_eq!(
        upstreamed.response.status(),
        StatusCode::SWITCHING_PROTOCOLS
    );
    let mut io = upstreamed
        .response
        .into_body()
        .take_upgrade()
        .expect("upgraded");
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(
        backend.accepted(),
        1,
        "the pooled connection carried the upgrade"
    );
    // the upgraded connection is not handed out again
    fetch(&service, get("/")).await.unwrap();
    assert_eq!(backend.accepted(), 2);
    io.write_all(b"pong").await.unwrap();
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong", "the tunnel still works");
}

// ------------------------------------------------------------------------------------------------
// TLS to https:// backends
// ------------------------------------------------------------------------------------------------

struct Pki {
    root_pem: String,
    roots: Arc<rustls::RootCertStore>,
    server: Arc<rustls::ServerConfig>,
}

/// A root CA named `root_name` and a server certificate for `backend.test` issued by it.
fn pki(root_name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, root_name);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["backend.test".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &*ca)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki {
        root_pem: ca.pem(),
        roots: Arc::new(roots),
        server: Arc::new(server),
    }
}

fn https_service(backend: &Backend) -> ServiceConfig {
    let mut cfg = service_config(vec![url(backend.url("https"))]);
    cfg.tls_server_name = Some("backend.test".into());
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_is_verified_against_the_internal_root() {
    install_provider();
    let pki = pki("Upstream Test Root");
    let backend = Backend::start_with(
        "secure",
        Duration::ZERO,
        Some(TlsAcceptor::from(pki.server.clone())),
    )
    .await;
    let ctx = UpstreamContext {
        internal_roots: Some(pki.roots.clone()),
        ..ctx()
    };
    let service = Service::new(&https_service(&backend), &ctx).unwrap();

    // an HTTP/1.1 client request travels as HTTP/1.1 ...
    for _ in 0..3 {
        let (status, headers, name) = fetch(&service, get("/")).await.unwrap();
        assert_eq!((status, name.as_str()), (StatusCode::OK, "secure"));
        assert_eq!(headers["x-version"], "HTTP/1.1");
    }
    // ... an HTTP/2 one as HTTP/2 (ALPN h2)
    for _ in 0..3 {
        let mut req = get("/");
        *req.version_mut() = Version::HTTP_2;
        let (_, headers, _) = fetch(&service, req).await.unwrap();
        assert_eq!(headers["x-version"], "HTTP/2.0");
        assert_eq!(headers["x-host"], "app.phoenix.test");
    }
    assert_eq!(
        backend.accepted(),
        2,
        "one pooled HTTP/1.1 and one HTTP/2 connection"
    );

    // the same root given as the service's tls_root file
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root.pem");
    std::fs::write(&root_file, &pki.root_pem).unwrap();
    let mut cfg = https_service(&backend);
    cfg.tls_root = Some(root_file);
    let service = Service::new(&cfg, &self::ctx()).unwrap();
    assert_eq!(fetch(&service, get("/")).await.unwrap().2, "secure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_is_refused_when_the_root_differs() {
    install_provider();
    let pki = pki("Upstream Test Root");
    let other = self::pki("Another Root");
    let backend = Backend::start_with(
        "secure",
        Duration::ZERO,
        Some(TlsAcceptor::from(pki.server.clone())),
    )
    .await;
    let ctx = UpstreamContext {
        internal_roots: Some(other.roots.clone()),
        ..ctx()
    };
    let service = Service::new(&https_service(&backend), &ctx).unwrap();
    let err = service.send(get("/")).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Connect { .. }), "{err:?}");
    let chain = format!("{:?}", err);
    assert!(chain.contains("UnknownIssuer"), "{chain}");
    assert_eq!(backend.hits(), 0, "no request reached the impostor");

    // the right root but the wrong name is refused as well
    let ctx = UpstreamContext {
        internal_roots: Some(pki.roots.clone()),
        ..self::ctx()
    };
    let mut cfg = https_service(&backend);
    cfg.tls_server_name = Some("other.test".into());
    let err = Service::new(&cfg, &ctx)
        .unwrap()
        .send(get("/"))
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");

    // tls_insecure_skip_verify, named so, accepts anything
    let mut cfg = https_service(&backend);
    cfg.tls_insecure_skip_verify = true;
    let service = Service::new(&cfg, &self::ctx()).unwrap();
    assert_eq!(fetch(&service, get("/")).await.unwrap().2, "secure");

    // and without any root, an https service is a configuration problem
    let problems = Service::new(&https_service(&backend), &self::ctx()).unwrap_err();
    assert!(problems[0].message.contains("no root"), "{problems:?}");
}
