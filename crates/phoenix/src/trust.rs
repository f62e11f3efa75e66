//! `phoenix trust install|uninstall`: put the Phoenix root into (take it out of) the system trust
//! store, as `caddy trust` does, so curl, browsers and every program that uses the system store
//! trust the flow without `--cacert`.
//!
//! The store is Debian's: a root is a file in `/usr/local/share/ca-certificates` named
//! `phoenix-<first 8 hex of its SHA-256>.crt`, and `update-ca-certificates` rebuilds
//! `/etc/ssl/certs/ca-certificates.crt` from it. The name carries the fingerprint so two CAs (or a
//! recreated one) never overwrite each other and `uninstall` removes exactly what `install` added.
//!
//! The root comes from a file (`--cacert`) or from the CA itself (`--ca-url` + `--ca-fingerprint`,
//! the same bootstrap the roles use: the fetched root is accepted only if it hashes to the given
//! fingerprint). Only a CA certificate is installed: a leaf in the trust store would be useless at
//! best.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use phoenix_certs::TrustSource;

/// Where Debian's `update-ca-certificates` takes local roots from.
pub const STORE_DIR: &str = "/usr/local/share/ca-certificates";

/// Where the root comes from.
#[derive(Debug, Clone, Default)]
pub struct RootFrom {
    pub cacert: Option<PathBuf>,
    pub ca_url: Option<String>,
    pub ca_fingerprint: Option<String>,
}

/// A root to install: its PEM block and SHA-256 fingerprint (hex).
#[derive(Debug, Clone)]
pub struct Root {
    pub pem: String,
    pub fingerprint: String,
}

impl Root {
    /// `phoenix-<fp8>.crt`.
    pub fn file_name(&self) -> String {
        format!("phoenix-{}.crt", &self.fingerprint[..8])
    }
}

/// Obtains and checks the root.
pub async fn root(from: &RootFrom) -> anyhow::Result<Option<Root>> {
    let source = match (&from.cacert, &from.ca_url, &from.ca_fingerprint) {
        (Some(path), None, None) => TrustSource::RootFile(path.clone()),
        (None, Some(url), Some(fp)) => TrustSource::Fingerprint {
            ca_url: url.clone(),
            fingerprint: fp.clone(),
        },
        (None, None, None) => return Ok(None),
        _ => bail!("give either --cacert FILE, or --ca-url URL with --ca-fingerprint FP"),
    };
    let bundle = phoenix_certs::bootstrap_trust(&source)
        .await
        .context("obtaining the root")?;
    let pem = first_pem_block(&bundle.pem).context("the root PEM holds no CERTIFICATE block")?;
    let der = phoenix_pki::parse_cert_pem_chain(&pem)?
        .into_iter()
        .next()
        .context("the root PEM holds no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("the root does not parse: {e}"))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        bail!(
            "{} is not a CA certificate (no basicConstraints CA:TRUE): give the root, e.g. root.pem from `phoenix ca init`",
            cert.subject()
        );
    }
    Ok(Some(Root {
        pem,
        fingerprint: phoenix_pki::fingerprint_der(&der),
    }))
}

fn first_pem_block(pem: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN)?;
    let end = pem[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &pem[start..end]))
}

fn update_store(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("update-ca-certificates")
        .args(args)
        .output()
        .context("running update-ca-certificates (Debian package ca-certificates)")?;
    if !out.status.success() {
        bail!(
            "update-ca-certificates failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn permission_hint(e: std::io::Error, path: &Path) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        anyhow::anyhow!(
            "cannot write {}: changing the system trust store needs root (run with sudo)",
            path.display()
        )
    } else {
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    }
}

/// Installs the root; returns the file written.
pub fn install(root: &Root) -> anyhow::Result<PathBuf> {
    let path = Path::new(STORE_DIR).join(root.file_name());
    std::fs::create_dir_all(STORE_DIR).map_err(|e| permission_hint(e, Path::new(STORE_DIR)))?;
    std::fs::write(&path, &root.pem).map_err(|e| permission_hint(e, &path))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| permission_hint(e, &path))?;
    }
    update_store(&[])?;
    Ok(path)
}

/// Removes the given root, or every Phoenix root when `root` is `None`; returns the files removed.
pub fn uninstall(root: Option<&Root>) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let wanted = root.map(Root::file_name);
    let entries = match std::fs::read_dir(STORE_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).context(format!("reading {STORE_DIR}")),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = match &wanted {
            Some(w) => name == *w,
            None => name.starts_with("phoenix-") && name.ends_with(".crt"),
        };
        if ours {
            std::fs::remove_file(entry.path()).map_err(|e| permission_hint(e, &entry.path()))?;
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        // --fresh: rebuild the bundle and links from what is left, so nothing of the root remains.
        update_store(&["--fresh"])?;
    }
    Ok(removed)
}

/// `phoenix trust install|uninstall`.
pub async fn run(install_it: bool, from: &RootFrom) -> anyhow::Result<()> {
    let root = root(from).await?;
    if install_it {
        let Some(root) = root else {
            bail!(
                "say which root to trust: --cacert FILE, or --ca-url URL with --ca-fingerprint FP"
            );
        };
        let path = install(&root)?;
        println!(
            "Installed the Phoenix root {} as {}",
            root.fingerprint,
            path.display()
        );
        println!("curl and other programs using the system store now trust the flow.");
        println!("Browsers with their own store (Firefox) need it imported separately.");
    } else {
        let removed = uninstall(root.as_ref())?;
        if removed.is_empty() {
            println!("No Phoenix root was installed in {STORE_DIR}.");
        }
        for p in removed {
            println!("Removed {}", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_block_only() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            first_pem_block(pem).unwrap(),
            "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n"
        );
        assert!(first_pem_block("nothing").is_none());
    }
}
