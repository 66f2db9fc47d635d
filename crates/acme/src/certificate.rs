//! A certificate chain with its private key, ready for rustls, plus the facts about it that
//! renewal and status views need (validity, issuer).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("no private key found in the PEM data")]
    NoPrivateKey,
    #[error("invalid PEM data: {0}")]
    Pem(std::io::Error),
    #[error("unsupported private key: {0}")]
    Key(rustls::Error),
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    #[error("invalid certificate: {0}")]
    Parse(String),
}

/// A usable certificate.
#[derive(Debug)]
pub struct Certificate {
    pub chain_pem: String,
    pub key_pem: String,
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub issuer: String,
    pub names: Vec<String>,
}

impl Certificate {
    /// Parses a PEM chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, CertificateError> {
        let chain: Vec<_> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(CertificateError::Pem)?;
        let leaf = chain
            .first()
            .ok_or(CertificateError::NoCertificate)?
            .clone();
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(CertificateError::Pem)?
            .ok_or(CertificateError::NoPrivateKey)?;
        let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(CertificateError::Key)?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err(CertificateError::KeyMismatch),
        }

        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| CertificateError::Parse(e.to_string()))?;
        let validity = parsed.validity();
        let to_system_time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        let mut names = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                    names.push(dns.to_ascii_lowercase());
                }
            }
        }
        Ok(Self {
            chain_pem: chain_pem.to_string(),
            key_pem: key_pem.to_string(),
            certified: Arc::new(certified),
            not_before: to_system_time(validity.not_before),
            not_after: to_system_time(validity.not_after),
            issuer: parsed.issuer().to_string(),
            names,
        })
    }

    /// Reads a certificate and key from PEM files.
    pub fn from_files(chain_path: &str, key_path: &str) -> Result<Self, CertificateError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| CertificateError::Read {
                path: path.to_string(),
                source,
            })
        };
        Self::from_pem(&read(chain_path)?, &read(key_path)?)
    }

    /// When to renew: once a third of the lifetime is left.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_after - lifetime / 3
    }

    pub fn is_due_for_renewal(&self) -> bool {
        SystemTime::now() >= self.renew_at()
    }

    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    /// Whether the certificate names `host`, itself or by a wildcard one label up.
    pub fn covers(&self, host: &str) -> bool {
        let wildcard = host
            .split_once('.')
            .map(|(_, domain)| format!("*.{domain}"));
        self.names
            .iter()
            .any(|name| name == host || Some(name) == wildcard.as_ref())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `host` (chain PEM, PKCS#8 key PEM).
    pub(crate) fn self_signed(host: &str, hours_valid: i64, hours_left: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(hours_valid - hours_left);
        params.not_after = now + time::Duration::hours(hours_left);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn parses_pem_and_reads_validity_and_names() {
        let (chain, key) = self_signed("a.test", 90 * 24, 80 * 24);
        let certificate = Certificate::from_pem(&chain, &key).unwrap();
        assert_eq!(certificate.names, vec!["a.test"]);
        assert!(!certificate.is_due_for_renewal());
        assert!(certificate.covers("a.test"));
        assert!(!certificate.covers("b.test"));
    }

    #[test]
    fn a_certificate_with_a_third_of_its_life_left_is_due() {
        let (chain, key) = self_signed("a.test", 3, 1);
        assert!(Certificate::from_pem(&chain, &key)
            .unwrap()
            .is_due_for_renewal());
    }

    #[test]
    fn a_key_from_another_certificate_is_refused() {
        let (chain, _) = self_signed("a.test", 10, 5);
        let (_, other_key) = self_signed("a.test", 10, 5);
        assert!(matches!(
            Certificate::from_pem(&chain, &other_key),
            Err(CertificateError::KeyMismatch)
        ));
        assert!(matches!(
            Certificate::from_pem("garbage", &other_key),
            Err(CertificateError::NoCertificate)
        ));
    }
}
