//! Trust bootstrap: from `ca_url` + root fingerprint (or a root PEM) to the one root a role trusts.
//!
//! A fresh role knows nothing but the CA's URL and the SHA-256 fingerprint of the CA's root, which
//! the operator copied from the CA host. It fetches `/roots.pem` over TLS without being able to
//! verify the server yet, so the connection is accepted provisionally and the chain the server
//! presented is kept. Nothing from that connection is believed until two checks pass: the served
//! root hashes to the configured fingerprint, and the presented chain verifies (webpki, with the
//! URL's host as the name) against exactly that root. An attacker in the middle can serve any
//! bytes, but cannot produce a root with the right hash nor a chain to it, so the check fails
//! closed. From then on only that root is a trust anchor; the platform's roots are never used.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::CertsError;

/// Where a role's trust in the internal CA comes from.
#[derive(Debug, Clone)]
pub enum TrustSource {
    /// Fetch `<ca_url>/roots.pem` and accept it only if the root's SHA-256 is `fingerprint` (hex,
    /// with or without colons, any case) and the CA's HTTPS server chains to it.
    Fingerprint { ca_url: String, fingerprint: String },
    /// A PEM file holding the root certificate(s), e.g. `ca_root = "root.pem"` or the CA's own
    /// `data_dir` on the CA host.
    RootFile(PathBuf),
    /// Root certificate(s) as PEM text.
    Pem(String),
}

/// The trust anchors a role uses for every TLS hop to internal services and to the CA.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    /// The trusted root(s) as PEM, e.g. to write out for clients.
    pub pem: String,
    /// The same roots for rustls configurations.
    pub roots: Arc<RootCertStore>,
    /// SHA-256 of the (first) root's DER, lowercase hex without separators.
    pub fingerprint: String,
}

/// The most `/roots.pem` may weigh; a root bundle is a few kilobytes.
const MAX_ROOTS_BODY: usize = 1 << 20;
/// How long the whole fetch of `/roots.pem` may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Establishes the trust anchors described by `source`. See the module documentation for the
/// checks made on a fingerprint-based bootstrap.
pub async fn bootstrap_trust(source: &TrustSource) -> Result<TrustBundle, CertsError> {
    match source {
        TrustSource::Pem(pem) => bundle_from_pem(pem, "root PEM"),
        TrustSource::RootFile(path) => {
            let pem = tokio::fs::read_to_string(path)
                .await
                .map_err(CertsError::io(path))?;
            bundle_from_pem(&pem, &path.display().to_string())
        }
        TrustSource::Fingerprint {
            ca_url,
            fingerprint,
        } => bootstrap_by_fingerprint(ca_url, fingerprint).await,
    }
}

/// Normalizes a SHA-256 fingerprint as operators write it (`AB:CD:...`, `abcd...`, optionally
/// prefixed `sha256:`) to 64 lowercase hex digits.
pub fn normalize_fingerprint(fingerprint: &str) -> Result<String, CertsError> {
    let trimmed = fingerprint.trim();
    let trimmed = trimmed
        .strip_prefix("sha256:")
        .or_else(|| trimmed.strip_prefix("SHA256:"))
        .unwrap_or(trimmed);
    let hex: String = trimmed
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CertsError::Config(format!(
            "ca_fingerprint {fingerprint:?} is not a SHA-256 fingerprint: expected 64 hex digits \
             (colons allowed), as printed by `phoenix ca fingerprint`"
        )));
    }
    Ok(hex)
}

fn bundle_from_pem(pem: &str, what: &str) -> Result<TrustBundle, CertsError> {
    let certs = phoenix_pki::parse_cert_pem_chain(pem)?;
    let Some(first) = certs.first() else {
        return Err(CertsError::Config(format!(
            "{what} contains no CERTIFICATE block"
        )));
    };
    let fingerprint = phoenix_pki::fingerprint_der(first);
    let roots = phoenix_proxy::tls::roots_from_pem(pem)?;
    Ok(TrustBundle {
        pem: pem.to_owned(),
        roots: Arc::new(roots),
        fingerprint,
    })
}

async fn bootstrap_by_fingerprint(
    ca_url: &str,
    fingerprint: &str,
) -> Result<TrustBundle, CertsError> {
    let expected = normalize_fingerprint(fingerprint)?;
    let target = CaTarget::parse(ca_url)?;
    let url = format!("{}/roots.pem", target.base);
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetch_provisionally(&target))
        .await
        .map_err(|_| CertsError::Fetch {
            url: url.clone(),
            message: format!("no answer within {}s", FETCH_TIMEOUT.as_secs()),
        })?
        .map_err(|message| CertsError::Fetch {
            url: url.clone(),
            message,
        })?;

    let body = std::str::from_utf8(&fetched.body).map_err(|_| CertsError::Fetch {
        url: url.clone(),
        message: "the body is not PEM text".to_owned(),
    })?;
    let served = phoenix_pki::parse_cert_pem_chain(body).map_err(|e| CertsError::Fetch {
        url: url.clone(),
        message: e.to_string(),
    })?;
    if served.is_empty() {
        return Err(CertsError::Fetch {
            url,
            message: "the body contains no certificate".to_owned(),
        });
    }
    let Some(root) = served
        .iter()
        .find(|der| phoenix_pki::fingerprint_der(der) == expected)
    else {
        let actual: Vec<String> = served
            .iter()
            .map(|d| phoenix_pki::fingerprint_der(d))
            .collect();
        return Err(CertsError::Fingerprint {
            expected,
            actual: actual.join(", "),
            detail: format!("the root served at {url} is not the configured one"),
        });
    };

    // The body matched; now make sure it came from the CA itself and not from someone relaying
    // the public root: the server we talked to must hold a certificate chaining to that root.
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(root.clone()))
        .map_err(|e| CertsError::Fingerprint {
            expected: expected.clone(),
            actual: expected.clone(),
            detail: format!("the served root is not usable as a trust anchor: {e}"),
        })?;
    let roots = Arc::new(roots);
    if let Err(e) = verify_presented_chain(&roots, &fetched.presented, &target.server_name) {
        let top = fetched
            .presented
            .last()
            .map(|c| phoenix_pki::fingerprint_der(c))
            .unwrap_or_else(|| "nothing".to_owned());
        return Err(CertsError::Fingerprint {
            expected,
            actual: format!("a server chain ending in {top}"),
            detail: format!(
                "the HTTPS server at {} does not chain to the root it served: {e}",
                target.base
            ),
        });
    }

    Ok(TrustBundle {
        pem: pem_encode_certificate(root),
        roots,
        fingerprint: expected,
    })
}

fn verify_presented_chain(
    roots: &Arc<RootCertStore>,
    presented: &[CertificateDer<'static>],
    server_name: &ServerName<'static>,
) -> Result<(), String> {
    let (end_entity, intermediates) = presented
        .split_first()
        .ok_or("the server presented no certificate")?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(end_entity, intermediates, server_name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The parsed `ca_url`.
struct CaTarget {
    /// `https://host:port` without a trailing slash or path.
    base: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    /// Value of the Host header.
    authority: String,
    /// Path of the CA below the authority, without a trailing slash (usually empty).
    prefix: String,
}

impl CaTarget {
    fn parse(ca_url: &str) -> Result<CaTarget, CertsError> {
        let bad = |why: &str| {
            CertsError::Config(format!(
                "ca_url {ca_url:?} {why}; write it as https://host[:port]"
            ))
        };
        let uri: http::Uri = ca_url.trim().parse().map_err(|_| bad("is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must use https"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| bad("has a host that is neither a DNS name nor an IP address"))?;
        let path = uri.path().trim_end_matches('/');
        Ok(CaTarget {
            base: format!("https://{authority}{path}"),
            host,
            port,
            server_name,
            authority: authority.to_string(),
            prefix: path.to_owned(),
        })
    }
}

struct Fetched {
    body: Bytes,
    presented: Vec<CertificateDer<'static>>,
}

/// GETs `/roots.pem` over a TLS connection whose server certificate is NOT verified yet, and
/// returns the body together with the chain that very connection presented.
async fn fetch_provisionally(target: &CaTarget) -> Result<Fetched, String> {
    // DANGEROUS on its own: nothing from this connection is believed until the chain it presented
    // has been verified against the fingerprint-checked root (see the module documentation).
    // Handshake signatures are still verified, so the chain belongs to the peer holding its key.
    let config = phoenix_proxy::tls::dangerous_insecure_client_config(&[b"http/1.1"]);
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let presented: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();

    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "roots.pem connection ended with an error");
        }
    });
    let request = http::Request::get(format!("{}/roots.pem", target.prefix))
        .header(http::header::HOST, &target.authority)
        .header(
            http::header::ACCEPT,
            "application/pem-certificate-chain, */*",
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ROOTS_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the body failed: {e}"))?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    Ok(Fetched { body, presented })
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

pub(crate) fn pem_encode_certificate(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so each chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_normalized() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&hex).unwrap(), hex);
        assert_eq!(normalize_fingerprint(&colons).unwrap(), hex);
        assert_eq!(
            normalize_fingerprint(&format!(" sha256:{colons} ")).unwrap(),
            hex
        );
        assert!(matches!(
            normalize_fingerprint("abcd"),
            Err(CertsError::Config(_))
        ));
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn ca_url_is_parsed() {
        let t = CaTarget::parse("https://127.0.0.1:9000/").unwrap();
        assert_eq!(t.base, "https://127.0.0.1:9000");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 9000));
        let t = CaTarget::parse("https://[::1]:9000/ca").unwrap();
        assert_eq!(t.base, "https://[::1]:9000/ca");
        assert_eq!(t.host, "::1");
        let t = CaTarget::parse("https://ca.phoenix.test").unwrap();
        assert_eq!(t.port, 443);
        assert!(CaTarget::parse("http://ca.phoenix.test").is_err());
        assert!(CaTarget::parse("not a url").is_err());
    }

    #[test]
    fn pem_roundtrip() {
        let der: Vec<u8> = (0..200u8).collect();
        let pem = pem_encode_certificate(&der);
        assert_eq!(phoenix_pki::parse_cert_pem_chain(&pem).unwrap(), vec![der]);
    }
}
