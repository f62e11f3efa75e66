//! Trust bootstrap against a real phoenix CA on loopback, and against an impostor that relays
//! the real root but cannot present a chain to it.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{init, TestCa};
use http_body_util::Full;
use phoenix_certs::{bootstrap_trust, CertsError, TrustSource};
use phoenix_proxy::tls::CertResolver;
use tokio::net::TcpListener;

fn colon_upper(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

#[tokio::test]
async fn fingerprint_bootstrap_trusts_exactly_the_ca_root() {
    init();
    let ca = TestCa::start(1, 1).await;
    let source = TrustSource::Fingerprint {
        ca_url: ca.base(),
        // Operators paste fingerprints in the colon-separated upper-case form too.
        fingerprint: colon_upper(&ca.fingerprint),
    };
    let bundle = bootstrap_trust(&source).await.unwrap();
    assert_eq!(bundle.fingerprint, ca.fingerprint);
    assert_eq!(bundle.roots.len(), 1);
    assert_eq!(
        phoenix_pki::parse_cert_pem_chain(&bundle.pem).unwrap(),
        phoenix_pki::parse_cert_pem_chain(&ca.root_pem).unwrap()
    );

    // The bundle is usable: a client built from it reaches the CA with verification on.
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(
            &phoenix_proxy::tls::client_config(bundle.roots.clone(), &[b"http/1.1"], None),
        ))
        .no_proxy()
        .build()
        .unwrap();
    let health = client
        .get(format!("{}/health", ca.base()))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
}

#[tokio::test]
async fn wrong_fingerprint_is_refused_with_both_values() {
    init();
    let ca = TestCa::start(1, 1).await;
    let wrong = "00".repeat(32);
    let err = bootstrap_trust(&TrustSource::Fingerprint {
        ca_url: ca.base(),
        fingerprint: wrong.clone(),
    })
    .await
    .unwrap_err();
    match &err {
        CertsError::Fingerprint {
            expected, actual, ..
        } => {
            assert_eq!(expected, &wrong);
            assert!(actual.contains(&ca.fingerprint), "{actual}");
        }
        other => panic!("expected a fingerprint error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&wrong) && message.contains(&ca.fingerprint),
        "{message}"
    );

    // A malformed fingerprint is a configuration error, before any connection.
    let err = bootstrap_trust(&TrustSource::Fingerprint {
        ca_url: ca.base(),
        fingerprint: "not-hex".into(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, CertsError::Config(_)), "{err:?}");
}

/// A server in the middle serves the genuine root (whose fingerprint matches) but its own TLS
/// certificate comes from another root: the bootstrap must refuse it.
#[tokio::test]
async fn relayed_root_from_a_server_of_another_ca_is_refused() {
    init();
    let real = TestCa::start(1, 1).await;

    let impostor_ca = phoenix_pki::CaMaterial::generate(
        &phoenix_pki::CaInit::new(
            "Impostor",
            vec!["phoenix.test".into()],
            vec!["127.0.0.0/8".parse().unwrap()],
        ),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let (leaf, key_pem) = impostor_ca
        .issue_with_new_key(&phoenix_pki::LeafRequest {
            dns_names: vec![],
            ips: vec!["127.0.0.1".parse().unwrap()],
            lifetime: Duration::from_secs(3600),
            now: time::OffsetDateTime::now_utc(),
        })
        .unwrap();
    let resolver = CertResolver::new();
    resolver.set_default(
        phoenix_proxy::tls::certified_key_from_pem(&leaf.chain_pem, &key_pem).unwrap(),
    );
    let acceptor =
        tokio_rustls::TlsAcceptor::from(phoenix_proxy::tls::server_config(resolver, None));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let relayed = real.root_pem.clone();
    let server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let relayed = relayed.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    let body = relayed.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });

    let err = bootstrap_trust(&TrustSource::Fingerprint {
        ca_url: format!("https://{addr}"),
        fingerprint: real.fingerprint.clone(),
    })
    .await
    .unwrap_err();
    match &err {
        CertsError::Fingerprint {
            expected,
            actual,
            detail,
        } => {
            assert_eq!(expected, &real.fingerprint);
            assert!(detail.contains("does not chain"), "{detail}");
            assert!(!actual.is_empty());
        }
        other => panic!("expected a fingerprint error, got {other:?}"),
    }

    // The impostor's own root, with its own fingerprint, would be a consistent answer: checks
    // that the failure above is about the chain, not about the relay mechanics.
    let own = bootstrap_trust(&TrustSource::Fingerprint {
        ca_url: format!("https://{addr}"),
        fingerprint: impostor_ca.root_fingerprint(),
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&own, CertsError::Fingerprint { actual, .. } if actual.contains(&real.fingerprint)),
        "{own:?}"
    );
    server.abort();
}

#[tokio::test]
async fn root_file_and_pem_sources() {
    init();
    let ca = TestCa::start(1, 1).await;
    let path = ca.cfg.data_dir.join("root.pem");
    let from_file = bootstrap_trust(&TrustSource::RootFile(path.clone()))
        .await
        .unwrap();
    assert_eq!(from_file.fingerprint, ca.fingerprint);
    assert_eq!(from_file.roots.len(), 1);
    let from_pem = bootstrap_trust(&TrustSource::Pem(ca.root_pem.clone()))
        .await
        .unwrap();
    assert_eq!(from_pem.fingerprint, ca.fingerprint);

    let missing = bootstrap_trust(&TrustSource::RootFile(ca.dir.path().join("nope.pem")))
        .await
        .unwrap_err();
    assert!(matches!(missing, CertsError::Io { .. }), "{missing:?}");
    let empty = bootstrap_trust(&TrustSource::Pem("no certificate here".into()))
        .await
        .unwrap_err();
    assert!(matches!(empty, CertsError::Config(_)), "{empty:?}");
}
