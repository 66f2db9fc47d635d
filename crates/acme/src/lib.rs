//! Berth's certificates: TLS that just works.
//!
//! # Layout
//! - [`Certificates`]: the hosts served with TLS and their certificates; obtains them over ACME
//!   HTTP-01 (with `instant-acme`), renews them when a third of their life is left, retries
//!   failures with backoff, and hands them to TLS handshakes (waiting, bounded, for one that
//!   is on its way).
//! - [`Certificate`]: a parsed chain and key, ready for rustls.
//! - `store`: the on-disk cache (one folder per ACME directory; owner-only files).
//! - `challenge`: the HTTP-01 answers the HTTP listener serves.

mod certificate;
mod certificates;
mod challenge;
mod store;

pub use certificate::{Certificate, CertificateError};
pub use certificates::{
    AcmeSettings, CertificateInfo, Certificates, OnDemand, TlsSource, LETS_ENCRYPT_PRODUCTION,
    LETS_ENCRYPT_STAGING,
};
pub use challenge::CHALLENGE_PATH_PREFIX;
pub use store::CertStore;
