//! TLS termination. The ClientHello is read first, so the certificate for its server name can
//! be looked up (and waited for, when it is being obtained) before the handshake continues.
//! A name with no certificate ends the handshake with an `unrecognized_name` alert, so
//! strangers never see a certificate for another name; a client that sends no name at all
//! (load balancers checking by IP, old clients) gets the default certificate the source
//! gives for the empty name, as in kamal-proxy. TLS 1.2 and 1.3 only; ALPN offers `h2` and
//! `http/1.1`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

/// Where the TLS listener gets certificates from.
pub trait CertificateSource: Send + Sync + 'static {
    /// The certificate for `server_name` (empty when the client sent none), or `None` to
    /// refuse the handshake.
    fn certificate_for<'a>(
        &'a self,
        server_name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<CertifiedKey>>> + Send + 'a>>;

    /// The certificate for `server_name` if there is one now, without waiting: for QUIC
    /// handshakes, which choose their certificate in place. A name whose certificate is still
    /// being obtained gets `None`; its client falls back to TCP, where the handshake waits.
    fn certificate_ready(&self, _server_name: &str) -> Option<Arc<CertifiedKey>> {
        None
    }

    /// The ACME TLS-ALPN-01 certificate for `server_name`, while such a challenge is open;
    /// shown only to a client that offers the `acme-tls/1` protocol (the ACME server).
    fn acme_challenge_certificate(&self, _server_name: &str) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// The ALPN protocol of ACME's TLS-ALPN-01 validation (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Longest time a client may take to complete a handshake (certificate wait included).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("no certificate for {0:?}")]
    UnknownServerName(String),
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("ACME TLS-ALPN-01 validation for {0:?} answered")]
    AcmeChallengeAnswered(String),
}

/// Completes a TLS handshake on `stream` with the certificate for its server name.
pub async fn accept(
    stream: TcpStream,
    certificates: &dyn CertificateSource,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
        let server_name = start
            .client_hello()
            .server_name()
            .unwrap_or_default()
            .to_string();
        let acme_validation = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|protocol| protocol == ACME_TLS_ALPN));
        if acme_validation {
            // The ACME server checks the certificate in the handshake and sends nothing more.
            return match certificates.acme_challenge_certificate(&server_name) {
                Some(certified) => {
                    let config = acme_challenge_config(certified);
                    let _ = start.into_stream(config).await?;
                    Err(HandshakeError::AcmeChallengeAnswered(server_name))
                }
                None => {
                    refuse_unrecognized_name(start).await;
                    Err(HandshakeError::UnknownServerName(server_name))
                }
            };
        }
        let order = SuiteOrder::for_client(start.client_hello().cipher_suites());
        match certificates.certificate_for(&server_name).await {
            Some(certified) => Ok(start.into_stream(server_config(certified, order)).await?),
            None => {
                refuse_unrecognized_name(start).await;
                Err(HandshakeError::UnknownServerName(server_name))
            }
        }
    })
    .await
    .map_err(|_| HandshakeError::Timeout)?
}

/// A fatal `unrecognized_name` alert (RFC 6066 §3), in the clear as alerts before the end of a
/// handshake are: the client learns why, and sees no certificate.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// Ends a handshake whose server name we have no certificate for. rustls itself would say
/// `access_denied`, so the alert is written on the socket directly.
async fn refuse_unrecognized_name(start: tokio_rustls::StartHandshake<TcpStream>) {
    use tokio::io::AsyncWriteExt;
    let mut refused = start.into_stream(refusing_config());
    if let Some(stream) = refused.get_mut() {
        let _ = stream.write_all(&UNRECOGNIZED_NAME_ALERT).await;
        let _ = stream.shutdown().await;
    }
}

/// The cryptography every server configuration (TCP and QUIC) is built on. Key exchange and
/// signatures by aws-lc: X25519MLKEM768 (the post-quantum hybrid), X25519, P-256 and P-384,
/// of which a client gets the first it lists (rustls follows the client's order). Browsers
/// list the hybrid first and kamal-proxy's Go server agrees it with them, so a host moved to
/// Berth keeps the key exchange its clients had; aws-lc also computes X25519, the largest
/// cost of a handshake, in half ring's time. The cipher suites (the record layer every
/// request goes through, and the key schedule) by ring: aws-lc's, reached through
/// aws-lc-rs, cost ~600 more instructions per keep-alive request.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::CryptoProvider {
        cipher_suites: rustls::crypto::ring::default_provider().cipher_suites,
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

/// A configuration that serves no certificate, only to take the ClientHello off our hands.
fn refusing_config() -> Arc<ServerConfig> {
    let provider = Arc::new(crypto_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Refuse));
    Arc::new(config)
}

#[derive(Debug)]
struct Refuse;

impl ResolvesServerCert for Refuse {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// The configuration answering a TLS-ALPN-01 validation: the challenge certificate, and
/// `acme-tls/1` as the only protocol.
fn acme_challenge_config(certified: Arc<CertifiedKey>) -> Arc<ServerConfig> {
    let provider = Arc::new(crypto_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Chosen(certified)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Arc::new(config)
}

/// What every server configuration shares, so that a client can resume a session whichever
/// certificate (and so configuration) served it, on any worker: TLS 1.3 session tickets
/// under keys that rotate and live only in memory, and a cache of TLS 1.2 sessions by ID.
struct Resumption {
    tickets: Arc<dyn rustls::server::ProducesTickets>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
}

static RESUMPTION: std::sync::LazyLock<Option<Resumption>> =
    std::sync::LazyLock::new(|| match crate::tickets::rotating() {
        Ok(tickets) => Some(Resumption {
            tickets,
            sessions: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
        }),
        Err(error) => {
            tracing::warn!(%error, "No TLS session tickets: every handshake will be a full one");
            None
        }
    });

/// TLS 1.2 sessions remembered for resumption by session ID (about 200 bytes each).
const SESSION_CACHE_ENTRIES: usize = 16 * 1024;

/// Which cipher suite the server picks among those a client offers. Like Go's TLS server
/// (and so kamal-proxy), AES-128-GCM comes first: its SHA-256 key schedule runs on the CPU's
/// SHA extensions, where SHA-384 (AES-256-GCM's, the first choice of OpenSSL-based clients)
/// has none, and hashing was a quarter of a resumed handshake's time. A client whose first
/// choice is ChaCha20-Poly1305 probably has no AES instructions, so it gets ChaCha20 (as in Go).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SuiteOrder {
    Aes128First,
    ChaChaFirst,
}

impl SuiteOrder {
    fn for_client(offered: &[rustls::CipherSuite]) -> Self {
        let first_known = offered.iter().find_map(|suite| bulk_cipher(*suite));
        match first_known {
            Some(BulkCipher::ChaCha20) => SuiteOrder::ChaChaFirst,
            _ => SuiteOrder::Aes128First,
        }
    }

    /// Where a bulk cipher ranks in this order (lower is chosen first).
    fn rank(self, cipher: BulkCipher) -> u8 {
        match (self, cipher) {
            (SuiteOrder::ChaChaFirst, BulkCipher::ChaCha20) => 0,
            (_, BulkCipher::Aes128Gcm) => 1,
            (_, BulkCipher::Aes256Gcm) => 2,
            (SuiteOrder::Aes128First, BulkCipher::ChaCha20) => 3,
        }
    }

    /// The cipher suites of `provider` in this order, TLS 1.3 ones before TLS 1.2 ones.
    fn arrange(self, provider: &mut rustls::crypto::CryptoProvider) {
        provider.cipher_suites.sort_by_key(|suite| {
            let tls12 = matches!(suite, rustls::SupportedCipherSuite::Tls12(_));
            let rank = bulk_cipher(suite.suite()).map_or(u8::MAX, |cipher| self.rank(cipher));
            (tls12, rank)
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BulkCipher {
    Aes128Gcm,
    Aes256Gcm,
    ChaCha20,
}

/// The bulk cipher of a suite we serve; `None` for the rest.
fn bulk_cipher(suite: rustls::CipherSuite) -> Option<BulkCipher> {
    use rustls::CipherSuite::*;
    match suite {
        TLS13_AES_128_GCM_SHA256
        | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(BulkCipher::Aes128Gcm),
        TLS13_AES_256_GCM_SHA384
        | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(BulkCipher::Aes256Gcm),
        TLS13_CHACHA20_POLY1305_SHA256
        | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(BulkCipher::ChaCha20),
        _ => None,
    }
}

/// The configuration of each certificate in use and suite order, made once: building one
/// per handshake cost allocations on every new connection. Keyed by the certificate's
/// address, with a weak reference so a replaced certificate's configuration goes when it does.
static CONFIGS: std::sync::LazyLock<std::sync::Mutex<Vec<CachedConfig>>> =
    std::sync::LazyLock::new(Default::default);

type CachedConfig = (std::sync::Weak<CertifiedKey>, SuiteOrder, Arc<ServerConfig>);

fn server_config(certified: Arc<CertifiedKey>, order: SuiteOrder) -> Arc<ServerConfig> {
    let mut configs = CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, config)) = configs.iter().find(|(key, cached_order, _)| {
        std::ptr::eq(key.as_ptr(), Arc::as_ptr(&certified)) && *cached_order == order
    }) {
        return Arc::clone(config);
    }
    configs.retain(|(key, _, _)| key.strong_count() > 0);
    let mut provider = crypto_provider();
    order.arrange(&mut provider);
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Chosen(Arc::clone(&certified))));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    share_resumption(&mut config);
    let config = Arc::new(config);
    configs.push((Arc::downgrade(&certified), order, Arc::clone(&config)));
    config
}

/// Lets clients resume sessions started under any configuration (TCP or QUIC).
pub(crate) fn share_resumption(config: &mut ServerConfig) {
    if let Some(resumption) = RESUMPTION.as_ref() {
        config.ticketer = Arc::clone(&resumption.tickets);
        config.session_storage = Arc::clone(&resumption.sessions);
        // One ticket per handshake, not rustls's two: each costs a key derivation and an
        // encryption on every new connection, and a client uses one to come back.
        config.send_tls13_tickets = 1;
    }
}

/// The certificate already chosen for this connection.
#[derive(Debug)]
struct Chosen(Arc<CertifiedKey>);

impl ResolvesServerCert for Chosen {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite::*;

    #[test]
    fn clients_that_put_an_aes_suite_first_get_aes_128_first() {
        let offered = [
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
        ];
        assert_eq!(SuiteOrder::for_client(&offered), SuiteOrder::Aes128First);
        assert_eq!(SuiteOrder::for_client(&[]), SuiteOrder::Aes128First);
    }

    #[test]
    fn a_client_that_puts_chacha20_first_gets_it() {
        // Suites we do not serve (here a GREASE-like unknown one) do not count.
        let offered = [
            rustls::CipherSuite::Unknown(0x0a0a),
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
        ];
        assert_eq!(SuiteOrder::for_client(&offered), SuiteOrder::ChaChaFirst);
    }

    #[test]
    fn every_suite_stays_and_tls13_comes_first() {
        let mut provider = crypto_provider();
        let before = provider.cipher_suites.len();
        SuiteOrder::Aes128First.arrange(&mut provider);
        let order: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(order.len(), before);
        assert_eq!(
            order[..3],
            [
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        assert_eq!(order[3], TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);

        SuiteOrder::ChaChaFirst.arrange(&mut provider);
        assert_eq!(
            provider.cipher_suites[0].suite(),
            TLS13_CHACHA20_POLY1305_SHA256
        );
    }
}
