//! When to renew, and how long to wait after a failure.
//!
//! Certificate validity is wall-clock time, so the schedule is computed against a [`Clock`]
//! rather than tokio's monotonic timer: in production [`SystemClock`], in tests a
//! [`ManualClock`] that the test moves forward to make renewal due without waiting for it.
//! The rules themselves are pure functions ([`renewal_time`], [`Backoff`]) tested on their own.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use time::OffsetDateTime;

/// A source of wall-clock time that can also wait for a wall-clock instant.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
    /// Completes once `now() >= deadline`.
    fn sleep_until(
        &self,
        deadline: OffsetDateTime,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// The longest single timer a [`SystemClock`] sets. Waking up at least this often means a
/// suspended host or a stepped wall clock delays a renewal by at most this much.
const MAX_TIMER: Duration = Duration::from_secs(60);

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sleep_until(
        &self,
        deadline: OffsetDateTime,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let left = deadline - OffsetDateTime::now_utc();
                if left <= time::Duration::ZERO {
                    return;
                }
                let left = Duration::try_from(left).unwrap_or(MAX_TIMER);
                tokio::time::sleep(left.min(MAX_TIMER)).await;
            }
        })
    }
}

/// A clock that only moves when told to; for tests and simulations of the renewal schedule.
#[derive(Debug)]
pub struct ManualClock {
    now: tokio::sync::watch::Sender<OffsetDateTime>,
}

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: tokio::sync::watch::Sender::new(start),
        }
    }

    /// Moves the clock to `t` (also backwards) and wakes every sleeper whose deadline passed.
    pub fn set(&self, t: OffsetDateTime) {
        self.now.send_replace(t);
    }

    pub fn advance(&self, by: Duration) {
        let next = *self.now.borrow() + by;
        self.set(next);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.borrow()
    }

    fn sleep_until(
        &self,
        deadline: OffsetDateTime,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            loop {
                if *rx.borrow_and_update() >= deadline {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The sender lives as long as `self`, which this future borrows.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: at two thirds of
/// its lifetime, or earlier if the CA's renewal window (RFC 9773 section 4.2) starts earlier. In
/// the window the moment is `start + pick * (end - start)`, `pick` in `[0, 1)` chosen once per
/// certificate, so that many clients renewing against one CA spread out as the RFC asks.
pub fn renewal_time(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    ari_window: Option<(OffsetDateTime, OffsetDateTime)>,
    pick: f64,
) -> OffsetDateTime {
    let two_thirds = not_before + (not_after - not_before) * 2 / 3;
    match ari_window {
        Some((start, end)) => {
            let in_window = if end > start {
                start + (end - start) * pick.clamp(0.0, 1.0)
            } else {
                start
            };
            in_window.min(two_thirds)
        }
        None => two_thirds,
    }
}

/// Exponential back-off with jitter for retrying a failed renewal: the ceiling starts at `min`
/// and doubles after each failure up to `max`; each delay is drawn from the upper quarter below
/// the ceiling, so that roles restarted together do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Default for Backoff {
    /// 1 second doubling to 5 minutes.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            ceiling: min,
        }
    }

    /// The delay before the next attempt; `jitter` in `[0, 1)` (random in production).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        ceiling.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn renews_at_two_thirds_without_ari() {
        let nb = datetime!(2026-01-01 00:00 UTC);
        let na = nb + time::Duration::seconds(30);
        assert_eq!(
            renewal_time(nb, na, None, 0.5),
            nb + time::Duration::seconds(20)
        );
        let na = nb + time::Duration::hours(24);
        assert_eq!(
            renewal_time(nb, na, None, 0.9),
            nb + time::Duration::hours(16)
        );
    }

    #[test]
    fn ari_window_can_only_bring_renewal_forward() {
        let nb = datetime!(2026-01-01 00:00 UTC);
        let na = nb + time::Duration::hours(24);
        // The CA wants an early renewal (e.g. the certificate is about to be revoked).
        let early = (nb + time::Duration::hours(1), nb + time::Duration::hours(3));
        assert_eq!(renewal_time(nb, na, Some(early), 0.0), early.0);
        assert_eq!(
            renewal_time(nb, na, Some(early), 0.5),
            nb + time::Duration::hours(2)
        );
        // A window after two thirds does not postpone renewal.
        let late = (
            nb + time::Duration::hours(20),
            nb + time::Duration::hours(22),
        );
        assert_eq!(
            renewal_time(nb, na, Some(late), 0.5),
            nb + time::Duration::hours(16)
        );
        // A window in the past means "now": the result is already due.
        let past = (nb - time::Duration::hours(2), nb - time::Duration::hours(1));
        assert!(renewal_time(nb, na, Some(past), 0.7) < nb);
        // A degenerate window is its start.
        let point = (nb + time::Duration::hours(5), nb + time::Duration::hours(5));
        assert_eq!(renewal_time(nb, na, Some(point), 0.7), point.0);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut b = Backoff::default();
        let ceilings = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300];
        for ceiling in ceilings {
            let ceiling = Duration::from_secs(ceiling);
            let mut probe = b.clone();
            assert_eq!(probe.next_delay(0.0), ceiling);
            let d = b.next_delay(0.999);
            assert!(
                d < ceiling && d >= ceiling.mul_f64(0.75),
                "{d:?} vs {ceiling:?}"
            );
        }
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_when_moved_past_their_deadline() {
        let start = datetime!(2026-01-01 00:00 UTC);
        let clock = std::sync::Arc::new(ManualClock::new(start));
        let c = clock.clone();
        let sleeper =
            tokio::spawn(async move { c.sleep_until(start + time::Duration::seconds(20)).await });
        clock.advance(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sleeper.is_finished(), "woke before the deadline");
        clock.advance(Duration::from_secs(10));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("sleeper did not wake")
            .unwrap();
        // A deadline already passed completes at once.
        clock.sleep_until(start).await;
    }

    #[tokio::test(start_paused = true)]
    async fn system_clock_sleeps_in_bounded_steps() {
        // With tokio's clock paused the wall clock does not move, so the sleeper keeps waking
        // every MAX_TIMER to look at it; it must still be asleep after several steps.
        let deadline = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let sleeper = tokio::spawn(async move { SystemClock.sleep_until(deadline).await });
        tokio::time::sleep(MAX_TIMER * 3).await;
        assert!(!sleeper.is_finished());
        SystemClock
            .sleep_until(OffsetDateTime::now_utc() - time::Duration::seconds(1))
            .await;
    }
}
