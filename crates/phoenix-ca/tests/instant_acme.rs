//! End-to-end issuance with the instant-acme client in-process (DNS and IP identifiers), a CA
//! restart in the middle of an order, the plain endpoints, on-disk permissions and the operator
//! commands (`issue`, `list`, `revoke`, `eab_new`) including their "CA is running" error.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

async fn new_account(ca: &TestCa) -> (Account, instant_acme::AccountCredentials) {
    Account::builder_with_root(&ca.root_path)
        .unwrap()
        .create(
            &NewAccount {
                contact: &["mailto:ops@phoenix.test"],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            ca.directory_url(),
            None,
        )
        .await
        .unwrap()
}

/// Answers every pending authorization of `order` with http-01.
async fn answer_http01(order: &mut instant_acme::Order, responder: &Http01Responder) {
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.unwrap();
        if authz.status != AuthorizationStatus::Pending {
            continue;
        }
        let mut challenge = authz.challenge(ChallengeType::Http01).unwrap();
        responder.set(&challenge.token, challenge.key_authorization().as_str());
        challenge.set_ready().await.unwrap();
    }
}

fn csr_der(names: &[&str]) -> Vec<u8> {
    csr_for(names).0
}

fn retry() -> RetryPolicy {
    RetryPolicy::new().initial_delay(std::time::Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_acme_obtains_dns_and_ip_certificates() {
    let ca = TestCa::start().await;
    let responder = Http01Responder::start(ca.cfg.acme.http01_port).await;
    let (account, _) = new_account(&ca).await;

    let ids = [Identifier::Dns("app.phoenix.test".into())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await.unwrap();
    answer_http01(&mut order, &responder).await;
    assert_eq!(
        order.poll_ready(&retry()).await.unwrap(),
        OrderStatus::Ready
    );
    order
        .finalize_csr(&csr_der(&["app.phoenix.test"]))
        .await
        .unwrap();
    let chain = order.poll_certificate(&retry()).await.unwrap();
    openssl_verify(&ca.root_path, &chain, ca.dir.path());

    // RFC 8738 IP identifier.
    let ids = [Identifier::Ip("127.0.0.1".parse().unwrap())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await.unwrap();
    answer_http01(&mut order, &responder).await;
    assert_eq!(
        order.poll_ready(&retry()).await.unwrap(),
        OrderStatus::Ready
    );
    order.finalize_csr(&csr_der(&["127.0.0.1"])).await.unwrap();
    let chain = order.poll_certificate(&retry()).await.unwrap();
    openssl_verify(&ca.root_path, &chain, ca.dir.path());
    let (_, pem) = x509_parser::pem::parse_x509_pem(split_pem(&chain)[0].as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![x509_parser::extensions::GeneralName::IPAddress(&[
            127, 0, 0, 1
        ])]
    );
    // The leaf is short-lived (24h default) and carries serverAuth + clientAuth.
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!((24 * 3600..=24 * 3600 + 120).contains(&life), "{life}");

    // A renewal order may name the certificate it replaces (RFC 9773).
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    let serial = cert.raw_serial().to_vec();
    let replaced =
        instant_acme::CertificateIdentifier::new(aki.as_slice().into(), serial.as_slice().into());
    let order = account
        .new_order(&NewOrder::new(&ids).replaces(replaced))
        .await
        .unwrap();
    assert_eq!(order.into_parts().1.status, OrderStatus::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_survives_restarts_mid_order() {
    let mut ca = TestCa::start().await;
    let responder = Http01Responder::start(ca.cfg.acme.http01_port).await;
    let (account, credentials) = new_account(&ca).await;
    let ids = [Identifier::Dns("app.phoenix.test".into())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await.unwrap();
    let order_url = order.url().to_owned();
    answer_http01(&mut order, &responder).await;
    drop(order);
    drop(account);

    // Stop right after the challenge POST: the validation is either done, or resumed at startup.
    ca.restart().await;
    let account = Account::builder_with_root(&ca.root_path)
        .unwrap()
        .from_credentials(credentials)
        .await
        .unwrap();
    let mut order = account.order(order_url.clone()).await.unwrap();
    assert_eq!(
        order.poll_ready(&retry()).await.unwrap(),
        OrderStatus::Ready
    );
    drop(order);

    // And once more just before finalize.
    ca.restart().await;
    let mut order = account.order(order_url).await.unwrap();
    assert_eq!(order.state().status, OrderStatus::Ready);
    order
        .finalize_csr(&csr_der(&["app.phoenix.test"]))
        .await
        .unwrap();
    let chain = order.poll_certificate(&retry()).await.unwrap();
    openssl_verify(&ca.root_path, &chain, ca.dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_permissions_and_operator_commands() {
    let mut ca = TestCa::start().await;
    let http = ca.https();

    let health: serde_json::Value = http
        .get(format!("{}/health", ca.base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, serde_json::json!({"status": "ok"}));

    let roots = http
        .get(format!("{}/roots.pem", ca.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(roots, ca.root_pem());
    let der = x509_parser::pem::parse_x509_pem(roots.as_bytes())
        .unwrap()
        .1
        .contents;
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&der)), ca.fingerprint);
    let inter = http
        .get(format!("{}/intermediates.pem", ca.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(inter.contains("BEGIN CERTIFICATE"));

    // HTTP/2 is negotiated and the directory is served over it.
    let r = http.get(ca.directory_url()).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert!(r.headers().get("replay-nonce").is_some());
    // newNonce: HEAD 200 and GET 204, both with a nonce and no-store.
    let head = http
        .head(format!("{}/acme/new-nonce", ca.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["cache-control"], "no-store");
    let get = http
        .get(format!("{}/acme/new-nonce", ca.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 204);
    assert_ne!(
        head.headers()["replay-nonce"],
        get.headers()["replay-nonce"]
    );
    // Bodies over 64 KiB are refused.
    let big = http
        .post(format!("{}/acme/new-order", ca.base()))
        .header("content-type", "application/jose+json")
        .body(vec![b'x'; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);

    // Permissions: directory 0700, keys 0600.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca.cfg.data_dir), 0o700);
    assert_eq!(mode(&ca.cfg.data_dir.join("root.key")), 0o600);
    assert_eq!(mode(&ca.cfg.data_dir.join("intermediate.key")), 0o600);
    assert_eq!(mode(&ca.cfg.data_dir.join("ca.redb")), 0o600);

    // init refuses to overwrite; operator commands refuse while the server holds the store.
    assert!(matches!(
        phoenix_ca::init(&ca.cfg),
        Err(phoenix_ca::CaError::AlreadyInitialised { .. })
    ));
    let locked = phoenix_ca::list(&ca.cfg).unwrap_err();
    assert!(
        matches!(locked, phoenix_ca::CaError::Locked { .. }),
        "{locked}"
    );
    assert!(locked.to_string().contains("is running"), "{locked}");
    assert!(matches!(
        phoenix_ca::eab_new(&ca.cfg),
        Err(phoenix_ca::CaError::Locked { .. })
    ));

    ca.stop().await;
    let out = ca.dir.path().join("issued");
    let issued = phoenix_ca::issue(
        &ca.cfg,
        &["svc.phoenix.test".to_owned()],
        &["127.0.0.5".parse().unwrap()],
        &out,
    )
    .unwrap();
    assert_eq!(mode(&issued.key_path), 0o600);
    let chain = std::fs::read_to_string(&issued.cert_path).unwrap();
    openssl_verify(&issued.root_path, &chain, ca.dir.path());
    assert!(matches!(
        phoenix_ca::issue(&ca.cfg, &["svc.example.com".to_owned()], &[], &out),
        Err(phoenix_ca::CaError::Policy(_))
    ));

    let listed = phoenix_ca::list(&ca.cfg).unwrap();
    let rec = listed.iter().find(|c| c.serial == issued.serial).unwrap();
    assert_eq!(rec.names, vec!["svc.phoenix.test", "127.0.0.5"]);
    assert_eq!(rec.status, phoenix_ca::CertStatus::Valid);
    phoenix_ca::revoke(&ca.cfg, &issued.serial.to_uppercase()).unwrap();
    assert!(matches!(
        phoenix_ca::revoke(&ca.cfg, &issued.serial),
        Err(phoenix_ca::CaError::AlreadyRevoked(_))
    ));
    assert!(matches!(
        phoenix_ca::revoke(&ca.cfg, "0badc0de"),
        Err(phoenix_ca::CaError::UnknownSerial(_))
    ));
    let listed = phoenix_ca::list(&ca.cfg).unwrap();
    assert_eq!(
        listed
            .iter()
            .find(|c| c.serial == issued.serial)
            .unwrap()
            .status,
        phoenix_ca::CertStatus::Revoked
    );
    let (kid, key) = phoenix_ca::eab_new(&ca.cfg).unwrap();
    assert!(!kid.is_empty() && key.len() >= 43);

    // A server started afterwards lists the operator's revocation in its CRL.
    ca.restart().await;
    let crl = ca
        .https()
        .get(format!("{}/crl", ca.base()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
    assert!(crl
        .iter_revoked_certificates()
        .any(|r| hex::encode(r.raw_serial()) == issued.serial));

    // Opening an uninitialised directory says what to do.
    let mut empty = ca.cfg.clone();
    empty.data_dir = ca.dir.path().join("nothing-here");
    let err = phoenix_ca::CaServer::open(empty).unwrap_err();
    assert!(err.to_string().contains("phoenix ca init"), "{err}");
}
