//! Worker threads: how a role spreads its listeners over the cores.
//!
//! A proxied request is small work passed between sockets, and the cost that matters is what sits
//! around it. On tokio's work-stealing runtime, a wake-up often lands on another worker thread, and
//! idle workers are woken to look for work to steal: in `bench/run.sh`, a gateway and a mesh each on
//! a two-worker runtime spent 38 % more CPU per request, with two and a half times the context
//! switches, than the same processes on one worker each (see docs/BENCHMARKS.md). So each listener
//! is served like nginx's worker processes: one thread per core, each with its own single-threaded
//! runtime, running every connection it was given, with the upstream connections it opened, to the
//! end. Nothing a request does crosses threads, except HTTP/2 upstream connections, which are shared
//! by the whole role.
//!
//! The listening socket is accepted from on the role's own runtime, and each connection is handed
//! to the worker with the fewest open connections ([`Workers::hand_off`]). Workers that each polled a
//! duplicate of the socket, as nginx's do, took connections in very uneven numbers: the worker that
//! was awake already won most races, and under `bench/run.sh` one gateway worker served three
//! quarters of the connections while the other idled, so the busy one queued requests that a free
//! core could have served (nginx's workers, woken one at a time with `EPOLLEXCLUSIVE`, came out
//! even in the same run). A hand-off
//! costs a wake-up per connection, not per request. The address is bound once, so a second instance
//! still fails with "address in use", which `SO_REUSEPORT` (the other way to spread connections)
//! would hide.
//!
//! Upstream pools are kept per worker ([`slot`]): a connection belongs to the runtime whose reactor
//! registered its socket, and only its own worker should drive it.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Number of pool slots: one per possible worker, plus slot 0 for every other thread.
pub(crate) fn slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| default_workers() + 1)
}

/// The pool slot of the current thread: its worker's, or 0 outside the workers.
pub(crate) fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// Makes the current thread count as worker `slot`'s, for tests of what workers do differently.
#[cfg(test)]
pub(crate) fn set_slot(slot: usize) {
    SLOT.with(|s| s.set(slot));
}

/// Worker threads per listener when the role does not say: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// Worker threads per listener from `PHOENIX_WORKERS`: a number from 1 to 1024, or `auto` (the
/// default: one per core).
pub fn from_env() -> Result<usize, String> {
    match std::env::var("PHOENIX_WORKERS") {
        Err(_) => Ok(default_workers()),
        Ok(v) if v.trim().eq_ignore_ascii_case("auto") => Ok(default_workers()),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!(
                "PHOENIX_WORKERS={v:?} is not a number of worker threads; give 1 to 1024, or auto (one per core)"
            )),
        },
    }
}

/// Whether each worker thread is pinned to one CPU, from `PHOENIX_CPU_AFFINITY`: `off` (the
/// default) or `cores`, which runs worker *i* of each listener on the *i*-th CPU the process may use
/// (wrapping), like nginx's `worker_cpu_affinity auto`. A worker that stays on its core keeps its
/// caches and is not moved by the scheduler between the client's and the backend's bursts; on a
/// machine whose cores the backends share, the scheduler's freedom may be worth more.
pub fn affinity_from_env() -> Result<bool, String> {
    match std::env::var("PHOENIX_CPU_AFFINITY") {
        Err(_) => Ok(false),
        Ok(v) if v.trim().eq_ignore_ascii_case("off") => Ok(false),
        Ok(v) if v.trim().eq_ignore_ascii_case("cores") => Ok(true),
        Ok(v) => Err(format!(
            "PHOENIX_CPU_AFFINITY={v:?} is not an affinity; give off (the default) or cores (one worker per CPU)"
        )),
    }
}

/// Pins the calling thread to the `index`-th CPU it may run on (wrapping). A failure is logged and
/// leaves the thread where it was.
fn pin_to_cpu(index: usize) {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    let allowed = match sched_getaffinity(None) {
        Ok(set) => set,
        Err(e) => return tracing::warn!(error = %e, "reading the CPU affinity failed; not pinned"),
    };
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    let Some(&cpu) = cpus.get(index % cpus.len().max(1)) else {
        return;
    };
    let mut one = CpuSet::new();
    one.set(cpu);
    match sched_setaffinity(None, &one) {
        Ok(()) => tracing::debug!(worker = index, cpu, "worker pinned"),
        Err(e) => tracing::warn!(error = %e, worker = index, cpu, "pinning a worker failed"),
    }
}

/// A connection accepted for a worker: the socket, still to be registered with the worker's
/// reactor, the peer, the connection cap's permit and the worker's load while it is open.
pub(crate) struct Handoff {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) load: LoadGuard,
}

/// Counts one open connection of a worker until dropped (with the connection and its tunnels).
pub(crate) struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The worker threads of one listener, fed by the accept loop (see the module documentation).
pub(crate) struct Workers {
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
    /// Open connections per worker.
    loads: Vec<Arc<AtomicUsize>>,
    /// Where the search for the least loaded worker starts, so that ties go round.
    next: usize,
    done: Vec<oneshot::Receiver<io::Result<()>>>,
}

impl Workers {
    /// Starts `count` threads, each with its own single-threaded runtime running
    /// `serve(inbox)`, which should serve the connections that arrive in `inbox` until it closes.
    pub(crate) fn start<F, Fut>(
        name: &str,
        count: usize,
        shutdown: &CancellationToken,
        serve: F,
    ) -> io::Result<Workers>
    where
        F: Fn(mpsc::UnboundedReceiver<Handoff>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = io::Result<()>>,
    {
        let serve = Arc::new(serve);
        let count = count.max(1);
        // Checked before any port is bound by the role (`phoenix` refuses a bad value).
        let pin = affinity_from_env().unwrap_or(false);
        let mut workers = Workers {
            inboxes: Vec::with_capacity(count),
            loads: Vec::with_capacity(count),
            next: 0,
            done: Vec::with_capacity(count),
        };
        for index in 0..count {
            let (inbox_tx, inbox) = mpsc::unbounded_channel();
            let serve = serve.clone();
            let (tx, rx) = oneshot::channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    // Slots wrap when there are more workers than cores; sharing one is only slower.
                    SLOT.with(|s| s.set(1 + index % (slots() - 1)));
                    if pin {
                        pin_to_cpu(index);
                    }
                    let served = runtime.block_on(serve(inbox));
                    // Pooled timers go while their runtime is still there.
                    crate::timers::clear();
                    drop(runtime);
                    let _ = tx.send(served);
                });
            if let Err(e) = spawned {
                // The threads already running stop with the role.
                shutdown.cancel();
                return Err(e);
            }
            workers.inboxes.push(inbox_tx);
            workers.loads.push(Arc::new(AtomicUsize::new(0)));
            workers.done.push(rx);
        }
        Ok(workers)
    }

    /// Hands an accepted connection to the worker with the fewest open connections.
    pub(crate) fn hand_off(
        &mut self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let loads: Vec<usize> = self
            .loads
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        let index = least_loaded(&loads, self.next);
        self.next = (index + 1) % self.loads.len();
        // Deregistered from this runtime's reactor; the worker registers it with its own.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "accepted connection could not be handed to a worker");
                return;
            }
        };
        self.loads[index].fetch_add(1, Ordering::Relaxed);
        let load = LoadGuard(self.loads[index].clone());
        let handoff = Handoff {
            stream,
            peer,
            permit,
            load,
        };
        if self.inboxes[index].send(handoff).is_err() {
            tracing::warn!(worker = index, "a worker stopped early; connection dropped");
        }
    }

    /// Closes the inboxes and waits for every worker to finish serving; the first error is
    /// returned, after all ended.
    pub(crate) async fn join(self, shutdown: &CancellationToken) -> io::Result<()> {
        drop(self.inboxes);
        let mut first_error = None;
        for rx in self.done {
            let result = rx
                .await
                .unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked")));
            if let Err(e) = result {
                shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The index of the smallest load, the first one from `start` on (wrapping) among equals.
fn least_loaded(loads: &[usize], start: usize) -> usize {
    (0..loads.len())
        .map(|i| (start + i) % loads.len())
        .min_by_key(|&i| loads[i])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_loaded_worker_is_chosen_and_ties_go_round() {
        assert_eq!(least_loaded(&[3, 1, 2], 0), 1);
        assert_eq!(least_loaded(&[3, 1, 2], 2), 1);
        assert_eq!(least_loaded(&[0, 0, 0], 0), 0);
        assert_eq!(least_loaded(&[0, 0, 0], 1), 1);
        assert_eq!(least_loaded(&[0, 0, 0], 2), 2);
        assert_eq!(least_loaded(&[1, 0, 0], 0), 1);
        assert_eq!(least_loaded(&[5], 0), 0);
    }

    /// Connections that come and go stay spread evenly, even when they close in a lopsided order.
    #[tokio::test]
    async fn connections_are_spread_evenly_over_the_workers() {
        let shutdown = CancellationToken::new();
        // Each worker reports what it received, under its thread's name.
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, Handoff)>();
        let mut workers = Workers::start("test", 3, &shutdown, move |mut inbox| {
            let seen_tx = seen_tx.clone();
            async move {
                while let Some(handoff) = inbox.recv().await {
                    let name = std::thread::current().name().unwrap_or("").to_owned();
                    let _ = seen_tx.send((name, handoff));
                }
                Ok(())
            }
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(100));
        let mut clients = Vec::new();
        let mut open: Vec<(String, Handoff)> = Vec::new();
        for round in 0..2 {
            for _ in 0..12 {
                clients.push(std::net::TcpStream::connect(addr).unwrap());
                let (stream, peer) = listener.accept().await.unwrap();
                let permit = semaphore.clone().acquire_owned().await.unwrap();
                workers.hand_off(stream, peer, permit);
                open.push(seen.recv().await.unwrap());
            }
            let mut per_worker = std::collections::BTreeMap::new();
            for (worker, _) in &open {
                *per_worker.entry(worker.clone()).or_insert(0) += 1;
            }
            let counts: Vec<usize> = per_worker.values().copied().collect();
            assert_eq!(counts.len(), 3, "round {round}: {per_worker:?}");
            assert!(
                counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
                "round {round}: {per_worker:?}"
            );
            // Close every connection of the first worker that got any: the next ones fill it up.
            let first = open[0].0.clone();
            open.retain(|(worker, _)| *worker != first);
        }
        workers.join(&shutdown).await.unwrap();
    }
}
