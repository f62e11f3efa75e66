//! `phoenix trace URL`: one request through the flow, and what every hop did with it.
//!
//! The first hop (client -> gateway) is measured here: this command makes the TLS connection itself
//! with rustls, so it can report the version, cipher and certificate chain it got and whether that
//! chain verified against `--cacert`. It sends `X-Phoenix-Trace: 1`; each Phoenix hop whose
//! `trace_networks` contain its caller adds an `X-Phoenix-Trace-Hop` response header describing the
//! connection it accepted and the one it made upstream (see `phoenix_proxy::trace`). From these the
//! command builds the hop table and the "encryption boundaries": where TLS ends and where the request
//! travels in plaintext, measured on the live flow rather than read from a file.
//!
//! Verification failure of the first hop does not stop the trace (seeing which certificate a server
//! wrongly serves is the point), but it is reported and makes the command exit non-zero.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_proxy::trace::{describe_cert, CertReport, HopReport, TRACE_HOP, TRACE_REQUEST};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;

/// The Debian system bundle, used when no `--cacert` is given (see `phoenix trust install`).
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What to trace.
#[derive(Debug, Clone)]
pub struct TraceRequest {
    pub url: String,
    pub cacert: Option<PathBuf>,
    /// curl's `HOST:PORT:ADDR`.
    pub resolve: Vec<String>,
    pub timeout: Duration,
}

/// The result: the hops in order from the client, the boundaries, and the raw hop reports.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub url: String,
    pub status: u16,
    pub hops: Vec<Hop>,
    pub boundaries: Vec<Boundary>,
    /// Set when hops stopped reporting before the backend, with the likely reason.
    pub incomplete: Option<String>,
    pub reports: Vec<HopReport>,
}

/// One connection of the flow.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    pub number: usize,
    pub from: String,
    pub to: String,
    pub from_addr: Option<String>,
    pub to_addr: Option<String>,
    /// `HTTPS`, `HTTP` or `H2C`.
    pub protocol: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub http: String,
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub certificate: Option<CertReport>,
    pub chain: Vec<CertReport>,
    /// How the certificate was verified, or why it was not.
    pub verified: Option<String>,
    pub verified_ok: bool,
    pub client_cert: Option<CertReport>,
    /// Time from sending on this connection to the response headers, as the sender measured it.
    pub time_ms: Option<f64>,
    pub error: Option<String>,
}

/// Whether the request is encrypted on a hop or decrypted at a role.
#[derive(Debug, Clone, Serialize)]
pub struct Boundary {
    pub place: String,
    pub state: String,
    pub detail: String,
}

/// Records what the webpki verifier said, and lets the handshake finish either way so the
/// certificate can be reported. Handshake signatures are always checked.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    outcome: Mutex<Option<Result<(), String>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let outcome = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map(|_| ())
            .map_err(|e| e.to_string());
        *self.outcome.lock().expect("verifier lock") = Some(outcome);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        bail!("{} holds no usable CERTIFICATE", path.display());
    }
    Ok(roots)
}

/// Where the client connects: `--resolve` first, else DNS.
async fn connect_addr(host: &str, port: u16, resolve: &[String]) -> anyhow::Result<SocketAddr> {
    for r in resolve {
        let mut parts = r.splitn(3, ':');
        let (Some(h), Some(p), Some(addr)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("--resolve {r:?}: write HOST:PORT:ADDRESS");
        };
        if h.eq_ignore_ascii_case(host) && p.parse() == Ok(port) {
            let ip: std::net::IpAddr = addr
                .trim_matches(['[', ']'])
                .parse()
                .with_context(|| format!("--resolve {r:?}: {addr:?} is not an IP address"))?;
            return Ok(SocketAddr::new(ip, port));
        }
    }
    // RFC 6761 section 6.3: *.localhost is loopback; curl and browsers resolve it themselves, and
    // the embedded default (`phoenix.localhost`) relies on it.
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

/// Sends the traced request and assembles the report.
pub async fn trace(req: &TraceRequest) -> anyhow::Result<Trace> {
    tokio::time::timeout(req.timeout, trace_inner(req))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {:?}", req.timeout))?
}

async fn trace_inner(req: &TraceRequest) -> anyhow::Result<Trace> {
    let uri: http::Uri = req
        .url
        .parse()
        .with_context(|| format!("{:?} is not a URL", req.url))?;
    if uri.scheme_str() != Some("https") {
        bail!("phoenix trace follows the encrypted flow: give an https:// URL");
    }
    let host = uri.host().context("the URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let addr = connect_addr(host.trim_matches(['[', ']']), port, &req.resolve).await?;

    let (roots_path, roots) = match &req.cacert {
        Some(p) => (p.clone(), load_roots(p)?),
        None => (
            PathBuf::from(SYSTEM_BUNDLE),
            load_roots(Path::new(SYSTEM_BUNDLE))
                .with_context(|| "no --cacert given and the system trust store is unreadable")?,
        ),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the certificate verifier")?;
    let verifier = Arc::new(RecordingVerifier {
        inner,
        outcome: Mutex::new(None),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let local = tcp.local_addr().ok();
    let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .with_context(|| format!("{host:?} is not a TLS server name"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let session = tls.get_ref().1;
    let tls_version = session.protocol_version().map(|v| match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        other => format!("{other:?}"),
    });
    let cipher = session
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .map(str::to_owned);
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let h2 = session.alpn_protocol() == Some(b"h2");
    let chain: Vec<CertReport> = session
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .filter_map(|c| describe_cert(c))
        .collect();
    let outcome = verifier.outcome.lock().expect("verifier lock").clone();
    let (verified, verified_ok) = match outcome {
        Some(Ok(())) => (format!("yes, against {}", roots_path.display()), true),
        Some(Err(e)) => (format!("NOT VERIFIED: {e}"), false),
        None => ("NOT VERIFIED: no certificate".to_owned(), false),
    };

    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or(host.clone());
    let mut builder = http::Request::builder()
        .method(http::Method::GET)
        .header(&TRACE_REQUEST, "1")
        .header(
            http::header::USER_AGENT,
            concat!("phoenix-trace/", env!("CARGO_PKG_VERSION")),
        );
    let response = if h2 {
        builder = builder
            .uri(format!("https://{authority}{path}"))
            .version(http::Version::HTTP_2);
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        tx.send_request(builder.body(Empty::<Bytes>::new())?).await
    } else {
        builder = builder
            .uri(path.as_str())
            .header(http::header::HOST, authority.as_str());
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(conn);
        tx.send_request(builder.body(Empty::<Bytes>::new())?).await
    }
    .context("sending the request")?;
    let first_byte = started.elapsed();
    let status = response.status().as_u16();
    let mut reports = Vec::new();
    for value in response.headers().get_all(&TRACE_HOP) {
        reports.push(HopReport::from_header(value).map_err(anyhow::Error::msg)?);
    }
    // Each hop appends after the hops behind it: the nearest hop comes last.
    reports.reverse();
    // The body is not needed, but reading it lets the server finish cleanly.
    let _ = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect()).await;

    let first = reports.first();
    let first_hop = Hop {
        number: 1,
        from: "client".into(),
        to: first.map_or("server".into(), |r| r.role.clone()),
        from_addr: local.map(|a| a.to_string()),
        to_addr: Some(addr.to_string()),
        protocol: "HTTPS".into(),
        http: if h2 { "HTTP/2" } else { "HTTP/1.1" }.into(),
        tls_version,
        cipher,
        sni: first
            .and_then(|r| r.downstream.tls.as_ref())
            .and_then(|t| t.sni.clone())
            .or(Some(host.clone())),
        alpn,
        certificate: chain.first().cloned(),
        chain: chain.iter().skip(1).cloned().collect(),
        verified: Some(verified),
        verified_ok,
        client_cert: first
            .and_then(|r| r.downstream.tls.as_ref())
            .and_then(|t| t.client_cert.clone()),
        time_ms: Some(ms(first_byte)),
        error: None,
    };
    Ok(assemble(req.url.clone(), status, first_hop, reports))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Builds the hops after the first from the reports, and the boundaries from all hops.
fn assemble(url: String, status: u16, first: Hop, reports: Vec<HopReport>) -> Trace {
    let mut hops = vec![first];
    for (i, r) in reports.iter().enumerate() {
        let next = reports.get(i + 1);
        let Some(up) = &r.upstream else {
            if let Some(e) = &r.error {
                hops.push(Hop {
                    number: hops.len() + 1,
                    from: r.role.clone(),
                    to: "upstream".into(),
                    from_addr: None,
                    to_addr: None,
                    protocol: "-".into(),
                    http: "-".into(),
                    tls_version: None,
                    cipher: None,
                    sni: None,
                    alpn: None,
                    certificate: None,
                    chain: Vec::new(),
                    verified: None,
                    verified_ok: false,
                    client_cert: None,
                    time_ms: r.upstream_ms,
                    error: Some(e.clone()),
                });
            }
            continue;
        };
        let tls = up.tls.as_ref();
        let verified = tls.and_then(|t| t.verified.clone());
        hops.push(Hop {
            number: hops.len() + 1,
            from: r.role.clone(),
            to: next.map_or("backend".into(), |n| n.role.clone()),
            from_addr: up
                .from
                .clone()
                .or_else(|| next.and_then(|n| n.downstream.from.clone())),
            to_addr: up.to.clone(),
            protocol: up.scheme.to_ascii_uppercase(),
            http: up.http.clone(),
            tls_version: tls.map(|t| t.version.clone()),
            cipher: tls.and_then(|t| t.cipher.clone()),
            sni: tls.and_then(|t| t.sni.clone()),
            alpn: tls.and_then(|t| t.alpn.clone()),
            certificate: tls.and_then(|t| t.certificate.clone()),
            chain: tls.map(|t| t.chain.clone()).unwrap_or_default(),
            verified_ok: verified.as_deref().is_some_and(|v| !v.starts_with("NOT")),
            verified,
            client_cert: next
                .and_then(|n| n.downstream.tls.as_ref())
                .and_then(|t| t.client_cert.clone()),
            time_ms: r.upstream_ms,
            error: r.error.clone(),
        });
    }
    let incomplete = if reports.is_empty() {
        Some("no hop reported: the first hop is not a Phoenix role, or this address is not in its trace_networks".to_owned())
    } else if reports
        .last()
        .is_some_and(|r| r.upstream.as_ref().is_some_and(|u| u.tls.is_some()))
    {
        Some(format!(
            "the {} sent the request on over TLS, but the next hop did not report: it is not a Phoenix role, or the {} is not in its trace_networks",
            reports.last().map_or("", |r| r.role.as_str()),
            reports.last().map_or("", |r| r.role.as_str()),
        ))
    } else {
        None
    };
    let boundaries = boundaries(&hops, &reports);
    Trace {
        url,
        status,
        hops,
        boundaries,
        incomplete,
        reports,
    }
}

fn boundaries(hops: &[Hop], reports: &[HopReport]) -> Vec<Boundary> {
    let mut out = Vec::new();
    for (i, hop) in hops.iter().enumerate() {
        let place = format!("{} -> {}", hop.from, hop.to);
        if hop.error.is_some() {
            out.push(Boundary {
                place,
                state: "FAILED".into(),
                detail: hop.error.clone().unwrap_or_default(),
            });
            continue;
        }
        if hop.protocol == "HTTPS" {
            let mut detail = format!(
                "{} {}",
                hop.tls_version.as_deref().unwrap_or("TLS"),
                hop.cipher.as_deref().unwrap_or("")
            );
            if hop.client_cert.is_some() {
                detail.push_str(", mutual TLS");
            }
            detail.push_str(", certificate ");
            detail.push_str(if hop.verified_ok {
                "verified"
            } else {
                "NOT verified"
            });
            out.push(Boundary {
                place,
                state: "encrypted".into(),
                detail,
            });
        } else {
            out.push(Boundary {
                place,
                state: "PLAINTEXT".into(),
                detail: format!(
                    "{} {} to {}",
                    hop.protocol,
                    hop.http,
                    hop.to_addr.as_deref().unwrap_or("?")
                ),
            });
        }
        // What the receiving role does with it.
        if let Some(r) = reports.get(i) {
            let onward = hops.get(i + 1);
            let state = match onward {
                Some(next) if next.protocol == "HTTPS" => "decrypts and re-encrypts",
                Some(_) => "decrypts: plaintext from here",
                None => "decrypts",
            };
            out.push(Boundary {
                place: r.role.clone(),
                state: state.into(),
                detail: format!(
                    "{:.1} ms at this hop",
                    r.total_ms - r.upstream_ms.unwrap_or(0.0)
                ),
            });
        }
    }
    out
}

/// The human report: the hop table, certificates, boundaries.
pub fn render(t: &Trace) -> String {
    let mut rows: Vec<[String; 8]> = vec![[
        "HOP".into(),
        "FROM -> TO".into(),
        "PROTOCOL".into(),
        "TLS".into(),
        "CERTIFICATE".into(),
        "VERIFIED".into(),
        "CLIENT CERT".into(),
        "TIME".into(),
    ]];
    for h in &t.hops {
        let from = match &h.from_addr {
            Some(a) => format!("{} {a}", h.from),
            None => h.from.clone(),
        };
        let to = match &h.to_addr {
            Some(a) => format!("{} {a}", h.to),
            None => h.to.clone(),
        };
        rows.push([
            h.number.to_string(),
            format!("{from} -> {to}"),
            format!("{} {}", h.protocol, h.http),
            match &h.tls_version {
                Some(v) => format!("{v} {}", h.cipher.as_deref().unwrap_or("")),
                None => "-".into(),
            },
            h.certificate
                .as_ref()
                .map_or("-".into(), |c| c.subject.clone()),
            match (&h.error, &h.verified) {
                (Some(_), _) => "FAILED".into(),
                (None, Some(_)) if h.verified_ok => "yes".into(),
                (None, Some(_)) => "NO".into(),
                (None, None) => "-".into(),
            },
            h.client_cert
                .as_ref()
                .map_or("none".into(), |c| c.subject.clone()),
            h.time_ms.map_or("-".into(), |t| format!("{t:.1} ms")),
        ]);
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = format!("Trace of {} (status {})\n\n", t.url, t.status);
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str("\nCertificates and details:\n");
    for h in &t.hops {
        out.push_str(&format!("  hop {} ({} -> {}):\n", h.number, h.from, h.to));
        if let Some(e) = &h.error {
            out.push_str(&format!("    error:       {e}\n"));
        }
        if let Some(c) = &h.certificate {
            out.push_str(&format!(
                "    certificate: {}\n      issuer:    {}\n      names:     {}\n      expires:   {}\n",
                c.subject,
                c.issuer,
                c.names.join(", "),
                c.not_after
            ));
            for (i, c) in h.chain.iter().enumerate() {
                out.push_str(&format!(
                    "    chain[{}]:    {} (issuer {}, expires {})\n",
                    i + 1,
                    c.subject,
                    c.issuer,
                    c.not_after
                ));
            }
        }
        if let Some(v) = &h.verified {
            out.push_str(&format!("    verified:    {v}\n"));
        }
        if let Some(sni) = &h.sni {
            out.push_str(&format!(
                "    sni:         {sni}   alpn: {}\n",
                h.alpn.as_deref().unwrap_or("-")
            ));
        }
        if let Some(c) = &h.client_cert {
            out.push_str(&format!(
                "    client cert: {} (issuer {}, names {})\n",
                c.subject,
                c.issuer,
                c.names.join(", ")
            ));
        }
    }
    out.push_str("\nEncryption boundaries (measured):\n");
    let w = t
        .boundaries
        .iter()
        .map(|b| b.place.chars().count())
        .max()
        .unwrap_or(0);
    for b in &t.boundaries {
        out.push_str(&format!(
            "  {:<w$}  {:<30}  {}\n",
            b.place, b.state, b.detail
        ));
    }
    if let Some(plain) = t
        .hops
        .iter()
        .find(|h| h.protocol != "HTTPS" && h.error.is_none())
    {
        out.push_str(&format!(
            "  plaintext boundary: {} -> {} ({})\n",
            plain.from,
            plain.to,
            plain.to_addr.as_deref().unwrap_or("?")
        ));
    } else if t.incomplete.is_none() {
        out.push_str("  no plaintext hop\n");
    }
    if let Some(why) = &t.incomplete {
        out.push_str(&format!("\nnote: {why}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_proxy::trace::{Leg, TlsReport};

    fn first() -> Hop {
        Hop {
            number: 1,
            from: "client".into(),
            to: "gateway".into(),
            from_addr: None,
            to_addr: Some("127.0.0.1:8443".into()),
            protocol: "HTTPS".into(),
            http: "HTTP/1.1".into(),
            tls_version: Some("TLSv1.3".into()),
            cipher: None,
            sni: None,
            alpn: None,
            certificate: None,
            chain: Vec::new(),
            verified: Some("yes".into()),
            verified_ok: true,
            client_cert: None,
            time_ms: Some(3.0),
            error: None,
        }
    }

    fn report(role: &str, scheme: &str, verified: Option<&str>) -> HopReport {
        HopReport {
            role: role.into(),
            downstream: Leg::default(),
            upstream: Some(Leg {
                scheme: scheme.into(),
                http: "HTTP/1.1".into(),
                to: Some("127.0.0.1:1".into()),
                tls: verified.map(|v| TlsReport {
                    version: "TLSv1.3".into(),
                    verified: Some(v.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            error: None,
            total_ms: 2.0,
            upstream_ms: Some(1.0),
        }
    }

    #[test]
    fn three_hops_and_the_plaintext_boundary() {
        let reports = vec![
            report("gateway", "https", Some("internal root")),
            report("mesh", "http", None),
        ];
        let t = assemble("https://x/".into(), 200, first(), reports);
        let names: Vec<_> = t
            .hops
            .iter()
            .map(|h| (h.from.as_str(), h.to.as_str(), h.protocol.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("client", "gateway", "HTTPS"),
                ("gateway", "mesh", "HTTPS"),
                ("mesh", "backend", "HTTP")
            ]
        );
        assert!(t.incomplete.is_none());
        let text = render(&t);
        assert!(
            text.contains("plaintext boundary: mesh -> backend"),
            "{text}"
        );
        assert!(t
            .boundaries
            .iter()
            .any(|b| b.place == "gateway" && b.state == "decrypts and re-encrypts"));
    }

    #[test]
    fn silence_after_a_tls_hop_is_reported() {
        let t = assemble(
            "https://x/".into(),
            200,
            first(),
            vec![report("gateway", "https", Some("internal root"))],
        );
        assert!(t.incomplete.as_deref().unwrap().contains("did not report"));
        let t = assemble("https://x/".into(), 200, first(), Vec::new());
        assert!(t.incomplete.as_deref().unwrap().contains("no hop reported"));
        assert_eq!(t.hops.len(), 1);
    }
}
