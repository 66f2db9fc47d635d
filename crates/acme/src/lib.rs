//! Berth's certificates: TLS that just works.
//!
//! # Layout
//! - [`Certificates`]: the hosts served with TLS and their certificates; obtains them over ACME
//!   HTTP-01 (with `instant-acme`), renews them when a third of their life is left, retries
//!   failures with backoff, and hands them to TLS handshakes (waiting, bounded, for one that
//!   is on its way).
//! - [`Certificate`]: a parsed chain and key, ready for rustls.
//! - [`CertStore`]: the on-disk cache in kamal-proxy's layout (one folder per ACME directory,
//!   one file per host; owner-only files), so certificates survive a swap either way.
//! - `challenge`: the HTTP-01 answers the HTTP listener serves.
//! - [`SharedStore`]: the store several instances share (Redis): certificates with sealed
//!   keys, the ACME account, challenge answers, order locks.

mod certificate;
mod certificates;
mod challenge;
mod key_pem;
mod shared;
mod store;

pub use certificate::{Certificate, CertificateError};
pub use certificates::{AcmeSettings, CertificateInfo, Certificates, OnDemand, TlsSource};
pub use challenge::CHALLENGE_PATH_PREFIX;
pub use shared::{SharedStore, StoreError, StoreKey, StoreSetupError, StoreStatus};
pub use store::CertStore;

pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// A directory URL as kamal-proxy stores it in a service's `acme_directory` (and names its
/// certificate folder after): `""` for Let's Encrypt production, else the URL.
pub fn directory_key(url: &str) -> &str {
    if url == LETS_ENCRYPT_PRODUCTION {
        ""
    } else {
        url
    }
}

/// The hex SHA-256 of a directory key: what names its certificate folder (as autocert names
/// it) and its entries in a shared store.
pub(crate) fn directory_hash(key: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The directory URL a stored `acme_directory` stands for.
pub fn directory_url(key: &str) -> &str {
    if key.is_empty() {
        LETS_ENCRYPT_PRODUCTION
    } else {
        key
    }
}
