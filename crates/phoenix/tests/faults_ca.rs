//! The CA killed with SIGKILL during issuance, 50 times in a row: a real `phoenix ca serve`
//! process, an instant-acme client creating an account and ordering a certificate against it, and
//! a kill at a different point of the flow each time. Afterwards the store must be consistent:
//! the CA starts, every account the client was told exists still exists, every certificate the
//! client received is listed by `phoenix ca list` under its serial, and no serial appears twice.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, RetryPolicy,
};

const KILLS: usize = 50;
const NAME: &str = "app.phoenix.test";

/// Answers http-01 challenges from a shared token map.
async fn http01_responder(port: u16, tokens: Arc<Mutex<HashMap<String, String>>>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tokens = tokens.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let token = req
                    .uri()
                    .path()
                    .strip_prefix("/.well-known/acme-challenge/")
                    .unwrap_or_default()
                    .to_owned();
                let answer = tokens.lock().unwrap().get(&token).cloned();
                async move {
                    let mut resp = hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(answer.clone().unwrap_or_default()),
                    ));
                    if answer.is_none() {
                        *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![NAME.to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// What the client was told, and so what the store must still hold.
#[derive(Default)]
struct Acknowledged {
    accounts: Vec<AccountCredentials>,
    /// Serial (lowercase hex, no leading zeros) -> names, of every certificate downloaded.
    certificates: Vec<(String, Vec<String>)>,
}

fn serial_key(hex: &str) -> String {
    let hex: String = hex
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase();
    hex.trim_start_matches('0').to_owned()
}

fn leaf_of(chain: &str) -> (String, Vec<String>) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (serial_key(&cert.raw_serial_as_string()), names)
}

/// One issuance; every step that the CA acknowledged is recorded in `acked` as soon as it is.
async fn issue(
    directory: String,
    root: PathBuf,
    tokens: Arc<Mutex<HashMap<String, String>>>,
    acked: Arc<Mutex<Acknowledged>>,
) -> Result<(), instant_acme::Error> {
    let (account, credentials) = Account::builder_with_root(&root)?
        .create(
            &NewAccount {
                contact: &[],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            directory,
            None,
        )
        .await?;
    acked.lock().unwrap().accounts.push(credentials);
    let ids = [Identifier::Dns(NAME.into())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await?;
    {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status != AuthorizationStatus::Pending {
                continue;
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .expect("the CA offers http-01");
            tokens.lock().unwrap().insert(
                challenge.token.clone(),
                challenge.key_authorization().as_str().to_owned(),
            );
            challenge.set_ready().await?;
        }
    }
    let retry = RetryPolicy::new()
        .initial_delay(Duration::from_millis(20))
        .timeout(Duration::from_secs(5));
    order.poll_ready(&retry).await?;
    order.finalize_csr(&csr()).await?;
    let chain = order.poll_certificate(&retry).await?;
    acked.lock().unwrap().certificates.push(leaf_of(&chain));
    Ok(())
}

fn write_config(dir: &Path, ca_port: u16, http01: u16) -> PathBuf {
    let config = dir.join("ca.toml");
    std::fs::write(
        &config,
        format!(
            "[ca]\nlisten = \"127.0.0.1:{ca_port}\"\ndata_dir = \"ca\"\ndomains = [\"phoenix.test\"]\nnetworks = [\"127.0.0.0/8\"]\n[ca.acme]\nhttp01_port = {http01}\n[ca.acme.resolve]\n\"{NAME}\" = \"127.0.0.1\"\n"
        ),
    )
    .unwrap();
    config
}

fn start_ca(config: &Path, dir: &Path, addr: SocketAddr, run: usize) -> Proc {
    let mut cmd = phoenix();
    cmd.env("PHOENIX_LOG", "warn")
        .args(["ca", "serve", "--config"])
        .arg(config);
    let mut ca = Proc::start(&format!("ca-{run}"), cmd, dir);
    wait_for_port(addr, &mut ca);
    ca
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_killed_50_times_during_issuance_keeps_a_consistent_store() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ca_port, http01) = (free_port(), free_port());
    let addr = SocketAddr::from(([127, 0, 0, 1], ca_port));
    let config = write_config(dir, ca_port, http01);
    let mut init = phoenix();
    init.args(["ca", "init", "--config"]).arg(&config);
    run_ok(init);
    let root = dir.join("ca/root.pem");
    let directory = format!("https://127.0.0.1:{ca_port}/acme/directory");
    let tokens: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    tokio::spawn(http01_responder(http01, tokens.clone()));
    let acked: Arc<Mutex<Acknowledged>> = Arc::default();

    let started = Instant::now();
    // One issuance undisturbed, to learn how long the flow takes on this machine.
    let mut ca = start_ca(&config, dir, addr, KILLS + 1);
    let t0 = Instant::now();
    issue(
        directory.clone(),
        root.clone(),
        tokens.clone(),
        acked.clone(),
    )
    .await
    .expect("an undisturbed issuance succeeds");
    let flow = t0.elapsed();
    ca.kill();
    let (mut completed, mut interrupted) = (1, 0);
    for run in 0..KILLS {
        let mut ca = start_ca(&config, dir, addr, run);
        let client = tokio::spawn(issue(
            directory.clone(),
            root.clone(),
            tokens.clone(),
            acked.clone(),
        ));
        // A different point of the flow each time: 0 to 120 % of its duration in 50 steps, in
        // a scrambled order (reproducible, so a failure can be rerun).
        let delay = flow.mul_f64(((run * 37) % 50) as f64 / 50.0 * 1.2);
        tokio::time::sleep(delay).await;
        ca.kill(); // SIGKILL
        match tokio::time::timeout(Duration::from_secs(20), client).await {
            Ok(Ok(Ok(()))) => completed += 1,
            Ok(Ok(Err(_))) => interrupted += 1,
            Ok(Err(panic)) => panic!("run {run}: the client panicked: {panic}"),
            Err(_) => panic!("run {run}: the client hung after the CA was killed"),
        }
    }
    // Both outcomes must have happened, or the kills did not land during issuance.
    assert!(
        interrupted >= 10 && completed >= 3,
        "{completed} issuances completed, {interrupted} interrupted (flow {flow:?}): the kill points missed"
    );

    // The CA starts on the store it left behind, and knows every acknowledged account.
    let mut ca = start_ca(&config, dir, addr, KILLS);
    let accounts = std::mem::take(&mut acked.lock().unwrap().accounts);
    assert!(accounts.len() >= 10, "only {} accounts", accounts.len());
    for (i, credentials) in accounts.into_iter().enumerate() {
        let account = Account::builder_with_root(&root)
            .unwrap()
            .from_credentials(credentials)
            .await
            .unwrap();
        let ids = [Identifier::Dns(NAME.into())];
        account
            .new_order(&NewOrder::new(&ids))
            .await
            .unwrap_or_else(|e| panic!("acknowledged account {i} is gone: {e}"));
    }
    assert!(ca.terminate().success(), "{}", ca.log());

    // Every downloaded certificate is in the store under its serial; no serial twice.
    let mut list = phoenix();
    list.args(["ca", "list", "--config"]).arg(&config);
    let out = String::from_utf8(run_ok(list).stdout).unwrap();
    let mut listed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (serial, names) = (fields[0], fields[fields.len() - 1]);
        let previous = listed.insert(
            serial_key(serial),
            names.split(',').map(str::to_owned).collect(),
        );
        assert!(previous.is_none(), "serial {serial} listed twice:\n{out}");
    }
    let certificates = std::mem::take(&mut acked.lock().unwrap().certificates);
    assert_eq!(certificates.len(), completed);
    for (serial, names) in certificates {
        assert_eq!(
            listed.get(&serial),
            Some(&names),
            "downloaded certificate {serial} is not in the store as issued:\n{out}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}
