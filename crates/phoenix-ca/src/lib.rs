//! Phoenix's `ca` role: an internal certificate authority with an RFC 8555 ACME server that
//! certbot, lego, instant-acme and other standard clients can use (it replaces step-ca).
//!
//! * [`init`] creates a root (ECDSA P-256, 10 years) and an intermediate whose X.509 name
//!   constraints are the configured `domains` and `networks`.
//! * [`CaServer`] serves HTTPS: ACME at `/acme/directory`, `/roots.pem`, `/intermediates.pem`,
//!   `/health` and `/crl`, with a serving certificate from its own intermediate that it renews
//!   in-process.
//! * [`issue`], [`list`], [`revoke`] and [`eab_new`] are the operator commands. They open the
//!   store directly; redb allows one process at a time, so while `ca serve` runs they fail with
//!   [`CaError::Locked`], whose message says to stop the server or use ACME (see `store.rs` for
//!   why this was chosen over an admin endpoint).
//!
//! State lives in `data_dir` (0700): keys (0600), certificates and `ca.redb`. Every ACME state
//! change is one redb transaction, so a restart or `kill -9` mid-flow loses nothing.
//! X.509 work (CA material, CSR checks, leaves, CRL) and JWS verification come from
//! `phoenix-pki`; this crate is the service around them: store, ACME protocol, validation,
//! HTTPS.
#![forbid(unsafe_code)]

mod acme;
mod authority;
mod config;
mod error;
mod jws;
mod nonce;
mod problem;
mod server;
mod store;
mod tls;
mod validation;

use std::fs;
use std::future::Future;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

pub use config::{AcmeConfig, CaConfig, ValidationTarget};
pub use error::CaError;

/// The TLS client configuration this CA validates tls-alpn-01 challenges with (RFC 8737: ALPN
/// `acme-tls/1`, any self-signed certificate, the handshake signature checked with that
/// certificate's key). Public so that an ACME client's tests can check their challenge answers the
/// way the CA will; it verifies no chain, so it is for nothing else.
pub fn tls_alpn01_validation_client_config() -> Result<rustls::ClientConfig, CaError> {
    validation::insecure_challenge_tls::client_config()
}

use crate::acme::AcmeState;
use crate::authority::{Authority, SubjectName};
use crate::config::Policy;
use crate::store::{CertRec, EabRec, Store};

/// What [`init`] created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// Path of the root certificate to distribute to clients.
    pub root_path: PathBuf,
    /// SHA-256 fingerprint of the root certificate (lowercase hex).
    pub fingerprint: String,
}

/// Files written by [`issue`].
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    /// Leaf followed by the intermediate (PEM).
    pub cert_path: PathBuf,
    /// The leaf's private key (PKCS#8 PEM, mode 0600).
    pub key_path: PathBuf,
    /// The root certificate (PEM).
    pub root_path: PathBuf,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// State of an issued certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertStatus {
    /// Within its validity period and not revoked.
    Valid,
    /// Past its `not_after`.
    Expired,
    /// Revoked (it is listed in `/crl`).
    Revoked,
}

/// One certificate from the store, as [`list`] reports it.
#[derive(Debug, Clone)]
pub struct CertRecord {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// DNS names and IP addresses it certifies.
    pub names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Valid, expired or revoked.
    pub status: CertStatus,
    /// The ACME account that obtained it; `None` for `phoenix ca issue` and the CA's own.
    pub account: Option<String>,
}

fn system_time(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)
}

fn check_config(cfg: &CaConfig) -> Result<(), CaError> {
    let problems = cfg.validate();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CaError::Config(problems))
    }
}

/// `phoenix ca init`: creates root, intermediate and store in `cfg.data_dir`.
pub fn init(cfg: &CaConfig) -> Result<InitReport, CaError> {
    check_config(cfg)?;
    let (root_path, fingerprint) = authority::create(cfg)?;
    drop(Store::open(&cfg.data_dir)?);
    let db = cfg.data_dir.join(authority::STORE_FILE);
    fs::set_permissions(&db, fs::Permissions::from_mode(0o600)).map_err(|e| CaError::io(&db, e))?;
    tracing::info!(dir = %cfg.data_dir.display(), %fingerprint, "CA initialised");
    Ok(InitReport {
        root_path,
        fingerprint,
    })
}

/// Loads the authority and opens the store: the pair every operation needs.
fn open_ca(cfg: &CaConfig) -> Result<(Authority, Store), CaError> {
    check_config(cfg)?;
    let authority = Authority::load(&cfg.data_dir)?;
    let store = Store::open(&cfg.data_dir)?;
    Ok((authority, store))
}

/// The CA server, loaded and ready to serve.
pub struct CaServer {
    state: Arc<AcmeState>,
}

impl std::fmt::Debug for CaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("data_dir", &self.state.cfg.data_dir)
            .field("listen", &self.state.cfg.listen)
            .finish()
    }
}

impl CaServer {
    /// Loads keys and opens the store. Fails with a hint to run `phoenix ca init` when there is
    /// no CA, and with [`CaError::Locked`] when another process serves this `data_dir`.
    pub fn open(cfg: CaConfig) -> Result<CaServer, CaError> {
        let (authority, store) = open_ca(&cfg)?;
        let base_url = match &cfg.url {
            Some(u) => Some(
                config::parse_base_url(u)
                    .map_err(|e| CaError::Config(vec![format!("ca.url: {e}")]))?,
            ),
            None => None,
        };
        let state = AcmeState {
            policy: Policy::new(&cfg),
            base_url,
            fallback_host: cfg.listen.to_string(),
            authority: Arc::new(authority),
            store,
            nonces: nonce::NonceStore::new(),
            validator: validation::Validator::new(cfg.acme.clone())?,
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            running: Mutex::new(Default::default()),
            cfg,
        };
        Ok(CaServer {
            state: Arc::new(state),
        })
    }

    /// The root certificate (PEM).
    pub fn root_pem(&self) -> String {
        self.state.authority.root_pem().to_owned()
    }

    /// SHA-256 fingerprint of the root (lowercase hex).
    pub fn fingerprint(&self) -> String {
        self.state.authority.fingerprint()
    }

    /// Serves HTTPS on an already-bound listener until `shutdown` resolves, then drains
    /// connections, stops background validations and closes the store.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), CaError> {
        let state = self.state;
        let local = listener
            .local_addr()
            .map_err(|e| CaError::Serve(format!("listener address: {e}")))?;
        let tls = tls::ServerTls::new(&state.cfg, local, &state.authority, &state.store)?;
        let resumed = validation::resume_pending(&state)?;
        if resumed > 0 {
            tracing::info!(
                resumed,
                "resumed validations left pending by the previous run"
            );
        }
        tracing::info!(%local, fingerprint = %state.authority.fingerprint(), "CA serving ACME at https://{local}/acme/directory");
        let app = acme::router(state.clone());
        tokio::select! {
            _ = server::serve_https(listener, tls.config.clone(), app, shutdown) => {}
            _ = tls.renew_forever(&state.authority, &state.store) => {}
        }
        let mut tasks = std::mem::take(&mut *state.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks.shutdown().await;
        tracing::info!("CA server stopped");
        Ok(())
    }
}

/// `phoenix ca issue`: issues a certificate for `names` and `ips` outside ACME and writes
/// `cert.pem` (leaf + intermediate), `key.pem` (0600) and `root.pem` into `out_dir`.
pub fn issue(
    cfg: &CaConfig,
    names: &[String],
    ips: &[IpAddr],
    out_dir: &Path,
) -> Result<IssuedFiles, CaError> {
    let (authority, store) = open_ca(cfg)?;
    let policy = Policy::new(cfg);
    let mut subject = Vec::new();
    for n in names {
        let n = n.trim_end_matches('.').to_ascii_lowercase();
        if !policy.permits_dns(&n) {
            return Err(CaError::Policy(format!(
                "{n} is outside the CA's domains ({}); add its suffix to ca.domains and re-run `phoenix ca init` in a new data_dir",
                policy.domains().join(", ")
            )));
        }
        subject.push(SubjectName::Dns(n));
    }
    for ip in ips {
        if !policy.permits_ip(*ip) {
            return Err(CaError::Policy(format!(
                "{ip} is outside the CA's networks"
            )));
        }
        subject.push(SubjectName::Ip(*ip));
    }
    if subject.is_empty() {
        return Err(CaError::Policy(
            "give at least one name or IP address to certify".into(),
        ));
    }
    let (leaf, key_pem) = authority.issue_with_new_key(&subject, cfg.leaf_lifetime)?;
    let rec = CertRec {
        serial: leaf.serial.clone(),
        names: subject.iter().map(SubjectName::to_text).collect(),
        not_before: leaf.not_before.unix_timestamp(),
        not_after: leaf.not_after.unix_timestamp(),
        account: None,
        order: None,
        der: base64::engine::general_purpose::STANDARD.encode(&leaf.der),
        revoked_at: None,
        reason: None,
    };
    store.write(|tx| tx.put(&rec))?;
    fs::create_dir_all(out_dir).map_err(|e| CaError::io(out_dir, e))?;
    let cert_path = out_dir.join("cert.pem");
    let key_path = out_dir.join("key.pem");
    let root_path = out_dir.join("root.pem");
    authority::write_replace(&key_path, key_pem.as_bytes(), 0o600)?;
    authority::write_replace(&cert_path, leaf.chain_pem.as_bytes(), 0o644)?;
    authority::write_replace(&root_path, authority.root_pem().as_bytes(), 0o644)?;
    tracing::info!(serial = %leaf.serial, names = ?rec.names, "certificate issued by `phoenix ca issue`");
    Ok(IssuedFiles {
        cert_path,
        key_path,
        root_path,
        serial: leaf.serial,
        not_after: system_time(rec.not_after),
    })
}

/// `phoenix ca list`: every certificate this CA issued, oldest first.
pub fn list(cfg: &CaConfig) -> Result<Vec<CertRecord>, CaError> {
    let (_, store) = open_ca(cfg)?;
    let now = acme::unix_now();
    let mut certs: Vec<CertRecord> = store
        .all::<CertRec>()?
        .into_iter()
        .map(|c| CertRecord {
            status: if c.revoked_at.is_some() {
                CertStatus::Revoked
            } else if c.not_after <= now {
                CertStatus::Expired
            } else {
                CertStatus::Valid
            },
            serial: c.serial,
            names: c.names,
            not_before: system_time(c.not_before),
            not_after: system_time(c.not_after),
            account: c.account,
        })
        .collect();
    certs.sort_by_key(|c| c.not_before);
    Ok(certs)
}

/// `phoenix ca revoke <serial>` (hex, case and colons ignored).
pub fn revoke(cfg: &CaConfig, serial: &str) -> Result<(), CaError> {
    let (_, store) = open_ca(cfg)?;
    let serial: String = serial
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    store.write(|tx| {
        let mut c = tx
            .get::<CertRec>(&serial)?
            .ok_or_else(|| CaError::UnknownSerial(serial.clone()))?;
        if c.revoked_at.is_some() {
            return Err(CaError::AlreadyRevoked(serial.clone()));
        }
        c.revoked_at = Some(acme::unix_now());
        c.reason = Some(0);
        tx.put(&c)
    })?;
    tracing::info!(%serial, "certificate revoked by the operator");
    Ok(())
}

/// `phoenix ca eab-new`: a new External Account Binding key: (key id, base64url HMAC key).
/// Each key binds exactly one ACME account.
pub fn eab_new(cfg: &CaConfig) -> Result<(String, String), CaError> {
    let (_, store) = open_ca(cfg)?;
    let kid = format!("eab-{}", hex::encode(rand::random::<[u8; 8]>()));
    let key = jws::b64url(&rand::random::<[u8; 32]>());
    store.write(|tx| {
        tx.put(&EabRec {
            kid: kid.clone(),
            key: key.clone(),
            created: acme::unix_now(),
            bound_account: None,
        })
    })?;
    Ok((kid, key))
}
