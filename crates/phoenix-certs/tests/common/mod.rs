//! Shared test support: the phoenix CA started in-process on loopback, a TLS echo listener that
//! serves through a `CertResolver` (and so answers tls-alpn-01), an HTTP listener that serves
//! `Http01Tokens`, and a rustls client that trusts only the CA's root.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use phoenix_ca::{CaConfig, CaError, CaServer};
use phoenix_certs::{AcmeSettings, Challenge, Http01Tokens};
use phoenix_proxy::tls::CertResolver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

pub const MESH_NAME: &str = "mesh.phoenix.test";

pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "phoenix_certs=debug,phoenix_ca=info".into()),
        )
        .try_init();
}

/// A phoenix CA running in this process.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub cfg: CaConfig,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub root_pem: String,
    /// External Account Binding credentials (key id, base64url HMAC key) when required.
    pub eab: Option<(String, String)>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), CaError>>>,
}

impl TestCa {
    /// Initialises a CA for `phoenix.test` / 127.0.0.0/8 whose validator reaches
    /// `mesh.phoenix.test` at 127.0.0.1 on the given ports, and serves it.
    pub async fn start(tlsalpn01_port: u16, http01_port: u16) -> TestCa {
        TestCa::start_with(tlsalpn01_port, http01_port, false).await
    }

    /// As [`TestCa::start`], optionally requiring External Account Binding (credentials in `eab`).
    pub async fn start_with(tlsalpn01_port: u16, http01_port: u16, require_eab: bool) -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = CaConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("ca"));
        cfg.domains = vec!["phoenix.test".into()];
        cfg.networks = vec!["127.0.0.0/8".parse().unwrap()];
        // The shortest lifetime the CA accepts; renewal is driven by a manual clock.
        cfg.leaf_lifetime = Duration::from_secs(300);
        cfg.acme.tlsalpn01_port = tlsalpn01_port;
        cfg.acme.http01_port = http01_port;
        cfg.acme
            .resolve
            .insert(MESH_NAME.into(), "127.0.0.1".parse().unwrap());
        cfg.acme.require_eab = require_eab;
        let report = phoenix_ca::init(&cfg).unwrap();
        let eab = require_eab.then(|| phoenix_ca::eab_new(&cfg).unwrap());
        let root_pem = std::fs::read_to_string(&report.root_path).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        cfg.listen = addr;
        let mut ca = TestCa {
            dir,
            cfg,
            addr,
            fingerprint: report.fingerprint,
            root_pem,
            eab,
            stop: None,
            task: None,
        };
        ca.serve(listener);
        ca
    }

    fn serve(&mut self, listener: TcpListener) {
        let server = CaServer::open(self.cfg.clone()).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        })));
    }

    /// Stops the server and waits until it has released its store and port.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Serves the same CA again on the same address.
    pub async fn start_again(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    pub fn base(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn directory_url(&self) -> String {
        format!("{}/acme/directory", self.base())
    }

    pub fn settings(
        &self,
        roots: Arc<rustls::RootCertStore>,
        challenge: Challenge,
    ) -> AcmeSettings {
        AcmeSettings {
            directory_url: self.directory_url(),
            roots,
            eab: None,
            challenge,
            contact: vec!["mailto:ops@phoenix.test".into()],
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A TLS listener on 127.0.0.1 that serves through a `CertResolver` and echoes what it reads:
/// the stand-in for a role's TLS listener (the CA's tls-alpn-01 validator connects to it too).
pub struct TlsEcho {
    pub addr: SocketAddr,
    pub resolver: Arc<CertResolver>,
    task: JoinHandle<()>,
}

impl TlsEcho {
    pub async fn start() -> TlsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TlsEcho::start_on(listener).await
    }

    pub async fn start_on(listener: TcpListener) -> TlsEcho {
        let addr = listener.local_addr().unwrap();
        let resolver = CertResolver::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(phoenix_proxy::tls::server_config(
            resolver.clone(),
            None,
        ));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        TlsEcho {
            addr,
            resolver,
            task,
        }
    }
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 listener on 127.0.0.1 answering `/.well-known/acme-challenge/<token>` from the
/// token table, 404 otherwise: the stand-in for the gateway's HTTP listener.
pub struct Http01Server {
    pub addr: SocketAddr,
    pub tokens: Arc<Http01Tokens>,
    task: JoinHandle<()>,
}

impl Http01Server {
    pub async fn start() -> Http01Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tokens = Http01Tokens::new();
        let table = tokens.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let table = table.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let answer = table.respond(req.uri().path());
                            async move {
                                match answer {
                                    Some(body) => http::Response::builder()
                                        .status(200)
                                        .header("content-type", "application/octet-stream")
                                        .body(Full::new(Bytes::from(body))),
                                    None => http::Response::builder()
                                        .status(404)
                                        .body(Full::new(Bytes::new())),
                                }
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Http01Server { addr, tokens, task }
    }
}

impl Drop for Http01Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS connection to `addr` for SNI `name`, trusting only `root_pem`.
pub async fn connect(
    addr: SocketAddr,
    root_pem: &str,
    name: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let roots = Arc::new(phoenix_proxy::tls::roots_from_pem(root_pem).unwrap());
    let config = phoenix_proxy::tls::client_config(roots, alpn, None);
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Serial (lowercase hex) of the leaf a TLS connection was handshaken with.
pub fn served_serial(tls: &TlsStream<TcpStream>) -> String {
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    phoenix_pki::parse_cert(leaf.as_ref()).unwrap().serial
}

/// Sends `msg` over an echo connection and checks it comes back.
pub async fn echo(tls: &mut TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .unwrap();
    assert_eq!(back, msg);
}

/// Waits (up to `limit`) until `cond` holds.
pub async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(unix)]
pub fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}
