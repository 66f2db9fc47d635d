//! Challenge answers while an order is under way:
//! - HTTP-01: the token the ACME server asks for at `/.well-known/acme-challenge/<token>`, and
//!   the key authorization to answer with (served on the HTTP port);
//! - TLS-ALPN-01 (RFC 8737): for a host, the self-signed certificate carrying the key
//!   authorization's digest that the HTTPS port shows a client offering only `acme-tls/1`.
//!   Used when HTTP-01 cannot complete (port 80 closed), as kamal-proxy uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::sign::CertifiedKey;

pub const CHALLENGE_PATH_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug, Default)]
pub struct Challenges {
    answers: Mutex<HashMap<String, String>>,
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    pub fn add(&self, token: &str, key_authorization: &str) {
        lock(&self.answers).insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        lock(&self.answers).remove(token);
    }

    /// The answer for a challenge request path, if it is one we expect.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PATH_PREFIX)?;
        lock(&self.answers).get(token).cloned()
    }

    /// Prepares the TLS-ALPN-01 certificate for `host`: self-signed, naming the host, with
    /// the critical `acmeIdentifier` extension holding `digest` (SHA-256 of the key
    /// authorization).
    pub fn add_tls_alpn(&self, host: &str, digest: &[u8]) -> Result<(), String> {
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| format!("challenge certificate: {e}"))?;
        params
            .custom_extensions
            .push(rcgen::CustomExtension::new_acme_identifier(digest));
        let key = rcgen::KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
        let certificate = params
            .self_signed(&key)
            .map_err(|e| format!("challenge certificate: {e}"))?;
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
            .map_err(|e| format!("challenge key: {e}"))?;
        let certified = CertifiedKey::new(vec![certificate.der().clone()], signing);
        lock(&self.tls_alpn).insert(host.to_string(), Arc::new(certified));
        Ok(())
    }

    pub fn remove_tls_alpn(&self, host: &str) {
        lock(&self.tls_alpn).remove(host);
    }

    /// The TLS-ALPN-01 certificate for `host`, while its challenge is open.
    pub fn tls_alpn_certificate(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        lock(&self.tls_alpn).get(host).cloned()
    }
}

fn lock<T>(map: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single insert or remove: a poisoned map is still consistent.
    map.lock().unwrap_or_else(|e| e.into_inner())
}
