//! The topology file: one TOML document that describes the whole flow (CA, gateway, mesh, services,
//! routes, middlewares). Each role reads its part.
//!
//! Loading never stops at the first mistake: the document is parsed once with spans, every section is
//! deserialized on its own, and every problem is reported with its line and column and a hint, so an
//! operator fixes a file in one pass. Problems found later by the roles (a rule that does not parse, a
//! plaintext backend outside the trusted networks) name a place such as `route[2].rule`, which
//! [`SourceMap::locate`] turns into a line of the file too.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use phoenix_ca::CaConfig;
use phoenix_proxy::config::{
    ListenerLimits, MeshConfig, MiddlewareConfig, Problem, RouteConfig, RoutingConfig,
    ServiceConfig,
};
use serde::de::{DeserializeOwned, IntoDeserializer};
use serde::Deserialize;
use toml_edit::{Document, Item};

/// The `[gateway]` section: the public edge.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Public TLS listener, e.g. `"0.0.0.0:443"`.
    pub listen: SocketAddr,
    /// Plain HTTP listener: ACME http-01 answers and redirects to HTTPS.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Admin listener for `/health` and `/metrics`. Default `127.0.0.1:9902`.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// URL of the mesh, e.g. `"https://10.0.0.12:443"`.
    pub mesh: String,
    /// Name on the mesh's certificate, sent as SNI and verified. Default `mesh.<domain>`.
    #[serde(default)]
    pub mesh_name: Option<String>,
    /// Present the gateway's certificate to the mesh (mTLS).
    #[serde(default)]
    pub mtls: bool,
    #[serde(default)]
    pub ca_url: Option<String>,
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
    #[serde(default)]
    pub ca_root: Option<PathBuf>,
    /// ACME directory to obtain the public certificate from, when it is not the Phoenix CA
    /// (e.g. a public CA). Default `<ca_url>/acme/directory`.
    #[serde(default)]
    pub acme_directory: Option<String>,
    /// Which ACME challenge the gateway answers: `tls-alpn-01` on its TLS listener (default) or
    /// `http-01` on `http_listen`.
    #[serde(default)]
    pub acme_challenge: AcmeChallenge,
    /// Static certificate chain and key instead of ACME.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// `Strict-Transport-Security` max-age; unset sends no HSTS header.
    #[serde(default, with = "humantime_serde")]
    pub hsts: Option<std::time::Duration>,
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Clients that may ask for hop traces (`phoenix trace`); anyone else gets no trace data.
    /// Default loopback (`127.0.0.0/8`, `::1`).
    #[serde(default = "phoenix_proxy::trace::default_trace_networks")]
    pub trace_networks: Vec<IpNet>,
    #[serde(default = "default_true")]
    pub access_log: bool,
    #[serde(default)]
    pub limits: ListenerLimits,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum AcmeChallenge {
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
}

fn default_true() -> bool {
    true
}

/// The whole topology file.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub domain: Option<String>,
    pub ca: Option<CaConfig>,
    pub gateway: Option<GatewayConfig>,
    pub mesh: Option<MeshConfig>,
    pub services: Vec<ServiceConfig>,
    pub routes: Vec<RouteConfig>,
    pub middlewares: BTreeMap<String, MiddlewareConfig>,
}

impl Topology {
    /// Makes relative paths in the file relative to the file's own directory, as nginx and Traefik
    /// do, so a role started from any working directory finds the same files.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(ca) = &mut self.ca {
            fix(&mut ca.data_dir);
        }
        if let Some(mesh) = &mut self.mesh {
            mesh.tls_cert.as_mut().map(fix);
            mesh.tls_key.as_mut().map(fix);
            mesh.ca_root.as_mut().map(fix);
        }
        if let Some(gw) = &mut self.gateway {
            gw.tls_cert.as_mut().map(fix);
            gw.tls_key.as_mut().map(fix);
            gw.ca_root.as_mut().map(fix);
        }
        for s in &mut self.services {
            s.tls_root.as_mut().map(fix);
        }
    }

    /// The part of the file the data plane routes with.
    pub fn routing(&self) -> RoutingConfig {
        RoutingConfig {
            domain: self.domain.clone(),
            services: self.services.clone(),
            routes: self.routes.clone(),
            middlewares: self.middlewares.clone(),
        }
    }
}

/// A problem located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: PathBuf,
    /// 1-based line and column, when the place could be found in the file.
    pub position: Option<(usize, usize)>,
    pub problem: Problem,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: ", self.file.display())?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        write!(f, "{}", self.problem)
    }
}

/// Every problem of one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<Located>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The parsed document, kept to turn places and byte spans into lines and columns.
#[derive(Debug)]
pub struct SourceMap {
    file: PathBuf,
    src: String,
    doc: Document<String>,
}

impl SourceMap {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.src[..offset.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    fn at_span(&self, span: Option<Range<usize>>, problem: Problem) -> Located {
        Located {
            file: self.file.clone(),
            position: span.map(|s| self.position(s.start)),
            problem,
        }
    }

    /// Every problem of a role's checks, located in this file.
    pub fn errors(&self, problems: Vec<Problem>) -> ConfigErrors {
        ConfigErrors(problems.into_iter().map(|p| self.locate(p)).collect())
    }

    /// Resolves a place such as `route[2].rule`, `service "app".servers[0]`, `middleware.strip-v1` or
    /// `mesh.listen` to the line and column of the deepest item that exists in the file.
    pub fn locate(&self, problem: Problem) -> Located {
        let span = self.place_span(&problem.place);
        self.at_span(span, problem)
    }

    fn place_span(&self, place: &str) -> Option<Range<usize>> {
        let mut item: &Item = self.doc.as_item();
        let mut best = None;
        for segment in PlaceSegments::new(place) {
            let next = match segment {
                Segment::Key(key) => item.get(key),
                Segment::Index(i) => item.get(i),
                Segment::Named(name) => {
                    // `service "app"`: the element of the current array whose `name` is "app".
                    let arr = item.as_array_of_tables()?;
                    let found = arr
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name));
                    match found {
                        Some(t) => {
                            best = t.span().or(best);
                            return self.place_rest(t, place, best);
                        }
                        None => None,
                    }
                }
            };
            match next {
                Some(next) => {
                    item = next;
                    best = item_span(item).or(best);
                }
                None => break,
            }
        }
        best
    }

    /// After a `service "name"` segment the walk continues inside that table.
    fn place_rest(
        &self,
        table: &toml_edit::Table,
        place: &str,
        best: Option<Range<usize>>,
    ) -> Option<Range<usize>> {
        let rest = place
            .split_once('"')
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(_, r)| r);
        let mut best = best;
        let mut current: Option<&Item> = None;
        for segment in PlaceSegments::new(rest.unwrap_or("")) {
            let next = match (segment, current) {
                (Segment::Key(k), None) => table.get(k),
                (Segment::Key(k), Some(item)) => item.get(k),
                (Segment::Index(i), Some(item)) => item.get(i),
                _ => None,
            };
            match next {
                Some(n) => {
                    best = item_span(n).or(best);
                    current = Some(n);
                }
                None => break,
            }
        }
        best
    }
}

fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Value(v) => v.span(),
        Item::Table(t) => t.span(),
        Item::ArrayOfTables(a) => a.span(),
        Item::None => None,
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
    Named(&'a str),
}

/// Splits `service "app".servers[0]` into `service`, `"app"`, `servers`, `[0]`.
struct PlaceSegments<'a> {
    rest: &'a str,
}

impl<'a> PlaceSegments<'a> {
    fn new(place: &'a str) -> Self {
        Self { rest: place.trim() }
    }
}

impl<'a> Iterator for PlaceSegments<'a> {
    type Item = Segment<'a>;

    fn next(&mut self) -> Option<Segment<'a>> {
        let rest = self.rest.trim_start_matches(['.', ' ']);
        if rest.is_empty() {
            return None;
        }
        if let Some(r) = rest.strip_prefix('[') {
            let (idx, after) = r.split_once(']')?;
            self.rest = after;
            return idx.trim().parse().ok().map(Segment::Index);
        }
        if let Some(r) = rest.strip_prefix('"') {
            let (name, after) = r.split_once('"')?;
            self.rest = after;
            return Some(Segment::Named(name));
        }
        let end = rest.find(['.', '[', ' ', '"']).unwrap_or(rest.len());
        let (key, after) = rest.split_at(end);
        self.rest = after;
        Some(Segment::Key(key))
    }
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "domain",
    "ca",
    "gateway",
    "mesh",
    "service",
    "route",
    "middleware",
];

/// Reads and checks a topology file; returns the topology and its source map, or every problem.
pub fn load(path: &Path) -> Result<(Topology, SourceMap), ConfigErrors> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Located {
            file: path.to_owned(),
            position: None,
            problem: Problem::new("file", format!("cannot read: {e}"))
                .with_hint("check the path given with --config"),
        }])
    })?;
    let (mut topo, map) = parse(path, src)?;
    topo.resolve_paths(path.parent().unwrap_or(Path::new(".")));
    Ok((topo, map))
}

/// Parses a topology from text; `file` is used in messages.
pub fn parse(file: &Path, src: String) -> Result<(Topology, SourceMap), ConfigErrors> {
    let doc = match Document::parse(src.clone()) {
        Ok(doc) => doc,
        Err(e) => {
            let map = SourceMap {
                file: file.to_owned(),
                src,
                doc: Document::parse(String::new()).expect("empty"),
            };
            let problem = Problem::new("syntax", e.message().trim().to_owned())
                .with_hint("the file must be valid TOML");
            return Err(ConfigErrors(vec![map.at_span(e.span(), problem)]));
        }
    };
    let map = SourceMap {
        file: file.to_owned(),
        src,
        doc,
    };
    let mut problems = Vec::new();
    let mut topo = Topology::default();
    let root = map.doc.as_table();

    for (key, item) in root.iter() {
        if !TOP_LEVEL_KEYS.contains(&key) {
            let span = root
                .key(key)
                .and_then(|k| k.span())
                .or_else(|| item_span(item));
            problems.push(
                map.at_span(
                    span,
                    Problem::new(key, format!("unknown section `{key}`"))
                        .with_hint(format!("known sections: {}", TOP_LEVEL_KEYS.join(", "))),
                ),
            );
        }
    }

    topo.domain = section(&map, "domain", root.get("domain"), &mut problems);
    topo.ca = section(&map, "ca", root.get("ca"), &mut problems);
    topo.gateway = section(&map, "gateway", root.get("gateway"), &mut problems);
    topo.mesh = section(&map, "mesh", root.get("mesh"), &mut problems);

    for (name, list) in [
        ("service", &mut topo.services as &mut dyn PushSection),
        ("route", &mut topo.routes),
    ] {
        match root.get(name) {
            None => {}
            Some(Item::ArrayOfTables(arr)) => {
                for (i, table) in arr.iter().enumerate() {
                    let item = Item::Table(table.clone());
                    list.push_from(&map, &format!("{name}[{i}]"), &item, &mut problems);
                }
            }
            Some(other) => problems.push(
                map.at_span(
                    item_span(other),
                    Problem::new(name, format!("`{name}` must be a list of tables"))
                        .with_hint(format!("write each entry as [[{name}]]")),
                ),
            ),
        }
    }

    match root.get("middleware") {
        None => {}
        Some(item) if item.is_table_like() => {
            let table = item.as_table_like().expect("checked");
            for (name, mw) in table.iter() {
                let place = format!("middleware.{name}");
                if let Some(cfg) =
                    section::<MiddlewareConfig>(&map, &place, Some(mw), &mut problems)
                {
                    topo.middlewares.insert(name.to_owned(), cfg);
                }
            }
        }
        Some(other) => problems.push(
            map.at_span(
                item_span(other),
                Problem::new(
                    "middleware",
                    "`middleware` must be a table of named middlewares",
                )
                .with_hint("write [middleware.NAME] sections"),
            ),
        ),
    }

    if let Some(ca) = &topo.ca {
        for p in ca.validate() {
            problems.push(map.locate(Problem::new("ca", p)));
        }
    }

    if problems.is_empty() {
        Ok((topo, map))
    } else {
        Err(ConfigErrors(problems))
    }
}

trait PushSection {
    fn push_from(&mut self, map: &SourceMap, place: &str, item: &Item, problems: &mut Vec<Located>);
}

impl<T: DeserializeOwned> PushSection for Vec<T> {
    fn push_from(
        &mut self,
        map: &SourceMap,
        place: &str,
        item: &Item,
        problems: &mut Vec<Located>,
    ) {
        if let Some(v) = section(map, place, Some(item), problems) {
            self.push(v);
        }
    }
}

/// Deserializes one section on its own, so that a mistake in it does not hide mistakes elsewhere.
fn section<T: DeserializeOwned>(
    map: &SourceMap,
    place: &str,
    item: Option<&Item>,
    problems: &mut Vec<Located>,
) -> Option<T> {
    let item = item?;
    let span = item_span(item);
    let value = match item.clone().into_value() {
        Ok(v) => v,
        Err(_) => {
            problems.push(map.at_span(span, Problem::new(place, "not a value or table")));
            return None;
        }
    };
    match T::deserialize(value.into_deserializer()) {
        Ok(v) => Some(v),
        Err(e) => {
            let message = e.message().trim().to_owned();
            let hint = hint_for(&message);
            let mut problem = Problem::new(place, message);
            problem.hint = hint;
            problems.push(map.at_span(e.span().or(span), problem));
            None
        }
    }
}

fn hint_for(message: &str) -> Option<String> {
    if message.contains("unknown field") {
        Some("remove the key or fix its spelling; the expected keys are listed".into())
    } else if message.contains("missing field") {
        Some("add the key to this section".into())
    } else if message.contains("invalid socket address") {
        Some("write an address as \"IP:PORT\", e.g. \"127.0.0.1:9443\"".into())
    } else if message.contains("invalid IP address") || message.contains("invalid IP network") {
        Some("write a network in CIDR form, e.g. \"10.0.0.0/24\"".into())
    } else if message.contains("duration") || message.contains("time unit") {
        Some("write a duration like \"500ms\", \"10s\", \"15m\" or \"24h\"".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(src: &str) -> Result<(Topology, SourceMap), ConfigErrors> {
        parse(Path::new("t.toml"), src.to_owned())
    }

    #[test]
    fn mesh_contract_loads() {
        let src = r#"
domain = "phoenix.test"
[mesh]
listen = "127.0.0.1:9443"
admin_listen = "127.0.0.1:9901"
tls_cert = "mesh.crt"
tls_key = "mesh.key"
trusted_proxies = ["127.0.0.1/32"]
plaintext_networks = ["127.0.0.0/8"]
[[service]]
name = "app"
servers = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
health = { path = "/health", interval = "1s" }
[[route]]
rule = "Host(`api.phoenix.test`) && PathPrefix(`/v1`)"
service = "app"
middlewares = ["strip-v1"]
[middleware.strip-v1]
strip_prefix = ["/v1"]
"#;
        let (t, _) = parse_str(src).expect("loads");
        assert_eq!(t.domain.as_deref(), Some("phoenix.test"));
        assert_eq!(t.services[0].servers.len(), 2);
        assert_eq!(
            t.services[0].health.as_ref().unwrap().interval,
            std::time::Duration::from_secs(1)
        );
        assert_eq!(t.routes[0].middlewares, vec!["strip-v1"]);
        assert_eq!(
            t.middlewares["strip-v1"].strip_prefix.as_deref(),
            Some(&["/v1".to_owned()][..])
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let src = "domain = \"x.test\"\nbogus = 1\n[mesh]\nlisten = \"nope\"\n[[service]]\nname = \"a\"\nservers = []\nhelth = 3\n[[route]]\nservice = \"a\"\n";
        let errs = parse_str(src).unwrap_err().0;
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 4, "{text:#?}");
        assert!(
            text[0].starts_with("t.toml:2:1:") && text[0].contains("bogus"),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("t.toml:4:") && t.contains("mesh")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("t.toml:8:") && t.contains("helth")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("route[0]") && t.contains("rule")),
            "{text:#?}"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let errs = parse_str("[mesh\nlisten = 1\n").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].position.map(|p| p.0), Some(1));
    }

    #[test]
    fn places_resolve_to_lines() {
        let src = "[[service]]\nname = \"a\"\nservers = [\"http://127.0.0.1:1\"]\n[[service]]\nname = \"b\"\nservers = [\n  \"http://127.0.0.1:2\",\n  \"http://10.9.9.9:3\",\n]\n[[route]]\nrule = \"Host(`x`)\"\nservice = \"b\"\n";
        let (_, map) = parse_str(src).expect("loads");
        let at = |place: &str| map.locate(Problem::new(place, "m")).position.map(|p| p.0);
        assert_eq!(at("route[0].rule"), Some(11));
        assert_eq!(at("service \"b\".servers[1]"), Some(8));
        assert_eq!(at("service[1].servers[1]"), Some(8));
        assert_eq!(at("service \"b\""), Some(4));
    }
}
