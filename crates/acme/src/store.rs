//! The certificate store on disk, in kamal-proxy's layout (Go's `autocert.DirCache`), so a
//! host can move between kamal-proxy and Berth in either direction and keep its certificates:
//!
//! ```text
//! <acme_cache_path>/<hex SHA-256 of the ACME directory key>/
//!     acme_account+key      the ACME account's private key (PEM)
//!     <host>                the host's private key PEM, then its chain PEM (leaf first)
//!     <host>+rsa            the same for an RSA certificate (read, never written)
//! ```
//!
//! The directory key is the service's `acme_directory` as kamal-proxy stores it: `""` for
//! Let's Encrypt production, else the directory URL. Directories are 0700, files 0600, and
//! every file is replaced in one rename, so a half-written certificate is never read.
//!
//! Berth's earlier layout (`<cache>/<directory URL made a file name>/<host>/cert.pem` and
//! `key.pem`, `account.json`) is still read, and what is read there is written in the new
//! layout, so an upgrade orders nothing.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::PrivatePkcs8KeyDer;

use crate::certificate::Certificate;
use crate::key_pem;

/// The account key's file name (autocert's).
const ACCOUNT_KEY_FILE: &str = "acme_account+key";

#[derive(Debug, Clone)]
pub struct CertStore {
    dir: PathBuf,
    /// Where Berth kept this directory's certificates before it used kamal-proxy's layout.
    legacy_dir: PathBuf,
}

impl CertStore {
    /// The store for certificates from the ACME directory `directory_key` (`""` = Let's
    /// Encrypt production), under `cache`.
    pub fn new(cache: &Path, directory_key: &str) -> Self {
        let hash = crate::directory_hash(directory_key);
        let legacy_name: String = crate::directory_url(directory_key)
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
            dir: cache.join(hash),
            legacy_dir: cache.join(legacy_name),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `host`'s key and chain.
    pub fn host_file(&self, host: &str) -> PathBuf {
        self.dir.join(host)
    }

    /// The stored certificate for `host`, when there is one that is valid now for that host
    /// and matches its key (as kamal-proxy requires); anything else is ordered anew.
    pub fn load(&self, host: &str) -> Option<Certificate> {
        let usable = |certificate: Certificate| {
            if !certificate.covers(host) {
                tracing::warn!(host, names = ?certificate.names, "Ignoring stored certificate for other names");
                return None;
            }
            if certificate.is_expired() {
                tracing::info!(host, "Stored certificate expired");
                return None;
            }
            Some(certificate)
        };
        for name in [host.to_string(), format!("{host}+rsa")] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(&name)) {
                match Certificate::from_pem(&text, &text) {
                    Ok(certificate) => return usable(certificate),
                    Err(error) => {
                        tracing::warn!(host, file = %name, %error, "Ignoring unreadable stored certificate")
                    }
                }
            }
        }
        let certificate = usable(self.load_legacy(host)?)?;
        match self.save(host, &certificate) {
            Ok(()) => tracing::info!(host, "Certificate moved to kamal-proxy's store layout"),
            Err(error) => {
                tracing::warn!(host, %error, "Cannot write certificate in the new store layout")
            }
        }
        Some(certificate)
    }

    fn load_legacy(&self, host: &str) -> Option<Certificate> {
        let dir = self.legacy_dir.join(host);
        let chain = std::fs::read_to_string(dir.join("cert.pem")).ok()?;
        let key = std::fs::read_to_string(dir.join("key.pem")).ok()?;
        Certificate::from_pem(&chain, &key).ok()
    }

    /// Stores `host`'s certificate as one file: its key, then its chain.
    pub fn save(&self, host: &str, certificate: &Certificate) -> std::io::Result<()> {
        let contents = key_pem::cache_file(&certificate.key_pem, &certificate.chain_pem)
            .map_err(std::io::Error::other)?;
        create_private_dir(&self.dir)?;
        write_private(&self.host_file(host), contents.as_bytes())
    }

    /// The ACME account's key, from this store or from Berth's earlier `account.json`.
    pub fn load_account_key(&self) -> Option<PrivatePkcs8KeyDer<'static>> {
        if let Ok(text) = std::fs::read_to_string(self.dir.join(ACCOUNT_KEY_FILE)) {
            match key_pem::account_key_from_pem(&text) {
                Ok(key) => return Some(key),
                Err(error) => tracing::warn!(%error, "Ignoring unreadable ACME account key"),
            }
        }
        let legacy = std::fs::read_to_string(self.legacy_dir.join("account.json")).ok()?;
        let credentials: instant_acme::AccountCredentials = serde_json::from_str(&legacy).ok()?;
        let key = credentials.private_key().clone_key();
        if let Err(error) = self.save_account_key(&key) {
            tracing::warn!(%error, "Cannot write the ACME account key in the new store layout");
        }
        Some(key)
    }

    pub fn save_account_key(&self, key: &PrivatePkcs8KeyDer<'_>) -> std::io::Result<()> {
        let pem = key_pem::account_key_to_pem(key).map_err(std::io::Error::other)?;
        create_private_dir(&self.dir)?;
        write_private(&self.dir.join(ACCOUNT_KEY_FILE), pem.as_bytes())
    }
}

/// Creates `dir` and any missing parent owner-only, as autocert's `MkdirAll(dir, 0700)` does.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
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
    fn folders_are_named_by_the_hash_of_the_directory_key_as_kamal_proxy_names_them() {
        let cache = Path::new("/cache");
        assert_eq!(
            CertStore::new(cache, "").dir(),
            Path::new("/cache/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        let staging = CertStore::new(cache, crate::LETS_ENCRYPT_STAGING);
        assert_ne!(staging.dir(), CertStore::new(cache, "").dir());
    }

    #[test]
    fn the_account_key_is_owner_only_and_reads_back() {
        let cache = tempfile::tempdir().unwrap();
        let store = CertStore::new(cache.path(), "https://127.0.0.1:14000/dir");
        let key = rcgen::KeyPair::generate().unwrap();
        let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
        store.save_account_key(&pkcs8).unwrap();
        let path = store.dir().join(ACCOUNT_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
        assert_eq!(
            store.load_account_key().unwrap().secret_pkcs8_der(),
            pkcs8.secret_pkcs8_der()
        );
    }

    #[test]
    fn certificates_from_the_earlier_layout_are_read_and_moved() {
        let cache = tempfile::tempdir().unwrap();
        let store = CertStore::new(cache.path(), "");
        let (chain, key) = crate::certificate::tests::self_signed("old.test", 90 * 24, 80 * 24);
        let legacy = cache
            .path()
            .join("acme-v02.api.letsencrypt.org_directory/old.test");
        std::fs::create_dir_all(&legacy).unwrap();
        std::fs::write(legacy.join("cert.pem"), &chain).unwrap();
        std::fs::write(legacy.join("key.pem"), &key).unwrap();
        assert!(store.load("old.test").is_some());
        let moved = std::fs::read_to_string(store.host_file("old.test")).unwrap();
        assert!(moved.starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
        assert!(moved.ends_with("-----END CERTIFICATE-----\n"));
    }

    #[test]
    fn a_certificate_for_another_name_or_expired_is_not_served() {
        let cache = tempfile::tempdir().unwrap();
        let store = CertStore::new(cache.path(), "");
        let (chain, key) = crate::certificate::tests::self_signed("a.test", 90 * 24, 80 * 24);
        let certificate = Certificate::from_pem(&chain, &key).unwrap();
        store.save("a.test", &certificate).unwrap();
        assert!(store.load("a.test").is_some());
        store.save("b.test", &certificate).unwrap();
        assert!(store.load("b.test").is_none());

        let (chain, key) = crate::certificate::tests::self_signed("c.test", 3, -1);
        store
            .save("c.test", &Certificate::from_pem(&chain, &key).unwrap())
            .unwrap();
        assert!(store.load("c.test").is_none());
    }
}
