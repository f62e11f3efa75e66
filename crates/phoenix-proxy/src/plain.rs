//! The plain path: a request head forwarded as bytes, with no header map on the way.
//!
//! Most requests a hop sees are plain: HTTP/1.1 from Phoenix's own server (`h1_server`), a route
//! without middleware, no trace asked for, nothing unusual among the fields. Building an
//! `http::HeaderMap` for such a request, editing it, and writing it out again was a third of what
//! a hop spent on it (docs/BENCHMARKS.md). On this path the head's fields are read once, where
//! httparse left them, and the upstream head is written from them directly: every field the
//! client sent, less the hop-by-hop ones and the forwarding fields this hop rewrites, then this
//! hop's `X-Forwarded-*`, `Forwarded` and `X-Request-Id`.
//!
//! The rules are not written twice: the forwarding values come from `forward::ForwardedLists`
//! and `forward::client_ip_of`, which the header-map path uses too, and a head with anything this
//! module does not handle the way `forward::remove_hop_by_hop` would is not taken ([`scan`] says
//! `None`): `TE`, a `Connection` that names other fields, a field named `close`, a trace request,
//! a second `X-Forwarded-For`, `Forwarded` or `X-Request-Id`, a `Host` that is missing, repeated or
//! not text. Those requests take the header-map path, as every request did before. The unit tests
//! below hold the two paths to the same result field by field.
//!
//! On the way back, the upstream client keeps the response's fields as lines too
//! ([`split_response`]): only those that some code reads by name go into its header map, and the
//! common response, whose only such fields are its length and connection options, gets no map at
//! all. The lines travel beside the request and the response ([`WireFields`]), from `h1_server`
//! through `Proxy::exchange` and `Service::send_with` to the upstream client and back.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::forward::{names, ForwardInfo, ForwardedLists, Lines, HOP_BY_HOP_NAMES};
use crate::wire::{push_field, FieldCopier};

/// The fields rewritten by this hop, by the names `forward` writes.
const X_FORWARDED_FOR: &[u8] = names::X_FORWARDED_FOR.as_bytes();
const X_FORWARDED_PROTO: &[u8] = names::X_FORWARDED_PROTO.as_bytes();
const X_FORWARDED_HOST: &[u8] = names::X_FORWARDED_HOST.as_bytes();
const X_REQUEST_ID: &[u8] = names::X_REQUEST_ID.as_bytes();
const FORWARDED: &[u8] = names::FORWARDED.as_bytes();

/// The fields a pass over a plain head found. Positions are indexes into the head's spans, at most
/// 128 of them (`h1_server` parses no more).
pub(crate) struct Scan<'a> {
    /// Fields never forwarded: hop-by-hop, `Content-Length` (the upstream side frames the body
    /// itself), and the list fields this hop rewrites.
    dropped: u128,
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` lines: kept only from a trusted peer.
    proto: u128,
    host_fields: u128,
    /// The one `Host`.
    pub(crate) host: &'a str,
    /// The `X-Forwarded-For` and `Forwarded` lines, when they are text (the header-map path
    /// skips a value that is not).
    pub(crate) x_forwarded_for: Lines<'a>,
    forwarded: Lines<'a>,
    /// The `X-Request-Id` field: its position and value span.
    request_id: Option<(usize, [usize; 2])>,
}

/// Reads the fields of a head (`spans` into `head`, as `wire::span` gives them) and says whether the
/// plain path takes it (see the module documentation for what it does not).
pub(crate) fn scan<'a>(head: &'a [u8], spans: &[[usize; 4]]) -> Option<Scan<'a>> {
    if spans.len() > 128 {
        return None;
    }
    let (mut dropped, mut proto, mut host_fields) = (0u128, 0u128, 0u128);
    let (mut host, mut x_forwarded_for, mut forwarded, mut request_id) = (None, None, None, None);
    let mut hosts = 0;
    for (i, &[name_start, name_end, value_start, value_end]) in spans.iter().enumerate() {
        let name = &head[name_start..name_end];
        let value = &head[value_start..value_end];
        let bit = 1u128 << i;
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        // Most names are ruled out by their length, without comparing any text.
        match name.len() {
            2 if is(b"te") => return None,
            4 if is(b"host") => {
                hosts += 1;
                host = Some(value);
            }
            5 if is(b"close") => return None,
            7 if is(b"trailer") => dropped |= bit,
            7 if is(b"upgrade") => return None,
            9 if is(b"forwarded") => {
                if forwarded.replace(value).is_some() {
                    return None;
                }
                dropped |= bit;
            }
            10 if is(b"connection") => {
                if !only_hop_by_hop(value) {
                    return None;
                }
                dropped |= bit;
            }
            10 if is(b"keep-alive") => dropped |= bit,
            12 if is(X_REQUEST_ID) => {
                if request_id.is_some() {
                    return None;
                }
                request_id = Some((i, [value_start, value_end]));
            }
            14 if is(b"content-length") => dropped |= bit,
            15 if is(X_FORWARDED_FOR) => {
                if x_forwarded_for.replace(value).is_some() {
                    return None;
                }
                dropped |= bit;
            }
            15 if is(crate::trace::TRACE_REQUEST.as_str().as_bytes()) => return None,
            16 if is(X_FORWARDED_HOST) => host_fields |= bit,
            16 if is(b"proxy-connection") => dropped |= bit,
            17 if is(X_FORWARDED_PROTO) => proto |= bit,
            17 if is(b"transfer-encoding") => return None,
            18 if is(b"proxy-authenticate") => dropped |= bit,
            19 if is(b"proxy-authorization") => dropped |= bit,
            _ => {}
        }
    }
    if hosts != 1 {
        return None;
    }
    let text_line =
        |value: Option<&'a [u8]>| value.and_then(is_text).map_or(Lines::None, Lines::One);
    Some(Scan {
        dropped,
        proto,
        host_fields,
        host: is_text(host?)?,
        x_forwarded_for: text_line(x_forwarded_for),
        forwarded: text_line(forwarded),
        request_id,
    })
}

impl Scan<'_> {
    /// The incoming `X-Request-Id` value, if there is one.
    pub(crate) fn request_id(&self) -> Option<[usize; 2]> {
        self.request_id.map(|(_, value)| value)
    }

    /// Writes the fields of the upstream head into `out`: the client's, less what this hop drops
    /// or rewrites, then this hop's forwarding fields and, when `new_request_id` is given (the
    /// incoming one was missing or not kept), `X-Request-Id`.
    pub(crate) fn write_fields(
        &self,
        out: &mut Vec<u8>,
        head: &[u8],
        spans: &[[usize; 4]],
        info: &ForwardInfo<'_>,
        new_request_id: Option<&[u8]>,
    ) {
        let lists = ForwardedLists::new(info, self.x_forwarded_for, self.forwarded);
        let keep_proto = info.keeps(self.proto != 0);
        let keep_host = info.keeps(self.host_fields != 0);
        let mut skip = self.dropped;
        if !keep_proto {
            skip |= self.proto;
        }
        if !keep_host {
            skip |= self.host_fields;
        }
        if let (Some((i, _)), Some(_)) = (self.request_id, new_request_id) {
            skip |= 1 << i;
        }
        let mut copier = FieldCopier::new(head);
        for (i, &span) in spans.iter().enumerate() {
            if skip & (1 << i) == 0 {
                copier.push(out, span);
            }
        }
        copier.finish(out);
        // The list values are written in place, with no buffer of their own.
        out.extend_from_slice(X_FORWARDED_FOR);
        out.extend_from_slice(b": ");
        lists.write_x_forwarded_for(out);
        out.extend_from_slice(b"\r\n");
        if !keep_proto {
            push_field(out, X_FORWARDED_PROTO, info.proto.as_bytes());
        }
        if !keep_host {
            if let Some(host) = info.host {
                push_field(out, X_FORWARDED_HOST, host.as_bytes());
            }
        }
        out.extend_from_slice(FORWARDED);
        out.extend_from_slice(b": ");
        lists.write_forwarded(out);
        out.extend_from_slice(b"\r\n");
        if let Some(id) = new_request_id {
            push_field(out, X_REQUEST_ID, id);
        }
    }
}

/// A field value as text, as `HeaderValue::to_str` takes it: visible ASCII, spaces and tabs.
pub(crate) fn is_text(value: &[u8]) -> Option<&str> {
    // A fold without an early exit, which the compiler turns into a few wide comparisons: these
    // values are short, and all but a hostile few pass.
    let outside = value.iter().fold(false, |outside, &b| {
        outside | ((b < b' ' && b != b'\t') | (b >= 0x7f))
    });
    if outside {
        return None;
    }
    // ASCII is UTF-8.
    std::str::from_utf8(value).ok()
}

/// Whether a `Connection` value names only options the plain path handles: `close`, `keep-alive`
/// and fields that are hop-by-hop anyway (`forward::HOP_BY_HOP_NAMES`, dropped whether named or
/// not). A request with a `TE`, `Transfer-Encoding` or `Upgrade` field never takes the plain path;
/// on a response those fields stay in the header map, where the hop-by-hop removal sees them.
fn only_hop_by_hop(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .all(|t| {
            t.eq_ignore_ascii_case(b"close")
                || HOP_BY_HOP_NAMES
                    .iter()
                    .any(|known| t.eq_ignore_ascii_case(known.as_bytes()))
        })
}

/// Fields of a plain exchange kept as `name: value\r\n` lines beside its (emptier) header map:
/// on a plain request, the fields `Scan::write_fields` wrote, which the upstream's HTTP/1.1 client
/// writes after those of the map; on its response, the fields no code reads by name
/// ([`split_response`]), which `h1_server` writes after those of the map.
#[derive(Debug, Clone)]
pub(crate) struct WireFields {
    pub(crate) lines: Bytes,
    /// A `Date` field is among the lines.
    pub(crate) date: bool,
    /// A response whose fields are all lines (its header map is empty): what its fields read by
    /// name said, its `Content-Length` (which `h1_server` writes) and `Connection` options; none
    /// of them is among the lines. See [`split_response`].
    pub(crate) framing: Option<LineFraming>,
    /// The request id to answer with, when the response's header map is empty
    /// (`proxy::exchange` then leaves the map unallocated).
    pub(crate) request_id: Option<HeaderValue>,
}

impl WireFields {
    /// Writes what a response's lines add to its head (`h1_server`): its `Content-Length` when
    /// all its fields are lines, the lines, and the request id that goes with them.
    pub(crate) fn write_response(&self, out: &mut Vec<u8>) {
        if let Some(length) = self.framing.and_then(|f| f.length) {
            out.extend_from_slice(b"content-length: ");
            crate::wire::push_decimal(out, length);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(&self.lines);
        if let Some(id) = &self.request_id {
            push_field(out, X_REQUEST_ID, id.as_bytes());
        }
    }

    /// A plain request's fields.
    pub(crate) fn request(lines: Bytes) -> WireFields {
        WireFields {
            lines,
            date: false,
            framing: None,
            request_id: None,
        }
    }
}

/// The fields read by name of a response that has no others: see [`WireFields::framing`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LineFraming {
    pub(crate) length: Option<u64>,
    /// `Connection: close`, `Connection: keep-alive`.
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
}

/// Whether a response field is one some code reads or edits by name, and so stays in the
/// response's header map: framing (`Content-Length`, `Transfer-Encoding`), hop-by-hop fields and
/// `Connection` (`forward::remove_hop_by_hop`, the keep-alive of both connections), the trace
/// field (`trace::strip`) and `X-Request-Id`, which this hop sets.
fn read_by_name(name: &[u8]) -> bool {
    let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
    match name.len() {
        2 => is(b"te"),
        5 => is(b"close"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        12 => is(X_REQUEST_ID),
        14 => is(b"content-length"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization") || is(crate::trace::TRACE_HOP.as_str().as_bytes()),
        _ => false,
    }
}

/// The response head of a plain request, its fields at `spans` of `head`: a header map of the
/// fields read by name, and the others as lines. The common response, whose only fields read by
/// name are one `Content-Length` of digits, the connection options (`Connection`, `Keep-Alive`),
/// `X-Request-Id` and the trace field, gets no map at all: its length and connection options go
/// with the lines ([`WireFields::framing`]), and the others are dropped, as the header-map path
/// drops them (hop-by-hop fields; the trace field of an exchange that is not traced; the request id,
/// which this hop sets). `None` when the head needs a whole header map: its `Connection` names
/// other fields, which the header-map path removes by name, or a field is one the http types
/// refuse (which `wire::fields` then reports).
pub(crate) fn split_response(
    head: &Bytes,
    spans: &[[usize; 4]],
) -> Option<(HeaderMap, WireFields)> {
    let mut framing = Some(LineFraming::default());
    let mut lines = Vec::with_capacity(head.len());
    let mut date = false;
    let mut copier = FieldCopier::new(head);
    for &span @ [name_start, name_end, value_start, value_end] in spans {
        let name = &head[name_start..name_end];
        let value = &head[value_start..value_end];
        if !read_by_name(name) {
            date |= name.eq_ignore_ascii_case(b"date");
            copier.push(&mut lines, span);
            continue;
        }
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        if is(b"connection") && !only_hop_by_hop(value) {
            return None;
        }
        let Some(common) = framing.as_mut() else {
            continue;
        };
        if is(b"connection") {
            for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                common.close |= option.eq_ignore_ascii_case(b"close");
                common.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if is(b"content-length") && common.length.is_none() {
            // The digits `h1_server` takes as a length, so that it frames the body by this one.
            common.length = crate::wire::decimal(value, 15);
            if common.length.is_none() {
                framing = None;
            }
        } else if !(is(b"keep-alive")
            || is(X_REQUEST_ID)
            || is(crate::trace::TRACE_HOP.as_str().as_bytes()))
        {
            framing = None;
        }
    }
    copier.finish(&mut lines);
    let mut headers = HeaderMap::new();
    if framing.is_none() {
        for &[name_start, name_end, value_start, value_end] in spans {
            let name = &head[name_start..name_end];
            if read_by_name(name) {
                headers.append(
                    HeaderName::from_bytes(name).ok()?,
                    HeaderValue::from_maybe_shared(head.slice(value_start..value_end)).ok()?,
                );
            }
        }
    }
    let fields = WireFields {
        lines: Bytes::from(lines),
        date,
        framing,
        request_id: None,
    };
    Some((headers, fields))
}

/// Sets the `X-Request-Id` a response is answered with: beside its lines when all its fields are
/// lines (its map stays unallocated), in its map otherwise.
pub(crate) fn set_request_id(
    headers: &mut HeaderMap,
    lines: Option<&mut WireFields>,
    id: HeaderValue,
) {
    match lines {
        Some(lines) if headers.is_empty() => lines.request_id = Some(id),
        _ => {
            headers.insert(&crate::forward::X_REQUEST_ID, id);
        }
    }
}

impl WireFields {
    /// Adds the fields to `headers`, for a server that is not reached over HTTP/1.1. Each line is
    /// one `write_fields` wrote, of a name and value the http types take (`h1_server` parsed them
    /// with httparse, whose name and value bytes are theirs); a line that is not is skipped.
    pub(crate) fn append_to(&self, headers: &mut HeaderMap) {
        let mut rest = &self.lines[..];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let line = &rest[..end];
            rest = &rest[end + 2..];
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            // `write_fields` puts exactly one space after the colon.
            let (name, value) = (&line[..colon], &line[colon + 1..]);
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.lines.slice_ref(value)),
            ) {
                headers.append(name, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;
    use std::net::IpAddr;

    use super::*;
    use crate::forward;
    use crate::wire::{fields, span};

    /// Parses a request head into its bytes and field spans, as `h1_server` does.
    fn parse(head: &str) -> (Bytes, Vec<[usize; 4]>) {
        let bytes = Bytes::copy_from_slice(head.as_bytes());
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
        let mut req = httparse::Request::new(&mut []);
        let status = req
            .parse_with_uninit_headers(&bytes, &mut slots)
            .expect("test heads parse");
        assert!(status.is_complete());
        let spans = req.headers.iter().map(|f| span(&bytes, f)).collect();
        (bytes, spans)
    }

    #[test]
    fn copied_fields_are_the_bytes_push_field_writes() {
        // Lines as written (`name: value\r\n`) and others: no space, more spaces, a bare LF, an
        // empty value. Every subset of them, so runs start, end and break everywhere.
        let (head, spans) = parse(
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-One: 1\r\nx-two:2\r\nX-Three:   3  \r\n\
             X-Four: 4\nX-Five: 5\r\nX-Empty: \r\nX-Six: 6\r\n\r\n",
        );
        assert_eq!(spans.len(), 8);
        for mask in 0u32..1 << spans.len() {
            let kept = spans
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0);
            let (mut copied, mut pushed) = (b"start\r\n".to_vec(), b"start\r\n".to_vec());
            let mut copier = FieldCopier::new(&head);
            for (_, &span @ [ns, ne, vs, ve]) in kept {
                copier.push(&mut copied, span);
                push_field(&mut pushed, &head[ns..ne], &head[vs..ve]);
            }
            copier.finish(&mut copied);
            assert_eq!(
                String::from_utf8_lossy(&copied),
                String::from_utf8_lossy(&pushed),
                "fields {mask:#b}"
            );
        }
    }

    /// Fields as sorted `(lowercase name, value)` pairs.
    fn sorted(headers: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        pairs.sort();
        pairs
    }

    /// The upstream fields by the header-map path: `proxy::handle`'s edits, then what the
    /// upstream client leaves out (`Content-Length`, which it writes from the body itself).
    fn by_map(head: &str, info: &ForwardInfo<'_>) -> Vec<(String, String)> {
        let (bytes, spans) = parse(head);
        let mut headers = fields(&bytes, &spans, 0).unwrap();
        forward::ensure_request_id(&mut headers);
        forward::remove_hop_by_hop(&mut headers, false);
        forward::set_forwarded(&mut headers, info);
        headers.remove(http::header::CONTENT_LENGTH);
        sorted(&headers)
    }

    /// The upstream fields by the plain path, read back into a map; `None` when it does not take
    /// the head.
    fn by_bytes(head: &str, info: &ForwardInfo<'_>) -> Option<Vec<(String, String)>> {
        let (bytes, spans) = parse(head);
        let scan = scan(&bytes, &spans)?;
        let kept = scan
            .request_id()
            .is_some_and(|[s, e]| forward::is_request_id(&bytes[s..e]));
        let mut out = Vec::new();
        scan.write_fields(
            &mut out,
            &bytes,
            &spans,
            info,
            (!kept).then_some(&b"fresh-id"[..]),
        );
        // Read back as an HTTP/2 upstream gets them.
        let mut headers = HeaderMap::new();
        WireFields::request(out.into()).append_to(&mut headers);
        Some(sorted(&headers))
    }

    fn info(peer: &str, trusted: bool) -> ForwardInfo<'static> {
        ForwardInfo {
            peer: peer.parse::<IpAddr>().unwrap(),
            peer_trusted: trusted,
            proto: "https",
            host: Some("app.phoenix.test"),
        }
    }

    /// Heads the plain path takes give the same upstream fields by both paths, from trusted and
    /// untrusted peers, over IPv4 and IPv6. A fresh request id is random on the map path, so the
    /// heads that need one are compared without it.
    #[test]
    fn both_paths_forward_the_same_fields() {
        let heads = [
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nX-Request-Id: r0\r\n\r\n",
            "GET /a?b=c HTTP/1.1\r\nHost: app.phoenix.test\r\nUser-Agent: x\r\nAccept: */*\r\nX-Request-Id: abc\r\n\r\n",
            "POST /p HTTP/1.1\r\nhost: app.phoenix.test\r\ncontent-length: 3\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\nx-request-id: r1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.2\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: outer.test\r\nForwarded: for=203.0.113.9;proto=http\r\nX-Request-Id: r2\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nX-Forwarded-For:   \r\nForwarded: \r\nx-request-id: r3\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nTrailer: x\r\nConnection: close, proxy-authorization\r\nX-Request-Id: r4\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Proto: ws\r\nx-request-id: r5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nConnection: keep-alive, Upgrade\r\nx-request-id: r6\r\n\r\n",
        ];
        let peers = [
            info("10.0.0.3", true),
            info("10.0.0.3", false),
            info("2001:db8::7", true),
            info("::ffff:192.0.2.1", false),
        ];
        for head in heads {
            for info in &peers {
                let by_map = by_map(head, info);
                let by_bytes = by_bytes(head, info).unwrap_or_else(|| panic!("not taken: {head}"));
                assert_eq!(by_bytes, by_map, "{head} from {info:?}");
            }
        }
    }

    #[test]
    fn a_missing_or_malformed_request_id_is_replaced_on_both_paths() {
        for head in [
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app.phoenix.test\r\nX-Request-Id: a b\r\n\r\n",
        ] {
            let info = info("10.0.0.3", false);
            let strip = |mut fields: Vec<(String, String)>| {
                let ids: Vec<_> = fields.iter().filter(|(n, _)| n == "x-request-id").collect();
                assert_eq!(ids.len(), 1, "{head}");
                assert_ne!(ids[0].1, "a b", "{head}");
                fields.retain(|(n, _)| n != "x-request-id");
                fields
            };
            assert_eq!(
                strip(by_bytes(head, &info).unwrap()),
                strip(by_map(head, &info))
            );
        }
    }

    /// What the plain path leaves to the header-map path.
    #[test]
    fn unusual_heads_are_left_to_the_header_map_path() {
        for head in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: caf\u{e9}.test\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\nClose: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-Phoenix-Trace: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nForwarded: for=a\r\nforwarded: for=b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-Request-Id: 1\r\nX-Request-Id: 2\r\n\r\n",
        ] {
            let (bytes, spans) = parse(head);
            assert!(scan(&bytes, &spans).is_none(), "{head}");
        }
    }

    /// Parses a response head into its bytes and field spans, as `upstream::h1` does.
    fn parse_response(head: &str) -> (Bytes, Vec<[usize; 4]>) {
        let bytes = Bytes::copy_from_slice(head.as_bytes());
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
        let mut resp = httparse::Response::new(&mut []);
        let status = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, &bytes, &mut slots)
            .expect("test heads parse");
        assert!(status.is_complete());
        let spans = resp.headers.iter().map(|f| span(&bytes, f)).collect();
        (bytes, spans)
    }

    /// The fields a client gets of an upstream response that is not traced: `proxy::exchange`'s
    /// edits, then what `h1_server` writes (the map's fields, the lines, the request id).
    fn answered(mut headers: HeaderMap, mut lines: Option<WireFields>) -> Vec<(String, String)> {
        forward::remove_hop_by_hop(&mut headers, false);
        crate::trace::strip(&mut headers);
        set_request_id(
            &mut headers,
            lines.as_mut(),
            HeaderValue::from_static("ours"),
        );
        if let Some(lines) = lines {
            let mut out = Vec::new();
            lines.write_response(&mut out);
            WireFields::request(out.into()).append_to(&mut headers);
        }
        sorted(&headers)
    }

    /// A response to a plain request keeps in its map every field the proxy reads or edits, or,
    /// when those are only its length and connection options, has no map at all; either way the
    /// client gets the same fields as from a whole header map.
    #[test]
    fn both_paths_answer_with_the_same_fields() {
        let no_map = |length, close, keep_alive| {
            Some(LineFraming {
                length,
                close,
                keep_alive,
            })
        };
        for (head, framing) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nDate: Sat, 28 Nov 2026 10:00:00 GMT\r\nServer: s\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Request-Id: theirs\r\nX-Phoenix-Trace-Hop: forged\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
                no_map(Some(2), false, true),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: theirs\r\nTrailer: x\r\n\r\n",
                None,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\nConnection: close, keep-alive\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\n\r\n",
                None,
            ),
            ("HTTP/1.1 204 No Content\r\nETag: \"x\"\r\nTE: trailers\r\n\r\n", None),
            (
                "HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 19\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nDate: Sat, 28 Nov 2026 10:00:00 GMT\r\nSet-Cookie: a=1\r\n\r\n",
                no_map(Some(19), false, true),
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: Close\r\n\r\n",
                no_map(Some(2), true, false),
            ),
            ("HTTP/1.1 200 OK\r\nServer: s\r\n\r\n", no_map(None, false, false)),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n", None),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\n", None),
        ] {
            let (bytes, spans) = parse_response(head);
            let whole = fields(&bytes, &spans, 0).unwrap();
            let (map, lines) = split_response(&bytes, &spans).unwrap();
            assert_eq!(lines.framing, framing, "{head}");
            assert_eq!(map.is_empty(), framing.is_some(), "{head}");
            assert_eq!(
                lines.date,
                head.contains("Date:"),
                "the lines say whether they hold a Date: {head}"
            );
            assert_eq!(answered(map, Some(lines)), answered(whole, None), "{head}");
        }
        let (bytes, spans) =
            parse_response("HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n");
        assert!(split_response(&bytes, &spans).is_none());
    }

    #[test]
    fn the_client_address_is_read_from_the_same_line_on_both_paths() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let (bytes, spans) = parse(
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 198.51.100.4, 10.1.1.1\r\n\r\n",
        );
        let scan = scan(&bytes, &spans).unwrap();
        let line = scan.x_forwarded_for;
        let headers = fields(&bytes, &spans, 0).unwrap();
        let peer: IpAddr = "10.0.0.3".parse().unwrap();
        let by_bytes = forward::client_ip_of(peer, line, &trusted);
        assert_eq!(by_bytes, forward::client_ip(peer, &headers, &trusted));
        assert_eq!(by_bytes, "198.51.100.4".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn text_is_what_header_value_to_str_takes() {
        for b in 0..=u8::MAX {
            for value in [
                vec![b],
                vec![b'a', b, b'z'],
                [b"a long value of 40 bytes, more or less..".as_slice(), &[b]].concat(),
            ] {
                let expected = http::HeaderValue::from_bytes(&value)
                    .ok()
                    .and_then(|v| v.to_str().ok().map(str::to_owned));
                assert_eq!(
                    is_text(&value).map(str::to_owned),
                    expected,
                    "byte {b:#04x}"
                );
            }
        }
    }
}
