//! Routing through the public API: the issue's example configuration, requests taken from real
//! `http::Request`s (HTTP/1.1 Host header with port, HTTP/2 absolute URI), sharing a router between
//! threads, and a seeded random test that checks the router (with its host index) against a plain
//! priority-ordered scan and the parser's error columns against the rule's length.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Request};
use phoenix_proxy::router::{Router, RouterEntry};
use phoenix_proxy::rule::{default_priority, RequestView, Rule};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the proxy does before routing: lowercase host without port, from Host or the authority.
fn host_of(parts: &http::request::Parts) -> String {
    let raw = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    let without_port = match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => &raw[..],
    };
    without_port.to_ascii_lowercase()
}

fn route<'r, T>(router: &'r Router<T>, req: &Request<()>, client_ip: IpAddr) -> Option<&'r T> {
    let (parts, ()) = req.clone().into_parts();
    let host = host_of(&parts);
    let view = RequestView {
        method: &parts.method,
        host: &host,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        client_ip,
    };
    router.route(&view)
}

fn entry<T>(rule: &str, priority: Option<i64>, target: T) -> RouterEntry<T> {
    RouterEntry {
        rule: rule.to_owned(),
        priority,
        target,
    }
}

#[test]
fn the_issue_example_routes_by_host_and_path() {
    // [[route]] rule = "Host(`api.phoenix.test`) && PathPrefix(`/v1`)" and the automatic route of
    // service "app" under domain phoenix.test.
    let router = Router::new(vec![
        entry(
            "Host(`api.phoenix.test`) && PathPrefix(`/v1`)",
            None,
            "api-v1",
        ),
        entry("Host(`app.phoenix.test`)", None, "app"),
        entry(
            "Host(`api.phoenix.test`) && Method(`POST`) && Path(`/v1/admin`)",
            Some(1),
            "admin",
        ),
    ])
    .unwrap();
    let ip = IpAddr::from([127, 0, 0, 1]);
    let get = |uri: &str, host: &str| Request::get(uri).header("host", host).body(()).unwrap();

    assert_eq!(
        route(
            &router,
            &get("/v1/users?page=2", "api.phoenix.test:9443"),
            ip
        ),
        Some(&"api-v1")
    );
    assert_eq!(
        route(&router, &get("/v1", "API.phoenix.test"), ip),
        Some(&"api-v1")
    );
    assert_eq!(
        route(&router, &get("/v2/users", "api.phoenix.test"), ip),
        None
    );
    assert_eq!(
        route(&router, &get("/anything", "app.phoenix.test:443"), ip),
        Some(&"app")
    );
    assert_eq!(route(&router, &get("/v1", "other.phoenix.test"), ip), None);
    // Explicit priority 1 loses to the longer default priority of the first route.
    let post = Request::post("/v1/admin")
        .header("host", "api.phoenix.test")
        .body(())
        .unwrap();
    assert_eq!(route(&router, &post, ip), Some(&"api-v1"));

    // HTTP/2: no Host header, the authority is in the URI.
    let h2 = Request::get("https://app.phoenix.test:9443/x")
        .version(http::Version::HTTP_2)
        .body(())
        .unwrap();
    assert_eq!(route(&router, &h2, ip), Some(&"app"));
}

#[test]
fn grpc_and_websocket_requests_can_be_told_apart() {
    let router = Router::new(vec![
        entry(
            "Host(`q.test`) && HeaderRegexp(`Content-Type`, `^application/grpc`)",
            None,
            "grpc",
        ),
        entry(
            "Host(`q.test`) && Header(`Upgrade`, `websocket`)",
            None,
            "ws",
        ),
        entry("Host(`q.test`)", None, "rest"),
    ])
    .unwrap();
    let ip = IpAddr::from([10, 0, 0, 1]);
    let grpc = Request::post("/qdrant.Points/Search")
        .header("host", "q.test")
        .header("content-type", "application/grpc+proto")
        .body(())
        .unwrap();
    assert_eq!(route(&router, &grpc, ip), Some(&"grpc"));
    let ws = Request::get("/ws")
        .header("host", "q.test")
        .header("upgrade", "websocket")
        .body(())
        .unwrap();
    assert_eq!(route(&router, &ws, ip), Some(&"ws"));
    let rest = Request::get("/collections")
        .header("host", "q.test")
        .body(())
        .unwrap();
    assert_eq!(route(&router, &rest, ip), Some(&"rest"));
}

#[test]
fn a_router_is_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Router<Arc<String>>>();
    assert_send_sync::<Rule>();

    let router = Arc::new(
        Router::new(
            (0..200)
                .map(|i| {
                    entry(
                        &format!("Host(`s{i}.test`) && PathPrefix(`/p{i}`)"),
                        None,
                        Arc::new(format!("t{i}")),
                    )
                })
                .collect(),
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let router = router.clone();
            std::thread::spawn(move || {
                for i in (t..200).step_by(4) {
                    let req = Request::get(format!("/p{i}/x"))
                        .header("host", format!("s{i}.test"))
                        .body(())
                        .unwrap();
                    let got = route(&router, &req, IpAddr::from([127, 0, 0, 1]))
                        .map(|s| s.as_str().to_owned());
                    assert_eq!(got, Some(format!("t{i}")));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------
// Seeded random rules: a fuzz run that fits in `cargo test` on stable.

const HOSTS: &[&str] = &[
    "a.test", "b.test", "A.Test", "*.test", "**.test", "c.a.test", "x.test.",
];
const PATHS: &[&str] = &["/", "/api", "/api/x", "/v1/users", "/x.png"];

fn atom(rng: &mut StdRng) -> String {
    let pick = |rng: &mut StdRng, list: &[&str]| list[rng.random_range(0..list.len())].to_owned();
    match rng.random_range(0..11) {
        0 => format!("Host(`{}`)", pick(rng, HOSTS)),
        1 => format!("Host(`{}`, `{}`)", pick(rng, HOSTS), pick(rng, HOSTS)),
        2 => format!(
            "HostRegexp(`{}`)",
            pick(rng, &[r"^a\.", r"test$", r"^[bc]\."])
        ),
        3 => format!("Path(`{}`)", pick(rng, PATHS)),
        4 => format!("PathPrefix(`{}`)", pick(rng, PATHS)),
        5 => format!(
            "PathRegexp(`{}`)",
            pick(rng, &[r"\.png$", "^/api", "[0-9]"])
        ),
        6 => format!("Method(`{}`)", pick(rng, &["GET", "post"])),
        7 => format!("Header(`X-Env`, `{}`)", pick(rng, &["prod", "dev"])),
        8 => format!("Query(`q`{})", pick(rng, &["", ", `1`", ", `a b`"])),
        9 => format!(
            "ClientIP(`{}`)",
            pick(rng, &["10.0.0.0/8", "::1", "192.168.1.1"])
        ),
        _ => format!("QueryRegexp(`q`, `{}`)", pick(rng, &["^[0-9]+$", "b"])),
    }
}

fn expr(rng: &mut StdRng, depth: u32) -> String {
    if depth == 0 || rng.random_bool(0.35) {
        return atom(rng);
    }
    match rng.random_range(0..4) {
        0 => format!("{} && {}", expr(rng, depth - 1), expr(rng, depth - 1)),
        1 => format!("{} || {}", expr(rng, depth - 1), expr(rng, depth - 1)),
        2 => format!("!{}", expr(rng, depth - 1)),
        _ => format!("({})", expr(rng, depth - 1)),
    }
}

struct Sample {
    method: Method,
    host: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    headers: HeaderMap,
    ip: IpAddr,
}

fn samples() -> Vec<Sample> {
    let mut out = Vec::new();
    let hosts = ["a.test", "b.test", "c.a.test", "x.test", "a.test.", "other"];
    let queries = [None, Some("q=1"), Some("q=a+b"), Some("x=1&q")];
    let ips = [
        IpAddr::from([10, 0, 0, 1]),
        IpAddr::from([192, 168, 1, 1]),
        "::1".parse().unwrap(),
    ];
    for (i, host) in hosts.iter().enumerate() {
        for (j, path) in PATHS.iter().enumerate() {
            let mut headers = HeaderMap::new();
            if (i + j) % 2 == 0 {
                headers.insert("x-env", "prod".parse().unwrap());
            }
            out.push(Sample {
                method: if j % 2 == 0 {
                    Method::GET
                } else {
                    Method::POST
                },
                host,
                path,
                query: queries[(i + j) % queries.len()],
                headers,
                ip: ips[(i * 3 + j) % ips.len()],
            });
        }
    }
    out
}

fn view(s: &Sample) -> RequestView<'_> {
    RequestView {
        method: &s.method,
        host: s.host,
        path: s.path,
        query: s.query,
        headers: &s.headers,
        client_ip: s.ip,
    }
}

#[test]
fn random_routers_agree_with_a_plain_priority_scan() {
    let mut rng = StdRng::seed_from_u64(0x9e37_79b9);
    let samples = samples();
    for round in 0..150 {
        let count = rng.random_range(1..12);
        let rules: Vec<(String, Option<i64>)> = (0..count)
            .map(|_| {
                (
                    expr(&mut rng, 3),
                    rng.random_bool(0.3).then(|| rng.random_range(-5..60)),
                )
            })
            .collect();
        let router = Router::new(
            rules
                .iter()
                .enumerate()
                .map(|(i, (r, p))| entry(r, *p, i))
                .collect(),
        )
        .unwrap_or_else(|e| panic!("round {round}: generated rules must parse: {e:?}"));

        // Reference: sort by effective priority, descending, stable; first rule that matches.
        let mut reference: Vec<(usize, i64, Rule)> = rules
            .iter()
            .enumerate()
            .map(|(i, (r, p))| {
                (
                    i,
                    p.unwrap_or_else(|| default_priority(r)),
                    Rule::parse(r).unwrap(),
                )
            })
            .collect();
        reference.sort_by_key(|(_, p, _)| std::cmp::Reverse(*p));
        for s in &samples {
            let want = reference
                .iter()
                .find(|(_, _, rule)| rule.matches(&view(s)))
                .map(|(i, _, _)| *i);
            assert_eq!(
                router.route(&view(s)).copied(),
                want,
                "round {round}, rules {rules:#?}, host {}",
                s.host
            );
        }
    }
}

#[test]
fn mangled_rules_never_panic_and_errors_point_inside_the_rule() {
    let mut rng = StdRng::seed_from_u64(7);
    let noise = [
        '(', ')', '`', '"', '!', '&', '|', ',', ' ', 'H', '\\', 'é', '*', '.', '/',
    ];
    let (mut ok, mut errors) = (0, 0);
    for _ in 0..3000 {
        let mut chars: Vec<char> = expr(&mut rng, 3).chars().collect();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..=chars.len());
            match rng.random_range(0..3) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 => chars.insert(at, noise[rng.random_range(0..noise.len())]),
                _ => chars.truncate(at),
            }
        }
        let source: String = chars.iter().collect();
        match Rule::parse(&source) {
            Ok(rule) => {
                ok += 1;
                for s in &samples() {
                    let _ = rule.matches(&view(s));
                }
            }
            Err(e) => {
                errors += 1;
                assert!(
                    e.column >= 1 && e.column <= chars.len() + 1,
                    "{source:?}: {e}"
                );
                assert!(!e.message.is_empty());
            }
        }
    }
    // Both paths were exercised.
    assert!(ok > 100 && errors > 1000, "ok {ok}, errors {errors}");
}
