//! Secrets and explicit insecurity, checked on the real processes: every private key any role
//! wrote is mode 0600 and no key material appears in any log, even at debug level; and
//! `tls_insecure_skip_verify` is announced in the log at every start, not only the first.

mod common;
mod flow_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use flow_support::*;

/// Every file under `dir` holding a PEM private key.
fn key_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("PRIVATE KEY-----")) {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn private_keys_are_0600_and_never_logged() {
    let flow = Flow::start("debug");
    // Some traffic, so the request paths log too.
    for i in 0..5 {
        assert_eq!(flow.get(&format!("/secret-check/{i}")).0, 200);
    }
    let keys = key_files(&flow.dir);
    // The CA's root and intermediate keys, the gateway's and the mesh's leaf keys at least.
    assert!(keys.len() >= 4, "only {} key files: {keys:?}", keys.len());
    let mut material = Vec::new();
    for key in &keys {
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", key.display());
        let text = std::fs::read_to_string(key).unwrap();
        // Base64 lines of the key body: any of them in a log would be a leak.
        material.extend(
            text.lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 40)
                .map(|l| l[..40].to_owned()),
        );
    }
    assert!(!material.is_empty());
    let logs = format!("{}\n{}", flow.logs(), flow.backend.log());
    assert!(
        logs.contains("DEBUG"),
        "the roles did not log at debug level"
    );
    assert!(
        !logs.contains("PRIVATE KEY"),
        "a PEM key header is in the logs"
    );
    for m in &material {
        assert!(
            !logs.contains(m.as_str()),
            "key material {m} is in the logs"
        );
    }
}

#[test]
fn tls_insecure_skip_verify_warns_at_every_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = TestCa::init(dir, "phoenix.test");
    ca.issue("mesh.phoenix.test", "mesh");
    let (port, admin, upstream) = (free_port(), free_port(), free_port());
    let config = dir.join("phoenix.toml");
    std::fs::write(
        &config,
        format!(
            r#"domain = "phoenix.test"
[mesh]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
tls_cert = "mesh/cert.pem"
tls_key = "mesh/key.pem"
[[service]]
name = "legacy"
servers = ["https://127.0.0.1:{upstream}"]
tls_insecure_skip_verify = true
"#
        ),
    )
    .unwrap();
    for start in 0..3 {
        let mut cmd = phoenix();
        cmd.env("PHOENIX_LOG", "info")
            .arg("mesh")
            .arg("--config")
            .arg(&config);
        let mut mesh = Proc::start(&format!("mesh-{start}"), cmd, dir);
        wait_for_port(addr(port), &mut mesh);
        assert!(mesh.terminate().success(), "{}", mesh.log());
        let log = mesh.log();
        let warning = log
            .lines()
            .find(|l| l.contains("tls_insecure_skip_verify"))
            .unwrap_or_else(|| panic!("start {start}: no warning in:\n{log}"));
        assert!(
            warning.contains("WARN") || warning.contains("ERROR"),
            "start {start}: not logged as a warning: {warning}"
        );
        assert!(
            warning.contains("legacy"),
            "the warning names the service: {warning}"
        );
    }
}
