//! `phoenix check`: the seed example checks clean on any machine, and each fixture under
//! `tests/fixtures/check/` (one problem each, its line marked `# <- problem`) is flagged at exactly
//! that line, with a hint, and nothing else is.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check")
}

fn check_json(path: &Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut cmd = phoenix();
    cmd.args(["check", "--json", "--config"])
        .arg(path)
        .args(extra);
    let out = cmd.output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The 1-based line carrying the `# <- problem` marker.
fn marked_line(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .position(|l| l.contains("# <- problem"))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{} has no `# <- problem` marker", path.display()))
}

/// Asserts the file has exactly one finding, of `severity`, at the marked line, naming `place` and
/// with a hint containing `hint`; returns the exit code.
fn assert_flags(path: &Path, severity: &str, place: &str, hint: &str) -> i32 {
    let (code, report) = check_json(path, &[]);
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{}: {report:#}", path.display());
    let f = &findings[0];
    assert_eq!(f["severity"], severity, "{}: {f:#}", path.display());
    assert_eq!(
        f["line"].as_u64(),
        Some(marked_line(path) as u64),
        "{}: wrong line: {f:#}",
        path.display()
    );
    assert!(
        f["place"].as_str().unwrap().contains(place),
        "{}: {f:#}",
        path.display()
    );
    assert!(
        f["hint"].as_str().is_some_and(|h| h.contains(hint)),
        "{}: hint: {f:#}",
        path.display()
    );
    code
}

#[test]
fn seed_example_checks_clean_anywhere() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/phoenix-hypervisor.toml");
    let (code, report) = check_json(&seed, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["errors"], 0, "{report:#}");
    // Its one explicit insecure option is named, not hidden: portainer's self-signed certificate.
    let findings = report["findings"].as_array().unwrap();
    assert!(
        findings.iter().all(|f| f["severity"] == "warning"
            && f["place"] == "service \"portainer\".tls_insecure_skip_verify"),
        "{report:#}"
    );
    // Its addresses are not this machine's: host checks say they were skipped, and why.
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        skipped.iter().any(|s| s.starts_with("gateway.listen")
            && s.contains("not listen on an address of this host")),
        "{skipped:#?}"
    );
    assert!(
        skipped.iter().any(|s| s.starts_with("ca.data_dir")),
        "{skipped:#?}"
    );
}

#[test]
fn each_fixture_is_flagged_at_its_line_with_a_hint() {
    let dir = fixtures();
    let cases = [
        ("unknown-key.toml", "mesh", "fix its spelling"),
        (
            "duplicate-host.toml",
            "route[0].rule",
            "route each host to one service",
        ),
        (
            "never-match.toml",
            "route[0].rule",
            "join alternative hosts",
        ),
        (
            "plaintext-backend.toml",
            "service \"app\".servers[1]",
            "plaintext_networks",
        ),
        (
            "name-outside-ca.toml",
            "mesh.name",
            "add the domain to ca.domains",
        ),
        (
            "listeners-collide.toml",
            "mesh.listen",
            "its own address or port",
        ),
    ];
    for (file, place, hint) in cases {
        let code = assert_flags(&dir.join(file), "error", place, hint);
        assert_eq!(code, 64, "{file}: errors exit 64");
    }
    // Verification switched off is an explicit option: a warning that fails only with --strict.
    let path = dir.join("verification-off.toml");
    assert_eq!(
        assert_flags(
            &path,
            "warning",
            "service \"portal\".tls_insecure_skip_verify",
            "remove this key"
        ),
        0
    );
    assert_eq!(check_json(&path, &["--strict"]).0, 64);
}

#[test]
fn leaf_lifetime_longer_than_the_intermediate_is_flagged_on_the_ca_host() {
    // The CA listens on loopback, so check reads its data_dir; the intermediate there has 30 days left.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("leaf-lifetime.toml");
    std::fs::copy(fixtures().join("leaf-lifetime.toml"), &path).unwrap();
    let ca = tmp.path().join("ca");
    std::fs::create_dir(&ca).unwrap();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "30", "-subj", "/CN=Test Intermediate", "-keyout"])
        .arg(ca.join("intermediate.key"))
        .arg("-out")
        .arg(ca.join("intermediate.pem"))
        .output()
        .expect("openssl is installed (Debian package openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = assert_flags(&path, "error", "ca.leaf_lifetime", "lower leaf_lifetime");
    assert_eq!(code, 64);

    // Without the intermediate (CA not initialised yet) the check is skipped, and says so.
    std::fs::remove_file(ca.join("intermediate.pem")).unwrap();
    let (code, report) = check_json(&path, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert!(
        report["skipped"][0]
            .as_str()
            .unwrap()
            .contains("does not exist yet"),
        "{report:#}"
    );
}

#[test]
fn human_output_points_at_file_line_and_column() {
    let path = fixtures().join("never-match.toml");
    let mut cmd = phoenix();
    cmd.args(["check", "--config"]).arg(&path);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stderr);
    let line = marked_line(&path);
    let expected = format!("{}:{line}:", path.display());
    assert!(
        text.lines().any(|l| l.starts_with(&expected)
            && l.contains(": error: route[0].rule: can never match")
            && l.contains("(hint: ")),
        "{text}"
    );
    let verdict = String::from_utf8_lossy(&out.stdout);
    assert!(
        verdict.contains("FAILED (1 error(s), 0 warning(s))"),
        "{verdict}"
    );
}

#[test]
fn ports_in_use_on_this_host_are_reported() {
    // A mesh on loopback whose port is taken: the host check finds it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("phoenix.toml");
    std::fs::write(
        &path,
        format!(
            "[mesh]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\ntls_cert = \"missing.pem\"\ntls_key = \"missing.key\"\n",
            free_port()
        ),
    )
    .unwrap();
    let (code, report) = check_json(&path, &[]);
    let findings = report["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["place"] == "mesh.listen"
            && f["severity"] == "warning"
            && f["message"].as_str().unwrap().contains("in use")),
        "{report:#}"
    );
    // The certificate files do not exist on this host, where the mesh would run: errors, at their lines.
    for (key, line) in [("mesh.tls_cert", 4), ("mesh.tls_key", 5)] {
        assert!(
            findings
                .iter()
                .any(|f| f["place"] == key && f["severity"] == "error" && f["line"] == line),
            "{key}: {report:#}"
        );
    }
    assert_eq!(code, 64);
    drop(taken);
}
