//! Fuzz target for the ACME request parser: `phoenix_pki::jws::parse`, the first code that sees
//! an ACME request body, and the JWK checks that follow it (thumbprint, signature verification
//! with the key the header carries).
//!
//! Properties beyond "no panic": a parsed JWS's signing input is exactly the bytes the signature
//! covers (`protected "." payload` as sent), and verification with arbitrary keys, algorithms and
//! signatures returns an error instead of panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_pki::jws;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = jws::parse(data) else {
        return;
    };
    assert!(
        parsed.signing_input.contains(&b'.'),
        "signing input without the separator"
    );
    if let Some(jwk) = &parsed.protected.jwk {
        let _ = jwk.thumbprint();
        let _ = jwk.verify(
            &parsed.protected.alg,
            &parsed.signing_input,
            &parsed.signature,
        );
    }
    let _ = jws::verify_hmac(
        &parsed.protected.alg,
        &parsed.payload,
        &parsed.signing_input,
        &parsed.signature,
    );
});
