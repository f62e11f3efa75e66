//! Real ACME clients against a CA on loopback: certbot (obtain, renew, revoke) and lego
//! (http-01 and tls-alpn-01). They need the Debian packages `certbot` and `lego`; a missing
//! binary fails the test with the package name instead of skipping silently.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::process::Command;

async fn run(cmd: &mut Command, what: &str) -> String {
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    format!("{stdout}\n{stderr}")
}

fn certbot(ca: &TestCa, work: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("certbot");
    cmd.args(args)
        .arg("--server")
        .arg(ca.directory_url())
        .arg("--config-dir")
        .arg(work.join("config"))
        .arg("--work-dir")
        .arg(work.join("work"))
        .arg("--logs-dir")
        .arg(work.join("logs"))
        .arg("--non-interactive")
        .env("REQUESTS_CA_BUNDLE", &ca.root_path);
    cmd
}

async fn revoked_serials(ca: &TestCa) -> Vec<String> {
    use x509_parser::prelude::FromDer;
    let crl = ca
        .https()
        .get(format!("{}/crl", ca.base()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certbot_obtains_renews_and_revokes() {
    require_binary("certbot", "certbot");
    let ca = TestCa::start().await;
    let work = ca.dir.path().join("certbot");
    let port = ca.cfg.acme.http01_port.to_string();
    run(
        certbot(
            &ca,
            &work,
            &[
                "certonly",
                "--standalone",
                "--http-01-port",
                &port,
                "--http-01-address",
                "127.0.0.1",
            ],
        )
        .args([
            "--agree-tos",
            "--register-unsafely-without-email",
            "-d",
            "app.phoenix.test",
        ]),
        "certbot certonly",
    )
    .await;
    let live = work.join("config/live/app.phoenix.test");
    let first = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    openssl_verify(&ca.root_path, &first, ca.dir.path());

    run(
        &mut certbot(
            &ca,
            &work,
            &["renew", "--force-renewal", "--no-random-sleep-on-renew"],
        ),
        "certbot renew",
    )
    .await;
    let renewed = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    openssl_verify(&ca.root_path, &renewed, ca.dir.path());
    assert_ne!(
        leaf_serial(&first),
        leaf_serial(&renewed),
        "renewal must yield a new certificate"
    );

    let cert_path = live.join("cert.pem").to_string_lossy().into_owned();
    run(
        &mut certbot(
            &ca,
            &work,
            &[
                "revoke",
                "--no-delete-after-revoke",
                "--cert-path",
                &cert_path,
            ],
        ),
        "certbot revoke",
    )
    .await;
    let serial = leaf_serial(&renewed);
    assert!(
        revoked_serials(&ca).await.contains(&serial),
        "CRL must list {serial}"
    );
}

fn lego(ca: &TestCa, path: &Path) -> Command {
    let mut cmd = Command::new("lego");
    cmd.arg("--server")
        .arg(ca.directory_url())
        .args([
            "--accept-tos",
            "--email",
            "a@phoenix.test",
            "--domains",
            "app.phoenix.test",
            "--path",
        ])
        .arg(path)
        .env("LEGO_CA_CERTIFICATES", &ca.root_path);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lego_obtains_with_http01_and_tls_alpn01() {
    require_binary("lego", "lego");
    let ca = TestCa::start().await;

    let http_dir = ca.dir.path().join("lego-http");
    let http_port = format!("127.0.0.1:{}", ca.cfg.acme.http01_port);
    run(
        lego(&ca, &http_dir).args(["--http", "--http.port", &http_port, "run"]),
        "lego --http run",
    )
    .await;
    let chain =
        std::fs::read_to_string(http_dir.join("certificates/app.phoenix.test.crt")).unwrap();
    openssl_verify(&ca.root_path, &chain, ca.dir.path());

    let tls_dir = ca.dir.path().join("lego-tls");
    let tls_port = format!("127.0.0.1:{}", ca.cfg.acme.tlsalpn01_port);
    run(
        lego(&ca, &tls_dir).args(["--tls", "--tls.port", &tls_port, "run"]),
        "lego --tls run",
    )
    .await;
    let chain2 =
        std::fs::read_to_string(tls_dir.join("certificates/app.phoenix.test.crt")).unwrap();
    openssl_verify(&ca.root_path, &chain2, ca.dir.path());
    assert_ne!(leaf_serial(&chain), leaf_serial(&chain2));
}
