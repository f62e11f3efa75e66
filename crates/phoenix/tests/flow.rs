//! The whole three-hop flow with separate processes on loopback, every certificate issued by the CA
//! over ACME: client --HTTPS--> gateway --HTTPS (mTLS)--> mesh --HTTP--> whoami.

mod common;
mod flow_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use flow_support::*;

#[test]
fn client_reaches_backend_through_verified_hops() {
    let flow = Flow::start("info");

    // A client on 127.0.0.2 trusting only root.pem: 200 from the backend, which sees the client's
    // address first in X-Forwarded-For (set by the gateway, kept by the mesh that trusts the gateway).
    let (status, body) = flow.get_with("/hello", &["--interface", "127.0.0.2"]);
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["path"], "/hello");
    let xff = json["headers"]["x-forwarded-for"][0].as_str().unwrap();
    assert!(xff.starts_with("127.0.0.2"), "X-Forwarded-For: {xff}");
    assert_eq!(json["headers"]["x-forwarded-proto"][0], "https");

    // Both roles report the expiry of the certificate they obtained over ACME on /metrics.
    for (port, name) in [
        (flow.ports.gw_admin, "app.phoenix.test"),
        (flow.ports.mesh_admin, "mesh.phoenix.test"),
    ] {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{port}/metrics"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let series = format!(r#"tls_certificate_not_after_seconds{{name="{name}"}}"#);
        assert!(
            text.contains(&series),
            "{series} missing from /metrics:\n{text}"
        );
    }

    // HTTP/2 from the client works too.
    let (status, _) = flow.get_with("/", &["--http2"]);
    assert_eq!(status, 200);

    // Every certificate chains to the root: the gateway's (checked by curl above) and the mesh's,
    // which openssl reads with the gateway's name as SNI... the mesh only shows it to a client
    // holding a certificate, so take the gateway's own from its state directory.
    let gw_dir = flow.dir.join(".phoenix/gateway");
    let (gw_cert, gw_key) = (gw_dir.join("cert.pem"), gw_dir.join("key.pem"));
    assert!(
        gw_cert.exists(),
        "the gateway keeps its certificate on disk"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&gw_key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the gateway's key is 0600");
    assert!(flow
        .served_serial(
            flow.ports.mesh,
            "mesh.phoenix.test",
            Some((&gw_cert, &gw_key))
        )
        .is_some());

    // The mesh refuses plaintext...
    let plain = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{}/", flow.ports.mesh),
        ])
        .output()
        .unwrap();
    let plain_out = String::from_utf8_lossy(&plain.stdout);
    assert!(
        !plain_out.contains("\"path\""),
        "the mesh answered plaintext HTTP: {plain_out}"
    );
    // ... and a TLS client without the gateway's certificate, even one that trusts the root.
    let (status, _) = curl(
        &flow.root(),
        "mesh.phoenix.test",
        addr(flow.ports.mesh),
        "/",
        &["-H", "Host: app.phoenix.test"],
    );
    assert_eq!(status, 0, "the mesh served a client without a certificate");

    // The HTTP listener redirects to HTTPS with 308.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Host: app.phoenix.test",
        ])
        .arg(format!("http://127.0.0.1:{}/x?y=1", flow.ports.gw_http))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        format!("308 https://app.phoenix.test:{}/x?y=1", flow.ports.gw)
    );
}

#[test]
fn gateway_refuses_a_mesh_outside_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A mesh with a certificate from another CA, under the right name.
    let other = TestCa::init(&dir.join("other"), "phoenix.test");
    let (cert, key) = other.issue("mesh.phoenix.test", "mesh");
    let p = Ports::new();
    let text = topology(&p, "24h")
        .replace(
            "require_client_cert = true",
            &format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"",
                cert.display(),
                key.display()
            ),
        )
        .replace("mtls = true", "mtls = false");
    let config = dir.join("phoenix.toml");
    std::fs::write(&config, text).unwrap();
    let mut init = phoenix();
    init.args(["ca", "init", "--config"]).arg(&config);
    run_ok(init);
    let mut ca = Proc::start(
        "ca",
        {
            let mut c = phoenix();
            c.args(["ca", "serve", "--config"]).arg(&config);
            c
        },
        dir,
    );
    wait_for_port(addr(p.ca), &mut ca);
    let mut backend = Proc::start(
        "whoami",
        {
            let mut c = phoenix();
            c.args(["whoami", "--listen", &format!("127.0.0.1:{}", p.backend)]);
            c
        },
        dir,
    );
    wait_for_port(addr(p.backend), &mut backend);
    let mut mesh = Proc::start(
        "mesh",
        {
            let mut c = phoenix();
            c.args(["mesh", "--config"]).arg(&config);
            c
        },
        dir,
    );
    wait_for_port(addr(p.mesh), &mut mesh);
    let mut gw = Proc::start(
        "gateway",
        {
            let mut c = phoenix();
            c.args(["gateway", "--config"]).arg(&config);
            c
        },
        dir,
    );
    wait_for_port(addr(p.gw), &mut gw);

    let root = dir.join("ca/root.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (status, body) = curl(&root, "app.phoenix.test", addr(p.gw), "/", &[]);
        if status != 0 {
            assert_ne!(
                status, 200,
                "the gateway forwarded to a mesh it cannot verify: {body}"
            );
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never served:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(status, 502);
}

#[test]
fn roles_renew_under_load_and_survive_the_ca_going_away() {
    let mut flow = Flow::start_with("30s", "info");
    let gw_dir = flow.dir.join(".phoenix/gateway");
    let client_cert = (gw_dir.join("cert.pem"), gw_dir.join("key.pem"));
    let serials = |flow: &Flow| {
        (
            flow.served_serial(flow.ports.gw, "app.phoenix.test", None),
            flow.served_serial(
                flow.ports.mesh,
                "mesh.phoenix.test",
                Some((&client_cert.0, &client_cert.1)),
            ),
        )
    };
    let mut gw_seen = std::collections::BTreeSet::new();
    let mut mesh_seen = std::collections::BTreeSet::new();
    let (mut ok, mut failed) = (0, Vec::new());
    // 30-second leaves renew at two thirds (~20 s): 50 s of load sees at least two renewals of each.
    let until = Instant::now() + Duration::from_secs(50);
    while Instant::now() < until {
        let (status, body) = flow.get("/");
        if status == 200 {
            ok += 1;
        } else {
            failed.push((status, body));
        }
        let (g, m) = serials(&flow);
        gw_seen.extend(g);
        mesh_seen.extend(m);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(gw_seen.len() >= 3, "gateway certificates seen: {gw_seen:?}");
    assert!(
        mesh_seen.len() >= 3,
        "mesh certificates seen: {mesh_seen:?}"
    );

    // The CA goes away: both roles keep serving.
    flow.ca.as_mut().unwrap().kill();
    for _ in 0..20 {
        assert_eq!(flow.get("/").0, 200);
    }
    // A restart of either role with the CA down serves from the certificate on disk.
    let mut gw = flow.gateway.take().unwrap();
    assert!(gw.terminate().success(), "the gateway exits 0 on SIGTERM");
    let mut mesh = flow.mesh.take().unwrap();
    assert!(mesh.terminate().success(), "the mesh exits 0 on SIGTERM");
    flow.start_mesh();
    flow.start_gateway();
    flow.wait_ok(Duration::from_secs(10));
}
