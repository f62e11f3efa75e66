//! The whole flow as separate `phoenix` processes on loopback (CA, mesh, gateway, whoami), every
//! certificate obtained over ACME: the flow, fault and secret-handling tests kill, restart and inspect
//! single roles while the others keep running. The mesh gets the CA fingerprint as
//! `--ca-fingerprint`, the other roles from `PHOENIX_CA_FINGERPRINT`: both documented ways are used.
#![allow(dead_code)] // each test file uses its own subset

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;

pub struct Ports {
    pub ca: u16,
    pub gw: u16,
    pub gw_http: u16,
    pub gw_admin: u16,
    pub mesh: u16,
    pub mesh_admin: u16,
    pub backend: u16,
}

impl Ports {
    /// A free loopback port for every listener.
    pub fn new() -> Ports {
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

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub struct Flow {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ports: Ports,
    pub fingerprint: String,
    pub ca: Option<Proc>,
    pub mesh: Option<Proc>,
    pub gateway: Option<Proc>,
    pub backend: Proc,
    log_level: &'static str,
}

impl Flow {
    /// Starts every role with `PHOENIX_LOG=log_level` and waits for a 200 through the chain.
    pub fn start(log_level: &'static str) -> Flow {
        Flow::start_with("24h", log_level)
    }

    /// As [`Flow::start`], with the CA issuing leaves of `leaf_lifetime`.
    pub fn start_with(leaf_lifetime: &str, log_level: &'static str) -> Flow {
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
        let mut cmd = phoenix();
        cmd.args([
            "whoami",
            "--listen",
            &format!("127.0.0.1:{}", ports.backend),
            "--name",
            "backend",
        ]);
        let mut backend = Proc::start("whoami", cmd, &dir);
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
            backend,
            log_level,
        };
        flow.start_ca();
        flow.start_mesh();
        flow.start_gateway();
        flow.wait_ok(Duration::from_secs(60));
        flow
    }

    fn role(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = phoenix();
        cmd.env("PHOENIX_LOG", self.log_level)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("PHOENIX_CA_FINGERPRINT", &self.fingerprint);
        cmd
    }

    /// The mesh takes the fingerprint on its command line.
    fn mesh_command(&self) -> std::process::Command {
        let mut cmd = phoenix();
        cmd.env("PHOENIX_LOG", self.log_level)
            .env_remove("PHOENIX_CA_FINGERPRINT")
            .args(["mesh", "--config"])
            .arg(&self.config)
            .args(["--ca-fingerprint", &self.fingerprint]);
        cmd
    }

    pub fn start_ca(&mut self) {
        let cmd = self.role(&["ca", "serve"]);
        let mut p = Proc::start("ca", cmd, &self.dir);
        wait_for_port(addr(self.ports.ca), &mut p);
        self.ca = Some(p);
    }

    pub fn start_mesh(&mut self) {
        let cmd = self.mesh_command();
        let name = format!(
            "mesh-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        let mut p = Proc::start(&name, cmd, &self.dir);
        wait_for_port(addr(self.ports.mesh), &mut p);
        self.mesh = Some(p);
    }

    pub fn start_gateway(&mut self) {
        let cmd = self.role(&["gateway"]);
        let mut p = Proc::start("gateway", cmd, &self.dir);
        wait_for_port(addr(self.ports.gw), &mut p);
        self.gateway = Some(p);
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("ca/root.pem")
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.get_with(path, &[])
    }

    /// A request through the gateway with extra curl arguments.
    pub fn get_with(&self, path: &str, extra: &[&str]) -> (u16, String) {
        curl(
            &self.root(),
            "app.phoenix.test",
            addr(self.ports.gw),
            path,
            extra,
        )
    }

    /// Serial of the certificate a TLS listener presents for `name`, read with openssl s_client.
    pub fn served_serial(
        &self,
        port: u16,
        name: &str,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Option<String> {
        use std::io::Write;
        use std::process::{Command, Stdio};
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
        let out = cmd.stdin(Stdio::null()).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let begin = text.find("-----BEGIN CERTIFICATE-----")?;
        let end = text.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
        let mut x509 = Command::new("openssl")
            .args(["x509", "-noout", "-serial"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        x509.stdin
            .take()?
            .write_all(text[begin..end].as_bytes())
            .ok()?;
        let out = x509.wait_with_output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn logs(&self) -> String {
        [&self.ca, &self.mesh, &self.gateway]
            .into_iter()
            .flatten()
            .map(|p| format!("---- {} ----\n{}", p.name, p.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.get("/");
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the flow never answered 200 (last {status} {body}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

pub fn topology(p: &Ports, leaf_lifetime: &str) -> String {
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
