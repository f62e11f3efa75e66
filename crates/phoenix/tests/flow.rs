//! The whole three-hop flow with separate processes on loopback, every certificate issued by the CA
//! over ACME: client --HTTPS--> gateway --HTTPS (mTLS)--> mesh --HTTP--> whoami.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

struct Ports {
    ca: u16,
    gw: u16,
    gw_http: u16,
    gw_admin: u16,
    mesh: u16,
    mesh_admin: u16,
    backend: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            ca: free_port(),
            gw: free_port(),
            gw_http: free_port(),
            gw_admin: free_port(),
            mesh: free_port(),
            mesh_admin: free_port(),
            backend: free_port(),
        }
    }
}

fn topology(p: &Ports, leaf_lifetime: &str) -> String {
    format!(
        r#"domain = "phoenix.test"
[ca]
listen = "127.0.0.1:{ca}"
data_dir = "ca"
domains = ["phoenix.test"]
networks = ["127.0.0.0/8"]
leaf_lifetime = "{leaf_lifetime}"
[gateway]
listen = "127.0.0.1:{gw}"
http_listen = "127.0.0.1:{gw_http}"
admin_listen = "127.0.0.1:{gw_admin}"
ca_url = "https://127.0.0.1:{ca}"
mesh = "https://127.0.0.1:{mesh}"
mesh_name = "mesh.phoenix.test"
mtls = true
[mesh]
listen = "127.0.0.1:{mesh}"
admin_listen = "127.0.0.1:{mesh_admin}"
name = "mesh.phoenix.test"
ca_url = "https://127.0.0.1:{ca}"
trusted_proxies = ["127.0.0.1/32"]
plaintext_networks = ["127.0.0.0/8"]
require_client_cert = true
[[service]]
name = "app"
servers = ["http://127.0.0.1:{backend}"]
"#,
        ca = p.ca,
        gw = p.gw,
        gw_http = p.gw_http,
        gw_admin = p.gw_admin,
        mesh = p.mesh,
        mesh_admin = p.mesh_admin,
        backend = p.backend,
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Flow {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    ports: Ports,
    fingerprint: String,
    ca: Option<Proc>,
    mesh: Option<Proc>,
    gateway: Option<Proc>,
    _backend: Proc,
}

impl Flow {
    fn start(leaf_lifetime: &str) -> Flow {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let ports = Ports::new();
        let config = dir.join("phoenix.toml");
        std::fs::write(&config, topology(&ports, leaf_lifetime)).unwrap();
        let mut init = phoenix();
        init.args(["ca", "init", "--config"]).arg(&config);
        let out = String::from_utf8(run_ok(init).stdout).unwrap();
        let fingerprint = out
            .lines()
            .find_map(|l| l.strip_prefix("Root fingerprint (SHA-256): "))
            .unwrap_or_else(|| panic!("no fingerprint in: {out}"))
            .trim()
            .to_owned();

        let mut backend_cmd = phoenix();
        backend_cmd.args([
            "whoami",
            "--listen",
            &format!("127.0.0.1:{}", ports.backend),
            "--name",
            "backend",
        ]);
        let mut backend = Proc::start("whoami", backend_cmd, &dir);
        wait_for_port(addr(ports.backend), &mut backend);

        let mut flow = Flow {
            _tmp: tmp,
            dir,
            config,
            ports,
            fingerprint,
            ca: None,
            mesh: None,
            gateway: None,
            _backend: backend,
        };
        flow.start_ca();
        flow.start_mesh();
        flow.start_gateway();
        flow.wait_ok(Duration::from_secs(60));
        flow
    }

    fn start_ca(&mut self) {
        let mut cmd = phoenix();
        cmd.args(["ca", "serve", "--config"]).arg(&self.config);
        let mut p = Proc::start("ca", cmd, &self.dir);
        wait_for_port(addr(self.ports.ca), &mut p);
        self.ca = Some(p);
    }

    /// The mesh gets the fingerprint on the command line, the gateway from the environment: both
    /// documented ways of bootstrapping trust.
    fn start_mesh(&mut self) {
        let mut cmd = phoenix();
        cmd.args(["mesh", "--config"])
            .arg(&self.config)
            .args(["--ca-fingerprint", &self.fingerprint]);
        let mut p = Proc::start("mesh", cmd, &self.dir);
        wait_for_port(addr(self.ports.mesh), &mut p);
        self.mesh = Some(p);
    }

    fn start_gateway(&mut self) {
        let mut cmd = phoenix();
        cmd.args(["gateway", "--config"])
            .arg(&self.config)
            .env("PHOENIX_CA_FINGERPRINT", &self.fingerprint);
        let mut p = Proc::start("gateway", cmd, &self.dir);
        wait_for_port(addr(self.ports.gw), &mut p);
        self.gateway = Some(p);
    }

    fn root(&self) -> PathBuf {
        self.dir.join("ca/root.pem")
    }

    fn get(&self, path: &str, extra: &[&str]) -> (u16, String) {
        curl(
            &self.root(),
            "app.phoenix.test",
            addr(self.ports.gw),
            path,
            extra,
        )
    }

    fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.get("/", &[]);
            if status == 200 {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = [&self.ca, &self.mesh, &self.gateway]
                    .into_iter()
                    .flatten()
                    .map(|p| format!("---- {} ----\n{}", p.name, p.log()))
                    .collect();
                panic!(
                    "the flow never answered 200 (last {status} {body}):\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Serial of the certificate a TLS listener presents for `name`, read with openssl s_client.
    fn served_serial(
        &self,
        port: u16,
        name: &str,
        client_cert: Option<(&Path, &Path)>,
    ) -> Option<String> {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            name,
            "-CAfile",
        ])
        .arg(self.root());
        if let Some((c, k)) = client_cert {
            cmd.arg("-cert").arg(c).arg("-key").arg(k);
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let begin = text.find("-----BEGIN CERTIFICATE-----")?;
        let end = text.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
        let pem = &text[begin..end];
        let mut x = Command::new("openssl")
            .args(["x509", "-noout", "-serial"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        use std::io::Write;
        x.stdin.take()?.write_all(pem.as_bytes()).ok()?;
        let out = x.wait_with_output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

#[test]
fn client_reaches_backend_through_verified_hops() {
    let flow = Flow::start("24h");

    // A client on 127.0.0.2 trusting only root.pem: 200 from the backend, which sees the client's
    // address first in X-Forwarded-For (set by the gateway, kept by the mesh that trusts the gateway).
    let (status, body) = flow.get("/hello", &["--interface", "127.0.0.2"]);
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["path"], "/hello");
    let xff = json["headers"]["x-forwarded-for"][0].as_str().unwrap();
    assert!(xff.starts_with("127.0.0.2"), "X-Forwarded-For: {xff}");
    assert_eq!(json["headers"]["x-forwarded-proto"][0], "https");

    // HTTP/2 from the client works too.
    let (status, _) = flow.get("/", &["--http2"]);
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
    let mut flow = Flow::start("30s");
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
        let (status, body) = flow.get("/", &[]);
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
        assert_eq!(flow.get("/", &[]).0, 200);
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
