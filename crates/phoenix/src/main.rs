//! `phoenix`: one program, four roles. This file only parses the command line, sets up logging and
//! the crypto provider, and hands over to a role; everything else lives in the library crates.
#![forbid(unsafe_code)]

mod certs;
mod check;
mod gateway;
mod graph;
mod mesh;
mod reload;
mod topology;
mod trace;
mod trust;
mod up;

/// mimalloc instead of glibc malloc: the proxy path allocates and frees many small, short-lived
/// buffers on every worker thread of the runtime, and glibc malloc took about 13% of the proxies'
/// cycles in `bench/run.sh` profiles (docs/BENCHMARKS.md). `phoenix_alloc` says why it is not the
/// `mimalloc` crate's allocator.
#[global_allocator]
static GLOBAL: phoenix_alloc::Mimalloc = phoenix_alloc::Mimalloc;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::topology::ConfigErrors;

/// Exit code for a configuration the program refuses (sysexits EX_CONFIG... EX_USAGE family: 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "phoenix",
    version,
    about = "A secure traffic chain: gateway, mesh and certificate authority in one program"
)]
struct Cli {
    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PHOENIX_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The certificate authority (internal PKI and ACME server).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Every role of the topology in one process; with no --config, the embedded default on loopback.
    Up {
        /// The topology file; without it, the embedded default (`phoenix.localhost` on loopback).
        #[arg(long, short, env = "PHOENIX_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// The public edge: TLS for every service hostname, verified HTTPS to the mesh.
    Gateway {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// The internal router: TLS from the gateway, rule routing, plain HTTP to backends.
    Mesh {
        /// The topology file.
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Check a topology file: every problem at once, with its place and a hint. Binds no port.
    /// Exit 0 when there is no error (warnings pass unless --strict), 64 otherwise.
    Check {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Fail on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Print the flow of a topology file as a Mermaid diagram.
    Graph {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
    },
    /// Put the Phoenix root into (or take it out of) the system trust store.
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Send one request through the flow and show every hop: addresses, protocol, TLS, certificates,
    /// verification, client certificates, time, and where the traffic is plaintext.
    Trace {
        /// e.g. https://whoami.phoenix.localhost:8443/
        url: String,
        /// Root(s) to verify the first hop against; default the system trust store.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// Connect to ADDR for HOST:PORT, as curl's --resolve (repeatable).
        #[arg(long, value_name = "HOST:PORT:ADDR")]
        resolve: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Give up after this long.
        #[arg(long, default_value = "10s")]
        timeout: humantime::Duration,
    },
    /// A small backend for demos and tests: answers with what it received.
    Whoami {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Name reported in every answer (tells replicas apart).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Add the root to the system store (Debian: /usr/local/share/ca-certificates); needs root.
    Install(RootArgs),
    /// Remove it again; with no root given, every Phoenix root.
    Uninstall(RootArgs),
}

#[derive(clap::Args)]
struct RootArgs {
    /// The root certificate PEM (e.g. .phoenix/ca/root.pem).
    #[arg(long, conflicts_with_all = ["ca_url", "ca_fingerprint"])]
    cacert: Option<PathBuf>,
    /// The CA's URL, to fetch the root from; with --ca-fingerprint.
    #[arg(long, requires = "ca_fingerprint")]
    ca_url: Option<String>,
    /// SHA-256 fingerprint the fetched root must have.
    #[arg(long, requires = "ca_url")]
    ca_fingerprint: Option<String>,
}

impl RootArgs {
    fn into_from(self) -> trust::RootFrom {
        trust::RootFrom {
            cacert: self.cacert,
            ca_url: self.ca_url,
            ca_fingerprint: self.ca_fingerprint,
        }
    }
}

#[derive(clap::Args)]
struct TrustArgs {
    /// SHA-256 fingerprint of the CA's root (printed by `phoenix ca init`); with `ca_url` in the file,
    /// the role fetches the root and trusts it only if it matches.
    #[arg(long, env = "PHOENIX_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the root and the name-constrained intermediate in `data_dir`.
    Init {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
    },
    /// Serve the ACME server, `/roots.pem`, `/crl` and `/health` over HTTPS.
    Serve {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
    },
    /// Issue a certificate and key for a host without an ACME client.
    Issue {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
        /// DNS name (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// IP address (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Directory for cert.pem, key.pem and root.pem.
        #[arg(long)]
        out: PathBuf,
    },
    /// List issued certificates: serial, names, expiry, status.
    List {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
    },
    /// Revoke a certificate by serial (hex).
    Revoke {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
        serial: String,
    },
    /// External Account Binding keys for ACME clients.
    Eab {
        #[command(subcommand)]
        command: EabCommand,
    },
}

#[derive(Subcommand)]
enum EabCommand {
    /// Create a key id and HMAC key; give both to the ACME client.
    New {
        #[arg(long, short, env = "PHOENIX_CONFIG", default_value = "phoenix.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One crypto provider for every TLS config of the process.
    let _ = phoenix_proxy::tls::crypto_provider().install_default();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<check::CheckFailed>().is_some() {
                // The report is printed already.
                ExitCode::from(EXIT_CONFIG)
            } else if let Some(config) = e.downcast_ref::<ConfigErrors>() {
                eprint!("{config}");
                ExitCode::from(EXIT_CONFIG)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let mut filter =
        EnvFilter::try_from_env("PHOENIX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // The configuration watcher's crate logs every file event at debug and trace. With the log
    // written into a watched directory, each of those lines is itself an event: at `trace` a log
    // beside the topology file grew without end. It speaks at `warn` unless named on its own.
    let named = std::env::var("PHOENIX_LOG").is_ok_and(|v| v.contains("notify"));
    if !named {
        filter = filter.add_directive("notify=warn".parse().expect("a valid directive"));
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn run(command: Command) -> anyhow::Result<()> {
    if matches!(
        command,
        Command::Up { .. } | Command::Gateway { .. } | Command::Mesh { .. }
    ) {
        // Refused before anything is bound, like a bad topology file.
        phoenix_proxy::workers::from_env().map_err(anyhow::Error::msg)?;
        phoenix_proxy::workers::affinity_from_env().map_err(anyhow::Error::msg)?;
    }
    match command {
        Command::Ca { command } => run_ca(command),
        Command::Up { config, trust } => runtime()?
            .block_on(async { up::run(config, trust.ca_fingerprint, shutdown_on_signal()).await }),
        Command::Gateway { config, trust } => {
            let (topo, map) = topology::load(&config)?;
            runtime()?.block_on(async {
                gateway::run(
                    &config,
                    topo,
                    map,
                    trust.ca_fingerprint.as_deref(),
                    shutdown_on_signal(),
                )
                .await
            })
        }
        Command::Mesh { config, trust } => {
            let (topo, map) = topology::load(&config)?;
            runtime()?.block_on(async {
                mesh::run(
                    &config,
                    topo,
                    map,
                    trust.ca_fingerprint.as_deref(),
                    shutdown_on_signal(),
                )
                .await
            })
        }
        Command::Check {
            config,
            json,
            strict,
        } => check::run(&config, json, strict),
        Command::Graph { config } => {
            let (topo, _) = topology::load(&config)?;
            print!("{}", graph::render(&topo));
            Ok(())
        }
        Command::Trust { command } => {
            let (install, args) = match command {
                TrustCommand::Install(a) => (true, a),
                TrustCommand::Uninstall(a) => (false, a),
            };
            runtime()?.block_on(trust::run(install, &args.into_from()))
        }
        Command::Trace {
            url,
            cacert,
            resolve,
            json,
            timeout,
        } => {
            let request = trace::TraceRequest {
                url,
                cacert,
                resolve,
                timeout: timeout.into(),
            };
            let t = runtime()?.block_on(trace::trace(&request))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print!("{}", trace::render(&t));
            }
            let healthy = t
                .hops
                .iter()
                .all(|h| h.error.is_none() && (h.protocol != "HTTPS" || h.verified_ok));
            if !healthy {
                anyhow::bail!("a hop failed or was not verified (see above)");
            }
            Ok(())
        }
        Command::Whoami { listen, name } => runtime()?.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let name = name.unwrap_or_else(|| listen.to_string());
            tracing::info!(%listen, %name, "whoami listening");
            phoenix_proxy::whoami::serve(listener, name, shutdown_on_signal()).await?;
            Ok(())
        }),
    }
}

/// The `[ca]` section, with the gateway's and the mesh's addresses of the same file added as validation
/// targets so the internal flow needs no DNS.
fn ca_config(path: &Path) -> anyhow::Result<phoenix_ca::CaConfig> {
    let (mut topo, _) = topology::load(path)?;
    up::add_validation_targets(&mut topo);
    topo.ca
        .with_context(|| format!("{} has no [ca] section", path.display()))
}

fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { config } => {
            let cfg = ca_config(&config)?;
            let report = phoenix_ca::init(&cfg)?;
            println!("Created the Phoenix CA in {}", cfg.data_dir.display());
            println!("Root certificate: {}", report.root_path.display());
            println!("Root fingerprint (SHA-256): {}", report.fingerprint);
            Ok(())
        }
        CaCommand::Serve { config } => {
            let cfg = ca_config(&config)?;
            let listen = cfg.listen;
            let server = phoenix_ca::CaServer::open(cfg)?;
            runtime()?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the CA listener {listen}"))?;
                tracing::info!(%listen, fingerprint = %server.fingerprint(), "CA serving");
                let shutdown = shutdown_on_signal();
                server
                    .serve(listener, async move { shutdown.cancelled().await })
                    .await?;
                Ok(())
            })
        }
        CaCommand::Issue {
            config,
            names,
            ips,
            out,
        } => {
            if names.is_empty() && ips.is_empty() {
                anyhow::bail!("give at least one --name or --ip");
            }
            let cfg = ca_config(&config)?;
            let files = phoenix_ca::issue(&cfg, &names, &ips, &out)?;
            println!(
                "Issued serial {} valid until {}",
                files.serial,
                humantime::format_rfc3339_seconds(files.not_after)
            );
            println!("  certificate chain: {}", files.cert_path.display());
            println!("  private key:       {}", files.key_path.display());
            println!("  root:              {}", files.root_path.display());
            Ok(())
        }
        CaCommand::List { config } => {
            let cfg = ca_config(&config)?;
            let records = phoenix_ca::list(&cfg)?;
            println!(
                "{:<32}  {:<20}  {:<7}  NAMES",
                "SERIAL", "NOT AFTER", "STATUS"
            );
            for r in records {
                let status = match r.status {
                    phoenix_ca::CertStatus::Valid => "valid",
                    phoenix_ca::CertStatus::Expired => "expired",
                    phoenix_ca::CertStatus::Revoked => "revoked",
                    _ => "unknown",
                };
                let not_after = humantime::format_rfc3339_seconds(r.not_after);
                println!(
                    "{:<32}  {:<20}  {:<7}  {}",
                    r.serial,
                    not_after,
                    status,
                    r.names.join(",")
                );
            }
            Ok(())
        }
        CaCommand::Revoke { config, serial } => {
            let cfg = ca_config(&config)?;
            phoenix_ca::revoke(&cfg, &serial)?;
            println!("Revoked {serial}");
            Ok(())
        }
        CaCommand::Eab {
            command: EabCommand::New { config },
        } => {
            let cfg = ca_config(&config)?;
            let (kid, hmac) = phoenix_ca::eab_new(&cfg)?;
            println!("Key ID:   {kid}");
            println!("HMAC key: {hmac}");
            Ok(())
        }
    }
}

/// A token cancelled by Ctrl-C or SIGTERM: the one drain signal every role listens to.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: draining connections");
        t.cancel();
    });
    token
}
