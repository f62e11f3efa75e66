//! The CA's key material: creating the root and the name-constrained intermediate (`init`),
//! loading them, and signing leaves and CRLs with the intermediate.
//!
//! Files in `data_dir` (directory 0700, keys 0600):
//! `root.pem`, `root.key`, `intermediate.pem`, `intermediate.key`, and `ca.redb` (the store).
//! The intermediate carries X.509 name constraints built from `domains` and `networks`; a name
//! type with nothing permitted is excluded entirely (an absent constraint would otherwise leave
//! that type unconstrained, RFC 5280 4.2.1.10). Leaves never outlive the intermediate.
//!
//! This module plays the part the brief assigns to `phoenix-pki` (X.509 primitives): that crate's
//! API contract was not available when this was written, so the CA carries its own implementation
//! built on rcgen and x509-parser.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, NameConstraints,
    PublicKeyData, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use ::time::OffsetDateTime;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::config::{CaConfig, Policy};
use crate::error::CaError;

pub(crate) const ROOT_CERT: &str = "root.pem";
pub(crate) const ROOT_KEY: &str = "root.key";
pub(crate) const INTERMEDIATE_CERT: &str = "intermediate.pem";
pub(crate) const INTERMEDIATE_KEY: &str = "intermediate.key";
pub(crate) const STORE_FILE: &str = "ca.redb";

const ROOT_LIFETIME: Duration = Duration::from_secs(3650 * 86400);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 86400);

/// A name in a certificate: the two ACME identifier types this CA supports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum SubjectName {
    Dns(String),
    Ip(IpAddr),
}

impl SubjectName {
    pub(crate) fn to_text(&self) -> String {
        match self {
            SubjectName::Dns(d) => d.clone(),
            SubjectName::Ip(ip) => ip.to_string(),
        }
    }
}

/// A freshly signed leaf.
pub(crate) struct IssuedLeaf {
    pub der: Vec<u8>,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The loaded CA: root certificate and the intermediate that signs everything else.
pub(crate) struct Authority {
    root_der: Vec<u8>,
    root_pem: String,
    intermediate_der: Vec<u8>,
    intermediate_pem: String,
    intermediate_not_after: OffsetDateTime,
    intermediate_ski: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// SHA-256 of the DER certificate, lowercase hex (the format step-ca prints).
pub(crate) fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn random_serial() -> (SerialNumber, String) {
    // 16 random bytes, first byte in 0x01..=0x7f: positive, no leading zero byte, so the DER
    // INTEGER content equals these bytes (RFC 9773 certIDs and the CRL use them verbatim).
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| CaError::io(path, e))?;
    f.write_all(contents).map_err(|e| CaError::io(path, e))?;
    f.sync_all().map_err(|e| CaError::io(path, e))?;
    // The umask may have narrowed the mode; make sure it is exactly what we asked for.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| CaError::io(path, e))
}

/// Writes a file that may already exist (leaf output of `phoenix ca issue`), atomically.
pub(crate) fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp-phoenix");
    let _ = fs::remove_file(&tmp);
    write_new_file(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(|e| CaError::io(path, e))
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Creates the data directory, root and intermediate. Refuses to touch an existing CA.
pub(crate) fn create(cfg: &CaConfig) -> Result<(PathBuf, String), CaError> {
    let dir = &cfg.data_dir;
    for f in [ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, STORE_FILE] {
        if dir.join(f).exists() {
            return Err(CaError::AlreadyInitialised { dir: dir.clone() });
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CaError::io(dir, e))?;
    // An existing directory keeps its mode with DirBuilder; the CA's must not be readable by others.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| CaError::io(dir, e))?;

    let policy = Policy::new(cfg);
    let start = now() - time::Duration::hours(1);

    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut root = CertificateParams::default();
    root.distinguished_name = subject(&cfg.name, "Root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    root.not_before = start;
    root.not_after = start + ROOT_LIFETIME;
    root.serial_number = Some(random_serial().0);
    let root_cert = root.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root.clone(), &root_key);

    let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut inter = CertificateParams::default();
    inter.distinguished_name = subject(&cfg.name, "Intermediate");
    inter.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    inter.not_before = start;
    inter.not_after = start + INTERMEDIATE_LIFETIME;
    inter.serial_number = Some(random_serial().0);
    inter.use_authority_key_identifier_extension = true;
    inter.name_constraints = Some(name_constraints(&policy));
    let inter_cert = inter.signed_by(&inter_key, &root_issuer)?;

    write_new_file(&dir.join(ROOT_KEY), root_key.serialize_pem().as_bytes(), 0o600)?;
    write_new_file(&dir.join(INTERMEDIATE_KEY), inter_key.serialize_pem().as_bytes(), 0o600)?;
    write_new_file(&dir.join(INTERMEDIATE_CERT), inter_cert.pem().as_bytes(), 0o644)?;
    // root.pem last: its presence is what `open` checks first, so an interrupted init is reported
    // as "incomplete" rather than half-loaded.
    write_new_file(&dir.join(ROOT_CERT), root_cert.pem().as_bytes(), 0o644)?;
    Ok((dir.join(ROOT_CERT), fingerprint(root_cert.der())))
}

fn subject(name: &str, role: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, name);
    dn.push(DnType::CommonName, format!("{name} {role}"));
    dn
}

fn name_constraints(policy: &Policy) -> NameConstraints {
    let mut permitted = Vec::new();
    let mut excluded = Vec::new();
    for d in policy.domains() {
        permitted.push(GeneralSubtree::DnsName(d.clone()));
    }
    for n in policy.networks() {
        permitted.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(n.network(), n.prefix_len())));
    }
    if policy.domains().is_empty() {
        // The empty DNS constraint matches every DNS name: excluding it forbids all of them.
        excluded.push(GeneralSubtree::DnsName(String::new()));
    }
    if policy.networks().is_empty() {
        excluded.push(GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix([0; 4], 0)));
        excluded.push(GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix([0; 16], 0)));
    }
    NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    }
}

fn read_text(dir: &Path, file: &str) -> Result<String, CaError> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|e| CaError::NotInitialised {
        dir: dir.to_path_buf(),
        detail: format!("cannot read {}: {e}", path.display()),
    })
}

fn pem_to_der(pem_text: &str, dir: &Path, file: &str) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem_text.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| CaError::NotInitialised {
            dir: dir.to_path_buf(),
            detail: format!("{file} is not a PEM certificate: {e}"),
        })
}

impl Authority {
    /// Loads root and intermediate from `dir`.
    pub(crate) fn load(dir: &Path) -> Result<Authority, CaError> {
        let root_pem = read_text(dir, ROOT_CERT)?;
        let intermediate_pem = read_text(dir, INTERMEDIATE_CERT)?;
        let key_pem = read_text(dir, INTERMEDIATE_KEY)?;
        let root_der = pem_to_der(&root_pem, dir, ROOT_CERT)?;
        let intermediate_der = pem_to_der(&intermediate_pem, dir, INTERMEDIATE_CERT)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::NotInitialised {
            dir: dir.to_path_buf(),
            detail: format!("{INTERMEDIATE_KEY} is not a usable private key: {e}"),
        })?;
        let (_, parsed) = X509Certificate::from_der(&intermediate_der)
            .map_err(|e| CaError::Pki(format!("{INTERMEDIATE_CERT}: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::NotInitialised {
                dir: dir.to_path_buf(),
                detail: format!("{INTERMEDIATE_KEY} does not belong to {INTERMEDIATE_CERT}"),
            });
        }
        let intermediate_not_after = parsed.validity().not_after.to_datetime();
        let intermediate_ski = parsed
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .ok_or_else(|| CaError::Pki(format!("{INTERMEDIATE_CERT} has no subject key identifier")))?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(intermediate_der.clone()), key)?;
        Ok(Authority {
            root_der,
            root_pem,
            intermediate_der,
            intermediate_pem,
            intermediate_not_after,
            intermediate_ski,
            issuer,
        })
    }

    pub(crate) fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub(crate) fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    pub(crate) fn intermediate_der(&self) -> &[u8] {
        &self.intermediate_der
    }

    pub(crate) fn fingerprint(&self) -> String {
        fingerprint(&self.root_der)
    }

    /// The key identifier that leaves carry as authority key identifier (RFC 9773 certIDs).
    pub(crate) fn intermediate_key_id(&self) -> &[u8] {
        &self.intermediate_ski
    }

    /// Leaf PEM followed by the intermediate PEM (what ACME and `issue` hand out).
    pub(crate) fn chain_pem(&self, leaf_der: &[u8]) -> String {
        let leaf = pem_encode("CERTIFICATE", leaf_der);
        format!("{leaf}{}", self.intermediate_pem)
    }

    /// Signs a leaf for `names` with `public_key`. The caller has applied the policy.
    pub(crate) fn issue_leaf(
        &self,
        public_key: &impl PublicKeyData,
        names: &[SubjectName],
        lifetime: Duration,
        rsa: bool,
    ) -> Result<IssuedLeaf, CaError> {
        if names.is_empty() {
            return Err(CaError::Pki("a certificate needs at least one name".into()));
        }
        let now = now();
        // Backdated a minute for clients whose clock runs slightly behind ours.
        let not_before = now - time::Duration::minutes(1);
        let not_after = (now + lifetime).min(self.intermediate_not_after);
        if not_after <= now {
            return Err(CaError::Pki("the intermediate certificate has expired; the CA must be re-initialised".into()));
        }
        let (serial_number, serial) = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(SubjectName::Dns(first)) = names.iter().find(|n| matches!(n, SubjectName::Dns(_))) {
            if first.len() <= 64 {
                params.distinguished_name.push(DnType::CommonName, first.clone());
            }
        }
        params.subject_alt_names = names
            .iter()
            .map(|n| match n {
                SubjectName::Dns(d) => Ok(SanType::DnsName(d.clone().try_into()?)),
                SubjectName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if rsa {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial_number);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedLeaf {
            der: cert.der().to_vec(),
            serial,
            not_before,
            not_after,
        })
    }

    /// A DER CRL, signed by the intermediate, listing `revoked` = (serial hex, time, reason).
    pub(crate) fn crl(&self, revoked: &[(String, OffsetDateTime, u8)]) -> Result<Vec<u8>, CaError> {
        let now = now();
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at, reason)| {
                let bytes = hex::decode(serial).map_err(|e| CaError::Pki(format!("bad serial {serial}: {e}")))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: *at,
                    reason_code: revocation_reason(*reason),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::hours(1),
            // Seconds since the epoch increase between any two CRLs a second apart, which is
            // the monotonic CRL number RFC 5280 5.2.3 asks for.
            crl_number: SerialNumber::from_slice(&(now.unix_timestamp() as u64).to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.intermediate_ski.clone()),
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }
}

fn revocation_reason(code: u8) -> Option<RevocationReason> {
    Some(match code {
        1 => RevocationReason::KeyCompromise,
        2 => RevocationReason::CaCompromise,
        3 => RevocationReason::AffiliationChanged,
        4 => RevocationReason::Superseded,
        5 => RevocationReason::CessationOfOperation,
        6 => RevocationReason::CertificateHold,
        9 => RevocationReason::PrivilegeWithdrawn,
        10 => RevocationReason::AaCompromise,
        _ => return None,
    })
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Names (DNS and IP SANs) of a DER certificate.
#[cfg(test)]
pub(crate) fn cert_names(der: &[u8]) -> Result<Vec<SubjectName>, CaError> {
    use x509_parser::prelude::GeneralName;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CaError::Pki(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            match gn {
                GeneralName::DNSName(d) => names.push(SubjectName::Dns(d.to_ascii_lowercase())),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_from_bytes(b) {
                        names.push(SubjectName::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

pub(crate) fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_constrained_intermediate_and_issues_chaining_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = CaConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("ca"));
        cfg.domains = vec!["phoenix.test".into()];
        cfg.networks = vec!["127.0.0.0/8".parse().unwrap()];
        let (root_path, fp) = create(&cfg).unwrap();
        assert!(root_path.ends_with("root.pem"));
        assert_eq!(fp.len(), 64);
        assert!(matches!(create(&cfg), Err(CaError::AlreadyInitialised { .. })));
        let ca = Authority::load(&cfg.data_dir).unwrap();
        assert_eq!(ca.fingerprint(), fp);
        let (_, inter) = X509Certificate::from_der(ca.intermediate_der()).unwrap();
        let nc = inter.name_constraints().unwrap().unwrap().value;
        assert_eq!(nc.permitted_subtrees.as_ref().unwrap().len(), 2);
        let key = KeyPair::generate().unwrap();
        let leaf = ca
            .issue_leaf(&key, &[SubjectName::Dns("a.phoenix.test".into())], Duration::from_secs(3600), false)
            .unwrap();
        let (_, parsed) = X509Certificate::from_der(&leaf.der).unwrap();
        parsed.verify_signature(Some(inter.public_key())).unwrap();
        assert_eq!(hex::encode(parsed.raw_serial()), leaf.serial);
        assert_eq!(cert_names(&leaf.der).unwrap(), vec![SubjectName::Dns("a.phoenix.test".into())]);
        let crl = ca.crl(&[(leaf.serial.clone(), now(), 1)]).unwrap();
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
        assert_eq!(hex::encode(crl.iter_revoked_certificates().next().unwrap().raw_serial()), leaf.serial);
    }
}
