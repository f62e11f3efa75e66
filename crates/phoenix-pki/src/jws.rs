//! RFC 7515 flattened JSON JWS as used by ACME (RFC 8555 section 6.2).
//!
//! Every ACME request body is a JWS, so this is the CA's first parser of untrusted input. It is
//! deliberately narrow: only the flattened serialization with exactly `protected`, `payload`
//! and `signature`; strict unpadded base64url; only the signature algorithms RFC 8555 clients
//! use (ES256, ES384, RS256, EdDSA) and HMAC for external account binding. Whether a request
//! carries `jwk` or `kid`, and the nonce and URL checks, belong to the ACME server.

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::csr::{
    bit_length, classify_spki, rsa_components, strip_zeros, RSA_MAX_BITS, RSA_MIN_BITS,
};
use crate::KeyAlgorithm;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a JWS was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Not a well-formed flattened JWS (maps to ACME `malformed`).
    #[error("malformed JWS: {0}")]
    Malformed(String),
    /// The algorithm is unsupported or does not fit the key (ACME `badSignatureAlgorithm`).
    #[error("unsupported signature algorithm: {0}")]
    BadSignatureAlgorithm(String),
    /// The signature does not verify.
    #[error("JWS signature does not verify")]
    BadSignature,
}

/// A parsed (not yet verified) flattened JWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jws {
    pub protected: ProtectedHeader,
    /// Decoded payload; empty for POST-as-GET (RFC 8555 section 6.3).
    pub payload: Vec<u8>,
    /// `protected_b64 + "." + payload_b64`: the bytes the signature covers.
    pub signing_input: Vec<u8>,
    pub signature: Vec<u8>,
}

/// The JWS protected header members ACME uses (RFC 8555 section 6.2). Other members are
/// ignored, except `crit`, which is refused because no extension is understood.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProtectedHeader {
    pub alg: String,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub jwk: Option<Jwk>,
}

/// A public JSON Web Key (RFC 7517), with the members RFC 7638 thumbprints need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kty")]
pub enum Jwk {
    #[serde(rename = "EC")]
    Ec { crv: String, x: String, y: String },
    #[serde(rename = "RSA")]
    Rsa { n: String, e: String },
    #[serde(rename = "OKP")]
    Okp { crv: String, x: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flattened {
    protected: String,
    payload: String,
    signature: String,
}

/// Parse a flattened JSON JWS body. Does not verify the signature.
pub fn parse(body: &[u8]) -> Result<Jws, JwsError> {
    let flat: Flattened = serde_json::from_slice(body)
        .map_err(|e| JwsError::Malformed(format!("not a flattened JWS object: {e}")))?;
    let protected_bytes = b64_decode("protected", &flat.protected)?;
    let payload = b64_decode("payload", &flat.payload)?;
    let signature = b64_decode("signature", &flat.signature)?;

    let members: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&protected_bytes).map_err(|e| {
            JwsError::Malformed(format!("protected header is not a JSON object: {e}"))
        })?;
    if members.contains_key("crit") {
        return Err(JwsError::Malformed(
            "protected header has \"crit\"; no JWS extension is supported".into(),
        ));
    }
    // Deserialising the struct from the bytes (not from the map) also refuses duplicate members.
    let protected: ProtectedHeader = serde_json::from_slice(&protected_bytes)
        .map_err(|e| JwsError::Malformed(format!("protected header: {e}")))?;

    let mut signing_input = Vec::with_capacity(flat.protected.len() + 1 + flat.payload.len());
    signing_input.extend_from_slice(flat.protected.as_bytes());
    signing_input.push(b'.');
    signing_input.extend_from_slice(flat.payload.as_bytes());
    Ok(Jws {
        protected,
        payload,
        signing_input,
        signature,
    })
}

fn b64_decode(what: &str, s: &str) -> Result<Vec<u8>, JwsError> {
    B64.decode(s)
        .map_err(|e| JwsError::Malformed(format!("{what} is not unpadded base64url: {e}")))
}

/// Verify an HMAC (HS256, HS384, HS512) over `msg`, as used by ACME external account binding
/// (RFC 8555 section 7.3.4). The comparison is constant-time.
pub fn verify_hmac(alg: &str, key: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), JwsError> {
    use aws_lc_rs::hmac;
    let algorithm = match alg {
        "HS256" => hmac::HMAC_SHA256,
        "HS384" => hmac::HMAC_SHA384,
        "HS512" => hmac::HMAC_SHA512,
        other => {
            return Err(JwsError::BadSignatureAlgorithm(format!(
                "{other:?} is not an HMAC algorithm (HS256, HS384, HS512)"
            )))
        }
    };
    hmac::verify(&hmac::Key::new(algorithm, key), msg, sig).map_err(|_| JwsError::BadSignature)
}

impl Jwk {
    fn kty(&self) -> &'static str {
        match self {
            Jwk::Ec { .. } => "EC",
            Jwk::Rsa { .. } => "RSA",
            Jwk::Okp { .. } => "OKP",
        }
    }

    /// RFC 7638 thumbprint: base64url (no padding) SHA-256 of the required members in
    /// lexicographic order without whitespace.
    pub fn thumbprint(&self) -> String {
        // serde_json::to_string of a &str is always Ok; it adds the quotes and escapes.
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let canonical = match self {
            Jwk::Ec { crv, x, y } => {
                format!(
                    r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
                    q(crv),
                    q(x),
                    q(y)
                )
            }
            Jwk::Rsa { n, e } => format!(r#"{{"e":{},"kty":"RSA","n":{}}}"#, q(e), q(n)),
            Jwk::Okp { crv, x } => format!(r#"{{"crv":{},"kty":"OKP","x":{}}}"#, q(crv), q(x)),
        };
        B64.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            canonical.as_bytes(),
        ))
    }

    /// Verify `sig` over `msg` with this key. `alg` must fit the key: ES256 with P-256, ES384
    /// with P-384 (both fixed-size r||s), RS256 with RSA 2048 to 4096 bits, EdDSA with Ed25519.
    /// Anything else, including "none" and HMAC algorithms, is `BadSignatureAlgorithm`.
    pub fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> Result<(), JwsError> {
        let mismatch = || {
            JwsError::BadSignatureAlgorithm(format!(
                "{alg} cannot be used with this {} key",
                self.kty()
            ))
        };
        let key_b64 = |what: &str, s: &str| {
            B64.decode(s)
                .map_err(|_| JwsError::Malformed(format!("JWK member {what} is not base64url")))
        };
        let ec_point = |x: &str, y: &str, len: usize| -> Result<Vec<u8>, JwsError> {
            let (x, y) = (key_b64("x", x)?, key_b64("y", y)?);
            if x.len() != len || y.len() != len {
                return Err(JwsError::Malformed(
                    "EC JWK coordinates have the wrong size".into(),
                ));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(point)
        };
        let verified = match (alg, self) {
            ("ES256", Jwk::Ec { crv, x, y }) if crv == "P-256" => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, ec_point(x, y, 32)?)
                    .verify(msg, sig)
            }
            ("ES384", Jwk::Ec { crv, x, y }) if crv == "P-384" => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, ec_point(x, y, 48)?)
                    .verify(msg, sig)
            }
            ("RS256", Jwk::Rsa { n, e }) => {
                let (n, e) = (key_b64("n", n)?, key_b64("e", e)?);
                let bits = bit_length(&n);
                if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                    return Err(JwsError::BadSignatureAlgorithm(format!(
                        "RSA key of {bits} bits (allowed: {RSA_MIN_BITS} to {RSA_MAX_BITS})"
                    )));
                }
                RsaPublicKeyComponents {
                    n: strip_zeros(&n),
                    e: strip_zeros(&e),
                }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
            }
            ("EdDSA", Jwk::Okp { crv, x }) if crv == "Ed25519" => {
                let x = key_b64("x", x)?;
                if x.len() != 32 {
                    return Err(JwsError::Malformed("Ed25519 JWK x must be 32 bytes".into()));
                }
                UnparsedPublicKey::new(&signature::ED25519, x).verify(msg, sig)
            }
            ("ES256" | "ES384" | "RS256" | "EdDSA", _) => return Err(mismatch()),
            (other, _) => {
                return Err(JwsError::BadSignatureAlgorithm(format!(
                    "{other:?} is not supported (ES256, ES384, RS256, EdDSA)"
                )))
            }
        };
        verified.map_err(|_| JwsError::BadSignature)
    }

    /// The JWK for a DER SubjectPublicKeyInfo, to compare a certificate's key with a JWS key
    /// (RFC 8555 section 7.6 revocation by certificate key).
    pub fn from_spki_der(spki: &[u8]) -> Result<Jwk, JwsError> {
        let (rest, info) = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| JwsError::Malformed(format!("not a SubjectPublicKeyInfo: {e}")))?;
        if !rest.is_empty() {
            return Err(JwsError::Malformed("trailing data after the key".into()));
        }
        let key = &info.subject_public_key.data;
        match classify_spki(&info).map_err(|e| JwsError::BadSignatureAlgorithm(e.to_string()))? {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
                let n = (key.len() - 1) / 2;
                let crv = if n == 32 { "P-256" } else { "P-384" };
                Ok(Jwk::Ec {
                    crv: crv.into(),
                    x: B64.encode(&key[1..1 + n]),
                    y: B64.encode(&key[1 + n..]),
                })
            }
            KeyAlgorithm::Rsa { .. } => {
                let (n, e) = rsa_components(key)
                    .ok_or_else(|| JwsError::Malformed("malformed RSA key".into()))?;
                Ok(Jwk::Rsa {
                    n: B64.encode(n),
                    e: B64.encode(e),
                })
            }
            KeyAlgorithm::Ed25519 => Ok(Jwk::Okp {
                crv: "Ed25519".into(),
                x: B64.encode(&key[..]),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};

    /// A flattened JWS body signed by `sign`.
    fn jws_body(
        header: &serde_json::Value,
        payload: &[u8],
        sign: &dyn Fn(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        let p = B64.encode(serde_json::to_vec(header).unwrap());
        let pl = B64.encode(payload);
        let sig = sign(format!("{p}.{pl}").as_bytes());
        serde_json::to_vec(
            &serde_json::json!({"protected": p, "payload": pl, "signature": B64.encode(sig)}),
        )
        .unwrap()
    }

    /// (alg, jwk, signer) for each supported algorithm.
    type Signer = Box<dyn Fn(&[u8]) -> Vec<u8>>;

    fn keys() -> Vec<(&'static str, Jwk, Signer)> {
        let rng = SystemRandom::new();
        let p256 = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let p384 = EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
        let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let ed = Ed25519KeyPair::generate().unwrap();
        let jwk = |der: &[u8]| Jwk::from_spki_der(der).unwrap();
        let p256_jwk = jwk(p256.public_key().as_der().unwrap().as_ref());
        let p384_jwk = jwk(p384.public_key().as_der().unwrap().as_ref());
        let rsa_jwk = jwk(rsa.public_key().as_der().unwrap().as_ref());
        let ed_jwk = jwk(ed.public_key().as_der().unwrap().as_ref());
        let (r1, r2) = (rng.clone(), rng.clone());
        vec![
            (
                "ES256",
                p256_jwk,
                Box::new(move |m: &[u8]| p256.sign(&r1, m).unwrap().as_ref().to_vec()),
            ),
            (
                "ES384",
                p384_jwk,
                Box::new(move |m: &[u8]| p384.sign(&r2, m).unwrap().as_ref().to_vec()),
            ),
            (
                "RS256",
                rsa_jwk,
                Box::new(move |m: &[u8]| {
                    let mut sig = vec![0; rsa.public_modulus_len()];
                    rsa.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
                        .unwrap();
                    sig
                }),
            ),
            (
                "EdDSA",
                ed_jwk,
                Box::new(move |m: &[u8]| ed.sign(m).as_ref().to_vec()),
            ),
        ]
    }

    #[test]
    fn each_algorithm_verifies_and_rejects_tampering() {
        for (alg, jwk, sign) in keys() {
            let header =
                serde_json::json!({"alg": alg, "jwk": jwk, "nonce": "n1", "url": "https://ca/x"});
            let body = jws_body(&header, br#"{"hello":1}"#, &*sign);
            let jws = parse(&body).unwrap();
            assert_eq!(jws.protected.alg, alg);
            assert_eq!(jws.protected.nonce.as_deref(), Some("n1"));
            assert_eq!(jws.protected.jwk.as_ref(), Some(&jwk));
            assert_eq!(jws.payload, br#"{"hello":1}"#);
            jwk.verify(alg, &jws.signing_input, &jws.signature)
                .unwrap_or_else(|e| panic!("{alg}: {e}"));

            // Tampered payload: same signature over different bytes.
            let mut tampered = jws.signing_input.clone();
            let last = tampered.len() - 1;
            tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
            assert_eq!(
                jwk.verify(alg, &tampered, &jws.signature),
                Err(JwsError::BadSignature),
                "{alg}"
            );
            let mut bad_sig = jws.signature.clone();
            bad_sig[0] ^= 1;
            assert_eq!(
                jwk.verify(alg, &jws.signing_input, &bad_sig),
                Err(JwsError::BadSignature),
                "{alg}"
            );

            // Algorithms that do not fit the key, and algorithms never accepted.
            for wrong in [
                "ES256", "ES384", "RS256", "EdDSA", "none", "HS256", "PS256", "",
            ] {
                if wrong == alg {
                    continue;
                }
                assert!(
                    matches!(
                        jwk.verify(wrong, &jws.signing_input, &jws.signature),
                        Err(JwsError::BadSignatureAlgorithm(_))
                    ),
                    "{alg} key must refuse alg {wrong:?}"
                );
            }
        }
    }

    #[test]
    fn from_spki_der_matches_rcgen_keys_and_thumbprints_are_stable() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
            let jwk = Jwk::from_spki_der(&spki).unwrap();
            // A JSON round trip (what an ACME client sends) keeps the thumbprint.
            let back: Jwk = serde_json::from_str(&serde_json::to_string(&jwk).unwrap()).unwrap();
            assert_eq!(back, jwk);
            assert_eq!(back.thumbprint(), jwk.thumbprint());
            assert_eq!(jwk.thumbprint().len(), 43);
        }
        // Same key through two paths gives the same thumbprint; different keys differ.
        let a = rcgen::KeyPair::generate().unwrap();
        let b = rcgen::KeyPair::generate().unwrap();
        let ja = Jwk::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&a)).unwrap();
        let jb = Jwk::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&b)).unwrap();
        assert_ne!(ja.thumbprint(), jb.thumbprint());
        assert!(Jwk::from_spki_der(b"\x30\x00").is_err());
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        let jwk: Jwk = serde_json::from_str(
            r#"{"kty":"RSA",
                "n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
                "e":"AQAB","alg":"RS256","kid":"2011-04-29"}"#,
        )
        .unwrap();
        assert_eq!(
            jwk.thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn parse_is_strict() {
        let p = B64.encode(br#"{"alg":"ES256","kid":"k"}"#);
        let ok = format!(r#"{{"protected":"{p}","payload":"","signature":"AAAA"}}"#);
        let jws = parse(ok.as_bytes()).unwrap();
        assert!(jws.payload.is_empty(), "POST-as-GET has an empty payload");
        assert_eq!(jws.signing_input, format!("{p}.").as_bytes());
        assert_eq!(jws.protected.kid.as_deref(), Some("k"));

        let cases = [
            // unprotected header member
            format!(r#"{{"protected":"{p}","header":{{}},"payload":"","signature":"AAAA"}}"#),
            // unknown member
            format!(r#"{{"protected":"{p}","payload":"","signature":"AAAA","x":1}}"#),
            // missing member
            format!(r#"{{"protected":"{p}","payload":""}}"#),
            // padding
            format!(r#"{{"protected":"{p}","payload":"","signature":"AA=="}}"#),
            // standard (not url-safe) alphabet
            format!(r#"{{"protected":"{p}","payload":"+/+/","signature":"AAAA"}}"#),
            // non-canonical trailing bits
            format!(r#"{{"protected":"{p}","payload":"","signature":"AB"}}"#),
            // protected is not an object
            format!(
                r#"{{"protected":"{}","payload":"","signature":"AAAA"}}"#,
                B64.encode(b"[1]")
            ),
            // protected without alg
            format!(
                r#"{{"protected":"{}","payload":"","signature":"AAAA"}}"#,
                B64.encode(br#"{"kid":"k"}"#)
            ),
            // crit
            format!(
                r#"{{"protected":"{}","payload":"","signature":"AAAA"}}"#,
                B64.encode(br#"{"alg":"ES256","crit":["b64"],"b64":false}"#)
            ),
            // duplicate member in the protected header
            format!(
                r#"{{"protected":"{}","payload":"","signature":"AAAA"}}"#,
                B64.encode(br#"{"alg":"ES256","alg":"none"}"#)
            ),
            // duplicate top-level member
            format!(r#"{{"protected":"{p}","payload":"","payload":"","signature":"AAAA"}}"#),
            // general serialization
            format!(r#"{{"payload":"","signatures":[{{"protected":"{p}","signature":"AAAA"}}]}}"#),
            "not json".to_string(),
        ];
        for body in &cases {
            assert!(
                matches!(parse(body.as_bytes()), Err(JwsError::Malformed(_))),
                "must refuse {body}"
            );
        }
    }

    #[test]
    fn hmac_for_eab() {
        use aws_lc_rs::hmac;
        let key = b"an external account binding key!";
        for (name, alg) in [
            ("HS256", hmac::HMAC_SHA256),
            ("HS384", hmac::HMAC_SHA384),
            ("HS512", hmac::HMAC_SHA512),
        ] {
            let tag = hmac::sign(&hmac::Key::new(alg, key), b"msg");
            verify_hmac(name, key, b"msg", tag.as_ref()).unwrap();
            assert_eq!(
                verify_hmac(name, key, b"msh", tag.as_ref()),
                Err(JwsError::BadSignature)
            );
            assert_eq!(
                verify_hmac(name, b"other key", b"msg", tag.as_ref()),
                Err(JwsError::BadSignature)
            );
        }
        assert!(matches!(
            verify_hmac("ES256", key, b"m", b"s"),
            Err(JwsError::BadSignatureAlgorithm(_))
        ));
        assert!(matches!(
            verify_hmac("none", key, b"m", b""),
            Err(JwsError::BadSignatureAlgorithm(_))
        ));
    }

    #[test]
    fn small_rsa_jwk_is_refused() {
        let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let Jwk::Rsa { e, .. } =
            Jwk::from_spki_der(rsa.public_key().as_der().unwrap().as_ref()).unwrap()
        else {
            panic!("not RSA")
        };
        let small = Jwk::Rsa {
            n: B64.encode([0xffu8; 128]),
            e,
        };
        assert!(
            matches!(small.verify("RS256", b"m", &[0; 128]), Err(JwsError::BadSignatureAlgorithm(m)) if m.contains("1024"))
        );
    }
}
