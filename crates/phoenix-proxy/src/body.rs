//! Body types shared by every module of the data plane.
//!
//! Requests and responses are streamed, never buffered whole, so the proxy passes bodies around as
//! boxed streams of `Bytes` frames. `UnsyncBoxBody` is used rather than `BoxBody` because hyper's
//! `Incoming` and the upgrade/streaming wrappers need not be `Sync`, and a body is only ever polled
//! by one task at a time. `BoxError` is the error type those streams carry: anything that went wrong
//! while reading (client aborted, size limit exceeded, upstream reset).

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Error carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body travelling towards an upstream (request) or back to the client (response).
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body (GET requests, 204 responses).
pub fn empty() -> UpstreamBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body made of one buffer, for short responses the proxy writes itself (errors, redirects).
pub fn full(bytes: impl Into<Bytes>) -> UpstreamBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts into `BoxError` (e.g. `hyper::body::Incoming`).
pub fn boxed<B>(body: B) -> UpstreamBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
