//! End-to-end tests of the proxy engine: a real TLS listener on loopback, certificates made here with
//! rcgen (one root, leaves signed by it), `phoenix_proxy::whoami` as the backend, and real clients
//! (reqwest trusting only the test root, hyper's HTTP/2 client over tokio-rustls, tokio-tungstenite,
//! curl).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use phoenix_proxy::admin;
use phoenix_proxy::config::{
    ListenerLimits, MiddlewareConfig, RouteConfig, RoutingConfig, ServerConfig, ServiceConfig,
};
use phoenix_proxy::metrics::Metrics;
use phoenix_proxy::proxy::{Proxy, ProxySettings};
use phoenix_proxy::table::{BuildContext, RouteTable};
use phoenix_proxy::tls::{self, CertResolver};
use phoenix_proxy::upstream::UpstreamContext;
use phoenix_proxy::whoami;
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const HOSTS: &[&str] = &[
    "mesh.phoenix.test",
    "app.phoenix.test",
    "api.phoenix.test",
    "docs.phoenix.test",
    "grpc.phoenix.test",
];

fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

// ---------------------------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------------------------

struct Pki {
    root: CertifiedIssuer<'static, KeyPair>,
}

struct Leaf {
    chain_pem: String,
    key_pem: String,
    key: Arc<CertifiedKey>,
}

impl Pki {
    fn new(cn: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { root }
    }

    fn root_pem(&self) -> String {
        self.root.pem()
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        Arc::new(tls::roots_from_pem(&self.root_pem()).unwrap())
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.root).unwrap();
        let chain_pem = format!("{}{}", cert.pem(), self.root.pem());
        let key_pem = key.serialize_pem();
        let certified = tls::certified_key_from_pem(&chain_pem, &key_pem).unwrap();
        Leaf {
            chain_pem,
            key_pem,
            key: certified,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backends and the mesh under test
// ---------------------------------------------------------------------------------------------

struct Backend {
    addr: SocketAddr,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn backend(name: &str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    tokio::spawn(whoami::serve(listener, name.to_owned(), token.clone()));
    Backend {
        addr,
        _shutdown: token.drop_guard(),
    }
}

fn service(name: &str, urls: &[String]) -> ServiceConfig {
    ServiceConfig {
        name: name.to_owned(),
        servers: urls.iter().map(|u| ServerConfig::Url(u.clone())).collect(),
        load_balancer: Default::default(),
        health: None,
        timeout: None,
        tls_root: None,
        tls_server_name: None,
        tls_insecure_skip_verify: false,
        retries: 2,
    }
}

fn route(rule: &str, service: &str, middlewares: &[&str]) -> RouteConfig {
    RouteConfig {
        name: None,
        rule: rule.to_owned(),
        service: service.to_owned(),
        priority: None,
        middlewares: middlewares.iter().map(|m| m.to_string()).collect(),
    }
}

/// A loopback address with nothing listening: bound, noted, closed.
async fn unused_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

fn loopback() -> Vec<ipnet::IpNet> {
    vec!["127.0.0.0/8".parse().unwrap()]
}

fn build_ctx<'a>(nets: &'a [ipnet::IpNet], previous: Option<&'a RouteTable>) -> BuildContext<'a> {
    BuildContext {
        plaintext_networks: nets,
        upstream: UpstreamContext {
            internal_roots: None,
            connect_timeout: Duration::from_secs(2),
            default_timeout: Duration::from_secs(10),
            client_cert: None,
        },
        previous,
    }
}

#[derive(Default)]
struct MeshOptions {
    limits: ListenerLimits,
    trusted_proxies: Vec<ipnet::IpNet>,
    client_auth: Option<Arc<rustls::RootCertStore>>,
    allowed_client_names: Vec<String>,
}

struct Mesh {
    addr: SocketAddr,
    admin: SocketAddr,
    proxy: Arc<Proxy>,
    resolver: Arc<CertResolver>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_mesh(pki: &Pki, routing: &RoutingConfig, opts: MeshOptions) -> Mesh {
    install_provider();
    let nets = loopback();
    let table = RouteTable::build(routing, &build_ctx(&nets, None)).expect("valid routing");
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let resolver = CertResolver::new();
    resolver.set_default(
        pki.leaf(&["mesh.phoenix.test", "app.phoenix.test", "*.phoenix.test"])
            .key,
    );
    metrics.watch_certificates(&resolver);
    let settings = ProxySettings {
        limits: opts.limits,
        trusted_proxies: opts.trusted_proxies,
        access_log: true,
        allowed_client_names: opts.allowed_client_names,
        role: "mesh",
        require_host_matches_sni: false,
    };
    let proxy = Proxy::new(settings, table, metrics);
    let server_config = tls::server_config(resolver.clone(), opts.client_auth);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(
        proxy
            .clone()
            .serve_tls(listener, server_config, shutdown.clone()),
    );

    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let health_proxy = proxy.clone();
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(registry),
        Arc::new(move || health_proxy.health()),
        shutdown.clone(),
    ));
    Mesh {
        addr,
        admin,
        proxy,
        resolver,
        shutdown,
        served,
    }
}

fn client_builder(pki: &Pki, mesh: SocketAddr) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.root_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(20));
    for host in HOSTS {
        builder = builder.resolve(host, mesh);
    }
    builder
}

fn client(pki: &Pki, mesh: SocketAddr) -> reqwest::Client {
    client_builder(pki, mesh).build().unwrap()
}

fn url(host: &str, mesh: SocketAddr, path: &str) -> String {
    format!("https://{host}:{}{path}", mesh.port())
}

/// First value of a header as whoami saw it.
fn seen_header<'a>(json: &'a Value, name: &str) -> Option<&'a str> {
    let values = json["headers"].get(name).or_else(|| {
        json["headers"]
            .as_object()?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })?;
    match values {
        Value::Array(items) => items.first()?.as_str(),
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn seen_header_all(json: &Value, name: &str) -> Vec<String> {
    match json["headers"].get(name) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

async fn basic_routing(app: &Backend, api: &Backend, docs: &Backend) -> RoutingConfig {
    let mut middlewares = BTreeMap::new();
    middlewares.insert(
        "strip-v1".to_owned(),
        MiddlewareConfig {
            strip_prefix: Some(vec!["/v1".to_owned()]),
            ..Default::default()
        },
    );
    RoutingConfig {
        domain: Some("phoenix.test".to_owned()),
        services: vec![
            service("app", &[format!("http://{}", app.addr)]),
            service("api", &[format!("http://{}", api.addr)]),
            service("docs", &[format!("http://{}", docs.addr)]),
        ],
        routes: vec![
            route(
                "Host(`api.phoenix.test`) && PathPrefix(`/v1`)",
                "api",
                &["strip-v1"],
            ),
            route("PathPrefix(`/docs`)", "docs", &[]),
        ],
        middlewares,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_and_combined_rules_over_tls() {
    let pki = Pki::new("Routing Test Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions::default(),
    )
    .await;
    let c = client(&pki, mesh.addr);

    // Automatic Host(<service>.<domain>) route, over HTTP/2 (ALPN).
    let resp = c
        .get(url("app.phoenix.test", mesh.addr, "/hello?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["name"], "app");
    assert_eq!(json["path"], "/hello");
    // HTTP/2 carries the host in :authority; the HTTP/1.1 backend still gets it as Host.
    assert_eq!(
        json["host"],
        format!("app.phoenix.test:{}", mesh.addr.port())
    );

    // Host && PathPrefix with strip-prefix middleware.
    let json: Value = c
        .get(url("api.phoenix.test", mesh.addr, "/v1/items"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["name"], "api");
    assert_eq!(json["path"], "/items");
    assert_eq!(seen_header(&json, "x-forwarded-prefix"), Some("/v1"));

    // Path-only rule on a host with no route of its own.
    let json: Value = c
        .get(url("mesh.phoenix.test", mesh.addr, "/docs/a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["name"], "docs");

    // api host outside /v1: the combined rule does not match, the automatic Host(api...) route of
    // service "api" does, without the strip-prefix middleware.
    let json: Value = c
        .get(url("api.phoenix.test", mesh.addr, "/v2/items"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["name"], "api");
    assert_eq!(json["path"], "/v2/items");

    // A host with no route of its own and a path no rule matches.
    let resp = c
        .get(url("mesh.phoenix.test", mesh.addr, "/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = resp.text().await.unwrap();
    assert!(
        body.starts_with("no route for mesh.phoenix.test/other"),
        "{body}"
    );
    assert!(body.contains(&id), "request id {id} missing from {body}");

    // HTTP/1.1 through curl, which resolves the name to the listener itself.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, pki.root_pem()).unwrap();
    let out = tokio::process::Command::new("curl")
        .arg("-sS")
        .arg("--http1.1")
        .args(["--tlsv1.2", "--tls-max", "1.2"])
        .arg("--cacert")
        .arg(&root)
        .arg("--resolve")
        .arg(format!("app.phoenix.test:{}:127.0.0.1", mesh.addr.port()))
        .arg(url("app.phoenix.test", mesh.addr, "/via-curl"))
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["name"], "app");
    assert_eq!(json["path"], "/via-curl");
    assert_eq!(seen_header(&json, "x-forwarded-proto"), Some("https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_generated_or_kept_and_echoed() {
    let pki = Pki::new("Request Id Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions::default(),
    )
    .await;
    let c = client(&pki, mesh.addr);

    let resp = c
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .send()
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32);
    assert!(generated.chars().all(|c| c.is_ascii_hexdigit()));
    let json: Value = resp.json().await.unwrap();
    assert_eq!(seen_header(&json, "x-request-id"), Some(generated.as_str()));

    let resp = c
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    let json: Value = resp.json().await.unwrap();
    assert_eq!(seen_header(&json, "x-request-id"), Some("trace-abc-123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_replaced_from_untrusted_and_appended_from_trusted_peers() {
    let pki = Pki::new("Forwarding Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let routing = basic_routing(&app, &api, &docs).await;

    let forged = |rb: reqwest::RequestBuilder| {
        rb.header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "evil.test")
            .header("forwarded", "for=6.6.6.6;proto=http")
            .header("connection", "x-hop")
            .header("x-hop", "must not pass")
    };

    // Nobody trusted: what the client claims is replaced.
    let mesh = start_mesh(&pki, &routing, MeshOptions::default()).await;
    let c = client_builder(&pki, mesh.addr)
        .http1_only()
        .build()
        .unwrap();
    let json: Value = forged(c.get(url("app.phoenix.test", mesh.addr, "/")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen_header_all(&json, "x-forwarded-for"),
        vec!["127.0.0.1".to_owned()]
    );
    assert_eq!(seen_header(&json, "x-forwarded-proto"), Some("https"));
    let host = format!("app.phoenix.test:{}", mesh.addr.port());
    assert_eq!(seen_header(&json, "x-forwarded-host"), Some(host.as_str()));
    assert_eq!(
        seen_header(&json, "forwarded").unwrap(),
        format!("for=127.0.0.1;proto=https;host=\"{host}\"")
    );
    assert_eq!(
        seen_header(&json, "x-hop"),
        None,
        "header named in Connection leaked: {json}"
    );
    assert_eq!(
        json["host"].as_str().unwrap().to_ascii_lowercase(),
        host,
        "Host must pass through"
    );
    drop(mesh);

    // Loopback trusted: the chain is extended and the original proto/host kept.
    let opts = MeshOptions {
        trusted_proxies: loopback(),
        ..Default::default()
    };
    let mesh = start_mesh(&pki, &routing, opts).await;
    let c = client(&pki, mesh.addr);
    let json: Value = forged(c.get(url("app.phoenix.test", mesh.addr, "/")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen_header(&json, "x-forwarded-for"),
        Some("6.6.6.6, 127.0.0.1")
    );
    assert_eq!(seen_header(&json, "x-forwarded-proto"), Some("http"));
    assert_eq!(seen_header(&json, "x-forwarded-host"), Some("evil.test"));
    let forwarded = seen_header(&json, "forwarded").unwrap();
    assert!(
        forwarded.starts_with("for=6.6.6.6;proto=http, for=127.0.0.1;proto=https"),
        "{forwarded}"
    );
}

/// A POST with forged forwarding fields, hop-by-hop fields and ordinary ones.
fn forged_post(client: &reqwest::Client, mesh: &Mesh) -> reqwest::RequestBuilder {
    client
        .post(url("app.phoenix.test", mesh.addr, "/p?q=1"))
        .header("x-forwarded-for", "203.0.113.9, 10.0.0.2")
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", "outer.test")
        .header("forwarded", "for=203.0.113.9;proto=http")
        .header("x-request-id", "same-id")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eA==")
        .header("x-custom", "a")
        .header("cookie", "b=2")
        .body("four")
}

/// HTTP/1.1 requests to a route without middleware take the plain path, which writes the
/// upstream head from the request's bytes; HTTP/2 requests take the header-map path. The backend
/// must see the same fields either way, from an untrusted and from a trusted peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_header_map_paths_forward_the_same_fields() {
    let pki = Pki::new("Plain Path Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let routing = basic_routing(&app, &api, &docs).await;
    for trusted in [false, true] {
        let opts = MeshOptions {
            trusted_proxies: if trusted { loopback() } else { Vec::new() },
            ..Default::default()
        };
        let mesh = start_mesh(&pki, &routing, opts).await;
        let (mut seen, mut answered) = (Vec::new(), Vec::new());
        // The same requests to the same backend reached over h2c: a plain request's fields go into
        // its header map there.
        let h2c_routing = RoutingConfig {
            services: vec![service("app", &[format!("h2c://{}", app.addr)])],
            routes: Vec::new(),
            ..routing.clone()
        };
        let h2c_mesh = start_mesh(
            &pki,
            &h2c_routing,
            MeshOptions {
                trusted_proxies: if trusted { loopback() } else { Vec::new() },
                ..Default::default()
            },
        )
        .await;
        for (client, version) in [
            (
                client_builder(&pki, mesh.addr)
                    .http1_only()
                    .build()
                    .unwrap(),
                reqwest::Version::HTTP_11,
            ),
            (client(&pki, mesh.addr), reqwest::Version::HTTP_2),
        ] {
            let resp = forged_post(&client, &mesh).send().await.unwrap();
            assert_eq!(resp.version(), version);
            assert_eq!(resp.headers()["x-request-id"], "same-id");
            if version == reqwest::Version::HTTP_11 {
                let over_h2c: Value = forged_post(&client, &h2c_mesh)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(over_h2c["version"], "HTTP/2.0", "{over_h2c}");
                seen.push(over_h2c["headers"].clone());
            }
            // The response's fields, as the client got them (the date may tick between the two).
            let mut fields: Vec<(String, String)> = resp
                .headers()
                .iter()
                .filter(|(name, _)| *name != "date")
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            fields.sort();
            answered.push(fields);
            let json: Value = resp.json().await.unwrap();
            assert_eq!(json["body_bytes"], 4, "{json}");
            seen.push(json["headers"].clone());
        }
        // HTTP/1.1 in and h2c out (which carries the host as :authority, and whose mesh has another
        // port), HTTP/1.1 in and out, HTTP/2 in and HTTP/1.1 out.
        let without_host = |fields: &Value| {
            let mut fields = fields.as_object().unwrap().clone();
            fields.remove("host");
            fields.remove("x-forwarded-host");
            fields.remove("forwarded");
            fields
        };
        let [over_h2c, plain, by_map] = &seen[..] else {
            panic!("three requests were made")
        };
        assert_eq!(plain, by_map, "trusted: {trusted}");
        assert_eq!(
            without_host(plain),
            without_host(over_h2c),
            "trusted: {trusted}"
        );
        assert_eq!(answered[0], answered[1], "trusted: {trusted}");
        assert!(
            answered[0].iter().any(|(n, _)| n == "content-type"),
            "{:?}",
            answered[0]
        );
        let fields = plain.as_object().unwrap();
        assert!(fields.get("keep-alive").is_none(), "{fields:?}");
        assert!(fields.get("proxy-authorization").is_none(), "{fields:?}");
        assert_eq!(fields["x-custom"], serde_json::json!(["a"]));
        let expected_xff = if trusted {
            "203.0.113.9, 10.0.0.2, 127.0.0.1"
        } else {
            "127.0.0.1"
        };
        assert_eq!(fields["x-forwarded-for"], serde_json::json!([expected_xff]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_502_and_504_with_request_id() {
    let pki = Pki::new("Errors Root");
    let app = backend("app").await;
    let closed = unused_port().await;
    let mut slow = service("slow", &[format!("http://{}", app.addr)]);
    slow.timeout = Some(Duration::from_millis(300));
    let mut down = service("down", &[format!("http://{closed}")]);
    down.retries = 0;
    let routing = RoutingConfig {
        domain: Some("phoenix.test".to_owned()),
        services: vec![slow, down],
        routes: vec![
            route("PathPrefix(`/delay`)", "slow", &[]),
            route("PathPrefix(`/down`)", "down", &[]),
        ],
        middlewares: BTreeMap::new(),
    };
    let mesh = start_mesh(&pki, &routing, MeshOptions::default()).await;
    let c = client(&pki, mesh.addr);

    let resp = c
        .get(url("mesh.phoenix.test", mesh.addr, "/down"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = resp.text().await.unwrap();
    assert_eq!(body, format!("upstream unreachable\nrequest id: {id}\n"));

    // whoami's /delay/2 answers after 2 s; the service allows 300 ms.
    let started = Instant::now();
    let resp = c
        .get(url("mesh.phoenix.test", mesh.addr, "/delay/2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "504 after {took:?}"
    );
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = resp.text().await.unwrap();
    assert_eq!(body, format!("upstream timeout\nrequest id: {id}\n"));

    // The same service answers fast requests: the 504 came from the timeout.
    let resp = c
        .get(url("mesh.phoenix.test", mesh.addr, "/delay/0"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// The `retry` middleware sends a failed request again after a back-off that doubles, until its
/// attempts are used: a server that starts listening while the request waits is reached. A route
/// without it answers 502 at once, and a timeout is not tried again (it used the request's time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reaches_a_server_that_comes_up_and_does_not_repeat_a_timeout() {
    let pki = Pki::new("Retry Root");
    let app = backend("app").await;
    // Nothing listens there until the server below binds it.
    let late = unused_port().await;
    let mut late_service = service("late", &[format!("http://{late}")]);
    late_service.retries = 0;
    let mut slow = service("slow", &[format!("http://{}", app.addr)]);
    slow.timeout = Some(Duration::from_millis(300));
    let again = MiddlewareConfig {
        retry: Some(phoenix_proxy::config::RetryConfig {
            attempts: 5,
            initial_interval: Duration::from_millis(100),
        }),
        ..MiddlewareConfig::default()
    };
    let routing = RoutingConfig {
        domain: Some("phoenix.test".to_owned()),
        services: vec![late_service, slow],
        routes: vec![
            route("PathPrefix(`/retried`)", "late", &["again"]),
            route("PathPrefix(`/once`)", "late", &[]),
            route("PathPrefix(`/delay`)", "slow", &["again"]),
        ],
        middlewares: BTreeMap::from([("again".to_owned(), again)]),
    };
    let mesh = start_mesh(&pki, &routing, MeshOptions::default()).await;
    let c = client(&pki, mesh.addr);
    let get = |path: &str| c.get(url("mesh.phoenix.test", mesh.addr, path)).send();

    let started = Instant::now();
    assert_eq!(get("/once").await.unwrap().status(), 502);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "no back-off without retry"
    );

    // Attempts at 0, 100 and 300 ms (waits of 100, then 200): the server is up from 250 ms.
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let listener = TcpListener::bind(late).await.unwrap();
        whoami::serve(listener, "late".to_owned(), token).await
    });
    let started = Instant::now();
    let resp = get("/retried/x").await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["name"], "late");
    assert!(
        took >= Duration::from_millis(250),
        "answered after {took:?}"
    );

    let started = Instant::now();
    assert_eq!(get("/delay/2").await.unwrap().status(), 504);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "one 300 ms attempt, not five: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_while_the_backend_is_still_writing() {
    let pki = Pki::new("SSE Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions::default(),
    )
    .await;
    let c = client(&pki, mesh.addr);

    let started = Instant::now();
    let resp = c
        .get(url(
            "app.phoenix.test",
            mesh.addr,
            "/sse?count=5&interval=400",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    let mut first = None;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if first.is_none() && !chunk.is_empty() {
            first = Some(started.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let total = started.elapsed();
    let first = first.expect("at least one chunk");
    assert_eq!(text.matches("data:").count(), 5, "{text}");
    assert!(
        total >= Duration::from_millis(1600),
        "stream ended after {total:?}"
    );
    assert!(
        first < Duration::from_millis(900),
        "first event after {first:?}, stream ended after {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let pki = Pki::new("WebSocket Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions::default(),
    )
    .await;

    let tls = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"http/1.1"], None)
        .await
        .unwrap();
    let ws_url = url("app.phoenix.test", mesh.addr, "/ws").replace("https://", "wss://");
    let (mut ws, resp) = tokio_tungstenite::client_async(ws_url, tls)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("hello through the mesh"))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::text("hello through the mesh"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.unwrap();
}

/// A TLS connection to the mesh trusting only the test root.
async fn tls_connect(
    pki: &Pki,
    mesh: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
    client_cert: Option<Arc<CertifiedKey>>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    install_provider();
    let config = tls::client_config(pki.roots(), alpn, client_cert);
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(mesh).await?;
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2_tls_to_h2c_backend_keeps_trailers_and_streams() {
    let pki = Pki::new("gRPC Root");
    let app = backend("grpc").await;
    let routing = RoutingConfig {
        domain: Some("phoenix.test".to_owned()),
        services: vec![service("grpc", &[format!("h2c://{}", app.addr)])],
        routes: vec![],
        middlewares: BTreeMap::new(),
    };
    let mesh = start_mesh(&pki, &routing, MeshOptions::default()).await;

    let tls = tls_connect(&pki, mesh.addr, "grpc.phoenix.test", &[b"h2"], None)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);

    // Streaming call: send one message, read its echo, then send the next on the same stream.
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(4);
    let body = phoenix_proxy::body::boxed(StreamBody::new(Box::pin(tokio_stream_from(rx))));
    let req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "https://grpc.phoenix.test:{}/echo.Echo/Stream",
            mesh.addr.port()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    tx.send(Ok(hyper::body::Frame::data(grpc_frame(b"first"))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        frame.into_data().unwrap(),
        grpc_frame(b"first"),
        "first echo arrives before the request ends"
    );
    tx.send(Ok(hyper::body::Frame::data(grpc_frame(b"second"))))
        .await
        .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), grpc_frame(b"second"));
    drop(tx); // end of the request stream
    let mut trailers = None;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
    {
        let frame = frame.unwrap();
        if frame.is_trailers() {
            trailers = Some(frame.into_trailers().unwrap());
        }
    }
    let trailers = trailers.expect("grpc trailers");
    assert_eq!(trailers["grpc-status"], "0");

    // Unary call on the same connection.
    let req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "https://grpc.phoenix.test:{}/echo.Echo/Unary",
            mesh.addr.port()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(phoenix_proxy::body::full(grpc_frame(b"unary")))
        .unwrap();
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers on unary call");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), grpc_frame(b"unary"));
}

/// A `Stream` over an mpsc receiver (tokio-stream is not a dependency).
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_under_load_fail_no_request() {
    let pki = Pki::new("Reload Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let routing = basic_routing(&app, &api, &docs).await;
    let mesh = start_mesh(&pki, &routing, MeshOptions::default()).await;
    let c = client(&pki, mesh.addr);
    let c1 = client_builder(&pki, mesh.addr)
        .http1_only()
        .build()
        .unwrap();

    let stop = CancellationToken::new();
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (c, stop, ok, failed) = (
            if w % 2 == 0 { c.clone() } else { c1.clone() },
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        let (host, path, name) = match w {
            0 | 1 => ("app.phoenix.test", "/load", "app"),
            _ => ("api.phoenix.test", "/v1/load", "api"),
        };
        let target = url(host, mesh.addr, path);
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match c.get(&target).send().await {
                    Ok(resp) if resp.status() == 200 => match resp.json::<Value>().await {
                        Ok(json) if json["name"] == name => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(json) => failed.lock().unwrap().push(format!("wrong backend {json}")),
                        Err(e) => failed.lock().unwrap().push(format!("body: {e}")),
                    },
                    Ok(resp) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", resp.status())),
                    Err(e) => failed.lock().unwrap().push(format!("error {e}")),
                }
            }
        }));
    }

    let nets = loopback();
    for i in 0..200 {
        // Alternate the services' settings so that every reload builds new services (fresh pools)
        // while requests on the old ones are still in flight.
        let mut cfg = routing.clone();
        for s in &mut cfg.services {
            s.retries = 1 + (i % 2);
        }
        let current = mesh.proxy.table();
        let table = RouteTable::build(&cfg, &build_ctx(&nets, Some(&current))).unwrap();
        drop(current);
        mesh.proxy.reload(table);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 100,
        "only {} requests during the reloads",
        ok.load(Ordering::Relaxed)
    );
}

#[test]
fn plaintext_backend_outside_plaintext_networks_is_refused() {
    let routing = RoutingConfig {
        domain: Some("phoenix.test".to_owned()),
        services: vec![
            service("near", &["http://127.0.0.1:8001".to_owned()]),
            service("far", &["h2c://10.1.1.1:80".to_owned()]),
        ],
        routes: vec![],
        middlewares: BTreeMap::new(),
    };
    let nets = loopback();
    let problems = RouteTable::build(&routing, &build_ctx(&nets, None)).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let message = problems[0].to_string();
    assert!(message.contains("service \"far\""), "{message}");
    assert!(message.contains("h2c://10.1.1.1:80"), "{message}");
    assert!(
        message.contains("outside plaintext_networks [127.0.0.0/8]"),
        "{message}"
    );
    assert!(
        problems[0]
            .hint
            .as_deref()
            .unwrap_or("")
            .contains("https://"),
        "{:?}",
        problems[0].hint
    );
}

fn peer_cert_der(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("tls info")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_swap_keeps_open_connections_and_serves_new_handshakes() {
    let pki = Pki::new("Swap Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions::default(),
    )
    .await;

    let old = client_builder(&pki, mesh.addr)
        .tls_info(true)
        .build()
        .unwrap();
    let resp = old
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .send()
        .await
        .unwrap();
    let first_cert = peer_cert_der(&resp);
    resp.bytes().await.unwrap();

    let replacement = pki.leaf(&["app.phoenix.test"]);
    let new_der = replacement.key.cert[0].to_vec();
    assert_ne!(first_cert, new_der);
    mesh.resolver
        .set("app.phoenix.test", replacement.key.clone());

    // The open (HTTP/2) connection carries on with the certificate it was established with.
    let resp = old
        .get(url("app.phoenix.test", mesh.addr, "/again"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        peer_cert_der(&resp),
        first_cert,
        "the open connection was replaced"
    );

    // A new handshake sees the new certificate.
    let fresh = client_builder(&pki, mesh.addr)
        .tls_info(true)
        .build()
        .unwrap();
    let resp = fresh
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(peer_cert_der(&resp), new_der);
    // Other names still get the default certificate.
    let resp = fresh
        .get(url("api.phoenix.test", mesh.addr, "/v1/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(peer_cert_der(&resp), first_cert);

    // Files written by another tool load the same way.
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("mesh.crt"), dir.path().join("mesh.key"));
    std::fs::write(&crt, &replacement.chain_pem).unwrap();
    std::fs::write(&key, &replacement.key_pem).unwrap();
    let loaded = tls::load_certified_key(&crt, &key).unwrap();
    assert_eq!(loaded.cert.len(), 2);
    assert_eq!(loaded.cert[0].to_vec(), new_der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_from_the_root_with_an_allowed_name() {
    let pki = Pki::new("mTLS Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let opts = MeshOptions {
        client_auth: Some(pki.roots()),
        allowed_client_names: vec!["gateway.phoenix.test".to_owned()],
        ..Default::default()
    };
    let mesh = start_mesh(&pki, &basic_routing(&app, &api, &docs).await, opts).await;

    let with_identity = |key: Option<Arc<CertifiedKey>>| {
        let config = tls::client_config(pki.roots(), &[b"h2", b"http/1.1"], key);
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls((*config).clone())
            .timeout(Duration::from_secs(10));
        for host in HOSTS {
            b = b.resolve(host, mesh.addr);
        }
        b.build().unwrap()
    };

    // No client certificate: the handshake is refused.
    let err = with_identity(None)
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    // A certificate from another root: refused as well.
    let stranger = Pki::new("Stranger Root").leaf(&["gateway.phoenix.test"]);
    let result = with_identity(Some(stranger.key))
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .send()
        .await;
    assert!(
        result.is_err(),
        "certificate of a foreign root accepted: {result:?}"
    );

    // Chains to the root and carries an allowed name.
    let gateway = pki.leaf(&["gateway.phoenix.test"]);
    let resp = with_identity(Some(gateway.key))
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["name"], "app");

    // Chains to the root, but the name is not on the allow-list.
    let intruder = pki.leaf(&["intruder.phoenix.test"]);
    let resp = with_identity(Some(intruder.key))
        .get(url("app.phoenix.test", mesh.addr, "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body = resp.text().await.unwrap();
    assert!(body.starts_with("client certificate not allowed"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_closes_slow_clients() {
    let pki = Pki::new("Slow Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let limits = ListenerLimits {
        header_read_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions {
            limits,
            ..Default::default()
        },
    )
    .await;

    // After the handshake, a request head that never ends.
    let mut tls = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"http/1.1"], None)
        .await
        .unwrap();
    let started = Instant::now();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert!(
        !String::from_utf8_lossy(&buf).contains(" 200 "),
        "{}",
        String::from_utf8_lossy(&buf)
    );

    // Before the handshake: a TCP connection that never sends a ClientHello.
    let mut tcp = TcpStream::connect(mesh.addr).await.unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_concurrent_connections() {
    let pki = Pki::new("Cap Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let limits = ListenerLimits {
        max_connections: 2,
        ..Default::default()
    };
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions {
            limits,
            ..Default::default()
        },
    )
    .await;

    let first = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"http/1.1"], None)
        .await
        .unwrap();
    let second = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"http/1.1"], None)
        .await
        .unwrap();
    // The third is not accepted while two are open: its handshake gets no answer.
    let third = tokio::time::timeout(
        Duration::from_millis(700),
        tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"http/1.1"], None),
    )
    .await;
    assert!(
        third.is_err(),
        "a third connection was served while the cap is 2"
    );
    drop(first);
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"http/1.1"], None),
    )
    .await
    .expect("served once a slot is free")
    .unwrap();
    let mut third = third;
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_get_413() {
    let pki = Pki::new("Body Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let limits = ListenerLimits {
        max_body_size: Some(1000),
        ..Default::default()
    };
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions {
            limits,
            ..Default::default()
        },
    )
    .await;
    let c = client(&pki, mesh.addr);

    let resp = c
        .post(url("app.phoenix.test", mesh.addr, "/upload"))
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(resp.text().await.unwrap().contains(&id));

    let resp = c
        .post(url("app.phoenix.test", mesh.addr, "/upload"))
        .body(vec![b'x'; 900])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Without Content-Length (a stream): the backend reads the whole body before answering, so the
    // proxy cuts the stream at the limit before any response and answers 413 itself.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 500]))),
    );
    let resp = c
        .post(url("app.phoenix.test", mesh.addr, "/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert!(resp
        .text()
        .await
        .unwrap()
        .starts_with("request body too large"));

    // A streamed body within the limit passes whole.
    let chunks = futures_util::stream::iter(
        (0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 300]))),
    );
    let resp = c
        .post(url("app.phoenix.test", mesh.addr, "/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["body_bytes"], 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_serves_metrics_after_traffic_and_health_json() {
    let pki = Pki::new("Admin Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions::default(),
    )
    .await;
    let c = client(&pki, mesh.addr);
    for _ in 0..3 {
        assert_eq!(
            c.get(url("app.phoenix.test", mesh.addr, "/"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(
        c.get(url("mesh.phoenix.test", mesh.addr, "/nothing"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let admin = reqwest::Client::new();
    let metrics = admin
        .get(format!("http://{}/metrics", mesh.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains(r#"requests_total{role="mesh",route="app@auto",service="app",code="200"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"requests_total{role="mesh",route="",service="",code="404"} 1"#),
        "{text}"
    );
    assert!(text.contains("request_duration_seconds_bucket"), "{text}");
    assert!(
        text.contains(&format!(
            r#"upstream_up{{service="app",server="http://{}"}} 1"#,
            app.addr
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"tls_certificate_not_after_seconds{name="default"}"#),
        "{text}"
    );
    assert!(text.contains("connections_open"), "{text}");

    let health = admin
        .get(format!("http://{}/health", mesh.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["content-type"], "application/json");
    let json: Value = health.json().await.unwrap();
    assert_eq!(json["role"], "mesh");
    let names: Vec<&str> = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["api", "app", "docs"]);
    assert_eq!(json["services"][1]["servers"][0]["healthy"], true);

    assert_eq!(
        admin
            .get(format!("http://{}/other", mesh.admin))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_stops_the_listener() {
    let pki = Pki::new("Drain Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let limits = ListenerLimits {
        drain_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let mut mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions {
            limits,
            ..Default::default()
        },
    )
    .await;
    let c = client(&pki, mesh.addr);
    // A request in flight when shutdown starts still completes.
    let slow = tokio::spawn({
        let c = c.clone();
        let u = url("app.phoenix.test", mesh.addr, "/delay/0.5");
        async move { c.get(u).send().await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    mesh.shutdown.cancel();
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    let served = (&mut mesh.served).await.unwrap();
    assert!(served.is_ok());
    assert!(
        TcpStream::connect(mesh.addr).await.is_err(),
        "listener still open after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_tls_alpn_challenge_certificate_is_served_only_for_acme_tls_1() {
    let pki = Pki::new("ACME Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions::default(),
    )
    .await;
    let challenge = pki.leaf(&["app.phoenix.test"]);
    let challenge_der = challenge.key.cert[0].to_vec();

    // No challenge installed: an acme-tls/1 handshake is refused rather than given the real cert.
    let refused = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"acme-tls/1"], None).await;
    assert!(
        refused.is_err(),
        "acme-tls/1 handshake without a challenge certificate succeeded"
    );

    mesh.resolver
        .set_challenge("app.phoenix.test", challenge.key.clone());
    let mut tls = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"acme-tls/1"], None)
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    assert_eq!(
        session.peer_certificates().unwrap()[0].to_vec(),
        challenge_der
    );
    // RFC 8737: nothing but the handshake; the server closes the connection.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), tls.read_to_end(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");

    // Regular handshakes for the same name keep the regular certificate.
    let tls = tls_connect(
        &pki,
        mesh.addr,
        "app.phoenix.test",
        &[b"h2", b"http/1.1"],
        None,
    )
    .await
    .unwrap();
    assert_ne!(
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        challenge_der
    );

    mesh.resolver.clear_challenge("app.phoenix.test");
    let refused = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"acme-tls/1"], None).await;
    assert!(
        refused.is_err(),
        "challenge certificate still served after clear_challenge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_after_the_idle_timeout() {
    let pki = Pki::new("Idle Root");
    let (app, api, docs) = (
        backend("app").await,
        backend("api").await,
        backend("docs").await,
    );
    let limits = ListenerLimits {
        idle_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let mesh = start_mesh(
        &pki,
        &basic_routing(&app, &api, &docs).await,
        MeshOptions {
            limits,
            ..Default::default()
        },
    )
    .await;
    let tls = tls_connect(&pki, mesh.addr, "app.phoenix.test", &[b"h2"], None)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);

    // A streaming response longer than the idle timeout keeps the connection: it is not idle.
    let req = http::Request::builder()
        .uri(format!(
            "https://app.phoenix.test:{}/sse?count=3&interval=300",
            mesh.addr.port()
        ))
        .body(phoenix_proxy::body::empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body).matches("data:").count(), 3);

    // Then, with nothing in flight, the server closes it (GOAWAY) after about 400 ms.
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(
        closed.is_ok(),
        "idle HTTP/2 connection still open after 3 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed after {:?}",
        started.elapsed()
    );
}
