//! Certificate signing request checks.
//!
//! A CSR arrives from the network (ACME finalize), so it is treated as hostile: the
//! self-signature is verified with aws-lc-rs against the CSR's own key, the key must be one of a
//! short list of algorithms and sizes, and only the names are taken from it. Extensions a client
//! asks for are never copied into a certificate; the leaf profile is fixed by the CA.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ECDSA_WITH_SHA512,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use crate::PkiError;

/// Smallest and largest RSA modulus the CA certifies, in bits.
pub(crate) const RSA_MIN_BITS: usize = 2048;
pub(crate) const RSA_MAX_BITS: usize = 4096;

/// The public key types the CA certifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Rsa { bits: usize },
    Ed25519,
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyAlgorithm::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyAlgorithm::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyAlgorithm::Rsa { bits } => write!(f, "RSA {bits}"),
            KeyAlgorithm::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// What the CA takes from a CSR after checking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrInfo {
    /// Lowercased DNS names from the subject CN and the SAN extension, deduplicated, in order.
    pub dns_names: Vec<String>,
    /// IP addresses from the SAN extension (and a CN that is an IP address), deduplicated.
    pub ips: Vec<IpAddr>,
    pub key: KeyAlgorithm,
    /// The DER SubjectPublicKeyInfo, exactly as in the CSR.
    pub spki_der: Vec<u8>,
}

/// Parse a DER CSR, verify its self-signature and check its key is one the CA certifies.
///
/// Errors: [`PkiError::BadCsr`] for malformed input, a bad signature or unsupported name types;
/// [`PkiError::UnsupportedKey`] for a key outside P-256, P-384, RSA 2048..=4096 and Ed25519.
pub fn parse_csr(csr_der: &[u8]) -> Result<CsrInfo, PkiError> {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| PkiError::BadCsr(format!("not a DER PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCsr("trailing data after the request".into()));
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(PkiError::BadCsr(format!(
            "unsupported request version {}",
            info.version.0
        )));
    }
    let spki = &info.subject_pki;
    let key = classify_spki(spki)?;
    verify_signature(
        spki,
        key,
        &csr.signature_algorithm,
        info.raw,
        &csr.signature_value.data,
    )
    .map_err(PkiError::BadCsr)?;

    let mut dns_names: Vec<String> = Vec::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    for cn in info.subject.iter_common_name() {
        let cn = cn
            .as_str()
            .map_err(|_| PkiError::BadCsr("subject CN is not a text string".into()))?;
        match cn.parse::<IpAddr>() {
            Ok(ip) => push_unique(&mut ips, ip),
            Err(_) => push_unique(&mut dns_names, cn.to_ascii_lowercase()),
        }
    }

    let ext_requests = info
        .iter_attributes()
        .filter(|a| {
            matches!(
                a.parsed_attribute(),
                ParsedCriAttribute::ExtensionRequest(_)
            )
        })
        .count();
    if ext_requests > 1 {
        return Err(PkiError::BadCsr(
            "more than one extensionRequest attribute".into(),
        ));
    }
    let mut san_seen = false;
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                if san_seen {
                    return Err(PkiError::BadCsr(
                        "more than one subjectAltName extension".into(),
                    ));
                }
                san_seen = true;
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(d) => {
                            push_unique(&mut dns_names, d.to_ascii_lowercase())
                        }
                        GeneralName::IPAddress(bytes) => push_unique(&mut ips, ip_from_bytes(bytes)?),
                        other => {
                            return Err(PkiError::BadCsr(format!(
                                "unsupported subjectAltName entry {other}; only DNS names and IP addresses can be certified"
                            )))
                        }
                    }
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(PkiError::BadCsr(format!(
                    "unparseable requested extension: {error}"
                )))
            }
            // Any other requested extension is ignored: the leaf profile is fixed by the CA.
            _ => {}
        }
    }
    if dns_names.is_empty() && ips.is_empty() {
        return Err(PkiError::BadCsr("the request names no identifier".into()));
    }
    Ok(CsrInfo {
        dns_names,
        ips,
        key,
        spki_der: spki.raw.to_vec(),
    })
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, item: T) {
    if !v.contains(&item) {
        v.push(item);
    }
}

pub(crate) fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, PkiError> {
    match bytes.len() {
        4 => {
            let b: [u8; 4] = bytes.try_into().unwrap_or_default();
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        }
        16 => {
            let b: [u8; 16] = bytes.try_into().unwrap_or_default();
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
        n => Err(PkiError::BadCsr(format!(
            "IP address entry of {n} bytes (expected 4 or 16)"
        ))),
    }
}

fn ec_curve(spki: &SubjectPublicKeyInfo<'_>) -> Option<Oid<'static>> {
    let params = spki.algorithm.parameters.as_ref()?;
    params.as_oid().ok().map(|o| o.to_owned())
}

/// Decide whether the CA certifies this public key, and what it is.
pub(crate) fn classify_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyAlgorithm, PkiError> {
    let alg = &spki.algorithm.algorithm;
    let key = &spki.subject_public_key.data;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = ec_curve(spki)
            .ok_or_else(|| PkiError::UnsupportedKey("EC key without a named curve".into()))?;
        // Only uncompressed points: that is what every ACME client sends, and JWK conversion
        // needs the two coordinates.
        let (kind, len) = if curve == OID_EC_P256 {
            (KeyAlgorithm::EcdsaP256, 65)
        } else if curve == OID_NIST_EC_P384 {
            (KeyAlgorithm::EcdsaP384, 97)
        } else {
            return Err(PkiError::UnsupportedKey(format!(
                "EC curve {curve} (only P-256 and P-384 are certified)"
            )));
        };
        if key.len() != len || key[0] != 0x04 {
            return Err(PkiError::UnsupportedKey(
                "EC public key is not an uncompressed point of the right size".into(),
            ));
        }
        Ok(kind)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let (modulus, _exponent) = rsa_components(key)
            .ok_or_else(|| PkiError::UnsupportedKey("malformed RSA public key".into()))?;
        let bits = bit_length(modulus);
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(PkiError::UnsupportedKey(format!(
                "RSA key of {bits} bits (allowed: {RSA_MIN_BITS} to {RSA_MAX_BITS})"
            )));
        }
        Ok(KeyAlgorithm::Rsa { bits })
    } else if *alg == OID_SIG_ED25519 {
        if spki.algorithm.parameters.is_some() || key.len() != 32 {
            return Err(PkiError::UnsupportedKey(
                "malformed Ed25519 public key".into(),
            ));
        }
        Ok(KeyAlgorithm::Ed25519)
    } else {
        Err(PkiError::UnsupportedKey(format!(
            "key algorithm {alg} (allowed: ECDSA P-256/P-384, RSA {RSA_MIN_BITS}-{RSA_MAX_BITS}, Ed25519)"
        )))
    }
}

/// Modulus and exponent of a PKCS#1 RSAPublicKey, leading zero bytes removed.
pub(crate) fn rsa_components(pkcs1: &[u8]) -> Option<(&[u8], &[u8])> {
    use x509_parser::public_key::RSAPublicKey;
    let (rest, key) = RSAPublicKey::from_der(pkcs1).ok()?;
    if !rest.is_empty() {
        return None;
    }
    Some((strip_zeros(key.modulus), strip_zeros(key.exponent)))
}

pub(crate) fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

/// Number of significant bits in a big-endian unsigned integer.
pub(crate) fn bit_length(b: &[u8]) -> usize {
    let b = strip_zeros(b);
    match b.first() {
        None => 0,
        Some(first) => (b.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

/// Verify an X.509-style signature (CSR or certificate) made by the key in `spki`.
pub(crate) fn verify_signature(
    spki: &SubjectPublicKeyInfo<'_>,
    key: KeyAlgorithm,
    sig_alg: &AlgorithmIdentifier<'_>,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), String> {
    let oid = &sig_alg.algorithm;
    let alg: &'static dyn VerificationAlgorithm = match key {
        KeyAlgorithm::EcdsaP256 if *oid == OID_SIG_ECDSA_WITH_SHA256 => {
            &signature::ECDSA_P256_SHA256_ASN1
        }
        KeyAlgorithm::EcdsaP256 if *oid == OID_SIG_ECDSA_WITH_SHA384 => {
            &signature::ECDSA_P256_SHA384_ASN1
        }
        KeyAlgorithm::EcdsaP256 if *oid == OID_SIG_ECDSA_WITH_SHA512 => {
            &signature::ECDSA_P256_SHA512_ASN1
        }
        KeyAlgorithm::EcdsaP384 if *oid == OID_SIG_ECDSA_WITH_SHA256 => {
            &signature::ECDSA_P384_SHA256_ASN1
        }
        KeyAlgorithm::EcdsaP384 if *oid == OID_SIG_ECDSA_WITH_SHA384 => {
            &signature::ECDSA_P384_SHA384_ASN1
        }
        KeyAlgorithm::EcdsaP384 if *oid == OID_SIG_ECDSA_WITH_SHA512 => {
            &signature::ECDSA_P384_SHA512_ASN1
        }
        KeyAlgorithm::Rsa { .. } if *oid == OID_PKCS1_SHA256WITHRSA => {
            &signature::RSA_PKCS1_2048_8192_SHA256
        }
        KeyAlgorithm::Rsa { .. } if *oid == OID_PKCS1_SHA384WITHRSA => {
            &signature::RSA_PKCS1_2048_8192_SHA384
        }
        KeyAlgorithm::Rsa { .. } if *oid == OID_PKCS1_SHA512WITHRSA => {
            &signature::RSA_PKCS1_2048_8192_SHA512
        }
        KeyAlgorithm::Ed25519 if *oid == OID_SIG_ED25519 => &signature::ED25519,
        _ => {
            return Err(format!(
                "signature algorithm {oid} is not supported for a {key} key"
            ))
        }
    };
    UnparsedPublicKey::new(alg, &spki.subject_public_key.data[..])
        .verify(msg, sig)
        .map_err(|_| "signature does not verify".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{csr_for, openssl_csr};

    #[test]
    fn accepts_each_supported_key_type() {
        for (alg, expected) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyAlgorithm::EcdsaP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyAlgorithm::EcdsaP384),
            (&rcgen::PKCS_ED25519, KeyAlgorithm::Ed25519),
            (&rcgen::PKCS_RSA_SHA256, KeyAlgorithm::Rsa { bits: 2048 }),
        ] {
            let (der, key) = csr_for(alg, &["A.lab", "b.lab"], &["10.0.0.1"], "a.lab");
            let info = parse_csr(&der).unwrap();
            assert_eq!(info.key, expected);
            assert_eq!(info.dns_names, vec!["a.lab", "b.lab"]);
            assert_eq!(info.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
            assert_eq!(
                info.spki_der,
                rcgen::PublicKeyData::subject_public_key_info(&key)
            );
        }
    }

    #[test]
    fn rejects_flipped_signature_byte() {
        let (mut der, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.lab"], &[], "a.lab");
        let last = der.len() - 1;
        der[last] ^= 0x01;
        assert!(matches!(parse_csr(&der), Err(PkiError::BadCsr(m)) if m.contains("verify")));
    }

    #[test]
    fn rejects_tampered_body() {
        let (mut der, _) = csr_for(&rcgen::PKCS_ED25519, &["aaaa.lab"], &[], "aaaa.lab");
        let pos = der.windows(4).position(|w| w == b"aaaa").unwrap();
        der[pos] = b'b';
        assert!(matches!(parse_csr(&der), Err(PkiError::BadCsr(_))));
    }

    #[test]
    fn rejects_small_rsa_and_garbage() {
        let der = openssl_csr("rsa:1024", "/CN=a.lab", "DNS:a.lab");
        assert!(
            matches!(parse_csr(&der), Err(PkiError::UnsupportedKey(m)) if m.contains("1024")),
            "RSA-1024 must be refused"
        );
        let der = openssl_csr("rsa:2048", "/CN=a.lab", "DNS:a.lab");
        assert_eq!(
            parse_csr(&der).unwrap().key,
            KeyAlgorithm::Rsa { bits: 2048 }
        );
        assert!(matches!(
            parse_csr(b"\x30\x03\x02\x01\x00"),
            Err(PkiError::BadCsr(_))
        ));
        let (mut good, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.lab"], &[], "a.lab");
        good.push(0);
        assert!(matches!(parse_csr(&good), Err(PkiError::BadCsr(m)) if m.contains("trailing")));
    }

    #[test]
    fn rejects_email_san() {
        let der = openssl_csr("ec:P-256", "/CN=a.lab", "DNS:a.lab,email:x@a.lab");
        assert!(
            matches!(parse_csr(&der), Err(PkiError::BadCsr(m)) if m.contains("subjectAltName"))
        );
    }

    #[test]
    fn ip_cn_is_an_ip_and_names_are_deduplicated() {
        let der = openssl_csr(
            "ec:P-384",
            "/CN=10.1.1.1",
            "IP:10.1.1.1,DNS:X.lab,DNS:x.lab",
        );
        let info = parse_csr(&der).unwrap();
        assert_eq!(info.key, KeyAlgorithm::EcdsaP384);
        assert_eq!(info.ips, vec!["10.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.dns_names, vec!["x.lab"]);
    }

    #[test]
    fn bit_length_counts_significant_bits() {
        assert_eq!(bit_length(&[0, 0, 1]), 1);
        assert_eq!(bit_length(&[0x80, 0]), 16);
        assert_eq!(bit_length(&[0x7f, 0]), 15);
        assert_eq!(bit_length(&[]), 0);
    }
}
