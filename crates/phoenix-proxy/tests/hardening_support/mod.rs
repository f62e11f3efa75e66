//! Shared pieces of the hardening tests: a test PKI made with rcgen, a backend that records every
//! request it receives (so a test can prove that nothing a hostile client sent slipped through the
//! proxy), a proxy in the gateway or mesh role on a loopback TLS listener, and a raw TLS client that
//! writes exactly the bytes a test gives it.
#![allow(dead_code)] // each test file uses its own subset

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use phoenix_proxy::config::{
    ListenerLimits, RouteConfig, RoutingConfig, ServerConfig, ServiceConfig,
};
use phoenix_proxy::metrics::Metrics;
use phoenix_proxy::proxy::{Proxy, ProxySettings};
use phoenix_proxy::table::{BuildContext, RouteTable};
use phoenix_proxy::tls::{self, CertResolver};
use phoenix_proxy::upstream::UpstreamContext;
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub struct Pki {
    root: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        install_provider();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "hardening test root");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { root }
    }

    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        Arc::new(tls::roots_from_pem(&self.root.pem()).unwrap())
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// A leaf for `*.phoenix.test` and `phoenix.test`, so one certificate covers every host the
    /// tests use and a Host/SNI disagreement is not caught by TLS already.
    pub fn leaf(&self) -> Arc<rustls::sign::CertifiedKey> {
        let names = vec!["*.phoenix.test".to_owned(), "phoenix.test".to_owned()];
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "phoenix.test");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.root).unwrap();
        let chain = format!("{}{}", cert.pem(), self.root.pem());
        tls::certified_key_from_pem(&chain, &key.serialize_pem()).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The recording backend
// ---------------------------------------------------------------------------------------------

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// False when the request body ended with an error (the proxy cut it).
    pub complete: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A plain HTTP/1.1 backend that records every request. `GET /big?mib=N` answers N MiB, produced
/// lazily in 64 KiB chunks as the proxy asks for them.
pub struct Recorder {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Recorded>>>,
    /// Bytes of `/big` bodies produced so far: what the proxy pulled from the backend.
    pub produced: Arc<AtomicU64>,
    shutdown: CancellationToken,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let produced: Arc<AtomicU64> = Arc::default();
        let shutdown = CancellationToken::new();
        let (s, p, stop) = (seen.clone(), produced.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (seen, produced) = (s.clone(), p.clone());
                let service = hyper::service::service_fn(move |req| {
                    record(req, seen.clone(), produced.clone())
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Recorder {
            addr,
            seen,
            produced,
            shutdown,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn record(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Recorded>>>,
    produced: Arc<AtomicU64>,
) -> Result<Response<RespBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let target = parts.uri.to_string();
    let (body, complete) = match body.collect().await {
        Ok(b) => (b.to_bytes().to_vec(), true),
        Err(_) => (Vec::new(), false),
    };
    seen.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        complete,
    });
    if let Some(mib) = target
        .strip_prefix("/big?mib=")
        .and_then(|n| n.parse::<usize>().ok())
    {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        // Lazily: a chunk exists only once the proxy asked for it.
        let frames = futures_util::stream::iter(0..mib * 16).map(move |_| {
            produced.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            Ok::<_, Infallible>(Frame::data(chunk.clone()))
        });
        return Ok(Response::new(BodyExt::boxed(StreamBody::new(frames))));
    }
    Ok(Response::new(
        http_body_util::Full::new(Bytes::from_static(b"ok")).boxed(),
    ))
}

// ---------------------------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------------------------

/// Which role's settings the proxy runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Mesh,
}

pub struct Running {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    registry: Registry,
    shutdown: CancellationToken,
}

impl Running {
    /// The proxy's metrics in the Prometheus text format (what its admin listener serves).
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn routing_to(backend: SocketAddr) -> RoutingConfig {
    RoutingConfig {
        domain: Some("phoenix.test".to_owned()),
        services: vec![ServiceConfig {
            name: "app".to_owned(),
            servers: vec![ServerConfig::Url(format!("http://{backend}"))],
            load_balancer: Default::default(),
            health: None,
            timeout: None,
            tls_root: None,
            tls_server_name: None,
            tls_insecure_skip_verify: false,
            retries: 0,
        }],
        routes: vec![RouteConfig {
            name: Some("all".to_owned()),
            rule: "PathPrefix(`/`)".to_owned(),
            service: "app".to_owned(),
            priority: None,
            middlewares: Vec::new(),
        }],
        middlewares: Default::default(),
    }
}

/// Starts a proxy in `role` (the gateway checks Host against SNI, the mesh does not) in front of
/// `backend`, on a loopback TLS listener serving the PKI's `*.phoenix.test` certificate.
pub async fn start_proxy(
    pki: &Pki,
    role: Role,
    limits: ListenerLimits,
    backend: SocketAddr,
) -> Running {
    start_proxy_with(pki, role, limits, &routing_to(backend)).await
}

/// `start_proxy` with any routing.
pub async fn start_proxy_with(
    pki: &Pki,
    role: Role,
    limits: ListenerLimits,
    routing: &RoutingConfig,
) -> Running {
    start_proxy_trusting(pki, role, limits, routing, Vec::new()).await
}

/// `start_proxy_with`, taking the forwarding fields of peers in `trusted_proxies`.
pub async fn start_proxy_trusting(
    pki: &Pki,
    role: Role,
    limits: ListenerLimits,
    routing: &RoutingConfig,
    trusted_proxies: Vec<ipnet::IpNet>,
) -> Running {
    install_provider();
    let nets: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
    let ctx = BuildContext {
        plaintext_networks: &nets,
        upstream: UpstreamContext {
            internal_roots: None,
            connect_timeout: Duration::from_secs(2),
            default_timeout: Duration::from_secs(10),
            client_cert: None,
        },
        previous: None,
    };
    let table = RouteTable::build(routing, &ctx).expect("valid routing");
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let resolver = CertResolver::new();
    resolver.set_default(pki.leaf());
    let settings = ProxySettings {
        limits,
        trusted_proxies,
        access_log: false,
        allowed_client_names: Vec::new(),
        role: match role {
            Role::Gateway => "gateway",
            Role::Mesh => "mesh",
        },
        require_host_matches_sni: role == Role::Gateway,
    };
    let proxy = Proxy::new(settings, table, metrics);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(proxy.clone().serve_tls(
        listener,
        tls::server_config(resolver, None),
        shutdown.clone(),
    ));
    Running {
        addr,
        proxy,
        registry,
        shutdown,
    }
}

// ---------------------------------------------------------------------------------------------
// Raw clients
// ---------------------------------------------------------------------------------------------

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn tls_connect(pki: &Pki, addr: SocketAddr, sni: &str, alpn: &[u8]) -> Tls {
    let config = tls::client_config(pki.roots(), &[alpn], None);
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

/// What came back for bytes written on a fresh connection.
#[derive(Debug)]
pub struct Exchange {
    /// Status of the first response, if one came.
    pub status: Option<u16>,
    pub text: String,
    /// The server closed the connection within the wait (EOF, or a TLS/TCP error).
    pub closed: bool,
}

impl Exchange {
    /// Number of HTTP responses in the text: more than one means a second request was parsed
    /// out of the bytes the client sent as one.
    pub fn responses(&self) -> usize {
        self.text
            .match_indices("HTTP/1.1 ")
            .filter(|(i, _)| {
                let code = self.text.as_bytes().get(i + 9..i + 13).unwrap_or_default();
                code.len() == 4 && code[..3].iter().all(u8::is_ascii_digit) && code[3] == b' '
            })
            .count()
    }
}

/// Opens a TLS connection with `sni` (HTTP/1.1 by ALPN), writes `bytes` in one go and reads until
/// the server closes or `wait` passes.
pub async fn raw_http1(
    pki: &Pki,
    addr: SocketAddr,
    sni: &str,
    bytes: &[u8],
    wait: Duration,
) -> Exchange {
    let mut tls = tls_connect(pki, addr, sni, tls::ALPN_HTTP11).await;
    // The server may close before taking everything; what it answered is what matters.
    let _ = tls.write_all(bytes).await;
    let _ = tls.flush().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = status_of(&text);
    Exchange {
        status,
        text,
        closed,
    }
}

/// Resident set size of this process in KiB, from /proc.
/// The status code of the HTTP/1.1 response that `text` starts with.
pub fn status_of(text: &str) -> Option<u16> {
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}
