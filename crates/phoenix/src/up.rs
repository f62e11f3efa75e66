//! `phoenix up`: every role of a topology in one process, each on its own listener, speaking to the
//! others over real TLS exactly as when deployed on separate hosts.
//!
//! With no file it runs an embedded default on loopback under `phoenix.localhost` (curl and browsers
//! resolve `*.localhost` to loopback without /etc/hosts), with the `whoami` demo backend. State lives in
//! `./.phoenix` or `$PHOENIX_HOME`; a second start reuses the CA and the certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::gateway::{self, bind, Gateway};
use crate::mesh::{self, Mesh};
use crate::topology::{self, Topology};

/// The embedded default topology.
pub const EMBEDDED: &str = r#"# The embedded default of `phoenix up`: the whole flow on loopback.
domain = "phoenix.localhost"

[ca]
listen = "127.0.0.1:9000"
data_dir = "ca"                 # inside $PHOENIX_HOME (default ./.phoenix)
name = "Phoenix Internal CA"
domains = ["phoenix.localhost"]
networks = ["127.0.0.0/8"]

[gateway]
listen = "127.0.0.1:8443"
http_listen = "127.0.0.1:8080"
mesh = "https://127.0.0.1:9443"
mesh_name = "mesh.phoenix.localhost"
mtls = true

[mesh]
listen = "127.0.0.1:9443"
name = "mesh.phoenix.localhost"
trusted_proxies = ["127.0.0.1/32"]
plaintext_networks = ["127.0.0.0/8"]
require_client_cert = true

[[service]]
name = "whoami"
servers = ["http://127.0.0.1:8000"]
health = { path = "/health", interval = "5s" }
"#;

/// Where the demo backend of the embedded default listens.
const WHOAMI: &str = "127.0.0.1:8000";

/// `$PHOENIX_HOME`, or `./.phoenix`.
pub fn phoenix_home() -> PathBuf {
    std::env::var_os("PHOENIX_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".phoenix"))
}

/// Loads the given file, or the embedded default with its state under [`phoenix_home`].
pub fn load(
    config: Option<&Path>,
) -> anyhow::Result<(PathBuf, Topology, topology::SourceMap, bool)> {
    match config {
        Some(path) => {
            let (topo, map) = topology::load(path)?;
            Ok((path.to_owned(), topo, map, false))
        }
        None => {
            let home = phoenix_home();
            std::fs::create_dir_all(&home)
                .with_context(|| format!("creating {}", home.display()))?;
            let home = std::path::absolute(&home)?;
            // The embedded file's relative paths land in the home directory; roles keep their state
            // in `<home>/<role>` as they do for a file in the working directory.
            let path = std::path::absolute("phoenix.toml")?;
            let (mut topo, map) =
                topology::parse(Path::new("<embedded default>"), EMBEDDED.to_owned())?;
            topo.resolve_paths(&home);
            Ok((path, topo, map, true))
        }
    }
}

/// Teaches the CA where each role of this file answers ACME challenges: service names at the gateway,
/// the mesh's name at the mesh. No DNS is needed for the internal flow.
pub fn add_validation_targets(topo: &mut Topology) {
    let mut targets = Vec::new();
    if let Some(gw) = &topo.gateway {
        targets.extend(
            gateway::certificate_names(topo)
                .into_iter()
                .map(|n| (n, gw.listen)),
        );
    }
    if let (Some(m), Some(name)) = (&topo.mesh, mesh::mesh_name(topo)) {
        targets.push((name, m.listen));
    }
    let Some(ca) = topo.ca.as_mut() else { return };
    for (name, addr) in targets {
        ca.acme.resolve.entry(name).or_insert(addr.into());
    }
}

/// Runs every role the topology has until `shutdown`.
pub async fn run(
    config: Option<PathBuf>,
    cli_fingerprint: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (path, mut topo, map, embedded) = load(config.as_deref())?;
    add_validation_targets(&mut topo);

    // The CA first: the other roles trust its root from data_dir, on this same host.
    let mut ca_server = None;
    if let Some(ca) = &topo.ca {
        if !phoenix_pki::CaMaterial::exists(&ca.data_dir) {
            let report = phoenix_ca::init(ca)?;
            tracing::info!(root = %report.root_path.display(), fingerprint = %report.fingerprint, "created the CA");
        }
        ca_server = Some(phoenix_ca::CaServer::open(ca.clone())?);
    }
    // Every role is checked before any port is bound.
    let mesh = match &topo.mesh {
        Some(_) => {
            let mesh = Mesh::prepare(&path, &topo, &map, cli_fingerprint.as_deref()).await?;
            // The embedded default is not a file on disk: there is nothing to watch.
            Some(if embedded {
                mesh.without_reload()
            } else {
                mesh
            })
        }
        None => None,
    };
    let gateway = match &topo.gateway {
        Some(_) => Some(Gateway::prepare(&path, &topo, &map, cli_fingerprint.as_deref()).await?),
        None => None,
    };
    if ca_server.is_none() && mesh.is_none() && gateway.is_none() {
        anyhow::bail!(
            "{} has no [ca], [gateway] or [mesh] section: nothing to run",
            path.display()
        );
    }

    let mut tasks = tokio::task::JoinSet::new();
    let mut fingerprint = None;
    if let Some(server) = ca_server {
        let listener = bind(topo.ca.as_ref().expect("ca").listen, "CA").await?;
        fingerprint = Some(server.fingerprint());
        let token = shutdown.clone();
        tasks.spawn(async move {
            server
                .serve(listener, async move { token.cancelled().await })
                .await
                .map_err(anyhow::Error::from)
        });
    }
    if embedded {
        let addr: SocketAddr = WHOAMI.parse().expect("valid address");
        let listener = bind(addr, "whoami demo backend").await?;
        let token = shutdown.clone();
        tasks.spawn(async move {
            phoenix_proxy::whoami::serve(listener, "whoami".into(), token)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    // The hint to try the flow is printed once every hop has its certificate: a request sent as
    // soon as the gateway has one could still meet a mesh without one (a refused handshake, 502).
    let mut mesh_ready = None;
    if let Some(mesh) = mesh {
        mesh_ready = Some(mesh.ready());
        tasks.spawn(mesh.bind(shutdown.clone()).await?);
    }
    let mut ready = None;
    if let Some(gateway) = gateway {
        let gateway_ready = gateway.ready();
        let all = async move {
            gateway_ready.await;
            if let Some(mesh_ready) = mesh_ready {
                mesh_ready.await;
            }
        };
        ready = Some((all, gateway.listen_addr()));
        tasks.spawn(gateway.bind(shutdown.clone()).await?);
    }

    if let (Some(ca), Some(fingerprint)) = (&topo.ca, &fingerprint) {
        println!("Phoenix is up.");
        println!(
            "  root certificate:  {}",
            ca.data_dir.join("root.pem").display()
        );
        println!("  root fingerprint:  {fingerprint}");
    }
    if let Some((ready, listen)) = ready {
        tokio::select! {
            _ = ready => {
                if let (Some(ca), Some(domain), Some(service)) = (&topo.ca, &topo.domain, topo.services.first()) {
                    println!("  try:  curl --cacert {} https://{}.{domain}:{}/", ca.data_dir.join("root.pem").display(), service.name, listen.port());
                }
            }
            _ = shutdown.cancelled() => {}
        }
    }

    let mut first_error = None;
    while let Some(result) = tasks.join_next().await {
        let outcome = result.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %format!("{e:#}"), "a role stopped with an error: stopping the others");
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
