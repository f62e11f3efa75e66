//! The CA's own HTTPS: its serving certificate, issued by its intermediate, hot-swapped by a
//! renewal task before it expires, and the rustls `ServerConfig` (TLS 1.2 + 1.3, ALPN h2 and
//! http/1.1).
//!
//! The certificate names the listen address (IP SAN, unless it is unspecified), the configured
//! `names`, the host of `url`, and "localhost" when listening on loopback. Names outside the
//! CA's `domains`/`networks` are left out (with a log line): the intermediate's name constraints
//! would make any certificate that carries them fail verification in clients that enforce name
//! constraints (rustls/webpki, OpenSSL, Go).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::acme::unix_now;
use crate::authority::{Authority, SubjectName};
use crate::config::{CaConfig, Policy};
use crate::error::CaError;
use crate::store::{CertRec, Store};

/// Serves whatever certificate the renewal task last installed.
#[derive(Debug)]
pub(crate) struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Names for the CA's own certificate (see the module doc).
pub(crate) fn serving_names(cfg: &CaConfig, local: SocketAddr) -> Vec<SubjectName> {
    let policy = Policy::new(cfg);
    let mut wanted: Vec<SubjectName> = Vec::new();
    let ip = local.ip();
    if !ip.is_unspecified() {
        wanted.push(SubjectName::Ip(ip));
    }
    for n in &cfg.names {
        wanted.push(match n.parse::<IpAddr>() {
            Ok(ip) => SubjectName::Ip(ip),
            Err(_) => SubjectName::Dns(n.to_ascii_lowercase()),
        });
    }
    if let Some(host) = cfg
        .url
        .as_deref()
        .and_then(|u| u.parse::<http::Uri>().ok())
        .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
    {
        wanted.push(match host.parse::<IpAddr>() {
            Ok(ip) => SubjectName::Ip(ip),
            Err(_) => SubjectName::Dns(host.to_ascii_lowercase()),
        });
    }
    if ip.is_loopback() {
        wanted.push(SubjectName::Dns("localhost".into()));
    }
    let mut names = Vec::new();
    for n in wanted {
        let allowed = match &n {
            SubjectName::Dns(d) => policy.permits_dns(d),
            SubjectName::Ip(ip) => policy.permits_ip(*ip),
        };
        if !allowed {
            tracing::debug!(name = %n.to_text(), "left out of the CA's own certificate: outside its domains/networks");
        } else if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// Issues a serving certificate; returns it with the time at which to renew it.
fn issue_serving(
    authority: &Authority,
    store: &Store,
    names: &[SubjectName],
    lifetime: Duration,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, Duration), CaError> {
    let (leaf, key_pem) = authority.issue_with_new_key(names, lifetime)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CaError::Tls(format!("serving key: {e}")))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CaError::Tls(e.to_string()))?;
    let chain = vec![
        CertificateDer::from(leaf.der.clone()),
        CertificateDer::from(authority.intermediate_der().to_vec()),
    ];
    let rec = CertRec {
        serial: leaf.serial.clone(),
        names: names.iter().map(SubjectName::to_text).collect(),
        not_before: leaf.not_before.unix_timestamp(),
        not_after: leaf.not_after.unix_timestamp(),
        account: None,
        order: None,
        der: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &leaf.der),
        revoked_at: None,
        reason: None,
    };
    store.write(|tx| tx.put(&rec))?;
    let life = (leaf.not_after.unix_timestamp() - unix_now()).max(60) as u64;
    tracing::info!(serial = %leaf.serial, names = ?rec.names, "CA serving certificate issued");
    Ok((
        Arc::new(CertifiedKey::new(chain, signing_key)),
        renew_after(Duration::from_secs(life)),
    ))
}

/// Renew once two thirds of the remaining lifetime have passed.
pub(crate) fn renew_after(remaining: Duration) -> Duration {
    remaining * 2 / 3
}

/// The server-side TLS state: resolver plus everything the renewal task needs.
pub(crate) struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    resolver: Arc<ServingCert>,
    names: Vec<SubjectName>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    renew_in: Duration,
}

impl ServerTls {
    pub(crate) fn new(
        cfg: &CaConfig,
        local: SocketAddr,
        authority: &Authority,
        store: &Store,
    ) -> Result<ServerTls, CaError> {
        let names = serving_names(cfg, local);
        if names.is_empty() {
            return Err(CaError::Config(vec![format!(
                "the CA's own certificate would name nothing: listen on a specific address inside ca.networks, or set ca.names to names under ca.domains (listening on {local})"
            )]));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (certified, renew_in) =
            issue_serving(authority, store, &names, cfg.leaf_lifetime, &provider)?;
        let resolver = Arc::new(ServingCert {
            current: ArcSwap::new(certified),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CaError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            resolver,
            names,
            lifetime: cfg.leaf_lifetime,
            provider,
            renew_in,
        })
    }

    /// Renews the serving certificate forever (the caller races this against shutdown).
    pub(crate) async fn renew_forever(&self, authority: &Authority, store: &Store) {
        let mut wait = self.renew_in;
        loop {
            tokio::time::sleep(wait).await;
            match issue_serving(authority, store, &self.names, self.lifetime, &self.provider) {
                Ok((certified, next)) => {
                    self.resolver.current.store(certified);
                    wait = next;
                }
                Err(e) => {
                    tracing::error!(error = %e, "renewing the CA's serving certificate failed; retrying in a minute");
                    wait = Duration::from_secs(60);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_names_follow_policy() {
        let mut cfg = CaConfig::new("127.0.0.1:9000".parse().unwrap(), "/tmp/x");
        cfg.domains = vec!["phoenix.test".into()];
        cfg.networks = vec!["127.0.0.0/8".parse().unwrap()];
        cfg.names = vec!["ca.phoenix.test".into()];
        let names = serving_names(&cfg, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            names,
            vec![
                SubjectName::Ip("127.0.0.1".parse().unwrap()),
                SubjectName::Dns("ca.phoenix.test".into())
            ],
            "localhost is outside phoenix.test and must be left out"
        );
        cfg.domains.push("localhost".into());
        assert!(serving_names(&cfg, "127.0.0.1:9000".parse().unwrap())
            .contains(&SubjectName::Dns("localhost".into())));
        assert!(serving_names(&cfg, "0.0.0.0:9000".parse().unwrap())
            .iter()
            .all(|n| matches!(n, SubjectName::Dns(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn serving_certificate_is_replaced_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = CaConfig::new("127.0.0.1:9000".parse().unwrap(), dir.path().join("ca"));
        cfg.networks = vec!["127.0.0.0/8".parse().unwrap()];
        cfg.leaf_lifetime = Duration::from_secs(3600);
        crate::authority::create(&cfg).unwrap();
        let authority = Authority::load(&cfg.data_dir).unwrap();
        let store = Store::open(&cfg.data_dir).unwrap();
        let tls = ServerTls::new(&cfg, cfg.listen, &authority, &store).unwrap();
        let first = tls.resolver.current.load_full().cert[0].clone();
        assert!(
            tls.renew_in < Duration::from_secs(3600) && tls.renew_in > Duration::from_secs(1800)
        );
        // Paused time: the renewal task's sleep completes as soon as the runtime is idle.
        tokio::select! {
            _ = tls.renew_forever(&authority, &store) => unreachable!(),
            _ = tokio::time::sleep(tls.renew_in + Duration::from_secs(1)) => {}
        }
        let second = tls.resolver.current.load_full().cert[0].clone();
        assert_ne!(
            first, second,
            "the serving certificate must have been renewed"
        );
        assert_eq!(
            store.all::<CertRec>().unwrap().len(),
            2,
            "both serving certificates are recorded"
        );
    }

    #[test]
    fn renewal_happens_before_expiry() {
        assert_eq!(
            renew_after(Duration::from_secs(3000)),
            Duration::from_secs(2000)
        );
    }
}
