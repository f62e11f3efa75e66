//! The HTTP client instant-acme talks to the ACME server through.
//!
//! instant-acme's default client trusts the platform's roots; the phoenix CA's HTTPS certificate
//! chains to the internal root instead, and a role must trust nothing but the roots it was
//! configured with. So the client is built here from [`phoenix_proxy::tls::client_config`] with
//! exactly those roots. Proxy environment variables are ignored (ACME traffic to an internal CA
//! must not leave through a corporate proxy) and redirects are not followed (RFC 8555 has none).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::RootCertStore;

use crate::CertsError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct AcmeHttp {
    client: reqwest::Client,
}

impl AcmeHttp {
    pub(crate) fn new(roots: Arc<RootCertStore>) -> Result<Self, CertsError> {
        let tls = phoenix_proxy::tls::client_config(roots, &[b"http/1.1"], None);
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
            .https_only(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| CertsError::Config(format!("cannot build the ACME HTTP client: {e}")))?;
        Ok(Self { client })
    }
}

/// reqwest's errors say "error sending request" and keep the reason (connection refused,
/// certificate not trusted, ...) in their source chain, which instant-acme's messages do not
/// show: flatten the chain into the message so that the operator sees why.
fn other(e: impl std::error::Error + Send + Sync + 'static) -> instant_acme::Error {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    instant_acme::Error::Other(message.into())
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.client.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // The request body is an in-memory JWS; collecting it cannot fail.
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            let request = reqwest::Request::try_from(http::Request::from_parts(parts, body))
                .map_err(other)?;
            let response = client.execute(request).await.map_err(other)?;
            let mut head = http::Response::builder()
                .status(response.status())
                .version(response.version());
            if let Some(headers) = head.headers_mut() {
                *headers = response.headers().clone();
            }
            let bytes = response.bytes().await.map_err(other)?;
            let (parts, ()) = head
                .body(())
                .map_err(instant_acme::Error::Http)?
                .into_parts();
            Ok(BytesResponse {
                parts,
                body: Box::new(bytes),
            })
        })
    }
}
