//! The admin listener: `/metrics` (Prometheus / OpenMetrics text) and `/health` (JSON).
//!
//! It is meant for loopback or a management network, so it is plain HTTP/1.1, answers only `GET`
//! and `HEAD` on those two paths, and caps its own connections and header-read time so a stuck
//! scraper cannot pile up tasks. The health document comes from a closure so each role decides
//! what it reports (services and servers for a proxy, store and issuance for the CA).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{self, UpstreamBody};

/// Produces the `/health` document.
pub type HealthFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

const MAX_ADMIN_CONNECTIONS: usize = 64;
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: HealthFn,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, "admin listening");
    let permits = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let health = health.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let resp = answer(&req, &registry, &health);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "admin connection error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(ADMIN_TIMEOUT, conn).await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(ADMIN_TIMEOUT, tracker.wait()).await;
    Ok(())
}

fn answer(
    req: &Request<Incoming>,
    registry: &Registry,
    health: &HealthFn,
) -> Response<UpstreamBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
                tracing::error!(error = %e, "cannot encode metrics");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n");
            }
            let mut resp = Response::new(body::full(out));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/health" => {
            let doc = health();
            let bytes = serde_json::to_vec(&doc).unwrap_or_else(|_| b"{}".to_vec());
            let mut resp = Response::new(body::full(bytes));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics or /health\n",
        ),
    }
}

fn text(status: StatusCode, message: &'static str) -> Response<UpstreamBody> {
    let mut resp = Response::new(body::full(message));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
