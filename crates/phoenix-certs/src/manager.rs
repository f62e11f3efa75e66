//! [`CertManager`]: obtains one certificate over ACME, keeps it on disk, serves it through the
//! shared resolver and renews it forever.
//!
//! The invariant the manager keeps is that the certificate being served is the one on disk:
//! a new certificate is written (key first, both atomically) before it is installed, and a
//! certificate that cannot be written is not installed, so a restart always comes back with
//! what was being served. Installing replaces the resolver's entry in one atomic swap; open
//! connections keep the certificate they were handshaken with.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use phoenix_proxy::tls::CertResolver;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::acme_http::AcmeHttp;
use crate::challenge::{Challenge, Provisioned};
use crate::schedule::{renewal_time, Backoff, Clock, SystemClock};
use crate::store::{self, StoredAccount, ACCOUNT_FILE, CERT_FILE, KEY_FILE};
use crate::CertsError;

/// What certificate a role needs and where it keeps it.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// DNS names (subjectAltName dNSName), e.g. the mesh name or every service hostname.
    pub names: Vec<String>,
    /// IP addresses (subjectAltName iPAddress, RFC 8738).
    pub ips: Vec<IpAddr>,
    /// Directory for `cert.pem` (leaf first, then the chain), `key.pem` (0600) and
    /// `account.json` (0600); created 0700 if missing.
    pub dir: PathBuf,
}

/// How to talk to the ACME server.
#[derive(Clone)]
pub struct AcmeSettings {
    /// The directory URL, e.g. `https://ca.internal:9000/acme/directory`.
    pub directory_url: String,
    /// The only roots the ACME server's HTTPS certificate may chain to.
    pub roots: Arc<RootCertStore>,
    /// External Account Binding (RFC 8555 section 7.3.4): key id and the HMAC key, base64url.
    pub eab: Option<(String, String)>,
    pub challenge: Challenge,
    /// Account contact URLs, e.g. `mailto:ops@example.com`.
    pub contact: Vec<String>,
}

impl std::fmt::Debug for AcmeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeSettings")
            .field("directory_url", &self.directory_url)
            .field("roots", &self.roots.len())
            .field("eab", &self.eab.as_ref().map(|(kid, _)| kid))
            .field("challenge", &self.challenge)
            .field("contact", &self.contact)
            .finish()
    }
}

/// The certificate currently served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertState {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Lowercase hex, as `phoenix_pki::CertInfo::serial`.
    pub serial: String,
}

/// What the renewal loop is waiting for (see [`CertManager::schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalSchedule {
    /// When the served certificate will be renewed.
    pub renew_at: OffsetDateTime,
    /// When the loop wakes next: `renew_at`, or earlier to fetch the CA's renewal information
    /// again.
    pub next_check: OffsetDateTime,
}

/// What the renewal loop needs to know about the served certificate.
#[derive(Debug, Clone)]
struct Installed {
    state: CertState,
    ari_cert_id: Option<String>,
    /// Where in an ARI window to renew, fixed per certificate (see [`renewal_time`]).
    pick: f64,
}

/// How long to wait for the CA to validate challenges or issue, per order.
const ORDER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds for re-polling the renewal information (RFC 9773 section 4.3.2 asks clients to
/// clamp the server's Retry-After).
const ARI_MIN_RECHECK: Duration = Duration::from_secs(60);
const ARI_MAX_RECHECK: Duration = Duration::from_secs(6 * 3600);
/// Re-poll after a failed renewal-information request.
const ARI_RETRY: Duration = Duration::from_secs(3600);

/// Obtains, stores, serves and renews one certificate. See the module documentation.
pub struct CertManager {
    spec: CertSpec,
    acme: AcmeSettings,
    resolver: Arc<CertResolver>,
    clock: Arc<dyn Clock>,
    backoff: Backoff,
    installed: Mutex<Option<Installed>>,
    watch: tokio::sync::watch::Sender<Option<CertState>>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// One order at a time: `obtain` may be called by the loop and by an operator at once.
    ordering: tokio::sync::Mutex<()>,
    /// Failed attempts since the last success, for health reporting.
    failures: std::sync::atomic::AtomicU64,
    schedule: Mutex<Option<RenewalSchedule>>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("spec", &self.spec)
            .field("acme", &self.acme)
            .field("current", &self.current())
            .finish()
    }
}

impl CertManager {
    pub fn new(spec: CertSpec, acme: AcmeSettings, resolver: Arc<CertResolver>) -> Self {
        let spec = CertSpec {
            names: spec.names.iter().map(|n| normalize_name(n)).collect(),
            ..spec
        };
        Self {
            spec,
            acme,
            resolver,
            clock: Arc::new(SystemClock),
            backoff: Backoff::default(),
            installed: Mutex::new(None),
            watch: tokio::sync::watch::Sender::new(None),
            account: tokio::sync::Mutex::new(None),
            ordering: tokio::sync::Mutex::new(()),
            failures: std::sync::atomic::AtomicU64::new(0),
            schedule: Mutex::new(None),
        }
    }

    /// Uses `clock` for validity checks and the renewal schedule (tests: [`crate::ManualClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Uses `backoff` between failed attempts instead of 1 s doubling to 5 min.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn spec(&self) -> &CertSpec {
        &self.spec
    }

    /// The certificate being served, if any.
    pub fn current(&self) -> Option<CertState> {
        self.lock_installed().as_ref().map(|i| i.state.clone())
    }

    /// Attempts to obtain a certificate that failed since the last success (0 when healthy).
    pub fn consecutive_failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What [`CertManager::run`] is sleeping until; `None` while it obtains a certificate (or
    /// backs off after a failure) and when it is not running. For status pages and metrics.
    pub fn schedule(&self) -> Option<RenewalSchedule> {
        *self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_schedule(&self, schedule: Option<RenewalSchedule>) {
        *self.schedule.lock().unwrap_or_else(PoisonError::into_inner) = schedule;
    }

    /// Follows the served certificate: the receiver sees every installation.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<CertState>> {
        self.watch.subscribe()
    }

    fn lock_installed(&self) -> std::sync::MutexGuard<'_, Option<Installed>> {
        self.installed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads `cert.pem`/`key.pem` from the directory if they are present, still valid and for
    /// exactly the configured names, and serves them. Lets a restart serve with the CA down.
    ///
    /// `Ok(None)`: nothing usable (missing, expired or for other names; the reason is logged).
    /// `Err`: the files exist but cannot be read or do not belong together.
    pub fn load_from_disk(&self) -> Result<Option<CertState>, CertsError> {
        let cert_path = self.spec.dir.join(CERT_FILE);
        let key_path = self.spec.dir.join(KEY_FILE);
        let (Some(chain_pem), Some(key_pem)) = (
            store::read_optional(&cert_path)?,
            store::read_optional(&key_path)?,
        ) else {
            tracing::debug!(dir = %self.spec.dir.display(), "no stored certificate");
            return Ok(None);
        };
        store::tighten_secret(&key_path)?;
        let (key, info) = parse_chain_and_key(&chain_pem, &key_pem)?;
        if let Err(why) = self.check_names(&info) {
            tracing::info!(path = %cert_path.display(), "stored certificate not used: {why}");
            return Ok(None);
        }
        let now = self.clock.now();
        if info.not_after <= now {
            tracing::warn!(
                path = %cert_path.display(),
                not_after = %info.not_after,
                "stored certificate has expired; a new one is needed from the CA"
            );
            return Ok(None);
        }
        let state = self.install(key, info);
        tracing::info!(
            path = %cert_path.display(),
            serial = state.serial,
            not_after = %state.not_after,
            "serving the stored certificate"
        );
        Ok(Some(state))
    }

    /// Obtains a certificate now (with a new P-256 key), writes `key.pem` (0600) and `cert.pem`,
    /// then serves it. On failure the current certificate stays in place.
    pub async fn obtain(&self) -> Result<CertState, CertsError> {
        if self.spec.names.is_empty() && self.spec.ips.is_empty() {
            return Err(CertsError::Config(
                "a certificate needs at least one DNS name or IP address".to_owned(),
            ));
        }
        let _one_order = self.ordering.lock().await;
        let account = self.account().await?;
        let issued = match self.order(&account).await {
            Err(CertsError::Acme {
                source: instant_acme::Error::Api(problem),
                ..
            }) if problem.r#type.as_deref()
                == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                // The CA lost its state (or was re-initialised): start over with a new account.
                tracing::warn!(
                    directory = self.acme.directory_url,
                    "the CA does not know our ACME account any more; creating a new one"
                );
                *self.account.lock().await = None;
                let _ = std::fs::remove_file(self.spec.dir.join(ACCOUNT_FILE));
                let account = self.account().await?;
                self.order(&account).await?
            }
            other => other?,
        };
        let (chain_pem, key_pem) = issued;
        let (key, info) = parse_chain_and_key(&chain_pem, &key_pem)?;
        self.check_names(&info).map_err(CertsError::Certificate)?;
        // Key first: a crash between the two renames leaves a new key with the old chain, which
        // `load_from_disk` rejects as a mismatch instead of serving something inconsistent.
        store::write_atomic(&self.spec.dir.join(KEY_FILE), key_pem.as_bytes(), true)?;
        store::write_atomic(&self.spec.dir.join(CERT_FILE), chain_pem.as_bytes(), false)?;
        let state = self.install(key, info);
        tracing::info!(
            names = ?self.spec.names,
            serial = state.serial,
            not_after = %state.not_after,
            "new certificate installed"
        );
        Ok(state)
    }

    /// Renews forever: obtains a certificate if there is none, then sleeps until renewal is due
    /// (two thirds of the lifetime, or earlier per the CA's renewal information) and renews; on
    /// failure keeps serving the current certificate and retries with back-off. Returns when
    /// `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if self.current().is_none() {
            if let Err(e) = self.load_from_disk() {
                tracing::warn!(error = %e, "stored certificate unusable; obtaining a new one");
            }
        }
        let mut backoff = self.backoff.clone();
        loop {
            // Copied out so that the lock is not held across the awaits below.
            let installed = self.lock_installed().clone();
            if let Some(installed) = installed {
                let (window, recheck) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    answer = self.renewal_window(&installed) => answer,
                };
                let due = renewal_time(
                    installed.state.not_before,
                    installed.state.not_after,
                    window,
                    installed.pick,
                );
                let now = self.clock.now();
                if due > now {
                    let wake = match recheck {
                        Some(after) => due.min(now + after),
                        None => due,
                    };
                    tracing::debug!(%due, %wake, "next certificate renewal");
                    self.set_schedule(Some(RenewalSchedule {
                        renew_at: due,
                        next_check: wake,
                    }));
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            self.set_schedule(None);
                            return;
                        }
                        () = self.clock.sleep_until(wake) => {}
                    }
                    self.set_schedule(None);
                    // Woken to look at the renewal information again, or renewal is due now.
                    continue;
                }
            }
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.obtain() => result,
            };
            match result {
                Ok(_) => {
                    backoff.reset();
                    self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    self.failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let delay = backoff.next_delay(rand::random::<f64>());
                    self.log_failure(&e, delay);
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn log_failure(&self, error: &CertsError, retry_in: Duration) {
        let retry_in = humanize(retry_in);
        match self.current() {
            None => tracing::error!(
                error = %error,
                retry_in,
                names = ?self.spec.names,
                "cannot obtain a certificate; nothing to serve until this succeeds"
            ),
            Some(state) => {
                let left = state.not_after - self.clock.now();
                let lifetime = state.not_after - state.not_before;
                if left < lifetime / 6 {
                    tracing::error!(
                        error = %error,
                        retry_in,
                        not_after = %state.not_after,
                        "certificate renewal failed and the current certificate expires soon"
                    );
                } else {
                    tracing::warn!(
                        error = %error,
                        retry_in,
                        not_after = %state.not_after,
                        "certificate renewal failed; still serving the current certificate"
                    );
                }
            }
        }
    }

    /// The CA's suggested renewal window for the served certificate (RFC 9773), and when to ask
    /// again. `(None, None)` when the CA does not offer renewal information.
    async fn renewal_window(
        &self,
        installed: &Installed,
    ) -> (Option<(OffsetDateTime, OffsetDateTime)>, Option<Duration>) {
        let Some(cert_id) = installed.ari_cert_id.as_deref().and_then(cert_identifier) else {
            return (None, None);
        };
        let account = match self.account().await {
            Ok(account) => account,
            Err(e) => {
                tracing::debug!(error = %e, "renewal information unavailable: no ACME account");
                return (None, Some(ARI_RETRY));
            }
        };
        match account.renewal_info(&cert_id).await {
            Ok((info, retry_after)) => {
                let window = info.suggested_window;
                tracing::debug!(start = %window.start, end = %window.end, "renewal information");
                (
                    Some((window.start, window.end)),
                    Some(retry_after.clamp(ARI_MIN_RECHECK, ARI_MAX_RECHECK)),
                )
            }
            Err(instant_acme::Error::Unsupported(_)) => (None, None),
            Err(e) => {
                tracing::debug!(error = %e, "renewal information request failed");
                (None, Some(ARI_RETRY))
            }
        }
    }

    /// Serves `key` and records its state.
    fn install(
        &self,
        key: Arc<rustls::sign::CertifiedKey>,
        info: phoenix_pki::CertInfo,
    ) -> CertState {
        for name in &self.spec.names {
            self.resolver.set(name, key.clone());
        }
        self.resolver.set_default(key);
        let state = CertState {
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
        };
        *self.lock_installed() = Some(Installed {
            state: state.clone(),
            ari_cert_id: info.ari_cert_id,
            pick: rand::random::<f64>(),
        });
        self.watch.send_replace(Some(state.clone()));
        state
    }

    /// `Err(reason)` unless the certificate names exactly the configured names and addresses.
    fn check_names(&self, info: &phoenix_pki::CertInfo) -> Result<(), String> {
        let mut want_names = self.spec.names.clone();
        want_names.sort();
        want_names.dedup();
        let mut have_names: Vec<String> =
            info.dns_names.iter().map(|n| normalize_name(n)).collect();
        have_names.sort();
        have_names.dedup();
        let mut want_ips = self.spec.ips.clone();
        want_ips.sort();
        want_ips.dedup();
        let mut have_ips = info.ips.clone();
        have_ips.sort();
        have_ips.dedup();
        if want_names != have_names || want_ips != have_ips {
            return Err(format!(
                "it is for {have_names:?} {have_ips:?}, the configuration asks for {want_names:?} {want_ips:?}"
            ));
        }
        Ok(())
    }

    /// The ACME account: cached, else restored from `account.json`, else created (and saved).
    async fn account(&self) -> Result<Account, CertsError> {
        let mut cached = self.account.lock().await;
        if let Some(account) = cached.as_ref() {
            return Ok(account.clone());
        }
        let dir = &self.spec.dir;
        let directory_url = self.acme.directory_url.clone();
        let http = || -> Result<Box<AcmeHttp>, CertsError> {
            Ok(Box::new(AcmeHttp::new(self.acme.roots.clone())?))
        };
        if let Some(stored) = store::load_account(dir)? {
            if stored.directory_url == directory_url {
                let account = Account::builder_with_http(http()?)
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(CertsError::acme("loading the stored account"))?;
                *cached = Some(account.clone());
                return Ok(account);
            }
            tracing::info!(
                old = stored.directory_url,
                new = directory_url,
                "ACME directory changed; creating a new account"
            );
        }
        let eab = match &self.acme.eab {
            Some((kid, key)) => Some(ExternalAccountKey::new(kid.clone(), &decode_eab_key(key)?)),
            None => None,
        };
        let contact: Vec<&str> = self.acme.contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(http()?)
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory_url.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(CertsError::acme("newAccount"))?;
        store::save_account(
            dir,
            &StoredAccount {
                directory_url,
                credentials,
            },
        )?;
        tracing::info!(account = account.id(), "ACME account created");
        *cached = Some(account.clone());
        Ok(account)
    }

    /// One ACME order from newOrder to the certificate: returns (chain PEM, key PEM).
    async fn order(&self, account: &Account) -> Result<(String, String), CertsError> {
        let identifiers: Vec<Identifier> = self
            .spec
            .names
            .iter()
            .map(|n| Identifier::Dns(n.clone()))
            .chain(self.spec.ips.iter().map(|ip| Identifier::Ip(*ip)))
            .collect();
        let replaces = self
            .lock_installed()
            .as_ref()
            .and_then(|i| i.ari_cert_id.as_deref().and_then(cert_identifier));
        let mut order = match replaces {
            // RFC 9773 section 5: naming the certificate being replaced lets the CA tell a
            // renewal from a new request (and exempt it from rate limits).
            Some(replaces) => {
                match account
                    .new_order(&NewOrder::new(&identifiers).replaces(replaces))
                    .await
                {
                    Ok(order) => Ok(order),
                    Err(e @ instant_acme::Error::Api(_)) => {
                        // E.g. the account was recreated and the old certificate belongs to
                        // the previous one: an ordinary order still renews.
                        tracing::debug!(error = %e, "order with `replaces` refused; ordering without");
                        account.new_order(&NewOrder::new(&identifiers)).await
                    }
                    Err(e) => Err(e),
                }
            }
            None => account.new_order(&NewOrder::new(&identifiers)).await,
        }
        .map_err(CertsError::acme("newOrder"))?;

        let mut provisioned = Provisioned::new(self.resolver.clone());
        let challenge_type = match &self.acme.challenge {
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            Challenge::Http01(_) => ChallengeType::Http01,
        };
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(CertsError::acme("fetching an authorization"))?;
                let identifier = authz.identifier().to_string();
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(CertsError::Challenge {
                            identifier,
                            detail: format!("authorization is {other:?}"),
                        })
                    }
                }
                let offered: Vec<String> = authz
                    .challenges
                    .iter()
                    .map(|c| format!("{:?}", c.r#type))
                    .collect();
                let Some(mut challenge) = authz.challenge(challenge_type.clone()) else {
                    return Err(CertsError::Challenge {
                        identifier,
                        detail: format!(
                            "the CA does not offer {challenge_type:?} (offered: {})",
                            offered.join(", ")
                        ),
                    });
                };
                let key_authorization = challenge.key_authorization();
                match &self.acme.challenge {
                    Challenge::TlsAlpn01 => {
                        let key = challenge_key(&identifier, key_authorization.as_str())?;
                        provisioned.tls_alpn01(&identifier, key);
                    }
                    Challenge::Http01(tokens) => {
                        provisioned.http01(tokens, &challenge.token, key_authorization.as_str());
                    }
                }
                challenge
                    .set_ready()
                    .await
                    .map_err(CertsError::acme("answering a challenge"))?;
            }
        }

        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .backoff(1.5)
            .timeout(ORDER_TIMEOUT);
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(CertsError::acme("waiting for validation"))?;
        // Validation is over either way; withdraw the challenge responses before finalizing.
        drop(provisioned);
        if status != OrderStatus::Ready {
            return Err(challenge_failure(&mut order).await);
        }

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertsError::Certificate(format!("generating a key: {e}")))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for name in &self.spec.names {
            let dns = rcgen::string::Ia5String::try_from(name.as_str())
                .map_err(|e| CertsError::Config(format!("{name:?} is not a DNS name: {e}")))?;
            params.subject_alt_names.push(rcgen::SanType::DnsName(dns));
        }
        for ip in &self.spec.ips {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(*ip));
        }
        let csr = params
            .serialize_request(&key)
            .map_err(|e| CertsError::Certificate(format!("building the CSR: {e}")))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(CertsError::acme("finalize"))?;
        let chain = order
            .poll_certificate(&retries)
            .await
            .map_err(CertsError::acme("downloading the certificate"))?;
        Ok((chain, key.serialize_pem()))
    }
}

/// The RFC 9773 CertID `base64url(AKI).base64url(serial)` as instant-acme's type.
fn cert_identifier(id: &str) -> Option<CertificateIdentifier<'static>> {
    let (aki, serial) = id.split_once('.')?;
    Some(CertificateIdentifier {
        authority_key_identifier: aki.to_owned().into(),
        serial: serial.to_owned().into(),
    })
}

/// Why an order did not become ready, from the authorizations' challenge errors.
async fn challenge_failure(order: &mut instant_acme::Order) -> CertsError {
    let mut failures = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let Ok(state) = authz.refresh().await else {
            continue;
        };
        let identifier = state.identifier().to_string();
        for challenge in &state.challenges {
            if let Some(problem) = &challenge.error {
                failures.push((identifier.clone(), problem.to_string()));
            }
        }
        if state.status != AuthorizationStatus::Valid && failures.is_empty() {
            failures.push((identifier, format!("authorization is {:?}", state.status)));
        }
    }
    let identifier = failures
        .iter()
        .map(|(i, _)| i.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let detail = if failures.is_empty() {
        "the order became invalid without a reason from the CA".to_owned()
    } else {
        failures
            .iter()
            .map(|(_, d)| d.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    };
    CertsError::Challenge { identifier, detail }
}

/// The RFC 8737 certificate answering tls-alpn-01 for `identifier`.
fn challenge_key(
    identifier: &str,
    key_authorization: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, CertsError> {
    let (cert, key) = phoenix_pki::tls_alpn01_cert(identifier, key_authorization)?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    // `CertifiedKey::from_der` would check that key and certificate match by parsing the
    // certificate with webpki, which refuses the critical acmeIdentifier extension RFC 8737
    // requires. The pair was generated together a moment ago, so the check adds nothing.
    let signing_key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
        .map_err(|e| CertsError::Certificate(format!("tls-alpn-01 key: {e}")))?;
    let key = rustls::sign::CertifiedKey::new(vec![CertificateDer::from(cert)], signing_key);
    Ok(Arc::new(key))
}

fn parse_chain_and_key(
    chain_pem: &str,
    key_pem: &str,
) -> Result<(Arc<rustls::sign::CertifiedKey>, phoenix_pki::CertInfo), CertsError> {
    let key = phoenix_proxy::tls::certified_key_from_pem(chain_pem, key_pem)?;
    let leaf = key
        .cert
        .first()
        .ok_or_else(|| CertsError::Certificate("empty certificate chain".to_owned()))?;
    let info = phoenix_pki::parse_cert(leaf.as_ref())?;
    Ok((key, info))
}

fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// EAB HMAC keys are distributed base64url-encoded (RFC 8555 section 7.3.4); accept padding and
/// the standard alphabet too, as operators paste them from various tools.
fn decode_eab_key(key: &str) -> Result<Vec<u8>, CertsError> {
    use base64::Engine as _;
    let trimmed = key.trim().trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .map_err(|e| {
            CertsError::Config(format!(
                "the EAB HMAC key is not base64url ({e}); paste it as the CA printed it"
            ))
        })
}

fn humanize(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

impl CertSpec {
    // Where a manager keeps its files, for callers that print or check them.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    pub fn account_path(&self) -> PathBuf {
        self.dir.join(ACCOUNT_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eab_keys_decode_in_both_alphabets() {
        assert_eq!(decode_eab_key("_-8").unwrap(), vec![0xff, 0xef]);
        assert_eq!(decode_eab_key("/+8=").unwrap(), vec![0xff, 0xef]);
        assert!(matches!(decode_eab_key("!!"), Err(CertsError::Config(_))));
    }

    /// What a validation server sees (RFC 8737 section 3): over ALPN `acme-tls/1` with the
    /// identifier as SNI, exactly the challenge certificate, whose acmeIdentifier holds
    /// SHA-256(key authorization); nothing once the challenge is withdrawn. The client is the
    /// phoenix CA's own validator configuration.
    #[tokio::test]
    async fn tls_alpn01_answer_is_the_rfc8737_certificate() {
        use rustls_pki_types::ServerName;

        let resolver = CertResolver::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(phoenix_proxy::tls::server_config(
            resolver.clone(),
            None,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        let config = phoenix_ca::tls_alpn01_validation_client_config().unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let validate = |sni: &'static str| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let tls = connector
                    .connect(ServerName::try_from(sni).unwrap(), tcp)
                    .await?;
                let (_, conn) = tls.get_ref();
                assert_eq!(conn.alpn_protocol(), Some(&b"acme-tls/1"[..]));
                Ok::<_, std::io::Error>(conn.peer_certificates().unwrap()[0].to_vec())
            }
        };

        let key_authorization = "token.thumbprint";
        let mut provisioned = Provisioned::new(resolver.clone());
        provisioned.tls_alpn01(
            "mesh.phoenix.test",
            challenge_key("mesh.phoenix.test", key_authorization).unwrap(),
        );
        provisioned.tls_alpn01(
            "127.0.0.1",
            challenge_key("127.0.0.1", key_authorization).unwrap(),
        );
        let expected = independent_sha256(key_authorization);
        for sni in ["mesh.phoenix.test", "1.0.0.127.in-addr.arpa"] {
            let der = validate(sni).await.unwrap();
            assert_eq!(
                phoenix_pki::tls_alpn01_ext_digest(&der).unwrap(),
                Some(expected.clone()),
                "{sni}"
            );
        }
        assert!(validate("other.phoenix.test").await.is_err());
        drop(provisioned);
        assert!(validate("mesh.phoenix.test").await.is_err(), "withdrawn");
    }

    fn independent_sha256(s: &str) -> Vec<u8> {
        // The digest RFC 8737 puts in acmeIdentifier, computed independently of phoenix-pki.
        use sha2::Digest as _;
        sha2::Sha256::digest(s.as_bytes()).to_vec()
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize_name(" Mesh.Phoenix.Test. "), "mesh.phoenix.test");
    }
}
