//! `phoenix check`: every problem of a topology file in one pass, each with its line and a hint.
//!
//! Three layers, each reporting everything it finds:
//! 1. Loading (`topology::load`): syntax, unknown keys, wrong types, CA settings.
//! 2. What the roles would build, without binding anything: the mesh's route table (rule syntax,
//!    unknown services and middlewares, plaintext backends outside `plaintext_networks`) and the
//!    gateway's link to the mesh; plus checks across sections that no single role sees: listeners
//!    that collide, the same host routed two ways, rules that can never match, certificate names
//!    the CA may not issue, verification switched off.
//! 3. What only the target host can tell (files that exist, ports free, the CA's intermediate), run
//!    only for roles whose listen address belongs to this host; for the others the report says the
//!    check was skipped and why, so the same file checks cleanly on a laptop and on the hosts.
//!
//! Findings go to standard error (`FILE:LINE:COL: error: ...`), the verdict and a summary to
//! standard output; `--json` prints everything as one JSON document on standard output.
//! Errors make the command exit 64. Warnings (an explicit insecure option, a port in use) are
//! printed but pass, because the design allows insecure options that are written out and named as
//! such; `--strict` fails on them too.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use phoenix_proxy::config::Problem;
use serde::Serialize;

use crate::topology::{self, Located, SourceMap, Topology};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, located in the file.
#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub located: Located,
}

/// The outcome of a check.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Host-dependent checks that were skipped, and why.
    pub skipped: Vec<String>,
    /// What the file describes, when it loaded.
    pub summary: Vec<String>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.count(Severity::Error)
    }

    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }

    fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }
}

/// `phoenix check` failed; the report is already printed.
#[derive(Debug)]
pub struct CheckFailed {
    pub errors: usize,
    pub warnings: usize,
}

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} error(s), {} warning(s)", self.errors, self.warnings)
    }
}

impl std::error::Error for CheckFailed {}

/// JSON shape of a finding.
#[derive(Serialize)]
struct FindingJson<'a> {
    severity: Severity,
    file: String,
    line: Option<usize>,
    column: Option<usize>,
    place: &'a str,
    message: &'a str,
    hint: Option<&'a str>,
}

/// Runs the check and prints the report; `Err(CheckFailed)` when it does not pass.
pub fn run(path: &Path, json: bool, strict: bool) -> anyhow::Result<()> {
    let report = check(path);
    if json {
        let findings: Vec<FindingJson> = report
            .findings
            .iter()
            .map(|f| FindingJson {
                severity: f.severity,
                file: f.located.file.display().to_string(),
                line: f.located.position.map(|p| p.0),
                column: f.located.position.map(|p| p.1),
                place: &f.located.problem.place,
                message: &f.located.problem.message,
                hint: f.located.problem.hint.as_deref(),
            })
            .collect();
        let out = serde_json::json!({
            "file": path.display().to_string(),
            "errors": report.errors(),
            "warnings": report.warnings(),
            "findings": findings,
            "skipped": report.skipped,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for f in &report.findings {
            let sev = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let l = &f.located;
            // Findings on standard error, like the roles' configuration errors; the verdict on
            // standard output.
            match l.position {
                Some((line, col)) => {
                    eprintln!("{}:{line}:{col}: {sev}: {}", l.file.display(), l.problem)
                }
                None => eprintln!("{}: {sev}: {}", l.file.display(), l.problem),
            }
        }
        for s in &report.skipped {
            println!("skipped: {s}");
        }
        let verdict = if report.errors() == 0 { "ok" } else { "FAILED" };
        println!(
            "{}: {verdict} ({} error(s), {} warning(s))",
            path.display(),
            report.errors(),
            report.warnings()
        );
        for line in &report.summary {
            println!("  {line}");
        }
    }
    let failed = report.errors() > 0 || (strict && report.warnings() > 0);
    if failed {
        return Err(CheckFailed {
            errors: report.errors(),
            warnings: report.warnings(),
        }
        .into());
    }
    Ok(())
}

/// Checks a file; never fails, everything found is in the report.
pub fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let (topo, map) = match topology::load(path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            report.findings = errors
                .0
                .into_iter()
                .map(|located| Finding {
                    severity: Severity::Error,
                    located,
                })
                .collect();
            return report;
        }
    };
    let mut c = Checker {
        topo: &topo,
        map: &map,
        report: &mut report,
    };
    c.mesh_table();
    c.gateway_link();
    c.listeners();
    c.hosts_and_rules();
    c.ca_names();
    c.verification();
    c.on_host();
    report.summary = summarize(&topo);
    report
}

struct Checker<'a> {
    topo: &'a Topology,
    map: &'a SourceMap,
    report: &'a mut Report,
}

impl Checker<'_> {
    fn push(&mut self, severity: Severity, problem: Problem) {
        let located = self.map.locate(problem);
        self.report.findings.push(Finding { severity, located });
    }

    fn error(&mut self, problem: Problem) {
        self.push(Severity::Error, problem);
    }

    fn warning(&mut self, problem: Problem) {
        self.push(Severity::Warning, problem);
    }

    /// Builds the mesh's route table as the mesh would, with a stand-in for the internal root: the
    /// real one is fetched at start, and its absence is not a problem of the file.
    fn mesh_table(&mut self) {
        if self.topo.mesh.is_none() {
            return;
        }
        // `ca_root` itself is checked with the other files, on the mesh's host only.
        let roots = Some(Arc::new(rustls::RootCertStore::empty()));
        if let Err(problems) = crate::mesh::build_table(self.topo, roots, None) {
            for p in problems {
                self.error(p);
            }
        }
    }

    /// What the gateway needs to reach the mesh.
    fn gateway_link(&mut self) {
        let Some(gw) = &self.topo.gateway else {
            return;
        };
        if !gw.mesh.starts_with("https://") {
            self.error(
                Problem::new(
                    "gateway.mesh",
                    format!("`{}` is not an https:// URL", gw.mesh),
                )
                .with_hint(
                    "the gateway only talks to the mesh over verified TLS: write https://HOST:PORT",
                ),
            );
        } else if let Some(mesh) = &self.topo.mesh {
            let target = gw.mesh.trim_start_matches("https://");
            let target = target.split('/').next().unwrap_or("");
            if let Ok(addr) = target.parse::<SocketAddr>() {
                let same = addr == mesh.listen
                    || (mesh.listen.ip().is_unspecified() && addr.port() == mesh.listen.port());
                if !same {
                    self.warning(
                        Problem::new(
                            "gateway.mesh",
                            format!("points at {addr}, but the mesh listens on {}", mesh.listen),
                        )
                        .with_hint("make gateway.mesh the mesh's listen address (or its public address, if NAT is in between)"),
                    );
                }
            }
        }
        if crate::gateway::mesh_name(self.topo, gw).is_none() {
            self.error(
                Problem::new(
                    "gateway.mesh_name",
                    "the gateway does not know the mesh's name",
                )
                .with_hint(
                    "set `mesh_name` (the name on the mesh's certificate) or a top-level `domain`",
                ),
            );
        }
        if gw.tls_cert.is_some() != gw.tls_key.is_some() {
            self.error(
                Problem::new("gateway", "`tls_cert` and `tls_key` go together")
                    .with_hint("give both, or neither to obtain the certificate over ACME"),
            );
        }
        if gw.acme_challenge == topology::AcmeChallenge::Http01 && gw.http_listen.is_none() {
            self.error(
                Problem::new(
                    "gateway.acme_challenge",
                    "http-01 is answered on the HTTP listener, and there is none",
                )
                .with_hint("set `http_listen`, or use the default tls-alpn-01"),
            );
        }
        if gw.mtls {
            if let Some(mesh) = &self.topo.mesh {
                if !mesh.require_client_cert {
                    self.warning(
                        Problem::new("mesh.require_client_cert", "the gateway presents a client certificate (mtls = true) but the mesh does not require one")
                            .with_hint("set require_client_cert = true on the mesh, so only the gateway can reach it"),
                    );
                }
            }
        }
    }

    /// Every listener of the file, with its place.
    fn listener_list(&self) -> Vec<(String, SocketAddr)> {
        let mut out = Vec::new();
        if let Some(ca) = &self.topo.ca {
            out.push(("ca.listen".to_owned(), ca.listen));
        }
        if let Some(gw) = &self.topo.gateway {
            out.push(("gateway.listen".to_owned(), gw.listen));
            if let Some(h) = gw.http_listen {
                out.push(("gateway.http_listen".to_owned(), h));
            }
            let admin = gw
                .admin_listen
                .unwrap_or_else(|| crate::gateway::DEFAULT_ADMIN.parse().expect("valid"));
            out.push(("gateway.admin_listen".to_owned(), admin));
        }
        if let Some(mesh) = &self.topo.mesh {
            out.push(("mesh.listen".to_owned(), mesh.listen));
            out.push(("mesh.admin_listen".to_owned(), mesh.admin_listen));
        }
        out
    }

    /// Two listeners on the same port whose addresses overlap (equal, or one is unspecified).
    fn listeners(&mut self) {
        let list = self.listener_list();
        for (i, (place, addr)) in list.iter().enumerate() {
            if let Some((other, other_addr)) = list[..i].iter().find(|(_, o)| {
                o.port() == addr.port()
                    && (o.ip() == addr.ip()
                        || o.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            }) {
                self.error(
                    Problem::new(
                        place.clone(),
                        format!("{addr} collides with {other} = {other_addr}"),
                    )
                    .with_hint("give every listener its own address or port"),
                );
            }
        }
    }

    /// Hosts routed two ways, and rules that can never match.
    fn hosts_and_rules(&mut self) {
        let domain = self
            .topo
            .domain
            .as_deref()
            .map(|d| d.trim_matches('.').to_ascii_lowercase());
        // host -> (place, service) of whatever claims it exactly.
        let mut claims: BTreeMap<String, (String, String)> = BTreeMap::new();
        if let Some(d) = &domain {
            for s in &self.topo.services {
                let host = format!("{}.{d}", s.name.to_ascii_lowercase());
                if let Some((place, _)) = claims.get(&host) {
                    let place = place.clone();
                    self.error(
                        Problem::new(
                            format!("service {:?}", s.name),
                            format!("its host {host} is already the host of {place}"),
                        )
                        .with_hint(
                            "service names are hosts: they must differ in more than letter case",
                        ),
                    );
                } else {
                    claims.insert(host, (format!("service {:?}", s.name), s.name.clone()));
                }
            }
        }
        let gateway_names: Option<Vec<String>> = self
            .topo
            .gateway
            .as_ref()
            .filter(|g| g.tls_cert.is_none() && g.acme_directory.is_none())
            .map(|_| crate::gateway::certificate_names(self.topo));
        let mut seen_rules: Vec<(String, i64, usize)> = Vec::new();
        for (i, route) in self.topo.routes.iter().enumerate() {
            let place = format!("route[{i}].rule");
            let normalized: String = route.rule.split_whitespace().collect::<Vec<_>>().join(" ");
            let priority = route
                .priority
                .unwrap_or_else(|| phoenix_proxy::rule::default_priority(&route.rule));
            if let Some((_, _, first)) = seen_rules
                .iter()
                .find(|(r, p, _)| *r == normalized && *p == priority)
            {
                self.error(
                    Problem::new(
                        place.clone(),
                        format!("can never match: route[{first}] has the same rule and priority and is chosen first"),
                    )
                    .with_hint("remove the duplicate, or change its rule or priority"),
                );
                continue;
            }
            seen_rules.push((normalized, priority, i));
            let Some(hosts) = conjunctive_hosts(&route.rule) else {
                continue;
            };
            if hosts.is_empty() {
                self.error(
                    Problem::new(
                        place.clone(),
                        "can never match: it requires two different hosts at once (`Host(a) && Host(b)`)",
                    )
                    .with_hint("join alternative hosts with || or list them in one Host(`a`, `b`)"),
                );
                continue;
            }
            if hosts.len() == 1 && is_host_only(&route.rule) {
                let host = &hosts[0];
                if let Some((other, service)) = claims.get(host) {
                    if *service != route.service {
                        let other = other.clone();
                        self.error(
                            Problem::new(
                                place.clone(),
                                format!("duplicate host {host}: sent to service {:?} here and to service {service:?} by {other}", route.service),
                            )
                            .with_hint("route each host to one service, or add a path or header condition to tell them apart"),
                        );
                    }
                } else {
                    claims.insert(host.clone(), (format!("route[{i}]"), route.service.clone()));
                }
            }
            if let Some(names) = &gateway_names {
                let unreachable: Vec<&String> = hosts
                    .iter()
                    .filter(|h| !names.iter().any(|n| n == *h))
                    .collect();
                if unreachable.len() == hosts.len() {
                    self.error(
                        Problem::new(
                            place.clone(),
                            format!(
                                "can never match through the gateway: it has no certificate for {}",
                                unreachable.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        )
                        .with_hint("the gateway's certificate covers <service>.<domain> for each [[service]]: route such a host, or give the gateway tls_cert/tls_key that cover this one"),
                    );
                }
            }
        }
    }

    /// Names the roles will ask the CA for must be inside `ca.domains`.
    fn ca_names(&mut self) {
        let Some(ca) = &self.topo.ca else {
            return;
        };
        if ca.domains.is_empty() {
            return;
        }
        let permitted = |name: &str| {
            let name = name.to_ascii_lowercase();
            ca.domains.iter().any(|d| {
                let d = d.to_ascii_lowercase();
                name == d
                    || name
                        .strip_suffix(d.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            })
        };
        let hint = format!(
            "the CA only issues names under {}: add the domain to ca.domains, or rename",
            ca.domains.join(", ")
        );
        if let Some(gw) = &self.topo.gateway {
            if gw.tls_cert.is_none() && gw.acme_directory.is_none() {
                if let Some(domain) = &self.topo.domain {
                    if !permitted(&crate::gateway::client_name(domain)) {
                        self.error(
                            Problem::new(
                                "domain",
                                format!("names under {domain} (the gateway's certificate) are outside ca.domains"),
                            )
                            .with_hint(hint.clone()),
                        );
                    }
                }
            }
        }
        if let Some(mesh) = &self.topo.mesh {
            if mesh.tls_cert.is_none() {
                if let Some(name) = crate::mesh::mesh_name(self.topo) {
                    if !permitted(&name) {
                        let place = if mesh.name.is_some() {
                            "mesh.name"
                        } else {
                            "domain"
                        };
                        self.error(
                            Problem::new(
                                place,
                                format!("the mesh's name {name} is outside ca.domains"),
                            )
                            .with_hint(hint.clone()),
                        );
                    }
                }
            }
        }
    }

    /// Verification switched off, anywhere.
    fn verification(&mut self) {
        for s in &self.topo.services {
            let https = s
                .servers
                .iter()
                .any(|u| u.url().to_ascii_lowercase().starts_with("https://"));
            if s.tls_insecure_skip_verify && https {
                self.warning(
                    Problem::new(
                        format!("service {:?}.tls_insecure_skip_verify", s.name),
                        "certificate verification is switched off: anyone on the path can impersonate this backend",
                    )
                    .with_hint("give the backend a certificate from the Phoenix CA (or set tls_root to its CA) and remove this key"),
                );
            }
        }
    }

    /// Whether `ip` is an address of this host (or the unspecified address).
    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_unspecified() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
    }

    /// Files and ports, for the roles that run on this host.
    fn on_host(&mut self) {
        let list = self.listener_list();
        // A role runs on this host when its main listener's address is one of this host's.
        let mut role_local: BTreeMap<&str, bool> = BTreeMap::new();
        for (place, addr) in &list {
            if place.ends_with(".listen") {
                let role = place.split('.').next().unwrap_or("");
                role_local.insert(role, self.is_local(addr.ip()));
            }
        }
        for (place, addr) in &list {
            let role = place.split('.').next().unwrap_or("");
            if !role_local.get(role).copied().unwrap_or(false) {
                self.report.skipped.push(format!(
                    "{place}: whether {addr} is free, because the {role} does not listen on an address of this host"
                ));
            } else if addr.port() != 0 {
                match std::net::TcpListener::bind(addr) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => self.warning(
                        Problem::new(place.clone(), format!("{addr} is in use on this host"))
                            .with_hint("stop what listens there (a role already running?) or choose another port"),
                    ),
                    Err(e) => self
                        .report
                        .skipped
                        .push(format!("{place}: cannot test whether {addr} is free ({e})")),
                }
            }
        }
        let mut files: Vec<(&str, String, PathBuf)> = Vec::new();
        if let Some(gw) = &self.topo.gateway {
            for (key, p) in [
                ("tls_cert", &gw.tls_cert),
                ("tls_key", &gw.tls_key),
                ("ca_root", &gw.ca_root),
            ] {
                if let Some(p) = p {
                    files.push(("gateway", format!("gateway.{key}"), p.clone()));
                }
            }
        }
        if let Some(mesh) = &self.topo.mesh {
            for (key, p) in [
                ("tls_cert", &mesh.tls_cert),
                ("tls_key", &mesh.tls_key),
                ("ca_root", &mesh.ca_root),
            ] {
                if let Some(p) = p {
                    files.push(("mesh", format!("mesh.{key}"), p.clone()));
                }
            }
            for s in &self.topo.services {
                if let Some(p) = &s.tls_root {
                    files.push(("mesh", format!("service {:?}.tls_root", s.name), p.clone()));
                }
            }
        }
        for (role, place, path) in files {
            if !role_local.get(role).copied().unwrap_or(false) {
                self.report.skipped.push(format!(
                    "{place}: whether {} exists, because the {role} does not listen on this host",
                    path.display()
                ));
            } else if !path.exists() {
                self.error(
                    Problem::new(place, format!("{} does not exist", path.display()))
                        .with_hint("relative paths are relative to the topology file's directory"),
                );
            }
        }
        self.ca_on_host(role_local.get("ca").copied().unwrap_or(false));
    }

    /// Leaves longer than what is left of the intermediate are cut short at its expiry.
    fn ca_on_host(&mut self, local: bool) {
        let Some(ca) = &self.topo.ca else {
            return;
        };
        if !local {
            self.report.skipped.push(format!(
                "ca.data_dir: the intermediate's lifetime, because the CA ({}) does not listen on this host",
                ca.listen
            ));
            return;
        }
        let path = ca.data_dir.join("intermediate.pem");
        let Ok(pem) = std::fs::read(&path) else {
            self.report.skipped.push(format!(
                "ca.data_dir: the intermediate's lifetime, because {} does not exist yet (`phoenix ca init` creates it)",
                path.display()
            ));
            return;
        };
        let not_after = x509_parser::pem::parse_x509_pem(&pem)
            .ok()
            .and_then(|(_, pem)| {
                pem.parse_x509()
                    .ok()
                    .map(|c| c.validity().not_after.timestamp())
            });
        let Some(not_after) = not_after else {
            self.error(
                Problem::new("ca.data_dir", format!("{} is not a PEM certificate", path.display()))
                    .with_hint("restore the CA's data_dir from a backup, or create a new CA with `phoenix ca init`"),
            );
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let left = Duration::from_secs(u64::try_from(not_after - now).unwrap_or(0));
        if ca.leaf_lifetime > left {
            self.error(
                Problem::new(
                    "ca.leaf_lifetime",
                    format!(
                        "leaves of {} would outlive the intermediate, which expires in {} ({}): they are cut short at its expiry",
                        humantime::format_duration(ca.leaf_lifetime),
                        humantime::format_duration(Duration::from_secs(left.as_secs())),
                        path.display()
                    ),
                )
                .with_hint("lower leaf_lifetime below the intermediate's remaining lifetime, or create a new intermediate"),
            );
        }
    }
}

/// For a rule made only of `&&`-joined matchers, the exact hosts every `Host(...)` matcher allows,
/// intersected; `None` when the rule has `||`, `!`, parentheses, or no exact `Host`.
fn conjunctive_hosts(rule: &str) -> Option<Vec<String>> {
    if rule.contains("||") || rule.contains('!') {
        return None;
    }
    let mut result: Option<Vec<String>> = None;
    for part in rule.split("&&") {
        let part = part.trim();
        let Some(args) = part
            .strip_prefix("Host(")
            .or_else(|| part.strip_prefix("host("))
            .or_else(|| part.strip_prefix("HOST("))
            .and_then(|a| a.strip_suffix(')'))
        else {
            if part.starts_with('(') {
                return None;
            }
            continue;
        };
        let mut hosts = Vec::new();
        for arg in args.split(',') {
            let arg = arg.trim();
            let inner = arg
                .strip_prefix('`')
                .and_then(|a| a.strip_suffix('`'))
                .or_else(|| arg.strip_prefix('"').and_then(|a| a.strip_suffix('"')))?;
            if inner.contains('*') {
                return None;
            }
            hosts.push(inner.trim_end_matches('.').to_ascii_lowercase());
        }
        result = Some(match result {
            None => hosts,
            Some(prev) => prev.into_iter().filter(|h| hosts.contains(h)).collect(),
        });
    }
    result
}

/// True when every `&&` part of the rule is a `Host(...)` matcher.
fn is_host_only(rule: &str) -> bool {
    !rule.contains("||")
        && rule
            .split("&&")
            .all(|p| p.trim().to_ascii_lowercase().starts_with("host("))
}

fn summarize(topo: &Topology) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(ca) = &topo.ca {
        out.push(format!("ca       {}  domains {:?}", ca.listen, ca.domains));
    }
    if let Some(gw) = &topo.gateway {
        out.push(format!("gateway  {}  -> {}", gw.listen, gw.mesh));
    }
    if let Some(mesh) = &topo.mesh {
        out.push(format!("mesh     {}", mesh.listen));
    }
    for s in &topo.services {
        let servers: Vec<&str> = s.servers.iter().map(|s| s.url()).collect();
        out.push(format!("service  {:<16} {}", s.name, servers.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conjunctions_of_hosts_intersect() {
        assert_eq!(
            conjunctive_hosts("Host(`a.test`)"),
            Some(vec!["a.test".into()])
        );
        assert_eq!(
            conjunctive_hosts("Host(`a.test`) && Host(`b.test`)"),
            Some(vec![])
        );
        assert_eq!(
            conjunctive_hosts("Host(`a.test`, `b.test`) && Host(`B.test.`) && PathPrefix(`/x`)"),
            Some(vec!["b.test".into()])
        );
        assert_eq!(conjunctive_hosts("Host(`a`) || Host(`b`)"), None);
        assert_eq!(conjunctive_hosts("PathPrefix(`/`)"), None);
        assert_eq!(conjunctive_hosts("Host(`*.a.test`)"), None);
        assert!(is_host_only("Host(`a`)"));
        assert!(!is_host_only("Host(`a`) && Path(`/`)"));
    }
}
