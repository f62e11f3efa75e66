//! Replay-protection nonces (RFC 8555 6.5).
//!
//! A nonce is 128 random bits, valid once and for `NONCE_TTL`. Memory is bounded: at most
//! `NONCE_CAPACITY` nonces are remembered, the oldest evicted first (an evicted nonce simply
//! earns its client a `badNonce`, which every ACME client retries with the fresh nonce that comes
//! with the error). Nonces live in memory only: after a restart clients get one `badNonce` each.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

pub(crate) const NONCE_CAPACITY: usize = 65_536;
pub(crate) const NONCE_TTL: Duration = Duration::from_secs(30 * 60);

/// Issued, not yet used nonces.
pub(crate) struct NonceStore {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl: Duration,
}

struct Inner {
    live: HashMap<String, Instant>,
    // Issue order, for eviction; may hold nonces already consumed (skipped when popped).
    order: VecDeque<String>,
}

impl NonceStore {
    pub(crate) fn new() -> NonceStore {
        NonceStore::with_limits(NONCE_CAPACITY, NONCE_TTL)
    }

    pub(crate) fn with_limits(capacity: usize, ttl: Duration) -> NonceStore {
        NonceStore {
            inner: Mutex::new(Inner {
                live: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity,
            ttl,
        }
    }

    /// A fresh nonce.
    pub(crate) fn issue(&self) -> String {
        let nonce =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while inner.order.len() >= self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.live.remove(&old);
            }
        }
        // Drop expired nonces from the front so that idle memory shrinks too.
        while let Some(front) = inner.order.front() {
            match inner.live.get(front) {
                Some(t) if now.duration_since(*t) < self.ttl => break,
                _ => {
                    let old = inner.order.pop_front().unwrap_or_default();
                    inner.live.remove(&old);
                }
            }
        }
        inner.live.insert(nonce.clone(), now);
        inner.order.push_back(nonce.clone());
        nonce
    }

    /// True exactly once for a nonce this server issued and that has not expired.
    pub(crate) fn consume(&self, nonce: &str) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.live.remove(nonce) {
            Some(t) => t.elapsed() < self.ttl,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_is_valid_once() {
        let store = NonceStore::new();
        let n = store.issue();
        assert!(store.consume(&n));
        assert!(!store.consume(&n));
        assert!(!store.consume("made-up"));
    }

    #[test]
    fn memory_is_bounded_and_oldest_evicted() {
        let store = NonceStore::with_limits(3, NONCE_TTL);
        let first = store.issue();
        let rest: Vec<_> = (0..3).map(|_| store.issue()).collect();
        assert!(!store.consume(&first), "oldest nonce must be evicted");
        assert!(rest.iter().all(|n| store.consume(n)));
        assert!(store.inner.lock().unwrap().order.len() <= 3);
    }

    #[test]
    fn expired_nonce_is_rejected() {
        let store = NonceStore::with_limits(10, Duration::from_millis(1));
        let n = store.issue();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!store.consume(&n));
    }
}
