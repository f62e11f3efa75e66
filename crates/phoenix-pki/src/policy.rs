//! Which identifiers the CA may certify.
//!
//! The policy is read back from the intermediate's X.509 name constraints, so the check the CA
//! makes before issuing and the check every relying party makes when verifying a chain are the
//! same rule; the CA never signs something that verification would later refuse.

use std::net::IpAddr;

use ipnet::IpNet;

/// Domains (each with all names under it) and networks the CA may certify.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifierPolicy {
    /// Lowercase domain names without a trailing dot.
    pub domains: Vec<String>,
    pub networks: Vec<IpNet>,
}

impl IdentifierPolicy {
    /// True if `name` is a valid hostname (optionally with one leading `*.` label) equal to or
    /// under one of the domains. Comparison is ASCII case-insensitive.
    pub fn allows_dns(&self, name: &str) -> bool {
        if !is_valid_dns_name(name) {
            return false;
        }
        let name = name.to_ascii_lowercase();
        self.domains.iter().any(|domain| {
            let domain = domain.to_ascii_lowercase();
            name == domain
                || (name.len() > domain.len()
                    && name.ends_with(&domain)
                    && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
        })
    }

    /// True if `ip` is inside one of the networks.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|net| net.contains(&ip))
    }
}

/// A DNS name the CA is willing to put in a certificate: LDH labels of 1 to 63 characters that
/// neither start nor end with a hyphen, no empty label (so no trailing dot), at most 253
/// characters, and optionally a single leading `*` wildcard label.
pub fn is_valid_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.is_empty() {
        return false;
    }
    rest.split('.').all(is_ldh_label)
}

fn is_ldh_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> IdentifierPolicy {
        IdentifierPolicy {
            domains: vec!["internal.example".into(), "lab".into()],
            networks: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        }
    }

    #[test]
    fn dns_names_inside_the_domains_are_allowed() {
        let p = policy();
        for ok in [
            "internal.example",
            "INTERNAL.Example",
            "api.internal.example",
            "a.b.c.internal.example",
            "*.internal.example",
            "*.svc.internal.example",
            "lab",
            "host.lab",
        ] {
            assert!(p.allows_dns(ok), "{ok} should be allowed");
        }
    }

    #[test]
    fn dns_names_outside_or_invalid_are_rejected() {
        let p = policy();
        for bad in [
            "evil.example",
            "notinternal.example",  // suffix match must be on a label boundary
            "internal.example.com", // the domain is not a prefix
            "api.internal.example.",
            "api..internal.example",
            "*.*.internal.example",
            "a*.internal.example",
            "*internal.example",
            "-api.internal.example",
            "api-.internal.example",
            "api_x.internal.example",
            "ápi.internal.example",
            "",
            "*.",
            "*",
            "example",
            "flab",
        ] {
            assert!(!p.allows_dns(bad), "{bad:?} should be rejected");
        }
        let long_label = format!("{}.lab", "a".repeat(64));
        assert!(!p.allows_dns(&long_label));
        let ok_label = format!("{}.lab", "a".repeat(63));
        assert!(p.allows_dns(&ok_label));
        // 253 characters is the limit for the whole name.
        let long = format!("{}lab", "abcdefghi.".repeat(25)); // 253 chars
        assert_eq!(long.len(), 253);
        assert!(p.allows_dns(&long));
        let too_long = format!("a{long}");
        assert!(!p.allows_dns(&too_long));
    }

    #[test]
    fn ips_inside_the_networks_are_allowed() {
        let p = policy();
        assert!(p.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(p.allows_ip("fd12::1".parse().unwrap()));
        assert!(!p.allows_ip("11.0.0.1".parse().unwrap()));
        assert!(!p.allows_ip("::1".parse().unwrap()));
        assert!(!IdentifierPolicy::default().allows_ip("10.0.0.1".parse().unwrap()));
        assert!(!IdentifierPolicy::default().allows_dns("lab"));
    }
}
