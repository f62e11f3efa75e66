//! Answering ACME challenges: the http-01 token table and the tls-alpn-01 certificates.
//!
//! Both challenge kinds are answered by listeners that exist anyway: tls-alpn-01 (RFC 8737) by
//! the role's own TLS listener, through the shared [`CertResolver`], and http-01 (RFC 8555
//! section 8.3) by the gateway's plain HTTP listener, which looks tokens up in [`Http01Tokens`].
//! Whatever is provisioned for an order is withdrawn when the order ends, successful or not, by
//! the [`Provisioned`] guard, so a failed order never leaves a challenge certificate behind.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use phoenix_proxy::tls::CertResolver;

/// The token -> key authorization table the gateway's HTTP listener serves under
/// `/.well-known/acme-challenge/<token>` (RFC 8555 section 8.3).
#[derive(Default)]
pub struct Http01Tokens {
    tokens: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for Http01Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key authorizations are not secret, but tokens are noise in logs; the count is enough.
        f.debug_struct("Http01Tokens")
            .field("pending", &self.lock().len())
            .finish()
    }
}

impl Http01Tokens {
    /// The path prefix the validation server requests.
    pub const PATH_PREFIX: &'static str = "/.well-known/acme-challenge/";

    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The key authorization for `token`, if a challenge with that token is being validated.
    pub fn get(&self, token: &str) -> Option<String> {
        self.lock().get(token).cloned()
    }

    /// The response body for a request path, if it is a known challenge path: the body the
    /// HTTP listener answers with (status 200, `text/plain` or `application/octet-stream`).
    pub fn respond(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(Self::PATH_PREFIX)?;
        if token.is_empty() || token.contains('/') {
            return None;
        }
        self.get(token)
    }

    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.lock()
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    pub fn remove(&self, token: &str) {
        self.lock().remove(token);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // The map holds plain strings; a panic elsewhere cannot leave it half-updated.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Which challenge the role answers.
#[derive(Clone)]
pub enum Challenge {
    /// tls-alpn-01 on the role's TLS listener (the one serving with the manager's resolver).
    TlsAlpn01,
    /// http-01 through the token table the role's HTTP listener serves.
    Http01(Arc<Http01Tokens>),
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Challenge::TlsAlpn01 => f.write_str("tls-alpn-01"),
            Challenge::Http01(_) => f.write_str("http-01"),
        }
    }
}

/// The SNI a tls-alpn-01 validator sends for an identifier: the DNS name itself, or for an IP
/// address its reverse-mapping name (RFC 8738 section 6).
pub(crate) fn tls_alpn01_server_name(identifier: &str) -> String {
    match identifier.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            let o = ip.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        Ok(IpAddr::V6(ip)) => {
            let mut name = String::with_capacity(72);
            for byte in ip.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
            }
            name.push_str("ip6.arpa");
            name
        }
        Err(_) => identifier.to_ascii_lowercase(),
    }
}

/// Challenge responses provisioned for one order; dropping it withdraws them all.
pub(crate) struct Provisioned {
    resolver: Arc<CertResolver>,
    tls_names: Vec<String>,
    http: Option<(Arc<Http01Tokens>, Vec<String>)>,
}

impl Provisioned {
    pub(crate) fn new(resolver: Arc<CertResolver>) -> Self {
        Self {
            resolver,
            tls_names: Vec::new(),
            http: None,
        }
    }

    /// Serves `key` for acme-tls/1 handshakes naming `identifier`.
    pub(crate) fn tls_alpn01(&mut self, identifier: &str, key: Arc<rustls::sign::CertifiedKey>) {
        let name = tls_alpn01_server_name(identifier);
        self.resolver.set_challenge(&name, key);
        self.tls_names.push(name);
    }

    pub(crate) fn http01(&mut self, tokens: &Arc<Http01Tokens>, token: &str, key_auth: &str) {
        tokens.insert(token, key_auth);
        let (_, list) = self
            .http
            .get_or_insert_with(|| (tokens.clone(), Vec::new()));
        list.push(token.to_owned());
    }
}

impl Drop for Provisioned {
    fn drop(&mut self) {
        for name in &self.tls_names {
            self.resolver.clear_challenge(name);
        }
        if let Some((tokens, list)) = &self.http {
            for token in list {
                tokens.remove(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_for_ip_identifiers() {
        assert_eq!(
            tls_alpn01_server_name("127.0.0.1"),
            "1.0.0.127.in-addr.arpa"
        );
        assert_eq!(
            tls_alpn01_server_name("Mesh.Phoenix.Test"),
            "mesh.phoenix.test"
        );
        let v6 = tls_alpn01_server_name("2001:db8::1");
        assert!(v6.starts_with("1.0.0.0.0.0.0.0."), "{v6}");
        assert!(v6.ends_with("8.b.d.0.1.0.0.2.ip6.arpa"), "{v6}");
        assert_eq!(v6.split('.').count(), 34);
    }

    #[test]
    fn tokens_are_served_only_under_the_challenge_path() {
        let tokens = Http01Tokens::new();
        tokens.insert("abc", "abc.thumb");
        assert_eq!(tokens.get("abc").as_deref(), Some("abc.thumb"));
        assert_eq!(
            tokens.respond("/.well-known/acme-challenge/abc").as_deref(),
            Some("abc.thumb")
        );
        assert_eq!(tokens.respond("/abc"), None);
        assert_eq!(tokens.respond("/.well-known/acme-challenge/abc/x"), None);
        assert_eq!(tokens.respond("/.well-known/acme-challenge/"), None);
        {
            let mut p = Provisioned::new(CertResolver::new());
            p.http01(&tokens, "def", "def.thumb");
            assert!(tokens.get("def").is_some());
        }
        assert_eq!(
            tokens.get("def"),
            None,
            "dropping the guard withdraws the token"
        );
        assert!(tokens.get("abc").is_some());
    }
}
