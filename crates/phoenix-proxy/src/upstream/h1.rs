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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

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
}

impl H1Conn {
    pub(crate) async fn handshake(io: UpstreamIo) -> Result<H1Conn, BoxError> {
        let (tx, driver) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        Ok(H1Conn {
            tx,
            driver: Some(Box::new(driver)),
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
            self.drive(cx);
            self.tx.poll_ready(cx)
        })
        .await;
        let mut response = std::pin::pin!(self.tx.try_send_request(req));
        std::future::poll_fn(|cx| {
            // The response first: once it is there, the next poll of the driver belongs to the body.
            if let Poll::Ready(result) = response.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            self.drive(cx);
            response.as_mut().poll(cx)
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
