//! `phoenix up` with no file: the embedded default on its documented loopback ports, tried the way a
//! new user would (the printed curl command, pasted as is), then Ctrl-C, then a second start that
//! reuses the state.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn start_up(dir: &std::path::Path, name: &str) -> Proc {
    let mut cmd = phoenix();
    cmd.arg("up")
        .current_dir(dir)
        .env_remove("PHOENIX_HOME")
        .env_remove("PHOENIX_CONFIG");
    let mut p = Proc::start(name, cmd, dir);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], 8443)), &mut p);
    p
}

/// Waits for the line `  try:  curl ...` and returns the command after `try:`.
fn printed_curl(p: &Proc) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(line) = p
            .log()
            .lines()
            .find_map(|l| l.trim().strip_prefix("try:").map(str::to_owned))
        {
            return line.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "`phoenix up` never printed a curl command:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fingerprint(p: &Proc) -> String {
    p.log()
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("root fingerprint:")
                .map(|f| f.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no fingerprint printed:\n{}", p.log()))
}

fn sigint(p: &mut Proc) -> std::process::ExitStatus {
    Command::new("kill")
        .arg("-INT")
        .arg(p.child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "`phoenix up` did not stop on Ctrl-C:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn embedded_default_works_as_printed_and_restarts_from_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let mut first = start_up(dir, "up");
    let curl_cmd = printed_curl(&first);
    assert!(curl_cmd.starts_with("curl --cacert "), "{curl_cmd}");
    assert!(
        curl_cmd.contains("https://whoami.phoenix.localhost:8443/"),
        "{curl_cmd}"
    );
    // The command as pasted into a shell.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{curl_cmd} -sS --max-time 10"))
        .current_dir(dir)
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{curl_cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(json["name"], "whoami");
    assert_eq!(json["host"], "whoami.phoenix.localhost:8443");
    let fp = fingerprint(&first);
    assert!(
        sigint(&mut first).success(),
        "Ctrl-C exits 0:\n{}",
        first.log()
    );

    // State lives in ./.phoenix: a second start reuses the CA and the certificates.
    assert!(dir.join(".phoenix/ca/root.pem").exists());
    assert!(dir.join(".phoenix/gateway/cert.pem").exists());
    let mut second = start_up(dir, "up-again");
    let _ = printed_curl(&second);
    assert_eq!(fingerprint(&second), fp, "the second start made a new CA");
    let log = second.log();
    assert!(
        log.contains("serving the certificate kept on disk"),
        "{log}"
    );
    let (status, _) = curl(
        &dir.join(".phoenix/ca/root.pem"),
        "whoami.phoenix.localhost",
        SocketAddr::from(([127, 0, 0, 1], 8443)),
        "/",
        &[],
    );
    assert_eq!(status, 200);
    assert!(sigint(&mut second).success());
}
