//! Helpers shared by the unit tests: CSRs made with rcgen and with the real `openssl` binary,
//! and a runner for `openssl` commands in a temporary directory.

use std::path::Path;
use std::process::{Command, Output};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

/// A DER CSR for a fresh key of `alg` with the given SAN DNS names, SAN IPs and CN.
pub(crate) fn csr_for(
    alg: &'static rcgen::SignatureAlgorithm,
    dns: &[&str],
    ips: &[&str],
    cn: &str,
) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate_for(alg).expect("key generation");
    let params = csr_params(dns, ips, cn);
    let csr = params.serialize_request(&key).expect("CSR");
    (csr.der().to_vec(), key)
}

/// CSR parameters with the given names (no extensions besides the SAN).
pub(crate) fn csr_params(dns: &[&str], ips: &[&str], cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if !cn.is_empty() {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    params.subject_alt_names = dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().unwrap()))
        .chain(ips.iter().map(|i| SanType::IpAddress(i.parse().unwrap())))
        .collect();
    params
}

/// Run `openssl` with `args` in `dir`.
pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl binary must be installed to run these tests")
}

/// A DER CSR made by `openssl req`. `key` is "rsa:BITS", "ec:CURVE" or "ed25519"; `san` is an
/// openssl subjectAltName value such as "DNS:a.lab,IP:10.0.0.1".
pub(crate) fn openssl_csr(key: &str, subj: &str, san: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec!["req".into(), "-new".into(), "-nodes".into()];
    match key.split_once(':') {
        Some(("ec", curve)) => args.extend([
            "-newkey".into(),
            "ec".into(),
            "-pkeyopt".into(),
            format!("ec_paramgen_curve:{curve}"),
        ]),
        _ => args.extend(["-newkey".into(), key.into()]),
    }
    args.extend([
        "-keyout".into(),
        "key.pem".into(),
        "-subj".into(),
        subj.into(),
        "-addext".into(),
        format!("subjectAltName={san}"),
        "-outform".into(),
        "DER".into(),
        "-out".into(),
        "csr.der".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = openssl(dir.path(), &args);
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dir.path().join("csr.der")).unwrap()
}
