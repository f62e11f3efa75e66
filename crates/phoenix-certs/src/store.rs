//! The certificate directory: `cert.pem` (chain), `key.pem` and `account.json`.
//!
//! Files are replaced atomically (write a temporary file in the same directory, fsync, rename),
//! so a crash or a full disk leaves either the old file or the new one, never half of one. Secret
//! files are created with mode 0600 before a single byte is written to them: a key is never
//! readable by others, not even for the instant between create and chmod.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CertsError;

pub(crate) const CERT_FILE: &str = "cert.pem";
pub(crate) const KEY_FILE: &str = "key.pem";
pub(crate) const ACCOUNT_FILE: &str = "account.json";

/// `account.json`: the ACME account, tied to the directory it was created on so that pointing a
/// role at another CA creates a new account instead of failing with an unknown one.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredAccount {
    pub(crate) directory_url: String,
    pub(crate) credentials: instant_acme::AccountCredentials,
}

/// Creates `dir` (mode 0700 on Unix) if it does not exist.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CertsError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(CertsError::io(dir))
}

/// Atomically replaces `path` with `contents`; `secret` files get mode 0600, others 0644.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> Result<(), CertsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_dir(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(
        ".{file_name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(if secret { 0o600 } else { 0o644 });
        }
        let mut file = options.open(&tmp).map_err(CertsError::io(&tmp))?;
        file.write_all(contents).map_err(CertsError::io(&tmp))?;
        file.sync_all().map_err(CertsError::io(&tmp))?;
        fs::rename(&tmp, path).map_err(CertsError::io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; failure here only weakens crash safety, so it is not fatal.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a file, `Ok(None)` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, CertsError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CertsError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Tightens a secret file that others can read back to 0600, and says so: the key was exposed
/// to other local users for a while (a copy, a restore, a hook that ran chmod).
pub(crate) fn tighten_secret(path: &Path) -> Result<(), CertsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = fs::metadata(path).map_err(CertsError::io(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "private key was readable by other users; setting mode 600"
            );
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .map_err(CertsError::io(path))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

pub(crate) fn load_account(dir: &Path) -> Result<Option<StoredAccount>, CertsError> {
    let path = dir.join(ACCOUNT_FILE);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    tighten_secret(&path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| CertsError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
}

pub(crate) fn save_account(dir: &Path, account: &StoredAccount) -> Result<(), CertsError> {
    let path = dir.join(ACCOUNT_FILE);
    let json = serde_json::to_vec_pretty(account).map_err(|e| CertsError::Io {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    write_atomic(&path, &json, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_writes_replace_and_set_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs/sub");
        let key = dir.join(KEY_FILE);
        write_atomic(&key, b"one", true).unwrap();
        write_atomic(&key, b"two", true).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "two");
        let cert = dir.join(CERT_FILE);
        write_atomic(&cert, b"chain", false).unwrap();
        #[cfg(unix)]
        {
            assert_eq!(mode(&key), 0o600);
            assert_eq!(mode(&cert), 0o644);
            assert_eq!(mode(&dir), 0o700);
        }
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(read_optional(&dir.join("missing")).unwrap(), None);
    }

    #[cfg(unix)]
    #[test]
    fn loose_key_permissions_are_tightened() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join(KEY_FILE);
        fs::write(&key, "k").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        tighten_secret(&key).unwrap();
        assert_eq!(mode(&key), 0o600);
    }
}
