//! Hop-by-hop tracing, the engine side of `phoenix trace`.
//!
//! A client asks for a trace with the request header `X-Phoenix-Trace: 1`. A hop (gateway or mesh)
//! answers it only when the TCP peer is inside the role's `trace_networks` (loopback by default):
//! it then adds one `X-Phoenix-Trace-Hop` response header describing itself: the connection it
//! terminated (addresses, TLS version, cipher, SNI, ALPN, client certificate), the upstream
//! connection the request went over (address, protocol, TLS, the peer's certificate and how it was
//! verified) and the time spent. Header values are JSON ([`HopReport`]), ASCII only.
//!
//! Why it is safe to leave on:
//! - A caller outside `trace_networks` gets nothing: its trace header is removed before the request
//!   goes upstream (so the next hop, which sees a trusted peer, is not asked either), and every hop
//!   header is removed from its response.
//! - Hop data cannot be forged by a backend: headers from upstream are kept only when the upstream
//!   connection was TLS verified against configured roots (the mesh behind the gateway); from a
//!   plaintext or unverified upstream they are dropped.
//! - Certificates are described, never sent: subject, issuer, names and expiry only.
//!
//! Upstream details come from the connection actually used: a traced request is sent over a fresh
//! connection whose handshake is recorded (pooled connections keep no per-connection state), so the
//! reported upstream time includes that handshake.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// Request header that asks for a trace.
pub static TRACE_REQUEST: HeaderName = HeaderName::from_static("x-phoenix-trace");
/// Response header each hop adds (one per hop, the nearest hop last).
pub static TRACE_HOP: HeaderName = HeaderName::from_static("x-phoenix-trace-hop");

/// The default `trace_networks`: loopback only.
pub fn default_trace_networks() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("valid network"),
        "::1/128".parse().expect("valid network"),
    ]
}

/// Marker in a request's extensions: the upstream layer reports the connection it used by putting
/// an [`UpstreamConn`] into the response's extensions.
#[derive(Debug, Clone, Copy)]
pub struct TraceRequested;

/// What a traced request needs to know about the connection it came on.
#[derive(Debug, Clone)]
pub struct ConnTrace {
    /// The listener's address.
    pub local: SocketAddr,
    pub tls: Option<DownstreamTls>,
}

/// The TLS side of a connection a hop terminated, kept per connection for traced requests (the SNI
/// name is in the connection state already).
#[derive(Debug, Clone)]
pub struct DownstreamTls {
    pub version: &'static str,
    pub cipher: Option<rustls::SupportedCipherSuite>,
    pub alpn: Option<&'static str>,
    /// The client's certificate (mTLS), already verified by the TLS layer.
    pub client_cert: Option<CertificateDer<'static>>,
}

impl DownstreamTls {
    pub(crate) fn of(session: &rustls::ServerConnection, version: &'static str) -> DownstreamTls {
        DownstreamTls {
            version,
            cipher: session.negotiated_cipher_suite(),
            alpn: session.alpn_protocol().map(alpn_name),
            client_cert: session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned()),
        }
    }
}

/// The connection of one upstream request, in the response's extensions when the request carried
/// [`TraceRequested`].
#[derive(Debug, Clone)]
pub struct UpstreamConn {
    /// This hop's end of the connection.
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// `http`, `h2c` or `https`.
    pub scheme: &'static str,
    /// `HTTP/1.1` or `HTTP/2`.
    pub http: &'static str,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub version: &'static str,
    pub cipher: Option<rustls::SupportedCipherSuite>,
    pub alpn: Option<&'static str>,
    pub sni: String,
    /// The chain the server presented, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
}

impl UpstreamTls {
    pub(crate) fn of(session: &rustls::ClientConnection, sni: String) -> UpstreamTls {
        UpstreamTls {
            version: session
                .protocol_version()
                .map(crate::server::version_name)
                .unwrap_or("unknown"),
            cipher: session.negotiated_cipher_suite(),
            alpn: session.alpn_protocol().map(alpn_name),
            sni,
            chain: session
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
        }
    }
}

fn alpn_name(p: &[u8]) -> &'static str {
    match p {
        b"h2" => "h2",
        b"http/1.1" => "http/1.1",
        b"acme-tls/1" => "acme-tls/1",
        _ => "other",
    }
}

/// What one hop says about itself: the wire format of `X-Phoenix-Trace-Hop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopReport {
    /// `gateway` or `mesh`.
    pub role: String,
    /// The connection the hop accepted.
    pub downstream: Leg,
    /// The connection to the next hop, absent when the hop answered itself (404, 403...).
    pub upstream: Option<Leg>,
    /// The upstream request failed: why (the status the client got says 502/504).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the request's arrival to its response headers, at this hop.
    pub total_ms: f64,
    /// Of which waiting for the upstream's response headers (connect and handshake included).
    pub upstream_ms: Option<f64>,
}

/// One connection between two hops, as one of its ends saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Leg {
    pub from: Option<String>,
    pub to: Option<String>,
    /// `https`, `http` or `h2c`.
    pub scheme: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub http: String,
    pub tls: Option<TlsReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsReport {
    pub version: String,
    pub cipher: Option<String>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// The server's certificate (upstream legs).
    pub certificate: Option<CertReport>,
    /// The rest of the chain the server sent.
    #[serde(default)]
    pub chain: Vec<CertReport>,
    /// How the server's certificate was verified: `"internal root"`, `"tls_root <file>"`, or
    /// `"NOT VERIFIED (...)"`.
    pub verified: Option<String>,
    /// The client certificate, when one was presented (mTLS).
    pub client_cert: Option<CertReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CertReport {
    pub subject: String,
    pub issuer: String,
    pub names: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
}

/// Describes a DER certificate; `None` when it does not parse.
pub fn describe_cert(der: &[u8]) -> Option<CertReport> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let not_after = cert
        .validity()
        .not_after
        .to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    Some(CertReport {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        names,
        not_after,
    })
}

fn cipher_name(c: Option<rustls::SupportedCipherSuite>) -> Option<String> {
    c.and_then(|c| c.suite().as_str()).map(str::to_owned)
}

impl HopReport {
    /// The header value: JSON with every non-ASCII character escaped, so it is a valid header value.
    pub fn to_header(&self) -> Option<HeaderValue> {
        let json = serde_json::to_string(self).ok()?;
        let mut ascii = String::with_capacity(json.len());
        for c in json.chars() {
            if c.is_ascii() && !c.is_ascii_control() {
                ascii.push(c);
            } else {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    ascii.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        HeaderValue::from_str(&ascii).ok()
    }

    pub fn from_header(value: &HeaderValue) -> Result<HopReport, String> {
        let text = value
            .to_str()
            .map_err(|_| "hop header is not ASCII".to_owned())?;
        serde_json::from_str(text).map_err(|e| format!("hop header is not a hop report: {e}"))
    }
}

/// A traced request in progress at one hop.
#[derive(Debug)]
pub(crate) struct Traced {
    downstream: Leg,
}

/// Called first thing for every request. Returns the trace state when the request asks for a trace
/// and the peer may have one; removes the request header when it may not.
pub(crate) fn begin<B>(
    req: &mut http::Request<B>,
    peer: SocketAddr,
    conn: &ConnTrace,
    sni: Option<&str>,
    allowed: &[IpNet],
) -> Option<Traced> {
    req.headers().get(&TRACE_REQUEST)?;
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if !allowed.iter().any(|n| n.contains(&ip)) {
        req.headers_mut().remove(&TRACE_REQUEST);
        return None;
    }
    req.extensions_mut().insert(TraceRequested);
    let version = req.version();
    let tls = conn.tls.as_ref().map(|t| TlsReport {
        version: t.version.to_owned(),
        cipher: cipher_name(t.cipher),
        sni: sni.map(str::to_owned),
        alpn: t.alpn.map(str::to_owned),
        client_cert: t.client_cert.as_ref().and_then(|c| describe_cert(c)),
        ..TlsReport::default()
    });
    Some(Traced {
        downstream: Leg {
            from: Some(peer.to_string()),
            to: Some(conn.local.to_string()),
            scheme: if tls.is_some() { "https" } else { "http" }.to_owned(),
            http: http_name(version).to_owned(),
            tls,
        },
    })
}

fn http_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// How a service's `https://` servers are verified, as the trace reports it.
pub(crate) fn verification(cfg: &crate::config::ServiceConfig) -> String {
    if cfg.tls_insecure_skip_verify {
        "NOT VERIFIED (tls_insecure_skip_verify)".to_owned()
    } else if let Some(root) = &cfg.tls_root {
        format!("tls_root {}", root.display())
    } else {
        "internal root".to_owned()
    }
}

/// Adds this hop's report to a response. `upstream` is the connection the request went over (from
/// the response extensions), `verified` how its certificate was checked. Hop headers from upstream
/// are kept only when that connection was verified TLS.
#[allow(clippy::too_many_arguments)] // plain data for one report
pub(crate) fn finish(
    traced: Traced,
    headers: &mut HeaderMap,
    role: &str,
    upstream: Option<&UpstreamConn>,
    verified: Option<String>,
    error: Option<String>,
    total: Duration,
    upstream_time: Option<Duration>,
) {
    let trusted_upstream = upstream.is_some_and(|u| {
        u.tls.is_some() && verified.as_deref().is_some_and(|v| !v.starts_with("NOT"))
    });
    if !trusted_upstream {
        strip(headers);
    }
    let upstream = upstream.map(|u| Leg {
        from: u.local.map(|l| l.to_string()),
        to: u.peer.map(|p| p.to_string()),
        scheme: u.scheme.to_owned(),
        http: u.http.to_owned(),
        tls: u.tls.as_ref().map(|t| {
            let mut certs = t.chain.iter().filter_map(|c| describe_cert(c));
            TlsReport {
                version: t.version.to_owned(),
                cipher: cipher_name(t.cipher),
                sni: Some(t.sni.clone()),
                alpn: t.alpn.map(str::to_owned),
                certificate: certs.next(),
                chain: certs.collect(),
                verified,
                client_cert: None,
            }
        }),
    });
    let report = HopReport {
        role: role.to_owned(),
        downstream: traced.downstream,
        upstream,
        error,
        total_ms: ms(total),
        upstream_ms: upstream_time.map(ms),
    };
    if let Some(value) = report.to_header() {
        headers.append(&TRACE_HOP, value);
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Removes every hop header: for callers that may not see traces, and from untrusted upstreams.
pub(crate) fn strip(headers: &mut HeaderMap) {
    if headers.contains_key(&TRACE_HOP) {
        headers.remove(&TRACE_HOP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets() -> Vec<IpNet> {
        default_trace_networks()
    }

    fn traced_request(version: http::Version) -> http::Request<()> {
        let mut req = http::Request::new(());
        *req.version_mut() = version;
        req.headers_mut()
            .insert(&TRACE_REQUEST, HeaderValue::from_static("1"));
        req
    }

    fn conn() -> ConnTrace {
        ConnTrace {
            local: "127.0.0.1:8443".parse().unwrap(),
            tls: None,
        }
    }

    #[test]
    fn untrusted_callers_lose_the_request_header_and_get_no_state() {
        let mut req = traced_request(http::Version::HTTP_11);
        let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        let t = begin(&mut req, peer, &conn(), None, &nets());
        assert!(t.is_none());
        assert!(
            req.headers().get(&TRACE_REQUEST).is_none(),
            "must not reach the next hop"
        );
        assert!(req.extensions().get::<TraceRequested>().is_none());
    }

    #[test]
    fn trusted_callers_are_traced_including_v4_mapped_loopback() {
        let mut req = traced_request(http::Version::HTTP_2);
        let peer: SocketAddr = "[::ffff:127.0.0.1]:5555".parse().unwrap();
        let t = begin(&mut req, peer, &conn(), None, &nets());
        let t = t.expect("traced");
        assert_eq!(t.downstream.http, "HTTP/2");
        assert_eq!(t.downstream.scheme, "http");
        assert!(
            req.headers().get(&TRACE_REQUEST).is_some(),
            "forwarded to the next hop"
        );
        assert!(req.extensions().get::<TraceRequested>().is_some());
        // no header, no trace
        let mut plain = http::Request::new(());
        assert!(begin(&mut plain, peer, &conn(), None, &nets()).is_none());
    }

    #[test]
    fn hop_headers_from_plaintext_upstreams_are_dropped_and_ours_appended() {
        let traced = Traced {
            downstream: Leg::default(),
        };
        let mut h = HeaderMap::new();
        h.append(&TRACE_HOP, HeaderValue::from_static("{\"forged\":true}"));
        let up = UpstreamConn {
            local: None,
            peer: Some("127.0.0.1:8000".parse().unwrap()),
            scheme: "http",
            http: "HTTP/1.1",
            tls: None,
        };
        finish(
            traced,
            &mut h,
            "mesh",
            Some(&up),
            None,
            None,
            Duration::from_millis(3),
            Some(Duration::from_millis(2)),
        );
        let all: Vec<_> = h.get_all(&TRACE_HOP).iter().collect();
        assert_eq!(all.len(), 1);
        let report = HopReport::from_header(all[0]).unwrap();
        assert_eq!(report.role, "mesh");
        assert_eq!(report.upstream.unwrap().scheme, "http");
        assert_eq!(report.upstream_ms, Some(2.0));
    }

    #[test]
    fn header_values_are_ascii_json_even_for_unicode_subjects() {
        let report = HopReport {
            role: "gateway".into(),
            downstream: Leg {
                tls: Some(TlsReport {
                    client_cert: Some(CertReport {
                        subject: "CN=Zürich 🚀".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            upstream: None,
            error: None,
            total_ms: 1.5,
            upstream_ms: None,
        };
        let v = report.to_header().expect("valid header value");
        assert!(v.to_str().unwrap().is_ascii());
        assert_eq!(HopReport::from_header(&v).unwrap(), report);
    }
}
