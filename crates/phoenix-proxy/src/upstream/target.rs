//! Parsing of upstream server URLs (`http://`, `h2c://`, `https://`).
//!
//! A server URL names a protocol and an address and nothing else: a path, a query, a fragment or user
//! information would be silently ignored by the proxy, so they are refused at configuration time
//! instead. IPv6 literals are written in brackets (`http://[::1]:8080`). Host names are kept as
//! written and resolved at connect time, so a backend that changes address is followed without a
//! reload.

use std::net::IpAddr;

use http::uri::{Authority, Scheme};
use http::Uri;

/// How requests travel to one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `http://`: HTTP/1.1 over plain TCP.
    Http1,
    /// `h2c://`: HTTP/2 with prior knowledge over plain TCP (gRPC backends).
    H2c,
    /// `https://`: TLS, then HTTP/2 when both sides agree in ALPN, HTTP/1.1 otherwise.
    Https,
}

impl Protocol {
    pub(crate) fn is_plaintext(self) -> bool {
        !matches!(self, Protocol::Https)
    }
}

/// A parsed server URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) protocol: Protocol,
    /// Host as written, without the brackets of an IPv6 literal.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Set when the host is an IP literal: no name resolution needed.
    pub(crate) ip: Option<IpAddr>,
    /// `host[:port]` as written; the `Host` / `:authority` when the request carries none.
    pub(crate) authority: Authority,
    /// Scheme of absolute-form URIs sent over HTTP/2 (`http` for h2c, `https` for TLS).
    pub(crate) scheme: Scheme,
}

/// Parses one server URL; the error is a sentence for a configuration problem.
pub(crate) fn parse(url: &str) -> Result<Target, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e}); expected e.g. http://10.0.0.5:8080"))?;
    let protocol = match uri.scheme_str() {
        Some("http") => Protocol::Http1,
        Some("h2c") => Protocol::H2c,
        Some("https") => Protocol::Https,
        Some(other) => {
            return Err(format!(
                "{url:?} has scheme {other:?}; supported are http://, h2c:// and https://"
            ))
        }
        None => {
            return Err(format!(
                "{url:?} has no scheme; write http://, h2c:// or https:// in front of the address"
            ))
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .clone();
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?} contains user information, which is not supported"
        ));
    }
    if let Some(pq) = uri.path_and_query() {
        if pq.query().is_some() || !(pq.path().is_empty() || pq.path() == "/") {
            return Err(format!(
                "{url:?} has a path or query; a server URL is only scheme://host:port \
                 (use an add-prefix middleware to change paths)"
            ));
        }
    }
    if url.contains('#') {
        return Err(format!("{url:?} has a fragment, which is not supported"));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned();
    if host.is_empty() {
        return Err(format!("{url:?} has an empty host"));
    }
    let port = match authority.port_u16() {
        Some(0) => return Err(format!("{url:?} has port 0")),
        Some(port) => port,
        None if authority.as_str().ends_with(':') => {
            return Err(format!("{url:?} has an empty port"))
        }
        None => match protocol {
            Protocol::Http1 | Protocol::H2c => 80,
            Protocol::Https => 443,
        },
    };
    let ip = host.parse::<IpAddr>().ok();
    let scheme = match protocol {
        Protocol::Https => Scheme::HTTPS,
        Protocol::Http1 | Protocol::H2c => Scheme::HTTP,
    };
    Ok(Target {
        protocol,
        host,
        port,
        ip,
        authority,
        scheme,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_schemes_with_default_ports() {
        let t = parse("http://10.0.0.5").unwrap();
        assert_eq!(
            (t.protocol, t.port, t.host.as_str()),
            (Protocol::Http1, 80, "10.0.0.5")
        );
        assert_eq!(t.ip, Some("10.0.0.5".parse().unwrap()));
        let t = parse("h2c://127.0.0.1:50051/").unwrap();
        assert_eq!((t.protocol, t.port), (Protocol::H2c, 50051));
        assert_eq!(t.scheme, Scheme::HTTP);
        let t = parse("https://portainer.lan").unwrap();
        assert_eq!((t.protocol, t.port, t.ip), (Protocol::Https, 443, None));
        assert_eq!(t.authority.as_str(), "portainer.lan");
        assert_eq!(t.scheme, Scheme::HTTPS);
    }

    #[test]
    fn ipv6_literals_lose_their_brackets_for_connecting_only() {
        let t = parse("http://[::1]:8080").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.ip, Some("::1".parse().unwrap()));
        assert_eq!(t.authority.as_str(), "[::1]:8080");
        assert_eq!(t.port, 8080);
    }

    #[test]
    fn refuses_what_would_be_silently_ignored() {
        for bad in [
            "127.0.0.1:8080",
            "ftp://127.0.0.1",
            "http://127.0.0.1:8080/api",
            "http://127.0.0.1:8080/?a=b",
            "http://user:pw@127.0.0.1",
            "http://127.0.0.1:0",
            "http://127.0.0.1:",
            "http://",
            "not a url",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }
}
