//! JSON Web Signature handling for ACME (RFC 8555 6.2, RFC 7515, RFC 7517, RFC 7638).
//!
//! Parses the flattened JSON serialization, decodes the protected header, turns JWKs into
//! verifiable keys (EC P-256/P-384, RSA 2048-8192, Ed25519), computes RFC 7638 thumbprints,
//! verifies signatures with aws-lc-rs and MACs for External Account Binding. The policy part
//! (which key form is allowed where, nonce and url checks) lives in `acme.rs`.
//!
//! This is the JWS half of what the brief assigned to `phoenix-pki`; see `authority.rs`.

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::problem::{Problem, ProblemType};

/// Signature algorithms accepted on ACME requests (listed in badSignatureAlgorithm problems).
pub(crate) const SUPPORTED_ALGS: &[&str] = &[
    "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA",
];

pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    // RFC 7515 2: base64url without padding; reject padding rather than guess.
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

pub(crate) fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The flattened JWS JSON serialization (RFC 7515 7.2.2), the only one ACME allows.
#[derive(Deserialize)]
struct Flattened {
    protected: String,
    payload: String,
    signature: String,
    // RFC 8555 6.2: the unprotected header MUST NOT be used.
    header: Option<Value>,
}

/// The protected header fields ACME uses.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ProtectedHeader {
    pub alg: String,
    pub nonce: Option<String>,
    pub url: Option<String>,
    pub kid: Option<String>,
    pub jwk: Option<Value>,
}

/// A parsed, not yet verified JWS.
#[derive(Debug, Clone)]
pub(crate) struct Jws {
    pub header: ProtectedHeader,
    pub payload: Vec<u8>,
    signing_input: Vec<u8>,
    signature: Vec<u8>,
}

impl Jws {
    pub(crate) fn parse(body: &[u8]) -> Result<Jws, Problem> {
        let f: Flattened = serde_json::from_slice(body)
            .map_err(|e| Problem::malformed(format!("request is not a flattened JWS: {e}")))?;
        Jws::from_flattened(f)
    }

    pub(crate) fn parse_value(v: &Value) -> Result<Jws, Problem> {
        let f: Flattened = serde_json::from_value(v.clone())
            .map_err(|e| Problem::malformed(format!("not a flattened JWS: {e}")))?;
        Jws::from_flattened(f)
    }

    fn from_flattened(f: Flattened) -> Result<Jws, Problem> {
        if f.header.is_some() {
            return Err(Problem::malformed(
                "JWS unprotected header is not allowed (RFC 8555 6.2)",
            ));
        }
        let header_bytes = b64url_decode(&f.protected)
            .ok_or_else(|| Problem::malformed("JWS protected header is not base64url"))?;
        let header: ProtectedHeader = serde_json::from_slice(&header_bytes)
            .map_err(|e| Problem::malformed(format!("JWS protected header is invalid: {e}")))?;
        let payload = b64url_decode(&f.payload)
            .ok_or_else(|| Problem::malformed("JWS payload is not base64url"))?;
        let signature = b64url_decode(&f.signature)
            .ok_or_else(|| Problem::malformed("JWS signature is not base64url"))?;
        let signing_input = format!("{}.{}", f.protected, f.payload).into_bytes();
        Ok(Jws {
            header,
            payload,
            signing_input,
            signature,
        })
    }

    /// Verifies the signature with `key` under the header's `alg`.
    pub(crate) fn verify(&self, key: &Jwk) -> Result<(), Problem> {
        key.verify(&self.header.alg, &self.signing_input, &self.signature)
    }

    /// Verifies an HMAC (EAB, RFC 8555 7.3.4) with `key`.
    pub(crate) fn verify_hmac(&self, key: &[u8]) -> Result<(), Problem> {
        use aws_lc_rs::hmac;
        let alg = match self.header.alg.as_str() {
            "HS256" => hmac::HMAC_SHA256,
            "HS384" => hmac::HMAC_SHA384,
            "HS512" => hmac::HMAC_SHA512,
            other => {
                return Err(Problem::new(
                    ProblemType::BadSignatureAlgorithm,
                    format!("external account binding must use HS256, HS384 or HS512, not {other}"),
                ))
            }
        };
        hmac::verify(
            &hmac::Key::new(alg, key),
            &self.signing_input,
            &self.signature,
        )
        .map_err(|_| Problem::unauthorized("external account binding MAC does not verify"))
    }
}

/// A public key from a JWK (RFC 7517/7518), with the members the thumbprint covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Jwk {
    Ec {
        crv: &'static str,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

fn member(v: &Value, name: &str) -> Result<Vec<u8>, Problem> {
    v.get(name)
        .and_then(Value::as_str)
        .and_then(b64url_decode)
        .ok_or_else(|| {
            Problem::new(
                ProblemType::BadPublicKey,
                format!("JWK member {name:?} is missing or not base64url"),
            )
        })
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

impl Jwk {
    pub(crate) fn from_value(v: &Value) -> Result<Jwk, Problem> {
        let bad = |m: &str| Problem::new(ProblemType::BadPublicKey, m.to_owned());
        if v.get("d").is_some() {
            return Err(bad("the JWK contains a private key"));
        }
        match v.get("kty").and_then(Value::as_str) {
            Some("EC") => {
                let (crv, len) = match v.get("crv").and_then(Value::as_str) {
                    Some("P-256") => ("P-256", 32),
                    Some("P-384") => ("P-384", 48),
                    _ => return Err(bad("EC keys must use curve P-256 or P-384")),
                };
                let (x, y) = (member(v, "x")?, member(v, "y")?);
                if x.len() != len || y.len() != len {
                    return Err(bad("EC key coordinates have the wrong length"));
                }
                Ok(Jwk::Ec { crv, x, y })
            }
            Some("RSA") => {
                let (n, e) = (member(v, "n")?, member(v, "e")?);
                let bits = strip_zeros(&n).len() * 8;
                if !(2048..=8192).contains(&bits) {
                    return Err(bad("RSA keys must be 2048 to 8192 bits"));
                }
                Ok(Jwk::Rsa { n, e })
            }
            Some("OKP") if v.get("crv").and_then(Value::as_str) == Some("Ed25519") => {
                let x = member(v, "x")?;
                if x.len() != 32 {
                    return Err(bad("Ed25519 key has the wrong length"));
                }
                Ok(Jwk::Ed25519 { x })
            }
            _ => Err(bad(
                "unsupported JWK key type (use EC P-256/P-384, RSA or Ed25519)",
            )),
        }
    }

    /// The required members in lexicographic order: RFC 7638 3.2's canonical form.
    fn canonical(&self) -> String {
        match self {
            Jwk::Ec { crv, x, y } => format!(
                r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
                b64url(x),
                b64url(y)
            ),
            Jwk::Rsa { n, e } => {
                format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64url(e), b64url(n))
            }
            Jwk::Ed25519 { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64url(x)),
        }
    }

    /// RFC 7638 SHA-256 thumbprint, base64url.
    pub(crate) fn thumbprint(&self) -> String {
        b64url(&Sha256::digest(self.canonical().as_bytes()))
    }

    /// The JWK as stored and echoed (public members only).
    pub(crate) fn to_value(&self) -> Value {
        serde_json::from_str(&self.canonical()).unwrap_or_default()
    }

    fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> Result<(), Problem> {
        let mismatch =
            || Problem::malformed(format!("JWS algorithm {alg} does not match the key type"));
        let ok = match (alg, self) {
            ("ES256", Jwk::Ec { crv: "P-256", x, y })
            | ("ES384", Jwk::Ec { crv: "P-384", x, y }) => {
                let alg: &signature::EcdsaVerificationAlgorithm = if alg == "ES256" {
                    &signature::ECDSA_P256_SHA256_FIXED
                } else {
                    &signature::ECDSA_P384_SHA384_FIXED
                };
                let mut point = Vec::with_capacity(1 + x.len() * 2);
                point.push(4);
                point.extend_from_slice(x);
                point.extend_from_slice(y);
                UnparsedPublicKey::new(alg, point).verify(msg, sig).is_ok()
            }
            ("RS256" | "RS384" | "RS512" | "PS256", Jwk::Rsa { n, e }) => {
                let params: &signature::RsaParameters = match alg {
                    "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                    "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                    "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                    _ => &signature::RSA_PSS_2048_8192_SHA256,
                };
                RsaPublicKeyComponents {
                    n: strip_zeros(n),
                    e: strip_zeros(e),
                }
                .verify(params, msg, sig)
                .is_ok()
            }
            ("EdDSA", Jwk::Ed25519 { x }) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(msg, sig)
                .is_ok(),
            _ => return Err(mismatch()),
        };
        if ok {
            Ok(())
        } else {
            // RFC 8555 6.2 lists no dedicated type for a signature that does not verify; like
            // Boulder and Pebble we answer `malformed` ("the request message was malformed").
            Err(Problem::malformed("JWS signature is invalid"))
        }
    }

    /// True when this JWK is the same key as the certificate's SubjectPublicKeyInfo
    /// (revocation by certificate key, RFC 8555 7.6).
    pub(crate) fn matches_spki(&self, spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> bool {
        use x509_parser::public_key::PublicKey;
        match (self, spki.parsed()) {
            (Jwk::Ec { x, y, .. }, Ok(PublicKey::EC(point))) => {
                let data = point.data();
                data.len() == 1 + x.len() + y.len()
                    && data[0] == 4
                    && &data[1..1 + x.len()] == x.as_slice()
                    && &data[1 + x.len()..] == y.as_slice()
            }
            (Jwk::Rsa { n, e }, Ok(PublicKey::RSA(rsa))) => {
                strip_zeros(rsa.modulus) == strip_zeros(n)
                    && strip_zeros(rsa.exponent) == strip_zeros(e)
            }
            (Jwk::Ed25519 { x }, _) => {
                spki.algorithm.algorithm.to_id_string() == "1.3.101.112"
                    && spki.subject_public_key.data.as_ref() == x.as_slice()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_thumbprint_example() {
        // The RSA example of RFC 7638 section 3.1.
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"
        });
        let key = Jwk::from_value(&jwk).unwrap();
        assert_eq!(
            key.thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn es256_signature_verifies_and_tampering_fails() {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let pubk = kp.public_key().as_ref();
        let jwk = serde_json::json!({"kty":"EC","crv":"P-256","x":b64url(&pubk[1..33]),"y":b64url(&pubk[33..])});
        let protected = b64url(
            serde_json::json!({"alg":"ES256","jwk":jwk,"nonce":"n","url":"u"})
                .to_string()
                .as_bytes(),
        );
        let payload = b64url(b"{}");
        let sig = kp
            .sign(&rng, format!("{protected}.{payload}").as_bytes())
            .unwrap();
        let body = serde_json::json!({"protected":protected,"payload":payload,"signature":b64url(sig.as_ref())});
        let jws = Jws::parse(body.to_string().as_bytes()).unwrap();
        let key = Jwk::from_value(jws.header.jwk.as_ref().unwrap()).unwrap();
        jws.verify(&key).unwrap();
        let mut bad = jws.clone();
        bad.payload = b"{\"x\":1}".to_vec();
        bad.signing_input = format!("{protected}.{}", b64url(b"{\"x\":1}")).into_bytes();
        assert_eq!(bad.verify(&key).unwrap_err().kind, ProblemType::Malformed);
    }
}
