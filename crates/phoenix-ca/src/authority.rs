//! The CA's key material, as the CA service uses it: a thin layer over `phoenix_pki::CaMaterial`
//! (root, name-constrained intermediate, leaf and CRL signing) that adds the operator-facing
//! errors ("run `phoenix ca init`") and the few derived values the ACME server needs.
//!
//! Files in `data_dir` (directory 0700, keys 0600): `root.pem`, `root.key`,
//! `intermediate.pem`, `intermediate.key` (written by phoenix-pki) and `ca.redb` (the store).

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::time::OffsetDateTime;
use phoenix_pki::{CaInit, CaMaterial, IssuedCert, LeafRequest, PkiError, RevokedEntry};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::config::CaConfig;
use crate::error::CaError;

pub(crate) const ROOT_CERT: &str = "root.pem";
pub(crate) const STORE_FILE: &str = "ca.redb";

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

fn leaf_request(names: &[SubjectName], lifetime: Duration) -> LeafRequest {
    let mut req = LeafRequest {
        dns_names: Vec::new(),
        ips: Vec::new(),
        lifetime,
        now: OffsetDateTime::now_utc(),
    };
    for n in names {
        match n {
            SubjectName::Dns(d) => req.dns_names.push(d.clone()),
            SubjectName::Ip(ip) => req.ips.push(*ip),
        }
    }
    req
}

fn pki_err(e: PkiError) -> CaError {
    CaError::Pki(e.to_string())
}

/// The loaded CA: root certificate and the intermediate that signs everything else.
pub(crate) struct Authority {
    ca: CaMaterial,
    intermediate_ski: Vec<u8>,
}

/// Writes a file that may already exist (output of `phoenix ca issue`), atomically.
pub(crate) fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp-phoenix");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| CaError::io(&tmp, e))?;
    f.write_all(contents).map_err(|e| CaError::io(&tmp, e))?;
    f.sync_all().map_err(|e| CaError::io(&tmp, e))?;
    // The umask may have narrowed the mode; make sure it is exactly what we asked for.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| CaError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| CaError::io(path, e))
}

/// Creates the data directory, root and intermediate. Refuses to touch an existing CA.
pub(crate) fn create(cfg: &CaConfig) -> Result<(PathBuf, String), CaError> {
    let dir = &cfg.data_dir;
    if CaMaterial::exists(dir) || dir.join(STORE_FILE).exists() {
        return Err(CaError::AlreadyInitialised { dir: dir.clone() });
    }
    let init = CaInit::new(cfg.name.clone(), cfg.domains.clone(), cfg.networks.clone());
    let ca = CaMaterial::generate(&init, OffsetDateTime::now_utc()).map_err(pki_err)?;
    ca.save(dir).map_err(|e| match e {
        PkiError::AlreadyExists(_) => CaError::AlreadyInitialised { dir: dir.clone() },
        other => pki_err(other),
    })?;
    // `save` creates a missing directory 0700 but leaves an existing one as it was; the CA's
    // directory must not be readable by others either way.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| CaError::io(dir, e))?;
    Ok((dir.join(ROOT_CERT), ca.root_fingerprint()))
}

impl Authority {
    /// Loads root and intermediate from `dir`.
    pub(crate) fn load(dir: &Path) -> Result<Authority, CaError> {
        let not_initialised = |detail: String| CaError::NotInitialised {
            dir: dir.to_path_buf(),
            detail,
        };
        if !dir.join(ROOT_CERT).exists() {
            return Err(not_initialised(format!("{ROOT_CERT} is missing")));
        }
        let ca = CaMaterial::load(dir).map_err(|e| match e {
            PkiError::Io { .. } => not_initialised(e.to_string()),
            other => pki_err(other),
        })?;
        let (_, parsed) = X509Certificate::from_der(ca.intermediate_der())
            .map_err(|e| CaError::Pki(format!("intermediate certificate: {e}")))?;
        let intermediate_ski = parsed
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .ok_or_else(|| CaError::Pki("the intermediate has no subject key identifier".into()))?;
        Ok(Authority {
            ca,
            intermediate_ski,
        })
    }

    pub(crate) fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    pub(crate) fn intermediate_pem(&self) -> &str {
        self.ca.intermediate_pem()
    }

    pub(crate) fn intermediate_der(&self) -> &[u8] {
        self.ca.intermediate_der()
    }

    pub(crate) fn fingerprint(&self) -> String {
        self.ca.root_fingerprint()
    }

    /// The key identifier that leaves carry as authority key identifier (RFC 9773 certIDs).
    pub(crate) fn intermediate_key_id(&self) -> &[u8] {
        &self.intermediate_ski
    }

    /// Leaf PEM followed by the intermediate PEM (what ACME and `issue` hand out).
    pub(crate) fn chain_pem(&self, leaf_der: &[u8]) -> String {
        format!(
            "{}{}",
            pem_encode("CERTIFICATE", leaf_der),
            self.ca.intermediate_pem()
        )
    }

    /// Signs a leaf for the key in `csr_der`, which must name exactly `names`.
    pub(crate) fn issue_from_csr(
        &self,
        csr_der: &[u8],
        names: &[SubjectName],
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        self.ca
            .issue_from_csr(csr_der, &leaf_request(names, lifetime))
    }

    /// Signs a leaf for `names` with a fresh P-256 key; returns it with the key (PKCS#8 PEM).
    pub(crate) fn issue_with_new_key(
        &self,
        names: &[SubjectName],
        lifetime: Duration,
    ) -> Result<(IssuedCert, String), CaError> {
        self.ca
            .issue_with_new_key(&leaf_request(names, lifetime))
            .map_err(|e| match e {
                PkiError::Rejected(m) => CaError::Policy(m),
                other => pki_err(other),
            })
    }

    /// A DER CRL, signed by the intermediate, listing `revoked` = (serial hex, time, reason).
    pub(crate) fn crl(&self, revoked: &[(String, OffsetDateTime, u8)]) -> Result<Vec<u8>, CaError> {
        let now = OffsetDateTime::now_utc();
        let entries: Vec<RevokedEntry> = revoked
            .iter()
            .map(|(serial, at, reason)| RevokedEntry {
                serial: serial.clone(),
                revoked_at: *at,
                reason: Some(*reason),
            })
            .collect();
        // Seconds since the epoch increase between any two CRLs a second apart: the monotonic
        // CRL number RFC 5280 5.2.3 asks for, without storing a counter.
        self.ca
            .crl(
                &entries,
                now.unix_timestamp() as u64,
                now,
                Duration::from_secs(3600),
            )
            .map_err(pki_err)
    }
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
    fn init_refuses_overwrite_and_loaded_ca_issues_chaining_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = CaConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("ca"));
        cfg.domains = vec!["phoenix.test".into()];
        cfg.networks = vec!["127.0.0.0/8".parse().unwrap()];
        let (root_path, fp) = create(&cfg).unwrap();
        assert!(root_path.ends_with("root.pem"));
        assert_eq!(fp.len(), 64);
        assert!(matches!(
            create(&cfg),
            Err(CaError::AlreadyInitialised { .. })
        ));
        let ca = Authority::load(&cfg.data_dir).unwrap();
        assert_eq!(ca.fingerprint(), fp);
        let (_, inter) = X509Certificate::from_der(ca.intermediate_der()).unwrap();
        let nc = inter.name_constraints().unwrap().unwrap().value;
        assert_eq!(nc.permitted_subtrees.as_ref().unwrap().len(), 2);
        let (leaf, _key) = ca
            .issue_with_new_key(
                &[SubjectName::Dns("a.phoenix.test".into())],
                Duration::from_secs(3600),
            )
            .unwrap();
        let (_, parsed) = X509Certificate::from_der(&leaf.der).unwrap();
        parsed.verify_signature(Some(inter.public_key())).unwrap();
        assert_eq!(hex::encode(parsed.raw_serial()), leaf.serial);
        assert!(matches!(
            ca.issue_with_new_key(
                &[SubjectName::Dns("a.example.com".into())],
                Duration::from_secs(60)
            ),
            Err(CaError::Policy(_))
        ));
        let crl = ca
            .crl(&[(leaf.serial.clone(), OffsetDateTime::now_utc(), 1)])
            .unwrap();
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
        assert_eq!(
            hex::encode(crl.iter_revoked_certificates().next().unwrap().raw_serial()),
            leaf.serial
        );
    }

    #[test]
    fn missing_ca_says_run_init() {
        let dir = tempfile::tempdir().unwrap();
        let err = Authority::load(dir.path()).err().unwrap();
        assert!(err.to_string().contains("phoenix ca init"), "{err}");
    }
}
