//! Shared test support: a CA started in-process on loopback port 0, a tiny http-01 responder,
//! a minimal JWS-signing ACME client (aws-lc-rs ECDSA P-256, ES256) for the negative tests, and
//! helpers for openssl and PEM chains.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::Engine;
use phoenix_ca::{CaConfig, CaError, CaServer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A port that was free a moment ago (for the validation ports, which the CA connects to).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA running in this process.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub cfg: CaConfig,
    pub addr: SocketAddr,
    pub root_path: PathBuf,
    pub fingerprint: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), CaError>>>,
}

pub fn test_config(dir: &Path) -> CaConfig {
    let mut cfg = CaConfig::new("127.0.0.1:0".parse().unwrap(), dir.join("ca"));
    cfg.domains = vec!["phoenix.test".into()];
    cfg.networks = vec!["127.0.0.0/8".parse().unwrap()];
    cfg.acme.http01_port = free_port();
    cfg.acme.tlsalpn01_port = free_port();
    cfg.acme
        .resolve
        .insert("app.phoenix.test".into(), "127.0.0.1".parse().unwrap());
    cfg.acme
        .resolve
        .insert("other.phoenix.test".into(), "127.0.0.1".parse().unwrap());
    cfg
}

impl TestCa {
    /// Initialises a CA in a temp dir (after `tweak` and `before_serve`) and serves it.
    pub async fn start_with(
        tweak: impl FnOnce(&mut CaConfig),
        before_serve: impl FnOnce(&CaConfig),
    ) -> TestCa {
        install_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        tweak(&mut cfg);
        let report = phoenix_ca::init(&cfg).unwrap();
        before_serve(&cfg);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        cfg.listen = addr;
        let mut ca = TestCa {
            dir,
            cfg,
            addr,
            root_path: report.root_path,
            fingerprint: report.fingerprint,
            stop: None,
            task: None,
        };
        ca.serve(listener);
        ca
    }

    pub async fn start() -> TestCa {
        TestCa::start_with(|_| {}, |_| {}).await
    }

    fn serve(&mut self, listener: TcpListener) {
        let server = CaServer::open(self.cfg.clone()).unwrap();
        assert_eq!(server.fingerprint(), self.fingerprint);
        let (tx, rx) = oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        })));
    }

    /// Stops the server and waits until it has released the store.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops the server and starts a new `CaServer` on the same data_dir and address.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    pub fn base(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn directory_url(&self) -> String {
        format!("{}/acme/directory", self.base())
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(&self.root_path).unwrap()
    }

    /// An HTTPS client that trusts only this CA's root.
    pub fn https(&self) -> reqwest::Client {
        install_provider();
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.root_pem().as_bytes()).unwrap(),
            )
            .build()
            .unwrap()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves http-01 key authorizations on 127.0.0.1:`port`.
pub struct Http01Responder {
    pub tokens: Arc<Mutex<HashMap<String, String>>>,
    /// Milliseconds to wait before answering (to stop the CA while a validation is in flight).
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct ResponderState {
    tokens: Arc<Mutex<HashMap<String, String>>>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Http01Responder {
    pub async fn start(port: u16) -> Http01Responder {
        use axum::extract::{Path, State};
        let state = ResponderState {
            tokens: Arc::default(),
            delay_ms: Arc::default(),
        };
        let app = axum::Router::new()
            .route(
                "/.well-known/acme-challenge/{token}",
                axum::routing::get(
                    |State(st): State<ResponderState>, Path(token): Path<String>| async move {
                        let delay = st.delay_ms.load(std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                        let answer = st.tokens.lock().unwrap().get(&token).cloned();
                        match answer {
                            Some(v) => (http::StatusCode::OK, v),
                            None => (http::StatusCode::NOT_FOUND, String::new()),
                        }
                    },
                ),
            )
            .with_state(state.clone());
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Http01Responder {
            tokens: state.tokens,
            delay_ms: state.delay_ms,
            task,
        }
    }

    pub fn set(&self, token: &str, key_auth: &str) {
        self.tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), key_auth.to_owned());
    }
}

impl Drop for Http01Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response from the CA.
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} {}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The RFC 8555 error type, asserting the problem+json content type.
    pub fn problem(&self) -> String {
        assert_eq!(
            self.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap()),
            Some("application/problem+json"),
            "not a problem document: {} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        self.json()["type"].as_str().unwrap_or_default().to_owned()
    }

    pub fn location(&self) -> String {
        self.headers
            .get("location")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }

    pub fn nonce(&self) -> Option<String> {
        self.headers
            .get("replay-nonce")
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// A minimal ACME client signing ES256 JWS with aws-lc-rs, able to send broken requests.
pub struct TestClient {
    pub http: reqwest::Client,
    pub dir: Value,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    pub jwk: Value,
    pub kid: Option<String>,
}

pub fn new_es256_key() -> (EcdsaKeyPair, Value) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let p = key.public_key().as_ref();
    let jwk = json!({"crv": "P-256", "kty": "EC", "x": b64(&p[1..33]), "y": b64(&p[33..65])});
    (key, jwk)
}

pub fn thumbprint(jwk: &Value) -> String {
    let canonical = format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap(),
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap()
    );
    b64(&Sha256::digest(canonical.as_bytes()))
}

impl TestClient {
    pub async fn new(ca: &TestCa) -> TestClient {
        let http = ca.https();
        let dir: Value = http
            .get(ca.directory_url())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (key, jwk) = new_es256_key();
        TestClient {
            http,
            dir,
            key,
            rng: SystemRandom::new(),
            jwk,
            kid: None,
        }
    }

    pub fn url(&self, name: &str) -> String {
        self.dir[name].as_str().unwrap().to_owned()
    }

    pub async fn nonce(&self) -> String {
        let r = self.http.head(self.url("newNonce")).send().await.unwrap();
        r.headers()["replay-nonce"].to_str().unwrap().to_owned()
    }

    /// Signs `payload` (None = POST-as-GET) under an explicit protected header.
    pub fn sign_with(
        &self,
        key: &EcdsaKeyPair,
        protected: &Value,
        payload: Option<&Value>,
    ) -> Value {
        let protected = b64(protected.to_string().as_bytes());
        let payload = payload
            .map(|p| b64(p.to_string().as_bytes()))
            .unwrap_or_default();
        let sig = key
            .sign(&self.rng, format!("{protected}.{payload}").as_bytes())
            .unwrap();
        json!({"protected": protected, "payload": payload, "signature": b64(sig.as_ref())})
    }

    /// Signs with this client's key under an explicit protected header.
    pub fn sign_header(&self, protected: &Value, payload: Option<&Value>) -> Value {
        self.sign_with(&self.key, protected, payload)
    }

    /// The protected header this client would normally use.
    pub fn header(&self, url: &str, nonce: &str) -> Value {
        match &self.kid {
            Some(kid) => json!({"alg": "ES256", "kid": kid, "nonce": nonce, "url": url}),
            None => json!({"alg": "ES256", "jwk": self.jwk, "nonce": nonce, "url": url}),
        }
    }

    pub fn sign(&self, url: &str, nonce: &str, payload: Option<&Value>) -> Value {
        self.sign_with(&self.key, &self.header(url, nonce), payload)
    }

    pub async fn send(&self, url: &str, body: &Value) -> Resp {
        let r = self
            .http
            .post(url)
            .header("content-type", "application/jose+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap().to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, url: &str, payload: Option<&Value>) -> Resp {
        let nonce = self.nonce().await;
        self.send(url, &self.sign(url, &nonce, payload)).await
    }

    pub async fn register(&mut self) -> Resp {
        let url = self.url("newAccount");
        let r = self
            .post(&url, Some(&json!({"termsOfServiceAgreed": true})))
            .await;
        assert!(r.status == 201 || r.status == 200, "{r:?}");
        self.kid = Some(r.location());
        r
    }

    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", thumbprint(&self.jwk))
    }

    /// newOrder for DNS names; returns (order URL, order JSON).
    pub async fn new_order(&self, names: &[&str]) -> Resp {
        let ids: Vec<Value> = names
            .iter()
            .map(|n| json!({"type": "dns", "value": n}))
            .collect();
        self.post(&self.url("newOrder"), Some(&json!({ "identifiers": ids })))
            .await
    }

    /// Answers every authorization of `order` with http-01 and waits for the order to be ready.
    pub async fn authorize(&self, order_url: &str, order: &Value, responder: &Http01Responder) {
        for authz_url in order["authorizations"].as_array().unwrap() {
            let authz = self.post(authz_url.as_str().unwrap(), None).await.json();
            let ch = authz["challenges"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "http-01")
                .unwrap()
                .clone();
            let token = ch["token"].as_str().unwrap();
            responder.set(token, &self.key_authorization(token));
            let r = self
                .post(ch["url"].as_str().unwrap(), Some(&json!({})))
                .await;
            assert_eq!(r.status, 200, "{r:?}");
        }
        self.wait_order(order_url, "ready").await;
    }

    pub async fn wait_order(&self, order_url: &str, want: &str) -> Value {
        for _ in 0..100 {
            let o = self.post(order_url, None).await.json();
            if o["status"] == want {
                return o;
            }
            assert_ne!(o["status"], "invalid", "order failed: {o}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("order {order_url} never became {want}");
    }
}

/// A CSR (DER) for `names` with a fresh P-256 key; returns (csr, key).
pub fn csr_for(names: &[&str]) -> (Vec<u8>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    // rcgen's default subject carries a placeholder CN, which the CA would count as a name.
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).unwrap();
    (csr.der().to_vec(), key)
}

/// PEM blocks of a chain, in order.
pub fn split_pem(chain: &str) -> Vec<String> {
    chain
        .split_inclusive("-----END CERTIFICATE-----")
        .map(|b| b.trim().to_owned())
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| format!("{b}\n"))
        .collect()
}

pub fn require_binary(name: &str, package: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{name}` is not installed: install the Debian package `{package}` (apt-get install -y {package}) to run this test"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `openssl verify -CAfile root -untrusted intermediate leaf` on a leaf+intermediate chain.
pub fn openssl_verify(root_path: &Path, chain_pem: &str, work: &Path) {
    require_binary("openssl", "openssl");
    let blocks = split_pem(chain_pem);
    assert!(
        blocks.len() >= 2,
        "chain must hold leaf and intermediate: {chain_pem}"
    );
    let leaf = work.join("verify-leaf.pem");
    let inter = work.join("verify-intermediate.pem");
    std::fs::write(&leaf, &blocks[0]).unwrap();
    std::fs::write(&inter, blocks[1..].concat()).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root_path)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(": OK"),
        "openssl verify failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serial (lowercase hex) of the first certificate in a PEM chain.
pub fn leaf_serial(chain_pem: &str) -> String {
    let first = &split_pem(chain_pem)[0];
    let (_, pem) = x509_parser::pem::parse_x509_pem(first.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    hex::encode(cert.raw_serial())
}
