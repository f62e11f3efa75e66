//! Challenge validation: http-01 (RFC 8555 8.3) and tls-alpn-01 (RFC 8737), for DNS names and
//! IP addresses (RFC 8738), run in background tasks after the client POSTs to a challenge.
//!
//! Names resolve through `acme.resolve` first, else the system resolver. http-01 follows at
//! most a few redirects, and only to the same host over http on the validation port; the body is
//! capped at 8 KiB; every step has a timeout. Each attempt's outcome is written in one store
//! transaction that moves challenge, authorization and order together. Challenges left
//! `processing` by a stopped CA are resumed at startup (and on a client's re-POST).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::acme::{unix_now, AcmeState};
use crate::config::AcmeConfig;
use crate::jws::Jwk;
use crate::problem::{Problem, ProblemType};
use crate::store::{AccountRec, AuthzRec, Identifier, OrderRec, Status};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 8 * 1024;
const MAX_REDIRECTS: usize = 3;
const ATTEMPTS: u32 = 3;
const ATTEMPT_DELAY: Duration = Duration::from_millis(500);
/// RFC 8737 3: the ALPN protocol of tls-alpn-01.
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Performs validations; cheap to share.
pub(crate) struct Validator {
    cfg: AcmeConfig,
    tls: Arc<rustls::ClientConfig>,
}

impl Validator {
    pub(crate) fn new(cfg: AcmeConfig) -> Result<Validator, crate::CaError> {
        Ok(Validator {
            cfg,
            tls: Arc::new(insecure_challenge_tls::client_config()?),
        })
    }

    async fn resolve(&self, id: &Identifier, port: u16) -> Result<Vec<SocketAddr>, Problem> {
        if id.kind == "ip" {
            let ip: IpAddr = id
                .value
                .parse()
                .map_err(|_| Problem::malformed("bad IP identifier"))?;
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(target) = self.cfg.resolve.get(&id.value) {
            return Ok(vec![SocketAddr::new(target.ip, port)]);
        }
        let addrs: Vec<SocketAddr> = timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((id.value.as_str(), port)),
        )
        .await
        .map_err(|_| {
            Problem::new(
                ProblemType::Dns,
                format!("resolving {} timed out", id.value),
            )
        })?
        .map_err(|e| {
            Problem::new(
                ProblemType::Dns,
                format!("cannot resolve {}: {e}", id.value),
            )
        })?
        .collect();
        if addrs.is_empty() {
            return Err(Problem::new(
                ProblemType::Dns,
                format!("{} has no address", id.value),
            ));
        }
        Ok(addrs)
    }

    async fn connect(&self, id: &Identifier, port: u16) -> Result<TcpStream, Problem> {
        let mut last = Problem::new(ProblemType::Connection, "no address to connect to");
        for addr in self.resolve(id, port).await? {
            match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => {
                    last = Problem::new(
                        ProblemType::Connection,
                        format!("connecting to {addr}: {e}"),
                    )
                }
                Err(_) => {
                    last = Problem::new(
                        ProblemType::Connection,
                        format!("connecting to {addr} timed out"),
                    )
                }
            }
        }
        Err(last)
    }

    /// Runs one validation attempt.
    pub(crate) async fn validate(
        &self,
        kind: &str,
        id: &Identifier,
        token: &str,
        key_auth: &str,
    ) -> Result<(), Problem> {
        match kind {
            "http-01" => self.http01(id, token, key_auth).await,
            "tls-alpn-01" => self.tls_alpn01(id, key_auth).await,
            other => Err(Problem::malformed(format!(
                "unsupported challenge type {other}"
            ))),
        }
    }

    async fn http01(&self, id: &Identifier, token: &str, key_auth: &str) -> Result<(), Problem> {
        let port = self.cfg.http01_port;
        let host = match id.value.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => id.value.clone(),
        };
        let host_header = if port == 80 {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        let mut path = format!("/.well-known/acme-challenge/{token}");
        for _ in 0..=MAX_REDIRECTS {
            let stream = self.connect(id, port).await?;
            let exchange = async {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| {
                            Problem::new(ProblemType::Connection, format!("HTTP handshake: {e}"))
                        })?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let req = http::Request::get(path.as_str())
                    .header(http::header::HOST, host_header.as_str())
                    .header(http::header::USER_AGENT, "phoenix-ca-validator")
                    .body(Empty::<bytes::Bytes>::new())
                    .map_err(|e| Problem::internal(e.to_string()))?;
                let resp = sender.send_request(req).await.map_err(|e| {
                    Problem::new(ProblemType::Connection, format!("HTTP request: {e}"))
                })?;
                let status = resp.status();
                let location = resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .map(str::to_owned);
                let body = Limited::new(resp.into_body(), MAX_BODY)
                    .collect()
                    .await
                    .map_err(|_| {
                        Problem::unauthorized(format!(
                            "http-01 response body is larger than {MAX_BODY} bytes or broken"
                        ))
                    })?
                    .to_bytes();
                Ok::<_, Problem>((status, location, body))
            };
            let (status, location, body) =
                timeout(EXCHANGE_TIMEOUT, exchange).await.map_err(|_| {
                    Problem::new(ProblemType::Connection, "http-01 request timed out")
                })??;
            if status.is_redirection() {
                let loc =
                    location.ok_or_else(|| Problem::unauthorized("redirect without Location"))?;
                path = same_host_redirect(&loc, &host, port)?;
                continue;
            }
            if status != http::StatusCode::OK {
                return Err(Problem::unauthorized(format!(
                    "http-01: GET {path} answered {status}"
                )));
            }
            // RFC 8555 8.3: the server ignores trailing whitespace.
            let got = std::str::from_utf8(&body).unwrap_or("").trim_end();
            if got != key_auth {
                return Err(Problem::new(
                    ProblemType::IncorrectResponse,
                    format!("http-01: the key authorization served at {path} is wrong"),
                ));
            }
            return Ok(());
        }
        Err(Problem::unauthorized("http-01: too many redirects"))
    }

    async fn tls_alpn01(&self, id: &Identifier, key_auth: &str) -> Result<(), Problem> {
        let ip = if id.kind == "ip" {
            id.value.parse::<IpAddr>().ok()
        } else {
            None
        };
        // RFC 8738 6: for IP identifiers the SNI is the reverse-DNS name of the address.
        let sni = match ip {
            Some(ip) => reverse_dns_name(ip),
            None => id.value.clone(),
        };
        let server_name = ServerName::try_from(sni.clone())
            .map_err(|_| Problem::malformed(format!("{sni} is not a valid SNI name")))?;
        let port = self
            .cfg
            .resolve
            .get(&id.value)
            .and_then(|t| t.tls_port)
            .unwrap_or(self.cfg.tlsalpn01_port);
        let stream = self.connect(id, port).await?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = timeout(EXCHANGE_TIMEOUT, connector.connect(server_name, stream))
            .await
            .map_err(|_| Problem::new(ProblemType::Connection, "tls-alpn-01 handshake timed out"))?
            .map_err(|e| Problem::new(ProblemType::Tls, format!("tls-alpn-01 handshake: {e}")))?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(ACME_TLS_ALPN) {
            return Err(Problem::new(
                ProblemType::Tls,
                "tls-alpn-01: the server did not negotiate acme-tls/1",
            ));
        }
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| {
                Problem::new(ProblemType::Tls, "tls-alpn-01: no certificate presented")
            })?;
        check_alpn_certificate(cert.as_ref(), id, ip, key_auth)
    }
}

fn same_host_redirect(loc: &str, host: &str, port: u16) -> Result<String, Problem> {
    if loc.starts_with('/') && !loc.starts_with("//") {
        return Ok(loc.to_owned());
    }
    let uri: http::Uri = loc
        .parse()
        .map_err(|_| Problem::unauthorized("bad redirect Location"))?;
    let same = uri.scheme_str() == Some("http")
        && uri
            .host()
            .is_some_and(|h| h.eq_ignore_ascii_case(host.trim_matches(['[', ']'])) || h == host)
        && uri.port_u16().unwrap_or(80) == port;
    if !same {
        return Err(Problem::unauthorized(format!(
            "http-01: redirect to {loc} refused (only same-host http redirects are followed)"
        )));
    }
    Ok(uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into()))
}

/// `4.3.2.1.in-addr.arpa` / nibble `ip6.arpa` name of an address (RFC 8738 6).
pub(crate) fn reverse_dns_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// RFC 8737 3: exactly one SAN, the identifier; a critical acmeIdentifier extension holding
/// SHA-256(key authorization).
fn check_alpn_certificate(
    der: &[u8],
    id: &Identifier,
    ip: Option<IpAddr>,
    key_auth: &str,
) -> Result<(), Problem> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let bad = |m: &str| Problem::unauthorized(format!("tls-alpn-01: {m}"));
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| bad("certificate does not parse"))?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(|| bad("certificate has no subjectAltName"))?;
    let names = &san.value.general_names;
    let matches = names.len() == 1
        && match (&names[0], ip) {
            (GeneralName::DNSName(d), None) => d.eq_ignore_ascii_case(&id.value),
            (GeneralName::IPAddress(b), Some(ip)) => crate::authority::ip_from_bytes(b) == Some(ip),
            _ => false,
        };
    if !matches {
        return Err(bad(&format!(
            "the certificate must name exactly {}",
            id.value
        )));
    }
    let digest = phoenix_pki::tls_alpn01_ext_digest(der)
        .map_err(|e| bad(&e.to_string()))?
        .ok_or_else(|| bad("certificate lacks the acmeIdentifier extension"))?;
    if digest.as_slice() != Sha256::digest(key_auth.as_bytes()).as_slice() {
        return Err(Problem::new(
            ProblemType::IncorrectResponse,
            "tls-alpn-01: acmeIdentifier does not match the key authorization",
        ));
    }
    Ok(())
}

/// The one TLS client configuration that accepts any server certificate.
///
/// RFC 8737 validation connects to a server that proves control of a name by presenting a
/// *self-signed* certificate built for this challenge: there is no chain to verify, by design.
/// What the validator checks instead is the certificate's content (SAN and acmeIdentifier,
/// `check_alpn_certificate`), and the handshake signature still has to verify with that
/// certificate's key. This configuration is used only for tls-alpn-01; outside this module it is
/// offered only as [`crate::tls_alpn01_validation_client_config`], for ACME clients' tests.
pub(crate) mod insecure_challenge_tls {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AcceptChallengeCertificate;

    impl ServerCertVerifier for AcceptChallengeCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
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
            verify_handshake_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_handshake_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            SCHEMES.to_vec()
        }
    }

    /// Checks that the peer holds the key of the certificate it presented.
    ///
    /// rustls' own helper cannot be used: it parses the certificate with webpki, which
    /// (rightly, for ordinary certificates) refuses the critical acmeIdentifier extension that
    /// every RFC 8737 certificate carries. So the key comes from x509-parser and the signature
    /// is checked with aws-lc-rs directly.
    fn verify_handshake_signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        use aws_lc_rs::signature as sig;
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
        let key = parsed.public_key().subject_public_key.data.as_ref();
        let alg: &dyn sig::VerificationAlgorithm = match dss.scheme {
            SignatureScheme::ECDSA_NISTP256_SHA256 => &sig::ECDSA_P256_SHA256_ASN1,
            SignatureScheme::ECDSA_NISTP384_SHA384 => &sig::ECDSA_P384_SHA384_ASN1,
            SignatureScheme::ED25519 => &sig::ED25519,
            SignatureScheme::RSA_PKCS1_SHA256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            SignatureScheme::RSA_PKCS1_SHA384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            SignatureScheme::RSA_PKCS1_SHA512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            SignatureScheme::RSA_PSS_SHA256 => &sig::RSA_PSS_2048_8192_SHA256,
            SignatureScheme::RSA_PSS_SHA384 => &sig::RSA_PSS_2048_8192_SHA384,
            SignatureScheme::RSA_PSS_SHA512 => &sig::RSA_PSS_2048_8192_SHA512,
            _ => {
                return Err(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::NoSignatureSchemesInCommon,
                ))
            }
        };
        sig::UnparsedPublicKey::new(alg, key)
            .verify(message, dss.signature())
            .map(|_| HandshakeSignatureValid::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))
    }

    const SCHEMES: &[SignatureScheme] = &[
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PSS_SHA512,
        SignatureScheme::RSA_PKCS1_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384,
        SignatureScheme::RSA_PKCS1_SHA512,
    ];

    pub(crate) fn client_config() -> Result<rustls::ClientConfig, crate::CaError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| crate::CaError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptChallengeCertificate))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![super::ACME_TLS_ALPN.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(cfg)
    }
}

fn key_authorization(token: &str, account: &AccountRec) -> Result<String, Problem> {
    Ok(format!(
        "{token}.{}",
        Jwk::from_value(&account.jwk)?.thumbprint()
    ))
}

/// Starts validating `authz_id`'s challenge `kind` unless that validation is already running.
pub(crate) fn spawn_validation(state: &Arc<AcmeState>, authz_id: &str, kind: &str) {
    let key = format!("{authz_id}/{kind}");
    {
        let mut running = state.running.lock().unwrap_or_else(|p| p.into_inner());
        if !running.insert(key.clone()) {
            return;
        }
    }
    let st = state.clone();
    let (authz_id, kind) = (authz_id.to_owned(), kind.to_owned());
    let mut tasks = state.tasks.lock().unwrap_or_else(|p| p.into_inner());
    while tasks.try_join_next().is_some() {}
    tasks.spawn(async move {
        let outcome = run_validation(&st, &authz_id, &kind).await;
        if let Err(e) = outcome {
            tracing::error!(authz = %authz_id, error = %e.detail, "recording a validation failed");
        }
        st.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    });
}

async fn run_validation(state: &AcmeState, authz_id: &str, kind: &str) -> Result<(), Problem> {
    let authz = state
        .store
        .get::<AuthzRec>(authz_id)?
        .ok_or_else(|| Problem::not_found("authorization"))?;
    let account = state
        .store
        .get::<AccountRec>(&authz.account)?
        .ok_or_else(|| Problem::not_found("account"))?;
    let Some(ch) = authz.challenges.iter().find(|c| c.kind == kind) else {
        return Ok(());
    };
    let key_auth = key_authorization(&ch.token, &account)?;
    let mut result = Err(Problem::internal("validation did not run"));
    for attempt in 1..=ATTEMPTS {
        result = state
            .validator
            .validate(kind, &authz.identifier, &ch.token, &key_auth)
            .await;
        match &result {
            Ok(()) => break,
            Err(p) => tracing::info!(
                identifier = %authz.identifier.value, challenge = kind, attempt, error = %p.detail,
                "validation attempt failed"
            ),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(ATTEMPT_DELAY).await;
        }
    }
    let now = unix_now();
    state.store.write(|tx| {
        let Some(mut a) = tx.get::<AuthzRec>(authz_id)? else {
            return Ok(());
        };
        let Some(c) = a.challenges.iter_mut().find(|c| c.kind == kind) else {
            return Ok(());
        };
        if c.status != Status::Processing || a.status != Status::Pending {
            // Deactivated or otherwise moved on meanwhile: nothing to record.
            return Ok(());
        }
        let Some(mut order) = tx.get::<OrderRec>(&a.order)? else {
            return Ok(());
        };
        match &result {
            Ok(()) => {
                c.status = Status::Valid;
                c.validated = Some(now);
                a.status = Status::Valid;
                a.expires = now + crate::acme::VALID_AUTHZ_LIFETIME_SECS;
                tx.put(&a)?;
                if order.status == Status::Pending {
                    let mut all_valid = true;
                    for other in &order.authorizations {
                        let st = if *other == a.id {
                            Status::Valid
                        } else {
                            tx.get::<AuthzRec>(other)?
                                .map(|x| x.status)
                                .unwrap_or(Status::Invalid)
                        };
                        all_valid &= st == Status::Valid;
                    }
                    if all_valid {
                        order.status = Status::Ready;
                        tx.put(&order)?;
                    }
                }
            }
            Err(p) => {
                c.status = Status::Invalid;
                c.error = Some(p.to_json());
                a.status = Status::Invalid;
                tx.put(&a)?;
                if matches!(order.status, Status::Pending | Status::Ready) {
                    order.status = Status::Invalid;
                    order.error = Some(p.to_json());
                    tx.put(&order)?;
                }
            }
        }
        Ok::<_, Problem>(())
    })?;
    match &result {
        Ok(()) => {
            tracing::info!(identifier = %authz.identifier.value, challenge = kind, "validation succeeded")
        }
        Err(p) => {
            tracing::warn!(identifier = %authz.identifier.value, challenge = kind, error = %p.detail, "validation failed")
        }
    }
    Ok(())
}

/// Resumes validations that were `processing` when the CA stopped.
pub(crate) fn resume_pending(state: &Arc<AcmeState>) -> Result<usize, crate::CaError> {
    let mut n = 0;
    for a in state.store.all::<AuthzRec>()? {
        if a.status != Status::Pending {
            continue;
        }
        for c in &a.challenges {
            if c.status == Status::Processing {
                spawn_validation(state, &a.id, &c.kind);
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_dns_name("127.0.0.1".parse().unwrap()),
            "1.0.0.127.in-addr.arpa"
        );
        let v6 = reverse_dns_name("2001:db8::1".parse().unwrap());
        assert!(
            v6.starts_with("1.0.0.0.") && v6.ends_with("8.b.d.0.1.0.0.2.ip6.arpa"),
            "{v6}"
        );
    }

    #[test]
    fn redirects_only_to_the_same_host() {
        assert_eq!(same_host_redirect("/x", "a.test", 80).unwrap(), "/x");
        assert_eq!(
            same_host_redirect("http://a.test/y", "a.test", 80).unwrap(),
            "/y"
        );
        assert!(same_host_redirect("http://evil.test/y", "a.test", 80).is_err());
        assert!(same_host_redirect("https://a.test/y", "a.test", 80).is_err());
        assert!(same_host_redirect("//evil.test/y", "a.test", 80).is_err());
    }

    #[test]
    fn alpn_certificate_checks() {
        let key_auth = "token.thumb";
        let digest = Sha256::digest(key_auth.as_bytes());
        let mut params = rcgen::CertificateParams::new(vec!["a.phoenix.test".to_owned()]).unwrap();
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = Identifier {
            kind: "dns".into(),
            value: "a.phoenix.test".into(),
        };
        check_alpn_certificate(cert.der(), &id, None, key_auth).unwrap();
        let err = check_alpn_certificate(cert.der(), &id, None, "other").unwrap_err();
        assert_eq!(err.kind, ProblemType::IncorrectResponse);
        let other = Identifier {
            kind: "dns".into(),
            value: "b.phoenix.test".into(),
        };
        assert_eq!(
            check_alpn_certificate(cert.der(), &other, None, key_auth)
                .unwrap_err()
                .kind,
            ProblemType::Unauthorized
        );
    }
}
