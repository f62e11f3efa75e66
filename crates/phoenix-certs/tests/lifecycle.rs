//! The certificate lifecycle against a real phoenix CA on loopback: obtain over tls-alpn-01 and
//! http-01, hot swap on renewal without dropping connections, restart from disk with the CA
//! down, and back-off while the CA is down followed by renewal when it returns.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    connect, echo, init, served_serial, wait_for, Http01Server, TestCa, TlsEcho, MESH_NAME,
};
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
    assert_eq!(
        chain.len(),
        2,
        "cert.pem holds the leaf and the intermediate"
    );
    phoenix_pki::parse_cert(&chain[0]).unwrap().serial
}

/// The restart, outage, ARI and EAB tests answer http-01 (the gateway's way); the obtain and
/// renewal tests answer tls-alpn-01 (the mesh's way).
fn http01(http: &Http01Server) -> Challenge {
    Challenge::Http01(http.tokens.clone())
}

/// Waits for the manager to install a certificate other than `old`.
async fn wait_for_new_serial(
    installed: &mut tokio::sync::watch::Receiver<Option<CertState>>,
    old: &str,
    limit: Duration,
) {
    tokio::time::timeout(
        limit,
        installed.wait_for(|s| s.as_ref().is_some_and(|s| s.serial != old)),
    )
    .await
    .expect("timed out waiting for a new certificate")
    .unwrap();
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
    assert!(
        connect(listener.addr, &trust.pem, MESH_NAME, &[])
            .await
            .is_err(),
        "nothing to serve yet"
    );

    let state = manager.obtain().await.unwrap();
    assert_eq!(manager.current(), Some(state.clone()));
    assert!(state.not_after > OffsetDateTime::now_utc());

    // Served by name (SNI) and by address (no SNI, default certificate), verified against the root.
    let mut tls = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&tls), state.serial);
    echo(&mut tls, b"hello").await;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let info = phoenix_pki::parse_cert(leaf.as_ref()).unwrap();
    assert_eq!(info.dns_names, vec![MESH_NAME.to_owned()]);
    assert_eq!(
        info.ips,
        vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    let by_ip = connect(listener.addr, &trust.pem, "127.0.0.1", &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&by_ip), state.serial);

    // The challenge certificates were withdrawn after validation.
    assert!(
        connect(listener.addr, &trust.pem, MESH_NAME, &[b"acme-tls/1"])
            .await
            .is_err()
    );

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
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&tls), first.serial);
    assert!(
        format!("{:?}", http.tokens).contains("pending: 0"),
        "tokens withdrawn"
    );

    // A second manager on the same directory (a restart) reuses the stored account and gets a
    // new certificate with a new key.
    let account = std::fs::read(spec.account_path()).unwrap();
    let key = std::fs::read(spec.key_path()).unwrap();
    let again = CertManager::new(spec.clone(), settings, listener.resolver.clone());
    let second = again.obtain().await.unwrap();
    assert_ne!(second.serial, first.serial);
    assert_eq!(std::fs::read(spec.account_path()).unwrap(), account);
    assert_ne!(std::fs::read(spec.key_path()).unwrap(), key);
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
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
    // tls-alpn-01 (the mesh's way): the listener answers the challenge while it serves.
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(manager.clone().run(shutdown.clone()));

    wait_for(Duration::from_secs(30), "the first certificate", || {
        manager.current().is_some()
    })
    .await;
    let first = manager.current().unwrap();
    let mut open = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&open), first.serial);
    echo(&mut open, b"before").await;

    // Scheduled at two thirds of the lifetime, or a little earlier inside the CA's renewal
    // window (RFC 9773: the phoenix CA centres it on two thirds, +-5% of the lifetime).
    wait_for(Duration::from_secs(30), "the schedule", || {
        manager.schedule().is_some()
    })
    .await;
    let lifetime = first.not_after - first.not_before;
    let renew_at = manager.schedule().unwrap().renew_at;
    assert!(renew_at < renewal_due(&first), "{renew_at} vs {first:?}");
    assert!(
        renew_at >= first.not_before + lifetime * 0.6,
        "{renew_at} vs {first:?}"
    );

    // Not due yet: nothing changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(manager.current().unwrap().serial, first.serial);

    let mut installed = manager.subscribe();
    clock.set(renewal_due(&first));
    wait_for_new_serial(&mut installed, &first.serial, Duration::from_secs(30)).await;
    // Back to real time at once, so that the renewed certificate is not due too (if the loop
    // wins this race it renews once more, which is harmless).
    clock.set(OffsetDateTime::now_utc());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    let renewed = manager.current().unwrap();

    // The connection handshaken before the swap keeps working with its certificate...
    echo(&mut open, b"after the swap").await;
    assert_eq!(served_serial(&open), first.serial);
    // ...new handshakes get the renewed one, which is also what is on disk.
    let fresh = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&fresh), renewed.serial);
    assert_eq!(stored_serial(&spec), renewed.serial);
    assert_ne!(renewed.serial, first.serial);
    assert!(renewed.not_after >= first.not_after);
}

#[tokio::test]
async fn restart_serves_from_disk_with_the_ca_down() {
    init();
    let http = Http01Server::start().await;
    let listener = TlsEcho::start().await;
    let mut ca = TestCa::start(listener.addr.port(), http.addr.port()).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir);
    let settings = ca.settings(trust.roots.clone(), http01(&http));
    let obtained = CertManager::new(spec.clone(), settings.clone(), listener.resolver.clone())
        .obtain()
        .await
        .unwrap();
    ca.stop().await;
    drop(listener);

    // A new process: new listener, new resolver, same directory, no CA.
    let restarted = TlsEcho::start().await;
    let manager = Arc::new(CertManager::new(
        spec.clone(),
        settings.clone(),
        restarted.resolver.clone(),
    ));
    assert_eq!(manager.load_from_disk().unwrap(), Some(obtained.clone()));
    let mut tls = connect(restarted.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
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
    let broken = CertManager::new(
        spec.clone(),
        settings,
        phoenix_proxy::tls::CertResolver::new(),
    );
    assert!(broken.load_from_disk().is_err());
}

#[tokio::test]
async fn ca_outage_keeps_the_old_certificate_and_renews_when_it_returns() {
    init();
    let http = Http01Server::start().await;
    let listener = TlsEcho::start().await;
    let mut ca = TestCa::start(listener.addr.port(), http.addr.port()).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&dir);
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let manager = Arc::new(
        CertManager::new(
            spec.clone(),
            ca.settings(trust.roots.clone(), http01(&http)),
            listener.resolver.clone(),
        )
        .with_clock(clock.clone()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(manager.clone().run(shutdown.clone()));
    wait_for(Duration::from_secs(30), "the first certificate", || {
        manager.current().is_some()
    })
    .await;
    let first = manager.current().unwrap();

    ca.stop().await;
    clock.set(renewal_due(&first));
    // Default back-off (1 s, 2 s, ...): two failures within a few seconds.
    wait_for(Duration::from_secs(20), "failed renewal attempts", || {
        manager.consecutive_failures() >= 2
    })
    .await;
    assert_eq!(manager.current().unwrap().serial, first.serial);
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(
        served_serial(&tls),
        first.serial,
        "still serving the old certificate"
    );

    let mut installed = manager.subscribe();
    ca.start_again().await;
    wait_for_new_serial(&mut installed, &first.serial, Duration::from_secs(40)).await;
    clock.set(OffsetDateTime::now_utc());
    assert_eq!(manager.consecutive_failures(), 0);
    shutdown.cancel();
    task.await.unwrap();
    let renewed = manager.current().unwrap();
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&tls), renewed.serial);
    assert_eq!(stored_serial(&spec), renewed.serial);
}

/// RFC 9773: when the CA's renewal window moves into the past (here because the certificate was
/// revoked), the role renews long before two thirds of the lifetime.
#[tokio::test]
async fn renewal_information_brings_renewal_forward() {
    init();
    let http = Http01Server::start().await;
    let listener = TlsEcho::start().await;
    let mut ca = TestCa::start(listener.addr.port(), http.addr.port()).await;
    let trust = trust(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let manager = Arc::new(
        CertManager::new(
            spec(&dir),
            ca.settings(trust.roots.clone(), http01(&http)),
            listener.resolver.clone(),
        )
        .with_clock(clock.clone()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(manager.clone().run(shutdown.clone()));
    wait_for(Duration::from_secs(30), "the first certificate", || {
        manager.current().is_some()
    })
    .await;
    let first = manager.current().unwrap();
    // The loop has read the CA's renewal information (window around two thirds) and will look
    // again after the CA's Retry-After, long before renewing.
    wait_for(Duration::from_secs(30), "the renewal information", || {
        manager
            .schedule()
            .is_some_and(|s| s.next_check < s.renew_at && s.renew_at > clock_now(&clock))
    })
    .await;

    // The operator revokes it (the CA's store is single-process, so briefly stop the CA).
    ca.stop().await;
    phoenix_ca::revoke(&ca.cfg, &first.serial).unwrap();
    ca.start_again().await;

    // Past the CA's Retry-After (clamped to at least a minute), far before two thirds.
    clock.advance(Duration::from_secs(61));
    assert!(clock_now(&clock) < renewal_due(&first) - time::Duration::seconds(60));
    wait_for(Duration::from_secs(30), "the early renewal", || {
        manager.current().unwrap().serial != first.serial
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&tls), manager.current().unwrap().serial);
}

fn clock_now(clock: &ManualClock) -> OffsetDateTime {
    use phoenix_certs::Clock as _;
    clock.now()
}

/// A CA that requires External Account Binding accepts the role only with the EAB credentials.
#[tokio::test]
async fn external_account_binding() {
    init();
    let http = Http01Server::start().await;
    let listener = TlsEcho::start().await;
    let ca = TestCa::start_with(1, http.addr.port(), true).await;
    let trust = trust(&ca).await;

    let dir = tempfile::tempdir().unwrap();
    let without = CertManager::new(
        spec(&dir),
        ca.settings(trust.roots.clone(), http01(&http)),
        listener.resolver.clone(),
    );
    let err = without.obtain().await.unwrap_err();
    assert!(err.to_string().contains("newAccount"), "{err}");
    assert!(!spec(&dir).account_path().exists());

    let mut settings = ca.settings(trust.roots.clone(), http01(&http));
    settings.eab = ca.eab.clone();
    let with = CertManager::new(spec(&dir), settings, listener.resolver.clone());
    let state = with.obtain().await.unwrap();
    let tls = connect(listener.addr, &trust.pem, MESH_NAME, &[])
        .await
        .unwrap();
    assert_eq!(served_serial(&tls), state.serial);
}
