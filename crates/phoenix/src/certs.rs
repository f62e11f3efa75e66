//! Where the gateway and the mesh get their trust anchor and their certificate.
//!
//! Trust comes from exactly one explicit source, in this order: a root PEM file (`ca_root`), the CA's
//! root fingerprint (`ca_fingerprint` in the file, `--ca-fingerprint`, or `PHOENIX_CA_FINGERPRINT`) with
//! `ca_url`, or, on the CA's own host, the root in `[ca] data_dir`. Without any of them a role refuses
//! to start and says which to give: it never falls back to trusting whatever the network presents.
//!
//! The certificate comes from static files (`tls_cert` + `tls_key`) or from the CA over ACME, kept on
//! disk so that a restart needs no CA, and renewed in the background.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phoenix_certs::{AcmeSettings, CertManager, CertSpec, Challenge, TrustBundle, TrustSource};
use phoenix_proxy::config::Problem;
use phoenix_proxy::tls::{self, CertResolver};
use tokio_util::sync::CancellationToken;

use crate::topology::Topology;

/// What a role's section says about the CA.
pub struct CaLink<'a> {
    /// `gateway` or `mesh`: the place in the file for messages.
    pub section: &'static str,
    pub ca_url: Option<&'a str>,
    pub ca_fingerprint: Option<&'a str>,
    pub ca_root: Option<&'a Path>,
}

/// Chooses the trust source; a problem says what to add when there is none.
pub fn trust_source(
    topo: &Topology,
    link: &CaLink<'_>,
    cli_fingerprint: Option<&str>,
) -> Result<TrustSource, Problem> {
    if let Some(root) = link.ca_root {
        return Ok(TrustSource::RootFile(root.to_owned()));
    }
    let fingerprint = link.ca_fingerprint.or(cli_fingerprint);
    if let Some(fingerprint) = fingerprint {
        let Some(ca_url) = ca_url(topo, link) else {
            return Err(Problem::new(
                format!("{}.ca_url", link.section),
                "a CA fingerprint is given but no `ca_url`",
            )
            .with_hint("set `ca_url` to the CA's address, e.g. \"https://10.0.0.10:9000\""));
        };
        return Ok(TrustSource::Fingerprint {
            ca_url,
            fingerprint: fingerprint.to_owned(),
        });
    }
    if let Some(ca) = &topo.ca {
        let root = ca.data_dir.join("root.pem");
        if root.exists() {
            return Ok(TrustSource::RootFile(root));
        }
    }
    Err(Problem::new(
        link.section,
        "no trust anchor for the internal CA: this role would not know which certificates to believe",
    )
    .with_hint(
        "give one of: `ca_fingerprint` (with `ca_url`) in the file, --ca-fingerprint, PHOENIX_CA_FINGERPRINT, \
         or `ca_root` (the CA's root.pem); `phoenix ca init` prints the fingerprint",
    ))
}

/// Establishes trust, keeping a copy of a fetched root in the role's state directory: a role restarted
/// while the CA is down still knows its root, since the copy is checked against the same fingerprint.
pub async fn establish_trust(
    source: &TrustSource,
    state_dir: &Path,
) -> anyhow::Result<TrustBundle> {
    let cache = state_dir.join("ca-root.pem");
    match phoenix_certs::bootstrap_trust(source).await {
        Ok(bundle) => {
            if matches!(source, TrustSource::Fingerprint { .. }) {
                if let Err(e) = write_cache(&cache, &bundle.pem) {
                    tracing::warn!(error = %e, path = %cache.display(), "cannot keep a copy of the CA root");
                }
            }
            Ok(bundle)
        }
        Err(e) => {
            if let TrustSource::Fingerprint { fingerprint, .. } = source {
                if let Ok(pem) = std::fs::read_to_string(&cache) {
                    let cached = phoenix_certs::bootstrap_trust(&TrustSource::Pem(pem)).await?;
                    if phoenix_certs::normalize_fingerprint(fingerprint)? == cached.fingerprint {
                        tracing::warn!(error = %e, "the CA is unreachable: using the root kept from an earlier start");
                        return Ok(cached);
                    }
                }
            }
            Err(anyhow::Error::from(e).context("establishing trust in the internal CA"))
        }
    }
}

fn write_cache(path: &Path, pem: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, pem)?;
    std::fs::rename(tmp, path)
}

/// The CA's URL: the section's `ca_url`, or the `[ca]` of the same file.
pub fn ca_url(topo: &Topology, link: &CaLink<'_>) -> Option<String> {
    link.ca_url
        .map(|u| u.trim_end_matches('/').to_owned())
        .or_else(|| {
            topo.ca.as_ref().map(|ca| {
                ca.url
                    .clone()
                    .unwrap_or_else(|| format!("https://{}", ca.listen))
            })
        })
}

/// Where a role keeps its certificate, key and ACME account: `$PHOENIX_HOME/<role>`, by default
/// `.phoenix/<role>` next to the topology file.
pub fn state_dir(base: &Path, role: &str) -> PathBuf {
    match std::env::var_os("PHOENIX_HOME") {
        Some(home) => PathBuf::from(home).join(role),
        None => base.join(".phoenix").join(role),
    }
}

/// A role's server certificate, installed in `resolver` and kept current.
pub struct RoleCert {
    pub resolver: Arc<CertResolver>,
    pub manager: Option<Arc<CertManager>>,
}

impl RoleCert {
    /// Static certificate files.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<RoleCert> {
        let resolver = CertResolver::new();
        let key = tls::load_certified_key(cert, key)
            .map_err(|e| anyhow::anyhow!("loading the certificate {}: {e}", cert.display()))?;
        resolver.set_default(key);
        Ok(RoleCert {
            resolver,
            manager: None,
        })
    }

    /// A certificate from the CA over ACME. A valid certificate already on disk is served at once, so
    /// a restart does not need the CA; otherwise the role serves nothing but challenges until the first
    /// certificate arrives.
    pub fn acme(
        names: Vec<String>,
        ips: Vec<IpAddr>,
        dir: PathBuf,
        directory_url: String,
        trust: &TrustBundle,
        challenge: Challenge,
    ) -> anyhow::Result<RoleCert> {
        let resolver = CertResolver::new();
        let spec = CertSpec { names, ips, dir };
        let acme = AcmeSettings {
            directory_url,
            roots: trust.roots.clone(),
            eab: None,
            challenge,
            contact: Vec::new(),
        };
        let manager = Arc::new(CertManager::new(spec, acme, resolver.clone()));
        match manager.load_from_disk() {
            Ok(Some(state)) => {
                tracing::info!(serial = %state.serial, not_after = %state.not_after, "serving the certificate kept on disk")
            }
            Ok(None) => tracing::info!("no certificate on disk yet: obtaining one from the CA"),
            Err(e) => {
                tracing::warn!(error = %e, "the certificate on disk is unusable: obtaining a new one")
            }
        }
        Ok(RoleCert {
            resolver,
            manager: Some(manager),
        })
    }

    /// Resolves once a certificate is being served.
    pub fn ready(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let updates = self.manager.as_ref().map(|m| m.subscribe());
        async move {
            if let Some(mut updates) = updates {
                let _ = updates.wait_for(|state| state.is_some()).await;
            }
        }
    }

    /// Starts renewal in the background.
    pub fn start(&self, shutdown: &CancellationToken) {
        if let Some(manager) = &self.manager {
            tokio::spawn(manager.clone().run(shutdown.clone()));
        }
    }
}

/// The admin `/health` document of a role: its services' server health (from the proxy) and the
/// expiry of the certificates it serves.
pub fn health_report(
    proxy: Arc<phoenix_proxy::proxy::Proxy>,
    resolver: Arc<CertResolver>,
) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
    Arc::new(move || {
        let mut health = proxy.health();
        health["status"] = "ok".into();
        health["certificates"] = resolver
            .not_after()
            .into_iter()
            .map(|(name, not_after)| serde_json::json!({ "name": name, "not_after": not_after.unix_timestamp() }))
            .collect();
        health
    })
}
