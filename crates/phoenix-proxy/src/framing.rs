//! Refusing ambiguous HTTP/1.1 request framing, which hyper would otherwise repair out of sight.
//!
//! hyper's HTTP/1 server accepts two framings that the RFCs call ambiguous and normalises them
//! before our service sees the request: `Content-Length` together with `Transfer-Encoding` is read
//! as chunked with the `Content-Length` dropped, and a repeated identical `Content-Length` becomes
//! one. RFC 9112 section 6.3 and RFC 9110 section 8.6 allow a server either to do that or to reject
//! the message. We reject, with 400 and `Connection: close`: an intermediary that repairs a message
//! can disagree with another hop's parser about where that message ends, which is what request
//! smuggling is made of, and once hyper has repaired it no trace of the ambiguity is left.
//!
//! `FramingIo` therefore sits between the connection (TLS or plain) and hyper and follows the
//! HTTP/1.1 message boundaries in the bytes hyper reads: in a request head it looks only at the
//! `Content-Length` and `Transfer-Encoding` lines; then it skips the body (a length, or chunked
//! framing with its extensions and trailers); then comes the next head. An ambiguous head is
//! recorded, by the request's index on the connection, in the `Verdicts` shared with the service.
//! hyper hands an HTTP/1 connection's requests to the service one at a time and in order, and it
//! cannot parse a head before the head's bytes have passed through here, so the service, counting
//! requests, knows for each one whether it was refused, and answers 400 instead of forwarding it.
//! Only the read side is inspected; requests are counted whatever the method or response
//! (`HEAD`, `Expect: 100-continue`), because framing is a property of the request bytes alone.
//!
//! The scanner refuses nothing else. Whatever it does not follow makes it stop looking for the rest
//! of the connection: a head or chunked body that hyper will refuse itself (hyper then answers 400
//! and closes), a head over the size limit (431 from hyper), the HTTP/2 connection preface, and a
//! protocol switch (a 101; the service reports it, since the bytes that follow
//! are no longer HTTP/1.1). Once stopped it costs one branch per read.
//!
//! Cost on the hot path: a head that arrives in one read is scanned in place, line by line, with a
//! word-at-a-time search for the line feed and a few byte comparisons per line; only a line cut by
//! the end of a read is copied, into a buffer that is reused and freed if it grew large. Bodies are
//! skipped by arithmetic; of a chunked body only the size lines and trailers are read.
//!
//! The scanner also knows when a head is under way (it began and has not ended), which hyper does
//! not tell: `Verdicts::head_since` lets the connection time request heads with the header-read
//! timeout, and the wait between requests with the idle timeout (see `server.rs`). Only a head that
//! a read cut in two is recorded, so the common read touches neither the clock nor a lock.
//!
//! On a connection that Phoenix's own HTTP/1.1 server (`h1_server`) serves first, the scanner
//! sleeps until that server hands the connection to hyper (`FramingIo::dormant`, `start`). That
//! server takes only requests with one `Content-Length` of digits and no `Transfer-Encoding`, none
//! of which the scanner could refuse, and it hands over at a request boundary with the bytes it read
//! from there on; the scanner starts on those, counting from the requests already served.
//!
//! Tests: the unit tests below feed the scanner whole, byte by byte and in random splits;
//! `tests/hardening_http1.rs` sends the ambiguous requests over TLS, alone and behind valid ones.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// `Content-Length` and `Transfer-Encoding` in one request (RFC 9112 section 6.3, item 3).
    LengthWithTransferEncoding,
    /// More than one `Content-Length` field line, even with equal values (RFC 9110 section 8.6).
    RepeatedLength,
    /// A `Content-Length` that is a list (`5, 5`; RFC 9110 section 8.6).
    LengthList,
}

impl Ambiguity {
    /// The reason as the client is told it and as the log records it.
    pub fn message(self) -> &'static str {
        match self {
            Ambiguity::LengthWithTransferEncoding => {
                "request has both Content-Length and Transfer-Encoding"
            }
            Ambiguity::RepeatedLength => "request has more than one Content-Length",
            Ambiguity::LengthList => "request has a Content-Length list",
        }
    }

    fn code(self) -> u8 {
        match self {
            Ambiguity::LengthWithTransferEncoding => 0,
            Ambiguity::RepeatedLength => 1,
            Ambiguity::LengthList => 2,
        }
    }

    fn from_code(code: u8) -> Ambiguity {
        match code {
            0 => Ambiguity::LengthWithTransferEncoding,
            1 => Ambiguity::RepeatedLength,
            _ => Ambiguity::LengthList,
        }
    }
}

impl std::fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// A refused request: its index on the connection (0 for the first) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub index: u64,
    pub reason: Ambiguity,
}

/// Why the scanner stopped following the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A request was refused; its answer closes the connection, so nothing after it is served.
    Refused,
    /// The connection starts with the HTTP/2 preface.
    Http2,
    /// A response switched protocols; the bytes that follow belong to another protocol.
    Upgraded,
    /// A head or chunked framing that hyper refuses itself.
    Malformed,
    /// A head longer than any hyper accepts (it answers 431).
    HeadTooLarge,
    /// Not yet started: Phoenix's own HTTP/1.1 server serves the connection, and it takes only
    /// requests with unambiguous framing (see `FramingIo::start`).
    Dormant,
}

/// Where the scanner is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a request head, or in the empty lines before one (skipped, as httparse does).
    Head,
    /// In a body of known length: the bytes left.
    Body(u64),
    /// In a chunked body.
    Chunked(Chunk),
    Stopped(Stop),
}

/// Position in chunked framing (RFC 9112 section 7.1), accepting exactly what hyper's decoder
/// accepts: spaces or tabs after the size, extensions up to the CR (a bare LF in one is an error),
/// CRLF line ends, and trailer lines ended by CRLF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before the first hex digit of a chunk size.
    SizeStart,
    /// In the hex digits of the size (the value so far).
    Size(u64),
    /// In spaces or tabs after the size.
    SizeSpace(u64),
    /// In a chunk extension, up to the CR.
    Extension(u64),
    /// After the CR of the size line.
    SizeLf(u64),
    /// In chunk data: the bytes left.
    Data(u64),
    /// After chunk data.
    DataCr,
    DataLf,
    /// At the start of a trailer field line, or of the empty line that ends the message.
    TrailerStart,
    /// In a trailer field line, up to the CR.
    Trailer,
    TrailerLf,
    /// After the CR of the final empty line.
    EndLf,
    /// The message ended.
    Done,
}

/// What the lines of the current head said so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Head {
    /// Bytes of the head so far, leading empty lines included (hyper buffers them too).
    len: usize,
    request_line: bool,
    lengths: u32,
    /// The first `Content-Length` value; `None` if it is not a plain decimal number.
    length: Option<u64>,
    length_list: bool,
    transfer_encoding: bool,
    /// Whether the last `Transfer-Encoding` line ends in `chunked` (hyper's rule).
    chunked: bool,
}

/// A line cut by the end of a read is kept in a buffer of at most this capacity; a larger one is
/// freed once its line is complete, so a connection that sent one huge line does not keep it.
const PARTIAL_KEEP: usize = 4096;

/// The first line of the HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Follows the HTTP/1.1 request framing of one connection (see the module documentation).
#[derive(Debug)]
pub struct FrameScanner {
    state: State,
    head: Head,
    /// The start of a head line that the last read cut off; empty otherwise.
    partial: Vec<u8>,
    /// Index of the request whose head comes next.
    index: u64,
    /// Longest head followed, in bytes; longer ones hyper refuses anyway.
    limit: usize,
    refusal: Option<Refusal>,
}

impl FrameScanner {
    /// A scanner for a new connection; `max_head` must be at least the longest head hyper accepts.
    pub fn new(max_head: usize) -> FrameScanner {
        FrameScanner {
            state: State::Head,
            head: Head::default(),
            partial: Vec::new(),
            index: 0,
            limit: max_head,
            refusal: None,
        }
    }

    /// Whether the scanner still follows the connection.
    pub fn is_scanning(&self) -> bool {
        !matches!(self.state, State::Stopped(_))
    }

    /// Why the scanner stopped, if it did.
    pub fn stopped(&self) -> Option<Stop> {
        match self.state {
            State::Stopped(why) => Some(why),
            _ => None,
        }
    }

    /// Complete request heads seen so far.
    pub fn heads(&self) -> u64 {
        self.index
    }

    /// Whether a head has begun (a byte of it, or of the empty lines before it, was seen) and
    /// not ended yet.
    pub fn in_head(&self) -> bool {
        self.state == State::Head && (self.head.len > 0 || !self.partial.is_empty())
    }

    /// A scanner that follows nothing until `start`.
    fn dormant(max_head: usize) -> FrameScanner {
        FrameScanner {
            state: State::Stopped(Stop::Dormant),
            ..FrameScanner::new(max_head)
        }
    }

    /// Starts following the connection at a request boundary, where the request with index
    /// `index` begins.
    fn start(&mut self, index: u64) {
        debug_assert_eq!(self.stopped(), Some(Stop::Dormant));
        self.state = State::Head;
        self.head = Head::default();
        self.index = index;
    }

    /// Stops following the connection.
    pub fn stop(&mut self, why: Stop) {
        self.state = State::Stopped(why);
        self.partial = Vec::new();
    }

    /// Follows the next bytes of the connection; returns the refusal they completed, if any (at
    /// most one per connection: the scanner stops after it).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<Refusal> {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Head => self.scan_head(bytes),
                State::Body(left) => {
                    let n = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                    &bytes[n..]
                }
                State::Chunked(chunk) => self.scan_chunked(chunk, bytes),
                State::Stopped(_) => break,
            };
        }
        self.refusal.take()
    }

    fn scan_head<'a>(&mut self, mut bytes: &'a [u8]) -> &'a [u8] {
        if !self.partial.is_empty() {
            let Some(end) = find_byte(b'\n', bytes) else {
                self.keep_partial(bytes);
                return &[];
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&bytes[..end]);
            bytes = &bytes[end + 1..];
            self.line(&line);
            if self.is_scanning() && line.capacity() <= PARTIAL_KEEP {
                line.clear();
                self.partial = line;
            }
            if self.state != State::Head {
                return bytes;
            }
        }
        while let Some(end) = find_byte(b'\n', bytes) {
            self.line(&bytes[..end]);
            bytes = &bytes[end + 1..];
            if self.state != State::Head {
                return bytes;
            }
        }
        self.keep_partial(bytes);
        &[]
    }

    fn keep_partial(&mut self, bytes: &[u8]) {
        if self.head.len + self.partial.len() + bytes.len() > self.limit {
            self.stop(Stop::HeadTooLarge);
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// One line of a head, without its LF.
    fn line(&mut self, line: &[u8]) {
        self.head.len += line.len() + 1;
        if self.head.len > self.limit {
            return self.stop(Stop::HeadTooLarge);
        }
        // httparse accepts CRLF and bare LF as line ends; a CR anywhere else makes it refuse.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.head.request_line {
                self.end_of_head();
            }
            return;
        }
        if !self.head.request_line {
            self.head.request_line = true;
            if self.index == 0 && line == H2_PREFACE_LINE {
                self.stop(Stop::Http2);
            }
            return;
        }
        // Field names are matched like hyper matches them: exactly, in any case, with the colon
        // right after (httparse refuses whitespace before it). Obs-fold lines never match and are
        // refused by httparse anyway.
        if let Some(value) = field_value(line, b"content-length") {
            self.head.lengths += 1;
            if value.contains(&b',') {
                self.head.length_list = true;
            } else if self.head.lengths == 1 {
                self.head.length = parse_decimal(value);
            }
        } else if let Some(value) = field_value(line, b"transfer-encoding") {
            self.head.transfer_encoding = true;
            self.head.chunked = ends_in_chunked(value);
        }
    }

    fn end_of_head(&mut self) {
        let head = std::mem::take(&mut self.head);
        let index = self.index;
        self.index += 1;
        let ambiguity = if head.lengths > 0 && head.transfer_encoding {
            Some(Ambiguity::LengthWithTransferEncoding)
        } else if head.lengths > 1 {
            Some(Ambiguity::RepeatedLength)
        } else if head.length_list {
            Some(Ambiguity::LengthList)
        } else {
            None
        };
        if let Some(reason) = ambiguity {
            self.refusal = Some(Refusal { index, reason });
            return self.stop(Stop::Refused);
        }
        // The body as hyper frames a request it accepts (RFC 9112 section 6.3); whatever hyper
        // refuses (a coding other than a final chunked, a length that is not a number) stops us.
        if head.transfer_encoding {
            if head.chunked {
                self.state = State::Chunked(Chunk::SizeStart);
            } else {
                self.stop(Stop::Malformed);
            }
        } else if head.lengths == 1 {
            match head.length {
                Some(0) => self.state = State::Head,
                Some(n) => self.state = State::Body(n),
                None => self.stop(Stop::Malformed),
            }
        } else {
            self.state = State::Head;
        }
    }

    fn scan_chunked<'a>(&mut self, mut chunk: Chunk, mut bytes: &'a [u8]) -> &'a [u8] {
        loop {
            if chunk == Chunk::Done {
                self.state = State::Head;
                return bytes;
            }
            if bytes.is_empty() {
                self.state = State::Chunked(chunk);
                return bytes;
            }
            // Data and trailer lines in bulk; the short framing lines byte by byte.
            chunk = match chunk {
                Chunk::Data(left) => {
                    let n = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[n..];
                    match left - n as u64 {
                        0 => Chunk::DataCr,
                        left => Chunk::Data(left),
                    }
                }
                Chunk::Trailer => match find_byte(b'\r', bytes) {
                    Some(cr) => {
                        bytes = &bytes[cr + 1..];
                        Chunk::TrailerLf
                    }
                    None => {
                        bytes = &[];
                        Chunk::Trailer
                    }
                },
                _ => {
                    let byte = bytes[0];
                    bytes = &bytes[1..];
                    match chunk_step(chunk, byte) {
                        Some(next) => next,
                        None => {
                            self.stop(Stop::Malformed);
                            return &[];
                        }
                    }
                }
            };
        }
    }
}

/// One byte of chunked framing outside data and trailer lines; `None` where hyper's decoder fails.
fn chunk_step(chunk: Chunk, byte: u8) -> Option<Chunk> {
    Some(match (chunk, byte) {
        (Chunk::SizeStart, _) => Chunk::Size(u64::from(hex_digit(byte)?)),
        (Chunk::Size(size), _) if hex_digit(byte).is_some() => Chunk::Size(
            size.checked_mul(16)?
                .checked_add(u64::from(hex_digit(byte)?))?,
        ),
        (Chunk::Size(size) | Chunk::SizeSpace(size), b' ' | b'\t') => Chunk::SizeSpace(size),
        (Chunk::Size(size) | Chunk::SizeSpace(size), b';') => Chunk::Extension(size),
        (Chunk::Size(size) | Chunk::SizeSpace(size) | Chunk::Extension(size), b'\r') => {
            Chunk::SizeLf(size)
        }
        (Chunk::Extension(_), b'\n') => return None,
        (Chunk::Extension(size), _) => Chunk::Extension(size),
        (Chunk::SizeLf(0), b'\n') => Chunk::TrailerStart,
        (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::SizeStart,
        (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
        (Chunk::TrailerStart, _) => Chunk::Trailer,
        (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
        (Chunk::EndLf, b'\n') => Chunk::Done,
        _ => return None,
    })
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// The value of a field line named `name` (lowercase), without surrounding whitespace.
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let n = name.len();
    if line.len() > n && line[n] == b':' && line[..n].eq_ignore_ascii_case(name) {
        Some(trim_whitespace(&line[n + 1..]))
    } else {
        None
    }
}

fn trim_whitespace(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// A `Content-Length` value as hyper reads it: digits only, no sign, no overflow.
fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Whether the last coding of a `Transfer-Encoding` value is `chunked` (hyper's rule).
fn ends_in_chunked(value: &[u8]) -> bool {
    let last = value.rsplit(|&b| b == b',').next().unwrap_or(value);
    trim_whitespace(last).eq_ignore_ascii_case(b"chunked")
}

/// Position of the first `needle` in `haystack`, eight bytes at a time: the classic test for a zero
/// byte in a word, applied to the word XOR the needle repeated. (The `memchr` crate would do the
/// same with SIMD, but it is not a dependency of this crate.)
fn find_byte(needle: u8, haystack: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let pattern = ONES * u64::from(needle);
    let mut words = haystack.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("chunks of eight bytes")) ^ pattern;
        // Borrows can flag bytes above a zero byte too, never below one: the lowest flag is exact.
        let zeros = word.wrapping_sub(ONES) & !word & HIGHS;
        if zeros != 0 {
            return Some(offset + zeros.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|i| offset + i)
}

// ---------------------------------------------------------------------------------------------
// The connection side
// ---------------------------------------------------------------------------------------------

const NONE_REFUSED: u64 = u64::MAX;

/// What the scanner of one connection found, shared with the service serving it.
#[derive(Debug)]
pub(crate) struct Verdicts {
    /// Index of the refused request, or `NONE_REFUSED`.
    refused: AtomicU64,
    reason: AtomicU8,
    /// HTTP/1 requests handed to the service so far.
    served: AtomicU64,
    /// Set by the service when a response switched protocols.
    switched: AtomicBool,
    /// When the head now being read began; `None` between requests and once the scanner stopped.
    /// Written only when a head is cut by the end of a read, or ends after such a cut.
    head_since: Mutex<Option<Instant>>,
    head_changed: Notify,
}

impl Verdicts {
    /// Verdicts for a connection that opened at `opened`: its first head is awaited from then.
    pub(crate) fn new(opened: Instant) -> Verdicts {
        Verdicts {
            refused: AtomicU64::new(NONE_REFUSED),
            reason: AtomicU8::new(0),
            served: AtomicU64::new(0),
            switched: AtomicBool::new(false),
            head_since: Mutex::new(Some(opened)),
            head_changed: Notify::new(),
        }
    }

    /// When the request head now being read began, if one is (see `serve_http`: the header-read
    /// timeout runs from then, the idle timeout between heads).
    pub(crate) fn head_since(&self) -> Option<Instant> {
        *self.head_since.lock().expect("head lock")
    }

    /// Completes when `head_since` changed since the last call (a head began or ended, or the
    /// scanner stopped following the connection).
    pub(crate) fn head_changed(&self) -> Notified<'_> {
        self.head_changed.notified()
    }

    fn set_head_since(&self, since: Option<Instant>) {
        *self.head_since.lock().expect("head lock") = since;
        self.head_changed.notify_one();
    }

    fn refuse(&self, refusal: Refusal) {
        self.reason.store(refusal.reason.code(), Ordering::Relaxed);
        self.refused.store(refusal.index, Ordering::Release);
    }

    /// Counts the next HTTP/1 request of the connection and says whether it must be refused.
    /// Call it once per HTTP/1 request, in the order hyper hands them over (when the service is
    /// called, not later in its future). Requests after a refused one are refused too; hyper
    /// closes the connection after the first refusal's answer, so none should come.
    pub(crate) fn next_request(&self) -> Option<Ambiguity> {
        let index = self.served.fetch_add(1, Ordering::Relaxed);
        let refused = self.refused.load(Ordering::Acquire);
        (index >= refused).then(|| Ambiguity::from_code(self.reason.load(Ordering::Relaxed)))
    }

    /// The connection switched protocols: the scanner stops at its next read.
    pub(crate) fn switched_protocols(&self) {
        self.switched.store(true, Ordering::Relaxed);
    }
}

/// The IO of an HTTP connection with a [`FrameScanner`] on its read side; writes pass through.
pub(crate) struct FramingIo<I> {
    inner: I,
    scanner: FrameScanner,
    verdicts: Arc<Verdicts>,
    /// Whether `verdicts.head_since` is set (a copy, so the common read does not lock).
    head_pending: bool,
}

impl<I> FramingIo<I> {
    pub(crate) fn new(inner: I, max_head: usize, verdicts: Arc<Verdicts>) -> FramingIo<I> {
        FramingIo {
            inner,
            scanner: FrameScanner::new(max_head),
            verdicts,
            head_pending: true,
        }
    }

    /// A `FramingIo` whose scanner waits for `start`: for a connection that `h1_server` serves
    /// first. That server takes only requests whose framing is unambiguous (one `Content-Length` of
    /// digits, no `Transfer-Encoding`) and hands the connection over at a request boundary, so the
    /// scanner has nothing to find before then, and following every byte would be spent for nothing.
    pub(crate) fn dormant(inner: I, max_head: usize, verdicts: Arc<Verdicts>) -> FramingIo<I> {
        FramingIo {
            scanner: FrameScanner::dormant(max_head),
            head_pending: false,
            ..FramingIo::new(inner, max_head, verdicts)
        }
    }

    /// Starts the dormant scanner where the connection is handed over: `read` holds the bytes
    /// already read, from the start of the next request on (its index is the number of requests
    /// served so far). They are scanned as if read now, and the reads that follow are too.
    pub(crate) fn start(&mut self, read: &[u8]) {
        let served = self.verdicts.served.load(Ordering::Relaxed);
        self.scanner.start(served);
        if let Some(refusal) = self.scanner.feed(read) {
            self.verdicts.refuse(refusal);
        }
        // Published whatever it was: nothing kept `head_since` while the scanner slept.
        self.head_pending = self.scanner.in_head();
        self.verdicts
            .set_head_since(self.head_pending.then(Instant::now));
    }

    /// Publishes where heads begin and end, after a read that saw `heads_before` heads before it.
    /// A head that begins and ends within one read (the common case) touches nothing.
    fn track_head(&mut self, heads_before: u64) {
        let in_head = self.scanner.in_head();
        if !in_head && !self.head_pending {
            return;
        }
        if in_head != self.head_pending || self.scanner.heads() != heads_before {
            self.head_pending = in_head;
            self.verdicts.set_head_since(in_head.then(Instant::now));
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FramingIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.scanner.is_scanning() {
            let heads_before = this.scanner.heads();
            if this.verdicts.switched.load(Ordering::Relaxed) {
                this.scanner.stop(Stop::Upgraded);
            } else if let Some(refusal) = this.scanner.feed(&buf.filled()[before..]) {
                this.verdicts.refuse(refusal);
            }
            this.track_head(heads_before);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: crate::readiness::ReadReadiness> crate::readiness::ReadReadiness for FramingIo<I> {
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.poll_read_hint(cx)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FramingIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 16 * 1024;

    /// Feeds `bytes` in pieces cut at `cuts` and returns the refusals and the final scanner.
    fn feed_split(bytes: &[u8], cuts: &[usize]) -> (Vec<Refusal>, FrameScanner) {
        let mut scanner = FrameScanner::new(LIMIT);
        let mut refusals = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let cut = cut.clamp(start, bytes.len());
            refusals.extend(scanner.feed(&bytes[start..cut]));
            start = cut;
        }
        (refusals, scanner)
    }

    fn feed_whole(bytes: &[u8]) -> (Vec<Refusal>, FrameScanner) {
        feed_split(bytes, &[])
    }

    fn feed_bytewise(bytes: &[u8]) -> (Vec<Refusal>, FrameScanner) {
        feed_split(bytes, &(1..bytes.len()).collect::<Vec<_>>())
    }

    /// Everything a split could change if the scanner depended on where reads end.
    fn outcome(result: &(Vec<Refusal>, FrameScanner)) -> impl PartialEq + std::fmt::Debug {
        let (refusals, s) = result;
        (
            refusals.clone(),
            s.state,
            s.head,
            s.index,
            s.partial.clone(),
        )
    }

    fn refused(index: u64, reason: Ambiguity) -> Vec<Refusal> {
        vec![Refusal { index, reason }]
    }

    const GET: &str = "GET /next HTTP/1.1\r\nHost: a\r\n\r\n";
    /// A complete head that is ambiguous, for use as a decoy inside bodies.
    const DECOY: &str =
        "POST /decoy HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";

    /// Byte streams of whole connections, each with the refusals and heads it must produce.
    fn streams() -> Vec<(String, Vec<Refusal>, u64, Option<Stop>)> {
        use Ambiguity::*;
        let cl_te = "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let te_cl = "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let decoy_body = format!(
            "POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{DECOY}",
            DECOY.len()
        );
        let decoy_chunks = format!(
            "POST /first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1;q=\"a b\"\r\n{DECOY}\r\n3 \t\r\nabc\r\n0\r\nX-Trailer: t\r\nContent-Length: 5\r\n\r\n",
            DECOY.len()
        );
        vec![
            (GET.to_owned(), vec![], 1, None),
            (format!("{GET}{GET}{GET}"), vec![], 3, None),
            (cl_te.to_owned(), refused(0, LengthWithTransferEncoding), 1, Some(Stop::Refused)),
            (te_cl.to_owned(), refused(0, LengthWithTransferEncoding), 1, Some(Stop::Refused)),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_owned(),
                refused(0, RepeatedLength),
                1,
                Some(Stop::Refused),
            ),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello".to_owned(),
                refused(0, LengthList),
                1,
                Some(Stop::Refused),
            ),
            // Names in any case; bare LF line ends.
            (
                "POST /x HTTP/1.1\nhost: a\ncontent-LENGTH:5\nTRANSFER-encoding:\tchunked\n\n".to_owned(),
                refused(0, LengthWithTransferEncoding),
                1,
                Some(Stop::Refused),
            ),
            // The ambiguous request behind valid ones, whose bodies hold a decoy head: only the
            // framing decides what is a head.
            (format!("{decoy_body}{GET}{cl_te}"), refused(2, LengthWithTransferEncoding), 3, Some(Stop::Refused)),
            (format!("{decoy_chunks}{GET}{te_cl}"), refused(2, LengthWithTransferEncoding), 3, Some(Stop::Refused)),
            (format!("{decoy_body}{decoy_chunks}{GET}"), vec![], 3, None),
            // Empty lines before a request line are skipped (httparse does the same).
            (format!("\r\n\n\r\n{GET}"), vec![], 1, None),
            // Names that only look alike.
            (
                "GET / HTTP/1.1\r\nX-Content-Length: 5\r\nContent-Lengths: 5\r\nTransfer-Encoding-X: chunked\r\nX: Content-Length: 5\r\n\r\n".to_owned(),
                vec![],
                1,
                None,
            ),
            // A zero length is no body; HEAD and 100-continue change nothing on the request side.
            (format!("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nHEAD / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok{GET}"), vec![], 3, None),
            // The HTTP/2 preface: nothing after it is looked at.
            (format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{cl_te}"), vec![], 0, Some(Stop::Http2)),
            // What hyper refuses itself stops the scanner, without a verdict.
            (format!("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n{cl_te}"), vec![], 1, Some(Stop::Malformed)),
            (format!("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello{cl_te}"), vec![], 1, Some(Stop::Malformed)),
            (format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{cl_te}"), vec![], 1, Some(Stop::Malformed)),
            (format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n{cl_te}"), vec![], 1, Some(Stop::Malformed)),
            (format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;a\nb\r\nabc\r\n0\r\n\r\n{cl_te}"), vec![], 1, Some(Stop::Malformed)),
            (format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n{cl_te}"), vec![], 1, Some(Stop::Malformed)),
            // A head that is still going at the end of the input.
            ("POST /x HTTP/1.1\r\nHost: a\r\nContent-Le".to_owned(), vec![], 0, None),
        ]
    }

    #[test]
    fn verdicts_and_heads_of_whole_streams() {
        for (bytes, want, heads, stop) in streams() {
            let (got, scanner) = feed_whole(bytes.as_bytes());
            assert_eq!(got, want, "{bytes:?}");
            assert_eq!(scanner.heads(), heads, "{bytes:?}");
            assert_eq!(scanner.stopped(), stop, "{bytes:?}");
        }
    }

    #[test]
    fn any_split_of_the_bytes_gives_the_same_outcome() {
        // A small deterministic generator, so a failure names a reproducible seed.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (bytes, ..) in streams() {
            let bytes = bytes.as_bytes();
            let whole = outcome(&feed_whole(bytes));
            assert_eq!(
                outcome(&feed_bytewise(bytes)),
                whole,
                "byte by byte: {bytes:?}"
            );
            for round in 0..200 {
                let pieces = 1 + next() as usize % 8;
                let mut cuts: Vec<usize> = (0..pieces)
                    .map(|_| next() as usize % (bytes.len() + 1))
                    .collect();
                cuts.sort_unstable();
                assert_eq!(
                    outcome(&feed_split(bytes, &cuts)),
                    whole,
                    "round {round}, cuts {cuts:?}: {bytes:?}"
                );
            }
        }
    }

    #[test]
    fn a_head_over_the_limit_stops_the_scanner_and_frees_the_partial_line() {
        let mut scanner = FrameScanner::new(LIMIT);
        assert_eq!(scanner.feed(b"GET / HTTP/1.1\r\nX-Big: "), None);
        let big = vec![b'v'; LIMIT];
        assert_eq!(scanner.feed(&big), None);
        assert_eq!(scanner.stopped(), Some(Stop::HeadTooLarge));
        assert_eq!(scanner.partial.capacity(), 0);
        // The same in one read.
        let mut scanner = FrameScanner::new(LIMIT);
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        head.extend((0..LIMIT / 8).flat_map(|_| *b"X: abc\r\n"));
        scanner.feed(&head);
        assert_eq!(scanner.stopped(), Some(Stop::HeadTooLarge));
    }

    #[test]
    fn a_large_partial_line_is_freed_and_a_small_one_kept_for_reuse() {
        let mut scanner = FrameScanner::new(LIMIT);
        scanner.feed(b"GET / HTTP/1.1\r\nCookie: ");
        scanner.feed(&vec![b'c'; 8 * 1024]);
        assert!(scanner.partial.capacity() > PARTIAL_KEEP);
        scanner.feed(b"\r\nHost: a\r\n\r\n");
        assert_eq!(scanner.partial.capacity(), 0);
        assert_eq!(scanner.heads(), 1);

        scanner.feed(b"GET / HTTP/1.1\r\nHo");
        let kept = scanner.partial.capacity();
        assert!(kept > 0 && kept <= PARTIAL_KEEP);
        scanner.feed(b"st: a\r\n\r\n");
        assert_eq!(scanner.partial.capacity(), kept);
        assert!(scanner.partial.is_empty());
        assert_eq!(scanner.heads(), 2);
    }

    #[test]
    fn a_large_body_is_skipped_without_being_looked_at() {
        let mut scanner = FrameScanner::new(LIMIT);
        scanner.feed(b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n");
        for _ in 0..1000 {
            // Newlines everywhere: a scanner that looked for heads here would find some.
            assert_eq!(scanner.feed(&[b'\n'; 1000]), None);
        }
        assert_eq!(scanner.state, State::Head);
        assert_eq!(scanner.heads(), 1);
    }

    #[test]
    fn verdicts_refuse_by_index_and_everything_after() {
        let verdicts = Verdicts::new(Instant::now());
        assert_eq!(verdicts.next_request(), None);
        verdicts.refuse(Refusal {
            index: 2,
            reason: Ambiguity::RepeatedLength,
        });
        assert_eq!(verdicts.next_request(), None);
        assert_eq!(verdicts.next_request(), Some(Ambiguity::RepeatedLength));
        assert_eq!(verdicts.next_request(), Some(Ambiguity::RepeatedLength));
    }

    #[test]
    fn find_byte_agrees_with_a_plain_search() {
        let hay: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37) | 1).collect();
        for needle in [b'\n', b'\r', 0x81, 0xff, 1] {
            for start in 0..hay.len() {
                for end in start..hay.len().min(start + 20) {
                    let mut h = hay[start..].to_vec();
                    if end < hay.len() {
                        h[end - start] = needle;
                    }
                    assert_eq!(
                        find_byte(needle, &h),
                        h.iter().position(|&b| b == needle),
                        "{needle} in {h:?}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn the_io_wrapper_tells_when_a_head_is_under_way() {
        use futures_util::FutureExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let opened = Instant::now();
        let verdicts = Arc::new(Verdicts::new(opened));
        let (mut client, server) = tokio::io::duplex(4096);
        let mut io = FramingIo::new(server, LIMIT, verdicts.clone());
        let mut send = async |bytes: &[u8]| {
            client.write_all(bytes).await.unwrap();
            io.read_exact(&mut vec![0; bytes.len()]).await.unwrap();
        };
        // The first head is awaited from the connection's start, also while it arrives.
        assert_eq!(verdicts.head_since(), Some(opened));
        send(b"GET / HTTP/1.1\r\nHo").await;
        assert_eq!(verdicts.head_since(), Some(opened));
        send(b"st: a\r\n\r\n").await;
        assert_eq!(verdicts.head_since(), None);
        assert!(
            verdicts.head_changed().now_or_never().is_some(),
            "the end of a head is told"
        );
        // A head that comes in one read is never under way between reads, and changes nothing.
        send(GET.as_bytes()).await;
        assert_eq!(verdicts.head_since(), None);
        assert!(verdicts.head_changed().now_or_never().is_none());
        // A head cut by a read is under way from that read, and says so.
        send(b"GET / HT").await;
        let first = verdicts.head_since().expect("a head under way");
        assert!(first > opened);
        assert!(verdicts.head_changed().now_or_never().is_some());
        // One read ends it and begins the next: the time is the new head's.
        send(b"TP/1.1\r\n\r\nGET /next HTTP/1.1\r\n").await;
        assert!(verdicts.head_since().expect("the next head") >= first);
        send(b"\r\n").await;
        assert_eq!(verdicts.head_since(), None);
    }

    #[tokio::test]
    async fn the_io_wrapper_publishes_the_refusal_before_hyper_can_parse_the_head() {
        use tokio::io::AsyncReadExt;
        let verdicts = Arc::new(Verdicts::new(Instant::now()));
        let second = "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        let bytes = format!("{GET}{second}x");
        let mut io = FramingIo::new(bytes.as_bytes(), LIMIT, verdicts.clone());
        // Small reads that cut lines; as soon as the second head has been read, its verdict is
        // there for the service.
        let mut buf = vec![0u8; 7];
        let mut read = 0;
        while read < GET.len() + second.len() {
            read += io.read(&mut buf).await.unwrap();
        }
        assert_eq!(verdicts.next_request(), None);
        assert_eq!(verdicts.next_request(), Some(Ambiguity::RepeatedLength));

        // After a protocol switch nothing is looked at any more.
        let verdicts = Arc::new(Verdicts::new(Instant::now()));
        verdicts.switched_protocols();
        let mut io = FramingIo::new(DECOY.as_bytes(), LIMIT, verdicts.clone());
        io.read_to_end(&mut Vec::new()).await.unwrap();
        assert_eq!(io.scanner.stopped(), Some(Stop::Upgraded));
        assert_eq!(verdicts.next_request(), None);
    }

    #[tokio::test]
    async fn a_dormant_scanner_starts_at_the_handover_counting_the_requests_served() {
        use tokio::io::AsyncReadExt;
        let opened = Instant::now();
        let verdicts = Arc::new(Verdicts::new(opened));
        let ambiguous = "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        // Asleep, it looks at nothing, not even an ambiguous head.
        let sleeping = format!("{GET}{GET}{ambiguous}");
        let mut io = FramingIo::dormant(sleeping.as_bytes(), LIMIT, verdicts.clone());
        io.read_to_end(&mut Vec::new()).await.unwrap();
        assert_eq!(io.scanner.stopped(), Some(Stop::Dormant));
        assert_eq!(verdicts.head_since(), Some(opened), "nothing was published");
        // Two requests served by the other server, then the handover: a valid head and an
        // ambiguous one already read, the rest of the ambiguous one to come.
        assert_eq!(verdicts.next_request(), None);
        assert_eq!(verdicts.next_request(), None);
        let stream = format!("{GET}{ambiguous}");
        let (read, rest) = stream.split_at(GET.len() + 20);
        let mut io = FramingIo::dormant(rest.as_bytes(), LIMIT, verdicts.clone());
        io.start(read.as_bytes());
        assert!(io.scanner.is_scanning());
        let since = verdicts.head_since().expect("the cut head is under way");
        assert!(
            since > opened,
            "timed from the handover, not the connection's start"
        );
        io.read_to_end(&mut Vec::new()).await.unwrap();
        assert_eq!(verdicts.next_request(), None, "the valid head, index 2");
        assert_eq!(
            verdicts.next_request(),
            Some(Ambiguity::RepeatedLength),
            "the ambiguous head, index 3"
        );

        // A handover on a complete head: none is under way.
        let verdicts = Arc::new(Verdicts::new(opened));
        let mut io = FramingIo::dormant(&b""[..], LIMIT, verdicts.clone());
        io.start(GET.as_bytes());
        assert_eq!(verdicts.head_since(), None);
        assert_eq!(verdicts.next_request(), None);
    }
}
