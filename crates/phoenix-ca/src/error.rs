//! Errors returned by the CA's library API (`init`, `serve`, `issue`, ...).
//!
//! ACME protocol errors are not here: they are RFC 7807 problem documents (see `problem.rs`) sent
//! to ACME clients. `CaError` is what the operator sees, so every message says what to do next.

use std::path::PathBuf;

/// Everything that can go wrong in the CA outside an ACME exchange.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The configuration is invalid; every problem is listed.
    #[error("invalid CA configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    /// `data_dir` holds no CA (or an incomplete one).
    #[error("no CA found in {}: {detail}; run `phoenix ca init` first", dir.display())]
    NotInitialised {
        /// The configured data directory.
        dir: PathBuf,
        /// What was missing or unreadable.
        detail: String,
    },
    /// `init` found an existing CA and refused to overwrite it.
    #[error("a CA already exists in {}; refusing to overwrite it (move the directory away to start a new CA)", dir.display())]
    AlreadyInitialised {
        /// The configured data directory.
        dir: PathBuf,
    },
    /// The store is held by another process (normally a running `phoenix ca serve`).
    #[error("the CA at {} is running (its store is locked by another process); stop `phoenix ca serve` before using this command, or obtain certificates from the running CA over ACME", dir.display())]
    Locked {
        /// The configured data directory.
        dir: PathBuf,
    },
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The embedded database failed.
    #[error("CA store: {0}")]
    Store(String),
    /// Key generation, signing or certificate parsing failed.
    #[error("certificate operation failed: {0}")]
    Pki(String),
    /// A requested name or address is outside the CA's `domains` / `networks`.
    #[error("{0}")]
    Policy(String),
    /// No certificate with this serial was issued by this CA.
    #[error("no certificate with serial {0} in this CA's store (see `phoenix ca list`)")]
    UnknownSerial(String),
    /// The certificate was already revoked.
    #[error("certificate {0} is already revoked")]
    AlreadyRevoked(String),
    /// Building the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The server could not run.
    #[error("CA server: {0}")]
    Serve(String),
}

impl CaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CaError::Io {
            path: path.into(),
            source,
        }
    }
}
