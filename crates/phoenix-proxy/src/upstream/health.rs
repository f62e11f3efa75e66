//! Health of upstream servers: the state each server carries, and the active checker.
//!
//! Two sources decide whether a server is in rotation:
//! - **Active checks** (when the service has `health`): every `interval` a GET of `path` goes to each
//!   server with `timeout`; the answer must carry the expected status (default any 2xx or 3xx). A
//!   server leaves rotation at its first failed check and comes back at its first successful one:
//!   the cost of a wrong ejection is small (other servers take the traffic) while the cost of sending
//!   requests to a dead server is failed requests.
//! - **Passive ejection**: a failed connect takes the server out at once, without waiting for the next
//!   check. With active checks it returns at the next successful check. Without them nothing else would
//!   ever bring it back, so it is tried again after a back-off (1 s, doubling up to 30 s): the next
//!   request that picks it is a probe, and a successful response restores it.
//!
//! Transitions are logged at INFO, once per change, with the service and server; individual failed
//! checks of an already-ejected server only at DEBUG so a dead backend does not flood the log.
//! State is a handful of atomics read on every pick without locking.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

use super::endpoint::Endpoint;
use super::Service;
use crate::config::HealthConfig;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A health answer is read to its end so that the keep-alive connection can be reused, but no more
/// than this: a health endpoint that streams megabytes is a misconfiguration, not a reason to stall.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Health state of one server.
#[derive(Debug)]
pub(crate) struct HealthState {
    healthy: AtomicBool,
    /// Whether active checks run for this server's service (then only they bring a server back).
    active: bool,
    /// Without active checks: when an ejected server may be probed again, in ms since `epoch`.
    retry_at_ms: AtomicU64,
    backoff_ms: AtomicU64,
    epoch: Instant,
}

/// What a report changed, so that the caller logs each transition once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    Down,
    Up,
}

impl HealthState {
    pub(crate) fn new(active: bool) -> HealthState {
        HealthState {
            healthy: AtomicBool::new(true),
            active,
            retry_at_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(FIRST_BACKOFF.as_millis() as u64),
            epoch: Instant::now(),
        }
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the balancer may pick this server now: healthy, or (passive mode only) ejected but past
    /// its back-off, so that one request can probe it.
    pub(crate) fn is_available(&self) -> bool {
        if self.healthy.load(Ordering::Relaxed) {
            return true;
        }
        !self.active && self.now_ms() >= self.retry_at_ms.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A connect failed: eject now; without active checks, schedule the next probe.
    pub(crate) fn connect_failed(&self) -> Transition {
        let was_healthy = self.healthy.swap(false, Ordering::Relaxed);
        if !self.active {
            let backoff = if was_healthy {
                self.backoff_ms
                    .store(FIRST_BACKOFF.as_millis() as u64, Ordering::Relaxed);
                FIRST_BACKOFF.as_millis() as u64
            } else {
                // a failed probe: wait twice as long before the next one
                let next = (self.backoff_ms.load(Ordering::Relaxed) * 2)
                    .min(MAX_BACKOFF.as_millis() as u64);
                self.backoff_ms.store(next, Ordering::Relaxed);
                next
            };
            self.retry_at_ms
                .store(self.now_ms() + backoff, Ordering::Relaxed);
        }
        if was_healthy {
            Transition::Down
        } else {
            Transition::None
        }
    }

    /// A request got response headers. Only restores the server in passive mode: with active checks
    /// the checker is the authority (a probe that happens to succeed while every server is ejected
    /// does not prove the health endpoint answers).
    pub(crate) fn request_succeeded(&self) -> Transition {
        if self.active || self.healthy.load(Ordering::Relaxed) {
            return Transition::None;
        }
        if self.healthy.swap(true, Ordering::Relaxed) {
            Transition::None
        } else {
            self.backoff_ms
                .store(FIRST_BACKOFF.as_millis() as u64, Ordering::Relaxed);
            Transition::Up
        }
    }

    /// Result of one active check.
    pub(crate) fn check_result(&self, ok: bool) -> Transition {
        match (self.healthy.swap(ok, Ordering::Relaxed), ok) {
            (true, false) => Transition::Down,
            (false, true) => Transition::Up,
            _ => Transition::None,
        }
    }
}

/// Runs the active checks of `service` every `cfg.interval` until shutdown or until the service is
/// dropped (a reload replaced it): the task holds only a weak reference between rounds.
pub(crate) fn spawn_checker(
    service: &Arc<Service>,
    cfg: HealthConfig,
    shutdown: CancellationToken,
) {
    let weak: Weak<Service> = Arc::downgrade(service);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(cfg.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let Some(service) = weak.upgrade() else { break };
            let round = futures_util::future::join_all(
                service
                    .endpoints()
                    .iter()
                    .map(|ep| check_and_report(ep, &cfg)),
            );
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = round => {}
            }
        }
    });
}

async fn check_and_report(ep: &Arc<Endpoint>, cfg: &HealthConfig) {
    let result = check(ep, cfg).await;
    match (&result, ep.health.check_result(result.is_ok())) {
        (Err(reason), Transition::Down) => tracing::info!(
            service = %ep.service, server = %ep.url, reason = %reason,
            "upstream server failed its health check and leaves rotation"
        ),
        (Ok(()), Transition::Up) => tracing::info!(
            service = %ep.service, server = %ep.url,
            "upstream server passed its health check and is back in rotation"
        ),
        (Err(reason), _) => tracing::debug!(
            service = %ep.service, server = %ep.url, reason = %reason, "health check failed"
        ),
        (Ok(()), _) => {}
    }
}

/// One check: Ok, or a short reason for the log.
async fn check(ep: &Arc<Endpoint>, cfg: &HealthConfig) -> Result<(), String> {
    let request = || {
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = cfg
            .path
            .parse()
            .map_err(|e| format!("bad health path: {e}"))?;
        let headers = req.headers_mut();
        headers.insert(header::HOST, ep.host_header());
        headers.insert(
            header::USER_AGENT,
            http::HeaderValue::from_static("phoenix-health-check"),
        );
        Ok::<_, String>(req)
    };
    let req = request()?;
    let attempt = async {
        let response = ep
            .send(req, None, false, false, true)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let ok = match cfg.status {
            Some(expected) => status.as_u16() == expected,
            None => status.is_success() || status.is_redirection(),
        };
        // Read the (small) body so the connection goes back to the pool.
        let mut body = response.into_body();
        let mut read = 0usize;
        while read <= MAX_HEALTH_BODY {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(e)) => return Err(format!("reading the answer: {e}")),
                None => break,
            }
        }
        if ok {
            Ok(())
        } else {
            Err(match cfg.status {
                Some(expected) => format!("status {status}, expected {expected}"),
                None => format!("status {status}, expected 2xx or 3xx"),
            })
        }
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_mode_transitions_only_through_checks() {
        let h = HealthState::new(true);
        assert!(h.is_available());
        assert_eq!(h.connect_failed(), Transition::Down);
        assert!(
            !h.is_available(),
            "active mode: ejected until a check passes"
        );
        assert_eq!(h.request_succeeded(), Transition::None);
        assert!(!h.is_healthy());
        assert_eq!(h.check_result(false), Transition::None);
        assert_eq!(h.check_result(true), Transition::Up);
        assert_eq!(h.check_result(true), Transition::None);
        assert_eq!(h.check_result(false), Transition::Down);
    }

    #[test]
    fn passive_mode_backs_off_then_probes() {
        let h = HealthState::new(false);
        assert_eq!(h.connect_failed(), Transition::Down);
        assert!(!h.is_available(), "within the first back-off");
        // pretend the back-off has passed
        h.retry_at_ms.store(0, Ordering::Relaxed);
        assert!(h.is_available(), "probe allowed after back-off");
        assert_eq!(h.connect_failed(), Transition::None);
        assert_eq!(
            h.backoff_ms.load(Ordering::Relaxed),
            2000,
            "back-off doubles after a failed probe"
        );
        h.retry_at_ms.store(0, Ordering::Relaxed);
        assert_eq!(h.request_succeeded(), Transition::Up);
        assert!(h.is_healthy());
        assert_eq!(
            h.backoff_ms.load(Ordering::Relaxed),
            1000,
            "back-off resets on success"
        );
    }

    #[test]
    fn passive_back_off_is_capped() {
        let h = HealthState::new(false);
        h.connect_failed();
        for _ in 0..20 {
            h.connect_failed();
        }
        assert_eq!(
            h.backoff_ms.load(Ordering::Relaxed),
            MAX_BACKOFF.as_millis() as u64
        );
    }
}
