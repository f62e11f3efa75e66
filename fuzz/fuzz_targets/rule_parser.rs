//! Fuzz target for the routing-rule parser (`phoenix_proxy::rule`).
//!
//! Input: UTF-8 text; the first line is the rule, the optional second line a request
//! `METHOD HOST PATH[?QUERY] IP`. Properties checked beyond "does not panic or overflow the stack":
//! - a parse error points at a column inside the rule or just past its end;
//! - a rule that parses matches a request exactly when a router holding only that rule routes it,
//!   which checks the router's host index against plain rule evaluation.
#![no_main]

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use phoenix_proxy::router::{Router, RouterEntry};
use phoenix_proxy::rule::{RequestView, Rule};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (source, request) = text.split_once('\n').unwrap_or((text, ""));
    let rule = match Rule::parse(source) {
        Ok(rule) => rule,
        Err(e) => {
            assert!(
                e.column >= 1 && e.column <= source.chars().count() + 1,
                "column {} for {source:?}",
                e.column
            );
            return;
        }
    };

    let mut fields = request.split(' ');
    let method = fields
        .next()
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or(Method::GET);
    // The router's contract: the caller passes the host lowercase, without port.
    let host = fields.next().unwrap_or("").to_ascii_lowercase();
    let target = fields.next().unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let client_ip: IpAddr = fields
        .next()
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let mut headers = HeaderMap::new();
    for pair in fields {
        if let Some((name, value)) = pair.split_once(':') {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
    }
    let view = RequestView {
        method: &method,
        host: &host,
        path,
        query,
        headers: &headers,
        client_ip,
    };

    let matched = rule.matches(&view);
    let router = Router::new(vec![RouterEntry {
        rule: source.to_owned(),
        priority: None,
        target: (),
    }])
    .expect("a rule that parsed alone parses in a router");
    assert_eq!(
        router.route(&view).is_some(),
        matched,
        "router and rule disagree on {source:?} / {request:?}"
    );
});
