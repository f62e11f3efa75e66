//! `phoenix trace` through the running flow (`phoenix up` with a file on free loopback ports and a
//! separate whoami backend): three hops, HTTPS, HTTPS (mTLS), HTTP, with issuers, TLS versions and
//! times; and a caller outside the gateway's `trace_networks` sees no trace data at all.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Up {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    gw: u16,
    _up: Proc,
    _backend: Proc,
}

/// Starts the flow; only 127.0.0.1 may trace at the gateway (127.0.0.2 is loopback too, but not in
/// `trace_networks`).
fn start() -> Up {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let (ca, gw, gw_http, gw_admin, mesh, mesh_admin, backend) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let config = format!(
        r#"domain = "phoenix.test"
[ca]
listen = "127.0.0.1:{ca}"
data_dir = "ca"
domains = ["phoenix.test"]
networks = ["127.0.0.0/8"]
[gateway]
listen = "127.0.0.1:{gw}"
http_listen = "127.0.0.1:{gw_http}"
admin_listen = "127.0.0.1:{gw_admin}"
mesh = "https://127.0.0.1:{mesh}"
mesh_name = "mesh.phoenix.test"
mtls = true
trace_networks = ["127.0.0.1/32"]
[mesh]
listen = "127.0.0.1:{mesh}"
admin_listen = "127.0.0.1:{mesh_admin}"
name = "mesh.phoenix.test"
trusted_proxies = ["127.0.0.1/32"]
plaintext_networks = ["127.0.0.0/8"]
require_client_cert = true
[[service]]
name = "app"
servers = ["http://127.0.0.1:{backend}"]
"#
    );
    let path = dir.join("phoenix.toml");
    std::fs::write(&path, config).unwrap();

    let mut cmd = phoenix();
    cmd.args(["whoami", "--listen", &format!("127.0.0.1:{backend}")]);
    let mut backend_proc = Proc::start("whoami", cmd, &dir);
    wait_for_port(addr(backend), &mut backend_proc);

    let mut cmd = phoenix();
    cmd.arg("up").arg("--config").arg(&path);
    let mut up = Proc::start("up", cmd, &dir);
    wait_for_port(addr(gw), &mut up);
    let flow = Up {
        _tmp: tmp,
        dir,
        gw,
        _up: up,
        _backend: backend_proc,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = curl(&flow.root(), "app.phoenix.test", addr(gw), "/", &[]);
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flow never answered 200:\n{}",
            flow._up.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    flow
}

impl Up {
    fn root(&self) -> PathBuf {
        self.dir.join("ca/root.pem")
    }

    fn trace(&self, extra: &[&str]) -> std::process::Output {
        let mut cmd = phoenix();
        cmd.arg("trace")
            .arg(format!("https://app.phoenix.test:{}/hello", self.gw))
            .arg("--cacert")
            .arg(self.root())
            .args([
                "--resolve",
                &format!("app.phoenix.test:{}:127.0.0.1", self.gw),
            ])
            .args(extra);
        cmd.output().unwrap()
    }

    /// Response headers of a traced curl request from `source`.
    fn curl_headers(&self, source: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-D", "-"])
            .args(["-H", "X-Phoenix-Trace: 1", "--interface", source])
            .arg("--cacert")
            .arg(self.root())
            .args([
                "--resolve",
                &format!("app.phoenix.test:{}:127.0.0.1", self.gw),
            ])
            .arg(format!("https://app.phoenix.test:{}/", self.gw))
            .output()
            .expect("curl is installed");
        assert!(
            out.status.success(),
            "curl from {source} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    }
}

fn hop_headers(headers: &str) -> usize {
    headers
        .lines()
        .filter(|l| l.starts_with("x-phoenix-trace-hop:"))
        .count()
}

#[test]
fn trace_reports_three_hops_and_only_to_allowed_callers() {
    let flow = start();

    // --json: the whole report, machine-readable.
    let out = flow.trace(&["--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "trace failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_str(&stdout).expect("trace --json parses");
    assert_eq!(t["status"], 200, "{t:#}");
    let hops = t["hops"].as_array().unwrap();
    let shape: Vec<(&str, &str, &str)> = hops
        .iter()
        .map(|h| {
            (
                h["from"].as_str().unwrap(),
                h["to"].as_str().unwrap(),
                h["protocol"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("client", "gateway", "HTTPS"),
            ("gateway", "mesh", "HTTPS"),
            ("mesh", "backend", "HTTP")
        ],
        "{t:#}"
    );
    for h in &hops[..2] {
        assert_eq!(h["tls_version"], "TLSv1.3", "{h:#}");
        assert!(
            h["cipher"]
                .as_str()
                .is_some_and(|c| c.starts_with("TLS13_")),
            "{h:#}"
        );
        assert_eq!(h["verified_ok"], true, "{h:#}");
        let issuer = h["certificate"]["issuer"].as_str().unwrap();
        assert!(
            issuer.contains("Intermediate"),
            "issued by the CA's intermediate: {h:#}"
        );
        assert!(h["certificate"]["not_after"]
            .as_str()
            .is_some_and(|s| s.len() >= 20));
    }
    let names = |h: &serde_json::Value, key: &str| -> Vec<String> {
        h[key]["names"]
            .as_array()
            .map(|a| a.iter().map(|n| n.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    assert!(names(&hops[0], "certificate").contains(&"app.phoenix.test".to_owned()));
    assert!(names(&hops[1], "certificate").contains(&"mesh.phoenix.test".to_owned()));
    assert_eq!(hops[1]["verified"], "internal root");
    // The mesh saw the gateway's client certificate; the client presented none.
    assert!(
        names(&hops[1], "client_cert").contains(&"gateway.phoenix.test".to_owned()),
        "{t:#}"
    );
    assert!(hops[0]["client_cert"].is_null());
    // The backend hop: plaintext, no TLS, from the mesh to the whoami address.
    assert!(hops[2]["tls_version"].is_null() && hops[2]["certificate"].is_null());
    assert_eq!(hops[2]["http"], "HTTP/1.1");
    for h in hops {
        let ms = h["time_ms"].as_f64().unwrap();
        assert!(ms > 0.0 && ms < 10_000.0, "per-hop time: {h:#}");
    }
    // Times nest: the client waited at least as long as the gateway waited for the mesh, and so on.
    let time = |i: usize| hops[i]["time_ms"].as_f64().unwrap();
    assert!(time(0) >= time(1) && time(1) >= time(2), "{t:#}");
    let boundaries = t["boundaries"].as_array().unwrap();
    assert!(boundaries
        .iter()
        .any(|b| b["place"] == "mesh -> backend" && b["state"] == "PLAINTEXT"));
    assert!(t["incomplete"].is_null());

    // The human report: the table and the boundaries.
    let out = flow.trace(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "HOP",
        "client 127.0.0.1:",
        "HTTPS HTTP/",
        "Encryption boundaries (measured):",
        "plaintext boundary: mesh -> backend",
        "decrypts and re-encrypts",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }

    // Allowed caller: both hops report. Caller outside trace_networks: nothing extra at all.
    assert_eq!(hop_headers(&flow.curl_headers("127.0.0.1")), 2);
    let outside = flow.curl_headers("127.0.0.2");
    assert!(outside.starts_with("http/"), "{outside}");
    assert_eq!(hop_headers(&outside), 0, "{outside}");
    assert!(!outside.contains("phoenix-trace"), "{outside}");
}

#[test]
fn trace_fails_clearly_when_the_first_hop_does_not_verify() {
    // A root that is not the flow's: the gateway's certificate does not verify against it.
    let tmp = tempfile::tempdir().unwrap();
    let flow = start();
    let other = TestCa::init(&tmp.path().join("other"), "phoenix.test");
    let mut cmd = phoenix();
    cmd.arg("trace")
        .arg(format!("https://app.phoenix.test:{}/", flow.gw))
        .arg("--cacert")
        .arg(other.root())
        .args([
            "--resolve",
            &format!("app.phoenix.test:{}:127.0.0.1", flow.gw),
            "--json",
        ]);
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "an unverified first hop must fail the trace"
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("still a report");
    let first = &t["hops"][0];
    assert_eq!(first["verified_ok"], false);
    assert!(
        first["verified"]
            .as_str()
            .unwrap()
            .starts_with("NOT VERIFIED"),
        "{first:#}"
    );
}
