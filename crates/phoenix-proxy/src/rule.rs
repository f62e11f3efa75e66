//! The routing-rule language, compatible with Traefik v3.
//!
//! A rule such as ``Host(`api.phoenix.test`) && PathPrefix(`/v1`)`` is parsed once, when a route table
//! is built, into a small expression tree whose leaves are precompiled matchers (regexes compiled,
//! header names validated, CIDRs parsed). Matching a request then walks the tree without allocating.
//!
//! Grammar (`&&` binds tighter than `||`, `!` tighter than both, parentheses group):
//!
//! ```text
//! rule    := or
//! or      := and ( "||" and )*
//! and     := unary ( "&&" unary )*
//! unary   := "!" unary | "(" rule ")" | matcher
//! matcher := NAME "(" string ( "," string )* ")"
//! string  := `raw text` | "text with \" \\ \n \t \r escapes"
//! ```
//!
//! Matchers: `Host`, `HostRegexp`, `Path`, `PathPrefix`, `PathRegexp`, `Method`, `Header`,
//! `HeaderRegexp`, `Query`, `QueryRegexp`, `ClientIP`. Traefik v2 forms are accepted where they cannot be
//! confused with v3: several arguments to `Host`, `HostRegexp`, `Path`, `PathPrefix`, `PathRegexp`,
//! `Method` and `ClientIP` mean "any of them"; `Headers`/`HeadersRegexp` are aliases of
//! `Header`/`HeaderRegexp`; `Query(`k=v`)` with one argument holding `=` means key `k` with value `v`.
//! Matcher names are accepted as written, all lowercase or all uppercase, like Traefik's parser.
//!
//! Semantics follow Traefik: `Host` compares case-insensitively and ignores one trailing dot, and
//! supports the `*.example.com` (exactly one label) and `**.example.com` (one or more labels) wildcards
//! of Traefik 3.x; regexes are unanchored (write `^...$` to anchor) with Rust's `regex` syntax, which
//! agrees with Go's RE2 syntax for everything RE2 supports; `HostRegexp` is case-insensitive because
//! hosts are; `PathPrefix` is a plain string prefix (``PathPrefix(`/api`)`` matches `/apix`, as in
//! Traefik); `Query` compares URL-decoded keys and values; `ClientIP` takes addresses or CIDRs and
//! compares IPv4-mapped IPv6 client addresses as IPv4.

use std::net::IpAddr;

use http::header::HeaderName;
use http::{HeaderMap, Method};
use ipnet::IpNet;
use regex::{Regex, RegexBuilder};

/// A request as the router sees it. The caller fills it from the request head; every field is
/// borrowed so building one costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Lowercase, without port (from `Host` or the HTTP/2 `:authority`).
    pub host: &'a str,
    /// The path as received (not percent-decoded), starting with `/`.
    pub path: &'a str,
    /// The raw query string without `?`, if any.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Address of the client as the proxy believes it (the TCP peer, or the forwarded address when the
    /// peer is a trusted proxy). Only `ClientIP` reads it: for a table without one
    /// (`RouteTable::reads_client_ip`), a caller may leave the TCP peer here unresolved.
    pub client_ip: IpAddr,
}

/// A parse error with the 1-based character column it was found at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct RuleError {
    /// 1-based, counted in characters (not bytes); one past the end for "unexpected end of rule".
    pub column: usize,
    pub message: String,
}

/// A parsed and compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    expr: Expr,
    /// Hosts that a matching request must have (exact, lowercase, no trailing dot), when the rule
    /// implies such a set; the router indexes routes by them.
    required_hosts: Option<Vec<String>>,
}

/// Longest rule accepted, in bytes. Rules come from configuration files; this bounds the work a
/// malformed or hostile file can cause.
const MAX_RULE_LEN: usize = 64 * 1024;
/// Deepest nesting of `(` and `!`; the parser recurses, so this bounds its stack.
const MAX_DEPTH: usize = 64;
/// Compiled size limit of one regex; large enough for any sensible route, small enough that a
/// pathological pattern fails at load time instead of eating memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Most regexes in one rule; with the size limit this bounds the memory one rule can take.
const MAX_REGEXES: usize = 64;

impl Rule {
    /// Parses and compiles a rule. Errors point at the column of the offending token.
    /// Whether the rule looks at request header fields (`Header`, `HeaderRegexp`); a table whose
    /// rules do not can route a request before its fields are in a header map (see `plain`).
    pub fn reads_headers(&self) -> bool {
        self.expr
            .reads(|m| matches!(m, Matcher::Header { .. } | Matcher::HeaderRegexp { .. }))
    }

    /// Whether the rule looks at the client's address (`ClientIP`); a table whose rules do not
    /// routes without resolving it from `X-Forwarded-For` (see `RequestView::client_ip`).
    pub fn reads_client_ip(&self) -> bool {
        self.expr.reads(|m| matches!(m, Matcher::ClientIp(..)))
    }

    pub fn parse(src: &str) -> Result<Rule, RuleError> {
        if src.len() > MAX_RULE_LEN {
            return Err(RuleError {
                column: 1,
                message: format!(
                    "rule is {} bytes long; at most {MAX_RULE_LEN} are accepted",
                    src.len()
                ),
            });
        }
        let mut parser = Parser {
            src,
            tokens: Lexer::new(src).tokenize()?,
            pos: 0,
            depth: 0,
            regexes: std::cell::Cell::new(0),
        };
        if parser.peek().kind == TokenKind::End {
            return Err(
                parser.error_at(0, "empty rule; write a matcher such as Host(`example.com`)")
            );
        }
        let expr = parser.parse_or()?;
        let token = parser.peek();
        if token.kind != TokenKind::End {
            let message = match token.kind {
                TokenKind::RParen => "unexpected `)` without a matching `(`".to_owned(),
                _ => format!(
                    "unexpected {} after a complete expression; join matchers with `&&` or `||`",
                    token.kind.describe()
                ),
            };
            return Err(parser.error_at(token.offset, message));
        }
        let required_hosts = required_hosts(&expr);
        Ok(Rule {
            expr,
            required_hosts,
        })
    }

    /// Whether the request satisfies the rule. Does not allocate except for `QueryRegexp` on a
    /// percent-encoded value longer than 256 bytes.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.expr.eval(req)
    }

    /// Exact hosts (lowercase, without trailing dot) one of which every matching request has, if the
    /// rule implies such a set (e.g. ``Host(`a`) && Path(`/`)``). Used by the router's host index.
    pub fn required_hosts(&self) -> Option<&[String]> {
        self.required_hosts.as_deref()
    }
}

/// The priority Traefik gives a rule that sets none: its length (here in characters).
pub fn default_priority(rule: &str) -> i64 {
    i64::try_from(rule.chars().count()).unwrap_or(i64::MAX)
}

/// Chains of `&&` and `||` are kept flat (n-ary) so that a long chain costs no recursion depth when
/// it is evaluated or dropped; depth comes only from `(` and `!`, which the parser bounds.
#[derive(Debug, Clone)]
enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Match(Matcher),
}

impl Expr {
    fn eval(&self, req: &RequestView<'_>) -> bool {
        match self {
            Expr::And(all) => all.iter().all(|e| e.eval(req)),
            Expr::Or(any) => any.iter().any(|e| e.eval(req)),
            Expr::Not(a) => !a.eval(req),
            Expr::Match(m) => m.matches(req),
        }
    }

    /// Whether some matcher of the expression is one that `which` picks.
    fn reads(&self, which: fn(&Matcher) -> bool) -> bool {
        match self {
            Expr::And(all) | Expr::Or(all) => all.iter().any(|e| e.reads(which)),
            Expr::Not(a) => a.reads(which),
            Expr::Match(m) => which(m),
        }
    }
}

#[derive(Debug, Clone)]
enum HostPattern {
    /// Lowercase, without trailing dot.
    Exact(String),
    /// `*.suffix`: exactly one label before `.suffix` (stored with the leading dot).
    OneLabel(String),
    /// `**.suffix`: one or more labels before `.suffix` (stored with the leading dot).
    AnyLabels(String),
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        match self {
            // The view's host is lowercase by contract (see `RequestView::host`), so the bytes
            // compare first; the case-blind comparison is for a caller that breaks it.
            HostPattern::Exact(h) => host == h || host.eq_ignore_ascii_case(h),
            HostPattern::OneLabel(suffix) => strip_suffix_ignore_case(host, suffix)
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            HostPattern::AnyLabels(suffix) => {
                strip_suffix_ignore_case(host, suffix).is_some_and(|labels| {
                    !labels.is_empty() && !labels.starts_with('.') && !labels.ends_with('.')
                })
            }
        }
    }
}

fn strip_suffix_ignore_case<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = s.len().checked_sub(suffix.len())?;
    if !s.is_char_boundary(cut) {
        return None;
    }
    let (head, tail) = s.split_at(cut);
    tail.eq_ignore_ascii_case(suffix).then_some(head)
}

#[derive(Debug, Clone)]
enum Matcher {
    Host(Vec<HostPattern>),
    HostRegexp(Vec<Regex>),
    Path(Vec<String>),
    PathPrefix(Vec<String>),
    PathRegexp(Vec<Regex>),
    Method(Vec<Method>),
    Header { name: HeaderName, value: String },
    HeaderRegexp { name: HeaderName, regex: Regex },
    Query { key: String, value: Option<String> },
    QueryRegexp { key: String, regex: Regex },
    ClientIp(Vec<IpNet>),
}

impl Matcher {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        match self {
            Matcher::Host(patterns) => patterns.iter().any(|p| p.matches(req.host)),
            Matcher::HostRegexp(res) => res.iter().any(|re| re.is_match(req.host)),
            Matcher::Path(paths) => paths.iter().any(|p| p == req.path),
            Matcher::PathPrefix(prefixes) => {
                prefixes.iter().any(|p| req.path.starts_with(p.as_str()))
            }
            Matcher::PathRegexp(res) => res.iter().any(|re| re.is_match(req.path)),
            Matcher::Method(methods) => methods.iter().any(|m| m == req.method),
            Matcher::Header { name, value } => req
                .headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes() == value.as_bytes()),
            Matcher::HeaderRegexp { name, regex } => req
                .headers
                .get_all(name)
                .iter()
                .any(|v| std::str::from_utf8(v.as_bytes()).is_ok_and(|s| regex.is_match(s))),
            Matcher::Query { key, value } => query_pairs(req.query).any(|(k, v)| {
                decoded_eq(k, key) && value.as_ref().is_none_or(|want| decoded_eq(v, want))
            }),
            Matcher::QueryRegexp { key, regex } => query_pairs(req.query).any(|(k, v)| {
                decoded_eq(k, key) && with_decoded(v, |s| s.is_some_and(|s| regex.is_match(s)))
            }),
            Matcher::ClientIp(nets) => {
                let ip = req.client_ip.to_canonical();
                nets.iter().any(|n| n.contains(&ip))
            }
        }
    }
}

/// Splits a raw query into `(key, value)` pairs, as Go's `url.ParseQuery` does (a pair without `=`
/// has an empty value; empty pairs are skipped).
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Iterates the bytes of a form-urlencoded component after decoding (`+` is a space, `%XX` a byte;
/// malformed escapes are kept literally, where Go would drop the pair - the difference only matters
/// for broken clients).
fn decode_bytes(raw: &str) -> impl Iterator<Item = u8> + '_ {
    let bytes = raw.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *bytes.get(i)?;
        i += 1;
        Some(match b {
            b'+' => b' ',
            b'%' => match (
                bytes.get(i).and_then(|h| hex_val(*h)),
                bytes.get(i + 1).and_then(|l| hex_val(*l)),
            ) {
                (Some(h), Some(l)) => {
                    i += 2;
                    h << 4 | l
                }
                _ => b'%',
            },
            other => other,
        })
    })
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Compares a raw (encoded) component with an expected decoded string without allocating.
fn decoded_eq(raw: &str, expected: &str) -> bool {
    decode_bytes(raw).eq(expected.bytes())
}

/// Calls `f` with the decoded component (`None` when it is not UTF-8). Decodes into a stack buffer;
/// only values longer than it allocate.
fn with_decoded<R>(raw: &str, f: impl FnOnce(Option<&str>) -> R) -> R {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return f(Some(raw));
    }
    let mut buf = [0u8; 256];
    if raw.len() <= buf.len() {
        let mut n = 0;
        for b in decode_bytes(raw) {
            buf[n] = b;
            n += 1;
        }
        f(std::str::from_utf8(&buf[..n]).ok())
    } else {
        let decoded: Vec<u8> = decode_bytes(raw).collect();
        f(std::str::from_utf8(&decoded).ok())
    }
}

/// Hosts a matching request must have, derived from the expression: a `Host` with only exact hosts
/// requires one of them, `a && b` requires what either side requires, `a || b` the union when both
/// sides require hosts. Anything else (negations, wildcards, regexes) requires nothing known.
fn required_hosts(expr: &Expr) -> Option<Vec<String>> {
    match expr {
        Expr::Match(Matcher::Host(patterns)) => patterns
            .iter()
            .map(|p| match p {
                HostPattern::Exact(h) => Some(h.clone()),
                _ => None,
            })
            .collect(),
        Expr::And(all) => all.iter().filter_map(required_hosts).min_by_key(Vec::len),
        Expr::Or(any) => {
            let mut union = Vec::new();
            for e in any {
                union.extend(required_hosts(e)?);
            }
            union.sort();
            union.dedup();
            Some(union)
        }
        Expr::Not(_) | Expr::Match(_) => None,
    }
}

// ---------------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenKind {
    Ident(String),
    Str(String),
    LParen,
    RParen,
    Comma,
    And,
    Or,
    Not,
    End,
}

impl TokenKind {
    fn describe(&self) -> String {
        match self {
            TokenKind::Ident(name) => format!("name `{name}`"),
            TokenKind::Str(_) => "string".to_owned(),
            TokenKind::LParen => "`(`".to_owned(),
            TokenKind::RParen => "`)`".to_owned(),
            TokenKind::Comma => "`,`".to_owned(),
            TokenKind::And => "`&&`".to_owned(),
            TokenKind::Or => "`||`".to_owned(),
            TokenKind::Not => "`!`".to_owned(),
            TokenKind::End => "end of rule".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    /// Byte offset of the token's first character.
    offset: usize,
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

fn column_of(src: &str, byte_offset: usize) -> usize {
    src[..byte_offset.min(src.len())].chars().count() + 1
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Self { src, pos: 0 }
    }

    fn error(&self, offset: usize, message: impl Into<String>) -> RuleError {
        RuleError {
            column: column_of(self.src, offset),
            message: message.into(),
        }
    }

    fn tokenize(mut self) -> Result<Vec<Token>, RuleError> {
        let mut tokens = Vec::new();
        loop {
            let token = self.next_token()?;
            let end = token.kind == TokenKind::End;
            tokens.push(token);
            if end {
                return Ok(tokens);
            }
        }
    }

    fn next_token(&mut self) -> Result<Token, RuleError> {
        let rest = &self.src[self.pos..];
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
        let start = self.pos;
        let Some(c) = trimmed.chars().next() else {
            return Ok(Token {
                kind: TokenKind::End,
                offset: start,
            });
        };
        let single = |kind, lexer: &mut Self| {
            lexer.pos += 1;
            Ok(Token {
                kind,
                offset: start,
            })
        };
        match c {
            '(' => single(TokenKind::LParen, self),
            ')' => single(TokenKind::RParen, self),
            ',' => single(TokenKind::Comma, self),
            '!' => single(TokenKind::Not, self),
            '&' | '|' => {
                if trimmed[1..].starts_with(c) {
                    self.pos += 2;
                    let kind = if c == '&' { TokenKind::And } else { TokenKind::Or };
                    Ok(Token { kind, offset: start })
                } else {
                    Err(self.error(start, format!("single `{c}`; the operator is `{c}{c}`")))
                }
            }
            '`' => {
                let body = &trimmed[1..];
                match body.find('`') {
                    Some(end) => {
                        self.pos += end + 2;
                        Ok(Token { kind: TokenKind::Str(body[..end].to_owned()), offset: start })
                    }
                    None => Err(self.error(start, "unterminated string: missing closing backtick")),
                }
            }
            '"' => self.quoted(start),
            '\'' => Err(self.error(
                start,
                "single quotes are not string delimiters (as in Traefik); use backticks or double quotes",
            )),
            c if c.is_ascii_alphabetic() || c == '_' => {
                let len = trimmed.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(trimmed.len());
                self.pos += len;
                Ok(Token { kind: TokenKind::Ident(trimmed[..len].to_owned()), offset: start })
            }
            other => Err(self.error(start, format!("unexpected character `{other}`"))),
        }
    }

    /// A double-quoted string with the escapes of Go string literals that make sense in a rule.
    fn quoted(&mut self, start: usize) -> Result<Token, RuleError> {
        let mut out = String::new();
        let mut chars = self.src[start + 1..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos = start + 1 + i + 1;
                    return Ok(Token { kind: TokenKind::Str(out), offset: start });
                }
                '\\' => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, other)) => {
                        return Err(self.error(
                            start + 1 + i,
                            format!(
                                "unknown escape `\\{other}` in a double-quoted string; write regexes in backticks, \
                                 where backslashes are literal"
                            ),
                        ))
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(self.error(start, "unterminated string: missing closing `\"`"))
    }
}

// ---------------------------------------------------------------------------------------------------
// Parser

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
    regexes: std::cell::Cell<usize>,
}

/// A string argument and where it started.
struct Arg {
    value: String,
    offset: usize,
}

const MATCHERS: &[&str] = &[
    "Host",
    "HostRegexp",
    "Path",
    "PathPrefix",
    "PathRegexp",
    "Method",
    "Header",
    "HeaderRegexp",
    "Query",
    "QueryRegexp",
    "ClientIP",
];

impl<'a> Parser<'a> {
    fn peek(&self) -> &Token {
        // The token list always ends with End, and `advance` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if token.kind != TokenKind::End {
            self.pos += 1;
        }
        token
    }

    fn error_at(&self, offset: usize, message: impl Into<String>) -> RuleError {
        RuleError {
            column: column_of(self.src, offset),
            message: message.into(),
        }
    }

    fn parse_or(&mut self) -> Result<Expr, RuleError> {
        let mut any = vec![self.parse_and()?];
        while self.peek().kind == TokenKind::Or {
            self.advance();
            any.push(self.parse_and()?);
        }
        Ok(if any.len() == 1 {
            any.pop().expect("one element")
        } else {
            Expr::Or(any)
        })
    }

    fn parse_and(&mut self) -> Result<Expr, RuleError> {
        let mut all = vec![self.parse_unary()?];
        while self.peek().kind == TokenKind::And {
            self.advance();
            all.push(self.parse_unary()?);
        }
        Ok(if all.len() == 1 {
            all.pop().expect("one element")
        } else {
            Expr::And(all)
        })
    }

    fn parse_unary(&mut self) -> Result<Expr, RuleError> {
        let token = self.advance();
        match token.kind {
            TokenKind::Not => {
                self.enter(token.offset)?;
                let inner = self.parse_unary()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(inner)))
            }
            TokenKind::LParen => {
                self.enter(token.offset)?;
                let inner = self.parse_or()?;
                let close = self.peek().clone();
                if close.kind != TokenKind::RParen {
                    return Err(self.error_at(
                        close.offset,
                        format!(
                            "expected `)` to close the `(` at column {}, found {}",
                            column_of(self.src, token.offset),
                            close.kind.describe()
                        ),
                    ));
                }
                self.advance();
                self.depth -= 1;
                Ok(inner)
            }
            TokenKind::Ident(name) => Ok(Expr::Match(self.parse_matcher(&name, token.offset)?)),
            other => Err(self.error_at(
                token.offset,
                format!("expected a matcher, `!` or `(`, found {}", other.describe()),
            )),
        }
    }

    /// Enters one level of `(` or `!`, refusing nesting that would risk the parser's stack.
    fn enter(&mut self, offset: usize) -> Result<(), RuleError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_at(offset, format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn parse_args(&mut self, name: &str, name_offset: usize) -> Result<Vec<Arg>, RuleError> {
        let open = self.advance();
        if open.kind != TokenKind::LParen {
            return Err(self.error_at(
                open.offset,
                format!(
                    "expected `(` after matcher `{name}`, found {}",
                    open.kind.describe()
                ),
            ));
        }
        let mut args = Vec::new();
        loop {
            let token = self.advance();
            match token.kind {
                TokenKind::Str(value) => args.push(Arg {
                    value,
                    offset: token.offset,
                }),
                TokenKind::RParen if args.is_empty() => {
                    return Err(self.error_at(
                        name_offset,
                        format!("matcher `{name}` needs at least one argument"),
                    ))
                }
                other => {
                    return Err(self.error_at(
                        token.offset,
                        format!(
                            "expected a string in backticks or double quotes, found {}",
                            other.describe()
                        ),
                    ))
                }
            }
            let sep = self.advance();
            match sep.kind {
                TokenKind::Comma => continue,
                TokenKind::RParen => return Ok(args),
                other => {
                    return Err(self.error_at(
                        sep.offset,
                        format!(
                            "expected `,` or `)` to close the `(` at column {}, found {}",
                            column_of(self.src, open.offset),
                            other.describe()
                        ),
                    ))
                }
            }
        }
    }

    fn parse_matcher(&mut self, written: &str, offset: usize) -> Result<Matcher, RuleError> {
        // Accept the canonical name, all-lowercase and all-uppercase, like Traefik's parser.
        let canonical = MATCHERS
            .iter()
            .chain(["Headers", "HeadersRegexp"].iter())
            .find(|m| {
                **m == written
                    || m.to_ascii_lowercase() == written
                    || m.to_ascii_uppercase() == written
            })
            .copied();
        let Some(name) = canonical else {
            let hint = suggest(written)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(self.error_at(
                offset,
                format!(
                    "unknown matcher `{written}`{hint}; known matchers: {}",
                    MATCHERS.join(", ")
                ),
            ));
        };
        let args = self.parse_args(name, offset)?;
        let count = |min: usize, max: usize| -> Result<(), RuleError> {
            if args.len() < min || args.len() > max {
                let wanted = if min == max {
                    format!("{min}")
                } else {
                    format!("{min} or {max}")
                };
                return Err(self.error_at(
                    offset,
                    format!(
                        "matcher `{name}` takes {wanted} argument(s), got {}",
                        args.len()
                    ),
                ));
            }
            Ok(())
        };
        Ok(match name {
            "Host" => Matcher::Host(
                args.iter()
                    .map(|a| self.host_pattern(a))
                    .collect::<Result<_, _>>()?,
            ),
            "HostRegexp" => Matcher::HostRegexp(
                args.iter()
                    .map(|a| self.regex(a, true))
                    .collect::<Result<_, _>>()?,
            ),
            "Path" | "PathPrefix" => {
                for a in &args {
                    if !a.value.starts_with('/') {
                        return Err(self.error_at(
                            a.offset,
                            format!("path `{}` must start with `/`", a.value),
                        ));
                    }
                }
                let paths = args.into_iter().map(|a| a.value).collect();
                if name == "Path" {
                    Matcher::Path(paths)
                } else {
                    Matcher::PathPrefix(paths)
                }
            }
            "PathRegexp" => Matcher::PathRegexp(
                args.iter()
                    .map(|a| self.regex(a, false))
                    .collect::<Result<_, _>>()?,
            ),
            "Method" => Matcher::Method(
                args.iter()
                    .map(|a| {
                        Method::from_bytes(a.value.to_ascii_uppercase().as_bytes())
                            .ok()
                            .filter(|_| !a.value.is_empty())
                            .ok_or_else(|| {
                                self.error_at(
                                    a.offset,
                                    format!("invalid HTTP method `{}`", a.value),
                                )
                            })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            "Header" | "Headers" | "HeaderRegexp" | "HeadersRegexp" => {
                count(2, 2)?;
                let header = HeaderName::from_bytes(args[0].value.as_bytes()).map_err(|_| {
                    self.error_at(
                        args[0].offset,
                        format!("invalid header name `{}`", args[0].value),
                    )
                })?;
                if name.ends_with("Regexp") {
                    Matcher::HeaderRegexp {
                        name: header,
                        regex: self.regex(&args[1], false)?,
                    }
                } else {
                    Matcher::Header {
                        name: header,
                        value: args[1].value.clone(),
                    }
                }
            }
            "Query" => {
                count(1, 2)?;
                let mut args = args.into_iter();
                let first = args.next().map(|a| a.value).unwrap_or_default();
                match args.next() {
                    Some(value) => Matcher::Query {
                        key: first,
                        value: Some(value.value),
                    },
                    // Traefik v2 form `Query(`k=v`)`.
                    None => match first.split_once('=') {
                        Some((k, v)) => Matcher::Query {
                            key: k.to_owned(),
                            value: Some(v.to_owned()),
                        },
                        None => Matcher::Query {
                            key: first,
                            value: None,
                        },
                    },
                }
            }
            "QueryRegexp" => {
                count(2, 2)?;
                Matcher::QueryRegexp {
                    key: args[0].value.clone(),
                    regex: self.regex(&args[1], false)?,
                }
            }
            "ClientIP" => Matcher::ClientIp(
                args.iter()
                    .map(|a| {
                        let v = a.value.trim();
                        v.parse::<IpNet>()
                            .map(|n| n.trunc())
                            .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                            .map(|n| match n {
                                // Compare IPv4-mapped networks as IPv4, like client addresses.
                                IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                                    Some(v4) if v6.prefix_len() >= 96 => IpNet::from(
                                        ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                                            .expect("prefix <= 32"),
                                    ),
                                    _ => IpNet::V6(v6),
                                },
                                v4 => v4,
                            })
                            .map_err(|_| {
                                self.error_at(
                                    a.offset,
                                    format!("invalid IP address or CIDR `{}`", a.value),
                                )
                            })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => unreachable!("every name in MATCHERS and its aliases is handled"),
        })
    }

    fn host_pattern(&self, arg: &Arg) -> Result<HostPattern, RuleError> {
        let host = arg.value.trim().to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host);
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let (pattern, rest) = if let Some(rest) = host.strip_prefix("**.") {
            (HostPattern::AnyLabels(format!(".{rest}")), rest)
        } else if let Some(rest) = host.strip_prefix("*.") {
            (HostPattern::OneLabel(format!(".{rest}")), rest)
        } else {
            (HostPattern::Exact(host.to_owned()), host)
        };
        // Host names are ASCII (IDNs in their punycode form); IPv6 literals come in brackets.
        let ok = if let Some(inner) = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            inner.parse::<std::net::Ipv6Addr>().is_ok() && matches!(pattern, HostPattern::Exact(_))
        } else {
            rest.split('.').all(valid_label)
        };
        if !ok {
            return Err(self.error_at(
                arg.offset,
                format!(
                    "invalid host `{}`: expected a DNS name (ASCII, punycode for IDNs) without port, optionally \
                     starting with `*.` or `**.`",
                    arg.value
                ),
            ));
        }
        Ok(pattern)
    }

    fn regex(&self, arg: &Arg, case_insensitive: bool) -> Result<Regex, RuleError> {
        self.regexes.set(self.regexes.get() + 1);
        if self.regexes.get() > MAX_REGEXES {
            return Err(self.error_at(
                arg.offset,
                format!("more than {MAX_REGEXES} regular expressions in one rule"),
            ));
        }
        RegexBuilder::new(&arg.value)
            .case_insensitive(case_insensitive)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                // The regex error is multi-line with its own caret; keep its last line, the reason.
                let reason = e.to_string();
                let reason = reason
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid")
                    .trim()
                    .to_owned();
                self.error_at(
                    arg.offset,
                    format!("invalid regular expression `{}`: {reason}", arg.value),
                )
            })
    }
}

/// The known matcher closest to a misspelt one, if any is close enough to be a likely typo.
fn suggest(written: &str) -> Option<&'static str> {
    let written = written.to_ascii_lowercase();
    MATCHERS
        .iter()
        .map(|m| (edit_distance(&written, &m.to_ascii_lowercase()), *m))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, m)| m)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::net::Ipv6Addr;

    /// A request for table tests; `headers` are `name: value` lines.
    struct Req {
        method: Method,
        host: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        headers: HeaderMap,
        client_ip: IpAddr,
    }

    impl Req {
        fn new(host: &'static str, path: &'static str) -> Self {
            Req {
                method: Method::GET,
                host,
                path,
                query: None,
                headers: HeaderMap::new(),
                client_ip: IpAddr::from([10, 0, 0, 1]),
            }
        }
        fn view(&self) -> RequestView<'_> {
            RequestView {
                method: &self.method,
                host: self.host,
                path: self.path,
                query: self.query,
                headers: &self.headers,
                client_ip: self.client_ip,
            }
        }
        fn query(mut self, q: &'static str) -> Self {
            self.query = Some(q);
            self
        }
        fn method(mut self, m: Method) -> Self {
            self.method = m;
            self
        }
        fn header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }
        fn ip(mut self, ip: impl Into<IpAddr>) -> Self {
            self.client_ip = ip.into();
            self
        }
    }

    fn check(rule: &str, cases: &[(Req, bool)]) {
        let parsed = Rule::parse(rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
        for (i, (req, want)) in cases.iter().enumerate() {
            assert_eq!(
                parsed.matches(&req.view()),
                *want,
                "rule {rule}, case {i}: {:?}",
                req.view()
            );
        }
    }

    #[test]
    fn host_matcher() {
        check(
            "Host(`api.phoenix.test`)",
            &[
                (Req::new("api.phoenix.test", "/"), true),
                (Req::new("api.phoenix.test.", "/"), true),
                (Req::new("API.Phoenix.Test", "/"), true),
                (Req::new("phoenix.test", "/"), false),
                (Req::new("xapi.phoenix.test", "/"), false),
                (Req::new("api.phoenix.test.evil", "/"), false),
            ],
        );
        // Written in upper case and with a trailing dot: normalised at parse time.
        check(
            "Host(`API.Phoenix.Test.`)",
            &[(Req::new("api.phoenix.test", "/"), true)],
        );
        // v2 form: several hosts mean any of them.
        check(
            "Host(`a.test`, `b.test`)",
            &[
                (Req::new("a.test", "/"), true),
                (Req::new("b.test", "/"), true),
                (Req::new("c.test", "/"), false),
            ],
        );
        check(
            "Host(`[::1]`)",
            &[
                (Req::new("[::1]", "/"), true),
                (Req::new("::1", "/"), false),
            ],
        );
    }

    #[test]
    fn host_wildcards() {
        check(
            "Host(`*.phoenix.test`)",
            &[
                (Req::new("a.phoenix.test", "/"), true),
                (Req::new("a.b.phoenix.test", "/"), false),
                (Req::new("phoenix.test", "/"), false),
                (Req::new(".phoenix.test", "/"), false),
                (Req::new("aphoenix.test", "/"), false),
            ],
        );
        check(
            "Host(`**.phoenix.test`)",
            &[
                (Req::new("a.phoenix.test", "/"), true),
                (Req::new("a.b.phoenix.test", "/"), true),
                (Req::new("phoenix.test", "/"), false),
                (Req::new("a..phoenix.test", "/"), false),
            ],
        );
    }

    #[test]
    fn host_regexp_matcher() {
        check(
            r"HostRegexp(`^[a-z]+\.phoenix\.test$`)",
            &[
                (Req::new("api.phoenix.test", "/"), true),
                (Req::new("API.phoenix.test", "/"), true),
                (Req::new("api1.phoenix.test", "/"), false),
                (Req::new("api.phoenixxtest", "/"), false),
            ],
        );
        // Unanchored like Go's MatchString.
        check(
            r"HostRegexp(`phoenix`)",
            &[
                (Req::new("a.phoenix.test", "/"), true),
                (Req::new("b.test", "/"), false),
            ],
        );
    }

    #[test]
    fn path_matchers() {
        check(
            "Path(`/v1/users`)",
            &[
                (Req::new("h", "/v1/users"), true),
                (Req::new("h", "/v1/users/"), false),
                (Req::new("h", "/v1/Users"), false),
                (Req::new("h", "/v1"), false),
            ],
        );
        check(
            "PathPrefix(`/api`)",
            &[
                (Req::new("h", "/api"), true),
                (Req::new("h", "/api/x"), true),
                // A plain string prefix, as in Traefik.
                (Req::new("h", "/apix"), true),
                (Req::new("h", "/ap"), false),
                (Req::new("h", "/x/api"), false),
            ],
        );
        check(
            r"PathRegexp(`\.(jpe?g|png)$`)",
            &[
                (Req::new("h", "/a/b.png"), true),
                (Req::new("h", "/a.jpeg"), true),
                (Req::new("h", "/a.png/x"), false),
            ],
        );
        check(
            "PathRegexp(`^/users/[0-9]+$`)",
            &[
                (Req::new("h", "/users/42"), true),
                (Req::new("h", "/users/x"), false),
            ],
        );
    }

    #[test]
    fn method_matcher() {
        check(
            "Method(`POST`)",
            &[
                (Req::new("h", "/").method(Method::POST), true),
                (Req::new("h", "/"), false),
            ],
        );
        // Lowercase in the rule is accepted; several methods mean any of them.
        check(
            "Method(`get`, `put`)",
            &[
                (Req::new("h", "/"), true),
                (Req::new("h", "/").method(Method::PUT), true),
                (Req::new("h", "/").method(Method::DELETE), false),
            ],
        );
    }

    #[test]
    fn header_matchers() {
        check(
            "Header(`X-Env`, `prod`)",
            &[
                (Req::new("h", "/").header("x-env", "prod"), true),
                (
                    Req::new("h", "/")
                        .header("x-env", "dev")
                        .header("x-env", "prod"),
                    true,
                ),
                (Req::new("h", "/").header("x-env", "production"), false),
                (Req::new("h", "/").header("x-other", "prod"), false),
                (Req::new("h", "/"), false),
            ],
        );
        check(
            "HeaderRegexp(`Content-Type`, `^application/(json|grpc)`)",
            &[
                (
                    Req::new("h", "/").header("content-type", "application/grpc+proto"),
                    true,
                ),
                (
                    Req::new("h", "/").header("content-type", "text/plain"),
                    false,
                ),
            ],
        );
        check(
            "Headers(`X-A`, `1`)",
            &[(Req::new("h", "/").header("x-a", "1"), true)],
        );
    }

    #[test]
    fn query_matchers() {
        check(
            "Query(`mobile`, `true`)",
            &[
                (Req::new("h", "/").query("mobile=true"), true),
                (Req::new("h", "/").query("a=1&mobile=true&b"), true),
                (Req::new("h", "/").query("mobile=false"), false),
                (Req::new("h", "/").query("mobiles=true"), false),
                (Req::new("h", "/"), false),
            ],
        );
        check(
            "Query(`debug`)",
            &[
                (Req::new("h", "/").query("debug"), true),
                (Req::new("h", "/").query("x=1&debug="), true),
                (Req::new("h", "/").query("debug=1"), true),
                (Req::new("h", "/").query("nodebug"), false),
            ],
        );
        // Keys and values compare URL-decoded.
        check(
            "Query(`q`, `a b/c`)",
            &[
                (Req::new("h", "/").query("q=a+b%2Fc"), true),
                (Req::new("h", "/").query("q=a%20b%2fc"), true),
                (Req::new("h", "/").query("q=a+b"), false),
            ],
        );
        check(
            "Query(`k=v`)",
            &[
                (Req::new("h", "/").query("k=v"), true),
                (Req::new("h", "/").query("k=w"), false),
            ],
        );
        check(
            "QueryRegexp(`id`, `^[0-9]+$`)",
            &[
                (Req::new("h", "/").query("id=123"), true),
                (Req::new("h", "/").query("id=%31%32"), true),
                (Req::new("h", "/").query("id=12a"), false),
            ],
        );
        // A long percent-encoded value takes the allocating path; it must still match.
        let long: &'static str = Box::leak(format!("v={}", "%41".repeat(200)).into_boxed_str());
        check(
            "QueryRegexp(`v`, `^A{200}$`)",
            &[(Req::new("h", "/").query(long), true)],
        );
    }

    /// What a rule reads decides what the plain path must resolve before routing: header
    /// fields in a map, the client behind trusted proxies. Found under `&&`, `||` and `!`.
    #[test]
    fn a_rule_says_whether_it_reads_fields_or_the_client_address() {
        let reads = |src: &str| {
            let rule = Rule::parse(src).unwrap();
            (rule.reads_headers(), rule.reads_client_ip())
        };
        assert_eq!(reads("Host(`a.test`) && PathPrefix(`/x`)"), (false, false));
        assert_eq!(
            reads("Host(`a.test`) || !ClientIP(`10.0.0.0/8`)"),
            (false, true)
        );
        assert_eq!(reads("Header(`X-A`, `1`) && Method(`GET`)"), (true, false));
        assert_eq!(
            reads("(HeaderRegexp(`X-A`, `^1`) || Path(`/`)) && ClientIP(`::1`)"),
            (true, true)
        );
    }

    #[test]
    fn client_ip_matcher() {
        check(
            "ClientIP(`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`)",
            &[
                (Req::new("h", "/").ip([10, 20, 30, 40]), true),
                (Req::new("h", "/").ip([192, 168, 1, 7]), true),
                (Req::new("h", "/").ip([192, 168, 1, 8]), false),
                (
                    Req::new("h", "/").ip("fd12::1".parse::<Ipv6Addr>().unwrap()),
                    true,
                ),
                (Req::new("h", "/").ip(Ipv6Addr::LOCALHOST), false),
                // IPv4-mapped IPv6 (a dual-stack listener) compares as IPv4.
                (
                    Req::new("h", "/").ip("::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap()),
                    true,
                ),
            ],
        );
        check(
            "ClientIP(`::1`)",
            &[(Req::new("h", "/").ip(Ipv6Addr::LOCALHOST), true)],
        );
    }

    #[test]
    fn and_binds_tighter_than_or() {
        // a || b && c  ==  a || (b && c)
        let rule = "Path(`/a`) || Path(`/b`) && Method(`POST`)";
        check(
            rule,
            &[
                (Req::new("h", "/a"), true),
                (Req::new("h", "/b"), false),
                (Req::new("h", "/b").method(Method::POST), true),
            ],
        );
        // b && c || a  ==  (b && c) || a
        check(
            "Method(`POST`) && Path(`/b`) || Path(`/a`)",
            &[(Req::new("h", "/a"), true), (Req::new("h", "/b"), false)],
        );
    }

    #[test]
    fn parentheses_override_precedence() {
        check(
            "(Path(`/a`) || Path(`/b`)) && Method(`POST`)",
            &[
                (Req::new("h", "/a"), false),
                (Req::new("h", "/a").method(Method::POST), true),
                (Req::new("h", "/b").method(Method::POST), true),
            ],
        );
    }

    #[test]
    fn not_binds_to_the_next_operand() {
        // !a && b == (!a) && b
        check(
            "!Path(`/a`) && PathPrefix(`/`)",
            &[(Req::new("h", "/a"), false), (Req::new("h", "/b"), true)],
        );
        check(
            "!(Path(`/a`) || Path(`/b`))",
            &[
                (Req::new("h", "/a"), false),
                (Req::new("h", "/b"), false),
                (Req::new("h", "/c"), true),
            ],
        );
        check(
            "!!Path(`/a`)",
            &[(Req::new("h", "/a"), true), (Req::new("h", "/b"), false)],
        );
    }

    #[test]
    fn double_quoted_strings_and_whitespace() {
        check(
            "  Host(\"a.test\")\n&&\tPath( \"/x\\\"y\" )  ",
            &[
                (Req::new("a.test", "/x\"y"), true),
                (Req::new("a.test", "/x"), false),
            ],
        );
    }

    #[test]
    fn lowercase_and_uppercase_matcher_names() {
        check(
            "host(`a.test`) && PATHPREFIX(`/`)",
            &[(Req::new("a.test", "/"), true)],
        );
    }

    #[test]
    fn required_hosts_are_derived_for_the_index() {
        let hosts = |rule: &str| {
            Rule::parse(rule)
                .unwrap()
                .required_hosts()
                .map(<[String]>::to_vec)
        };
        assert_eq!(
            hosts("Host(`A.test`) && Path(`/`)"),
            Some(vec!["a.test".to_owned()])
        );
        assert_eq!(
            hosts("Host(`a`) || Host(`b`)"),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(hosts("Host(`a`) || Path(`/`)"), None);
        assert_eq!(hosts("!Host(`a`)"), None);
        assert_eq!(hosts("Host(`*.a`)"), None);
        assert_eq!(hosts("Path(`/`)"), None);
    }

    #[test]
    fn default_priority_counts_characters() {
        assert_eq!(default_priority("Host(`a`)"), 9);
        assert_eq!(default_priority("Path(`/é`)"), 10);
    }

    fn error(rule: &str) -> RuleError {
        match Rule::parse(rule) {
            Ok(_) => panic!("{rule:?} parsed but should not"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_point_at_the_column() {
        // (rule, expected column, a word the message must contain)
        let cases: &[(&str, usize, &str)] = &[
            ("Host(`a`) && Hots(`b`)", 14, "unknown matcher `Hots`"),
            ("Host(`a`) && Hots(`b`)", 14, "did you mean `Host`"),
            ("Host(`a`", 9, "expected `,` or `)`"),
            (
                "(Host(`a`) || Path(`/`)",
                24,
                "to close the `(` at column 1",
            ),
            (
                "Path(`/a`) && (Host(`x`)",
                25,
                "to close the `(` at column 15",
            ),
            ("Host(`a.test)", 6, "unterminated string"),
            ("Host(\"a.test)", 6, "unterminated string"),
            ("PathRegexp(`/a(`)", 12, "invalid regular expression"),
            ("HostRegexp(`[z-a]`)", 12, "invalid regular expression"),
            (
                "Path(`/`) && ClientIP(`10.0.0.0/33`)",
                23,
                "invalid IP address or CIDR",
            ),
            (
                "ClientIP(`10.0.0.1`, `nope`)",
                22,
                "invalid IP address or CIDR",
            ),
            ("Path(`x`)", 6, "must start with `/`"),
            ("Header(`X-A`)", 1, "takes 2 argument"),
            ("Header(`bad header`, `x`)", 8, "invalid header name"),
            ("Method(`GE T`)", 8, "invalid HTTP method"),
            ("Host(`a`) & Path(`/`)", 11, "`&&`"),
            ("Host(`a`) | Path(`/`)", 11, "`||`"),
            ("Host(`a`) Path(`/`)", 11, "join matchers"),
            ("Host(`a`))", 10, "without a matching `(`"),
            ("Host(`a`) &&", 13, "end of rule"),
            ("", 1, "empty rule"),
            ("   ", 1, "empty rule"),
            ("Host()", 1, "at least one argument"),
            ("Host", 5, "expected `(`"),
            ("Host('a')", 6, "single quotes"),
            ("Host(`a`) && #", 14, "unexpected character `#`"),
            ("Host(`a b`)", 6, "invalid host"),
            ("Host(\"a\\.b\")", 8, "unknown escape"),
            // Columns count characters, not bytes.
            ("Path(`/é`) && Nope(`x`)", 15, "unknown matcher"),
        ];
        for (rule, column, needle) in cases {
            let e = error(rule);
            assert_eq!(e.column, *column, "rule {rule:?}: {e}");
            assert!(
                e.message.contains(needle),
                "rule {rule:?}: {e} (wanted {needle:?})"
            );
            assert!(e.to_string().starts_with(&format!("column {column}: ")));
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}Path(`/`){}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(error(&deep).message.contains("nesting"));
        let nots = format!("{}Path(`/`)", "!".repeat(10_000));
        assert!(error(&nots).message.contains("nesting"));
        // 64 levels are fine.
        let ok = format!("{}Path(`/`){}", "(".repeat(64), ")".repeat(64));
        assert!(Rule::parse(&ok).is_ok());
    }

    #[test]
    fn regex_count_and_size_are_bounded() {
        let many = vec!["PathRegexp(`a`)"; MAX_REGEXES + 1].join(" || ");
        let e = error(&many);
        assert!(e.message.contains("regular expressions in one rule"), "{e}");
        let ok = vec!["PathRegexp(`a`)"; MAX_REGEXES].join(" || ");
        assert!(Rule::parse(&ok).is_ok());
        assert!(error(r"PathRegexp(`\w{1000}`)")
            .message
            .contains("invalid regular expression"));
    }

    #[test]
    fn long_chains_do_not_overflow_the_stack() {
        // Chains are flat, so their length costs no stack depth in parsing, matching or dropping.
        let chain = vec!["Path(`/`)"; 5000].join(" || ");
        let rule = Rule::parse(&chain).unwrap();
        assert!(rule.matches(&Req::new("h", "/").view()));
        let too_long = "x".repeat(MAX_RULE_LEN + 1);
        assert!(error(&too_long).message.contains("at most"));
    }
}
