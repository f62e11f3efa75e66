//! Pure PKI for Phoenix's internal certificate authority.
//!
//! This crate owns every cryptographic decision the CA makes: the root and the name-constrained
//! intermediate ([`CaMaterial`]), the issuance policy ([`IdentifierPolicy`]), CSR checks
//! ([`parse_csr`]), leaf profiles, CRLs, the RFC 8737 tls-alpn-01 certificate and ACME JWS
//! verification ([`jws`]). It performs no network I/O; the only files it touches are the CA's own
//! key and certificate files in [`CaMaterial::save`] / [`CaMaterial::load`]. Keeping this logic
//! free of servers means every rule here can be unit-tested and fuzzed in isolation.
#![forbid(unsafe_code)]

mod ca;
mod cert;
mod csr;
pub mod jws;
mod policy;

use std::path::PathBuf;

pub use ca::{
    CaInit, CaMaterial, IssuedCert, LeafRequest, RevokedEntry, DEFAULT_INTERMEDIATE_LIFETIME,
    DEFAULT_ROOT_LIFETIME,
};
pub use cert::{
    parse_cert, parse_cert_pem_chain, tls_alpn01_cert, tls_alpn01_ext_digest, CertInfo,
};
pub use csr::{parse_csr, CsrInfo, KeyAlgorithm};
pub use policy::{is_valid_dns_name, IdentifierPolicy};

/// Everything that can go wrong in this crate.
///
/// Messages are written for the operator reading a log line: they name the file or the
/// identifier at fault.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a CA file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `save` refuses to overwrite an existing CA file.
    #[error("{} already exists; refusing to overwrite CA material", .0.display())]
    AlreadyExists(PathBuf),
    /// A CA private key file is readable by group or others.
    #[error(
        "{}: private key has mode {mode:o}, which lets other users read it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    /// A private key file could not be parsed or does not match its certificate.
    #[error("bad private key: {0}")]
    BadKey(String),
    /// The CSR is malformed, badly signed, or does not ask for exactly the ordered names.
    #[error("bad CSR: {0}")]
    BadCsr(String),
    /// The key in a CSR is of a type or size the CA does not certify.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// A certificate could not be parsed or is not what was expected.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// An identifier is outside what the CA is allowed to certify.
    #[error("identifier rejected: {0}")]
    Rejected(String),
    /// Building a certificate, key or CRL failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

/// SHA-256 of `der`, lowercase hex without separators (the format `phoenix ca fingerprint`
/// prints and `--root-fingerprint` flags accept).
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

/// [`fingerprint_der`] of the first certificate in a PEM document.
pub fn fingerprint_pem(pem: &str) -> Result<String, PkiError> {
    let certs = parse_cert_pem_chain(pem)?;
    let first = certs
        .first()
        .ok_or_else(|| PkiError::BadCertificate("no CERTIFICATE block in PEM".into()))?;
    Ok(fingerprint_der(first))
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests {
    use super::*;

    /// The CA server shares one `CaMaterial` between request handlers.
    #[test]
    fn shared_types_are_send_and_sync() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<CaMaterial>();
        send_sync::<PkiError>();
        send_sync::<jws::Jws>();
        send_sync::<jws::JwsError>();
    }

    #[test]
    fn fingerprint_of_known_input() {
        // SHA-256("abc") from FIPS 180-2.
        assert_eq!(
            fingerprint_der(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn pem_encode_roundtrips_through_parser() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = pem_encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = parse_cert_pem_chain(&pem).unwrap();
        assert_eq!(back, vec![der.clone()]);
        assert_eq!(fingerprint_pem(&pem).unwrap(), fingerprint_der(&der));
        assert!(matches!(
            fingerprint_pem("nothing here"),
            Err(PkiError::BadCertificate(_))
        ));
    }
}
