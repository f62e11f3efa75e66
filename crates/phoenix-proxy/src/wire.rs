//! HTTP/1.1 on the wire, for both of Phoenix's sides (`h1_server` towards clients, `upstream::h1`
//! towards servers): writing fields and numbers into a head, reading numbers and fields out of one.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub(crate) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub(crate) fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A number of one to `max_digits` decimal digits and nothing else (at most 19, which cannot
/// overflow).
pub(crate) fn decimal(digits: &[u8], max_digits: usize) -> Option<u64> {
    if digits.is_empty() || digits.len() > max_digits.min(19) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Where a field parsed by httparse lies in `buf`, the buffer it was parsed from: name start and
/// end, value start and end.
pub(crate) fn span(buf: &[u8], field: &httparse::Header<'_>) -> [usize; 4] {
    let base = buf.as_ptr() as usize;
    let name = field.name.as_ptr() as usize - base;
    let value = field.value.as_ptr() as usize - base;
    [
        name,
        name + field.name.len(),
        value,
        value + field.value.len(),
    ]
}

/// The fields at `spans` of `head` as a header map whose values share `head`'s bytes, with room
/// for `extra` more; `None` when a name or value is not one the http types take.
pub(crate) fn fields(head: &Bytes, spans: &[[usize; 4]], extra: usize) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(spans.len() + extra);
    for &[name_start, name_end, value_start, value_end] in spans {
        let name = HeaderName::from_bytes(&head[name_start..name_end]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end)).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}
