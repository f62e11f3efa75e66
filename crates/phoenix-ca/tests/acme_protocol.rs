//! ACME protocol tests with the raw JWS test client: every negative case asserts the exact
//! RFC 8555 problem type, and the positive paths (issuance, revocation by account and by
//! certificate key, key change, deactivation, ARI, CRL) assert what the CA stored.

mod common;

use common::*;
use serde_json::json;

const PROBLEM: &str = "urn:ietf:params:acme:error:";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jws_checks_reject_with_the_rfc_problem_types() {
    let ca = TestCa::start().await;
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let new_order = client.url("newOrder");
    let order = json!({"identifiers": [{"type": "dns", "value": "app.phoenix.test"}]});

    // Replayed nonce: the first use succeeds, the second is badNonce with a fresh nonce.
    let nonce = client.nonce().await;
    let first = client
        .send(&new_order, &client.sign(&new_order, &nonce, Some(&order)))
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let replay = client
        .send(&new_order, &client.sign(&new_order, &nonce, Some(&order)))
        .await;
    assert_eq!(replay.problem(), format!("{PROBLEM}badNonce"));
    assert_eq!(replay.status, 400);
    let fresh = replay.nonce().expect("badNonce must carry a Replay-Nonce");
    assert_ne!(fresh, nonce);
    // ...and that fresh nonce works.
    let retry = client
        .send(&new_order, &client.sign(&new_order, &fresh, Some(&order)))
        .await;
    assert_eq!(retry.status, 201, "{retry:?}");

    // Missing nonce.
    let mut h = client.header(&new_order, "x");
    h.as_object_mut().unwrap().remove("nonce");
    let r = client
        .send(&new_order, &client.sign_header(&h, Some(&order)))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}badNonce"));

    // Wrong url: RFC 8555 6.4 says the server MUST reject it as unauthorized.
    let nonce = client.nonce().await;
    let wrong = client.sign(&client.url("newAccount"), &nonce, Some(&order));
    let r = client.send(&new_order, &wrong).await;
    assert_eq!(r.problem(), format!("{PROBLEM}unauthorized"));
    assert_eq!(r.status, 403);

    // Bad signature: malformed (RFC 8555 6.2 has no dedicated type; Boulder/Pebble agree).
    let nonce = client.nonce().await;
    let mut signed = client.sign(&new_order, &nonce, Some(&order));
    let mut sig = signed["signature"].as_str().unwrap().to_owned();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    sig.replace_range(0..1, flipped);
    signed["signature"] = json!(sig);
    let r = client.send(&new_order, &signed).await;
    assert_eq!(r.problem(), format!("{PROBLEM}malformed"));

    // Unsupported algorithm.
    let nonce = client.nonce().await;
    let mut h = client.header(&new_order, &nonce);
    h["alg"] = json!("HS256");
    let r = client
        .send(&new_order, &client.sign_header(&h, Some(&order)))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}badSignatureAlgorithm"));
    assert!(r.json()["algorithms"]
        .as_array()
        .unwrap()
        .contains(&json!("ES256")));

    // Both kid and jwk.
    let nonce = client.nonce().await;
    let mut h = client.header(&new_order, &nonce);
    h["jwk"] = client.jwk.clone();
    let r = client
        .send(&new_order, &client.sign_header(&h, Some(&order)))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}malformed"));

    // jwk where a kid is required.
    let nonce = client.nonce().await;
    let h = json!({"alg": "ES256", "jwk": client.jwk, "nonce": nonce, "url": new_order});
    let r = client
        .send(&new_order, &client.sign_header(&h, Some(&order)))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}malformed"));

    // Unknown account.
    let nonce = client.nonce().await;
    let h = json!({"alg": "ES256", "kid": format!("{}/acme/acct/nobody", ca.base()), "nonce": nonce, "url": new_order});
    let r = client
        .send(&new_order, &client.sign_header(&h, Some(&order)))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}accountDoesNotExist"));

    // onlyReturnExisting for an unknown key.
    let stranger = TestClient::new(&ca).await;
    let r = stranger
        .post(
            &stranger.url("newAccount"),
            Some(&json!({"onlyReturnExisting": true})),
        )
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}accountDoesNotExist"));

    // Wrong Content-Type.
    let nonce = client.nonce().await;
    let r = client
        .http
        .post(&new_order)
        .header("content-type", "application/json")
        .body(client.sign(&new_order, &nonce, Some(&order)).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    // Identifier outside `domains`, and outside `networks`.
    let r = client.new_order(&["app.example.com"]).await;
    assert_eq!(r.problem(), format!("{PROBLEM}rejectedIdentifier"));
    let r = client
        .post(
            &new_order,
            Some(&json!({"identifiers": [{"type": "ip", "value": "10.1.2.3"}]})),
        )
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}rejectedIdentifier"));
    let r = client.new_order(&["*.phoenix.test"]).await;
    assert_eq!(r.problem(), format!("{PROBLEM}rejectedIdentifier"));

    // Every ACME response carries a nonce and the index link.
    assert!(r.nonce().is_some());
    let link = r.headers.get("link").unwrap().to_str().unwrap();
    assert_eq!(link, format!("<{}>;rel=\"index\"", ca.directory_url()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_csr_checks_revocation_and_crl() {
    let ca = TestCa::start().await;
    let responder = Http01Responder::start(ca.cfg.acme.http01_port).await;
    let mut client = TestClient::new(&ca).await;
    let acct = client.register().await;
    assert_eq!(acct.status, 201);
    // Registering the same key again returns the same account with 200.
    let new_account = client.url("newAccount");
    let nonce = client.nonce().await;
    let h = json!({"alg": "ES256", "jwk": client.jwk, "nonce": nonce, "url": new_account});
    let again = client
        .send(
            &new_account,
            &client.sign_header(&h, Some(&json!({"termsOfServiceAgreed": true}))),
        )
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.location(), client.kid.clone().unwrap());

    let created = client.new_order(&["app.phoenix.test"]).await;
    assert_eq!(created.status, 201);
    assert!(
        created.headers.get("retry-after").is_some(),
        "pending orders carry Retry-After"
    );
    let order_url = created.location();
    let order = created.json();

    // Finalize before the order is ready.
    let (csr, _) = csr_for(&["app.phoenix.test"]);
    let finalize = order["finalize"].as_str().unwrap().to_owned();
    let r = client
        .post(&finalize, Some(&json!({"csr": b64(&csr)})))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}orderNotReady"));

    client.authorize(&order_url, &order, &responder).await;

    // A CSR with an extra name is badCSR; the order stays ready.
    let (extra, _) = csr_for(&["app.phoenix.test", "other.phoenix.test"]);
    let r = client
        .post(&finalize, Some(&json!({"csr": b64(&extra)})))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}badCSR"));
    let r = client.post(&finalize, Some(&json!({"csr": "AAAA"}))).await;
    assert_eq!(r.problem(), format!("{PROBLEM}badCSR"));

    let r = client
        .post(&finalize, Some(&json!({"csr": b64(&csr)})))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let done = r.json();
    assert_eq!(done["status"], "valid");
    let cert = client
        .post(done["certificate"].as_str().unwrap(), None)
        .await;
    assert_eq!(
        cert.headers.get("content-type").unwrap(),
        "application/pem-certificate-chain"
    );
    let chain = String::from_utf8(cert.body.clone()).unwrap();
    assert_eq!(split_pem(&chain).len(), 2);
    openssl_verify(&ca.root_path, &chain, ca.dir.path());
    let serial = leaf_serial(&chain);

    // A second finalize of a valid order is orderNotReady.
    let r = client
        .post(&finalize, Some(&json!({"csr": b64(&csr)})))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}orderNotReady"));

    // ARI: the window is in the future for a fresh certificate.
    let der = x509_parser::pem::parse_x509_pem(split_pem(&chain)[0].as_bytes())
        .unwrap()
        .1
        .contents;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let aki = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    let cert_id = format!("{}.{}", b64(&aki), b64(parsed.raw_serial()));
    let ari_url = format!("{}/{}", client.url("renewalInfo"), cert_id);
    let ari = ca.https().get(&ari_url).send().await.unwrap();
    assert!(ari.headers().get("retry-after").is_some());
    let window: serde_json::Value = ari.json().await.unwrap();
    let start = time::OffsetDateTime::parse(
        window["suggestedWindow"]["start"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        start > time::OffsetDateTime::now_utc() + time::Duration::hours(12),
        "{window}"
    );

    // Revocation with a bad reason, then by the owning account, then again.
    let revoke = client.url("revokeCert");
    let r = client
        .post(
            &revoke,
            Some(&json!({"certificate": b64(&der), "reason": 7})),
        )
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}badRevocationReason"));
    // Another account may not revoke it.
    let mut other = TestClient::new(&ca).await;
    other.register().await;
    let r = other
        .post(&revoke, Some(&json!({"certificate": b64(&der)})))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}unauthorized"));
    let r = client
        .post(
            &revoke,
            Some(&json!({"certificate": b64(&der), "reason": 4})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = client
        .post(&revoke, Some(&json!({"certificate": b64(&der)})))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}alreadyRevoked"));

    // ARI now says "renew immediately".
    let window: serde_json::Value = ca
        .https()
        .get(&ari_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let end = time::OffsetDateTime::parse(
        window["suggestedWindow"]["end"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        end <= time::OffsetDateTime::now_utc() + time::Duration::seconds(5),
        "{window}"
    );

    // The CRL lists the serial.
    let crl = ca
        .https()
        .get(format!("{}/crl", ca.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        crl.headers().get("content-type").unwrap(),
        "application/pkix-crl"
    );
    let crl = crl.bytes().await.unwrap();
    let (_, crl) = <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(&crl).unwrap();
    let serials: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    assert!(serials.contains(&serial), "{serials:?} lacks {serial}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_by_certificate_key_key_change_and_deactivation() {
    let ca = TestCa::start().await;
    let responder = Http01Responder::start(ca.cfg.acme.http01_port).await;
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let created = client.new_order(&["app.phoenix.test"]).await;
    let order_url = created.location();
    client
        .authorize(&order_url, &created.json(), &responder)
        .await;
    let order = client.post(&order_url, None).await.json();
    let (csr, cert_key) = csr_for(&["app.phoenix.test"]);
    let done = client
        .post(
            order["finalize"].as_str().unwrap(),
            Some(&json!({"csr": b64(&csr)})),
        )
        .await
        .json();
    let chain = String::from_utf8(
        client
            .post(done["certificate"].as_str().unwrap(), None)
            .await
            .body,
    )
    .unwrap();
    let der = x509_parser::pem::parse_x509_pem(split_pem(&chain)[0].as_bytes())
        .unwrap()
        .1
        .contents;

    // Revoke with the certificate's own key (jwk), RFC 8555 7.6.
    let cert_key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &cert_key.serialize_der(),
    )
    .unwrap();
    let pubk = aws_lc_rs::signature::KeyPair::public_key(&cert_key)
        .as_ref()
        .to_vec();
    let cert_jwk =
        json!({"crv": "P-256", "kty": "EC", "x": b64(&pubk[1..33]), "y": b64(&pubk[33..])});
    let revoke = client.url("revokeCert");
    // A different jwk is refused.
    let (stranger_key, stranger_jwk) = new_es256_key();
    let nonce = client.nonce().await;
    let body = client.sign_with(
        &stranger_key,
        &json!({"alg": "ES256", "jwk": stranger_jwk, "nonce": nonce, "url": revoke}),
        Some(&json!({"certificate": b64(&der)})),
    );
    assert_eq!(
        client.send(&revoke, &body).await.problem(),
        format!("{PROBLEM}unauthorized")
    );
    let nonce = client.nonce().await;
    let body = client.sign_with(
        &cert_key,
        &json!({"alg": "ES256", "jwk": cert_jwk, "nonce": nonce, "url": revoke}),
        Some(&json!({"certificate": b64(&der), "reason": 1})),
    );
    let r = client.send(&revoke, &body).await;
    assert_eq!(r.status, 200, "{r:?}");

    // Key change: the old key stops working, the new one signs for the same account.
    let kid = client.kid.clone().unwrap();
    let key_change = client.url("keyChange");
    let (new_key, new_jwk) = new_es256_key();
    let inner = client.sign_with(
        &new_key,
        &json!({"alg": "ES256", "jwk": new_jwk, "url": key_change}),
        Some(&json!({"account": kid, "oldKey": client.jwk})),
    );
    let r = client.post(&key_change, Some(&inner)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = client.post(&kid, None).await;
    assert_eq!(
        r.problem(),
        format!("{PROBLEM}malformed"),
        "old key must no longer verify"
    );
    let nonce = client.nonce().await;
    let body = client.sign_with(
        &new_key,
        &json!({"alg": "ES256", "kid": kid, "nonce": nonce, "url": kid}),
        None,
    );
    let r = client.send(&kid, &body).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["key"], new_jwk);

    // Authorization deactivation invalidates its order.
    let nonce = client.nonce().await;
    let new_order = client.url("newOrder");
    let body = client.sign_with(
        &new_key,
        &json!({"alg": "ES256", "kid": kid, "nonce": nonce, "url": new_order}),
        Some(&json!({"identifiers": [{"type": "dns", "value": "other.phoenix.test"}]})),
    );
    let created = client.send(&new_order, &body).await;
    assert_eq!(created.status, 201);
    let authz_url = created.json()["authorizations"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let nonce = client.nonce().await;
    let body = client.sign_with(
        &new_key,
        &json!({"alg": "ES256", "kid": kid, "nonce": nonce, "url": authz_url}),
        Some(&json!({"status": "deactivated"})),
    );
    let r = client.send(&authz_url, &body).await;
    assert_eq!(r.json()["status"], "deactivated", "{r:?}");

    // Account deactivation: afterwards the account is unauthorized.
    let nonce = client.nonce().await;
    let body = client.sign_with(
        &new_key,
        &json!({"alg": "ES256", "kid": kid, "nonce": nonce, "url": kid}),
        Some(&json!({"status": "deactivated"})),
    );
    let r = client.send(&kid, &body).await;
    assert_eq!(r.json()["status"], "deactivated", "{r:?}");
    let nonce = client.nonce().await;
    let body = client.sign_with(
        &new_key,
        &json!({"alg": "ES256", "kid": kid, "nonce": nonce, "url": kid}),
        None,
    );
    assert_eq!(
        client.send(&kid, &body).await.problem(),
        format!("{PROBLEM}unauthorized")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_is_required_and_binds_once() {
    let keys = std::sync::Mutex::new(None);
    let ca = TestCa::start_with(
        |cfg| cfg.acme.require_eab = true,
        |cfg| *keys.lock().unwrap() = Some(phoenix_ca::eab_new(cfg).unwrap()),
    )
    .await;
    let (eab_kid, eab_key) = keys.lock().unwrap().take().unwrap();
    let client = TestClient::new(&ca).await;
    assert_eq!(client.dir["meta"]["externalAccountRequired"], true);
    let new_account = client.url("newAccount");
    let r = client
        .post(&new_account, Some(&json!({"termsOfServiceAgreed": true})))
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}externalAccountRequired"));

    let eab_for = |jwk: &serde_json::Value| {
        let protected = b64(json!({"alg": "HS256", "kid": eab_kid, "url": new_account})
            .to_string()
            .as_bytes());
        let payload = b64(jwk.to_string().as_bytes());
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &eab_key)
                .unwrap(),
        );
        let tag = aws_lc_rs::hmac::sign(&key, format!("{protected}.{payload}").as_bytes());
        json!({"protected": protected, "payload": payload, "signature": b64(tag.as_ref())})
    };
    let r = client
        .post(
            &new_account,
            Some(&json!({"termsOfServiceAgreed": true, "externalAccountBinding": eab_for(&client.jwk)})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");

    // The same EAB key cannot bind a second account.
    let second = TestClient::new(&ca).await;
    let r = second
        .post(
            &new_account,
            Some(&json!({"termsOfServiceAgreed": true, "externalAccountBinding": eab_for(&second.jwk)})),
        )
        .await;
    assert_eq!(r.problem(), format!("{PROBLEM}unauthorized"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_in_flight_when_the_ca_stops_is_resumed_at_startup() {
    let mut ca = TestCa::start().await;
    let responder = Http01Responder::start(ca.cfg.acme.http01_port).await;
    responder
        .delay_ms
        .store(1500, std::sync::atomic::Ordering::SeqCst);
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let created = client.new_order(&["app.phoenix.test"]).await;
    let order_url = created.location();
    let authz_url = created.json()["authorizations"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let authz = client.post(&authz_url, None).await.json();
    let ch = authz["challenges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "http-01")
        .unwrap()
        .clone();
    let token = ch["token"].as_str().unwrap();
    responder.set(token, &client.key_authorization(token));
    let r = client
        .post(ch["url"].as_str().unwrap(), Some(&json!({})))
        .await;
    assert_eq!(r.json()["status"], "processing", "{r:?}");
    assert!(r.headers.get("retry-after").is_some());
    let link = r
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert!(
        link.contains(&format!("<{authz_url}>;rel=\"up\"")),
        "{link:?}"
    );

    // Stop while the validator waits for the responder: the store still says "processing".
    ca.restart().await;
    responder
        .delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    // Resumed at startup without any client action.
    let order = client.wait_order(&order_url, "ready").await;
    let (csr, _) = csr_for(&["app.phoenix.test"]);
    let done = client
        .post(
            order["finalize"].as_str().unwrap(),
            Some(&json!({"csr": b64(&csr)})),
        )
        .await;
    assert_eq!(done.json()["status"], "valid", "{done:?}");
}

/// Records the SNI of each ClientHello and answers with the tls-alpn-01 certificate.
#[derive(Debug)]
struct AlpnChallengeCert {
    key: std::sync::Arc<rustls::sign::CertifiedKey>,
    sni: std::sync::Mutex<Vec<String>>,
}

impl rustls::server::ResolvesServerCert for AlpnChallengeCert {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        self.sni
            .lock()
            .unwrap()
            .push(hello.server_name().unwrap_or_default().to_owned());
        Some(self.key.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_for_an_ip_identifier_uses_reverse_dns_sni() {
    use sha2::Digest;
    let ca = TestCa::start().await;
    let mut client = TestClient::new(&ca).await;
    client.register().await;
    let created = client
        .post(
            &client.url("newOrder"),
            Some(&json!({"identifiers": [{"type": "ip", "value": "127.0.0.1"}]})),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let order_url = created.location();
    let authz_url = created.json()["authorizations"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let authz = client.post(&authz_url, None).await.json();
    let ch = authz["challenges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "tls-alpn-01")
        .unwrap()
        .clone();
    let key_auth = client.key_authorization(ch["token"].as_str().unwrap());

    // The RFC 8737 certificate: IP SAN plus the critical acmeIdentifier extension.
    let digest = sha2::Sha256::digest(key_auth.as_bytes());
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .unwrap();
    let resolver = std::sync::Arc::new(AlpnChallengeCert {
        key: std::sync::Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert.der().clone()],
            signing,
        )),
        sni: Default::default(),
    });
    let mut server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", ca.cfg.acme.tlsalpn01_port))
        .await
        .unwrap();
    let tls_server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        }
    });

    let r = client
        .post(ch["url"].as_str().unwrap(), Some(&json!({})))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let order = client.wait_order(&order_url, "ready").await;
    assert!(
        resolver
            .sni
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "1.0.0.127.in-addr.arpa"),
        "RFC 8738: the SNI must be the reverse-DNS name"
    );
    let (csr, _) = csr_for(&["127.0.0.1"]);
    let done = client
        .post(
            order["finalize"].as_str().unwrap(),
            Some(&json!({"csr": b64(&csr)})),
        )
        .await
        .json();
    let chain = String::from_utf8(
        client
            .post(done["certificate"].as_str().unwrap(), None)
            .await
            .body,
    )
    .unwrap();
    openssl_verify(&ca.root_path, &chain, ca.dir.path());
    tls_server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_follow_the_request_host_and_the_ca_certificate_names_it() {
    let ca = TestCa::start_with(|cfg| cfg.names = vec!["ca.phoenix.test".into()], |_| {}).await;
    install_provider();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.root_pem().as_bytes()).unwrap())
        .resolve("ca.phoenix.test", ca.addr)
        .build()
        .unwrap();
    let port = ca.addr.port();
    let dir: serde_json::Value = http
        .get(format!("https://ca.phoenix.test:{port}/acme/directory"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        dir["newOrder"],
        format!("https://ca.phoenix.test:{port}/acme/new-order")
    );
    // The same CA, addressed by IP, answers with IP-based URLs.
    let client = TestClient::new(&ca).await;
    assert_eq!(
        client.url("newOrder"),
        format!("https://127.0.0.1:{port}/acme/new-order")
    );
}
