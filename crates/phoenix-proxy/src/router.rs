//! The router: an immutable, ordered set of rules that picks the target of a request.
//!
//! Routes are sorted once, when the router is built: higher priority first, a route without an
//! explicit priority getting its rule's length (Traefik's default, so more specific rules tend to win),
//! and routes of equal priority keeping their definition order. `route` returns the first route in that
//! order whose rule matches.
//!
//! To avoid testing every rule for every request, routes whose rule implies a set of exact hosts (most
//! do: ``Host(`a`) && ...``) are indexed by those hosts. A lookup merges the routes indexed under the
//! request's host with the routes that can match any host, both already in priority order, so the
//! result is the same as a linear scan. Nothing is allocated per request.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::rule::{default_priority, RequestView, Rule, RuleError};

/// One route as configured.
#[derive(Debug, Clone)]
pub struct RouterEntry<T> {
    pub rule: String,
    /// Higher wins; `None` means the rule's length in characters.
    pub priority: Option<i64>,
    pub target: T,
}

#[derive(Debug)]
struct CompiledRoute<T> {
    rule: Rule,
    source: Box<str>,
    priority: i64,
    target: T,
}

/// An immutable route set; share it behind an `Arc` and swap whole routers on reload.
#[derive(Debug)]
pub struct Router<T> {
    /// In match order: priority descending, then definition order.
    routes: Vec<CompiledRoute<T>>,
    /// Exact host -> positions in `routes` (ascending) of routes that can only match that host.
    by_host: HashMap<Box<str>, Box<[u32]>, BuildHasherDefault<HostHasher>>,
    /// Positions in `routes` (ascending) of routes that may match any host.
    any_host: Box<[u32]>,
    /// Some rule looks at header fields.
    reads_headers: bool,
    /// Some rule looks at the client's address.
    reads_client_ip: bool,
}

impl<T> Router<T> {
    /// Compiles every rule; on failure returns every broken rule with its index in `routes`.
    pub fn new(routes: Vec<RouterEntry<T>>) -> Result<Router<T>, Vec<(usize, RuleError)>> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(routes.len());
        for (index, entry) in routes.into_iter().enumerate() {
            match Rule::parse(&entry.rule) {
                Ok(rule) => compiled.push(CompiledRoute {
                    priority: entry
                        .priority
                        .unwrap_or_else(|| default_priority(&entry.rule)),
                    rule,
                    source: entry.rule.into_boxed_str(),
                    target: entry.target,
                }),
                Err(e) => errors.push((index, e)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // A stable sort keeps definition order among equal priorities.
        compiled.sort_by_key(|r| std::cmp::Reverse(r.priority));

        let mut by_host: HashMap<Box<str>, Vec<u32>, BuildHasherDefault<HostHasher>> =
            HashMap::default();
        let mut any_host = Vec::new();
        for (position, route) in compiled.iter().enumerate() {
            let position = u32::try_from(position).expect("fewer than 2^32 routes");
            match route.rule.required_hosts() {
                Some(hosts) => {
                    for host in hosts {
                        let list = by_host.entry(host.as_str().into()).or_default();
                        // One route may list a host twice (`Host(a) || Host(a)`); index it once.
                        if list.last() != Some(&position) {
                            list.push(position);
                        }
                    }
                }
                None => any_host.push(position),
            }
        }
        Ok(Router {
            reads_headers: compiled.iter().any(|r| r.rule.reads_headers()),
            reads_client_ip: compiled.iter().any(|r| r.rule.reads_client_ip()),
            routes: compiled,
            by_host: by_host
                .into_iter()
                .map(|(h, v)| (h, v.into_boxed_slice()))
                .collect(),
            any_host: any_host.into_boxed_slice(),
        })
    }

    /// Whether some rule looks at request header fields: without such a rule, `route` needs no
    /// headers in its view.
    pub fn reads_headers(&self) -> bool {
        self.reads_headers
    }

    /// Whether some rule looks at the client's address: without such a rule, `route` does not read
    /// `RequestView::client_ip`.
    pub fn reads_client_ip(&self) -> bool {
        self.reads_client_ip
    }

    /// The target of the first route, in priority order, whose rule matches the request.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&T> {
        let host = req.host.strip_suffix('.').unwrap_or(req.host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            // The contract is a lowercase host; if a caller breaks it, stay correct (Host matching
            // is case-insensitive) at the price of a scan rather than lowercasing into a new string.
            return self
                .routes
                .iter()
                .find(|r| r.rule.matches(req))
                .map(|r| &r.target);
        }
        let indexed: &[u32] = self.by_host.get(host).map_or(&[], |v| v);
        let (mut a, mut b) = (indexed.iter().peekable(), self.any_host.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => return None,
            };
            let route = &self.routes[*next.expect("peeked") as usize];
            if route.rule.matches(req) {
                return Some(&route.target);
            }
        }
    }

    /// Routes in match order: `(rule, effective priority, target)`. For diagnostics and diagrams.
    pub fn entries(&self) -> impl Iterator<Item = (&str, i64, &T)> {
        self.routes
            .iter()
            .map(|r| (&*r.source, r.priority, &r.target))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The host index's hash: a word at a time, multiply and rotate (as rustc's `FxHasher`). The keys
/// come from the configuration and a request only looks up, so no request can lengthen a probe
/// sequence: the keyed hash the standard map defaults to (against flooding by inserted keys) would
/// cost several times as much per lookup and protect nothing here.
#[derive(Default)]
struct HostHasher(u64);

impl HostHasher {
    const K: u64 = 0xf135_7aea_2e62_a9c5;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for HostHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.add(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        let rest = words.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 56));
    }

    /// The map takes a bucket from the low bits, which a product mixes least: rotate the well
    /// mixed high bits there.
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method};
    use std::net::{IpAddr, Ipv4Addr};

    fn entry(rule: &str, priority: Option<i64>, target: &'static str) -> RouterEntry<&'static str> {
        RouterEntry {
            rule: rule.to_owned(),
            priority,
            target,
        }
    }

    fn route(router: &Router<&'static str>, host: &str, path: &str) -> Option<&'static str> {
        let headers = HeaderMap::new();
        let req = RequestView {
            method: &Method::GET,
            host,
            path,
            query: None,
            headers: &headers,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        router.route(&req).copied()
    }

    #[test]
    fn longer_rule_wins_by_default() {
        let router = Router::new(vec![
            entry("Host(`app.phoenix.test`)", None, "host"),
            entry(
                "Host(`app.phoenix.test`) && PathPrefix(`/api`)",
                None,
                "api",
            ),
            entry("PathPrefix(`/`)", None, "catch-all"),
            // 14 characters: shorter than the catch-all's 15, so the catch-all wins (as in Traefik).
            entry("Host(`a.test`)", None, "short-host"),
        ])
        .unwrap();
        assert_eq!(route(&router, "app.phoenix.test", "/api/x"), Some("api"));
        assert_eq!(route(&router, "app.phoenix.test", "/other"), Some("host"));
        assert_eq!(route(&router, "b.test", "/api/x"), Some("catch-all"));
        assert_eq!(route(&router, "a.test", "/"), Some("catch-all"));
        let priorities: Vec<_> = router.entries().map(|(_, p, _)| p).collect();
        assert_eq!(priorities, [46, 24, 15, 14]);
    }

    #[test]
    fn explicit_priority_beats_length_and_ties_keep_definition_order() {
        let router = Router::new(vec![
            entry("Host(`a.test`) && PathPrefix(`/api`)", None, "long"),
            entry("PathPrefix(`/`)", Some(1000), "explicit"),
        ])
        .unwrap();
        assert_eq!(route(&router, "a.test", "/api"), Some("explicit"));

        let router = Router::new(vec![
            entry("PathPrefix(`/a`)", Some(5), "first"),
            entry("PathPrefix(`/`)", Some(5), "second"),
            entry("PathPrefix(`/`)", Some(5), "third"),
        ])
        .unwrap();
        assert_eq!(route(&router, "x", "/a"), Some("first"));
        assert_eq!(route(&router, "x", "/b"), Some("second"));
        let order: Vec<_> = router.entries().map(|(_, _, t)| *t).collect();
        assert_eq!(order, ["first", "second", "third"]);
    }

    #[test]
    fn negative_priority_sorts_last() {
        let router = Router::new(vec![
            entry("PathPrefix(`/`)", Some(-1), "low"),
            entry("Path(`/x`)", None, "x"),
        ])
        .unwrap();
        assert_eq!(route(&router, "h", "/x"), Some("x"));
        assert_eq!(route(&router, "h", "/y"), Some("low"));
    }

    #[test]
    fn host_index_merges_with_any_host_routes_in_priority_order() {
        // The any-host route has a priority between two host-indexed ones; the merge must respect it.
        let router = Router::new(vec![
            entry("Host(`a.test`) && Path(`/x`)", Some(30), "a-high"),
            entry("PathPrefix(`/`)", Some(20), "any-mid"),
            entry("Host(`a.test`)", Some(10), "a-low"),
            entry("Host(`b.test`) || Host(`a.test`)", Some(40), "ab"),
        ])
        .unwrap();
        assert_eq!(route(&router, "a.test", "/x"), Some("ab"));
        assert_eq!(route(&router, "c.test", "/x"), Some("any-mid"));
        let router = Router::new(vec![
            entry("Host(`a.test`) && Path(`/x`)", Some(30), "a-high"),
            entry("Path(`/y`)", Some(20), "any-mid"),
            entry("Host(`a.test`)", Some(10), "a-low"),
        ])
        .unwrap();
        assert_eq!(route(&router, "a.test", "/x"), Some("a-high"));
        assert_eq!(route(&router, "a.test", "/y"), Some("any-mid"));
        assert_eq!(route(&router, "a.test", "/z"), Some("a-low"));
        assert_eq!(route(&router, "b.test", "/z"), None);
    }

    #[test]
    fn indexed_routes_still_evaluate_the_whole_rule() {
        let router = Router::new(vec![entry(
            "Host(`a.test`) && !Path(`/private`)",
            None,
            "a",
        )])
        .unwrap();
        assert_eq!(route(&router, "a.test", "/public"), Some("a"));
        assert_eq!(route(&router, "a.test", "/private"), None);
    }

    #[test]
    fn negated_host_is_not_indexed_under_that_host() {
        let router = Router::new(vec![entry("!Host(`a.test`)", None, "not-a")]).unwrap();
        assert_eq!(route(&router, "b.test", "/"), Some("not-a"));
        assert_eq!(route(&router, "a.test", "/"), None);
    }

    #[test]
    fn trailing_dot_and_uppercase_hosts_still_route() {
        let router = Router::new(vec![entry("Host(`a.test`)", None, "a")]).unwrap();
        assert_eq!(route(&router, "a.test.", "/"), Some("a"));
        assert_eq!(route(&router, "A.Test", "/"), Some("a"));
    }

    #[test]
    fn every_broken_rule_is_reported_with_its_index() {
        let errors = Router::new(vec![
            entry("Host(`ok`)", None, "ok"),
            entry("Hots(`a`)", None, "typo"),
            entry("Path(`/x`", None, "unclosed"),
        ])
        .unwrap_err();
        let indexes: Vec<_> = errors.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 2]);
        assert_eq!(errors[0].1.column, 1);
        assert!(
            errors[0].1.message.contains("did you mean `Host`"),
            "{}",
            errors[0].1
        );
        assert_eq!(errors[1].1.column, 10);
    }

    #[test]
    fn many_hosts_each_find_their_own_routes() {
        // Hosts that differ in one byte, in the last partial word, or only in length: the host
        // index must keep every one apart, and find none that was not configured.
        let targets: Vec<&'static str> = (0..300)
            .map(|i| format!("svc-{i}.internal.example"))
            .chain((1..=17).map(|n| "a".repeat(n)))
            .map(|host| &*Box::leak(host.into_boxed_str()))
            .collect();
        let entries = targets
            .iter()
            .map(|h| entry(&format!("Host(`{h}`)"), None, h))
            .collect();
        let router = Router::new(entries).unwrap();
        for host in &targets {
            assert_eq!(route(&router, host, "/"), Some(*host));
        }
        assert_eq!(route(&router, "svc-300.internal.example", "/"), None);
        assert_eq!(route(&router, &"a".repeat(18), "/"), None);
        assert_eq!(route(&router, "", "/"), None);
    }

    #[test]
    fn empty_router_routes_nothing() {
        let router: Router<&'static str> = Router::new(vec![]).unwrap();
        assert!(router.is_empty());
        assert_eq!(route(&router, "a", "/"), None);
    }
}
