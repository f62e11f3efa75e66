//! The route table: one immutable snapshot of services, middlewares and routes, built from the
//! configuration and swapped in atomically on reload.
//!
//! Building checks everything before anything runs and reports every problem at once: unknown or
//! duplicate names, rule syntax errors (with their column), bad server URLs, and the one trust
//! assumption the mesh makes explicit: a plaintext backend (`http://`, `h2c://`) must lie inside
//! `plaintext_networks`. Host names in plaintext server URLs are resolved at build time and every
//! address they resolve to must be inside those networks; a name that does not resolve is refused,
//! because the proxy could not say where the plaintext would go.
//!
//! Services whose configuration did not change are carried over from the previous table, so a reload
//! keeps their connection pools, health state and in-flight counts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

use crate::config::{Problem, RoutingConfig, ServiceConfig};
use crate::metrics::{Metrics, RouteMetrics};
use crate::middleware::{Chain, Middleware};
use crate::router::{Router, RouterEntry};
use crate::rule::RequestView;
use crate::upstream::{Service, UpstreamContext};

/// Where a matched request goes: the route's name (for logs and metrics), its service and its
/// middleware chain.
pub struct RouteTarget {
    pub name: Arc<str>,
    pub service: Arc<Service>,
    pub chain: Chain,
    /// The service's name as a shared string, so metrics need no allocation per request.
    pub service_name: Arc<str>,
    /// This route's request metrics, resolved by the first request (see [`RouteTarget::metrics`]).
    metrics: OnceLock<RouteMetrics>,
}

impl RouteTarget {
    /// This route's request metrics in `metrics` under `role`; resolved once, by the first request.
    /// A table belongs to one proxy, so the role and the registry are the same at every call.
    pub fn metrics(&self, metrics: &Metrics, role: &'static str) -> &RouteMetrics {
        self.metrics
            .get_or_init(|| metrics.route(role, &self.name, &self.service_name))
    }
}

impl std::fmt::Debug for RouteTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTarget")
            .field("name", &self.name)
            .field("service", &self.service_name)
            .finish_non_exhaustive()
    }
}

/// Inputs of [`RouteTable::build`] besides the routing configuration.
pub struct BuildContext<'a> {
    /// Networks that plaintext backends may be in.
    pub plaintext_networks: &'a [IpNet],
    pub upstream: UpstreamContext,
    /// The running table, whose unchanged services are reused.
    pub previous: Option<&'a RouteTable>,
}

/// An immutable routing snapshot.
pub struct RouteTable {
    router: Router<Arc<RouteTarget>>,
    services: BTreeMap<String, Arc<Service>>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .field("routes", &self.router.len())
            .finish()
    }
}

impl RouteTable {
    /// Builds a table, or returns every problem found.
    pub fn build(cfg: &RoutingConfig, ctx: &BuildContext<'_>) -> Result<RouteTable, Vec<Problem>> {
        let mut problems = Vec::new();

        // Services.
        let mut seen = HashSet::new();
        let mut services: BTreeMap<String, Arc<Service>> = BTreeMap::new();
        for service in &cfg.services {
            let place = format!("service {:?}", service.name);
            if service.name.is_empty() {
                problems.push(Problem::new(&place, "has an empty name"));
                continue;
            }
            if !seen.insert(service.name.as_str()) {
                problems.push(
                    Problem::new(&place, "is defined twice")
                        .with_hint("give every [[service]] a different name"),
                );
                continue;
            }
            let before = problems.len();
            check_plaintext(service, ctx.plaintext_networks, &mut problems);
            if problems.len() > before {
                continue;
            }
            let reused = ctx
                .previous
                .and_then(|prev| prev.services.get(&service.name))
                .filter(|prev| prev.config() == service)
                .cloned();
            match reused {
                Some(svc) => {
                    services.insert(service.name.clone(), svc);
                }
                None => match Service::new(service, &ctx.upstream) {
                    Ok(svc) => {
                        services.insert(service.name.clone(), svc);
                    }
                    Err(mut p) => problems.append(&mut p),
                },
            }
        }

        // Middlewares: every section is built (and checked), used or not.
        let mut middlewares: HashMap<&str, Arc<Middleware>> = HashMap::new();
        for (name, mw) in &cfg.middlewares {
            match Middleware::build(name, mw) {
                Ok(m) => {
                    middlewares.insert(name.as_str(), Arc::new(m));
                }
                Err(mut p) => problems.append(&mut p),
            }
        }

        // Routes; `places[i]` names entry i for rule errors.
        let mut entries: Vec<RouterEntry<Arc<RouteTarget>>> = Vec::new();
        let mut places: Vec<String> = Vec::new();
        for (i, route) in cfg.routes.iter().enumerate() {
            let place = format!("route[{i}]");
            let mut chain_items = Vec::with_capacity(route.middlewares.len());
            let mut complete = true;
            for (j, name) in route.middlewares.iter().enumerate() {
                match middlewares.get(name.as_str()) {
                    Some(m) => chain_items.push(m.clone()),
                    None => {
                        complete = false;
                        if !cfg.middlewares.contains_key(name) {
                            problems.push(
                                Problem::new(
                                    format!("{place}.middlewares[{j}]"),
                                    format!("unknown middleware {name:?}"),
                                )
                                .with_hint(format!("define it in a [middleware.{name}] section")),
                            );
                        }
                    }
                }
            }
            let service = services.get(&route.service);
            if service.is_none() && !cfg.services.iter().any(|s| s.name == route.service) {
                problems.push(
                    Problem::new(
                        format!("{place}.service"),
                        format!("unknown service {:?}", route.service),
                    )
                    .with_hint(known_services_hint(&cfg.services)),
                );
            }
            let name: Arc<str> =
                Arc::from(route.name.clone().unwrap_or_else(|| format!("route-{i}")));
            // Rules are parsed even when the service is missing, so their errors are reported too;
            // a placeholder target is never used because the table is then not returned.
            let target = match (service, complete) {
                (Some(svc), true) => Some(Arc::new(RouteTarget {
                    name,
                    service: svc.clone(),
                    chain: Chain::new(chain_items),
                    service_name: Arc::from(route.service.as_str()),
                    metrics: OnceLock::new(),
                })),
                _ => None,
            };
            match target {
                Some(target) => {
                    entries.push(RouterEntry {
                        rule: route.rule.clone(),
                        priority: route.priority,
                        target,
                    });
                    places.push(format!("{place}.rule"));
                }
                None => {
                    if let Err(e) = crate::rule::Rule::parse(&route.rule) {
                        problems.push(Problem::new(format!("{place}.rule"), e.to_string()));
                    }
                }
            }
        }

        // One automatic route per service: Host(`<name>.<domain>`).
        if let Some(domain) = cfg
            .domain
            .as_deref()
            .map(|d| d.trim_matches('.'))
            .filter(|d| !d.is_empty())
        {
            for service in &cfg.services {
                let Some(svc) = services.get(&service.name) else {
                    continue;
                };
                let host = format!("{}.{}", service.name, domain).to_ascii_lowercase();
                entries.push(RouterEntry {
                    rule: format!("Host(`{host}`)"),
                    priority: None,
                    target: Arc::new(RouteTarget {
                        name: Arc::from(format!("{}@auto", service.name)),
                        service: svc.clone(),
                        chain: Chain::new(Vec::new()),
                        service_name: Arc::from(service.name.as_str()),
                        metrics: OnceLock::new(),
                    }),
                });
                places.push(format!(
                    "service {:?} (automatic route Host(`{host}`))",
                    service.name
                ));
            }
        }

        let router = match Router::new(entries) {
            Ok(router) => Some(router),
            Err(errors) => {
                for (index, error) in errors {
                    let place = places
                        .get(index)
                        .cloned()
                        .unwrap_or_else(|| format!("route #{index}"));
                    problems.push(Problem::new(place, error.to_string()));
                }
                None
            }
        };
        match router {
            Some(router) if problems.is_empty() => Ok(RouteTable { router, services }),
            _ => Err(problems),
        }
    }

    /// The route a request matches.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Arc<RouteTarget>> {
        self.router.route(req)
    }

    /// See `Router::reads_headers`.
    pub fn reads_headers(&self) -> bool {
        self.router.reads_headers()
    }

    /// See `Router::reads_client_ip`.
    pub fn reads_client_ip(&self) -> bool {
        self.router.reads_client_ip()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// Starts the active health checks of every service (services carried over keep their running
    /// checks; a service dropped by a reload stops its checks when its last request finishes).
    pub fn start_health_checks(&self, shutdown: &CancellationToken) {
        for service in self.services.values() {
            service.start_health_checks(shutdown.clone());
        }
    }
}

fn known_services_hint(services: &[ServiceConfig]) -> String {
    if services.is_empty() {
        "define a [[service]] with this name".to_owned()
    } else {
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        format!("known services: {}", names.join(", "))
    }
}

/// Refuses plaintext servers outside `networks`.
fn check_plaintext(service: &ServiceConfig, networks: &[IpNet], problems: &mut Vec<Problem>) {
    for (i, server) in service.servers.iter().enumerate() {
        let url = server.url();
        let Some((scheme, rest)) = url.split_once("://") else {
            continue;
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "h2c" {
            continue;
        }
        let place = format!("service {:?}.servers[{i}]", service.name);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let (host, port) = split_host_port(authority);
        if host.is_empty() {
            // A malformed URL; the upstream builder reports it.
            continue;
        }
        let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match (host, port.unwrap_or(80)).to_socket_addrs() {
                Ok(addrs) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    ips.sort();
                    ips.dedup();
                    ips
                }
                Err(e) => {
                    problems.push(
                        Problem::new(
                            &place,
                            format!(
                                "service {:?} server {url} is plaintext and its host {host:?} does not resolve ({e}), \
                                 so it cannot be checked against plaintext_networks",
                                service.name
                            ),
                        )
                        .with_hint("use an IP address, a resolvable name, or https://"),
                    );
                    continue;
                }
            },
        };
        let outside: Vec<IpAddr> = addresses
            .into_iter()
            .filter(|ip| !crate::forward::is_trusted(*ip, networks))
            .collect();
        if let Some(ip) = outside.first() {
            let nets: Vec<String> = networks.iter().map(|n| n.to_string()).collect();
            problems.push(
                Problem::new(
                    &place,
                    format!(
                        "service {:?} server {url} is plaintext but {ip} is outside plaintext_networks [{}]",
                        service.name,
                        nets.join(", ")
                    ),
                )
                .with_hint(format!(
                    "use https:// for this server, or add its network (e.g. \"{}\") to plaintext_networks if \
                     traffic to it cannot be observed",
                    host_network(*ip)
                )),
            );
        }
    }
}

fn host_network(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(v4) => IpNet::new(IpAddr::V4(v4), 32).expect("prefix 32 is valid"),
        IpAddr::V6(v6) => IpNet::new(IpAddr::V6(v6), 128).expect("prefix 128 is valid"),
    }
}

/// `host:port`, `[v6]:port`, `host`, `[v6]`.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if let Some(rest) = authority.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return ("", None);
        };
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host, port);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()),
        None => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteConfig, ServerConfig};
    use std::time::Duration;

    fn service(name: &str, servers: &[&str]) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            servers: servers
                .iter()
                .map(|s| ServerConfig::Url(s.to_string()))
                .collect(),
            load_balancer: Default::default(),
            health: None,
            timeout: None,
            tls_root: None,
            tls_server_name: None,
            tls_insecure_skip_verify: false,
            retries: 2,
        }
    }

    fn ctx<'a>(nets: &'a [IpNet], previous: Option<&'a RouteTable>) -> BuildContext<'a> {
        BuildContext {
            plaintext_networks: nets,
            upstream: UpstreamContext {
                internal_roots: None,
                connect_timeout: Duration::from_secs(1),
                default_timeout: Duration::from_secs(5),
                client_cert: None,
            },
            previous,
        }
    }

    #[test]
    fn split_authority() {
        assert_eq!(split_host_port("10.0.0.1:80"), ("10.0.0.1", Some(80)));
        assert_eq!(split_host_port("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("backend"), ("backend", None));
    }

    #[test]
    fn every_problem_reported() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let cfg = RoutingConfig {
            domain: Some("phoenix.test".into()),
            services: vec![
                service("app", &["http://127.0.0.1:8001"]),
                service("app", &["http://127.0.0.1:8002"]),
                service("far", &["http://10.1.1.1:80", "https://10.1.1.2"]),
            ],
            routes: vec![
                RouteConfig {
                    name: None,
                    rule: "Host(`a`) &&".into(),
                    service: "app".into(),
                    priority: None,
                    middlewares: vec![],
                },
                RouteConfig {
                    name: None,
                    rule: "Path(`/`)".into(),
                    service: "nope".into(),
                    priority: None,
                    middlewares: vec!["missing".into()],
                },
            ],
            middlewares: Default::default(),
        };
        let problems = RouteTable::build(&cfg, &ctx(&nets, None)).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let all = text.join("\n");
        assert!(all.contains("service \"app\": is defined twice"), "{all}");
        assert!(
            all.contains("server http://10.1.1.1:80 is plaintext but 10.1.1.1 is outside plaintext_networks [127.0.0.0/8]"),
            "{all}"
        );
        assert!(
            all.contains("route[1].service: unknown service \"nope\""),
            "{all}"
        );
        assert!(
            all.contains("route[1].middlewares[0]: unknown middleware \"missing\""),
            "{all}"
        );
        assert!(all.contains("route[0].rule: column"), "{all}");
    }

    #[test]
    fn services_reused_when_unchanged() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let mut cfg = RoutingConfig {
            domain: Some("phoenix.test".into()),
            services: vec![
                service("a", &["http://127.0.0.1:1"]),
                service("b", &["http://127.0.0.1:2"]),
            ],
            ..Default::default()
        };
        let first = RouteTable::build(&cfg, &ctx(&nets, None)).unwrap();
        cfg.services[1].retries = 0;
        let second = RouteTable::build(&cfg, &ctx(&nets, Some(&first))).unwrap();
        assert!(Arc::ptr_eq(
            first.service("a").unwrap(),
            second.service("a").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            first.service("b").unwrap(),
            second.service("b").unwrap()
        ));
        let headers = http::HeaderMap::new();
        let view = RequestView {
            method: &http::Method::GET,
            host: "b.phoenix.test",
            path: "/",
            query: None,
            headers: &headers,
            client_ip: "127.0.0.1".parse().unwrap(),
        };
        assert_eq!(&*second.route(&view).unwrap().service_name, "b");
    }
}
