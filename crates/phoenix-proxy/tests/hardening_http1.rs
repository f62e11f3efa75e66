//! Hostile HTTP/1.1 input against the proxy in both roles, over real TLS on loopback: request
//! smuggling attempts, malformed heads and over-limit requests are written as raw bytes, and each
//! must be answered with a 4xx and the connection closed. A backend that records every request it
//! receives proves that nothing (neither the hostile request nor a request smuggled behind it)
//! reached it.

mod hardening_support;

use std::time::Duration;

use hardening_support::*;
use phoenix_proxy::config::ListenerLimits;
use phoenix_proxy::tls::ALPN_HTTP11;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A request line and `Host` for the framing tests.
fn post(target: &str) -> String {
    format!("POST {target} HTTP/1.1\r\nHost: {HOST}\r\n")
}

/// Request heads (with their bodies) whose framing is ambiguous. hyper would normalise each one
/// (Transfer-Encoding wins over Content-Length; two equal lengths are one); we refuse them.
fn ambiguous_requests() -> Vec<(&'static str, String)> {
    vec![
        (
            "CL then TE",
            format!(
                "{}Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                post("/ambiguous")
            ),
        ),
        (
            "TE then CL",
            format!(
                "{}Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                post("/ambiguous")
            ),
        ),
        (
            "CL 5 twice",
            format!(
                "{}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                post("/ambiguous")
            ),
        ),
    ]
}

/// An ambiguous head, to hide inside bodies: a proxy that lost track of where messages end would
/// take it for a request and refuse the wrong one.
fn decoy() -> String {
    format!(
        "{}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        post("/decoy")
    )
}

/// Valid requests, as (name, bytes, target, the body the backend must receive). The first two
/// have bodies that hold a decoy head; the others check that requests are counted the way hyper
/// counts them whatever the exchange looks like.
fn valid_requests() -> Vec<(&'static str, String, &'static str, String)> {
    let decoy = decoy();
    vec![
        (
            "Content-Length body",
            format!(
                "{}Content-Length: {}\r\n\r\n{decoy}",
                post("/with-length"),
                decoy.len()
            ),
            "/with-length",
            decoy.clone(),
        ),
        (
            "chunked body",
            format!(
                "{}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{decoy}\r\n3\r\nend\r\n0\r\n\r\n",
                post("/chunked"),
                decoy.len()
            ),
            "/chunked",
            format!("{decoy}end"),
        ),
        (
            "Expect: 100-continue",
            format!(
                "{}Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
                post("/continue")
            ),
            "/continue",
            "hello".to_owned(),
        ),
        (
            "HEAD",
            format!("HEAD /head HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            "/head",
            String::new(),
        ),
    ]
}

fn assert_refused_with_400(got: &Exchange, what: &str) {
    assert_eq!(got.status, Some(400), "{what}: {}", got.text);
    assert!(got.closed, "{what}: connection left open");
    assert_eq!(got.responses(), 1, "{what}: {}", got.text);
    assert!(
        got.text.to_ascii_lowercase().contains("connection: close"),
        "{what}: {}",
        got.text
    );
}

/// Content-Length together with Transfer-Encoding (in both orders), and a repeated identical
/// Content-Length: hyper would normalise them; the framing scanner (`framing.rs`) makes the
/// proxy refuse them instead (RFC 9112 section 6.3 and RFC 9110 section 8.6 allow both), because
/// a hop that normalises can disagree with another hop's parser. 400, the connection closed, and
/// nothing reaches the backend: neither the request nor what follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_gets_400_and_close_and_never_reaches_the_backend() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    for role in [Role::Gateway, Role::Mesh] {
        let proxy = start_proxy(&pki, role, ListenerLimits::default(), backend.addr).await;
        let cases = ambiguous_requests();
        for (name, request) in &cases {
            let bytes = format!("{request}{SMUGGLED}");
            let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
            assert_refused_with_400(&got, &format!("{role:?} / {name}"));
            let seen = backend.requests();
            assert!(seen.is_empty(), "{role:?} / {name}: {seen:#?}");
        }
        // Refusals are counted like any other answer, so an operator sees the attempts.
        let metrics = proxy.metrics_text();
        let refused = metrics
            .lines()
            .find(|l| l.starts_with("requests_total{") && l.contains("code=\"400\""))
            .unwrap_or_else(|| panic!("{role:?}: no 400 in the metrics:\n{metrics}"));
        assert!(
            refused.ends_with(&format!(" {}", cases.len())),
            "{role:?}: {refused}"
        );
    }
}

/// The ambiguous request comes second on a keep-alive connection, behind a valid request whose
/// body (a length, or chunked) holds a decoy ambiguous head: the first is forwarded with its body
/// intact, the second is refused. Sent in one write (the scanner finds the boundary inside one
/// read) and in two writes with the first response read in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_behind_a_valid_request_is_refused_and_the_first_is_forwarded() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    for role in [Role::Gateway, Role::Mesh] {
        let proxy = start_proxy(&pki, role, ListenerLimits::default(), backend.addr).await;
        for (first_name, first, target, body) in valid_requests() {
            for (name, ambiguous) in ambiguous_requests() {
                let what = format!("{role:?} / {first_name} / {name}");

                // One write.
                let bytes = format!("{first}{ambiguous}{SMUGGLED}");
                let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
                let interim = got.text.matches("HTTP/1.1 100 ").count();
                assert_eq!(got.responses(), 2 + interim, "{what}: {}", got.text);
                assert_eq!(
                    got.text.matches("HTTP/1.1 200 ").count(),
                    1,
                    "{what}: {}",
                    got.text
                );
                let second = &got.text[got.text.rfind("HTTP/1.1 ").unwrap()..];
                assert!(second.starts_with("HTTP/1.1 400 "), "{what}: {}", got.text);
                assert!(got.closed, "{what}: connection left open");
                assert_forwarded_once(&backend, target, &body, &what);

                // Two writes.
                let mut tls = tls_connect(&pki, proxy.addr, HOST, ALPN_HTTP11).await;
                let got = exchange(&mut tls, first.as_bytes(), !first.starts_with("HEAD ")).await;
                assert_eq!(got.status, Some(200), "{what}: {}", got.text);
                assert!(!got.closed, "{what}: closed after the valid request");
                let got =
                    exchange(&mut tls, format!("{ambiguous}{SMUGGLED}").as_bytes(), true).await;
                assert_refused_with_400(&got, &what);
                assert_forwarded_once(&backend, target, &body, &what);
            }
        }
    }
}

fn assert_forwarded_once(backend: &Recorder, target: &str, body: &str, what: &str) {
    let seen = backend.requests();
    assert_eq!(seen.len(), 1, "{what}: {seen:#?}");
    assert_eq!(seen[0].target, target, "{what}");
    assert!(seen[0].complete, "{what}: {seen:#?}");
    assert_eq!(String::from_utf8_lossy(&seen[0].body), body, "{what}");
    backend.clear();
}

/// Valid requests written in one go (their bodies holding decoy heads) are all forwarded, in
/// order, each with its body; and a chunked body with chunk extensions and trailer fields is
/// still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_chunked_requests_with_extensions_and_trailers_are_forwarded() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    for role in [Role::Gateway, Role::Mesh] {
        let proxy = start_proxy(&pki, role, ListenerLimits::default(), backend.addr).await;
        let valid = valid_requests();
        let last = format!("GET /last HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
        let bytes = format!("{}{}{last}", valid[0].1, valid[1].1);
        let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
        assert_eq!(got.responses(), 3, "{role:?}: {}", got.text);
        assert_eq!(got.text.matches("HTTP/1.1 200 ").count(), 3, "{}", got.text);
        assert!(got.closed, "{role:?}: Connection: close not honoured");
        let seen = backend.requests();
        let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, [valid[0].2, valid[1].2, "/last"], "{role:?}");
        assert_eq!(String::from_utf8_lossy(&seen[0].body), valid[0].3);
        assert_eq!(String::from_utf8_lossy(&seen[1].body), valid[1].3);
        assert!(seen.iter().all(|r| r.complete), "{seen:#?}");
        backend.clear();

        let bytes = format!(
            "{}Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nConnection: close\r\n\r\n\
             5;name=value;quoted=\"a b\"\r\nhello\r\n6 ;x\r\n world\r\n0;last\r\n\
             X-Checksum: 1234\r\nX-Other: v\r\n\r\n",
            post("/extensions")
        );
        let got = raw_http1(&pki, proxy.addr, HOST, bytes.as_bytes(), WAIT).await;
        assert_eq!(got.status, Some(200), "{role:?}: {}", got.text);
        let seen = backend.requests();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        assert_eq!(seen[0].target, "/extensions");
        assert_eq!(seen[0].body, b"hello world");
        assert!(seen[0].complete);
        backend.clear();
    }
}

/// Writes `bytes` on an open connection and reads one complete final response (or until the
/// server closes, or `WAIT` passes). `has_body` is false for the answer to a HEAD request.
async fn exchange(tls: &mut Tls, bytes: &[u8], has_body: bool) -> Exchange {
    let _ = tls.write_all(bytes).await;
    let _ = tls.flush().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    let closed = loop {
        if response_complete(&out, has_body) {
            break false;
        }
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    // A response that asked to close is followed by the close; wait for it.
    let closed = closed
        || (String::from_utf8_lossy(&out)
            .to_ascii_lowercase()
            .contains("connection: close")
            && matches!(
                tokio::time::timeout(WAIT, tls.read(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            ));
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = status_of(final_response(&text));
    Exchange {
        status,
        text,
        closed,
    }
}

/// The response text after any interim (1xx) responses.
fn final_response(mut text: &str) -> &str {
    while text.starts_with("HTTP/1.1 1") {
        match text.find("\r\n\r\n") {
            Some(end) => text = &text[end + 4..],
            None => break,
        }
    }
    text
}

/// Whether `bytes` hold a whole final response with a Content-Length or chunked body.
fn response_complete(bytes: &[u8], has_body: bool) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let text = final_response(&text);
    if text.starts_with("HTTP/1.1 1") {
        return false;
    }
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    if !has_body {
        return true;
    }
    let head = text[..end].to_ascii_lowercase();
    let body = &text[end + 4..];
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with("0\r\n\r\n");
    }
    true
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

/// The header-read timeout covers request heads, from their first byte (for the first head: from
/// the connection's start) or from the end of the previous exchange; the idle timeout covers the
/// wait between requests. (hyper's own header timer also ran between requests, so an idle
/// keep-alive connection was cut at the shorter header-read timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_are_cut_at_the_header_read_timeout_and_idle_connections_at_the_idle_timeout() {
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let limits = ListenerLimits {
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(3),
        ..ListenerLimits::default()
    };
    let proxy = start_proxy(&pki, Role::Mesh, limits, backend.addr).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    // Each case returns how long after its last write the server cut the connection.
    let connect = || tls_connect(&pki, proxy.addr, HOST, ALPN_HTTP11);

    let kept_alive = async {
        let mut tls = connect().await;
        let got = exchange(&mut tls, get("/one").as_bytes(), true).await;
        assert_eq!(got.status, Some(200), "{}", got.text);
        // Longer than the header-read timeout, shorter than the idle timeout.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let got = exchange(&mut tls, get("/two").as_bytes(), true).await;
        assert_eq!(got.status, Some(200), "kept-alive connection: {}", got.text);
        assert!(!got.closed);
        cut_after(&mut tls).await
    };
    let slow_first_head = async {
        let mut tls = connect().await;
        tls.write_all(b"GET /slow HTTP/1.1\r\nHost: app.ph")
            .await
            .unwrap();
        cut_after(&mut tls).await
    };
    let slow_second_head = async {
        let mut tls = connect().await;
        let got = exchange(&mut tls, get("/first").as_bytes(), true).await;
        assert_eq!(got.status, Some(200), "{}", got.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
        tls.write_all(b"GET /slow HTTP/1.1\r\nHost: app.ph")
            .await
            .unwrap();
        cut_after(&mut tls).await
    };
    // The slow head is written together with a complete request, so it begins while that
    // request is in flight: its time starts when the response is done.
    let slow_pipelined_head = async {
        let mut tls = connect().await;
        let bytes = format!("{}GET /slow HTTP/1.1\r\nHost: app.ph", get("/first"));
        tls.write_all(bytes.as_bytes()).await.unwrap();
        cut_after(&mut tls).await
    };
    let (kept_alive, slow_first_head, slow_second_head, slow_pipelined_head) = tokio::join!(
        kept_alive,
        slow_first_head,
        slow_second_head,
        slow_pipelined_head
    );
    let idle = Duration::from_secs(3);
    assert!(
        kept_alive >= idle - Duration::from_millis(200) && kept_alive < idle * 2,
        "idle connection closed after {kept_alive:?}, want about {idle:?}"
    );
    for (name, took) in [
        ("first head", slow_first_head),
        ("head after a request", slow_second_head),
        ("head behind a request in flight", slow_pipelined_head),
    ] {
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(2000),
            "slow {name} cut after {took:?}, want about 500 ms (and well under the idle timeout)"
        );
    }
    let targets: Vec<String> = backend.requests().into_iter().map(|r| r.target).collect();
    assert!(!targets.iter().any(|t| t == "/slow"), "{targets:?}");
}

/// How long after now the server closes the connection (at most 8 s, or the test fails).
async fn cut_after(tls: &mut Tls) -> Duration {
    let started = tokio::time::Instant::now();
    assert!(closed_within(tls, Duration::from_secs(8)).await);
    started.elapsed()
}

/// Reads until the server closes the connection (true) or `wait` passes (false).
async fn closed_within(tls: &mut Tls, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}
