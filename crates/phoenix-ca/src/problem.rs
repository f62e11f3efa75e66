//! ACME errors as RFC 7807 problem documents with the RFC 8555 section 6.7 error types.
//!
//! Handlers return `Result<_, Problem>`; the response carries `Content-Type:
//! application/problem+json`. The Replay-Nonce and Link headers every ACME response needs are
//! added by the router's middleware, so a problem never lacks the fresh nonce a client needs to
//! retry after `badNonce`.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

use crate::error::CaError;

/// An RFC 8555 error type (`urn:ietf:params:acme:error:<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProblemType {
    AccountDoesNotExist,
    AlreadyRevoked,
    BadCsr,
    BadNonce,
    BadPublicKey,
    BadRevocationReason,
    BadSignatureAlgorithm,
    Connection,
    Dns,
    ExternalAccountRequired,
    IncorrectResponse,
    InvalidContact,
    Malformed,
    OrderNotReady,
    RejectedIdentifier,
    ServerInternal,
    Tls,
    Unauthorized,
    UnsupportedContact,
    UnsupportedIdentifier,
}

impl ProblemType {
    fn urn(self) -> &'static str {
        match self {
            ProblemType::AccountDoesNotExist => "urn:ietf:params:acme:error:accountDoesNotExist",
            ProblemType::AlreadyRevoked => "urn:ietf:params:acme:error:alreadyRevoked",
            ProblemType::BadCsr => "urn:ietf:params:acme:error:badCSR",
            ProblemType::BadNonce => "urn:ietf:params:acme:error:badNonce",
            ProblemType::BadPublicKey => "urn:ietf:params:acme:error:badPublicKey",
            ProblemType::BadRevocationReason => "urn:ietf:params:acme:error:badRevocationReason",
            ProblemType::BadSignatureAlgorithm => {
                "urn:ietf:params:acme:error:badSignatureAlgorithm"
            }
            ProblemType::Connection => "urn:ietf:params:acme:error:connection",
            ProblemType::Dns => "urn:ietf:params:acme:error:dns",
            ProblemType::ExternalAccountRequired => {
                "urn:ietf:params:acme:error:externalAccountRequired"
            }
            ProblemType::IncorrectResponse => "urn:ietf:params:acme:error:incorrectResponse",
            ProblemType::InvalidContact => "urn:ietf:params:acme:error:invalidContact",
            ProblemType::Malformed => "urn:ietf:params:acme:error:malformed",
            ProblemType::OrderNotReady => "urn:ietf:params:acme:error:orderNotReady",
            ProblemType::RejectedIdentifier => "urn:ietf:params:acme:error:rejectedIdentifier",
            ProblemType::ServerInternal => "urn:ietf:params:acme:error:serverInternal",
            ProblemType::Tls => "urn:ietf:params:acme:error:tls",
            ProblemType::Unauthorized => "urn:ietf:params:acme:error:unauthorized",
            ProblemType::UnsupportedContact => "urn:ietf:params:acme:error:unsupportedContact",
            ProblemType::UnsupportedIdentifier => {
                "urn:ietf:params:acme:error:unsupportedIdentifier"
            }
        }
    }

    fn default_status(self) -> StatusCode {
        match self {
            ProblemType::Unauthorized | ProblemType::OrderNotReady => StatusCode::FORBIDDEN,
            ProblemType::ServerInternal => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// An RFC 7807 problem document.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub kind: ProblemType,
    pub detail: String,
    pub status: StatusCode,
    /// For badSignatureAlgorithm: the algorithms the server accepts (RFC 8555 6.2).
    pub algorithms: Option<Vec<&'static str>>,
    /// For 409 Conflict on keyChange: the account that already uses the key.
    pub location: Option<String>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    detail: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    algorithms: Option<&'a [&'static str]>,
}

impl Problem {
    pub(crate) fn new(kind: ProblemType, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            detail: detail.into(),
            status: kind.default_status(),
            algorithms: None,
            location: None,
        }
    }

    pub(crate) fn with_status(mut self, status: StatusCode) -> Problem {
        self.status = status;
        self
    }

    pub(crate) fn malformed(detail: impl Into<String>) -> Problem {
        Problem::new(ProblemType::Malformed, detail)
    }

    pub(crate) fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(ProblemType::Unauthorized, detail)
    }

    pub(crate) fn not_found(what: &str) -> Problem {
        Problem::malformed(format!("{what} does not exist")).with_status(StatusCode::NOT_FOUND)
    }

    pub(crate) fn internal(detail: impl Into<String>) -> Problem {
        Problem::new(ProblemType::ServerInternal, detail)
    }

    /// The JSON value stored in orders/challenges (`error` fields, RFC 8555 7.1.3 / 7.1.5).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.body()).unwrap_or_default()
    }

    fn body(&self) -> ProblemBody<'_> {
        ProblemBody {
            kind: self.kind.urn(),
            detail: &self.detail,
            status: self.status.as_u16(),
            algorithms: self.algorithms.as_deref(),
        }
    }
}

impl From<CaError> for Problem {
    fn from(e: CaError) -> Problem {
        tracing::error!(error = %e, "internal error while serving an ACME request");
        Problem::internal("internal error; see the CA's log")
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(loc) = self
            .location
            .as_deref()
            .and_then(|l| HeaderValue::from_str(l).ok())
        {
            resp.headers_mut().insert(header::LOCATION, loc);
        }
        resp
    }
}
