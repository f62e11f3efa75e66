//! Helpers for end-to-end tests that run the real `phoenix` binary on loopback.
#![allow(dead_code)] // each test file uses a different subset

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn phoenix() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phoenix"));
    cmd.env("PHOENIX_LOG", "info");
    cmd
}

/// A free loopback port. Roles take addresses from the topology file, so the test picks a port the
/// kernel just handed out and releases it; the window for a clash is tiny on a test machine.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct Proc {
    pub child: Child,
    pub name: String,
    log: PathBuf,
}

impl Proc {
    pub fn start(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop after SIGTERM:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log());
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!(
                "{} exited with {status} before listening on {addr}:\n{}",
                proc.name,
                proc.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened on {addr}:\n{}",
            proc.name,
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_ok(mut cmd: Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "command failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A CA made by the real `phoenix ca init`, and certificates made by `phoenix ca issue`.
pub struct TestCa {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl TestCa {
    pub fn init(dir: &Path, domain: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("ca.toml");
        std::fs::write(
            &config,
            format!(
                "[ca]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"ca\"\ndomains = [\"{domain}\"]\nnetworks = [\"127.0.0.0/8\"]\n",
                free_port()
            ),
        )
        .unwrap();
        let mut cmd = phoenix();
        cmd.args(["ca", "init", "--config"]).arg(&config);
        run_ok(cmd);
        TestCa {
            dir: dir.to_owned(),
            config,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("ca").join("root.pem")
    }

    /// Issues a certificate for `name` into `dir/<out>`; returns (chain, key).
    pub fn issue(&self, name: &str, out: &str) -> (PathBuf, PathBuf) {
        let out_dir = self.dir.join(out);
        let mut cmd = phoenix();
        cmd.args(["ca", "issue", "--config"])
            .arg(&self.config)
            .args(["--name", name, "--out"])
            .arg(&out_dir);
        run_ok(cmd);
        (out_dir.join("cert.pem"), out_dir.join("key.pem"))
    }
}

/// curl trusting only `root`, resolving `host` to `addr`; returns (status, body).
pub fn curl(
    root: &Path,
    host: &str,
    addr: SocketAddr,
    path: &str,
    extra: &[&str],
) -> (u16, String) {
    let url = format!("https://{host}:{}{path}", addr.port());
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(root)
        .args([
            "--resolve",
            &format!("{host}:{}:{}", addr.port(), addr.ip()),
        ])
        .args(extra)
        .arg(&url)
        .output()
        .expect("curl is installed (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}
