//! The certificate store on disk: under the ACME cache path, one folder per ACME directory
//! (so staging and production never mix), holding the account credentials and, per host,
//! `cert.pem` and `key.pem`. Files are owner-only and written atomically.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::certificate::Certificate;

#[derive(Debug, Clone)]
pub struct CertStore {
    dir: PathBuf,
}

impl CertStore {
    /// The store for certificates from `directory_url`, under `cache`.
    pub fn new(cache: &Path, directory_url: &str) -> Self {
        let key: String = directory_url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            dir: cache.join(key),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn host_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host)
    }

    /// The stored certificate for `host`, if there is a readable one.
    pub fn load(&self, host: &str) -> Option<Certificate> {
        let dir = self.host_dir(host);
        let chain = std::fs::read_to_string(dir.join("cert.pem")).ok()?;
        let key = std::fs::read_to_string(dir.join("key.pem")).ok()?;
        match Certificate::from_pem(&chain, &key) {
            Ok(certificate) => Some(certificate),
            Err(error) => {
                tracing::warn!(host, %error, "Ignoring unreadable stored certificate");
                None
            }
        }
    }

    pub fn save(&self, host: &str, certificate: &Certificate) -> std::io::Result<()> {
        let dir = self.host_dir(host);
        create_private_dir(&dir)?;
        write_private(&dir.join("key.pem"), certificate.key_pem.as_bytes())?;
        write_private(&dir.join("cert.pem"), certificate.chain_pem.as_bytes())
    }

    pub fn load_account(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("account.json")).ok()
    }

    pub fn save_account(&self, credentials: &str) -> std::io::Result<()> {
        create_private_dir(&self.dir)?;
        write_private(&self.dir.join("account.json"), credentials.as_bytes())
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes a file readable by its owner only, replacing any old one in a single rename.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_and_production_certificates_live_apart() {
        let cache = Path::new("/cache");
        let production = CertStore::new(cache, "https://acme-v02.api.letsencrypt.org/directory");
        let staging = CertStore::new(
            cache,
            "https://acme-staging-v02.api.letsencrypt.org/directory",
        );
        assert_ne!(production.dir(), staging.dir());
        assert!(production.dir().starts_with(cache));
    }

    #[test]
    fn account_files_are_owner_only() {
        let cache = tempfile::tempdir().unwrap();
        let store = CertStore::new(cache.path(), "https://127.0.0.1:14000/dir");
        store.save_account("{}").unwrap();
        let mode = std::fs::metadata(store.dir().join("account.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.load_account().as_deref(), Some("{}"));
    }
}
