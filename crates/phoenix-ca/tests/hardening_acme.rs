//! Hostile ACME input against the CA over real HTTPS on loopback: malformed JWS and JSON,
//! oversized bodies, unknown and `none` algorithms, a nonce replayed by another account, and CSRs
//! that ask for more than a leaf. Each is answered with the exact RFC 8555 problem type (or 413
//! for a body over the limit), and after all of them the CA still serves a normal request: no
//! panic, no task killed.

mod common;

use common::*;
use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

const PROBLEM: &str = "urn:ietf:params:acme:error:";

async fn post_raw(client: &TestClient, url: &str, body: impl Into<reqwest::Body>) -> Resp {
    let r = client
        .http
        .post(url)
        .header("content-type", "application/jose+json")
        .body(body)
        .send()
        .await
        .unwrap();
    Resp {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jws_and_json_get_malformed_problems_without_a_panic() {
    let ca = TestCa::start().await;
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let new_order = client.url("newOrder");
    let order = json!({"identifiers": [{"type": "dns", "value": "app.phoenix.test"}]});
    let nonce = client.nonce().await;
    let good = client.sign(&new_order, &nonce, Some(&order));
    let with = |key: &str, value: Value| {
        let mut v = good.clone();
        v[key] = value;
        v.to_string()
    };
    // Under the 64 KiB body limit, far over serde_json's recursion limit.
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let cases: Vec<(&str, String)> = vec![
        ("empty body", String::new()),
        ("not JSON", "this is not json".into()),
        ("truncated JSON", good.to_string()[..20].to_owned()),
        ("JSON array", "[]".into()),
        ("JSON string", "\"jws\"".into()),
        ("nesting 30000 deep", deep),
        ("no signature", {
            let mut v = good.clone();
            v.as_object_mut().unwrap().remove("signature");
            v.to_string()
        }),
        (
            "protected not base64url",
            with("protected", json!("!!!not base64!!!")),
        ),
        (
            "protected not JSON",
            with("protected", json!(b64(b"not json"))),
        ),
        (
            "protected a JSON array",
            with("protected", json!(b64(b"[1,2]"))),
        ),
        ("payload not base64url", with("payload", json!("***"))),
        ("signature not base64url", with("signature", json!("***"))),
        ("signature a number", with("signature", json!(12345))),
        (
            "unprotected header",
            with("header", json!({"alg": "ES256"})),
        ),
        (
            "general serialization",
            json!({
                "payload": good["payload"],
                "signatures": [{"protected": good["protected"], "signature": good["signature"]}]
            })
            .to_string(),
        ),
        (
            "invalid UTF-8",
            String::from_utf8_lossy(b"{\"protected\":\"\xff\xfe\"}").into_owned(),
        ),
    ];
    for (name, body) in cases {
        let r = post_raw(&client, &new_order, body).await;
        assert!(
            r.status == 400 || r.status == 401 || r.status == 403,
            "{name}: status {} {r:?}",
            r.status
        );
        let problem = r.problem();
        assert!(
            problem == format!("{PROBLEM}malformed") || problem == format!("{PROBLEM}badNonce"),
            "{name}: {problem}"
        );
        assert!(r.nonce().is_some(), "{name}: no Replay-Nonce on the error");
    }

    // The payload must be JSON of the right shape once the JWS itself is good.
    for (name, payload) in [
        ("payload JSON array", json!([1, 2, 3])),
        (
            "identifiers not a list",
            json!({"identifiers": "app.phoenix.test"}),
        ),
        (
            "identifier without value",
            json!({"identifiers": [{"type": "dns"}]}),
        ),
        (
            "identifier of unknown type",
            json!({"identifiers": [{"type": "email", "value": "a@b"}]}),
        ),
    ] {
        let r = client.post(&new_order, Some(&payload)).await;
        let problem = r.problem();
        assert!(
            problem == format!("{PROBLEM}malformed")
                || problem == format!("{PROBLEM}unsupportedIdentifier")
                || problem == format!("{PROBLEM}rejectedIdentifier"),
            "{name}: {problem} {r:?}"
        );
    }

    // Still serving: a normal order goes through.
    let r = client.new_order(&["app.phoenix.test"]).await;
    assert_eq!(r.status, 201, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_before_parsing() {
    let ca = TestCa::start().await;
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let new_order = client.url("newOrder");
    // A valid JWS whose payload is 1 MiB of identifiers.
    let ids: Vec<Value> = (0..20_000)
        .map(|i| json!({"type": "dns", "value": format!("host{i}.phoenix.test")}))
        .collect();
    let nonce = client.nonce().await;
    let big = client.sign(&new_order, &nonce, Some(&json!({ "identifiers": ids })));
    assert!(big.to_string().len() > 1 << 20);
    let r = post_raw(&client, &new_order, big.to_string()).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.problem(), format!("{PROBLEM}malformed"));
    // 8 MiB of zeros.
    let r = post_raw(&client, &new_order, vec![b'0'; 8 << 20]).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.problem(), format!("{PROBLEM}malformed"));

    let r = client.new_order(&["app.phoenix.test"]).await;
    assert_eq!(r.status, 201, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_unknown_and_mismatched_algorithms_are_bad_signature_algorithm() {
    let ca = TestCa::start().await;
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let new_order = client.url("newOrder");
    let order = json!({"identifiers": [{"type": "dns", "value": "app.phoenix.test"}]});

    for alg in ["none", "None", "NONE", "HS256", "XYZ", ""] {
        let nonce = client.nonce().await;
        let mut h = client.header(&new_order, &nonce);
        h["alg"] = json!(alg);
        let mut signed = client.sign_header(&h, Some(&order));
        if alg.eq_ignore_ascii_case("none") {
            // RFC 7518 3.6: an unsecured JWS has an empty signature.
            signed["signature"] = json!("");
        }
        let r = client.send(&new_order, &signed).await;
        assert_eq!(
            r.problem(),
            format!("{PROBLEM}badSignatureAlgorithm"),
            "alg {alg:?}: {r:?}"
        );
        assert_eq!(r.status, 400);
    }
    // An algorithm the CA knows, but not the one of the key: the signature cannot verify.
    for alg in ["ES384", "RS256", "EdDSA"] {
        let nonce = client.nonce().await;
        let mut h = client.header(&new_order, &nonce);
        h["alg"] = json!(alg);
        let r = client
            .send(&new_order, &client.sign_header(&h, Some(&order)))
            .await;
        let problem = r.problem();
        assert!(
            problem == format!("{PROBLEM}badSignatureAlgorithm")
                || problem == format!("{PROBLEM}malformed"),
            "alg {alg}: {problem}"
        );
        assert_eq!(r.status, 400);
    }
    // A new account with alg none and a jwk is refused too (no account is created).
    let stranger = TestClient::new(&ca).await;
    let url = stranger.url("newAccount");
    let nonce = stranger.nonce().await;
    let h = json!({"alg": "none", "jwk": stranger.jwk, "nonce": nonce, "url": url});
    let mut signed = stranger.sign_header(&h, Some(&json!({"termsOfServiceAgreed": true})));
    signed["signature"] = json!("");
    let r = stranger.send(&url, &signed).await;
    assert_eq!(r.problem(), format!("{PROBLEM}badSignatureAlgorithm"));
    let r = stranger
        .post(&url, Some(&json!({"onlyReturnExisting": true})))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}accountDoesNotExist"));
}

/// A nonce is spent once, whoever spends it: another account cannot replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_used_by_one_account_is_bad_nonce_for_another() {
    let ca = TestCa::start().await;
    let mut alice = TestClient::new(&ca).await;
    alice.register().await;
    let mut bob = TestClient::new(&ca).await;
    bob.register().await;
    let new_order = alice.url("newOrder");
    let order = json!({"identifiers": [{"type": "dns", "value": "app.phoenix.test"}]});

    let nonce = alice.nonce().await;
    let r = alice
        .send(&new_order, &alice.sign(&new_order, &nonce, Some(&order)))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = bob
        .send(&new_order, &bob.sign(&new_order, &nonce, Some(&order)))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}badNonce"));
    // And the other way round: a nonce Bob spent on newAccount is gone for Alice.
    let nonce = bob.nonce().await;
    let url = bob.url("newAccount");
    let h = json!({"alg": "ES256", "jwk": bob.jwk, "nonce": nonce, "url": url});
    let r = bob
        .send(
            &url,
            &bob.sign_header(&h, Some(&json!({"onlyReturnExisting": true}))),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = alice
        .send(&new_order, &alice.sign(&new_order, &nonce, Some(&order)))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}badNonce"));
    // A nonce that was never issued.
    let r = alice
        .send(
            &new_order,
            &alice.sign(&new_order, "AAAAAAAAAAAAAAAAAAAAAA", Some(&order)),
        )
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}badNonce"));
}

/// A CSR for `app.phoenix.test` with extra requested extensions.
fn csr_with(extensions: Vec<rcgen::CustomExtension>) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["app.phoenix.test".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions = extensions;
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn ext(oid: &[u64], content: &[u8], critical: bool) -> rcgen::CustomExtension {
    let mut e = rcgen::CustomExtension::from_oid_content(oid, content.to_vec());
    e.set_criticality(critical);
    e
}

/// The OIDs of the extensions requested in a CSR in a CSR, to prove the test CSR carries what it claims.
fn requested_oids(csr: &[u8]) -> Vec<String> {
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr).unwrap();
    req.certification_request_info
        .iter_attributes()
        .flat_map(|a| match a.parsed_attribute() {
            x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(r) => r
                .extensions
                .iter()
                .map(|e| e.oid.to_id_string())
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        })
        .collect()
}

/// CSRs asking for CA powers (basicConstraints CA, keyCertSign, name constraints) or carrying an
/// unknown critical extension are badCSR. Harmless requests (a leaf key usage, an unknown
/// non-critical extension) are issued, and nothing of what they asked for is copied: the leaf
/// profile is the CA's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrs_asking_for_more_than_a_leaf_are_bad_csr_and_extensions_are_never_copied() {
    let ca = TestCa::start().await;
    let responder = Http01Responder::start(ca.cfg.acme.http01_port).await;
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let created = client.new_order(&["app.phoenix.test"]).await;
    let order_url = created.location();
    let order = created.json();
    client.authorize(&order_url, &order, &responder).await;
    let finalize = order["finalize"].as_str().unwrap().to_owned();

    let hostile: Vec<(&str, rcgen::CustomExtension, &str)> = vec![
        // basicConstraints cA TRUE.
        (
            "basicConstraints CA",
            ext(&[2, 5, 29, 19], &[0x30, 0x03, 0x01, 0x01, 0xff], true),
            "2.5.29.19",
        ),
        // keyUsage keyCertSign (bit 5) + cRLSign (bit 6).
        (
            "keyUsage keyCertSign",
            ext(&[2, 5, 29, 15], &[0x03, 0x02, 0x01, 0x06], true),
            "2.5.29.15",
        ),
        // nameConstraints permitting everything under phoenix.test.
        (
            "nameConstraints",
            ext(
                &[2, 5, 29, 30],
                &[
                    0x30, 0x10, 0xa0, 0x0e, 0x30, 0x0c, 0x82, 0x0a, b'.', b'p', b'h', b'o', b'e',
                    b'n', b'i', b'x', b'.', b't',
                ],
                true,
            ),
            "2.5.29.30",
        ),
        // An extension nobody knows, marked critical.
        (
            "unknown critical",
            ext(&[1, 3, 6, 1, 4, 1, 55555, 1], &[0x05, 0x00], true),
            "1.3.6.1.4.1.55555.1",
        ),
    ];
    for (name, extension, oid) in hostile {
        let csr = csr_with(vec![extension]);
        assert!(
            requested_oids(&csr).iter().any(|o| o == oid),
            "{name}: test CSR lacks {oid}"
        );
        let r = client
            .post(&finalize, Some(&json!({"csr": b64(&csr)})))
            .await;
        assert_eq!(r.problem(), format!("{PROBLEM}badCSR"), "{name}: {r:?}");
        // The order is still ready for a good CSR.
        assert_eq!(
            client.post(&order_url, None).await.json()["status"],
            "ready"
        );
    }

    // keyUsage digitalSignature (as cert-manager asks) and an unknown non-critical extension.
    let benign = csr_with(vec![
        ext(&[2, 5, 29, 15], &[0x03, 0x02, 0x07, 0x80], true),
        ext(&[1, 3, 6, 1, 4, 1, 55555, 2], &[0x05, 0x00], false),
    ]);
    let r = client
        .post(&finalize, Some(&json!({"csr": b64(&benign)})))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let done = client.wait_order(&order_url, "valid").await;
    let cert = client
        .post(done["certificate"].as_str().unwrap(), None)
        .await;
    let chain = String::from_utf8(cert.body).unwrap();
    let leaf_pem = &split_pem(&chain)[0];
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf_pem.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&pem.contents).unwrap();
    assert!(!leaf.is_ca(), "a CSR made a CA certificate");
    let oids: Vec<String> = leaf
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    assert!(
        !oids.iter().any(|o| o.starts_with("1.3.6.1.4.1.55555")),
        "a requested extension was copied: {oids:?}"
    );
    let ku = leaf
        .key_usage()
        .unwrap()
        .expect("leaf has a key usage")
        .value;
    assert!(!ku.key_cert_sign() && !ku.crl_sign(), "{ku:?}");
}
