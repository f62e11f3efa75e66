//! The CA's own key material and everything it signs.
//!
//! A self-signed root signs one intermediate; the intermediate carries critical X.509 name
//! constraints (the domains and networks from the topology), so even a stolen intermediate key
//! cannot mint a certificate that verifies for a public name. The intermediate signs every leaf
//! and the CRL. Leaves are built only from the CA's own profile and the requester's public key:
//! nothing a client writes in a CSR beyond its names and key reaches a certificate.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CidrSubnet,
    CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::csr::{classify_spki, parse_csr, verify_signature, KeyAlgorithm};
use crate::policy::{is_valid_dns_name, IdentifierPolicy};
use crate::{fingerprint_der, parse_cert_pem_chain, pem_encode, PkiError};

const ROOT_CERT_FILE: &str = "root.pem";
const ROOT_KEY_FILE: &str = "root.key";
const INTERMEDIATE_CERT_FILE: &str = "intermediate.pem";
const INTERMEDIATE_KEY_FILE: &str = "intermediate.key";
const CA_FILES: [&str; 4] = [
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    INTERMEDIATE_CERT_FILE,
    INTERMEDIATE_KEY_FILE,
];

/// How far back CA certificates start, so hosts with a slightly slow clock accept them at once.
const CA_BACKDATE: time::Duration = time::Duration::minutes(5);
/// How far back leaves start, for the same reason.
const LEAF_BACKDATE: time::Duration = time::Duration::minutes(1);
/// The X.520 upper bound for a commonName.
const MAX_CN_LEN: usize = 64;
/// id-ce-basicConstraints (RFC 5280 section 4.2.1.9).
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];

/// Ten years (of 365 days): the default root lifetime.
pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Five years (of 365 days): the default intermediate lifetime.
pub const DEFAULT_INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// What a new CA is created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInit {
    /// Human name, used in the subjects ("<name> Root", "<name> Intermediate").
    pub name: String,
    /// DNS domains the intermediate may certify (each domain and every name under it).
    pub domains: Vec<String>,
    /// IP networks the intermediate may certify.
    pub networks: Vec<IpNet>,
    /// Default 10 years.
    pub root_lifetime: Duration,
    /// Default 5 years; never longer than the root.
    pub intermediate_lifetime: Duration,
}

impl CaInit {
    /// A CA description with the default lifetimes.
    pub fn new(name: impl Into<String>, domains: Vec<String>, networks: Vec<IpNet>) -> Self {
        CaInit {
            name: name.into(),
            domains,
            networks,
            root_lifetime: DEFAULT_ROOT_LIFETIME,
            intermediate_lifetime: DEFAULT_INTERMEDIATE_LIFETIME,
        }
    }
}

/// What to put in a leaf certificate. The CA decides the profile; this only says which names,
/// for how long, and what "now" is (so tests and renewals control time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafRequest {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub lifetime: Duration,
    pub now: OffsetDateTime,
}

/// A certificate the intermediate signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// Lowercase hex of the 16 serial bytes (32 characters).
    pub serial: String,
    pub der: Vec<u8>,
    /// The leaf alone.
    pub pem: String,
    /// The leaf followed by the intermediate: what a TLS server presents.
    pub chain_pem: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// One revoked certificate for [`CaMaterial::crl`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Serial as hex (as in [`IssuedCert::serial`]).
    pub serial: String,
    pub revoked_at: OffsetDateTime,
    /// RFC 5280 section 5.3.1 reason code.
    pub reason: Option<u8>,
}

/// The root and intermediate certificates and keys.
pub struct CaMaterial {
    root_pem: String,
    root_der: Vec<u8>,
    root_key: KeyPair,
    intermediate_pem: String,
    intermediate_der: Vec<u8>,
    /// Owns the intermediate key; the issuer name and key identifier come from the certificate
    /// itself so leaves chain to it byte for byte.
    issuer: Issuer<'static, KeyPair>,
    intermediate_ski: Vec<u8>,
    intermediate_not_after: OffsetDateTime,
    policy: IdentifierPolicy,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field("root_fingerprint", &self.root_fingerprint())
            .field("intermediate_not_after", &self.intermediate_not_after)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// Create a new root (ECDSA P-256) and a name-constrained intermediate (P-256).
    pub fn generate(init: &CaInit, now: OffsetDateTime) -> Result<CaMaterial, PkiError> {
        let name = init.name.trim();
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(PkiError::Generate(
                "the CA name must be non-empty printable text".into(),
            ));
        }
        if name.len() + " Intermediate".len() > MAX_CN_LEN {
            return Err(PkiError::Generate(format!(
                "the CA name {name:?} is too long (at most {} bytes)",
                MAX_CN_LEN - " Intermediate".len()
            )));
        }
        let mut domains: Vec<String> = Vec::new();
        for d in &init.domains {
            let d = d.trim().to_ascii_lowercase();
            if !is_valid_dns_name(&d) || d.starts_with("*.") {
                return Err(PkiError::Generate(format!(
                    "CA domain {d:?} is not a valid DNS name (no wildcard, no trailing dot)"
                )));
            }
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        let mut networks: Vec<IpNet> = Vec::new();
        for n in &init.networks {
            // Name constraints hold a network address and mask; host bits must be zero.
            let n = n.trunc();
            if !networks.contains(&n) {
                networks.push(n);
            }
        }
        if domains.is_empty() && networks.is_empty() {
            return Err(PkiError::Generate(
                "the CA needs at least one domain or network: an intermediate without name \
                 constraints could certify any name"
                    .into(),
            ));
        }

        let root_not_after = add_std(now, init.root_lifetime)?;
        let inter_not_after = add_std(now, init.intermediate_lifetime)?.min(root_not_after);
        let not_before = now - CA_BACKDATE;

        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut root = CertificateParams::default();
        root.distinguished_name = common_name(&format!("{name} Root"));
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root.not_before = not_before;
        root.not_after = root_not_after;
        root.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, &root_key);

        let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut inter = CertificateParams::default();
        inter.distinguished_name = common_name(&format!("{name} Intermediate"));
        inter.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        inter.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        inter.name_constraints = Some(name_constraints(&domains, &networks));
        inter.use_authority_key_identifier_extension = true;
        inter.not_before = not_before;
        inter.not_after = inter_not_after;
        inter.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let inter_cert = inter.signed_by(&inter_key, &root_issuer)?;
        drop(root_issuer);

        CaMaterial::from_parts(
            root_cert.der().to_vec(),
            root_key,
            inter_cert.der().to_vec(),
            inter_key,
        )
    }

    /// Check that the parts fit together and derive the issuer and policy.
    fn from_parts(
        root_der: Vec<u8>,
        root_key: KeyPair,
        intermediate_der: Vec<u8>,
        inter_key: KeyPair,
    ) -> Result<CaMaterial, PkiError> {
        let (intermediate_ski, intermediate_not_after, policy) = {
            let root = parse_x509(&root_der, ROOT_CERT_FILE)?;
            let inter = parse_x509(&intermediate_der, INTERMEDIATE_CERT_FILE)?;
            if root_key.subject_public_key_info() != root.public_key().raw {
                return Err(PkiError::BadKey(format!(
                    "{ROOT_KEY_FILE} does not belong to the certificate in {ROOT_CERT_FILE}"
                )));
            }
            if inter_key.subject_public_key_info() != inter.public_key().raw {
                return Err(PkiError::BadKey(format!(
                    "{INTERMEDIATE_KEY_FILE} does not belong to the certificate in \
                     {INTERMEDIATE_CERT_FILE}"
                )));
            }
            if !root.is_ca() || !inter.is_ca() {
                return Err(PkiError::BadCertificate(format!(
                    "{ROOT_CERT_FILE} and {INTERMEDIATE_CERT_FILE} must both be CA certificates"
                )));
            }
            let root_alg = classify_spki(root.public_key())?;
            verify_signature(
                root.public_key(),
                root_alg,
                &inter.signature_algorithm,
                inter.tbs_certificate.as_ref(),
                &inter.signature_value.data,
            )
            .map_err(|e| {
                PkiError::BadCertificate(format!(
                    "{INTERMEDIATE_CERT_FILE} is not signed by {ROOT_CERT_FILE}: {e}"
                ))
            })?;
            let ski = inter
                .iter_extensions()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                    _ => None,
                })
                .ok_or_else(|| {
                    PkiError::BadCertificate(format!(
                        "{INTERMEDIATE_CERT_FILE} has no subject key identifier"
                    ))
                })?;
            let policy = policy_from_cert(&inter)?;
            (ski, inter.validity().not_after.to_datetime(), policy)
        };
        let issuer = Issuer::from_ca_cert_der(&intermediate_der.as_slice().into(), inter_key)
            .map_err(|e| PkiError::BadCertificate(format!("{INTERMEDIATE_CERT_FILE}: {e}")))?;
        Ok(CaMaterial {
            root_pem: pem_encode("CERTIFICATE", &root_der),
            root_der,
            root_key,
            intermediate_pem: pem_encode("CERTIFICATE", &intermediate_der),
            intermediate_der,
            issuer,
            intermediate_ski,
            intermediate_not_after,
            policy,
        })
    }

    /// Write `root.pem`, `root.key`, `intermediate.pem` and `intermediate.key` into `dir`.
    ///
    /// Creates `dir` with mode 0700 if missing. Refuses with [`PkiError::AlreadyExists`] if any
    /// of the four files exists, so an existing CA is never overwritten. Key files are created
    /// with mode 0600 from the start (never briefly readable by others), each file is written to
    /// a temporary name, synced, then linked into place without clobbering.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io_err(dir, e))?;
        }
        for name in CA_FILES {
            let path = dir.join(name);
            if path.symlink_metadata().is_ok() {
                return Err(PkiError::AlreadyExists(path));
            }
        }
        let contents: [(&str, String, u32); 4] = [
            (ROOT_KEY_FILE, self.root_key.serialize_pem(), 0o600),
            (
                INTERMEDIATE_KEY_FILE,
                self.issuer.key().serialize_pem(),
                0o600,
            ),
            (ROOT_CERT_FILE, self.root_pem.clone(), 0o644),
            (INTERMEDIATE_CERT_FILE, self.intermediate_pem.clone(), 0o644),
        ];
        let mut written: Vec<PathBuf> = Vec::new();
        for (name, data, mode) in &contents {
            match write_new_file(dir, name, data.as_bytes(), *mode) {
                Ok(path) => written.push(path),
                Err(e) => {
                    // Leave no half-written CA behind: a later `save` would refuse, a later
                    // `load` would fail on the missing files.
                    for p in &written {
                        let _ = fs::remove_file(p);
                    }
                    return Err(e);
                }
            }
        }
        // Persist the directory entries too.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// True if any of the CA files exists in `dir` (so `save` would refuse).
    pub fn exists(dir: &Path) -> bool {
        CA_FILES
            .iter()
            .any(|name| dir.join(name).symlink_metadata().is_ok())
    }

    /// Read a CA written by [`CaMaterial::save`]. Checks that each key matches its certificate,
    /// that the root signed the intermediate, and that the key files are not readable by other
    /// users.
    pub fn load(dir: &Path) -> Result<CaMaterial, PkiError> {
        let root_der = read_cert(&dir.join(ROOT_CERT_FILE))?;
        let inter_der = read_cert(&dir.join(INTERMEDIATE_CERT_FILE))?;
        let root_key = read_key(&dir.join(ROOT_KEY_FILE))?;
        let inter_key = read_key(&dir.join(INTERMEDIATE_KEY_FILE))?;
        CaMaterial::from_parts(root_der, root_key, inter_der, inter_key).map_err(|e| match e {
            PkiError::BadCertificate(m) => {
                PkiError::BadCertificate(format!("in {}: {m}", dir.display()))
            }
            PkiError::BadKey(m) => PkiError::BadKey(format!("in {}: {m}", dir.display())),
            other => other,
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate_der
    }

    /// SHA-256 of the root certificate DER, lowercase hex without colons.
    pub fn root_fingerprint(&self) -> String {
        fingerprint_der(&self.root_der)
    }

    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.intermediate_not_after
    }

    /// The identifiers the intermediate may certify, read from its name constraints.
    pub fn policy(&self) -> IdentifierPolicy {
        self.policy.clone()
    }

    /// Issue a leaf for a CSR.
    ///
    /// Verifies the CSR signature and key, then requires the CSR's names (CN and SAN DNS/IP)
    /// to be exactly `req.dns_names` + `req.ips` (as sets, DNS case-insensitive). The
    /// certificate is built from `req` and the CSR's public key only; CSR extensions are never
    /// copied.
    pub fn issue_from_csr(
        &self,
        csr_der: &[u8],
        req: &LeafRequest,
    ) -> Result<IssuedCert, PkiError> {
        let csr = parse_csr(csr_der)?;
        let (dns, ips) = self.check_names(req)?;

        let want_dns: BTreeSet<&str> = dns.iter().map(String::as_str).collect();
        let got_dns: BTreeSet<&str> = csr.dns_names.iter().map(String::as_str).collect();
        let want_ips: BTreeSet<IpAddr> = ips.iter().copied().collect();
        let got_ips: BTreeSet<IpAddr> = csr.ips.iter().copied().collect();
        let extra: Vec<String> = got_dns
            .difference(&want_dns)
            .map(|s| s.to_string())
            .chain(got_ips.difference(&want_ips).map(IpAddr::to_string))
            .collect();
        if !extra.is_empty() {
            return Err(PkiError::BadCsr(format!(
                "the CSR names {} which the order does not contain",
                extra.join(", ")
            )));
        }
        let missing: Vec<String> = want_dns
            .difference(&got_dns)
            .map(|s| s.to_string())
            .chain(want_ips.difference(&got_ips).map(IpAddr::to_string))
            .collect();
        if !missing.is_empty() {
            return Err(PkiError::BadCsr(format!(
                "the CSR does not name {} which the order contains",
                missing.join(", ")
            )));
        }

        let spki = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .map_err(|e| PkiError::UnsupportedKey(e.to_string()))?;
        let is_rsa = matches!(csr.key, KeyAlgorithm::Rsa { .. });
        let issued = self.build_leaf(&dns, &ips, req, &spki, is_rsa)?;
        // rcgen re-encodes the key; make sure the certificate certifies exactly the CSR's key
        // bytes (a non-canonical SPKI encoding would otherwise change silently).
        let leaf = parse_x509(&issued.der, "issued certificate")?;
        if leaf.public_key().raw != csr.spki_der.as_slice() {
            return Err(PkiError::UnsupportedKey(
                "the CSR's public key is not canonically encoded".into(),
            ));
        }
        Ok(issued)
    }

    /// Issue a leaf with a freshly generated P-256 key. Returns the certificate and the private
    /// key as PKCS#8 PEM.
    pub fn issue_with_new_key(&self, req: &LeafRequest) -> Result<(IssuedCert, String), PkiError> {
        let (dns, ips) = self.check_names(req)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = self.build_leaf(&dns, &ips, req, &key, false)?;
        Ok((issued, key.serialize_pem()))
    }

    /// A DER CRL signed by the intermediate, with CRL number, thisUpdate = `now`,
    /// nextUpdate = `now + next_update` and the authority key identifier.
    pub fn crl(
        &self,
        revoked: &[RevokedEntry],
        crl_number: u64,
        now: OffsetDateTime,
        next_update: Duration,
    ) -> Result<Vec<u8>, PkiError> {
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for entry in revoked {
            let serial = hex::decode(&entry.serial).map_err(|_| {
                PkiError::Generate(format!("revoked serial {:?} is not hex", entry.serial))
            })?;
            if serial.is_empty() || serial.len() > 20 {
                return Err(PkiError::Generate(format!(
                    "revoked serial {:?} has a bad length",
                    entry.serial
                )));
            }
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: entry.revoked_at,
                reason_code: revocation_reason(entry.reason)?,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: add_std(now, next_update)?,
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.intermediate_ski.clone()),
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }

    /// Normalise and check the requested names against the policy.
    fn check_names(&self, req: &LeafRequest) -> Result<(Vec<String>, Vec<IpAddr>), PkiError> {
        let mut dns: Vec<String> = Vec::new();
        for name in &req.dns_names {
            let lower = name.to_ascii_lowercase();
            if !self.policy.allows_dns(&lower) {
                return Err(PkiError::Rejected(format!(
                    "{name:?} is not a valid DNS name under the CA's domains ({})",
                    self.policy.domains.join(", ")
                )));
            }
            if !dns.contains(&lower) {
                dns.push(lower);
            }
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in &req.ips {
            if !self.policy.allows_ip(*ip) {
                let nets: Vec<String> =
                    self.policy.networks.iter().map(|n| n.to_string()).collect();
                return Err(PkiError::Rejected(format!(
                    "{ip} is outside the CA's networks ({})",
                    nets.join(", ")
                )));
            }
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        if dns.is_empty() && ips.is_empty() {
            return Err(PkiError::Rejected(
                "a certificate needs at least one name".into(),
            ));
        }
        Ok((dns, ips))
    }

    fn build_leaf(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        req: &LeafRequest,
        public_key: &impl PublicKeyData,
        is_rsa: bool,
    ) -> Result<IssuedCert, PkiError> {
        // Certificates carry whole seconds; report exactly what is encoded.
        let now = req.now.replace_nanosecond(0).unwrap_or(req.now);
        let not_before = now - LEAF_BACKDATE;
        let not_after = add_std(now, req.lifetime)?.min(self.intermediate_not_after);
        if not_after <= now {
            return Err(PkiError::Rejected(format!(
                "the intermediate expired at {}; renew the CA",
                self.intermediate_not_after
            )));
        }
        let serial = random_serial()?;

        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let mut sans = Vec::with_capacity(dns.len() + ips.len());
        for d in dns {
            let ia5 = d
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| PkiError::Rejected(format!("{d:?}: {e}")))?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        // CN = the first DNS name. IP-only leaves get an empty subject instead of CN=<ip>:
        // OpenSSL checks a CN that looks like a hostname ("10.0.0.1" does) against the dNSName
        // constraints and refuses the chain. A CN is optional; with an empty subject rcgen marks
        // the SAN critical as RFC 5280 section 4.2.1.6 requires. Names longer than the X.520
        // CN bound also go without a CN.
        params.distinguished_name = match dns.first() {
            Some(d) if d.len() <= MAX_CN_LEN => common_name(d),
            _ => DistinguishedName::new(),
        };
        params.key_usages = if is_rsa {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // rcgen's `IsCa::ExplicitNoCa` also adds a subject key identifier; the leaf profile is
        // "basicConstraints CA:false and nothing else", so the extension is written by hand:
        // critical, an empty SEQUENCE (cA defaults to FALSE).
        params.is_ca = IsCa::NoCa;
        let mut bc = CustomExtension::from_oid_content(OID_BASIC_CONSTRAINTS, vec![0x30, 0x00]);
        bc.set_criticality(true);
        params.custom_extensions = vec![bc];
        params.use_authority_key_identifier_extension = true;

        let cert = params.signed_by(public_key, &self.issuer)?;
        let der = cert.der().to_vec();
        let pem = pem_encode("CERTIFICATE", &der);
        let chain_pem = format!("{pem}{}", self.intermediate_pem);
        Ok(IssuedCert {
            serial: hex::encode(serial),
            der,
            pem,
            chain_pem,
            not_before,
            not_after,
            dns_names: dns.to_vec(),
            ips: ips.to_vec(),
        })
    }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn name_constraints(domains: &[String], networks: &[IpNet]) -> NameConstraints {
    let mut permitted: Vec<GeneralSubtree> = domains
        .iter()
        .map(|d| GeneralSubtree::DnsName(d.clone()))
        .collect();
    permitted.extend(networks.iter().map(|n| {
        GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(n.addr(), n.prefix_len()))
    }));
    // A name type absent from permittedSubtrees is unconstrained (RFC 5280 4.2.1.10). Following
    // the CA/Browser Forum rules for technically constrained CAs, a type the CA does not
    // certify is excluded explicitly: all IPv4 and IPv6 addresses, or every DNS name (the empty
    // dNSName matches all names).
    let mut excluded = Vec::new();
    if domains.is_empty() {
        excluded.push(GeneralSubtree::DnsName(String::new()));
    }
    if networks.is_empty() {
        excluded.push(GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])));
        excluded.push(GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])));
    }
    NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    }
}

fn policy_from_cert(inter: &X509Certificate<'_>) -> Result<IdentifierPolicy, PkiError> {
    let nc = inter
        .name_constraints()
        .map_err(|e| PkiError::BadCertificate(format!("{INTERMEDIATE_CERT_FILE}: {e}")))?
        .ok_or_else(|| {
            PkiError::BadCertificate(format!(
                "{INTERMEDIATE_CERT_FILE} has no name constraints; Phoenix only issues from a \
                 name-constrained intermediate"
            ))
        })?;
    let mut policy = IdentifierPolicy::default();
    for subtree in nc.value.permitted_subtrees.iter().flatten() {
        match &subtree.base {
            GeneralName::DNSName(d) => policy.domains.push(d.to_ascii_lowercase()),
            GeneralName::IPAddress(b) if b.len() == 8 || b.len() == 32 => {
                let half = b.len() / 2;
                let addr = crate::csr::ip_from_bytes(&b[..half])?;
                let mask = crate::csr::ip_from_bytes(&b[half..])?;
                let prefix = ipnet::ip_mask_to_prefix(mask).map_err(|_| {
                    PkiError::BadCertificate(format!(
                        "{INTERMEDIATE_CERT_FILE}: non-contiguous IP constraint mask {mask}"
                    ))
                })?;
                let net = IpNet::new(addr, prefix).map_err(|e| {
                    PkiError::BadCertificate(format!("{INTERMEDIATE_CERT_FILE}: {e}"))
                })?;
                policy.networks.push(net);
            }
            // Other name types are never certified, so they add nothing to the policy.
            _ => {}
        }
    }
    Ok(policy)
}

fn revocation_reason(code: Option<u8>) -> Result<Option<RevocationReason>, PkiError> {
    Ok(match code {
        // RFC 5280 section 5.3.1: use no reason code rather than unspecified (0).
        None | Some(0) => None,
        Some(1) => Some(RevocationReason::KeyCompromise),
        Some(2) => Some(RevocationReason::CaCompromise),
        Some(3) => Some(RevocationReason::AffiliationChanged),
        Some(4) => Some(RevocationReason::Superseded),
        Some(5) => Some(RevocationReason::CessationOfOperation),
        Some(6) => Some(RevocationReason::CertificateHold),
        Some(8) => Some(RevocationReason::RemoveFromCrl),
        Some(9) => Some(RevocationReason::PrivilegeWithdrawn),
        Some(10) => Some(RevocationReason::AaCompromise),
        Some(other) => {
            return Err(PkiError::Generate(format!(
                "{other} is not an RFC 5280 revocation reason code"
            )))
        }
    })
}

/// 16 random bytes with the top bit cleared (a positive INTEGER) and a non-zero first byte (so
/// the DER encoding is exactly 16 bytes and the hex form exactly 32 characters). 127 bits of
/// entropy, well above the CA/Browser Forum's 64.
pub(crate) fn random_serial() -> Result<[u8; 16], PkiError> {
    let mut serial = [0u8; 16];
    loop {
        aws_lc_rs::rand::fill(&mut serial)
            .map_err(|_| PkiError::Generate("the system random number generator failed".into()))?;
        serial[0] &= 0x7f;
        if serial[0] != 0 {
            return Ok(serial);
        }
    }
}

fn add_std(t: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, PkiError> {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d))
        .ok_or_else(|| PkiError::Generate(format!("lifetime {d:?} is out of range")))
}

fn parse_x509<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::BadCertificate(format!("{what}: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate(format!(
            "{what}: trailing data after the certificate"
        )));
    }
    Ok(cert)
}

fn io_err(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_cert(path: &Path) -> Result<Vec<u8>, PkiError> {
    let pem = fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut certs = parse_cert_pem_chain(&pem)
        .map_err(|e| PkiError::BadCertificate(format!("{}: {e}", path.display())))?;
    if certs.len() != 1 {
        return Err(PkiError::BadCertificate(format!(
            "{}: expected exactly one certificate, found {}",
            path.display(),
            certs.len()
        )));
    }
    Ok(certs.remove(0))
}

fn read_key(path: &Path) -> Result<KeyPair, PkiError> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    let pem = fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    KeyPair::from_pem(&pem).map_err(|e| PkiError::BadKey(format!("{}: {e}", path.display())))
}

/// Create `dir/name` with `mode` and `data`, failing if it already exists.
fn write_new_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<PathBuf, PkiError> {
    let final_path = dir.join(name);
    let mut suffix = [0u8; 8];
    aws_lc_rs::rand::fill(&mut suffix)
        .map_err(|_| PkiError::Generate("the system random number generator failed".into()))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(suffix)));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        f.write_all(data).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        // A hard link is a rename that refuses to replace an existing file, so a CA file
        // created concurrently is never clobbered.
        match fs::hard_link(&tmp, &final_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(PkiError::AlreadyExists(final_path.clone()))
            }
            // Filesystems without hard links: check, then rename.
            Err(_) => {
                if final_path.symlink_metadata().is_ok() {
                    return Err(PkiError::AlreadyExists(final_path.clone()));
                }
                fs::rename(&tmp, &final_path).map_err(|e| io_err(&final_path, e))
            }
        }
    })();
    let _ = fs::remove_file(&tmp);
    result.map(|()| final_path)
}

#[cfg(test)]
mod tests;
