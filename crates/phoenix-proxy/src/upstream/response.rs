//! The response body handed to the caller, which knows when the upstream exchange is over.
//!
//! A response body says nothing when it ends, yet two things must happen exactly then: the
//! server's in-flight count (used by least-requests) drops, and an HTTP/1.1 connection goes back to
//! the keep-alive pool. Doing either when the response *headers* arrive would be wrong for the
//! traffic this proxy exists for: an LLM token stream can run for minutes after its headers, and a
//! connection still streaming a body cannot carry another request. So the body is wrapped:
//! - at the end of the stream (or an empty body, e.g. HEAD, 204, 304) the connection is returned to
//!   the pool at once, so a client sending requests one after another reuses one connection;
//! - dropped before its end (client went away, error), the in-flight count drops but the HTTP/1.1
//!   connection is not reused: it is closed, since it is in an unknown state;
//! - a `101 Switching Protocols` response never returns its connection: it belongs to the upgrade
//!   ([`ResponseBody::take_upgrade`]).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::endpoint::Endpoint;
use super::h1::{H1Body, Upgraded};
use crate::body::BoxError;
use crate::plain::WireFields;
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

/// Where the body comes from.
enum Inner {
    /// An HTTP/1.1 exchange on a connection this body owns until the exchange is over.
    H1(H1Body),
    H2(Incoming),
    /// Finished, or handed to an upgrade.
    Ended,
}

/// Body of an upstream response, plus the bookkeeping described above.
pub struct ResponseBody {
    inner: Inner,
    in_flight: Option<InFlight>,
    /// The response's fields that are not in its header map (see `plain`).
    lines: Option<WireFields>,
}

impl ResponseBody {
    /// `lines`: the response's fields not in its header map (see `plain`).
    pub(crate) fn h1(body: H1Body, lines: Option<WireFields>, in_flight: InFlight) -> ResponseBody {
        ResponseBody {
            lines,
            inner: Inner::H1(body),
            in_flight: Some(in_flight),
        }
    }

    pub(crate) fn h2(body: Incoming, in_flight: InFlight) -> ResponseBody {
        ResponseBody {
            inner: Inner::H2(body),
            in_flight: Some(in_flight),
            lines: None,
        }
    }

    /// The response's fields that are not in its header map: the ordinary fields of the response
    /// to a plain request, which the client must get too (see `plain`).
    pub(crate) fn take_lines(&mut self) -> Option<WireFields> {
        self.lines.take()
    }

    /// The upstream's socket after a `101 Switching Protocols` (HTTP/1.1 only: an upgrade does not
    /// travel over HTTP/2, see `Endpoint::send`).
    pub fn take_upgrade(&mut self) -> Option<Upgraded> {
        match std::mem::replace(&mut self.inner, Inner::Ended) {
            Inner::H1(body) => body.into_upgraded(),
            other => {
                self.inner = other;
                None
            }
        }
    }

    fn finish(&mut self, clean: bool) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        if let Inner::H1(body) = std::mem::replace(&mut self.inner, Inner::Ended) {
            if let Some(conn) = body.into_reusable().filter(|_| clean) {
                in_flight.0.return_h1(conn);
            }
        }
    }

    fn inner_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(body) => body.is_end_stream(),
            Inner::H2(body) => body.is_end_stream(),
            Inner::Ended => true,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::H1(body) => body.poll_frame(cx).map_err(BoxError::from),
            Inner::H2(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Inner::Ended => Poll::Ready(None),
        };
        match &polled {
            Poll::Ready(None) => this.finish(true),
            // Release as soon as the last frame is out (known-length bodies), not one poll later.
            Poll::Ready(Some(Ok(_))) if this.inner_end_stream() => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H1(body) => body.size_hint(),
            Inner::H2(body) => body.size_hint(),
            Inner::Ended => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // An empty body that nobody polled (HEAD, 204, 304) still ended cleanly.
        let clean = self.inner_end_stream();
        self.finish(clean);
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ResponseBody");
        match &self.inner {
            Inner::H1(body) => d.field("h1", body),
            Inner::H2(body) => d.field("h2", body),
            Inner::Ended => d.field("ended", &true),
        };
        d.finish_non_exhaustive()
    }
}
