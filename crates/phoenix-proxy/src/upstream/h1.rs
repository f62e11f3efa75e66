//! An HTTP/1.1 upstream connection driven by the task that uses it.
//!
//! hyper's `client::conn` splits a connection in two: a `SendRequest` handle and a `Connection`
//! future that does the I/O, which is usually spawned as a task of its own. A proxied request then
//! crosses tasks twice per hop: the client connection's task hands the request to the upstream
//! connection's task through a channel, and that task hands the response (and every body chunk)
//! back. Each hand-off is a wake-up, often on the other worker thread. An HTTP/1.1 connection
//! carries one exchange at a time, so nothing needs a task of its own: [`H1Conn`] keeps both halves
//! together, and whoever holds it polls the `Connection` alongside what it waits for, while waiting
//! for the response head ([`H1Conn::send`]) and while reading the body (`ResponseBody`). An idle
//! pooled connection is polled by nobody; a close by the server is seen at the next checkout,
//! before the request is written, and the request comes back unsent (see `Endpoint::send`).
//!
//! A request that upgrades (WebSocket) hands its connection to a spawned task instead
//! ([`H1Conn::detach`]): the tunnel outlives the exchange, and hyper hands the socket over to the
//! upgrade only from a driven `UpgradeableConnection`.
//!
//! The two halves still talk through hyper's channels (the request in, the response out, the body
//! chunks and the "want more" signals), and each message wakes the task that waits on the other
//! side, here the very task that is polling. tokio then polls that whole task again (the client
//! connection, its hyper server, the proxy's request future) only to find what this poll already
//! handled: two of every four polls of a connection task were such echoes. Everything hyper's client
//! side registers therefore gets the connection's own waker ([`H1Conn::poll_owned`]): a wake-up
//! raised while the owner is polling is held, and the owner polls its part again at once instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::{BoxError, UpstreamBody};

/// The socket under an upstream HTTP/1.1 connection.
pub(crate) enum UpstreamIo {
    Tcp(TcpStream),
    /// Boxed: a TLS stream is large, and connections move in and out of the idle pool.
    Tls(Box<TlsStream<TcpStream>>),
}

type Driver = http1::Connection<TokioIo<UpstreamIo>, UpstreamBody>;

/// Both halves of one HTTP/1.1 connection (see the module documentation).
pub(crate) struct H1Conn {
    tx: http1::SendRequest<UpstreamBody>,
    /// `None` once the connection ended, or when a spawned task drives it.
    driver: Option<Box<Driver>>,
    /// The waker hyper's client side is polled with (see the module documentation).
    owner: Arc<Owner>,
    owner_waker: Waker,
}

/// Holds back the wake-ups that hyper's client side raises while its owner is polling it.
struct Owner {
    /// The task that polls the connection now.
    task: AtomicWaker,
    polling: AtomicBool,
    /// A wake-up came while `polling`.
    raised: AtomicBool,
}

impl Owner {
    /// Runs `f` with this connection's wake-ups held back; true when one was raised meanwhile.
    fn hold<R>(&self, f: impl FnOnce() -> R) -> (R, bool) {
        self.polling.store(true, Ordering::SeqCst);
        let result = f();
        self.polling.store(false, Ordering::SeqCst);
        (result, self.raised.swap(false, Ordering::SeqCst))
    }
}

impl Wake for Owner {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // `raised` first, `polling` second: either the poller's final look at `raised` sees it, or
        // this sees the poll over and wakes the task (both may happen; neither is missed).
        if self.polling.load(Ordering::SeqCst) {
            self.raised.store(true, Ordering::SeqCst);
            if self.polling.load(Ordering::SeqCst) {
                return;
            }
        }
        self.task.wake();
    }
}

impl H1Conn {
    pub(crate) async fn handshake(io: UpstreamIo) -> Result<H1Conn, BoxError> {
        let (tx, driver) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        let owner = Arc::new(Owner {
            task: AtomicWaker::new(),
            polling: AtomicBool::new(false),
            raised: AtomicBool::new(false),
        });
        Ok(H1Conn {
            tx,
            driver: Some(Box::new(driver)),
            owner_waker: Waker::from(owner.clone()),
            owner,
        })
    }

    /// The connection is known to be unusable (ended, or the server closed it).
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Polls the connection's I/O once, if this handle drives it.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = self.driver.as_mut() {
            if let Poll::Ready(result) = Pin::new(&mut **driver).poll(cx) {
                log_end(result);
                self.driver = None;
            }
        }
    }

    /// Runs `poll` (which polls this connection's hyper futures) with the connection's own waker, as
    /// the task of `cx`. When `poll` raised a wake-up of its own without finishing (a message passed
    /// between hyper's halves), it runs again now, a few times at most, rather than in another poll
    /// of the whole task. A wake-up raised by a `poll` that finished is dropped: whoever gets the
    /// result polls this connection again for the next step (the body after the head, the next
    /// chunk after one), which is where that wake-up would have led.
    pub(crate) fn poll_owned<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut H1Conn, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        let owner = self.owner.clone();
        let waker = self.owner_waker.clone();
        owner.task.register(cx.waker());
        let mut owned = Context::from_waker(&waker);
        for _ in 0..4 {
            let (result, raised) = owner.hold(|| poll(self, &mut owned));
            if result.is_ready() || !raised {
                return result;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Lets hyper finish the exchange whose response body just ended, without waiting for anything;
    /// true when the connection can take the next request (it cannot while, say, the request body is
    /// still being written after an early response).
    pub(crate) fn settle(&mut self) -> bool {
        self.drive(&mut Context::from_waker(std::task::Waker::noop()));
        self.tx.is_ready()
    }

    /// Hands the connection's I/O to a spawned task that supports upgrades (WebSocket); the handle
    /// then works like one of hyper's usual connections.
    pub(crate) fn detach(&mut self) {
        if let Some(driver) = self.driver.take() {
            tokio::spawn(async move { log_end(driver.with_upgrades().await) });
        }
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile. When the
    /// connection turns out closed before the request was written, hyper gives the request back
    /// (`TrySendError::into_message`).
    pub(crate) async fn send(
        &mut self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>> {
        // A connection taken from the pool finishes its previous exchange (and notices a close by
        // the server) when driven; only then does hyper accept the next request.
        // If it turns out closed, `try_send_request` below refuses the request and returns it.
        let _ = std::future::poll_fn(|cx| {
            self.poll_owned(cx, |conn, cx| {
                conn.drive(cx);
                conn.tx.poll_ready(cx)
            })
        })
        .await;
        // hyper queues the request here and wakes the driver, which the poll below drives anyway.
        let (response, _) = self.owner.hold(|| self.tx.try_send_request(req));
        let mut response = std::pin::pin!(response);
        std::future::poll_fn(|cx| {
            self.poll_owned(cx, |conn, cx| {
                // The response first: once it is there, the next poll of the driver belongs to
                // the body.
                if let Poll::Ready(result) = response.as_mut().poll(cx) {
                    return Poll::Ready(result);
                }
                conn.drive(cx);
                response.as_mut().poll(cx)
            })
        })
        .await
    }
}

fn log_end(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wake-ups of the task that owns the connection.
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn connection() -> (H1Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let conn = H1Conn::handshake(UpstreamIo::Tcp(client.unwrap()))
            .await
            .unwrap();
        (conn, accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_wake_up_raised_while_polling_polls_again_instead_of_waking_the_task() {
        let (mut conn, _server) = connection().await;
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);

        // Raises a wake-up on its first run only, as hyper does when one half hands the other a
        // message: run again at once, the task is not woken.
        let mut runs = 0;
        let result = conn.poll_owned(&mut cx, |_, cx| {
            runs += 1;
            if runs == 1 {
                cx.waker().wake_by_ref();
            }
            Poll::<()>::Pending
        });
        assert!(result.is_pending());
        assert_eq!(runs, 2);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);

        // One that keeps raising is given up on after a few runs, and the task is woken to come back.
        let mut runs = 0;
        let result = conn.poll_owned(&mut cx, |_, cx| {
            runs += 1;
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        });
        assert!(result.is_pending());
        assert_eq!(runs, 4);
        assert_eq!(task.0.load(Ordering::SeqCst), 1);

        // A wake-up from outside a poll (the socket became readable) reaches the task.
        let mut registered = None;
        let _ = conn.poll_owned(&mut cx, |_, cx| {
            registered = Some(cx.waker().clone());
            Poll::<()>::Pending
        });
        registered.unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
    }

    /// The response comes while the task is parked, so the socket's wake-up must get through the
    /// connection's waker to the task; a held-back wake-up would hang the exchange.
    #[tokio::test]
    async fn a_response_that_comes_later_wakes_the_task() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut conn, mut server) = connection().await;
        let backend = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = server.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
            server
        });
        let req = Request::get("/")
            .header("host", "backend.test")
            .body(crate::body::empty())
            .unwrap();
        let exchange = async {
            let response = conn.send(req).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap().to_bytes()
        };
        let body = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
            .await
            .expect("the response woke the task");
        assert_eq!(&body[..], b"hello");
        // The exchange is complete: the connection takes the next request.
        assert!(conn.settle());
        drop(backend.await.unwrap());
    }
}
