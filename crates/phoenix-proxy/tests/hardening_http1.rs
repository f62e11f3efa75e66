//! Hostile HTTP/1.1 input against the proxy in both roles, over real TLS on loopback: request
//! smuggling attempts, malformed heads and over-limit requests are written as raw bytes, and each
//! must be answered with a 4xx and the connection closed. A backend that records every request it
//! receives proves that nothing (neither the hostile request nor a request smuggled behind it)
//! reached it.

mod hardening_support;

use std::time::Duration;

use hardening_support::*;
use phoenix_proxy::config::ListenerLimits;

const WAIT: Duration = Duration::from_secs(5);
const HOST: &str = "app.phoenix.test";

/// A request that must be refused. `SMUGGLED` marks the target of any request hidden behind it.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
}

fn case(name: &'static str, head: &str) -> Case {
    Case {
        name,
        bytes: head.as_bytes().to_vec(),
    }
}

/// A request hidden in a body, which a parser that frames the body differently would see as the
/// next request.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: app.phoenix.test\r\n\r\n";

fn hostile_cases() -> Vec<Case> {
    let s = SMUGGLED;
    let h = HOST;
    vec![
        // Transfer-Encoding obfuscation (hyper: only a final `chunked` is accepted).
        case("TE xchunked", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{s}")),
        case("TE chunked, identity", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{s}")),
        case("TE chunked then TE identity", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{s}")),
        case("TE space before colon", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{s}")),
        case("TE vertical tab", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n{s}")),
        case("TE in HTTP/1.0", &format!("POST / HTTP/1.0\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}")),
        case("TE obs-folded", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{s}")),
        // Content-Length.
        case("CL conflicting", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!{s}")),
        case("CL list", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5, 6\r\n\r\nhello!{s}")),
        case("CL plus sign", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: +5\r\n\r\nhello{s}")),
        case("CL negative", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: -1\r\n\r\n{s}")),
        case("CL hex", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 0x5\r\n\r\nhello{s}")),
        case("CL overflow", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 99999999999999999999999\r\n\r\n{s}")),
        // Chunk sizes.
        case("chunk size not hex", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{s}")),
        case("chunk size negative", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n{s}")),
        case("chunk size overflow", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n{s}")),
        case("chunk size 0x prefix", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n{s}")),
        case("chunk data longer than size", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n{s}")),
        // Header syntax.
        case("obs-fold", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Folded: a\r\n b\r\n\r\n{s}")),
        case("NUL in value", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Nul: a\0b\r\n\r\n{s}")),
        case("CR in value", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Cr: a\rb\r\n\r\n{s}")),
        case("LF in value", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Lf: a\nb\r\n\r\n{s}")),
        case("space in header name", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX Bad: a\r\n\r\n{s}")),
        case("header without colon", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nNoColon\r\n\r\n{s}")),
        // Request line and target.
        case("absolute-form", &format!("GET http://{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n{s}")),
        case("absolute-form other host", &format!("GET http://evil.phoenix.test/ HTTP/1.1\r\nHost: {h}\r\n\r\n{s}")),
        case("asterisk-form", &format!("OPTIONS * HTTP/1.1\r\nHost: {h}\r\n\r\n{s}")),
        case("CONNECT authority-form", &format!("CONNECT {h}:443 HTTP/1.1\r\nHost: {h}\r\n\r\n{s}")),
        case("no Host", &format!("GET / HTTP/1.1\r\n\r\n{s}")),
        case("two Hosts", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: evil.phoenix.test\r\n\r\n{s}")),
        case("space in target", &format!("GET /a b HTTP/1.1\r\nHost: {h}\r\n\r\n{s}")),
        case("unknown version", &format!("GET / HTTP/1.2\r\nHost: {h}\r\n\r\n{s}")),
        case("HTTP/0.9", &format!("GET /\r\n\r\n{s}")),
        case("bare CR line ending", &format!("GET / HTTP/1.1\rHost: {h}\r\n\r\n{s}")),
    ]
}

async fn assert_refused(pki: &Pki, addr: std::net::SocketAddr, role: Role, case: &Case) {
    let got = raw_http1(pki, addr, HOST, &case.bytes, WAIT).await;
    let status = got.status.unwrap_or(0);
    assert!(
        (400..500).contains(&status),
        "{role:?} / {}: expected a 4xx, got {:?}: {}",
        case.name,
        got.status,
        got.text
    );
    assert!(
        got.closed,
        "{role:?} / {}: connection left open after {status}",
        case.name
    );
    assert_eq!(
        got.responses(),
        1,
        "{role:?} / {}: more than one response: {}",
        case.name,
        got.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_malformed_requests_get_4xx_close_and_never_reach_the_backend() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    for role in [Role::Gateway, Role::Mesh] {
        let proxy = start_proxy(&pki, role, ListenerLimits::default(), backend.addr).await;
        for case in hostile_cases() {
            assert_refused(&pki, proxy.addr, role, &case).await;
        }
        let seen = backend.requests();
        assert!(
            seen.iter()
                .all(|r| !r.complete || !r.target.contains("smuggled")),
            "{role:?}: a smuggled request reached the backend: {seen:#?}"
        );
        // Requests whose head was valid but whose chunked body was broken may have started
        // upstream; none of them may have completed.
        assert!(
            seen.iter().all(|r| !r.complete),
            "{role:?}: a refused request reached the backend complete: {seen:#?}"
        );
        backend.clear();

        // The same connection machinery still serves a well-formed request end to end.
        let ok = raw_http1(
            &pki,
            proxy.addr,
            HOST,
            format!("GET /control HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            WAIT,
        )
        .await;
        assert_eq!(ok.status, Some(200), "{role:?}: {}", ok.text);
        assert_eq!(backend.requests().len(), 1);
        assert_eq!(backend.requests()[0].target, "/control");
        backend.clear();
    }
}

/// Content-Length together with Transfer-Encoding, in both orders. hyper removes the
/// Content-Length before the proxy sees the request (RFC 9112 section 6.3: Transfer-Encoding
/// wins) and closes the connection after the response, so the body is read as chunked, the next
/// hop gets one unambiguous framing, and the bytes behind the body are never parsed as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_framed_as_chunked_and_the_connection_closed() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    for role in [Role::Gateway, Role::Mesh] {
        let proxy = start_proxy(&pki, role, ListenerLimits::default(), backend.addr).await;
        for head in [
            "Content-Length: 40\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 40",
        ] {
            let bytes = format!(
                "POST /upload HTTP/1.1\r\nHost: {HOST}\r\n{head}\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
            );
            let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
            assert!(got.closed, "{role:?} / {head:?}: connection left open");
            assert_eq!(got.responses(), 1, "{role:?} / {head:?}: {}", got.text);
            let seen = backend.requests();
            assert_eq!(seen.len(), 1, "{role:?} / {head:?}: {seen:#?}");
            assert_eq!(seen[0].target, "/upload");
            assert_eq!(seen[0].body, b"hello");
            assert!(
                seen[0].header("content-length").len() <= 1
                    && seen[0].header("content-length") != ["40"],
                "{role:?}: the client's Content-Length went on: {:?}",
                seen[0].headers
            );
            backend.clear();
        }
        // A repeated identical Content-Length is one length (RFC 9110 section 8.6); it is
        // forwarded once, and the body is exactly that long.
        let bytes = format!(
            "POST /dup HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello{SMUGGLED}"
        );
        let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
        assert_eq!(got.status, Some(200), "{}", got.text);
        let seen = backend.requests();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        assert_eq!(seen[0].header("content-length"), ["5"]);
        assert_eq!(seen[0].body, b"hello");
        backend.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_431_414_413_and_refuse_too_many_headers() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let limits = ListenerLimits {
        max_header_size: 16 * 1024,
        max_headers: 50,
        max_uri_length: 4096,
        max_body_size: Some(1024),
        ..ListenerLimits::default()
    };
    for role in [Role::Gateway, Role::Mesh] {
        let proxy = start_proxy(&pki, role, limits.clone(), backend.addr).await;
        let big_value = "v".repeat(20 * 1024);
        let cases: Vec<(&str, String, u16)> = vec![
            (
                "header block over max_header_size",
                format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {big_value}\r\n\r\n"),
                431,
            ),
            (
                "more than max_headers fields",
                format!(
                    "GET / HTTP/1.1\r\nHost: {HOST}\r\n{}\r\n",
                    (0..60).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
                ),
                431,
            ),
            (
                "request target over max_uri_length",
                format!("GET /{} HTTP/1.1\r\nHost: {HOST}\r\n\r\n", "a".repeat(5000)),
                414,
            ),
            (
                "declared body over max_body_size",
                format!(
                    "POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4096\r\n\r\n{}",
                    "b".repeat(4096)
                ),
                413,
            ),
            (
                "chunked body over max_body_size",
                format!(
                    "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n{}\r\n0\r\n\r\n",
                    "b".repeat(4096)
                ),
                413,
            ),
        ];
        for (name, bytes, want) in cases {
            let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
            assert_eq!(got.status, Some(want), "{role:?} / {name}: {}", got.text);
            assert!(got.closed, "{role:?} / {name}: connection left open");
        }
        assert!(
            backend.requests().iter().all(|r| !r.complete),
            "{role:?}: an over-limit request reached the backend whole: {:#?}",
            backend.requests()
        );
        backend.clear();
    }
}

/// The gateway is reached by the name of the service a client wants, so the Host must be the SNI
/// name the TLS session was made for: anything else is misdirected (421, which browsers answer by
/// opening a new connection). The mesh is reached by its own name and routes by Host, so it
/// serves the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_421_when_host_is_not_the_sni_name_and_the_mesh_routes_by_host() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let gateway = start_proxy(&pki, Role::Gateway, ListenerLimits::default(), backend.addr).await;
    let mesh = start_proxy(&pki, Role::Mesh, ListenerLimits::default(), backend.addr).await;
    let other = "GET /other HTTP/1.1\r\nHost: api.phoenix.test\r\n\r\n";

    let got = raw_http1(
        &pki,
        gateway.addr,
        "app.phoenix.test",
        other.as_bytes(),
        WAIT,
    )
    .await;
    assert_eq!(got.status, Some(421), "{}", got.text);
    assert!(got.closed, "gateway left the connection open after 421");
    assert!(backend.requests().is_empty(), "{:#?}", backend.requests());

    // Same name with a port, other case and a trailing dot: the same host, served.
    let same = "GET /same HTTP/1.1\r\nHost: App.Phoenix.Test.:443\r\nConnection: close\r\n\r\n";
    let got = raw_http1(
        &pki,
        gateway.addr,
        "app.phoenix.test",
        same.as_bytes(),
        WAIT,
    )
    .await;
    assert_eq!(got.status, Some(200), "{}", got.text);

    let got = raw_http1(&pki, mesh.addr, "mesh.phoenix.test", other.as_bytes(), WAIT).await;
    assert_eq!(got.status, Some(200), "{}", got.text);
    let targets: Vec<String> = backend.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/same", "/other"]);
}
