//! TLS of the three listeners (gateway, mesh, CA) of the real processes, probed with
//! `openssl s_client`: TLS 1.0 and 1.1 are refused, TLS 1.2 without an AEAD suite is refused,
//! TLS 1.2 and 1.3 negotiate AEAD suites only, and each listener sends a chain (leaf and
//! intermediate) that verifies against the Phoenix root for its name. The broader scan with
//! testssl.sh is `hardening_testssl.rs`.

mod common;
mod flow_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flow_support::*;

/// One `openssl s_client` handshake; returns (handshake completed, output).
fn s_client(
    port: u16,
    name: Option<&str>,
    root: &Path,
    extra: &[&str],
    cert: Option<(&PathBuf, &PathBuf)>,
) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-showcerts",
        "-CAfile",
    ])
    .arg(root)
    .args(extra);
    match name {
        Some(n) => cmd.args(["-servername", n, "-verify_hostname", n]),
        None => cmd.args(["-verify_ip", "127.0.0.1"]),
    };
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (Debian package openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let done = text.contains("-----BEGIN CERTIFICATE-----")
        && !text.contains("Cipher is (NONE)")
        && !text.contains("Cipher    : 0000");
    (done, text)
}

/// The handshake failed because the server said no (a TLS alert), not because this openssl
/// would not even offer the old protocol or suite, which would make the check vacuous.
fn assert_refused_by_server(role: &str, text: &str) {
    assert!(
        !text.contains("no protocols available") && !text.contains("no ciphers available"),
        "{role}: the local openssl refused to offer it, so nothing was tested:\n{text}"
    );
    assert!(
        text.contains("alert"),
        "{role}: no alert from the server:\n{text}"
    );
}

fn cipher_of(text: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Cipher    : "))
        .or_else(|| text.lines().find_map(|l| l.split("Cipher is ").nth(1)))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Role, port, SNI name (none for the CA, reached by IP) and client certificate to present.
type Listener<'a> = (
    &'a str,
    u16,
    Option<&'a str>,
    Option<(&'a PathBuf, &'a PathBuf)>,
);

#[test]
fn listeners_offer_only_tls12_and_tls13_with_aead_suites_and_complete_chains() {
    let flow = Flow::start("warn");
    let root = flow.root();
    let gw_dir = flow.dir.join(".phoenix/gateway");
    let client = (gw_dir.join("cert.pem"), gw_dir.join("key.pem"));
    let listeners: [Listener; 3] = [
        ("gateway", flow.ports.gw, Some("app.phoenix.test"), None),
        // The mesh requires a client certificate: the gateway's own.
        (
            "mesh",
            flow.ports.mesh,
            Some("mesh.phoenix.test"),
            Some((&client.0, &client.1)),
        ),
        ("ca", flow.ports.ca, None, None),
    ];
    // Non-AEAD TLS 1.2 suites (CBC with SHA-1/SHA-2), and static-RSA key exchange.
    let weak = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:\
                ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384:\
                AES128-SHA:AES256-SHA256:AES128-GCM-SHA256:DES-CBC3-SHA:@SECLEVEL=0";
    for (role, port, name, cert) in listeners {
        for old in ["-tls1", "-tls1_1"] {
            let (done, text) = s_client(
                port,
                name,
                &root,
                &[old, "-cipher", "DEFAULT@SECLEVEL=0"],
                cert,
            );
            assert!(!done, "{role}: {old} handshake completed:\n{text}");
            assert_refused_by_server(role, &text);
        }
        let (done, text) = s_client(port, name, &root, &["-tls1_2", "-cipher", weak], cert);
        assert!(
            !done,
            "{role}: a non-AEAD TLS 1.2 suite was accepted:\n{text}"
        );
        assert_refused_by_server(role, &text);
        for version in ["-tls1_2", "-tls1_3"] {
            let (done, text) = s_client(port, name, &root, &[version], cert);
            assert!(done, "{role}: {version} handshake failed:\n{text}");
            let cipher = cipher_of(&text);
            assert!(
                cipher.contains("GCM") || cipher.contains("CHACHA20"),
                "{role}: {version} negotiated {cipher:?}, not an AEAD suite"
            );
            assert!(
                text.contains("Verify return code: 0 (ok)"),
                "{role}: {version}: the chain does not verify against the root for its name:\n{text}"
            );
            let sent = text.matches("-----BEGIN CERTIFICATE-----").count();
            assert!(
                sent >= 2,
                "{role}: {sent} certificate(s) sent, want leaf + intermediate"
            );
        }
    }
}
