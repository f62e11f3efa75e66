//! The CA's configuration (the `[ca]` part of the topology file) and its issuance policy.
//!
//! `CaConfig::validate` reports every problem at once so that `phoenix check` can show them all
//! before any port is bound. `Policy` is the single place that decides whether a DNS name or an
//! IP address may appear in a certificate: the ACME server (newOrder), `phoenix ca issue` and the
//! CA's own HTTPS certificate all ask it, and the intermediate's X.509 name constraints are built
//! from the same lists, so a certificate the policy allows always chains.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

fn default_name() -> String {
    "Phoenix Internal CA".to_owned()
}

fn default_leaf_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_http01_port() -> u16 {
    80
}

fn default_tlsalpn01_port() -> u16 {
    443
}

/// Configuration of the `ca` role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// Address the HTTPS (ACME) server listens on.
    pub listen: SocketAddr,
    /// Directory holding keys, certificates and the store; relative to the process cwd.
    pub data_dir: PathBuf,
    /// Organisation name written into the root and intermediate subjects.
    #[serde(default = "default_name")]
    pub name: String,
    /// DNS suffixes the CA may certify (a suffix also allows the name itself).
    #[serde(default)]
    pub domains: Vec<String>,
    /// IP networks the CA may certify.
    #[serde(default)]
    pub networks: Vec<IpNet>,
    /// Default lifetime of issued leaves (humantime, e.g. "24h"). Default 24h.
    #[serde(default = "default_leaf_lifetime", with = "humantime_serde")]
    pub leaf_lifetime: Duration,
    /// External base URL (e.g. "https://ca.example:9000"); when unset, ACME URLs are built from
    /// each request's Host.
    #[serde(default)]
    pub url: Option<String>,
    /// Extra DNS names (or IPs) for the CA's own HTTPS certificate.
    #[serde(default)]
    pub names: Vec<String>,
    /// ACME settings.
    #[serde(default)]
    pub acme: AcmeConfig,
}

/// ACME-specific settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// Port the http-01 validator connects to (RFC 8555 says 80; tests use a free port).
    #[serde(default = "default_http01_port")]
    pub http01_port: u16,
    /// Port the tls-alpn-01 validator connects to (RFC 8737 says 443).
    #[serde(default = "default_tlsalpn01_port")]
    pub tlsalpn01_port: u16,
    /// Require External Account Binding (RFC 8555 7.3.4) for new accounts.
    #[serde(default)]
    pub require_eab: bool,
    /// Name -> address used for validation instead of DNS: `"10.0.0.5"`, or `"10.0.0.5:8443"` when the
    /// name's TLS listener (where tls-alpn-01 is answered) is not on `tlsalpn01_port`.
    #[serde(default)]
    pub resolve: BTreeMap<String, ValidationTarget>,
}

/// Where the validator reaches a name: an address, and optionally the port of the name's own TLS
/// listener. `phoenix up` and a CA running from the whole topology file fill these in from the
/// gateway's and the mesh's listen addresses, so the internal flow needs no DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationTarget {
    pub ip: IpAddr,
    /// Port for tls-alpn-01; `None` means `tlsalpn01_port`. http-01 always uses `http01_port`.
    pub tls_port: Option<u16>,
}

impl From<IpAddr> for ValidationTarget {
    fn from(ip: IpAddr) -> Self {
        ValidationTarget { ip, tls_port: None }
    }
}

impl From<std::net::SocketAddr> for ValidationTarget {
    fn from(addr: std::net::SocketAddr) -> Self {
        ValidationTarget {
            ip: addr.ip(),
            tls_port: Some(addr.port()),
        }
    }
}

impl std::str::FromStr for ValidationTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(ip.into());
        }
        s.parse::<std::net::SocketAddr>()
            .map(Into::into)
            .map_err(|_| format!("{s:?} is neither an IP address nor IP:PORT"))
    }
}

impl<'de> Deserialize<'de> for ValidationTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            http01_port: default_http01_port(),
            tlsalpn01_port: default_tlsalpn01_port(),
            require_eab: false,
            resolve: BTreeMap::new(),
        }
    }
}

impl CaConfig {
    /// A configuration with defaults for everything but the required fields.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> CaConfig {
        CaConfig {
            listen,
            data_dir: data_dir.into(),
            name: default_name(),
            domains: Vec::new(),
            networks: Vec::new(),
            leaf_lifetime: default_leaf_lifetime(),
            url: None,
            names: Vec::new(),
            acme: AcmeConfig::default(),
        }
    }

    /// Every problem with this configuration, each with a hint; empty when it is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.data_dir.as_os_str().is_empty() {
            problems.push(
                "ca.data_dir is empty: set it to a directory such as \"/var/lib/phoenix/ca\""
                    .to_owned(),
            );
        }
        if self.name.trim().is_empty() || self.name.len() > 64 {
            problems.push(
                "ca.name must be 1 to 64 characters (it becomes the CA certificates' subject)"
                    .to_owned(),
            );
        }
        if self.domains.is_empty() && self.networks.is_empty() {
            problems.push(
                "ca.domains and ca.networks are both empty, so the CA could certify nothing: list DNS suffixes (domains = [\"internal.example\"]) and/or networks (networks = [\"10.0.0.0/8\"])"
                    .to_owned(),
            );
        }
        for d in &self.domains {
            if d.starts_with("*.") {
                problems.push(format!("ca.domains: {d:?}: write the suffix without \"*.\" (a domain already allows every name below it)"));
            } else if !is_dns_name(d) {
                problems.push(format!("ca.domains: {d:?} is not a valid DNS name (lowercase letters, digits, '-' and '.' only)"));
            }
        }
        let policy = Policy::new(self);
        for n in &self.names {
            if let Ok(ip) = n.parse::<IpAddr>() {
                if !policy.permits_ip(ip) {
                    problems.push(format!("ca.names: {n} is outside ca.networks; the CA's own certificate could not chain through its name-constrained intermediate"));
                }
            } else if !is_dns_name(n) {
                problems.push(format!(
                    "ca.names: {n:?} is not a valid DNS name or IP address"
                ));
            } else if !policy.permits_dns(n) {
                problems.push(format!("ca.names: {n} is outside ca.domains; the CA's own certificate could not chain through its name-constrained intermediate"));
            }
        }
        // Lifetimes down to seconds are allowed: short-lived leaves are how renewal is exercised, and
        // the roles renew at two thirds of the lifetime.
        if self.leaf_lifetime < Duration::from_secs(10)
            || self.leaf_lifetime > Duration::from_secs(398 * 86400)
        {
            problems.push(format!(
                "ca.leaf_lifetime = {} is out of range: use between 10s and 398d",
                humantime::format_duration(self.leaf_lifetime)
            ));
        }
        if let Some(url) = &self.url {
            if let Err(e) = parse_base_url(url) {
                problems.push(format!("ca.url = {url:?}: {e}"));
            }
        }
        if self.acme.http01_port == 0 {
            problems.push("ca.acme.http01_port must not be 0".to_owned());
        }
        if self.acme.tlsalpn01_port == 0 {
            problems.push("ca.acme.tlsalpn01_port must not be 0".to_owned());
        }
        for name in self.acme.resolve.keys() {
            if !is_dns_name(name) {
                problems.push(format!("ca.acme.resolve: {name:?} is not a valid DNS name"));
            }
        }
        problems
    }
}

/// Checks an external base URL: `https://host[:port]`, no path, query or fragment.
pub(crate) fn parse_base_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.scheme_str() != Some("https") {
        return Err("must start with https:// (ACME requires TLS)".to_owned());
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".to_owned());
    };
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err("must be https://host[:port] without a path".to_owned());
    }
    Ok(format!("https://{authority}"))
}

/// True for a syntactically valid, fully qualified-looking DNS name without wildcard.
pub(crate) fn is_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 || name.ends_with('.') {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

/// Which names and addresses this CA may certify.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    domains: Vec<String>,
    networks: Vec<IpNet>,
}

impl Policy {
    pub(crate) fn new(cfg: &CaConfig) -> Policy {
        Policy {
            domains: cfg.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            networks: cfg.networks.clone(),
        }
    }

    /// `name` must already be lowercase.
    pub(crate) fn permits_dns(&self, name: &str) -> bool {
        is_dns_name(name)
            && self.domains.iter().any(|d| {
                name == d
                    || name
                        .strip_suffix(d.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            })
    }

    pub(crate) fn permits_ip(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(&ip))
    }

    pub(crate) fn domains(&self) -> &[String] {
        &self.domains
    }

    pub(crate) fn networks(&self) -> &[IpNet] {
        &self.networks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CaConfig {
        let mut c = CaConfig::new("127.0.0.1:9000".parse().unwrap(), "/tmp/x");
        c.domains = vec!["phoenix.test".into()];
        c.networks = vec!["127.0.0.0/8".parse().unwrap()];
        c
    }

    #[test]
    fn policy_allows_suffixes_only_on_label_boundaries() {
        let p = Policy::new(&cfg());
        assert!(p.permits_dns("phoenix.test"));
        assert!(p.permits_dns("app.phoenix.test"));
        assert!(!p.permits_dns("evilphoenix.test"));
        assert!(!p.permits_dns("phoenix.test.evil"));
        assert!(!p.permits_dns("*.phoenix.test"));
        assert!(p.permits_ip("127.0.0.9".parse().unwrap()));
        assert!(!p.permits_ip("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = CaConfig::new("127.0.0.1:9000".parse().unwrap(), "");
        c.url = Some("http://x".into());
        c.names = vec!["Bad Name".into()];
        c.leaf_lifetime = Duration::from_secs(1);
        let problems = c.validate();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(cfg().validate().is_empty());
    }

    #[test]
    fn config_parses_from_toml_with_defaults() {
        let c: CaConfig = serde_json::from_value(serde_json::json!({
            "listen": "127.0.0.1:9000", "data_dir": "ca", "domains": ["a.test"],
            "leaf_lifetime": "2h", "acme": {"require_eab": true}
        }))
        .unwrap();
        assert_eq!(c.leaf_lifetime, Duration::from_secs(7200));
        assert_eq!(c.acme.http01_port, 80);
        assert!(c.acme.require_eab);
        assert_eq!(c.name, "Phoenix Internal CA");
    }
}
