//! The certificate lifecycle against a real phoenix CA on loopback: obtain over tls-alpn-01 and
//! http-01, hot swap on renewal without dropping connections, restart from disk with the CA
//! down, and back-off while the CA is down followed by renewal when it returns.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{connect, echo, init, served_serial, wait_for, Http01Server, TestCa, TlsEcho, MESH_NAME};
use phoenix_certs::{
    bootstrap_trust, CertManager, CertSpec, CertState, Challenge, ManualClock, TrustBundle,
    TrustSource,
};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

async fn trust(ca: &TestCa) -> TrustBundle {
    bootstrap_trust(&TrustSource::Fingerprint {
        ca_url: ca.base(),
        fingerprint: ca.fingerprint.clone(),
    })
    .await
    .unwrap()
}

fn spec(dir: &tempfile::TempDir) -> CertSpec {
    CertSpec {
        names: vec![MESH_NAME.into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        dir: dir.path().join("certs"),
    }
}

fn stored_serial(spec: &CertSpec) -> String {
    let pem = std::fs::read_to_string(spec.cert_path()).unwrap();
    let chain = phoenix_pki::parse_cert_pem_chain(&pem).unwrap();
    assert_eq!(chain.len(), 2, "cert.pem holds the leaf and the intermediate");
    phoenix_pki::parse_cert(&chain[0]).unwrap().serial
}

/// The moment by which renewal is due whatever the CA's renewal window says.
fn renewal_due(state: &CertState) -> OffsetDateTime {
    state.not_before + (state.not_after - state.not_before) * 2 / 3 + time::Duration::seconds(1)
}

#[tokio::test]
async fn obtains_over_tls_alpn01_and_serves_it() {
    init();
    let listener = TlsEcho::start().await;
    let ca = TestCa::start(listener.addr.port(), 1).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir);
    let manager = CertManager::new(
        spec.clone(),
        ca.settings(trust.roots.clone(), Challenge::TlsAlpn01),
        listener.resolver.clone(),
    );
    assert_eq!(manager.load_from_disk().unwrap(), None);
    assert!(connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.is_err(), "nothing to serve yet");

    let state = manager.obtain().await.unwrap();
    assert_eq!(manager.current(), Some(state.clone()));
    assert!(state.not_after > OffsetDateTime::now_utc());

    // Served by name (SNI) and by address (no SNI, default certificate), verified against the root.
    let mut tls = connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&tls), state.serial);
    echo(&mut tls, b"hello").await;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let info = phoenix_pki::parse_cert(leaf.as_ref()).unwrap();
    assert_eq!(info.dns_names, vec![MESH_NAME.to_owned()]);
    assert_eq!(info.ips, vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
    let by_ip = connect(listener.addr, &trust.pem, "127.0.0.1", &[]).await.unwrap();
    assert_eq!(served_serial(&by_ip), state.serial);

    // The challenge certificates were withdrawn after validation.
    assert!(connect(listener.addr, &trust.pem, MESH_NAME, &[b"acme-tls/1"]).await.is_err());

    // On disk: chain, key 0600, account 0600.
    assert_eq!(stored_serial(&spec), state.serial);
    #[cfg(unix)]
    {
        assert_eq!(common::mode(&spec.key_path()), 0o600);
        assert_eq!(common::mode(&spec.account_path()), 0o600);
        assert_eq!(common::mode(&spec.dir), 0o700);
    }
}

#[tokio::test]
async fn obtains_over_http01_and_reuses_the_account() {
    init();
    let http = Http01Server::start().await;
    let listener = TlsEcho::start().await;
    let ca = TestCa::start(1, http.addr.port()).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = CertSpec {
        names: vec![MESH_NAME.into()],
        ips: vec![],
        dir: dir.path().join("certs"),
    };
    let settings = ca.settings(trust.roots.clone(), Challenge::Http01(http.tokens.clone()));
    let manager = CertManager::new(spec.clone(), settings.clone(), listener.resolver.clone());
    let first = manager.obtain().await.unwrap();
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&tls), first.serial);
    assert!(format!("{:?}", http.tokens).contains("pending: 0"), "tokens withdrawn");

    // A second manager on the same directory (a restart) reuses the stored account and gets a
    // new certificate with a new key.
    let account = std::fs::read(spec.account_path()).unwrap();
    let key = std::fs::read(spec.key_path()).unwrap();
    let again = CertManager::new(spec.clone(), settings, listener.resolver.clone());
    let second = again.obtain().await.unwrap();
    assert_ne!(second.serial, first.serial);
    assert_eq!(std::fs::read(spec.account_path()).unwrap(), account);
    assert_ne!(std::fs::read(spec.key_path()).unwrap(), key);
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&tls), second.serial);
}

#[tokio::test]
async fn renewal_swaps_the_certificate_without_dropping_connections() {
    init();
    let listener = TlsEcho::start().await;
    let ca = TestCa::start(listener.addr.port(), 1).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir);
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let manager = Arc::new(
        CertManager::new(
            spec.clone(),
            ca.settings(trust.roots.clone(), Challenge::TlsAlpn01),
            listener.resolver.clone(),
        )
        .with_clock(clock.clone()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(manager.clone().run(shutdown.clone()));

    wait_for(Duration::from_secs(30), "the first certificate", || manager.current().is_some()).await;
    let first = manager.current().unwrap();
    let mut open = connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&open), first.serial);
    echo(&mut open, b"before").await;

    // Not due yet: nothing changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(manager.current().unwrap().serial, first.serial);

    clock.set(renewal_due(&first));
    wait_for(Duration::from_secs(30), "the renewal", || {
        manager.current().unwrap().serial != first.serial
    })
    .await;
    // Back to real time so that the renewed certificate is not due at once.
    clock.set(OffsetDateTime::now_utc());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    let renewed = manager.current().unwrap();

    // The connection handshaken before the swap keeps working with its certificate...
    echo(&mut open, b"after the swap").await;
    assert_eq!(served_serial(&open), first.serial);
    // ...new handshakes get the renewed one, which is also what is on disk.
    let fresh = connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&fresh), renewed.serial);
    assert_eq!(stored_serial(&spec), renewed.serial);
    assert!(renewed.not_after > first.not_after);
}

#[tokio::test]
async fn restart_serves_from_disk_with_the_ca_down() {
    init();
    let listener = TlsEcho::start().await;
    let mut ca = TestCa::start(listener.addr.port(), 1).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir);
    let settings = ca.settings(trust.roots.clone(), Challenge::TlsAlpn01);
    let obtained = CertManager::new(spec.clone(), settings.clone(), listener.resolver.clone())
        .obtain()
        .await
        .unwrap();
    ca.stop().await;
    drop(listener);

    // A new process: new listener, new resolver, same directory, no CA.
    let restarted = TlsEcho::start().await;
    let manager = Arc::new(CertManager::new(spec.clone(), settings.clone(), restarted.resolver.clone()));
    assert_eq!(manager.load_from_disk().unwrap(), Some(obtained.clone()));
    let mut tls = connect(restarted.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&tls), obtained.serial);
    echo(&mut tls, b"served from disk").await;

    // `run` with the CA down keeps serving the stored certificate (renewal is not due).
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(manager.clone().run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(manager.current(), Some(obtained.clone()));
    assert_eq!(manager.consecutive_failures(), 0);
    shutdown.cancel();
    task.await.unwrap();

    // A certificate for other names is not used.
    let other = CertManager::new(
        CertSpec {
            names: vec!["other.phoenix.test".into()],
            ..spec.clone()
        },
        settings.clone(),
        phoenix_proxy::tls::CertResolver::new(),
    );
    assert_eq!(other.load_from_disk().unwrap(), None);

    // A key that does not belong to the chain is an error, not something to serve.
    let foreign = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(spec.key_path(), foreign.serialize_pem()).unwrap();
    let broken = CertManager::new(spec.clone(), settings, phoenix_proxy::tls::CertResolver::new());
    assert!(broken.load_from_disk().is_err());
}

#[tokio::test]
async fn ca_outage_keeps_the_old_certificate_and_renews_when_it_returns() {
    init();
    let listener = TlsEcho::start().await;
    let mut ca = TestCa::start(listener.addr.port(), 1).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir);
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let manager = Arc::new(
        CertManager::new(
            spec.clone(),
            ca.settings(trust.roots.clone(), Challenge::TlsAlpn01),
            listener.resolver.clone(),
        )
        .with_clock(clock.clone()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(manager.clone().run(shutdown.clone()));
    wait_for(Duration::from_secs(30), "the first certificate", || manager.current().is_some()).await;
    let first = manager.current().unwrap();

    ca.stop().await;
    clock.set(renewal_due(&first));
    // Default back-off (1 s, 2 s, ...): two failures within a few seconds.
    wait_for(Duration::from_secs(20), "failed renewal attempts", || {
        manager.consecutive_failures() >= 2
    })
    .await;
    assert_eq!(manager.current().unwrap().serial, first.serial);
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&tls), first.serial, "still serving the old certificate");

    ca.start_again().await;
    wait_for(Duration::from_secs(40), "the renewal after the CA returned", || {
        manager.current().unwrap().serial != first.serial
    })
    .await;
    clock.set(OffsetDateTime::now_utc());
    assert_eq!(manager.consecutive_failures(), 0);
    shutdown.cancel();
    task.await.unwrap();
    let renewed = manager.current().unwrap();
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[]).await.unwrap();
    assert_eq!(served_serial(&tls), renewed.serial);
    assert_eq!(stored_serial(&spec), renewed.serial);
}
