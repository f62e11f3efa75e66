//! Worker threads: how a role spreads its listeners over the cores.
//!
//! A proxied request is small work passed between sockets, and the cost that matters is what sits
//! around it. On tokio's work-stealing runtime, a wake-up often lands on another worker thread, and
//! idle workers are woken to look for work to steal: in `bench/run.sh`, a gateway and a mesh each on
//! a two-worker runtime spent 38 % more CPU per request, with two and a half times the context
//! switches, than the same processes on one worker each (see docs/BENCHMARKS.md). So each listener
//! is served like nginx's worker processes: one thread per core, each with its own single-threaded
//! runtime, accepting from the same listening socket and running every connection it accepted,
//! with the upstream connections it opened, to the end. Nothing a request does crosses threads,
//! except HTTP/2 upstream connections, which are shared by the whole role.
//!
//! Every worker polls a duplicate of the one listening socket, so the address is bound once (a
//! second instance still fails with "address in use", which `SO_REUSEPORT` would hide), and a new
//! connection goes to whichever worker asks first, that is, the least busy one.
//!
//! Upstream pools are kept per worker ([`slot`]): a connection belongs to the runtime whose reactor
//! registered its socket, and only its own worker should drive it.

use std::cell::Cell;
use std::io;
use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpListener;
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

/// Runs `serve(listener)` on `workers` threads, each with its own single-threaded runtime and a
/// duplicate of `listener`, until every one returns. The first error is returned, after all ended.
pub(crate) async fn run<F, Fut>(
    name: &str,
    listener: TcpListener,
    workers: usize,
    shutdown: &CancellationToken,
    serve: F,
) -> io::Result<()>
where
    F: Fn(TcpListener) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    let listener = listener.into_std()?;
    let serve = Arc::new(serve);
    let mut done = Vec::with_capacity(workers);
    for index in 0..workers.max(1) {
        let socket = listener.try_clone()?;
        let serve = serve.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{index}"))
            .spawn(move || {
                // Slots wrap when there are more workers than cores; sharing one is only slower.
                SLOT.with(|s| s.set(1 + index % (slots() - 1)));
                let result = runtime.block_on(async move {
                    let listener = TcpListener::from_std(socket)?;
                    serve(listener).await
                });
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            // The threads already running stop with the role.
            shutdown.cancel();
            return Err(e);
        }
        done.push(rx);
    }
    let mut first_error = None;
    for rx in done {
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
