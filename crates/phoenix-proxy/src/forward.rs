//! Header rewriting between the client and the upstream: pure functions, no I/O.
//!
//! A proxy must not pass connection-level headers on (RFC 9110 section 7.6.1): they describe the
//! client's connection, not the upstream one, and some (`Transfer-Encoding`, `Connection`) are illegal
//! in HTTP/2. It must also tell the upstream who the client was (`X-Forwarded-*`, RFC 7239 `Forwarded`)
//! without letting a client forge that information: headers a client sent are believed only when the
//! direct peer is one of the `trusted_proxies` (then we append to them), otherwise they are replaced.
//! Every request carries an `X-Request-Id`, kept from a trusted or well-formed incoming one or
//! generated here, and echoed on the response so a client can quote it when reporting a problem.
//!
//! These functions run on every request, so they avoid the formatting machinery and intermediate
//! strings: new values are written once into a buffer of exactly their length, which then becomes
//! the header value's storage.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// The forwarding fields' names as text, for heads handled as bytes (`plain`).
pub(crate) mod names {
    pub(crate) const X_FORWARDED_FOR: &str = "x-forwarded-for";
    pub(crate) const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
    pub(crate) const X_FORWARDED_HOST: &str = "x-forwarded-host";
    pub(crate) const X_REQUEST_ID: &str = "x-request-id";
    pub(crate) const FORWARDED: &str = "forwarded";
}

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static(names::X_FORWARDED_FOR);
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static(names::X_FORWARDED_PROTO);
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static(names::X_FORWARDED_HOST);
/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static(names::X_REQUEST_ID);
/// `Forwarded` (RFC 7239).
pub static FORWARDED: HeaderName = HeaderName::from_static(names::FORWARDED);

/// Headers that are hop-by-hop by definition (RFC 9110 section 7.6.1, plus the de-facto ones), as
/// text to compare names with: `HeaderName::as_str` of a standard name is a table lookup of its
/// own, on the path of every request and response.
pub(crate) const HOP_BY_HOP_NAMES: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `HOP_BY_HOP_NAMES` as header names, to remove them by (a removal by text parses the name first).
static HOP_BY_HOP: [HeaderName; 8] = [
    HeaderName::from_static(HOP_BY_HOP_NAMES[0]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[1]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[2]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[3]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[4]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[5]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[6]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[7]),
];

/// The lengths of the names in `HOP_BY_HOP` and of `te`.
const HOP_BY_HOP_LENGTHS: [usize; 7] = [2, 7, 10, 16, 17, 18, 19];

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
    headers.contains_key(header::UPGRADE)
        && list_elements(headers.get_all(header::CONNECTION))
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The comma-separated elements of a list header's values (`Connection`, `TE`), without the
/// surrounding whitespace; values that are not text are skipped.
pub(crate) fn list_elements<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    values
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        // Header text holds no other whitespace than spaces and tabs, so the ASCII trim is the
        // whole trim, without `str::trim`'s UTF-8 decoding.
        .map(str::trim_ascii)
}

/// Removes hop-by-hop headers, including those named in `Connection`. `TE` is kept only as
/// `te: trailers` (gRPC needs it and it is the one value allowed in HTTP/2). When `upgrade` is set
/// (an upgrade request or a 101 response), `Upgrade` is kept and `Connection: upgrade` restored, so
/// the upgrade can continue on the next hop.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names finds which hop-by-hop headers are present: most messages carry none
    // but `Connection`, and a removal of an absent name still costs a hash and a probe.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut te = false;
    let mut close_field = false;
    for name in headers.keys() {
        let name = name.as_str();
        if name.len() == 5 {
            close_field |= name == "close";
            continue;
        }
        // Most names are ruled out by their length, without comparing any text.
        if !HOP_BY_HOP_LENGTHS.contains(&name.len()) {
            continue;
        }
        if let Some(i) = HOP_BY_HOP_NAMES.iter().position(|&h| h == name) {
            present[i] = true;
        } else if name == header::TE.as_str() {
            te = true;
        }
    }
    if !te && !present.contains(&true) {
        return;
    }
    let upgrade_value = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    // Names listed in Connection are hop-by-hop too. Its values are cloned (a reference count, not
    // a copy) so that the names can be removed while they are read; a message has at most one
    // Connection line in practice, so `more` stays empty and unallocated.
    let mut connection = headers.get_all(header::CONNECTION).iter().cloned();
    let first = connection.next();
    let more: Vec<HeaderValue> = connection.collect();
    for name in list_elements(first.iter().chain(&more)) {
        // The usual options need no lookup: a hop-by-hop name goes below when it is present, and
        // `close` (RFC 9110 section 7.6.1 reserves it as a field name) only when such a field came.
        if HOP_BY_HOP_NAMES
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
            || (name.eq_ignore_ascii_case("close") && !close_field)
        {
            continue;
        }
        // Removing by `&str` looks the name up without building a `HeaderName` (which allocates
        // for most names); a token that is no valid name matches nothing.
        headers.remove(name);
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    if te && headers.contains_key(header::TE) {
        let trailers = list_elements(headers.get_all(header::TE)).any(|t| {
            let coding = t.split(';').next().unwrap_or("");
            coding.trim_ascii().eq_ignore_ascii_case("trailers")
        });
        headers.remove(header::TE);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
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
    let (xff, forwarded) = {
        let lists = ForwardedLists::new(
            info,
            Lines::Map(headers, &X_FORWARDED_FOR),
            Lines::Map(headers, &FORWARDED),
        );
        (lists.x_forwarded_for(), lists.forwarded())
    };
    set_value(headers, &X_FORWARDED_FOR, xff);
    if !info.keeps(headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(info.proto));
    }
    if !info.keeps(headers.contains_key(&X_FORWARDED_HOST)) {
        let host = info.host.and_then(|host| HeaderValue::from_str(host).ok());
        set_or_remove(headers, &X_FORWARDED_HOST, host);
    }
    set_value(headers, &FORWARDED, forwarded);
}

impl ForwardInfo<'_> {
    /// Whether a single-valued forwarding field the peer sent (`X-Forwarded-Proto`,
    /// `X-Forwarded-Host`) is kept: only a trusted peer's, and only when it sent one.
    pub(crate) fn keeps(&self, present: bool) -> bool {
        self.peer_trusted && present
    }
}

/// The new values of the two list fields, `X-Forwarded-For` and `Forwarded`: the lists a trusted
/// peer sent, extended by this hop's entry. One computation for both kinds of head: a header map,
/// or the bytes of a plain request (`plain`), into whose upstream head they are written directly.
pub(crate) struct ForwardedLists<'a> {
    peer: IpText,
    element: ForwardedElement<'a>,
    previous_xff: Option<PreviousList<'a>>,
    previous_forwarded: Option<PreviousList<'a>>,
}

impl<'a> ForwardedLists<'a> {
    /// `x_forwarded_for`, `forwarded`: the lines the peer sent (read only when it is trusted).
    pub(crate) fn new(
        info: &ForwardInfo<'a>,
        x_forwarded_for: Lines<'a>,
        forwarded: Lines<'a>,
    ) -> ForwardedLists<'a> {
        let peer = canonical(info.peer);
        let previous = |lines| {
            if info.peer_trusted {
                PreviousList::of(lines)
            } else {
                None
            }
        };
        ForwardedLists {
            peer: IpText::new(peer),
            element: ForwardedElement {
                bracketed: peer.is_ipv6(),
                proto: info.proto,
                host: info.host.map(ForwardedValue::new),
            },
            previous_xff: previous(x_forwarded_for),
            previous_forwarded: previous(forwarded),
        }
    }

    /// The new `X-Forwarded-For` value, in a buffer of exactly its length.
    pub(crate) fn x_forwarded_for(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.x_forwarded_for_len());
        self.write_x_forwarded_for(&mut out);
        out
    }

    /// The new `Forwarded` value, in a buffer of exactly its length.
    pub(crate) fn forwarded(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.forwarded_len());
        self.write_forwarded(&mut out);
        out
    }

    pub(crate) fn x_forwarded_for_len(&self) -> usize {
        self.previous_xff.as_ref().map_or(0, PreviousList::len) + self.peer.len()
    }

    pub(crate) fn forwarded_len(&self) -> usize {
        let previous = self
            .previous_forwarded
            .as_ref()
            .map_or(0, PreviousList::len);
        previous + self.element.len(&self.peer)
    }

    pub(crate) fn write_x_forwarded_for(&self, out: &mut Vec<u8>) {
        if let Some(previous) = &self.previous_xff {
            previous.write_to(out);
        }
        out.extend_from_slice(self.peer.as_bytes());
    }

    pub(crate) fn write_forwarded(&self, out: &mut Vec<u8>) {
        if let Some(previous) = &self.previous_forwarded {
            previous.write_to(out);
        }
        self.element.write_to(out, &self.peer);
    }
}

/// The values of a list header (`X-Forwarded-For`, `Forwarded`) that a trusted peer sent, read as
/// one list: the text values joined by `", "`. Borrowed, so extending the list copies each byte
/// once, however many lines it came in.
struct PreviousList<'a> {
    values: Lines<'a>,
    /// What `write_to` writes: the joined text and the `", "` that leads to the next entry.
    len: usize,
}

/// The lines of one field: from a header map, or the one line of a head read as bytes (`plain`).
#[derive(Clone, Copy)]
pub(crate) enum Lines<'a> {
    Map(&'a HeaderMap, &'a HeaderName),
    One(&'a str),
    None,
}

impl<'a> Lines<'a> {
    /// Each line that is text, in order.
    fn for_each(self, mut f: impl FnMut(&'a str)) {
        match self {
            Lines::Map(headers, name) => headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .for_each(f),
            Lines::One(text) => f(text),
            Lines::None => {}
        }
    }
}

impl<'a> PreviousList<'a> {
    /// `None` when there is nothing to extend: no text value, or a single blank one.
    fn of(values: Lines<'a>) -> Option<Self> {
        let (mut count, mut len, mut blank) = (0, 0, true);
        values.for_each(|text| {
            count += 1;
            len += text.len() + LIST_SEPARATOR.len();
            // Header text holds no other whitespace than spaces and tabs.
            blank &= text.bytes().all(|b| b == b' ' || b == b'\t');
        });
        // Two or more values are never blank together: the separator between them is not.
        if count == 0 || (count == 1 && blank) {
            return None;
        }
        Some(PreviousList { values, len })
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Writes the list followed by `", "`, ready for the next entry.
    fn write_to(&self, out: &mut Vec<u8>) {
        self.values.for_each(|text| {
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(LIST_SEPARATOR);
        });
    }
}

const LIST_SEPARATOR: &[u8] = b", ";

/// This hop's `Forwarded` element: `for=<peer>;proto=<proto>[;host=<host>]`.
struct ForwardedElement<'a> {
    /// RFC 7239 section 6: IPv6 addresses are bracketed and, since `[`, `]` and `:` are not token
    /// characters, quoted.
    bracketed: bool,
    proto: &'a str,
    host: Option<ForwardedValue<'a>>,
}

impl ForwardedElement<'_> {
    /// What `write_to` writes; the two must agree.
    fn len(&self, peer: &IpText) -> usize {
        let node = peer.len() + if self.bracketed { 4 } else { 0 };
        let host = self.host.map_or(0, |h| ";host=".len() + h.len());
        "for=".len() + node + ";proto=".len() + self.proto.len() + host
    }

    fn write_to(&self, out: &mut Vec<u8>, peer: &IpText) {
        out.extend_from_slice(b"for=");
        if self.bracketed {
            out.extend_from_slice(b"\"[");
            out.extend_from_slice(peer.as_bytes());
            out.extend_from_slice(b"]\"");
        } else {
            out.extend_from_slice(peer.as_bytes());
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(self.proto.as_bytes());
        if let Some(host) = self.host {
            out.extend_from_slice(b";host=");
            host.write_to(out);
        }
    }
}

/// A `Forwarded` parameter value: a token as is, anything else as a quoted-string (RFC 7239
/// section 4).
#[derive(Clone, Copy)]
struct ForwardedValue<'a> {
    text: &'a str,
    quoted: bool,
    /// Backslashes and double quotes, each escaped with a backslash when quoted.
    escapes: usize,
}

impl<'a> ForwardedValue<'a> {
    fn new(text: &'a str) -> Self {
        // One pass, each byte looked up (this runs for every request's host). A byte that needs
        // escaping is no `tchar`, so a value with escapes is always quoted.
        let (mut quoted, mut escapes) = (text.is_empty(), 0);
        for b in text.bytes() {
            quoted |= !is_tchar(b);
            escapes += usize::from(needs_escape(b));
        }
        ForwardedValue {
            text,
            quoted,
            escapes,
        }
    }

    /// What `write_to` writes.
    fn len(&self) -> usize {
        if self.quoted {
            self.text.len() + self.escapes + 2
        } else {
            self.text.len()
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        if !self.quoted {
            out.extend_from_slice(self.text.as_bytes());
            return;
        }
        out.push(b'"');
        if self.escapes == 0 {
            out.extend_from_slice(self.text.as_bytes());
        } else {
            for b in self.text.bytes() {
                if needs_escape(b) {
                    out.push(b'\\');
                }
                out.push(b);
            }
        }
        out.push(b'"');
    }
}

/// A `tchar` of RFC 9110 section 5.6.2: what a token (an unquoted `Forwarded` value) is made of.
fn is_tchar(b: u8) -> bool {
    const TCHAR: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            table[b] = (b as u8).is_ascii_alphanumeric();
            b += 1;
        }
        let extra = b"!#$%&'*+-.^_`|~";
        let mut i = 0;
        while i < extra.len() {
            table[extra[i] as usize] = true;
            i += 1;
        }
        table
    };
    TCHAR[usize::from(b)]
}

fn needs_escape(b: u8) -> bool {
    b == b'\\' || b == b'"'
}

/// An IP address as text, written on the stack. IPv4, by far the common case, has its own decimal
/// writer; IPv6 goes through `Display`.
struct IpText {
    buf: [u8; IpText::MAX_LEN],
    len: usize,
}

impl IpText {
    /// The longest text of an address, `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
    const MAX_LEN: usize = 45;

    fn new(ip: IpAddr) -> Self {
        let mut text = IpText {
            buf: [0; Self::MAX_LEN],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => text.push_ipv4(v4),
            IpAddr::V6(v6) => write!(text, "{v6}").expect("an IPv6 address fits in MAX_LEN bytes"),
        }
        text
    }

    fn push_ipv4(&mut self, ip: Ipv4Addr) {
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.push(b'.');
            }
            if octet >= 100 {
                self.push(b'0' + octet / 100);
            }
            if octet >= 10 {
                self.push(b'0' + octet / 10 % 10);
            }
            self.push(b'0' + octet % 10);
        }
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dest = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dest.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The address of the original client: the peer itself unless it is a trusted proxy, in which case
/// `X-Forwarded-For` is read from the right, skipping trusted proxies, and the first address that is
/// not one of them is the client (the rightmost address a trusted hop vouches for). Rules such as
/// `ClientIP` and per-client rate limits use this address.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    client_ip_of(peer, Lines::Map(headers, &X_FORWARDED_FOR), trusted)
}

/// `client_ip`, with the `X-Forwarded-For` lines given.
pub(crate) fn client_ip_of(peer: IpAddr, x_forwarded_for: Lines<'_>, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    match x_forwarded_for {
        Lines::Map(headers, name) => {
            let lines = headers.get_all(name).iter().rev();
            rightmost_untrusted(peer, lines.filter_map(|v| v.to_str().ok()), trusted)
        }
        Lines::One(text) => rightmost_untrusted(peer, std::iter::once(text), trusted),
        Lines::None => peer,
    }
}

/// The client by `X-Forwarded-For` lines given last first (see `client_ip`).
fn rightmost_untrusted<'a>(
    peer: IpAddr,
    lines: impl Iterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let mut client = peer;
    for entry in lines.flat_map(|v| v.rsplit(',')) {
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
        if is_request_id(existing.as_bytes()) {
            return existing.clone();
        }
    }
    let id = new_request_id();
    headers.insert(&X_REQUEST_ID, id.clone());
    id
}

/// An incoming `X-Request-Id` that is kept: visible ASCII, 1 to 128 bytes.
pub(crate) fn is_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 128 && value.iter().all(|b| b.is_ascii_graphic())
}

/// A random 128-bit id as 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    HeaderValue::from_bytes(&hex_id(rand::random())).expect("hex is a valid header value")
}

/// `id` as 32 lowercase hex digits, most significant first (what `{:032x}` writes).
fn hex_id(id: u128) -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(id.to_be_bytes()) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    out
}

/// Sets `name` to `value`, or removes it when that is not a valid header value.
fn set_value(headers: &mut HeaderMap, name: &'static HeaderName, value: Vec<u8>) {
    // `Bytes` takes over a buffer whose length is its capacity without copying or allocating, and
    // `from_maybe_shared` validates it by the same rule as `HeaderValue::from_str`.
    let value = HeaderValue::from_maybe_shared(Bytes::from(value)).ok();
    set_or_remove(headers, name, value);
}

fn set_or_remove(headers: &mut HeaderMap, name: &'static HeaderName, value: Option<HeaderValue>) {
    match value {
        Some(v) => {
            headers.insert(name, v);
        }
        None => {
            headers.remove(name);
        }
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

    /// A map of `pairs` after `remove_hop_by_hop` (not an upgrade).
    fn without_hop_by_hop(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = map(pairs);
        remove_hop_by_hop(&mut h, false);
        h
    }

    /// The names left in `h`, sorted.
    fn sorted_names(h: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        names
    }

    #[test]
    fn hop_by_hop_removed_including_connection_listed() {
        let h = without_hop_by_hop(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate;q=0.5"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("x-keep", "yes"),
        ]);
        assert_eq!(sorted_names(&h), vec!["te", "x-keep"], "{h:?}");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn hop_by_hop_without_connection_header() {
        let h = without_hop_by_hop(&[
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-keep", "yes"),
        ]);
        assert_eq!(sorted_names(&h), vec!["x-keep"]);
    }

    #[test]
    fn hop_by_hop_connection_keep_alive() {
        let h = without_hop_by_hop(&[
            ("connection", "Keep-Alive"),
            ("keep-alive", "timeout=5"),
            ("x-keep", "yes"),
        ]);
        assert_eq!(sorted_names(&h), vec!["x-keep"]);
    }

    #[test]
    fn hop_by_hop_connection_close_and_listed_names() {
        let h = without_hop_by_hop(&[
            ("connection", "close, X-Foo"),
            ("connection", " , x-bar ,not a name"),
            ("close", "odd but listed"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("te", "trailers"),
            ("x-keep", "yes"),
        ]);
        assert_eq!(sorted_names(&h), vec!["te", "x-keep"]);
    }

    #[test]
    fn hop_by_hop_connection_close_alone() {
        let h = without_hop_by_hop(&[
            ("connection", "Close"),
            ("range", "bytes=0-1"),
            ("x-keep", "yes"),
        ]);
        assert_eq!(sorted_names(&h), vec!["range", "x-keep"]);
    }

    #[test]
    fn te_listed_in_connection_is_dropped() {
        let mut h = map(&[("connection", "te"), ("te", "trailers")]);
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
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
    fn trusted_peer_blank_or_absent_lists_start_over() {
        let info = ForwardInfo {
            peer: "::ffff:10.1.2.3".parse().unwrap(),
            peer_trusted: true,
            proto: "http",
            host: None,
        };
        let mut h = map(&[("x-forwarded-for", " "), ("forwarded", "")]);
        set_forwarded(&mut h, &info);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["forwarded"], "for=10.1.2.3;proto=http");
        assert!(!h.contains_key("x-forwarded-host"));

        // Two lines, even blank ones, join to a list that is not blank.
        let mut h = map(&[("x-forwarded-for", ""), ("x-forwarded-for", "")]);
        set_forwarded(&mut h, &info);
        assert_eq!(h["x-forwarded-for"], ", , 10.1.2.3");
    }

    #[test]
    fn tchar_table_is_rfc_9110s() {
        let rfc = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        for b in 0..=u8::MAX {
            assert_eq!(is_tchar(b), rfc(b), "byte {b:#04x}");
        }
        assert_eq!(ForwardedValue::new("app.test").len(), 8);
        assert_eq!(ForwardedValue::new("app.test:8443").len(), 15);
        assert_eq!(ForwardedValue::new("").len(), 2);
    }

    #[test]
    fn forwarded_host_quoted_and_escaped() {
        let mut h = HeaderMap::new();
        let info = ForwardInfo {
            peer: "192.0.2.1".parse().unwrap(),
            peer_trusted: false,
            proto: "https",
            host: Some(r#"a"b\c"#),
        };
        set_forwarded(&mut h, &info);
        assert_eq!(
            h["forwarded"],
            r#"for=192.0.2.1;proto=https;host="a\"b\\c""#
        );

        // Not a valid header value: both host headers are dropped rather than sent.
        let info = ForwardInfo {
            host: Some("app\r\nx-injected: 1"),
            ..info
        };
        set_forwarded(&mut h, &info);
        assert!(!h.contains_key("forwarded"));
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
    }

    #[test]
    fn ip_text_matches_display() {
        let addresses = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.0.2.7",
            "1.20.100.9",
            "::1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ];
        for text in addresses {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
        for octet in 0..=255u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(octet, octet, 0, octet));
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
        // An IPv4-mapped peer is written as the IPv4 address it carries.
        let mut h = HeaderMap::new();
        let info = ForwardInfo {
            peer: "::ffff:10.0.0.1".parse().unwrap(),
            peer_trusted: false,
            proto: "http",
            host: None,
        };
        set_forwarded(&mut h, &info);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["forwarded"], "for=10.0.0.1;proto=http");
    }

    #[test]
    fn hex_id_matches_format() {
        for id in [
            0,
            1,
            0xabc,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(hex_id(id), format!("{id:032x}").as_bytes());
        }
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

    #[test]
    fn hop_by_hop_lengths_cover_every_name() {
        for name in HOP_BY_HOP.iter().chain([&header::TE]) {
            assert!(
                HOP_BY_HOP_LENGTHS.contains(&name.as_str().len()),
                "{name} is not covered"
            );
        }
    }
}
