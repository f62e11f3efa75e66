//! The gateway's plain-HTTP listener: answers ACME http-01 challenges (RFC 8555 section 8.3) and sends
//! everything else to HTTPS with 308 Permanent Redirect, which keeps the method and body.
//!
//! Nothing is proxied over plain HTTP: the only plaintext hop of the flow is mesh -> backend.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Looks up the key authorization for an http-01 token.
pub type ChallengeLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// What the listener needs to answer.
#[derive(Clone)]
pub struct RedirectSettings {
    /// Port of the HTTPS listener; omitted from the Location when it is 443.
    pub https_port: u16,
    pub challenges: Option<ChallengeLookup>,
    pub header_read_timeout: Duration,
}

/// Serves until `shutdown`, then lets open connections finish their current request.
pub async fn serve(
    listener: TcpListener,
    settings: RedirectSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let settings = Arc::new(settings);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let header_read_timeout = settings.header_read_timeout;
        let settings = settings.clone();
        let service = service_fn(move |req| {
            let settings = settings.clone();
            async move { Ok::<_, Infallible>(answer(&req, &settings, peer)) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("http", %peer)),
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

fn answer(
    req: &Request<Incoming>,
    settings: &RedirectSettings,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(CHALLENGE_PREFIX) {
        if let Some(key_auth) = settings
            .challenges
            .as_ref()
            .and_then(|lookup| lookup(token))
        {
            tracing::info!(%peer, token, "answered ACME http-01 challenge");
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(Bytes::from(key_auth)))
                .expect("valid response");
        }
        return text(StatusCode::NOT_FOUND, "unknown challenge token\n");
    }
    let Some(host) = request_host(req) else {
        return text(StatusCode::BAD_REQUEST, "missing Host header\n");
    };
    let port = match settings.https_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{host}{port}{target}");
    Response::builder()
        .status(StatusCode::PERMANENT_REDIRECT)
        .header(header::LOCATION, location)
        .header(header::CONTENT_LENGTH, "0")
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

/// The Host without its port, when it is a plausible host name or address (it ends up in a Location
/// header, so anything else is refused rather than reflected).
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    let raw = match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok()?,
        None => req.uri().host()?,
    };
    let host = strip_port(raw);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    ok.then_some(host)
}

/// `example.test:8080` -> `example.test`, `[::1]:8080` -> `[::1]`; a bare IPv6 literal has no port.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.test:8080"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("127.0.0.1:80"), "127.0.0.1");
    }
}
