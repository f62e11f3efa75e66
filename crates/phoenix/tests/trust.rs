//! `phoenix trust install|uninstall` against the real Debian system store: a plain `curl` (no
//! --cacert) fails against the flow, succeeds after `trust install`, and fails again after
//! `trust uninstall`. Changing the system store needs root; CI runs the tests as root. A guard puts
//! the store back even when the test fails half way.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const STORE: &str = "/usr/local/share/ca-certificates";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Removes what the test may have installed and rebuilds the store, whatever happened.
struct RestoreStore {
    file: PathBuf,
}

impl Drop for RestoreStore {
    fn drop(&mut self) {
        if self.file.exists() {
            let _ = std::fs::remove_file(&self.file);
            let _ = Command::new("update-ca-certificates")
                .arg("--fresh")
                .output();
        }
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// curl with the system store only; returns curl's exit code and the HTTP status.
fn plain_curl(gw: u16) -> (i32, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--resolve", &format!("app.phoenix.test:{gw}:127.0.0.1")])
        .arg(format!("https://app.phoenix.test:{gw}/"))
        .output()
        .expect("curl is installed (Debian package curl)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn fingerprint(up: &Proc) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(fp) = up.log().lines().find_map(|l| {
            l.trim()
                .strip_prefix("root fingerprint:")
                .map(|f| f.trim().to_owned())
        }) {
            return fp;
        }
        assert!(
            Instant::now() < deadline,
            "no fingerprint printed:\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn trust_install_makes_plain_curl_work_and_uninstall_undoes_it() {
    assert!(
        is_root(),
        "this test changes the system trust store ({STORE}) and must run as root (CI does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ca, gw, gw_admin, mesh, mesh_admin, backend) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let config = dir.join("phoenix.toml");
    std::fs::write(
        &config,
        format!(
            r#"domain = "phoenix.test"
[ca]
listen = "127.0.0.1:{ca}"
data_dir = "ca"
domains = ["phoenix.test"]
networks = ["127.0.0.0/8"]
[gateway]
listen = "127.0.0.1:{gw}"
admin_listen = "127.0.0.1:{gw_admin}"
mesh = "https://127.0.0.1:{mesh}"
mesh_name = "mesh.phoenix.test"
[mesh]
listen = "127.0.0.1:{mesh}"
admin_listen = "127.0.0.1:{mesh_admin}"
name = "mesh.phoenix.test"
plaintext_networks = ["127.0.0.0/8"]
[[service]]
name = "app"
servers = ["http://127.0.0.1:{backend}"]
"#
        ),
    )
    .unwrap();
    let mut cmd = phoenix();
    cmd.args(["whoami", "--listen", &format!("127.0.0.1:{backend}")]);
    let mut backend_proc = Proc::start("whoami", cmd, dir);
    wait_for_port(addr(backend), &mut backend_proc);
    let mut cmd = phoenix();
    cmd.arg("up").arg("--config").arg(&config);
    let mut up = Proc::start("up", cmd, dir);
    wait_for_port(addr(gw), &mut up);
    let root = dir.join("ca/root.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    while curl(&root, "app.phoenix.test", addr(gw), "/", &[]).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the flow never answered:\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let fp = fingerprint(&up);
    let _restore = RestoreStore {
        file: Path::new(STORE).join(format!("phoenix-{}.crt", &fp[..8])),
    };

    // Before: the system store does not know the Phoenix root. (curl exit 60: peer certificate
    // cannot be authenticated with known CA certificates.)
    assert_eq!(plain_curl(gw).0, 60, "the root must not be trusted yet");

    // Install from the CA itself, trusting it by fingerprint.
    let mut cmd = phoenix();
    cmd.args([
        "trust",
        "install",
        "--ca-url",
        &format!("https://127.0.0.1:{ca}"),
    ])
    .args(["--ca-fingerprint", &fp]);
    let out = String::from_utf8(run_ok(cmd).stdout).unwrap();
    assert!(out.contains(&format!("phoenix-{}.crt", &fp[..8])), "{out}");
    let installed =
        std::fs::read_to_string(Path::new(STORE).join(format!("phoenix-{}.crt", &fp[..8])))
            .unwrap();
    assert_eq!(
        installed.trim(),
        std::fs::read_to_string(&root).unwrap().trim(),
        "exactly the root is installed"
    );
    assert_eq!(
        plain_curl(gw),
        (0, "200".to_owned()),
        "plain curl trusts the flow"
    );

    // Uninstall by file: curl fails again.
    let mut cmd = phoenix();
    cmd.args(["trust", "uninstall", "--cacert"]).arg(&root);
    let out = String::from_utf8(run_ok(cmd).stdout).unwrap();
    assert!(out.contains("Removed"), "{out}");
    assert!(!Path::new(STORE)
        .join(format!("phoenix-{}.crt", &fp[..8]))
        .exists());
    assert_eq!(plain_curl(gw).0, 60, "trust is gone after uninstall");

    // A leaf is refused: it is not a CA.
    let (leaf, _) = {
        let ca = TestCa::init(&dir.join("other"), "phoenix.test");
        ca.issue("leaf.phoenix.test", "leaf")
    };
    let out = phoenix()
        .args(["trust", "install", "--cacert"])
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a CA certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
