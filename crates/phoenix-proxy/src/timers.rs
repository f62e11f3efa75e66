//! Time limits that reuse their timer.
//!
//! Every proxied request runs under its service's time limit (`upstream::Service::send_with`).
//! `tokio::time::timeout` registers a timer in the runtime's wheel when the request first waits,
//! and removes it when the answer comes: a lock, an insertion and a removal per request, about 900
//! instructions per hop in profiles of the keep-alive benchmark.
//!
//! On Phoenix's worker threads (one runtime each, for the thread's whole life; see `workers`), a
//! finished limit leaves its timer in a small pool of the thread, and the next request moves it to
//! its own deadline. Moving a registered timer to a later time only records the new time: the wheel
//! looks at the timer again when the old time comes, and moves it then, once per time limit rather
//! than once per request. Before a timer goes back to the pool it forgets the task that waited on
//! it, so that a pooled timer keeps no finished task's memory alive. Elsewhere (the role's own
//! runtime, tests' runtimes) this is `tokio::time::timeout`.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Timers kept per worker thread; more are dropped when their limit ends.
const POOL_MAX: usize = 256;

thread_local! {
    static POOL: RefCell<Vec<Pin<Box<Sleep>>>> = const { RefCell::new(Vec::new()) };
}

/// The time limit passed before the future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

/// `fut`, unless `limit` passes first (then `Elapsed`, and `fut` is dropped).
pub(crate) async fn timeout<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    if crate::workers::slot() == 0 {
        return tokio::time::timeout(limit, fut).await.map_err(|_| Elapsed);
    }
    let Some(deadline) = Instant::now().checked_add(limit) else {
        // A limit past the clock's range never ends.
        return Ok(fut.await);
    };
    let mut sleep = match POOL.with(|pool| pool.borrow_mut().pop()) {
        Some(mut sleep) => {
            sleep.as_mut().reset(deadline);
            sleep
        }
        None => Box::pin(tokio::time::sleep_until(deadline)),
    };
    let mut fut = pin!(fut);
    let mut waited = false;
    let result = poll_fn(|cx| {
        if let Poll::Ready(output) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        waited = true;
        sleep.as_mut().poll(cx).map(|()| Err(Elapsed))
    })
    .await;
    // Forgets this task's waker (a poll registers the one it is given); an elapsed timer has
    // dropped it already, and one never polled never had it.
    if waited && result.is_ok() {
        let _ = sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(sleep);
        }
    });
    result
}

/// Drops this thread's pooled timers: a worker calls it before its runtime goes.
pub(crate) fn clear() {
    POOL.with(|pool| pool.borrow_mut().clear());
}

/// Timers in this thread's pool.
#[cfg(test)]
fn pooled() -> usize {
    POOL.with(|pool| pool.borrow().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that never completes.
    async fn never() {
        std::future::pending::<()>().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_keeps_each_limit_earlier_or_later() {
        crate::workers::set_slot(1);
        let start = Instant::now();
        let ms = Duration::from_millis;
        // Done in time: the timer goes to the pool.
        assert_eq!(timeout(ms(100), async { 7 }).await, Ok(7));
        assert_eq!(pooled(), 1);
        // An earlier deadline than the pooled timer's: it ends then, not at the old one.
        assert_eq!(timeout(ms(50), never()).await, Err(Elapsed));
        assert_eq!(start.elapsed(), ms(50));
        assert_eq!(pooled(), 1, "the elapsed timer is reused too");
        // A later one: the old deadline (100 ms, still in the wheel) does not end it early.
        let slow = async {
            tokio::time::sleep(ms(150)).await;
            "late"
        };
        assert_eq!(timeout(ms(200), slow).await, Ok("late"));
        assert_eq!(start.elapsed(), ms(200));
        // After its deadline passed in the pool, a timer still serves the next limit.
        tokio::time::sleep(ms(1000)).await;
        let before = Instant::now();
        assert_eq!(timeout(ms(30), never()).await, Err(Elapsed));
        assert_eq!(before.elapsed(), ms(30));
        // Limits that run at once take a timer each, and give them all back.
        let soon = async {
            tokio::time::sleep(ms(5)).await;
            1
        };
        let (a, b) = tokio::join!(timeout(ms(10), soon), timeout(ms(10), never()));
        assert_eq!((a, b), (Ok(1), Err(Elapsed)));
        assert_eq!(pooled(), 2);
        clear();
        assert_eq!(pooled(), 0);
        crate::workers::set_slot(0);
    }

    #[tokio::test(start_paused = true)]
    async fn outside_the_workers_it_is_tokios_timeout() {
        assert_eq!(crate::workers::slot(), 0);
        let ms = Duration::from_millis;
        assert_eq!(timeout(ms(10), never()).await, Err(Elapsed));
        assert_eq!(timeout(ms(10), async { 1 }).await, Ok(1));
        assert_eq!(pooled(), 0);
        // A limit past the clock's range never ends.
        assert_eq!(timeout(Duration::MAX, async { 2 }).await, Ok(2));
    }
}
