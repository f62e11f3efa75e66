//! Certificate lifecycle for Phoenix's gateway and mesh roles.
//!
//! A role that serves TLS needs three things from the internal CA, and this crate provides them
//! without a manual step:
//!
//! - **trust**: [`bootstrap_trust`] turns a `ca_url` plus the SHA-256 fingerprint of the root (or a
//!   root PEM file) into the only trust anchor the role will use afterwards;
//! - **a certificate**: [`CertManager::obtain`] runs an ACME (RFC 8555) order against the CA,
//!   answering `tls-alpn-01` (RFC 8737) on the role's own TLS listener through the shared
//!   [`phoenix_proxy::tls::CertResolver`], or `http-01` through [`Http01Tokens`] served by the
//!   gateway's HTTP listener;
//! - **renewal**: [`CertManager::run`] renews at two thirds of the lifetime or earlier when the CA's
//!   renewal information (RFC 9773) says so, swaps the new certificate into the resolver without
//!   touching open connections, keeps serving the old one and backs off while the CA is down, and
//!   keeps certificate and key on disk (key mode 0600) so that a restart needs no CA.
#![forbid(unsafe_code)]

mod acme_http;
mod challenge;
mod manager;
mod schedule;
mod store;
mod trust;

use std::path::PathBuf;

pub use challenge::{Challenge, Http01Tokens};
pub use manager::{AcmeSettings, CertManager, CertSpec, CertState, RenewalSchedule};
pub use schedule::{Backoff, Clock, ManualClock, SystemClock};
pub use trust::{bootstrap_trust, normalize_fingerprint, TrustBundle, TrustSource};

/// Everything that can go wrong while bootstrapping trust or obtaining a certificate.
///
/// Messages are written for the operator reading a log line: they say what was expected, what
/// was found and, where there is one, what to do.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// Reading or writing a file in the certificate directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The CA's root does not match the configured fingerprint, or the CA's HTTPS server does
    /// not chain to that root.
    #[error(
        "CA root fingerprint check failed: expected {expected}, got {actual}: {detail}; \
         compare with `phoenix ca fingerprint` on the CA host"
    )]
    Fingerprint {
        expected: String,
        actual: String,
        detail: String,
    },
    /// The CA (or another ACME server) could not be reached or answered something unusable.
    #[error("{url}: {message}")]
    Fetch { url: String, message: String },
    /// A setting is unusable (bad fingerprint syntax, no names, bad EAB key, ...).
    #[error("invalid certificate settings: {0}")]
    Config(String),
    /// The ACME server refused a request or the protocol failed at `step`.
    #[error("ACME {step} failed: {source}")]
    Acme {
        step: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    /// The CA could not validate our control of an identifier.
    #[error("ACME challenge for {identifier} failed: {detail}")]
    Challenge { identifier: String, detail: String },
    /// A certificate (issued or on disk) is not what was asked for.
    #[error("certificate problem: {0}")]
    Certificate(String),
    /// Building a TLS object from PEM failed.
    #[error(transparent)]
    Tls(#[from] phoenix_proxy::tls::TlsError),
    /// Parsing a certificate or building a challenge certificate failed.
    #[error(transparent)]
    Pki(#[from] phoenix_pki::PkiError),
}

impl CertsError {
    pub(crate) fn acme(step: &'static str) -> impl FnOnce(instant_acme::Error) -> CertsError {
        move |source| CertsError::Acme { step, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CertsError {
        let path = path.into();
        move |source| CertsError::Io { path, source }
    }
}
