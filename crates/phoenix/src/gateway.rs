//! The `gateway` role: the public edge. It terminates client TLS (HTTP/1.1 and HTTP/2) for every
//! service hostname and re-encrypts to the mesh, verifying the mesh's certificate against the internal
//! root with the mesh's name as SNI, over pooled keep-alive connections, presenting its own certificate
//! when `mtls = true`. Its plain-HTTP listener answers ACME http-01 and redirects everything else.
//!
//! It runs on the same engine as the mesh: its route table is one catch-all route to one service, the
//! mesh, so limits, forwarding headers, access logs and metrics behave the same on both hops.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use phoenix_certs::{Challenge, Http01Tokens};
use phoenix_proxy::config::{
    HeadersConfig, MiddlewareConfig, Problem, RouteConfig, RoutingConfig, ServerConfig,
    ServiceConfig,
};
use phoenix_proxy::metrics::Metrics;
use phoenix_proxy::proxy::{Proxy, ProxySettings};
use phoenix_proxy::redirect::{self, RedirectSettings};
use phoenix_proxy::table::{BuildContext, RouteTable};
use phoenix_proxy::upstream::UpstreamContext;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, CaLink, RoleCert};
use crate::topology::{AcmeChallenge, GatewayConfig, SourceMap, Topology};

/// Default admin listener of the gateway (the mesh's is 9901).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9902";

/// The gateway, checked and ready to serve, with no port bound yet.
pub struct Gateway {
    cfg: GatewayConfig,
    proxy: Arc<Proxy>,
    cert: RoleCert,
    http01: Arc<Http01Tokens>,
    registry: Registry,
}

/// The names on the gateway's certificate: every service hostname, and `gateway.<domain>`, the name the
/// mesh knows the gateway by when it checks client certificates.
pub fn certificate_names(topo: &Topology) -> Vec<String> {
    let Some(domain) = &topo.domain else {
        return Vec::new();
    };
    let mut names: Vec<String> = topo
        .services
        .iter()
        .map(|s| format!("{}.{domain}", s.name))
        .collect();
    names.push(client_name(domain));
    names.sort();
    names.dedup();
    names
}

/// The gateway's identity as a client of the mesh.
pub fn client_name(domain: &str) -> String {
    format!("gateway.{domain}")
}

/// The name the mesh presents: `mesh_name`, else the mesh section's `name`, else `mesh.<domain>`.
pub fn mesh_name(topo: &Topology, gw: &GatewayConfig) -> Option<String> {
    gw.mesh_name
        .clone()
        .or_else(|| topo.mesh.as_ref().and_then(|m| m.name.clone()))
        .or_else(|| topo.domain.as_ref().map(|d| format!("mesh.{d}")))
}

fn problems(map: &SourceMap, ps: Vec<Problem>) -> anyhow::Error {
    map.errors(ps).into()
}

/// The one-route table that sends everything to the mesh.
fn routing(topo: &Topology, gw: &GatewayConfig) -> Result<RoutingConfig, Problem> {
    let mesh_name = mesh_name(topo, gw).ok_or_else(|| {
        Problem::new(
            "gateway.mesh_name",
            "the gateway does not know the mesh's name",
        )
        .with_hint("set `mesh_name` (the name on the mesh's certificate) or a top-level `domain`")
    })?;
    if !gw.mesh.starts_with("https://") {
        return Err(Problem::new(
            "gateway.mesh",
            format!("`{}` is not an https:// URL", gw.mesh),
        )
        .with_hint(
            "the gateway only talks to the mesh over verified TLS: write https://HOST:PORT",
        ));
    }
    let mut middlewares = BTreeMap::new();
    let mut chain = Vec::new();
    if let Some(max_age) = gw.hsts {
        let mut headers = HeadersConfig::default();
        headers.response_set.insert(
            "Strict-Transport-Security".into(),
            format!("max-age={}; includeSubDomains", max_age.as_secs()),
        );
        middlewares.insert(
            "hsts".to_owned(),
            MiddlewareConfig {
                headers: Some(headers),
                ..Default::default()
            },
        );
        chain.push("hsts".to_owned());
    }
    Ok(RoutingConfig {
        domain: None,
        services: vec![ServiceConfig {
            name: "mesh".into(),
            servers: vec![ServerConfig::Url(gw.mesh.clone())],
            load_balancer: Default::default(),
            health: None,
            timeout: None,
            tls_root: None,
            tls_server_name: Some(mesh_name),
            tls_insecure_skip_verify: false,
            retries: 2,
        }],
        routes: vec![RouteConfig {
            name: Some("to-mesh".into()),
            rule: "PathPrefix(`/`)".into(),
            service: "mesh".into(),
            priority: Some(i64::MIN / 2),
            middlewares: chain,
        }],
        middlewares,
    })
}

impl Gateway {
    /// Checks the configuration, establishes trust and the certificate source; binds nothing.
    pub async fn prepare(
        path: &Path,
        topo: &Topology,
        map: &SourceMap,
        cli_fingerprint: Option<&str>,
    ) -> anyhow::Result<Gateway> {
        let base = path.parent().unwrap_or(Path::new("."));
        let gw = topo
            .gateway
            .clone()
            .context("the topology has no [gateway] section")?;
        let routing = routing(topo, &gw).map_err(|p| problems(map, vec![p]))?;
        let link = CaLink {
            section: "gateway",
            ca_url: gw.ca_url.as_deref(),
            ca_fingerprint: gw.ca_fingerprint.as_deref(),
            ca_root: gw.ca_root.as_deref(),
        };
        let source = certs::trust_source(topo, &link, cli_fingerprint)
            .map_err(|p| problems(map, vec![p]))?;
        let trust = certs::establish_trust(&source, &certs::state_dir(base, "gateway")).await?;

        if gw.acme_challenge == AcmeChallenge::Http01 && gw.http_listen.is_none() {
            return Err(problems(
                map,
                vec![Problem::new(
                    "gateway.acme_challenge",
                    "http-01 is answered on the HTTP listener, and there is none",
                )
                .with_hint("set `http_listen`, or use the default tls-alpn-01")],
            ));
        }
        let http01 = Http01Tokens::new();
        let cert = match (&gw.tls_cert, &gw.tls_key) {
            (Some(c), Some(k)) => RoleCert::from_files(c, k)?,
            (None, None) => {
                let names = certificate_names(topo);
                if names.is_empty() {
                    return Err(problems(
                        map,
                        vec![Problem::new("domain", "the gateway has no names to get a certificate for")
                            .with_hint("set a top-level `domain` and at least one [[service]], or `tls_cert` and `tls_key`")],
                    ));
                }
                let directory = match &gw.acme_directory {
                    Some(d) => d.clone(),
                    None => {
                        let url = certs::ca_url(topo, &link).ok_or_else(|| {
                            problems(
                                map,
                                vec![Problem::new(
                                    "gateway.ca_url",
                                    "no CA to obtain certificates from",
                                )
                                .with_hint(
                                    "set `ca_url`, `acme_directory`, or `tls_cert` and `tls_key`",
                                )],
                            )
                        })?;
                        format!("{url}/acme/directory")
                    }
                };
                let challenge = if gw.acme_challenge == AcmeChallenge::Http01 {
                    Challenge::Http01(http01.clone())
                } else {
                    Challenge::TlsAlpn01
                };
                let dir = certs::state_dir(base, "gateway");
                RoleCert::acme(names, Vec::new(), dir, directory, &trust, challenge)?
            }
            _ => {
                return Err(problems(
                    map,
                    vec![
                        Problem::new("gateway", "`tls_cert` and `tls_key` go together")
                            .with_hint("give both, or neither to obtain the certificate over ACME"),
                    ],
                ))
            }
        };

        let client_cert = gw.mtls.then(|| cert.resolver.client_identity());
        let ctx = BuildContext {
            plaintext_networks: &[],
            upstream: UpstreamContext {
                internal_roots: Some(trust.roots.clone()),
                connect_timeout: gw.limits.upstream_connect_timeout,
                default_timeout: gw.limits.upstream_response_timeout,
                client_cert,
            },
            previous: None,
        };
        let table = RouteTable::build(&routing, &ctx).map_err(|ps| problems(map, ps))?;
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.watch_certificates(&cert.resolver);
        let settings = ProxySettings {
            limits: gw.limits.clone(),
            trusted_proxies: gw.trusted_proxies.clone(),
            access_log: gw.access_log,
            allowed_client_names: Vec::new(),
            role: "gateway",
            require_host_matches_sni: true,
        };
        let proxy = Proxy::new(settings, table, metrics);
        proxy.set_trace_networks(gw.trace_networks.clone());
        Ok(Gateway {
            cfg: gw,
            proxy,
            cert,
            http01,
            registry,
        })
    }

    /// Resolves once the gateway has a certificate to serve.
    pub fn ready(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.cert.ready()
    }

    /// The public TLS listener's address.
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        self.cfg.listen
    }

    /// Binds every listener of the role (TLS, HTTP, admin); serving starts when the returned future
    /// is polled, so a caller can bind all its roles before any of them runs.
    pub async fn bind(
        self,
        shutdown: CancellationToken,
    ) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + Send> {
        let listener = bind(self.cfg.listen, "gateway").await?;
        let http = match self.cfg.http_listen {
            Some(addr) => Some(bind(addr, "gateway HTTP").await?),
            None => None,
        };
        let admin = bind(self.admin_addr(), "gateway admin").await?;
        Ok(self.serve(listener, http, admin, shutdown))
    }

    fn admin_addr(&self) -> std::net::SocketAddr {
        self.cfg
            .admin_listen
            .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("valid default"))
    }

    /// Serves on already-bound listeners until `shutdown`.
    async fn serve(
        self,
        listener: TcpListener,
        http_listener: Option<TcpListener>,
        admin: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Gateway {
            cfg,
            proxy,
            cert,
            http01,
            registry,
        } = self;
        let server_config = phoenix_proxy::tls::server_config(cert.resolver.clone(), None);
        cert.start(&shutdown);
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(http) = http_listener {
            let lookup: redirect::ChallengeLookup = Arc::new(move |token: &str| http01.get(token));
            let settings = RedirectSettings {
                https_port: cfg.listen.port(),
                challenges: Some(lookup),
                header_read_timeout: cfg.limits.header_read_timeout,
            };
            tasks.spawn(redirect::serve(http, settings, shutdown.clone()));
        }
        {
            let health = certs::health_report(proxy.clone(), cert.resolver.clone());
            tasks.spawn(phoenix_proxy::admin::serve(
                admin,
                Arc::new(registry),
                health,
                shutdown.clone(),
            ));
        }
        tracing::info!(listen = %cfg.listen, mesh = %cfg.mesh, mtls = cfg.mtls, "gateway serving");
        let workers = phoenix_proxy::workers::from_env().map_err(anyhow::Error::msg)?;
        proxy
            .serve_tls_on_workers(listener, server_config, workers, shutdown.clone())
            .await?;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

/// `phoenix gateway`: prepare, bind, serve.
pub async fn run(
    path: &Path,
    topo: Topology,
    map: SourceMap,
    cli_fingerprint: Option<&str>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let gateway = Gateway::prepare(path, &topo, &map, cli_fingerprint).await?;
    gateway.bind(shutdown).await?.await
}

/// Binds a listener, naming it in the error.
pub async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener {addr}"))
}
