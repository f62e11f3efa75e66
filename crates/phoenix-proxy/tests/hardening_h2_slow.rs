//! HTTP/2 abuse and slow clients against the proxy over real TLS on loopback: rapid reset
//! (CVE-2023-44487), CONTINUATION floods, header-list and concurrent-stream limits, `:authority`
//! that disagrees with SNI at the gateway, a thousand clients sending their request head one
//! byte at a time, and a client that stops reading a large response. HTTP/2 frames are written by
//! hand so the tests can send what no well-behaved client library would.
// A std mutex guard is held across awaits on purpose: it only orders whole tests, each of which
// runs on its own runtime, so nothing else on that runtime waits for it.
#![allow(clippy::await_holding_lock)]

mod hardening_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hardening_support::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_proxy::config::ListenerLimits;
use phoenix_proxy::tls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const HOST: &str = "app.phoenix.test";

/// The tests of this file run one at a time: the memory test reads the resident size of the whole
/// process, which the thousand slow clients or a flood running beside it would inflate.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/2 frame writer and reader (RFC 9113 section 4)
// ---------------------------------------------------------------------------------------------

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman (RFC 7541 section 6.2.2).
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// `method` (GET or POST), `:scheme https`, `:path`, `:authority` as a header block.
fn request_block(post: bool, path: &str, authority: &str) -> Vec<u8> {
    let mut out = vec![if post { 0x83 } else { 0x82 }, 0x87];
    // :path, literal without indexing, indexed name 4.
    hpack_int(&mut out, 0x00, 4, 4);
    hpack_int(&mut out, 0, 7, path.len());
    out.extend_from_slice(path.as_bytes());
    // :authority, indexed name 1.
    hpack_int(&mut out, 0x00, 4, 1);
    hpack_int(&mut out, 0, 7, authority.len());
    out.extend_from_slice(authority.as_bytes());
    out
}

struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().unwrap()))
    }
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[3],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// What the server did on an HTTP/2 connection while the client wrote.
#[derive(Debug, Default)]
struct Seen {
    goaway: Option<u32>,
    resets: Vec<(u32, u32)>,
    response_heads: usize,
    max_concurrent_streams: Option<u32>,
    closed: bool,
}

/// Reads frames until GOAWAY, EOF or `wait`.
async fn observe<R: AsyncRead + Unpin>(r: &mut R, wait: Duration) -> Seen {
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, read_frame(r)).await {
            Err(_) => return seen,
            Ok(Err(_)) => {
                seen.closed = true;
                return seen;
            }
            Ok(Ok(f)) => match f.kind {
                GOAWAY => {
                    seen.goaway = f.error_code();
                    // The server closes after GOAWAY; keep reading to see it.
                }
                RST_STREAM => seen.resets.push((f.stream, f.error_code().unwrap_or(0))),
                HEADERS => seen.response_heads += 1,
                SETTINGS if seen.max_concurrent_streams.is_none() => {
                    for setting in f.payload.chunks_exact(6) {
                        if u16::from_be_bytes([setting[0], setting[1]]) == 0x3 {
                            seen.max_concurrent_streams =
                                Some(u32::from_be_bytes(setting[2..6].try_into().unwrap()));
                        }
                    }
                }
                _ => {}
            },
        }
    }
}

async fn h2_connect(pki: &Pki, addr: std::net::SocketAddr, sni: &str) -> Tls {
    let mut tls = tls_connect(pki, addr, sni, tls::ALPN_H2).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(tls::ALPN_H2),
        "h2 not negotiated"
    );
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    tls
}

/// A normal HTTPS request through the proxy, as reqwest makes it; returns the time it took.
async fn normal_request(pki: &Pki, addr: std::net::SocketAddr) -> Duration {
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.root_pem().as_bytes()).unwrap())
        .resolve(HOST, addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = Instant::now();
    let resp = client
        .get(format!("https://{HOST}:{}/normal", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 abuse
// ---------------------------------------------------------------------------------------------

/// CVE-2023-44487: streams opened and reset at once cost the server work while never counting
/// against the concurrent-stream limit. The connection must be cut with GOAWAY
/// ENHANCE_YOUR_CALM long before the attacker is done, few of the requests may reach the
/// backend, and other clients are served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_cut_off_and_other_clients_are_served() {
    let _serial = serial();
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let proxy = start_proxy(&pki, Role::Gateway, ListenerLimits::default(), backend.addr).await;
    let tls = h2_connect(&pki, proxy.addr, HOST).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let observer = tokio::spawn(async move { observe(&mut rd, Duration::from_secs(10)).await });

    const STREAMS: u32 = 20_000;
    let block = request_block(false, "/rapid", HOST);
    let mut written = 0;
    for batch in 0..STREAMS / 100 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            let id = 2 * (batch * 100 + i) + 1;
            bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
            bytes.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
        written += 100;
    }
    let seen = observer.await.unwrap();
    assert_eq!(
        seen.goaway,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM after {written} rapid resets: {seen:?}"
    );
    assert!(seen.closed, "connection still open after GOAWAY");
    let reached = backend.requests().len();
    assert!(
        reached < 1000,
        "{reached} of {written} reset requests reached the backend"
    );
    let took = normal_request(&pki, proxy.addr).await;
    assert!(
        took < Duration::from_secs(2),
        "a normal request took {took:?}"
    );
}

/// CONTINUATION flood (2024, VU#421644): a header block that never ends must not be buffered
/// without bound; the connection is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_continuation_flood_is_cut_off() {
    let _serial = serial();
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let proxy = start_proxy(&pki, Role::Gateway, ListenerLimits::default(), backend.addr).await;
    let tls = h2_connect(&pki, proxy.addr, HOST).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let observer = tokio::spawn(async move { observe(&mut rd, Duration::from_secs(10)).await });

    wr.write_all(&frame(
        HEADERS,
        END_STREAM,
        1,
        &request_block(false, "/flood", HOST),
    ))
    .await
    .unwrap();
    let mut piece = Vec::new();
    hpack_literal(&mut piece, "x-flood", &"f".repeat(100));
    let mut sent = 0usize;
    // 100 MiB offered in total; the server must stop us long before.
    while sent < 100 << 20 {
        let mut bytes = Vec::new();
        for _ in 0..100 {
            bytes.extend(frame(CONTINUATION, 0, 1, &piece));
        }
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
        sent += bytes.len();
    }
    let seen = observer.await.unwrap();
    assert!(
        seen.goaway.is_some() && seen.closed,
        "connection not cut after {sent} bytes of CONTINUATION: {seen:?}"
    );
    assert!(sent < 100 << 20, "the server took all {sent} bytes");
    assert!(backend.requests().is_empty());
    normal_request(&pki, proxy.addr).await;
}

/// A header list over `max_header_size` is refused on its stream, and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_header_list_over_the_limit_is_refused() {
    let _serial = serial();
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let limits = ListenerLimits {
        max_header_size: 16 * 1024,
        ..ListenerLimits::default()
    };
    let proxy = start_proxy(&pki, Role::Mesh, limits, backend.addr).await;
    let tls = h2_connect(&pki, proxy.addr, HOST).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut block = request_block(false, "/big-headers", HOST);
    for i in 0..40 {
        hpack_literal(&mut block, &format!("x-h{i}"), &"v".repeat(1000));
    }
    // 40 KB of headers: HEADERS + CONTINUATION frames within the default 16 KiB frame size.
    let mut chunks = block.chunks(16 * 1024).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last { END_HEADERS } else { 0 } | if first { END_STREAM } else { 0 };
        let kind = if first { HEADERS } else { CONTINUATION };
        wr.write_all(&frame(kind, flags, 1, chunk)).await.unwrap();
        first = false;
    }
    let seen = observe(&mut rd, Duration::from_secs(3)).await;
    let refused = seen.resets.iter().any(|(id, _)| *id == 1)
        || seen.goaway.is_some()
        || seen.response_heads == 1;
    assert!(refused, "oversized header list not refused: {seen:?}");
    assert!(backend.requests().is_empty(), "{:#?}", backend.requests());
}

/// The server announces a concurrent-stream limit and refuses streams beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_beyond_the_announced_limit_are_refused() {
    let _serial = serial();
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let proxy = start_proxy(&pki, Role::Mesh, ListenerLimits::default(), backend.addr).await;
    let tls = h2_connect(&pki, proxy.addr, HOST).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    // POSTs whose bodies never come stay open.
    let block = request_block(true, "/open", HOST);
    let mut bytes = Vec::new();
    for i in 0..300u32 {
        bytes.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
    }
    wr.write_all(&bytes).await.unwrap();
    let seen = observe(&mut rd, Duration::from_secs(3)).await;
    let limit = seen
        .max_concurrent_streams
        .expect("server SETTINGS announce MAX_CONCURRENT_STREAMS");
    assert!((1..=256).contains(&limit), "limit {limit}");
    let refused = seen
        .resets
        .iter()
        .filter(|(_, code)| *code == REFUSED_STREAM || *code == 0x1)
        .count();
    assert!(
        refused >= 300 - limit as usize || seen.goaway.is_some(),
        "only {refused} of {} streams over the limit {limit} refused: {seen:?}",
        300 - limit
    );
    drop(wr);
}

/// HTTP/2 `:authority` at the gateway must be the SNI name, as `Host` must in HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_other_than_sni_gets_421_at_the_gateway_only() {
    let _serial = serial();
    let pki = Pki::new();
    let backend = Recorder::start().await;
    for (role, want) in [(Role::Gateway, 421), (Role::Mesh, 200)] {
        let proxy = start_proxy(&pki, role, ListenerLimits::default(), backend.addr).await;
        let tls = tls_connect(&pki, proxy.addr, HOST, tls::ALPN_H2).await;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        for (authority, status) in [("api.phoenix.test", want), (HOST, 200)] {
            let req = http::Request::get(format!("https://{authority}/h2"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), status, "{role:?} :authority {authority}");
            resp.into_body().collect().await.unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------------------------

/// Slowloris: 1000 connections each sending its request head one byte at a time. The header-read
/// timeout closes them, and meanwhile a normal client is served without delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_byte_at_a_time_clients_do_not_delay_a_normal_one() {
    let _serial = serial();
    let pki = Arc::new(Pki::new());
    let backend = Recorder::start().await;
    let limits = ListenerLimits {
        header_read_timeout: Duration::from_secs(3),
        ..ListenerLimits::default()
    };
    let proxy = start_proxy(&pki, Role::Gateway, limits, backend.addr).await;
    let addr = proxy.addr;
    let baseline = normal_request(&pki, addr).await;

    const SLOW: usize = 1000;
    let connected = Arc::new(tokio::sync::Semaphore::new(0));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(50));
    let mut tasks = Vec::new();
    for _ in 0..SLOW {
        let (pki, connected, handshakes) = (pki.clone(), connected.clone(), handshakes.clone());
        tasks.push(tokio::spawn(async move {
            let permit = handshakes.acquire().await.unwrap();
            let mut tls = tls_connect(&pki, addr, HOST, tls::ALPN_HTTP11).await;
            drop(permit);
            connected.add_permits(1);
            let started = Instant::now();
            let head = format!(
                "GET /slow HTTP/1.1\r\nHost: {HOST}\r\nX-Pad: {}\r\n\r\n",
                "p".repeat(200)
            );
            for byte in head.as_bytes() {
                if tls.write_all(&[*byte]).await.is_err() || tls.flush().await.is_err() {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("a slow client sent its whole head without being cut");
        }));
    }
    // All slow clients are connected and dribbling.
    let _all = connected.acquire_many(SLOW as u32).await.unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        worst = worst.max(normal_request(&pki, addr).await);
    }
    assert!(
        worst < Duration::from_secs(1) + baseline * 4,
        "normal requests took up to {worst:?} (baseline {baseline:?}) with {SLOW} slow clients"
    );
    let mut latest_cut = Duration::ZERO;
    for t in tasks {
        latest_cut = latest_cut.max(t.await.unwrap());
    }
    assert!(
        latest_cut < Duration::from_secs(10),
        "slow clients were held for {latest_cut:?} with a 3s header-read timeout"
    );
    assert!(
        backend.requests().iter().all(|r| r.target != "/slow"),
        "a slow head was forwarded"
    );
}

/// A client that asks for 200 MiB and stops reading: back-pressure stops the backend too, so
/// neither the proxy nor the backend buffers the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_large_response_does_not_hold_memory() {
    let _serial = serial();
    let pki = Pki::new();
    let backend = Recorder::start().await;
    let proxy = start_proxy(&pki, Role::Gateway, ListenerLimits::default(), backend.addr).await;
    for alpn in [tls::ALPN_HTTP11, tls::ALPN_H2] {
        backend.produced.store(0, Ordering::Relaxed);
        let rss_before = rss_kib();
        let mut tls = tls_connect(&pki, proxy.addr, HOST, alpn).await;
        if alpn == tls::ALPN_HTTP11 {
            let head = format!("GET /big?mib=200 HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
            tls.write_all(head.as_bytes()).await.unwrap();
        } else {
            tls.write_all(PREFACE).await.unwrap();
            tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
            let block = request_block(false, "/big?mib=200", HOST);
            tls.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
                .await
                .unwrap();
        }
        let mut first = [0u8; 1024];
        let n = tls.read(&mut first).await.unwrap();
        assert!(n > 0);
        // Stop reading; give the proxy time to buffer if it would.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let produced = backend.produced.load(Ordering::Relaxed);
        let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
        assert!(
            produced < 40 << 20,
            "{alpn:?}: the backend produced {} MiB for a client that read 1 KiB",
            produced >> 20
        );
        assert!(
            grown_mib < 64,
            "{alpn:?}: memory grew by {grown_mib} MiB for a stalled client (backend produced {} MiB)",
            produced >> 20
        );
        drop(tls);
    }
}
