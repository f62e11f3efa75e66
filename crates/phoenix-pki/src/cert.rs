//! Reading certificates, and the RFC 8737 tls-alpn-01 challenge certificate.
//!
//! The CA reads back what it issued (for revocation, renewal information and status pages)
//! and validates tls-alpn-01 by inspecting the certificate a client presents; Phoenix's own
//! ACME client builds that certificate. Both sides live here so they agree on the encoding.

use std::net::IpAddr;

use base64::Engine as _;
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::FromDer;

use crate::PkiError;

/// id-pe-acmeIdentifier, RFC 8737 section 6.1.
const OID_ACME_IDENTIFIER: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 31];

/// The parts of a certificate the CA and the roles look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial as lowercase hex of its unsigned value (leading zero bytes removed).
    pub serial: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// RFC 4514-style text of the issuer name.
    pub issuer: String,
    /// RFC 4514-style text of the subject name.
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// RFC 9773 ARI CertID: base64url(AKI keyIdentifier) + "." + base64url(serial DER bytes),
    /// no padding. `None` if the certificate has no authority key identifier.
    pub ari_cert_id: Option<String>,
}

/// Parse a DER certificate.
pub fn parse_cert(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate(
            "trailing data after the certificate".into(),
        ));
    }
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(format!("subjectAltName: {e}")))?;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(d) => dns_names.push(d.to_string()),
            GeneralName::IPAddress(b) => ips.push(
                crate::csr::ip_from_bytes(b)
                    .map_err(|_| PkiError::BadCertificate("malformed IP SAN".into()))?,
            ),
            _ => {}
        }
    }
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        });
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let ari_cert_id = aki.map(|k| format!("{}.{}", b64.encode(k), b64.encode(cert.raw_serial())));
    Ok(CertInfo {
        serial: hex::encode(crate::csr::strip_zeros(cert.raw_serial())),
        dns_names,
        ips,
        issuer: cert.issuer().to_string(),
        subject: cert.subject().to_string(),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        spki_der: cert.public_key().raw.to_vec(),
        ari_cert_id,
    })
}

/// Every CERTIFICATE block of a PEM document, as DER, in order. Other blocks (keys) are
/// skipped. A document without certificates gives an empty list.
pub fn parse_cert_pem_chain(pem: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| {
            c.map(|c| c.as_ref().to_vec())
                .map_err(|e| PkiError::BadCertificate(format!("PEM: {e}")))
        })
        .collect()
}

/// Build the RFC 8737 tls-alpn-01 challenge certificate for `name` (a DNS name, or an IP
/// address per RFC 8738): self-signed, a fresh P-256 key, a SAN with the identifier and the
/// critical acmeIdentifier extension holding SHA-256(`key_authorization`).
///
/// Returns the certificate DER and the PKCS#8 private key DER.
pub fn tls_alpn01_cert(
    name: &str,
    key_authorization: &str,
) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_authorization.as_bytes());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            name.try_into()
                .map_err(|e: rcgen::Error| PkiError::Rejected(format!("{name:?}: {e}")))?,
        ),
    }];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(7);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&crate::ca::random_serial()?));
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest.as_ref())];
    let cert = params.self_signed(&key)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

/// The SHA-256 digest carried in a certificate's RFC 8737 acmeIdentifier extension, or `None`
/// if the certificate has no such extension. The extension must be critical and hold an OCTET
/// STRING of exactly 32 bytes; anything else is [`PkiError::BadCertificate`].
pub fn tls_alpn01_ext_digest(der: &[u8]) -> Result<Option<Vec<u8>>, PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let oid = Oid::from(OID_ACME_IDENTIFIER)
        .map_err(|_| PkiError::Generate("acmeIdentifier OID".into()))?;
    let ext = cert
        .get_extension_unique(&oid)
        .map_err(|_| PkiError::BadCertificate("duplicate acmeIdentifier extension".into()))?;
    let Some(ext) = ext else {
        return Ok(None);
    };
    if !ext.critical {
        return Err(PkiError::BadCertificate(
            "acmeIdentifier extension is not critical (RFC 8737 section 3)".into(),
        ));
    }
    // Authorization ::= OCTET STRING (SIZE (32)): tag 0x04, length 0x20, 32 bytes.
    match ext.value {
        [0x04, 0x20, digest @ ..] if digest.len() == 32 => Ok(Some(digest.to_vec())),
        _ => Err(PkiError::BadCertificate(
            "acmeIdentifier extension is not a 32-byte OCTET STRING".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alpn01_roundtrip() {
        let (der, key) = tls_alpn01_cert("svc.lab", "token.thumbprint").unwrap();
        let digest = tls_alpn01_ext_digest(&der).unwrap().unwrap();
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"token.thumbprint");
        assert_eq!(digest, expected.as_ref());
        let info = parse_cert(&der).unwrap();
        assert_eq!(info.dns_names, vec!["svc.lab"]);
        // The key is a usable PKCS#8 P-256 key matching the certificate.
        let kp = KeyPair::try_from(key.as_slice()).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::subject_public_key_info(&kp),
            info.spki_der
        );
        // The acmeIdentifier extension is critical as RFC 8737 requires.
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(ext.critical);

        let (der, _) = tls_alpn01_cert("10.0.0.7", "k").unwrap();
        assert_eq!(
            parse_cert(&der).unwrap().ips,
            vec!["10.0.0.7".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn certificate_without_acme_extension_gives_none() {
        let key = KeyPair::generate().unwrap();
        let der = CertificateParams::new(vec!["a.lab".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(tls_alpn01_ext_digest(der.der()).unwrap(), None);
        assert!(parse_cert(der.der()).unwrap().ari_cert_id.is_none());
    }

    #[test]
    fn non_critical_or_wrong_size_acme_extension_is_rejected() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["a.lab".to_string()]).unwrap();
        let mut ext = CustomExtension::new_acme_identifier(&[7u8; 32]);
        ext.set_criticality(false);
        params.custom_extensions = vec![ext];
        let der = params.self_signed(&key).unwrap();
        assert!(matches!(
            tls_alpn01_ext_digest(der.der()),
            Err(PkiError::BadCertificate(m)) if m.contains("critical")
        ));

        let mut ext =
            CustomExtension::from_oid_content(OID_ACME_IDENTIFIER, vec![0x04, 0x01, 0xff]);
        ext.set_criticality(true);
        params.custom_extensions = vec![ext];
        let der = params.self_signed(&key).unwrap();
        assert!(matches!(
            tls_alpn01_ext_digest(der.der()),
            Err(PkiError::BadCertificate(m)) if m.contains("32-byte")
        ));
    }

    #[test]
    fn pem_chain_skips_keys_and_keeps_order() {
        let a = rcgen::generate_simple_self_signed(vec!["a.lab".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.lab".into()]).unwrap();
        let pem = format!(
            "{}{}{}",
            a.cert.pem(),
            a.signing_key.serialize_pem(),
            b.cert.pem()
        );
        let chain = parse_cert_pem_chain(&pem).unwrap();
        assert_eq!(chain, vec![a.cert.der().to_vec(), b.cert.der().to_vec()]);
        assert!(parse_cert_pem_chain("").unwrap().is_empty());
        assert!(parse_cert(b"\x30\x00").is_err());
    }
}
