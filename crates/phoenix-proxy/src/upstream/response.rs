//! The response body handed to the caller, which knows when the upstream exchange is over.
//!
//! hyper's `Incoming` says nothing when it ends, yet two things must happen exactly then: the
//! server's in-flight count (used by least-requests) drops, and an HTTP/1.1 connection goes back to
//! the keep-alive pool. Doing either when the response *headers* arrive would be wrong for the
//! traffic this proxy exists for: an LLM token stream can run for minutes after its headers, and a
//! connection still streaming a body cannot carry another request. So the body is wrapped:
//! - at the end of the stream (or an empty body, e.g. HEAD, 204, 304) the connection is returned to
//!   the pool at once, so a client sending requests one after another reuses one connection;
//! - dropped before its end (client went away, error), the in-flight count drops but the HTTP/1.1
//!   connection is not reused: hyper closes it, since it is in an unknown state;
//! - a `101 Switching Protocols` response never returns its connection: it belongs to the upgrade.
//!
//! `ResponseBody` implements `http_body::Body` with hyper's own error type, so it can be boxed with
//! `crate::body::boxed` like `Incoming`; `hyper::upgrade::on` works on the response as usual (the
//! upgrade handle travels in the response extensions, not in the body).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::endpoint::Endpoint;
use super::h1::H1Conn;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Counts one request in flight on a server for as long as it lives.
pub(crate) struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub(crate) fn enter(endpoint: &Arc<Endpoint>) -> InFlight {
        endpoint
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(endpoint.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Release {
    in_flight: InFlight,
    /// The HTTP/1.1 connection the response came on: driven while the body is read (see `h1`),
    /// returned to the pool at a clean end.
    h1: Option<H1Conn>,
}

/// Body of an upstream response: hyper's `Incoming`, plus the bookkeeping described above.
pub struct ResponseBody {
    inner: Incoming,
    release: Option<Release>,
}

impl ResponseBody {
    pub(crate) fn new(inner: Incoming, in_flight: InFlight, h1: Option<H1Conn>) -> ResponseBody {
        ResponseBody {
            inner,
            release: Some(Release { in_flight, h1 }),
        }
    }

    fn finish(&mut self, clean: bool) {
        if let Some(release) = self.release.take() {
            if let (true, Some(mut conn)) = (clean, release.h1) {
                if conn.settle() {
                    release.in_flight.0.return_h1(conn);
                }
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        let polled = match this.release.as_mut().and_then(|r| r.h1.as_mut()) {
            Some(conn) => conn.poll_owned(cx, |conn, cx| {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if polled.is_pending() {
                    // Nothing buffered: let the connection read, then look again.
                    conn.drive(cx);
                    return Pin::new(&mut *inner).poll_frame(cx);
                }
                polled
            }),
            None => Pin::new(&mut *inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => this.finish(true),
            // Release as soon as the last frame is out (known-length bodies), not one poll later.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // An empty body that nobody polled (HEAD, 204, 304) still ended cleanly.
        let clean = self.inner.is_end_stream();
        self.finish(clean);
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
