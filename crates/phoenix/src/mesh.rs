//! The `mesh` role: terminates TLS from the gateway with its own certificate, routes by rules, and
//! forwards to backends. The route table is rebuilt when the topology file changes and swapped in
//! atomically; a file with problems keeps the running table and logs every problem. The certificate
//! is reloaded when its files change, without dropping connections.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use phoenix_certs::Challenge;
use phoenix_proxy::config::{MeshConfig, Problem};
use phoenix_proxy::metrics::Metrics;
use phoenix_proxy::proxy::{Proxy, ProxySettings};
use phoenix_proxy::table::{BuildContext, RouteTable};
use phoenix_proxy::tls;
use phoenix_proxy::upstream::UpstreamContext;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, CaLink, RoleCert};
use crate::topology::{self, SourceMap, Topology};

/// Builds the mesh's route table from a topology; `previous` lets unchanged services keep their
/// connection pools and health state across a reload.
/// `roots` verify `https://` backends that name no `tls_root` of their own: the internal root.
pub fn build_table(
    topo: &Topology,
    roots: Option<Arc<rustls::RootCertStore>>,
    previous: Option<&RouteTable>,
) -> Result<RouteTable, Vec<Problem>> {
    let Some(mesh) = &topo.mesh else {
        return Err(vec![Problem::new("mesh", "no [mesh] section")
            .with_hint("add a [mesh] section with `listen`")]);
    };
    let roots = match roots {
        Some(r) => Some(r),
        None => internal_roots(mesh).map_err(|p| vec![p])?,
    };
    let ctx = BuildContext {
        plaintext_networks: &mesh.plaintext_networks,
        upstream: UpstreamContext {
            internal_roots: roots,
            connect_timeout: mesh.limits.upstream_connect_timeout,
            default_timeout: mesh.limits.upstream_response_timeout,
            client_cert: None,
        },
        previous,
    };
    RouteTable::build(&topo.routing(), &ctx)
}

pub fn internal_roots(mesh: &MeshConfig) -> Result<Option<Arc<rustls::RootCertStore>>, Problem> {
    match &mesh.ca_root {
        None => Ok(None),
        Some(path) => tls::load_roots(path)
            .map(|r| Some(Arc::new(r)))
            .map_err(|e| {
                Problem::new(
                    "mesh.ca_root",
                    format!("cannot load {}: {e}", path.display()),
                )
                .with_hint(
                    "give the PEM file of the internal root (root.pem from `phoenix ca init`)",
                )
            }),
    }
}

/// The mesh, checked and ready to serve, with no port bound yet.
pub struct Mesh {
    cfg: MeshConfig,
    path: PathBuf,
    proxy: Arc<Proxy>,
    cert: RoleCert,
    /// The internal root, for `https://` backends; kept for reloads.
    roots: Option<Arc<rustls::RootCertStore>>,
    client_roots: Option<Arc<rustls::RootCertStore>>,
    cert_files: Option<(PathBuf, PathBuf)>,
    registry: Registry,
    /// Watch the topology file and reload on change.
    reload: bool,
}

/// The mesh's own name: `name`, else `mesh.<domain>`.
pub fn mesh_name(topo: &Topology) -> Option<String> {
    let mesh = topo.mesh.as_ref()?;
    mesh.name
        .clone()
        .or_else(|| topo.domain.as_ref().map(|d| format!("mesh.{d}")))
}

impl Mesh {
    /// Checks the configuration, establishes trust and the certificate source; binds nothing.
    pub async fn prepare(
        path: &Path,
        topo: &Topology,
        map: &SourceMap,
        cli_fingerprint: Option<&str>,
    ) -> anyhow::Result<Mesh> {
        let base = path.parent().unwrap_or(Path::new("."));
        let located = |ps: Vec<Problem>| -> anyhow::Error { map.errors(ps).into() };
        let mesh = topo
            .mesh
            .clone()
            .context("the topology has no [mesh] section")?;
        let link = CaLink {
            section: "mesh",
            ca_url: mesh.ca_url.as_deref(),
            ca_fingerprint: mesh.ca_fingerprint.as_deref(),
            ca_root: mesh.ca_root.as_deref(),
        };
        // Trust is needed for ACME and for verifying client certificates; static certificates without
        // mTLS need none.
        let needs_trust = mesh.tls_cert.is_none() || mesh.require_client_cert;
        let trust = if needs_trust {
            let source =
                certs::trust_source(topo, &link, cli_fingerprint).map_err(|p| located(vec![p]))?;
            Some(certs::establish_trust(&source, &certs::state_dir(base, "mesh")).await?)
        } else {
            None
        };
        let (cert, cert_files) = match (&mesh.tls_cert, &mesh.tls_key, &trust) {
            (Some(c), Some(k), _) => (RoleCert::from_files(c, k)?, Some((c.clone(), k.clone()))),
            (None, None, Some(trust)) => {
                let name = mesh_name(topo).ok_or_else(|| {
                    located(vec![Problem::new(
                        "mesh.name",
                        "the mesh has no name to get a certificate for",
                    )
                    .with_hint(
                        "set `name` (e.g. \"mesh.internal.example\") or a top-level `domain`",
                    )])
                })?;
                let url = certs::ca_url(topo, &link).ok_or_else(|| {
                    located(vec![Problem::new(
                        "mesh.ca_url",
                        "no CA to obtain the mesh's certificate from",
                    )
                    .with_hint("set `ca_url`, or `tls_cert` and `tls_key`")])
                })?;
                let dir = certs::state_dir(base, "mesh");
                let cert = RoleCert::acme(
                    vec![name],
                    Vec::new(),
                    dir,
                    format!("{url}/acme/directory"),
                    trust,
                    Challenge::TlsAlpn01,
                )?;
                (cert, None)
            }
            _ => {
                return Err(located(vec![Problem::new(
                    "mesh",
                    "`tls_cert` and `tls_key` go together",
                )
                .with_hint(
                    "give both, or neither to obtain the certificate from the CA over ACME",
                )]))
            }
        };
        let roots = trust.as_ref().map(|t| t.roots.clone());
        let table = build_table(topo, roots.clone(), None).map_err(located)?;
        let client_roots = if mesh.require_client_cert {
            trust.as_ref().map(|t| t.roots.clone())
        } else {
            None
        };
        let mut allowed = mesh.allowed_clients.clone();
        if mesh.require_client_cert && allowed.is_empty() && topo.gateway.is_some() {
            // The same file describes the gateway: only it may connect.
            if let Some(domain) = &topo.domain {
                allowed.push(crate::gateway::client_name(domain));
            }
        }
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.watch_certificates(&cert.resolver);
        let settings = ProxySettings {
            limits: mesh.limits.clone(),
            trusted_proxies: mesh.trusted_proxies.clone(),
            access_log: mesh.access_log,
            allowed_client_names: allowed,
            role: "mesh",
            require_host_matches_sni: false,
        };
        let proxy = Proxy::new(settings, table, metrics);
        // The gateway (a trusted proxy) forwards a trace request only for callers in its own
        // trace_networks, so the mesh answers it too: a multi-host flow traces without extra keys.
        let mut trace_networks = mesh.trace_networks.clone();
        trace_networks.extend(mesh.trusted_proxies.iter().copied());
        proxy.set_trace_networks(trace_networks);
        Ok(Mesh {
            cfg: mesh,
            path: path.to_owned(),
            proxy,
            cert,
            roots,
            client_roots,
            cert_files,
            registry,
            reload: true,
        })
    }

    /// Serves the configuration it was prepared with, without watching a file.
    pub fn without_reload(mut self) -> Self {
        self.reload = false;
        self
    }

    /// Resolves once the mesh has a certificate to serve.
    pub fn ready(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.cert.ready()
    }

    /// Binds the TLS and admin listeners; serving starts when the returned future is polled.
    pub async fn bind(
        self,
        shutdown: CancellationToken,
    ) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + Send> {
        let listener = crate::gateway::bind(self.cfg.listen, "mesh").await?;
        let admin = crate::gateway::bind(self.cfg.admin_listen, "mesh admin").await?;
        Ok(self.serve(listener, admin, shutdown))
    }

    /// Serves on already-bound listeners until `shutdown`; watches the file for changes.
    async fn serve(
        self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Mesh {
            cfg,
            path,
            proxy,
            cert,
            roots,
            client_roots,
            cert_files,
            registry,
            reload,
        } = self;
        let server_config = tls::server_config(cert.resolver.clone(), client_roots);
        cert.start(&shutdown);
        // Checks stop by themselves when a reload drops their service.
        proxy.table().start_health_checks(&shutdown);
        tracing::info!(listen = %cfg.listen, admin = %cfg.admin_listen, "mesh serving");

        let admin_task = {
            let health_json = certs::health_report(proxy.clone(), cert.resolver.clone());
            tokio::spawn(phoenix_proxy::admin::serve(
                admin,
                Arc::new(registry),
                health_json,
                shutdown.clone(),
            ))
        };
        let watch_task = {
            let proxy = proxy.clone();
            let shutdown = shutdown.clone();
            let resolver = cert.resolver.clone();
            let mut watched = Vec::new();
            if reload {
                watched.push(path.clone());
            }
            if let Some((c, k)) = &cert_files {
                watched.extend([c.clone(), k.clone()]);
            }
            tokio::spawn(async move {
                let reload_shutdown = shutdown.clone();
                let result = crate::reload::watch(watched, shutdown, move |changed: &HashSet<PathBuf>| {
                    let changed_abs = |p: &Path| changed.contains(&std::path::absolute(p).unwrap_or_default());
                    if let Some((cert_path, key_path)) = &cert_files {
                        if changed_abs(cert_path) || changed_abs(key_path) {
                            match tls::load_certified_key(cert_path, key_path) {
                                Ok(key) => {
                                    resolver.set_default(key);
                                    tracing::info!(cert = %cert_path.display(), "certificate reloaded");
                                }
                                Err(e) => tracing::error!(error = %e, "certificate change ignored: keeping the current one"),
                            }
                        }
                    }
                    if reload && changed_abs(&path) {
                        reload_routes(&path, roots.clone(), &proxy, &reload_shutdown);
                    }
                })
                .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "configuration watcher stopped; changes need a restart");
                }
            })
        };

        let workers = phoenix_proxy::workers::from_env().map_err(anyhow::Error::msg)?;
        proxy
            .serve_tls_on_workers(listener, server_config, workers, shutdown.clone())
            .await?;
        shutdown.cancel();
        let _ = watch_task.await;
        let _ = admin_task.await;
        Ok(())
    }
}

/// `phoenix mesh`: prepare, bind, serve.
pub async fn run(
    path: &Path,
    topo: Topology,
    map: SourceMap,
    cli_fingerprint: Option<&str>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mesh = Mesh::prepare(path, &topo, &map, cli_fingerprint).await?;
    mesh.bind(shutdown).await?.await
}

/// Rebuilds the route table from the file and swaps it in; on any problem keeps the running one.
fn reload_routes(
    path: &Path,
    roots: Option<Arc<rustls::RootCertStore>>,
    proxy: &Arc<Proxy>,
    shutdown: &CancellationToken,
) {
    let result = topology::load(path).and_then(|(topo, map)| {
        let current = proxy.table();
        build_table(&topo, roots, Some(&current)).map_err(|ps| map.errors(ps))
    });
    match result {
        Ok(table) => {
            proxy.reload(table);
            proxy.table().start_health_checks(shutdown);
            tracing::info!(config = %path.display(), "configuration reloaded");
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(problem = %e, "configuration reload rejected");
            }
            tracing::warn!(count = errors.0.len(), "keeping the running configuration");
        }
    }
}
