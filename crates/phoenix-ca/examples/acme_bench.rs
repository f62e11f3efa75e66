//! Latency of complete ACME flows: starts a CA in-process on loopback, then runs N sequential
//! instant-acme flows (newOrder, http-01, finalize, download) with one account and prints the
//! median, p90 and max.
//!
//! `cargo run -p phoenix-ca --example acme_bench -- 50`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use instant_acme::{
    Account, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use phoenix_ca::{CaConfig, CaServer};

type Tokens = Arc<Mutex<HashMap<String, String>>>;

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");

    let responder = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind responder");
    let mut cfg = CaConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("ca"));
    cfg.domains = vec!["phoenix.test".into()];
    cfg.networks = vec!["127.0.0.0/8".parse().expect("net")];
    cfg.acme.http01_port = responder.local_addr().expect("addr").port();
    cfg.acme.resolve.insert(
        "bench.phoenix.test".into(),
        "127.0.0.1".parse().expect("ip"),
    );
    let report = phoenix_ca::init(&cfg).expect("init");

    let tokens: Tokens = Arc::default();
    let app = axum::Router::new()
        .route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(
                |State(t): State<Tokens>, Path(token): Path<String>| async move {
                    t.lock()
                        .expect("lock")
                        .get(&token)
                        .cloned()
                        .unwrap_or_default()
                },
            ),
        )
        .with_state(tokens.clone());
    tokio::spawn(async move { axum::serve(responder, app).await });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind CA");
    let addr = listener.local_addr().expect("addr");
    cfg.listen = addr;
    let server = CaServer::open(cfg).expect("open");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ca = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));

    let (account, _) = Account::builder_with_root(&report.root_path)
        .expect("client")
        .create(
            &NewAccount {
                contact: &[],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            format!("https://{addr}/acme/directory"),
            None,
        )
        .await
        .expect("account");
    let retry = RetryPolicy::new().initial_delay(Duration::from_millis(20));
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let ids = [Identifier::Dns("bench.phoenix.test".into())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .expect("order");
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.expect("authz");
            let mut ch = authz.challenge(ChallengeType::Http01).expect("http-01");
            tokens
                .lock()
                .expect("lock")
                .insert(ch.token.clone(), ch.key_authorization().as_str().to_owned());
            ch.set_ready().await.expect("ready");
        }
        assert_eq!(
            order.poll_ready(&retry).await.expect("poll"),
            OrderStatus::Ready
        );
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["bench.phoenix.test".to_owned()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).expect("csr");
        order.finalize_csr(csr.der()).await.expect("finalize");
        order.poll_certificate(&retry).await.expect("certificate");
        samples.push(start.elapsed());
    }
    let _ = stop.send(());
    let _ = ca.await;
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{n} ACME flows: median {:?}, p90 {:?}, max {:?}",
        pick(0.5),
        pick(0.9),
        samples.last().copied().unwrap_or_default()
    );
}
