//! Header rewriting between the client and the upstream: pure functions, no I/O.
//!
//! A proxy must not pass connection-level headers on (RFC 9110 section 7.6.1): they describe the
//! client's connection, not the upstream one, and some (`Transfer-Encoding`, `Connection`) are illegal
//! in HTTP/2. It must also tell the upstream who the client was (`X-Forwarded-*`, RFC 7239 `Forwarded`)
//! without letting a client forge that information: headers a client sent are believed only when the
//! direct peer is one of the `trusted_proxies` (then we append to them), otherwise they are replaced.
//! Every request carries an `X-Request-Id`, kept from a trusted or well-formed incoming one or
//! generated here, and echoed on the response so a client can quote it when reporting a problem.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `Forwarded` (RFC 7239).
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers that are hop-by-hop by definition (RFC 9110 section 7.6.1, plus the de-facto ones).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// True when `ip` lies in one of `nets`.
pub fn is_trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|net| net.contains(&ip))
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, as seen on dual-stack listeners) are treated as
/// the IPv4 address they carry, so `10.0.0.0/8` in a trust list means what the operator expects.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// True when the request asks for a protocol upgrade (WebSocket and the like): `Connection: upgrade`
/// together with an `Upgrade` header.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those named in `Connection`. `TE` is kept only as
/// `te: trailers` (gRPC needs it and it is the one value allowed in HTTP/2). When `upgrade` is set
/// (an upgrade request or a 101 response), `Upgrade` is kept and `Connection: upgrade` restored, so
/// the upgrade can continue on the next hop.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Names listed in Connection are hop-by-hop too; collect them before Connection goes away.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_value = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(value) = upgrade_value {
        headers.insert(header::UPGRADE, value);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Who sent the request and how, as seen by this hop.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInfo<'a> {
    /// Address of the direct peer (the client, or the proxy in front of us).
    pub peer: IpAddr,
    /// Whether the peer is in `trusted_proxies`.
    pub peer_trusted: bool,
    /// `"https"` or `"http"`: how the request reached us.
    pub proto: &'static str,
    /// The Host the client asked for (with port if it gave one).
    pub host: Option<&'a str>,
}

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Forwarded`. From a trusted
/// peer, the chain is extended and the original proto/host are kept; from anyone else, whatever the
/// client sent is discarded and replaced by what this hop saw.
pub fn set_forwarded(headers: &mut HeaderMap, info: &ForwardInfo<'_>) {
    let peer = canonical(info.peer);
    let peer_text = peer.to_string();

    let previous_xff = if info.peer_trusted {
        joined(headers, &X_FORWARDED_FOR)
    } else {
        None
    };
    let xff = match previous_xff {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {peer_text}"),
        _ => peer_text.clone(),
    };
    set_text(headers, &X_FORWARDED_FOR, &xff);

    if !(info.peer_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(info.proto),
        );
    }
    if !(info.peer_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match info.host {
            Some(host) => set_text(headers, &X_FORWARDED_HOST, host),
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }

    let mut element = format!("for={}", forwarded_node(peer));
    element.push_str(";proto=");
    element.push_str(info.proto);
    if let Some(host) = info.host {
        element.push_str(";host=");
        element.push_str(&forwarded_value(host));
    }
    let previous = if info.peer_trusted {
        joined(headers, &FORWARDED)
    } else {
        None
    };
    let forwarded = match previous {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {element}"),
        _ => element,
    };
    set_text(headers, &FORWARDED, &forwarded);
}

/// The address of the original client: the peer itself unless it is a trusted proxy, in which case
/// `X-Forwarded-For` is read from the right, skipping trusted proxies, and the first address that is
/// not one of them is the client (the rightmost address a trusted hop vouches for). Rules such as
/// `ClientIP` and per-client rate limits use this address.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Some(ip) = parse_xff_entry(entry) else {
            break;
        };
        client = canonical(ip);
        if !is_trusted(client, trusted) {
            break;
        }
    }
    client
}

fn parse_xff_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    // "[2001:db8::1]:443" or "192.0.2.1:443"
    entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

/// Keeps a well-formed incoming `X-Request-Id` (visible ASCII, at most 128 bytes) so a request can be
/// followed across hops; otherwise sets a fresh random one. Returns the id in effect.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(existing) = headers.get(&X_REQUEST_ID) {
        let bytes = existing.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return existing.clone();
        }
    }
    let id = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// A random 128-bit id as 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    let id = format!("{:032x}", rand::random::<u128>());
    HeaderValue::from_str(&id).expect("hex is a valid header value")
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for value in headers.get_all(name) {
        let Ok(text) = value.to_str() else { continue };
        match &mut out {
            Some(acc) => {
                acc.push_str(", ");
                acc.push_str(text);
            }
            None => out = Some(text.to_owned()),
        }
    }
    out
}

fn set_text(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// RFC 7239 section 6: IPv6 addresses are bracketed and, since `[`, `]` and `:` are not token
/// characters, quoted.
fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// A token as is, anything else as a quoted-string (RFC 7239 section 4).
fn forwarded_value(value: &str) -> String {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !value.is_empty() && value.chars().all(is_tchar) {
        value.to_owned()
    } else {
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_removed_including_connection_listed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate;q=0.5"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("x-keep", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["te", "x-keep"], "{h:?}");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn te_without_trailers_dropped() {
        let mut h = map(&[("te", "gzip")]);
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn upgrade_kept_for_upgrade_requests() {
        let mut h = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade_request(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!is_upgrade_request(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn untrusted_peer_headers_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.test"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let info = ForwardInfo {
            peer: "192.0.2.7".parse().unwrap(),
            peer_trusted: false,
            proto: "https",
            host: Some("app.phoenix.test"),
        };
        set_forwarded(&mut h, &info);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.phoenix.test");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=https;host=app.phoenix.test"
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn trusted_peer_headers_appended() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "outer.test"),
            ("forwarded", "for=203.0.113.9;proto=http"),
        ]);
        let info = ForwardInfo {
            peer: "2001:db8::1".parse().unwrap(),
            peer_trusted: true,
            proto: "https",
            host: Some("app.phoenix.test:8443"),
        };
        set_forwarded(&mut h, &info);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.2, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "outer.test");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=http, for=\"[2001:db8::1]\";proto=https;host=\"app.phoenix.test:8443\""
        );
    }

    #[test]
    fn client_ip_walks_trusted_chain() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = map(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.3")]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let outsider: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(client_ip(outsider, &h, &trusted), outsider);
        let garbage = map(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(peer, &garbage, &trusted), peer);
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert!(is_trusted(mapped, &trusted));
    }

    #[test]
    fn request_id_kept_or_generated() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(ensure_request_id(&mut h), "abc-123");
        let mut h = map(&[("x-request-id", "bad id with spaces")]);
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h["x-request-id"], id);
        let mut empty = HeaderMap::new();
        let a = ensure_request_id(&mut empty);
        let b = ensure_request_id(&mut HeaderMap::new());
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
