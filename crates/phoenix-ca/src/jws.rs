//! JSON Web Signatures for ACME (RFC 8555 6.2, RFC 7515, RFC 7517, RFC 7638), as the ACME
//! server sees them: parsing and verification come from `phoenix_pki::jws`; this module maps
//! their errors to RFC 8555 problem types and adds the few helpers the server needs (stored
//! JWKs as JSON, comparison with a certificate's key). The policy part (which key form is
//! allowed where, nonce and url checks) lives in `acme.rs`.

use base64::Engine;
use phoenix_pki::jws::{self as pki_jws, JwsError};
use serde_json::Value;

use crate::problem::{Problem, ProblemType};

/// Signature algorithms accepted on ACME requests (those phoenix-pki verifies), listed in
/// badSignatureAlgorithm problems.
pub(crate) const SUPPORTED_ALGS: &[&str] = &["ES256", "ES384", "RS256", "EdDSA"];

pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    // RFC 7515 2: base64url without padding; reject padding rather than guess.
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

pub(crate) fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn problem(e: JwsError) -> Problem {
    match e {
        JwsError::BadSignatureAlgorithm(m) => {
            let mut p = Problem::new(ProblemType::BadSignatureAlgorithm, m);
            p.algorithms = Some(SUPPORTED_ALGS.to_vec());
            p
        }
        // RFC 8555 6.2 lists no dedicated type for a signature that does not verify; like
        // Boulder and Pebble we answer `malformed` ("the request message was malformed").
        JwsError::BadSignature => Problem::malformed("JWS signature is invalid"),
        other => Problem::malformed(other.to_string()),
    }
}

/// The protected header fields ACME uses.
#[derive(Debug, Clone)]
pub(crate) struct ProtectedHeader {
    pub alg: String,
    pub nonce: Option<String>,
    pub url: Option<String>,
    pub kid: Option<String>,
    pub jwk: Option<Value>,
}

/// A parsed, not yet verified flattened JWS.
#[derive(Debug, Clone)]
pub(crate) struct Jws {
    pub header: ProtectedHeader,
    pub payload: Vec<u8>,
    inner: pki_jws::Jws,
}

impl Jws {
    pub(crate) fn parse(body: &[u8]) -> Result<Jws, Problem> {
        let inner = pki_jws::parse(body).map_err(problem)?;
        let p = &inner.protected;
        let header = ProtectedHeader {
            alg: p.alg.clone(),
            nonce: p.nonce.clone(),
            url: p.url.clone(),
            kid: p.kid.clone(),
            jwk: p.jwk.as_ref().and_then(|k| serde_json::to_value(k).ok()),
        };
        Ok(Jws {
            header,
            payload: inner.payload.clone(),
            inner,
        })
    }

    /// Parses a JWS nested in a payload (EAB, keyChange).
    pub(crate) fn parse_value(v: &Value) -> Result<Jws, Problem> {
        Jws::parse(v.to_string().as_bytes())
    }

    /// Verifies the signature with `key` under the header's `alg`.
    pub(crate) fn verify(&self, key: &Jwk) -> Result<(), Problem> {
        key.0
            .verify(
                &self.header.alg,
                &self.inner.signing_input,
                &self.inner.signature,
            )
            .map_err(problem)
    }

    /// Verifies an HMAC (EAB, RFC 8555 7.3.4) with `key`.
    pub(crate) fn verify_hmac(&self, key: &[u8]) -> Result<(), Problem> {
        pki_jws::verify_hmac(
            &self.header.alg,
            key,
            &self.inner.signing_input,
            &self.inner.signature,
        )
        .map_err(|e| match e {
            JwsError::BadSignature => {
                Problem::unauthorized("external account binding MAC does not verify")
            }
            other => problem(other),
        })
    }
}

/// A public JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Jwk(pki_jws::Jwk);

impl Jwk {
    pub(crate) fn from_value(v: &Value) -> Result<Jwk, Problem> {
        if v.get("d").is_some() {
            return Err(Problem::new(
                ProblemType::BadPublicKey,
                "the JWK contains a private key",
            ));
        }
        serde_json::from_value(v.clone()).map(Jwk).map_err(|e| {
            Problem::new(
                ProblemType::BadPublicKey,
                format!("unsupported or malformed JWK: {e}"),
            )
        })
    }

    /// RFC 7638 SHA-256 thumbprint, base64url.
    pub(crate) fn thumbprint(&self) -> String {
        self.0.thumbprint()
    }

    /// The JWK as stored and echoed (public members only).
    pub(crate) fn to_value(&self) -> Value {
        serde_json::to_value(&self.0).unwrap_or_default()
    }

    /// True when this JWK is the same key as the certificate's SubjectPublicKeyInfo
    /// (revocation by certificate key, RFC 8555 7.6).
    pub(crate) fn matches_spki(&self, spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> bool {
        pki_jws::Jwk::from_spki_der(spki.raw).is_ok_and(|k| k.thumbprint() == self.thumbprint())
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
        assert!(Jwk::from_value(&serde_json::json!({"kty": "EC", "d": "x"})).is_err());
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
        let body = |payload: &[u8], sig: &[u8]| serde_json::json!({"protected": protected, "payload": b64url(payload), "signature": b64url(sig)});
        let sig = kp
            .sign(&rng, format!("{protected}.{}", b64url(b"{}")).as_bytes())
            .unwrap();
        let jws = Jws::parse_value(&body(b"{}", sig.as_ref())).unwrap();
        let key = Jwk::from_value(jws.header.jwk.as_ref().unwrap()).unwrap();
        jws.verify(&key).unwrap();
        let tampered = Jws::parse_value(&body(b"{\"x\":1}", sig.as_ref())).unwrap();
        assert_eq!(
            tampered.verify(&key).unwrap_err().kind,
            ProblemType::Malformed
        );
        // An unprotected header is refused (RFC 8555 6.2).
        let mut with_header = body(b"{}", sig.as_ref());
        with_header["header"] = serde_json::json!({});
        assert!(Jws::parse_value(&with_header).is_err());
    }
}
