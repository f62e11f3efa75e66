//! Faults in the running flow, with the real `phoenix` processes on loopback: the mesh killed and
//! started again (the gateway must reconnect by itself), and invalid configuration files written
//! while the mesh is under load (the running configuration must keep serving every request).

mod common;
mod flow_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flow_support::*;

#[test]
fn mesh_killed_and_restarted_the_gateway_reconnects_by_itself() {
    let mut flow = Flow::start("info");
    let gateway_pid = flow.gateway.as_ref().unwrap().child.id();
    for _ in 0..5 {
        assert_eq!(flow.get("/").0, 200);
    }

    flow.mesh.as_mut().unwrap().kill(); // SIGKILL: no GOAWAY, pooled connections just die
    let (status, body) = flow.get("/");
    assert!(
        status == 502 || status == 503 || status == 504,
        "with the mesh down the gateway answers a clean 5xx, got {status} {body}"
    );

    flow.start_mesh();
    // The gateway was not touched: its pooled connections to the old mesh are dead, and it must
    // notice and connect again.
    flow.wait_ok(Duration::from_secs(30));
    for i in 0..20 {
        let (status, body) = flow.get(&format!("/after-restart/{i}"));
        assert_eq!(status, 200, "request {i} after the mesh restart: {body}");
    }
    let gateway = flow.gateway.as_mut().unwrap();
    assert!(
        gateway.child.try_wait().unwrap().is_none(),
        "the gateway exited:\n{}",
        gateway.log()
    );
    assert_eq!(gateway.child.id(), gateway_pid);
}

fn mesh_file(port: u16, admin: u16, backend: u16, extra: &str) -> String {
    format!(
        r#"domain = "phoenix.test"
[mesh]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
tls_cert = "mesh/cert.pem"
tls_key = "mesh/key.pem"
plaintext_networks = ["127.0.0.0/8"]
[[service]]
name = "app"
servers = ["http://127.0.0.1:{backend}"]
{extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_files_written_under_load_fail_no_request() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = TestCa::init(dir, "phoenix.test");
    ca.issue("mesh.phoenix.test", "mesh");
    let (port, admin, backend_port) = (free_port(), free_port(), free_port());
    let mut cmd = phoenix();
    cmd.args(["whoami", "--listen", &format!("127.0.0.1:{backend_port}")]);
    let mut backend = Proc::start("whoami", cmd, dir);
    wait_for_port(addr(backend_port), &mut backend);
    let config = dir.join("phoenix.toml");
    let valid = mesh_file(port, admin, backend_port, "");
    std::fs::write(&config, &valid).unwrap();
    let mut cmd = phoenix();
    cmd.arg("mesh").arg("--config").arg(&config);
    let mut mesh = Proc::start("mesh", cmd, dir);
    let mesh_addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(mesh_addr, &mut mesh);

    let root = reqwest::Certificate::from_pem(&std::fs::read(ca.root()).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .resolve("mesh.phoenix.test", mesh_addr)
        // Reached by the mesh's name, routed by Host: HTTP/1.1, as the gateway's HTTP/1.1 hop
        // does (over HTTP/2 a Host that differs from :authority is refused as malformed).
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("https://mesh.phoenix.test:{port}/");
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url) = (client.clone(), url.clone());
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .get(&url)
                    .header("host", "app.phoenix.test")
                    .send()
                    .await;
                let good = match r {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    let broken = [
        // Not TOML.
        format!("{valid}\n[[route]\nrule = "),
        // TOML, but a route to a service that does not exist and a rule that does not parse.
        format!("{valid}\n[[route]]\nrule = \"Host(`x`\"\nservice = \"nope\"\n"),
        // A plaintext backend outside plaintext_networks.
        valid.replace(
            &format!("http://127.0.0.1:{backend_port}"),
            "http://192.0.2.1:80",
        ),
        // Empty.
        String::new(),
    ];
    for (i, text) in broken.iter().enumerate() {
        let before = ok.load(Ordering::Relaxed);
        std::fs::write(&config, text).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            ok.load(Ordering::Relaxed) > before + 10,
            "too few requests served after broken file {i}"
        );
    }
    // A valid file is still picked up afterwards.
    std::fs::write(
        &config,
        mesh_file(
            port,
            admin,
            backend_port,
            "[[route]]\nrule = \"Host(`new.phoenix.test`)\"\nservice = \"app\"\n",
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(&url)
            .header("host", "new.phoenix.test")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the valid file was never applied:\n{}",
            mesh.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let log = mesh.log();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} of {} requests failed while invalid files were written:\n{log}",
        failed.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert!(
        log.matches("reload rejected").count() >= 3,
        "each broken file is reported:\n{log}"
    );
}
