//! Tests for CA generation, persistence, issuance and CRLs. Chains are checked with the real
//! `openssl verify`, so the name constraints are proven to be encoded, not just intended.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;

use base64::Engine as _;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use super::*;
use crate::testutil::{csr_for, csr_params, openssl, openssl_csr};
use crate::{parse_cert, tls_alpn01_ext_digest};

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn lab_init() -> CaInit {
    CaInit::new(
        "Phoenix Test",
        vec!["lab".into(), "Internal.Example".into()],
        vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
    )
}

fn lab_ca() -> CaMaterial {
    CaMaterial::generate(&lab_init(), now()).unwrap()
}

fn req(dns: &[&str], ips: &[&str]) -> LeafRequest {
    LeafRequest {
        dns_names: dns.iter().map(|s| s.to_string()).collect(),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        lifetime: Duration::from_secs(24 * 3600),
        now: now(),
    }
}

/// Run `openssl verify` on `leaf_pem` against the CA; returns (success, combined output).
fn openssl_verify(ca: &CaMaterial, leaf_pem: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("root.pem"), ca.root_pem()).unwrap();
    fs::write(dir.path().join("intermediate.pem"), ca.intermediate_pem()).unwrap();
    fs::write(dir.path().join("leaf.pem"), leaf_pem).unwrap();
    let mut args = vec![
        "verify",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "intermediate.pem",
    ];
    args.extend_from_slice(extra);
    args.push("leaf.pem");
    let out = openssl(dir.path(), &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A leaf signed by the intermediate without any policy check: what a compromised or buggy
/// issuance path could produce.
fn forced_leaf(ca: &CaMaterial, sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.not_before = now() - time::Duration::minutes(1);
    params.not_after = now() + time::Duration::days(1);
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.signed_by(&key, &ca.issuer).unwrap().pem()
}

fn x509(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn ext_oids(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    cert.extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect()
}

#[test]
fn generate_save_load_roundtrip_with_safe_permissions() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("nested").join("ca");
    let ca = lab_ca();
    assert!(!CaMaterial::exists(&dir));
    ca.save(&dir).unwrap();
    assert!(CaMaterial::exists(&dir));

    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for key in ["root.key", "intermediate.key"] {
        let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
        let pem = fs::read_to_string(dir.join(key)).unwrap();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{key} is PKCS#8"
        );
    }
    // Nothing but the four files: no temporary files left behind.
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "intermediate.key",
            "intermediate.pem",
            "root.key",
            "root.pem"
        ]
    );

    let loaded = CaMaterial::load(&dir).unwrap();
    assert_eq!(loaded.root_der(), ca.root_der());
    assert_eq!(loaded.intermediate_der(), ca.intermediate_der());
    assert_eq!(loaded.root_pem(), ca.root_pem());
    assert_eq!(loaded.root_fingerprint(), ca.root_fingerprint());
    assert_eq!(
        loaded.root_fingerprint(),
        crate::fingerprint_pem(ca.root_pem()).unwrap()
    );
    assert_eq!(loaded.intermediate_not_after(), ca.intermediate_not_after());
    assert_eq!(loaded.policy(), ca.policy());
    // The loaded key really is the intermediate's: what it issues verifies.
    let (leaf, _) = loaded.issue_with_new_key(&req(&["api.lab"], &[])).unwrap();
    let (ok, out) = openssl_verify(&ca, &leaf.pem, &[]);
    assert!(ok, "{out}");

    // A second save must not overwrite anything, even with one file missing.
    let before = fs::read(dir.join("root.key")).unwrap();
    assert!(
        matches!(lab_ca().save(&dir), Err(PkiError::AlreadyExists(p)) if p.ends_with("root.pem"))
    );
    fs::remove_file(dir.join("root.pem")).unwrap();
    assert!(
        matches!(lab_ca().save(&dir), Err(PkiError::AlreadyExists(p)) if p.ends_with("root.key"))
    );
    assert_eq!(fs::read(dir.join("root.key")).unwrap(), before);
    assert!(!dir.join("root.pem").exists());
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = lab_ca();
    ca.save(dir.path()).unwrap();

    // Group-readable key.
    let key = dir.path().join("intermediate.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let err = CaMaterial::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PkiError::InsecureKeyFile { path, mode: 0o640 } if *path == key),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    // Swapped keys.
    let root_key = fs::read(dir.path().join("root.key")).unwrap();
    let inter_key = fs::read(&key).unwrap();
    fs::write(dir.path().join("root.key"), &inter_key).unwrap();
    let err = CaMaterial::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PkiError::BadKey(m) if m.contains("root.key")),
        "{err}"
    );
    fs::write(dir.path().join("root.key"), &root_key).unwrap();

    // Garbage certificate.
    let inter = fs::read(dir.path().join("intermediate.pem")).unwrap();
    fs::write(dir.path().join("intermediate.pem"), "not a certificate").unwrap();
    let err = CaMaterial::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("intermediate.pem"), "{err}");

    // An intermediate from another CA does not chain to this root.
    let other = tempfile::tempdir().unwrap();
    lab_ca().save(other.path()).unwrap();
    fs::copy(
        other.path().join("intermediate.pem"),
        dir.path().join("intermediate.pem"),
    )
    .unwrap();
    fs::copy(other.path().join("intermediate.key"), &key).unwrap();
    let err = CaMaterial::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PkiError::BadCertificate(m) if m.contains("not signed by root.pem")),
        "{err}"
    );
    fs::write(dir.path().join("intermediate.pem"), &inter).unwrap();
    fs::write(&key, &inter_key).unwrap();

    // Missing file.
    fs::remove_file(dir.path().join("root.pem")).unwrap();
    let err = CaMaterial::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PkiError::Io { path, .. } if path.ends_with("root.pem")),
        "{err}"
    );
    assert!(err.to_string().contains("root.pem"));
}

#[test]
fn root_and_intermediate_profiles() {
    let t = now();
    let ca = CaMaterial::generate(&lab_init(), t).unwrap();
    let root = x509(ca.root_der());
    let inter = x509(ca.intermediate_der());

    assert_eq!(root.subject().to_string(), "CN=Phoenix Test Root");
    assert_eq!(inter.subject().to_string(), "CN=Phoenix Test Intermediate");
    assert_eq!(inter.issuer().as_raw(), root.subject().as_raw());

    let bc = root.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca && bc.value.path_len_constraint.is_none());
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert_eq!(
        classify_spki(root.public_key()).unwrap(),
        KeyAlgorithm::EcdsaP256
    );
    assert_eq!(
        classify_spki(inter.public_key()).unwrap(),
        KeyAlgorithm::EcdsaP256
    );

    let bc = inter.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let nc = inter.name_constraints().unwrap().unwrap();
    assert!(nc.critical, "name constraints must be critical");
    assert!(
        nc.value.excluded_subtrees.is_none(),
        "both types are permitted, nothing excluded"
    );

    let root_ski = root
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("root SKI");
    let inter_aki = inter
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("intermediate AKI");
    assert_eq!(inter_aki, root_ski);

    // Backdated for clock skew, and the intermediate never outlives the root.
    let nb = inter.validity().not_before.to_datetime();
    assert!(nb < t - time::Duration::minutes(2) && nb > t - time::Duration::minutes(10));
    assert!(ca.intermediate_not_after() <= root.validity().not_after.to_datetime());
    let five_years = t + time::Duration::days(5 * 365);
    assert!((ca.intermediate_not_after() - five_years).abs() < time::Duration::seconds(2));

    let policy = ca.policy();
    assert_eq!(policy.domains, vec!["lab", "internal.example"]);
    assert_eq!(
        policy.networks,
        vec![
            "10.0.0.0/8".parse::<IpNet>().unwrap(),
            "fd00::/8".parse().unwrap()
        ]
    );

    // The intermediate may not outlive the root even if asked to.
    let mut init = lab_init();
    init.root_lifetime = Duration::from_secs(3600 * 24);
    let short = CaMaterial::generate(&init, t).unwrap();
    let short_root = x509(short.root_der());
    assert_eq!(
        short.intermediate_not_after(),
        short_root.validity().not_after.to_datetime()
    );
}

#[test]
fn generate_refuses_unconstrained_or_invalid_input() {
    let t = now();
    let empty = CaInit::new("X", vec![], vec![]);
    assert!(
        matches!(CaMaterial::generate(&empty, t), Err(PkiError::Generate(m)) if m.contains("name constraints"))
    );
    for bad in ["*.lab", "lab.", "a..b", "", "ex ample"] {
        let init = CaInit::new("X", vec![bad.into()], vec![]);
        assert!(
            CaMaterial::generate(&init, t).is_err(),
            "{bad:?} must be refused"
        );
    }
    let init = CaInit::new("", vec!["lab".into()], vec![]);
    assert!(CaMaterial::generate(&init, t).is_err());
    // Host bits in a network are cleared rather than encoded.
    let init = CaInit::new("X", vec![], vec!["10.1.2.3/16".parse().unwrap()]);
    let ca = CaMaterial::generate(&init, t).unwrap();
    assert_eq!(
        ca.policy().networks,
        vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert!(ca.policy().domains.is_empty());
}

#[test]
fn openssl_accepts_issued_leaves() {
    let ca = lab_ca();
    let cases: [(&[&str], &[&str]); 4] = [
        (&["api.lab", "*.svc.lab"], &["10.1.2.3"]),
        (&["www.internal.example"], &[]),
        (&[], &["10.9.9.9", "fd00::7"]),
        (&["lab"], &["fd12:3456::1"]),
    ];
    for (dns, ips) in cases {
        let (leaf, key_pem) = ca.issue_with_new_key(&req(dns, ips)).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            parse_cert(&leaf.der).unwrap().spki_der,
            key.subject_public_key_info()
        );
        for purpose in [
            &[][..],
            &["-purpose", "sslserver"],
            &["-purpose", "sslclient"],
        ] {
            let (ok, out) = openssl_verify(&ca, &leaf.pem, purpose);
            assert!(
                ok && out.contains("OK"),
                "{dns:?} {ips:?} {purpose:?}: {out}"
            );
        }
        // chain_pem is leaf + intermediate.
        let chain = crate::parse_cert_pem_chain(&leaf.chain_pem).unwrap();
        assert_eq!(
            chain,
            vec![leaf.der.clone(), ca.intermediate_der().to_vec()]
        );
    }
}

#[test]
fn openssl_rejects_leaves_outside_the_name_constraints() {
    let ca = lab_ca();
    // Sanity: a forced leaf inside the constraints verifies, so failures below are the
    // constraints and not the way the leaf was built.
    let inside = forced_leaf(&ca, vec![SanType::DnsName("ok.lab".try_into().unwrap())]);
    let (ok, out) = openssl_verify(&ca, &inside, &[]);
    assert!(ok, "{out}");

    for san in [
        SanType::DnsName("evil.example".try_into().unwrap()),
        SanType::DnsName("notlab".try_into().unwrap()),
        SanType::IpAddress("192.168.1.1".parse().unwrap()),
        SanType::IpAddress("fe80::1".parse().unwrap()),
    ] {
        let pem = forced_leaf(&ca, vec![san.clone()]);
        let (ok, out) = openssl_verify(&ca, &pem, &[]);
        assert!(!ok, "{san:?} must not verify: {out}");
        assert!(
            out.contains("name constraint") || out.contains("permitted subtree"),
            "{san:?}: {out}"
        );
    }

    // A DNS-only CA must not be able to certify any IP address, and vice versa.
    let dns_only =
        CaMaterial::generate(&CaInit::new("D", vec!["lab".into()], vec![]), now()).unwrap();
    let pem = forced_leaf(
        &dns_only,
        vec![SanType::IpAddress("10.0.0.1".parse().unwrap())],
    );
    let (ok, out) = openssl_verify(&dns_only, &pem, &[]);
    assert!(!ok && out.contains("excluded subtree"), "{out}");
    let ip_only = CaMaterial::generate(
        &CaInit::new("I", vec![], vec!["10.0.0.0/8".parse().unwrap()]),
        now(),
    )
    .unwrap();
    let pem = forced_leaf(
        &ip_only,
        vec![SanType::DnsName("anything.example".try_into().unwrap())],
    );
    let (ok, out) = openssl_verify(&ip_only, &pem, &[]);
    assert!(!ok && out.contains("excluded subtree"), "{out}");
    let (leaf, _) = ip_only
        .issue_with_new_key(&req(&[], &["10.2.3.4"]))
        .unwrap();
    let (ok, out) = openssl_verify(&ip_only, &leaf.pem, &[]);
    assert!(ok, "{out}");
}

#[test]
fn issuance_policy_rejects_foreign_names() {
    let ca = lab_ca();
    for r in [
        req(&["evil.example"], &[]),
        req(&["api.lab"], &["192.168.0.1"]),
        req(&["api.lab."], &[]),
        req(&[], &[]),
    ] {
        assert!(
            matches!(ca.issue_with_new_key(&r), Err(PkiError::Rejected(_))),
            "{r:?}"
        );
    }
    let (csr, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, &["evil.example"], &[], "");
    assert!(matches!(
        ca.issue_from_csr(&csr, &req(&["evil.example"], &[])),
        Err(PkiError::Rejected(_))
    ));
}

/// Check the fixed leaf profile on an issued certificate.
fn assert_leaf_profile(ca: &CaMaterial, leaf: &IssuedCert, dns: &[&str], ips: &[&str], rsa: bool) {
    let cert = x509(&leaf.der);
    let inter = x509(ca.intermediate_der());
    // Issuer bytes equal the intermediate's subject bytes (webpki compares them exactly).
    assert_eq!(cert.issuer().as_raw(), inter.subject().as_raw());

    let info = parse_cert(&leaf.der).unwrap();
    assert_eq!(
        info.dns_names,
        dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );
    let want_ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(info.ips, want_ips);
    assert_eq!(leaf.dns_names, info.dns_names);
    assert_eq!(leaf.ips, info.ips);
    match dns.first() {
        Some(d) => assert_eq!(info.subject, format!("CN={d}")),
        None => {
            // No CN for IP-only leaves (see build_leaf); the SAN is then critical.
            assert_eq!(info.subject, "");
            assert!(cert.subject_alternative_name().unwrap().unwrap().critical);
        }
    }

    // Exactly AKI, SAN, keyUsage, EKU, basicConstraints.
    let expected: BTreeSet<String> = [
        "2.5.29.35",
        "2.5.29.17",
        "2.5.29.15",
        "2.5.29.37",
        "2.5.29.19",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(ext_oids(&cert), expected);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(
        !eku.any
            && !eku.code_signing
            && !eku.email_protection
            && !eku.time_stamping
            && !eku.ocsp_signing
    );
    assert!(eku.other.is_empty());
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature());
    assert_eq!(ku.value.key_encipherment(), rsa);
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && !bc.value.ca);
    assert!(!cert.is_ca());
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ca.intermediate_ski);

    // Serial: 16 bytes, positive, non-zero, and what IssuedCert reports.
    assert_eq!(cert.raw_serial().len(), 16);
    assert!(cert.raw_serial()[0] & 0x80 == 0 && cert.raw_serial()[0] != 0);
    assert_eq!(leaf.serial, hex::encode(cert.raw_serial()));
    assert_eq!(info.serial, leaf.serial);

    // ARI CertID (RFC 9773): base64url(AKI) "." base64url(serial bytes).
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    assert_eq!(
        info.ari_cert_id.as_deref(),
        Some(format!("{}.{}", b64.encode(&aki), b64.encode(cert.raw_serial())).as_str())
    );
    assert_eq!(info.not_before, leaf.not_before);
    assert_eq!(info.not_after, leaf.not_after);
}

#[test]
fn issue_from_csr_accepts_each_key_type() {
    let ca = lab_ca();
    for (alg, rsa) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, false),
        (&rcgen::PKCS_ECDSA_P384_SHA384, false),
        (&rcgen::PKCS_RSA_SHA256, true),
        (&rcgen::PKCS_ED25519, false),
    ] {
        // The CSR's CN and names differ in case from the order; that is the same set.
        let (csr, key) = csr_for(alg, &["API.lab", "db.lab"], &["10.0.0.5"], "Api.Lab");
        let r = req(&["db.lab", "api.lab"], &["10.0.0.5"]);
        let leaf = ca
            .issue_from_csr(&csr, &r)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_leaf_profile(&ca, &leaf, &["db.lab", "api.lab"], &["10.0.0.5"], rsa);
        assert_eq!(
            parse_cert(&leaf.der).unwrap().spki_der,
            key.subject_public_key_info()
        );
        let (ok, out) = openssl_verify(&ca, &leaf.pem, &["-purpose", "sslserver"]);
        assert!(ok, "{alg:?}: {out}");
    }
    // CSRs made by openssl itself.
    for key in ["ec:P-256", "rsa:3072", "ed25519", "ec:P-384"] {
        let csr = openssl_csr(key, "/CN=web.lab", "DNS:web.lab,IP:10.3.3.3");
        let leaf = ca
            .issue_from_csr(&csr, &req(&["web.lab"], &["10.3.3.3"]))
            .unwrap();
        assert_leaf_profile(
            &ca,
            &leaf,
            &["web.lab"],
            &["10.3.3.3"],
            key.starts_with("rsa"),
        );
    }
    // IP-only request.
    let csr = openssl_csr("ec:P-256", "/CN=10.4.4.4", "IP:10.4.4.4");
    let leaf = ca.issue_from_csr(&csr, &req(&[], &["10.4.4.4"])).unwrap();
    assert_leaf_profile(&ca, &leaf, &[], &["10.4.4.4"], false);
    let (ok, out) = openssl_verify(&ca, &leaf.pem, &[]);
    assert!(ok, "{out}");
}

#[test]
fn issue_from_csr_rejects_name_mismatch_bad_signature_and_weak_keys() {
    let ca = lab_ca();
    let r = req(&["a.lab", "b.lab"], &["10.0.0.1"]);

    let (extra, _) = csr_for(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["a.lab", "b.lab", "c.lab"],
        &["10.0.0.1"],
        "",
    );
    assert!(
        matches!(ca.issue_from_csr(&extra, &r), Err(PkiError::BadCsr(m)) if m.contains("c.lab"))
    );
    let (extra_ip, _) = csr_for(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["a.lab", "b.lab"],
        &["10.0.0.1", "10.0.0.2"],
        "",
    );
    assert!(
        matches!(ca.issue_from_csr(&extra_ip, &r), Err(PkiError::BadCsr(m)) if m.contains("10.0.0.2"))
    );
    let (missing, _) = csr_for(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["a.lab"],
        &["10.0.0.1"],
        "",
    );
    assert!(
        matches!(ca.issue_from_csr(&missing, &r), Err(PkiError::BadCsr(m)) if m.contains("b.lab"))
    );
    let (missing_ip, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.lab", "b.lab"], &[], "");
    assert!(
        matches!(ca.issue_from_csr(&missing_ip, &r), Err(PkiError::BadCsr(m)) if m.contains("10.0.0.1"))
    );
    // A CN is a name too: it must be one of the ordered names.
    let (cn, _) = csr_for(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["a.lab", "b.lab"],
        &["10.0.0.1"],
        "other.lab",
    );
    assert!(
        matches!(ca.issue_from_csr(&cn, &r), Err(PkiError::BadCsr(m)) if m.contains("other.lab"))
    );

    let (mut bad_sig, _) = csr_for(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["a.lab", "b.lab"],
        &["10.0.0.1"],
        "",
    );
    let n = bad_sig.len();
    bad_sig[n - 3] ^= 0x40;
    assert!(matches!(
        ca.issue_from_csr(&bad_sig, &r),
        Err(PkiError::BadCsr(_))
    ));

    let weak = openssl_csr("rsa:1024", "/CN=a.lab", "DNS:a.lab,DNS:b.lab,IP:10.0.0.1");
    assert!(matches!(
        ca.issue_from_csr(&weak, &r),
        Err(PkiError::UnsupportedKey(_))
    ));
}

#[test]
fn csr_extensions_are_never_copied() {
    let ca = lab_ca();
    let key = KeyPair::generate().unwrap();
    let mut params = csr_params(&["x.lab"], &[], "x.lab");
    // Ask to be a CA with certificate-signing rights, with odd EKUs and a private extension.
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::CodeSigning,
        ExtendedKeyUsagePurpose::Any,
    ];
    let mut weird = CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x04, 0x02, 0xbe, 0xef],
    );
    weird.set_criticality(true);
    params.custom_extensions = vec![weird, CustomExtension::new_acme_identifier(&[9u8; 32])];
    let csr = params.serialize_request(&key).unwrap();
    let leaf = ca.issue_from_csr(csr.der(), &req(&["x.lab"], &[])).unwrap();
    assert_leaf_profile(&ca, &leaf, &["x.lab"], &[], false);
    let cert = x509(&leaf.der);
    assert!(!ext_oids(&cert).contains("1.3.6.1.4.1.99999.1"));
    assert_eq!(tls_alpn01_ext_digest(&leaf.der).unwrap(), None);
    assert!(!cert.is_ca());
}

#[test]
fn leaves_never_outlive_the_intermediate_and_are_backdated() {
    let ca = lab_ca();
    let mut r = req(&["long.lab"], &[]);
    r.lifetime = Duration::from_secs(100 * 365 * 24 * 3600);
    let (csr, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, &["long.lab"], &[], "");
    let leaf = ca.issue_from_csr(&csr, &r).unwrap();
    assert_eq!(leaf.not_after, ca.intermediate_not_after());
    assert_eq!(
        parse_cert(&leaf.der).unwrap().not_after,
        ca.intermediate_not_after()
    );

    let r = req(&["short.lab"], &[]);
    let (leaf, _) = ca.issue_with_new_key(&r).unwrap();
    let now_s = r.now.replace_nanosecond(0).unwrap();
    assert_eq!(leaf.not_before, now_s - time::Duration::minutes(1));
    assert_eq!(leaf.not_after, now_s + time::Duration::hours(24));

    // Once the intermediate has expired nothing is issued.
    let mut late = req(&["late.lab"], &[]);
    late.now = ca.intermediate_not_after() + time::Duration::seconds(1);
    assert!(
        matches!(ca.issue_with_new_key(&late), Err(PkiError::Rejected(m)) if m.contains("expired"))
    );
}

#[test]
fn serials_are_unique_positive_16_bytes() {
    let ca = lab_ca();
    let (csr, _) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, &["s.lab"], &[], "");
    let r = req(&["s.lab"], &[]);
    let mut seen = HashSet::new();
    for _ in 0..1000 {
        let leaf = ca.issue_from_csr(&csr, &r).unwrap();
        let cert = x509(&leaf.der);
        let raw = cert.raw_serial();
        assert_eq!(raw.len(), 16);
        assert!(raw[0] != 0 && raw[0] < 0x80);
        assert_eq!(leaf.serial.len(), 32);
        assert!(leaf
            .serial
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(seen.insert(leaf.serial), "duplicate serial");
    }
}

#[test]
fn crl_is_signed_and_lists_revoked_serials() {
    let ca = lab_ca();
    let (a, _) = ca.issue_with_new_key(&req(&["a.lab"], &[])).unwrap();
    let (b, _) = ca.issue_with_new_key(&req(&["b.lab"], &[])).unwrap();
    let t = now().replace_nanosecond(0).unwrap();
    let revoked = [
        RevokedEntry {
            serial: a.serial.clone(),
            revoked_at: t,
            reason: Some(1),
        },
        RevokedEntry {
            serial: b.serial.clone(),
            revoked_at: t,
            reason: None,
        },
    ];
    let der = ca.crl(&revoked, 42, t, Duration::from_secs(3600)).unwrap();

    let (rest, crl) = x509_parser::parse_x509_crl(&der).unwrap();
    assert!(rest.is_empty());
    let inter = x509(ca.intermediate_der());
    assert_eq!(crl.issuer().as_raw(), inter.subject().as_raw());
    crl.verify_signature(inter.public_key())
        .expect("CRL signed by the intermediate");
    assert_eq!(crl.crl_number().unwrap().to_string(), "42");
    assert_eq!(crl.last_update().to_datetime(), t);
    assert_eq!(
        crl.next_update().unwrap().to_datetime(),
        t + time::Duration::hours(1)
    );
    let serials: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    assert_eq!(serials, vec![a.serial.clone(), b.serial.clone()]);
    let reasons: Vec<Option<u8>> = crl
        .iter_revoked_certificates()
        .map(|r| r.reason_code().map(|(_, c)| c.0))
        .collect();
    assert_eq!(reasons, vec![Some(1), None]);
    let aki = crl
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ca.intermediate_ski);

    // The real openssl lists the serial and verifies the signature with the chain.
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("crl.der"), &der).unwrap();
    fs::write(
        dir.path().join("chain.pem"),
        format!("{}{}", ca.intermediate_pem(), ca.root_pem()),
    )
    .unwrap();
    let out = openssl(
        dir.path(),
        &["crl", "-inform", "DER", "-in", "crl.der", "-noout", "-text"],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        text.contains(&a.serial) && text.contains(&b.serial),
        "{text}"
    );
    assert!(text.contains("key compromise"), "{text}");
    let out = openssl(
        dir.path(),
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "crl.der",
            "-noout",
            "-CAfile",
            "chain.pem",
        ],
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && all.contains("verify OK"), "{all}");

    // An empty CRL is valid too, and bad input is refused.
    let empty = ca.crl(&[], 1, t, Duration::from_secs(60)).unwrap();
    assert_eq!(
        x509_parser::parse_x509_crl(&empty)
            .unwrap()
            .1
            .iter_revoked_certificates()
            .count(),
        0
    );
    let bad = [RevokedEntry {
        serial: "zz".into(),
        revoked_at: t,
        reason: None,
    }];
    assert!(ca.crl(&bad, 2, t, Duration::from_secs(60)).is_err());
    let bad = [RevokedEntry {
        serial: a.serial.clone(),
        revoked_at: t,
        reason: Some(7),
    }];
    assert!(ca.crl(&bad, 2, t, Duration::from_secs(60)).is_err());
}

/// rustls (webpki) is what every Phoenix hop verifies with; it must accept what the CA issues
/// and enforce the same constraints OpenSSL does.
fn rustls_verify(ca: &CaMaterial, leaf_der: &[u8], server_name: &str) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.root_der().to_vec()))
        .unwrap();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
    verifier
        .verify_server_cert(
            &CertificateDer::from(leaf_der.to_vec()),
            &[CertificateDer::from(ca.intermediate_der().to_vec())],
            &ServerName::try_from(server_name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

fn assert_name_constraint_violation(result: Result<(), rustls::Error>) {
    let err = result.expect_err("chain outside the name constraints must not verify");
    assert!(format!("{err:?}").contains("NameConstraint"), "{err:?}");
}

#[test]
fn rustls_accepts_leaves_and_enforces_constraints() {
    let ca = lab_ca();
    let (leaf, _) = ca
        .issue_with_new_key(&req(&["api.lab", "*.svc.lab"], &["10.1.2.3"]))
        .unwrap();
    for name in ["api.lab", "x.svc.lab", "10.1.2.3"] {
        rustls_verify(&ca, &leaf.der, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(rustls_verify(&ca, &leaf.der, "other.lab").is_err());
    let (ip_leaf, _) = ca.issue_with_new_key(&req(&[], &["fd00::9"])).unwrap();
    rustls_verify(&ca, &ip_leaf.der, "fd00::9").unwrap();

    let evil = forced_leaf(
        &ca,
        vec![SanType::DnsName("evil.example".try_into().unwrap())],
    );
    let evil_der = crate::parse_cert_pem_chain(&evil).unwrap().remove(0);
    let err = rustls_verify(&ca, &evil_der, "evil.example").unwrap_err();
    assert!(format!("{err:?}").contains("NameConstraint"), "{err:?}");
    let evil_ip = forced_leaf(
        &ca,
        vec![SanType::IpAddress("192.168.1.1".parse().unwrap())],
    );
    let evil_ip_der = crate::parse_cert_pem_chain(&evil_ip).unwrap().remove(0);
    assert_name_constraint_violation(rustls_verify(&ca, &evil_ip_der, "192.168.1.1"));

    // Single-type CAs: the excluded subtrees hold in webpki too, and the permitted type works.
    let dns_only =
        CaMaterial::generate(&CaInit::new("D", vec!["lab".into()], vec![]), now()).unwrap();
    let (ok, _) = dns_only.issue_with_new_key(&req(&["a.lab"], &[])).unwrap();
    rustls_verify(&dns_only, &ok.der, "a.lab").unwrap();
    let pem = forced_leaf(
        &dns_only,
        vec![SanType::IpAddress("10.0.0.1".parse().unwrap())],
    );
    let der = crate::parse_cert_pem_chain(&pem).unwrap().remove(0);
    assert_name_constraint_violation(rustls_verify(&dns_only, &der, "10.0.0.1"));

    let ip_only = CaMaterial::generate(
        &CaInit::new("I", vec![], vec!["10.0.0.0/8".parse().unwrap()]),
        now(),
    )
    .unwrap();
    let (ok, _) = ip_only
        .issue_with_new_key(&req(&[], &["10.0.0.1"]))
        .unwrap();
    rustls_verify(&ip_only, &ok.der, "10.0.0.1").unwrap();
    let pem = forced_leaf(
        &ip_only,
        vec![SanType::DnsName("anything.example".try_into().unwrap())],
    );
    let der = crate::parse_cert_pem_chain(&pem).unwrap().remove(0);
    assert_name_constraint_violation(rustls_verify(&ip_only, &der, "anything.example"));
}
