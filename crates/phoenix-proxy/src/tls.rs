//! The one module that builds rustls configurations for the data plane.
//!
//! Every TLS hop Phoenix makes or accepts gets its configuration here, so that verification is on by
//! construction: [`client_config`] always verifies the peer against the roots it is given, and the only
//! way to switch verification off is [`dangerous_insecure_client_config`], whose name says what it does.
//! The server side serves certificates through [`CertResolver`], an SNI resolver whose certificates can
//! be replaced at run time (renewal, ACME) without touching open connections: a connection keeps the
//! certificate it was handshaken with, new handshakes see the new one. The resolver also answers ACME
//! `tls-alpn-01` challenges (RFC 8737) when a ClientHello offers the `acme-tls/1` protocol.
//!
//! The crypto provider is [`crypto_provider`]: aws-lc-rs with the AES-128-GCM suites first. Binaries
//! install it as the process default once; the builders use that default (and fall back to it).
//! Listeners pick the suite by this order, not the client's: see [`crypto_provider`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// ALPN protocol id of the ACME TLS-ALPN-01 challenge (RFC 8737 section 6.2).
pub const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// What went wrong while loading certificates, keys or roots.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM: {message}")]
    Pem { what: String, message: String },
    #[error("{what} contains no certificate")]
    NoCertificate { what: String },
    #[error("{what} contains no private key (PKCS#8, PKCS#1 or SEC1 PEM expected)")]
    NoPrivateKey { what: String },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
    #[error("cannot build the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn pem_error(what: &str, err: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        what: what.to_owned(),
        message: err.to_string(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(crypto_provider()))
}

/// aws-lc-rs with every suite of its default set, AES-128-GCM first, then AES-256-GCM, then
/// ChaCha20-Poly1305, TLS 1.3 before TLS 1.2.
///
/// aws-lc-rs lists AES-256-GCM first, and so do OpenSSL clients; with TLS 1.3 that suite also brings
/// SHA-384, whose 128-byte blocks no common CPU instruction computes, into every step of the
/// handshake's key schedule: in a handshake per request, SHA-512 blocks were 42% of the gateway's
/// instructions. AES-128-GCM comes with SHA-256, which x86 and ARM CPUs compute with instructions of
/// their own, and fewer AES rounds per record; it is the suite RFC 8446 requires every TLS 1.3 peer
/// to implement, and the one Go's TLS stack prefers on CPUs with AES instructions. Listeners
/// therefore choose by this order, not the client's (`ignore_client_order`), and Phoenix's own
/// client offers it first. Clients without AES instructions would rather have ChaCha20; rustls
/// cannot choose per client, and the deployments Phoenix is for run on CPUs with AES.
pub fn crypto_provider() -> CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let rank = |suite: &rustls::SupportedCipherSuite| {
        let bulk = match suite.suite() {
            S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            S::TLS13_AES_256_GCM_SHA384
            | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        };
        (
            suite.version().version != rustls::ProtocolVersion::TLSv1_3,
            bulk,
        )
    };
    // A stable sort: suites of equal rank keep aws-lc-rs's order (ECDSA before RSA).
    provider.cipher_suites.sort_by_key(rank);
    provider
}

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

/// A client configuration that verifies the server against `roots` (and nothing else), offers the
/// given ALPN protocols, and presents `client_cert` when the server asks for one (mTLS).
pub fn client_config(
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
    client_cert: Option<Arc<CertifiedKey>>,
) -> Arc<rustls::ClientConfig> {
    let identity =
        client_cert.map(|key| Arc::new(FixedClientCert(key)) as Arc<dyn ResolvesClientCert>);
    client_config_with_identity(roots, alpn, identity)
}

/// Like [`client_config`], with the client certificate chosen at each handshake by `identity`, e.g.
/// [`CertResolver::client_identity`], so a renewed certificate is presented without a new config.
pub fn client_config_with_identity(
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
    identity: Option<Arc<dyn ResolvesClientCert>>,
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(identity),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A client configuration that accepts ANY server certificate. Only for `tls_insecure_skip_verify`,
/// which the caller must log. Handshake signatures are still checked, so the connection is at least
/// encrypted to whoever holds the presented key; who that is, nobody knows.
pub fn dangerous_insecure_client_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(InsecureAcceptAnyServer {
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Presents one fixed certificate whenever a server requests client authentication.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct InsecureAcceptAnyServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for InsecureAcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Trust anchors from PEM text (one or more `CERTIFICATE` blocks).
pub fn roots_from_pem(pem: &str) -> Result<RootCertStore, TlsError> {
    roots_from_pem_named(pem.as_bytes(), "root PEM")
}

/// Trust anchors from a PEM file.
pub fn load_roots(pem_path: &Path) -> Result<RootCertStore, TlsError> {
    let bytes = read_file(pem_path)?;
    roots_from_pem_named(&bytes, &pem_path.display().to_string())
}

fn roots_from_pem_named(pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let certs = certs_from_pem(pem, what)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: what.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// A certificate chain (leaf first) and its private key from two PEM files, checked to belong together.
pub fn load_certified_key(
    cert_chain_pem: &Path,
    key_pem: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_file(cert_chain_pem)?;
    let key = read_file(key_pem)?;
    certified_key_from_parts(
        &chain,
        &cert_chain_pem.display().to_string(),
        &key,
        &key_pem.display().to_string(),
    )
}

/// A certificate chain (leaf first) and its private key from PEM text (e.g. fresh from ACME).
pub fn certified_key_from_pem(
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, TlsError> {
    certified_key_from_parts(
        cert_chain_pem.as_bytes(),
        "certificate PEM",
        key_pem.as_bytes(),
        "key PEM",
    )
}

fn certified_key_from_parts(
    chain: &[u8],
    chain_what: &str,
    key: &[u8],
    key_what: &str,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = certs_from_pem(chain, chain_what)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            what: key_what.to_owned(),
        },
        other => pem_error(key_what, other),
    })?;
    let certified =
        CertifiedKey::from_der(certs, key, &provider()).map_err(|source| TlsError::Rustls {
            what: format!("{chain_what} with key {key_what}"),
            source,
        })?;
    Ok(Arc::new(certified))
}

/// DNS names (subjectAltName dNSName entries, lowercase) of a DER certificate; used to check a
/// client certificate against an allow-list after the mTLS handshake.
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    names
}

/// The notAfter of the leaf of a chain.
fn leaf_not_after(key: &CertifiedKey) -> Option<time::OffsetDateTime> {
    let leaf = key.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(parsed.validity().not_after.to_datetime())
}

// ---------------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Served {
    key: Arc<CertifiedKey>,
    not_after: Option<time::OffsetDateTime>,
}

impl Served {
    fn new(key: Arc<CertifiedKey>) -> Self {
        let not_after = leaf_not_after(&key);
        Self { key, not_after }
    }
}

#[derive(Clone, Default)]
struct Certificates {
    by_name: HashMap<String, Served>,
    default: Option<Served>,
    challenges: HashMap<String, Arc<CertifiedKey>>,
}

/// SNI certificate resolver whose certificates are swapped atomically at run time.
///
/// Lookup order for a normal handshake: exact SNI name, then a wildcard `*.parent` entry, then the
/// default certificate; with none of them the handshake is refused. A ClientHello that offers ALPN
/// `acme-tls/1` gets only the challenge certificate for its SNI name (RFC 8737 section 3), never a
/// regular one, so a validation server cannot be confused by the real certificate.
pub struct CertResolver {
    certs: ArcSwap<Certificates>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let certs = self.certs.load();
        f.debug_struct("CertResolver")
            .field("names", &certs.by_name.keys().collect::<Vec<_>>())
            .field("default", &certs.default.is_some())
            .field("challenges", &certs.challenges.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl CertResolver {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            certs: ArcSwap::from_pointee(Certificates::default()),
        })
    }

    /// Certificate served when no name matches (or the client sends no SNI).
    pub fn set_default(&self, key: Arc<CertifiedKey>) {
        let served = Served::new(key);
        self.certs.rcu(|current| {
            let mut next = Certificates::clone(current);
            next.default = Some(served.clone());
            next
        });
    }

    /// Serves `key` for SNI `name` (exact, or `*.example.com`) from the next handshake on. Open
    /// connections are not affected.
    pub fn set(&self, name: &str, key: Arc<CertifiedKey>) {
        let name = normalize(name);
        let served = Served::new(key);
        self.certs.rcu(|current| {
            let mut next = Certificates::clone(current);
            next.by_name.insert(name.clone(), served.clone());
            next
        });
    }

    /// Stops serving a name-specific certificate.
    pub fn remove(&self, name: &str) {
        let name = normalize(name);
        self.certs.rcu(|current| {
            let mut next = Certificates::clone(current);
            next.by_name.remove(&name);
            next
        });
    }

    /// Installs the RFC 8737 validation certificate for `name`.
    pub fn set_challenge(&self, name: &str, key: Arc<CertifiedKey>) {
        let name = normalize(name);
        self.certs.rcu(|current| {
            let mut next = Certificates::clone(current);
            next.challenges.insert(name.clone(), key.clone());
            next
        });
    }

    pub fn clear_challenge(&self, name: &str) {
        let name = normalize(name);
        self.certs.rcu(|current| {
            let mut next = Certificates::clone(current);
            next.challenges.remove(&name);
            next
        });
    }

    /// notAfter of every served certificate, by name (`"default"` for the default one).
    pub fn not_after(&self) -> Vec<(String, time::OffsetDateTime)> {
        let certs = self.certs.load();
        let mut out: Vec<(String, time::OffsetDateTime)> = certs
            .by_name
            .iter()
            .filter_map(|(name, served)| served.not_after.map(|t| (name.clone(), t)))
            .collect();
        if let Some(t) = certs.default.as_ref().and_then(|d| d.not_after) {
            out.push(("default".to_owned(), t));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The certificate a normal handshake for `sni` would get.
    /// This role's certificate as its client identity towards the next hop (mTLS): the current
    /// default certificate, read at each handshake so renewals take effect on new connections.
    pub fn client_identity(self: &Arc<Self>) -> Arc<dyn ResolvesClientCert> {
        Arc::new(ClientIdentity(self.clone()))
    }

    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        if let Some(sni) = sni {
            let sni = normalize(sni);
            if let Some(served) = certs.by_name.get(&sni) {
                return Some(served.key.clone());
            }
            if let Some((_, parent)) = sni.split_once('.') {
                if let Some(served) = certs.by_name.get(&format!("*.{parent}")) {
                    return Some(served.key.clone());
                }
            }
        }
        certs.default.as_ref().map(|d| d.key.clone())
    }
}

/// See [`CertResolver::client_identity`].
#[derive(Debug)]
struct ClientIdentity(Arc<CertResolver>);

impl ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.lookup(None)
    }

    fn has_certs(&self) -> bool {
        self.0.lookup(None).is_some()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_ACME_TLS));
        if acme {
            let name = normalize(hello.server_name()?);
            let found = self.certs.load().challenges.get(&name).cloned();
            if found.is_none() {
                tracing::debug!(name, "acme-tls/1 handshake without a challenge certificate");
            }
            return found;
        }
        let found = self.lookup(hello.server_name());
        if found.is_none() {
            tracing::debug!(
                sni = hello.server_name(),
                "no certificate for this name; handshake refused"
            );
        }
        found
    }
}

/// The server configuration of a proxy listener: TLS 1.2 and 1.3, ALPN h2 and http/1.1 (and
/// `acme-tls/1`, so the resolver can answer challenges; the server closes such connections right
/// after the handshake). With `client_auth`, a client certificate chaining to those roots is required;
/// which names are allowed is checked by the server after the handshake.
pub fn server_config(
    resolver: Arc<CertResolver>,
    client_auth: Option<Arc<RootCertStore>>,
) -> Arc<rustls::ServerConfig> {
    try_server_config(resolver, client_auth).expect("client-auth roots must not be empty")
}

/// As [`server_config`], reporting an unusable client-auth root store instead of panicking.
pub fn try_server_config(
    resolver: Arc<CertResolver>,
    client_auth: Option<Arc<RootCertStore>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3");
    let mutual = client_auth.is_some();
    let builder = match client_auth {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    if !mutual {
        // Resumption for every client, not only for the last 128 handshakes: rustls otherwise
        // keeps sessions in a 256-entry cache behind one lock for all workers, two per handshake.
        // Tickets are encrypted with keys that live only in memory and rotate every 6 hours. A
        // listener that requires client certificates keeps the cache: its clients are a few
        // proxies with long-lived connections, and a session there carries a client identity.
        config.ticketer =
            rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|source| TlsError::Rustls {
                what: "session ticket keys".into(),
                source,
            })?;
    }
    // The provider's order, AES-128-GCM first (see `crypto_provider`).
    config.ignore_client_order = true;
    config.alpn_protocols = vec![
        ALPN_H2.to_vec(),
        ALPN_HTTP11.to_vec(),
        ALPN_ACME_TLS.to_vec(),
    ];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install() {
        let _ = crypto_provider().install_default();
    }

    fn self_signed(name: &str) -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    #[test]
    fn the_provider_keeps_every_suite_and_puts_aes_128_gcm_first() {
        let ours: Vec<_> = crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut theirs: Vec<_> = rustls::crypto::aws_lc_rs::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(ours[1], rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let first_tls12 = crypto_provider()
            .cipher_suites
            .iter()
            .find(|s| s.version().version != rustls::ProtocolVersion::TLSv1_3)
            .map(|s| s.suite());
        assert_eq!(
            first_tls12,
            Some(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
        );
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        theirs.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, theirs, "a suite was dropped or added");
    }

    /// A proxy listener's acceptor with a self-signed certificate for `test.invalid`, and the
    /// roots that trust it.
    fn listener() -> (tokio_rustls::TlsAcceptor, Arc<RootCertStore>) {
        install();
        let (cert, key) = self_signed("test.invalid");
        let resolver = CertResolver::new();
        resolver.set_default(certified_key_from_pem(&cert, &key).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(resolver, None));
        (acceptor, Arc::new(roots_from_pem(&cert).unwrap()))
    }

    /// One handshake of `client` with `acceptor`, reading until the server closes (which is when
    /// the client takes in the session tickets): how it went, and the suite it agreed on.
    async fn handshake(
        acceptor: &tokio_rustls::TlsAcceptor,
        client: Arc<rustls::ClientConfig>,
    ) -> (rustls::HandshakeKind, rustls::CipherSuite) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = async {
            let mut tls = acceptor.accept(b).await.unwrap();
            tls.write_all(b"x").await.unwrap();
            tls.shutdown().await.unwrap();
        };
        let client = async {
            let connector = tokio_rustls::TlsConnector::from(client);
            let name = ServerName::try_from("test.invalid").unwrap();
            let mut tls = connector.connect(name, a).await.unwrap();
            let mut read = Vec::new();
            tls.read_to_end(&mut read).await.unwrap();
            assert_eq!(read, b"x");
            let conn = tls.get_ref().1;
            let suite = conn.negotiated_cipher_suite().unwrap().suite();
            (conn.handshake_kind().unwrap(), suite)
        };
        tokio::join!(server, client).1
    }

    #[tokio::test]
    async fn a_listener_chooses_aes_128_gcm_over_the_clients_first_choice() {
        let (acceptor, roots) = listener();
        // A client that, like OpenSSL's, lists AES-256-GCM first.
        let client_provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        assert_eq!(
            client_provider.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let client = rustls::ClientConfig::builder_with_provider(client_provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (_, suite) = handshake(&acceptor, Arc::new(client)).await;
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }

    #[tokio::test]
    async fn a_client_resumes_after_more_handshakes_than_a_session_cache_holds() {
        use rustls::HandshakeKind::{Full, Resumed};
        let (acceptor, roots) = listener();
        let client = || client_config(roots.clone(), &[], None);
        let first = client();
        assert_eq!(handshake(&acceptor, first.clone()).await.0, Full);
        // rustls's own session cache holds 256 sessions, two per handshake: these push the first
        // client's sessions out of it.
        for _ in 0..140 {
            assert_eq!(handshake(&acceptor, client()).await.0, Full);
        }
        assert_eq!(handshake(&acceptor, first).await.0, Resumed);
    }

    #[test]
    fn loads_key_and_rejects_mismatch() {
        install();
        let (cert_a, key_a) = self_signed("a.test");
        let (_, key_b) = self_signed("b.test");
        let key = certified_key_from_pem(&cert_a, &key_a).unwrap();
        assert_eq!(dns_names(&key.cert[0]), vec!["a.test".to_owned()]);
        let err = certified_key_from_pem(&cert_a, &key_b).unwrap_err();
        assert!(matches!(err, TlsError::Rustls { .. }), "{err}");
        let err = certified_key_from_pem(&cert_a, "").unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        let err = roots_from_pem("no pem here").unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert_eq!(roots_from_pem(&cert_a).unwrap().len(), 1);
    }

    #[test]
    fn resolver_lookup_order() {
        install();
        let (ca, ka) = self_signed("a.test");
        let (cw, kw) = self_signed("*.w.test");
        let (cd, kd) = self_signed("default.test");
        let a = certified_key_from_pem(&ca, &ka).unwrap();
        let w = certified_key_from_pem(&cw, &kw).unwrap();
        let d = certified_key_from_pem(&cd, &kd).unwrap();
        let resolver = CertResolver::new();
        assert!(resolver.lookup(Some("a.test")).is_none());
        resolver.set("A.Test.", a.clone());
        resolver.set("*.w.test", w.clone());
        assert!(Arc::ptr_eq(&resolver.lookup(Some("a.test")).unwrap(), &a));
        assert!(Arc::ptr_eq(&resolver.lookup(Some("x.w.test")).unwrap(), &w));
        assert!(resolver.lookup(Some("y.x.w.test")).is_none());
        resolver.set_default(d.clone());
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("other.test")).unwrap(),
            &d
        ));
        assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &d));
        let names: Vec<String> = resolver.not_after().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["*.w.test", "a.test", "default"]);
    }
}
