//! End-to-end tests of the `mesh` role: the real binary, a CA made by `phoenix ca`, `phoenix whoami`
//! backends, and real clients (curl, reqwest), all on loopback.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

struct Mesh {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ca: TestCa,
    config: PathBuf,
    addr: SocketAddr,
    proc: Proc,
}

fn start_whoami(dir: &Path, name: &str, port: u16) -> Proc {
    let mut cmd = phoenix();
    cmd.args([
        "whoami",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--name",
        name,
    ]);
    let mut p = Proc::start(&format!("whoami-{name}"), cmd, dir);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), &mut p);
    p
}

/// Writes a mesh topology with `body` appended (services, routes, middlewares) and starts the mesh.
fn start_mesh(extra_mesh: &str, body: &str) -> Mesh {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let ca = TestCa::init(&dir, "phoenix.test");
    ca.issue("mesh.phoenix.test", "mesh");
    let port = free_port();
    let admin = free_port();
    let config = dir.join("phoenix.toml");
    std::fs::write(&config, mesh_file(port, admin, extra_mesh, body)).unwrap();
    let mut cmd = phoenix();
    cmd.arg("mesh").arg("--config").arg(&config);
    let mut proc = Proc::start("mesh", cmd, &dir);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(addr, &mut proc);
    Mesh {
        _tmp: tmp,
        dir,
        ca,
        config,
        addr,
        proc,
    }
}

fn mesh_file(port: u16, admin: u16, extra_mesh: &str, body: &str) -> String {
    format!(
        r#"domain = "phoenix.test"
[mesh]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
tls_cert = "mesh/cert.pem"
tls_key = "mesh/key.pem"
plaintext_networks = ["127.0.0.0/8"]
{extra_mesh}
{body}
"#
    )
}

impl Mesh {
    /// An HTTP/1.1 client that trusts only the CA's root and reaches the mesh by its own name, the way
    /// the gateway does; the Host header picks the route.
    fn client(&self) -> reqwest::Client {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let root = reqwest::Certificate::from_pem(&std::fs::read(self.ca.root()).unwrap()).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root)
            .resolve("mesh.phoenix.test", self.addr)
            .http1_only()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("https://mesh.phoenix.test:{}{path}", self.addr.port())
    }

    async fn get(
        &self,
        client: &reqwest::Client,
        host: &str,
        path: &str,
    ) -> (u16, serde_json::Value) {
        let resp = client
            .get(self.url(path))
            .header("host", host)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_and_strips_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let _a = start_whoami(tmp.path(), "a", pa);
    let _b = start_whoami(tmp.path(), "b", pb);
    let mesh = start_mesh(
        r#"trusted_proxies = ["127.0.0.1/32"]"#,
        &format!(
            r#"
[[service]]
name = "app"
servers = ["http://127.0.0.1:{pa}", "http://127.0.0.1:{pb}"]
[[service]]
name = "other"
servers = ["http://127.0.0.1:{pb}"]
[[route]]
rule = "Host(`api.phoenix.test`) && PathPrefix(`/v1`)"
service = "app"
middlewares = ["strip-v1"]
[[route]]
rule = "Host(`api.phoenix.test`) && Path(`/special`)"
service = "other"
[middleware.strip-v1]
strip_prefix = ["/v1"]
"#
        ),
    );
    let c = mesh.client();

    // The automatic Host(<service>.<domain>) route, balanced over both servers.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (status, body) = mesh.get(&c, "app.phoenix.test", "/hello?x=1").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["path"], "/hello");
        seen.insert(body["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["a", "b"]);

    // Host + PathPrefix with strip-prefix: the backend sees the path without /v1.
    let (status, body) = mesh.get(&c, "API.phoenix.test", "/v1/items").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/items");
    assert_eq!(body["headers"]["x-forwarded-prefix"][0], "/v1");

    // Host + Path to another service.
    let (status, body) = mesh.get(&c, "api.phoenix.test", "/special").await;
    assert_eq!(status, 200);
    assert_eq!(body["name"], "b");

    // No route: 404 with the request id in the body.
    let resp = c
        .get(mesh.url("/nothing"))
        .header("host", "api.phoenix.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(resp.text().await.unwrap().contains(&id));

    // The peer (127.0.0.1) is a trusted proxy: its X-Forwarded-For is kept and extended.
    let resp = c
        .get(mesh.url("/"))
        .header("host", "app.phoenix.test")
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["headers"]["x-forwarded-for"][0],
        "203.0.113.7, 127.0.0.1"
    );
    assert_eq!(body["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(body["host"], "app.phoenix.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peer_forwarding_headers_are_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let p = free_port();
    let _a = start_whoami(tmp.path(), "a", p);
    let mesh = start_mesh(
        r#"trusted_proxies = ["192.0.2.1/32"]"#,
        &format!("[[service]]\nname = \"app\"\nservers = [\"http://127.0.0.1:{p}\"]\n"),
    );
    let resp = mesh
        .client()
        .get(mesh.url("/"))
        .header("host", "app.phoenix.test")
        .header("x-forwarded-for", "203.0.113.7")
        .header("forwarded", "for=203.0.113.7")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["headers"]["x-forwarded-for"][0], "127.0.0.1");
    let forwarded = body["headers"]["forwarded"][0].as_str().unwrap();
    assert!(!forwarded.contains("203.0.113.7"), "{forwarded}");
    assert!(forwarded.contains("for=127.0.0.1"), "{forwarded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_server_is_ejected_and_returns_without_failed_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let _a = start_whoami(tmp.path(), "a", pa);
    let mut b = start_whoami(tmp.path(), "b", pb);
    let mesh = start_mesh(
        "",
        &format!(
            "[[service]]\nname = \"app\"\nservers = [\"http://127.0.0.1:{pa}\", \"http://127.0.0.1:{pb}\"]\nhealth = {{ path = \"/health\", interval = \"1s\", timeout = \"500ms\" }}\n"
        ),
    );
    let c = mesh.client();
    let failures = Arc::new(AtomicUsize::new(0));
    let served_by_b = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (c, url) = (c.clone(), mesh.url("/"));
        let (failures, served_by_b, stop) = (failures.clone(), served_by_b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut total = 0;
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).header("host", "app.phoenix.test").send().await {
                    Ok(r) if r.status() == 200 => {
                        let body: serde_json::Value = r.json().await.unwrap();
                        if body["name"] == "b" {
                            served_by_b.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                total += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            total
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    // Two health intervals after the kill, b must be out of rotation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = served_by_b.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        served_by_b.load(Ordering::Relaxed),
        before,
        "b still served after ejection"
    );

    // b comes back on the same port and returns to rotation within two intervals.
    let _b2 = start_whoami(tmp.path(), "b", pb);
    let deadline = Instant::now() + Duration::from_secs(4);
    while served_by_b.load(Ordering::Relaxed) == before {
        assert!(Instant::now() < deadline, "b never returned to rotation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let total = load.await.unwrap();
    assert!(total > 100, "only {total} requests were sent");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed GETs while a server was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_changes_and_keeps_running_config_on_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = free_port();
    let _a = start_whoami(tmp.path(), "a", p);
    let services = format!("[[service]]\nname = \"app\"\nservers = [\"http://127.0.0.1:{p}\"]\n");
    let mesh = start_mesh("", &services);
    let c = mesh.client();
    assert_eq!(mesh.get(&c, "new.phoenix.test", "/").await.0, 404);

    let original = std::fs::read_to_string(&mesh.config).unwrap();
    let with_route =
        format!("{original}\n[[route]]\nrule = \"Host(`new.phoenix.test`)\"\nservice = \"app\"\n");
    std::fs::write(&mesh.config, &with_route).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.get(&c, "new.phoenix.test", "/").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the new route never appeared:\n{}",
            mesh.proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An invalid file: every problem logged, the running configuration keeps serving.
    std::fs::write(
        &mesh.config,
        format!("{with_route}\n[[route]]\nrule = \"Host(`x`\"\nservice = \"nope\"\n"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..20 {
        assert_eq!(mesh.get(&c, "new.phoenix.test", "/").await.0, 200);
    }
    let log = mesh.proc.log();
    assert!(log.contains("reload rejected"), "{log}");
    assert!(
        log.contains("route[1]"),
        "the log names the bad route:\n{log}"
    );
    let _ = &mesh.dir;
}

#[test]
fn plaintext_backend_outside_trusted_networks_is_refused_before_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = TestCa::init(dir, "phoenix.test");
    ca.issue("mesh.phoenix.test", "mesh");
    let port = free_port();
    let config = dir.join("phoenix.toml");
    let body = "[[service]]\nname = \"app\"\nservers = [\"http://127.0.0.1:8001\"]\n";
    let text = mesh_file(port, free_port(), "", body).replace("127.0.0.0/8", "10.0.0.0/24");
    std::fs::write(&config, text).unwrap();
    for verb in ["mesh", "check"] {
        let out = phoenix()
            .arg(verb)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{verb}: {err}");
        assert!(err.contains("http://127.0.0.1:8001"), "{verb}: {err}");
        assert!(err.contains("10.0.0.0/24"), "{verb}: {err}");
        assert!(
            err.contains("phoenix.toml:"),
            "{verb}: the file position is given: {err}"
        );
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no port was bound"
    );
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut mesh = start_mesh("", "");
    assert!(mesh.proc.terminate().success(), "{}", mesh.proc.log());
}

/// A mesh topology in a fresh directory with one whoami backend, not started yet: what the tests of
/// the worker settings start with different environments.
struct WorkerSetup {
    tmp: tempfile::TempDir,
    ca: TestCa,
    config: PathBuf,
    port: u16,
}

impl WorkerSetup {
    /// The setup, and the backend (stopped when dropped).
    fn new() -> (WorkerSetup, Proc) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let backend = free_port();
        let whoami = start_whoami(dir, "w", backend);
        let ca = TestCa::init(dir, "phoenix.test");
        ca.issue("mesh.phoenix.test", "mesh");
        let port = free_port();
        let config = dir.join("phoenix.toml");
        let body =
            format!("[[service]]\nname = \"app\"\nservers = [\"http://127.0.0.1:{backend}\"]\n");
        std::fs::write(&config, mesh_file(port, free_port(), "", &body)).unwrap();
        let setup = WorkerSetup {
            tmp,
            ca,
            config,
            port,
        };
        (setup, whoami)
    }

    /// `var=value` makes the mesh exit with a message naming `var`, before its port is bound.
    fn refused_before_binding(&self, var: &str, value: &str) {
        let out = phoenix()
            .env(var, value)
            .arg("mesh")
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(err.contains(var), "{var}={value}: {err}");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "{var}={value}: a port was bound"
        );
    }

    /// Starts the mesh with `env` and waits for its port.
    fn start(self, env: &[(&str, &str)]) -> Mesh {
        let dir = self.tmp.path().to_owned();
        let mut cmd = phoenix();
        cmd.envs(env.iter().copied())
            .arg("mesh")
            .arg("--config")
            .arg(&self.config);
        let mut proc = Proc::start("mesh", cmd, &dir);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_for_port(addr, &mut proc);
        Mesh {
            _tmp: self.tmp,
            dir,
            ca: self.ca,
            config: self.config,
            addr,
            proc,
        }
    }
}

/// `PHOENIX_WORKERS` sets how many threads serve the TLS listener (each with its own runtime, see
/// phoenix_proxy::workers); a value that is not a count is refused before any port is bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_the_listener_and_a_bad_count_is_refused_before_binding() {
    let (setup, _whoami) = WorkerSetup::new();
    for bad in ["0", "many", "5000"] {
        setup.refused_before_binding("PHOENIX_WORKERS", bad);
    }
    let mesh = setup.start(&[("PHOENIX_WORKERS", "3")]);
    // Every connection is served, whichever worker accepted it.
    for _ in 0..20 {
        let (status, body) = mesh.get(&mesh.client(), "app.phoenix.test", "/").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["name"], "w");
    }
    let pid = mesh.proc.child.id();
    let mut workers: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("mesh-"))
        .collect();
    workers.sort();
    assert_eq!(workers, ["mesh-0", "mesh-1", "mesh-2"]);
}

/// `PHOENIX_CPU_AFFINITY=cores` pins worker i to the i-th CPU the process may use; a value that is
/// neither `off` nor `cores` is refused before any port is bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_affinity_pins_each_worker_to_a_cpu_and_a_bad_value_is_refused_before_binding() {
    let (setup, _whoami) = WorkerSetup::new();
    setup.refused_before_binding("PHOENIX_CPU_AFFINITY", "sometimes");
    let mesh = setup.start(&[("PHOENIX_CPU_AFFINITY", "cores"), ("PHOENIX_WORKERS", "3")]);
    let (status, _) = mesh.get(&mesh.client(), "app.phoenix.test", "/").await;
    assert_eq!(status, 200);

    // The CPUs this process may use, as the kernel lists them ("0-1", "0,2-3").
    let allowed_of = |status: &str| -> Vec<usize> {
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        list.split(',')
            .flat_map(|range| match range.split_once('-') {
                Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
                None => vec![range.parse().unwrap()],
            })
            .collect()
    };
    let ours = allowed_of(&std::fs::read_to_string("/proc/self/status").unwrap());
    let pid = mesh.proc.child.id();
    let mut pinned: Vec<(String, Vec<usize>)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let path = t.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm"))
                .ok()?
                .trim()
                .to_owned();
            let status = std::fs::read_to_string(path.join("status")).ok()?;
            name.starts_with("mesh-")
                .then(|| (name, allowed_of(&status)))
        })
        .collect();
    pinned.sort();
    let expected: Vec<(String, Vec<usize>)> = (0..3)
        .map(|i| (format!("mesh-{i}"), vec![ours[i % ours.len()]]))
        .collect();
    assert_eq!(pinned, expected);
}

/// `PHOENIX_LOG=trace` with the log beside the topology file: the configuration watcher sees the
/// log change, and its crate logged each event at trace, which changed the log again, without end
/// (55 GB in an hour on a development machine). The watcher's crate now speaks at `warn` unless
/// `PHOENIX_LOG` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_log_beside_the_topology_file_does_not_feed_itself() {
    let (setup, _whoami) = WorkerSetup::new();
    let mesh = setup.start(&[("PHOENIX_LOG", "trace")]);
    let (status, _) = mesh.get(&mesh.client(), "app.phoenix.test", "/").await;
    assert_eq!(status, 200);
    let first = mesh.proc.log().len();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let log = mesh.proc.log();
    let then = log.len();
    assert!(
        !log.contains("notify::inotify"),
        "the watcher's own events are logged"
    );
    // Idle, the mesh writes next to nothing: a loop writes megabytes a second.
    assert!(
        then - first < 64 * 1024,
        "the log grew by {} bytes in 2 s while idle",
        then - first
    );
}
