//! Polling rarely-ready futures only when they were woken.
//!
//! A connection task waits for its HTTP connection and, beside it, for a few events that almost never
//! happen: shutdown, forced close, a request head that began, a timer. With `tokio::select!` every
//! wake-up of the task (each read or write becoming ready, several per request) polls all of them,
//! and polling a `CancellationToken` or a `Notify` takes a mutex that every connection of the
//! listener shares, across worker threads. A [`Gate`] gives those futures a waker of their own: the
//! task's waker is woken through it, and the futures are polled again only when that waker fired.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The waker handed to the gated futures (see the module documentation).
pub(crate) struct Gate {
    inner: Arc<GateWaker>,
    waker: Waker,
}

struct GateWaker {
    /// Set when a gated future's waker fired (and at first, so the futures get registered).
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for GateWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Gate {
    pub(crate) fn new() -> Gate {
        let inner = Arc::new(GateWaker {
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Gate {
            waker: Waker::from(inner.clone()),
            inner,
        }
    }

    /// Makes the next [`Gate::poll`] run `poll` whatever was woken: after a gated future was
    /// replaced or its deadline moved, so that it gets polled (and registered) again.
    pub(crate) fn open(&self) {
        self.inner.fired.store(true, Ordering::Release);
    }

    /// Runs `poll` with the gate's waker if one of the futures it polls was woken since it last
    /// returned `Pending` (or the gate was opened); otherwise returns `Pending` at once. The task of
    /// `cx` is woken when a gated future is.
    pub(crate) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.inner.task.register(cx.waker());
        if !self.inner.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let result = poll(&mut Context::from_waker(&self.waker));
        if result.is_ready() {
            // `poll` may have stopped at the first ready future; the others get their turn next.
            self.open();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn gated_futures_are_polled_only_when_woken() {
        let gate = Gate::new();
        let notify = tokio::sync::Notify::new();
        let polls = AtomicUsize::new(0);
        let mut notified = pin!(notify.notified());
        let mut step = |cx: &mut Context<'_>| {
            gate.poll(cx, |cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                notified.as_mut().poll(cx)
            })
        };
        let mut cx = Context::from_waker(Waker::noop());
        // The first poll registers the future; later polls skip it until its waker fires.
        assert!(step(&mut cx).is_pending());
        assert!(step(&mut cx).is_pending());
        assert!(step(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        notify.notify_one();
        assert!(step(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn the_task_is_woken_through_the_gate() {
        let gate = Arc::new(Gate::new());
        let token = tokio_util::sync::CancellationToken::new();
        let waiter = {
            let (gate, token) = (gate.clone(), token.clone());
            tokio::spawn(async move {
                let mut cancelled = pin!(token.cancelled());
                std::future::poll_fn(|cx| gate.poll(cx, |cx| cancelled.as_mut().poll(cx))).await;
            })
        };
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiting task was woken")
            .expect("the task ran to its end");
    }

    #[test]
    fn opening_the_gate_polls_again() {
        let gate = Gate::new();
        let mut cx = Context::from_waker(Waker::noop());
        let mut polls = 0;
        let mut step = |gate: &Gate| {
            gate.poll(&mut cx, |_| {
                polls += 1;
                Poll::<()>::Pending
            })
        };
        assert!(step(&gate).is_pending());
        assert!(step(&gate).is_pending());
        gate.open();
        assert!(step(&gate).is_pending());
        assert_eq!(polls, 2);
    }
}
