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

/// Writes fields parsed out of `head` into another head, as [`push_field`] does. A run of fields
/// laid out in `head` exactly as `push_field` writes them (`name: value\r\n`, one after the other)
/// is copied in one piece: the same bytes, in one copy rather than four per field. Call `finish`
/// before writing anything else into `out`.
pub(crate) struct FieldCopier<'h> {
    head: &'h [u8],
    /// The run of `head` not copied yet.
    run: Option<(usize, usize)>,
}

impl<'h> FieldCopier<'h> {
    pub(crate) fn new(head: &'h [u8]) -> FieldCopier<'h> {
        FieldCopier { head, run: None }
    }

    /// Writes the field at `span` (see [`span`]).
    pub(crate) fn push(
        &mut self,
        out: &mut Vec<u8>,
        [name_start, name_end, value_start, value_end]: [usize; 4],
    ) {
        let head = self.head;
        let as_written = value_start == name_end + 2
            && head[name_end..value_start] == *b": "
            && head.get(value_end..value_end + 2) == Some(b"\r\n");
        if !as_written {
            self.finish(out);
            push_field(
                out,
                &head[name_start..name_end],
                &head[value_start..value_end],
            );
            return;
        }
        match &mut self.run {
            Some((_, end)) if *end == name_start => *end = value_end + 2,
            _ => {
                self.finish(out);
                self.run = Some((name_start, value_end + 2));
            }
        }
    }

    /// Writes what is left of the run.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some((start, end)) = self.run.take() {
            out.extend_from_slice(&self.head[start..end]);
        }
    }
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
