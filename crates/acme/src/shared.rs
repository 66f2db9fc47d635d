//! The certificate store several proxies share, in Redis: what lets a fleet behind one load
//! balancer order each certificate once and answer any ACME challenge on any instance.
//!
//! What lives there (every key under `berth:`):
//! - `cert:<directory>:<host>`: the chain, the private key sealed with the store key, which
//!   instance ordered it and when. One value, written with one `SET`, so no reader ever sees
//!   half a certificate.
//! - `account:<directory>`: the ACME account key, sealed; the first instance to create an
//!   account wins (`SET NX`), the others use it.
//! - `challenge:<token>`: HTTP-01 answers while an order is open, for whichever instance the
//!   ACME server's request reaches.
//! - `lock:<directory>:<host>`: the order lock (`SET NX PX`), held and extended by the
//!   instance ordering, freed by it or by expiry when it dies.
//! - `generation`: bumped on every certificate written. Each instance polls it every second
//!   and re-reads its certificates when it moves, so a new or renewed certificate is served
//!   fleet-wide within about a second, without a restart.
//! - `keycheck`: a value sealed with the store key, so a wrong key is found at start.
//!
//! Private keys are sealed with AES-256-GCM under the store key every instance is given, with
//! the entry's name as associated data (an entry copied under another name does not open). A
//! key that does not open an entry is [`StoreError::WrongKey`]: never a reason to order again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::certificate::Certificate;

/// How long one store operation may take before it counts as the store being unreachable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an order lock lives unless its holder extends it.
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(10);
/// How long a challenge answer stays in the store (an order times out well before).
const CHALLENGE_TTL: Duration = Duration::from_secs(15 * 60);

const PREFIX: &str = "berth:";
const KEYCHECK_PLAINTEXT: &[u8] = b"berth shared certificate store";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the shared certificate store is unreachable: {0}")]
    Unreachable(String),
    #[error(
        "{what} in the shared certificate store cannot be decrypted: the store key is not the one it was written with"
    )]
    WrongKey { what: String },
    #[error("{what} in the shared certificate store is unusable: {reason}")]
    Corrupt { what: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreSetupError {
    #[error("invalid certificate store URL: {0}")]
    Url(String),
    #[error("the certificate store key must be 32 bytes, as 64 hex digits or base64; {0}")]
    Key(String),
    #[error("a shared certificate store needs a store key (--cert-store-key-file or KAMAL_PROXY_CERT_STORE_KEY)")]
    MissingKey,
}

/// The store key, which seals private keys at rest. Shared, not copied: aws-lc's keys cannot
/// be cloned.
#[derive(Clone)]
pub struct StoreKey(std::sync::Arc<LessSafeKey>);

impl StoreKey {
    /// Reads a key written as 64 hex digits or as base64 of 32 bytes (surrounding space
    /// ignored, so a key file may end with a newline).
    pub fn parse(text: &str) -> Result<Self, StoreSetupError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| StoreSetupError::Key(e.to_string()))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| StoreSetupError::Key(format!("not hex, and not base64 ({e})")))?
        };
        if bytes.len() != 32 {
            return Err(StoreSetupError::Key(format!("got {} bytes", bytes.len())));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| StoreSetupError::Key("rejected by AES-256-GCM".into()))?;
        Ok(Self(std::sync::Arc::new(LessSafeKey::new(key))))
    }

    /// `nonce ‖ ciphertext ‖ tag`, base64.
    fn seal(&self, name: &str, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        // The system's random source failing is not something to carry on through.
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut sealed = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .expect("AES-GCM seals any length we store");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, StoreError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed.trim())
            .map_err(|e| StoreError::Corrupt {
                what: name.to_string(),
                reason: e.to_string(),
            })?;
        if bytes.len() < NONCE_LEN {
            return Err(StoreError::Corrupt {
                what: name.to_string(),
                reason: "too short".into(),
            });
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| StoreError::Corrupt {
            what: name.to_string(),
            reason: "bad nonce".into(),
        })?;
        let mut buffer = sealed.to_vec();
        let opened = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buffer)
            .map_err(|_| StoreError::WrongKey {
                what: name.to_string(),
            })?;
        Ok(opened.to_vec())
    }
}

/// A certificate as the shared store holds it.
#[derive(Serialize, Deserialize)]
struct StoredCertificate {
    chain: String,
    /// The private key (PEM), sealed.
    key: String,
    ordered_by: String,
    /// Unix seconds.
    ordered_at: u64,
}

/// A certificate read from the shared store, with where it came from.
pub struct SharedCertificate {
    pub certificate: Certificate,
    pub ordered_by: String,
    pub ordered_at: SystemTime,
}

/// A connection to the shared store and what this instance knows about it.
pub struct SharedStore {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    key: StoreKey,
    /// The URL without its password, for logs and status.
    location: String,
    instance: String,
    reachable: AtomicBool,
    /// Whether the store key has been found to open the store's check value.
    key_confirmed: AtomicBool,
    last_error: Mutex<Option<String>>,
    errors: AtomicU64,
    lock_waits: AtomicU64,
}

/// What `proxy status` shows about the store.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub location: String,
    pub instance: String,
    pub reachable: bool,
    pub last_error: Option<String>,
    pub errors: u64,
    pub lock_waits: u64,
}

impl SharedStore {
    /// A store at `url` (`redis://` or `rediss://`, with an optional password), sealing keys
    /// with `key`, writing `instance` as the name of certificates this process orders. Does
    /// not connect: the store may be down when the proxy starts.
    pub fn new(url: &str, key: StoreKey, instance: String) -> Result<Self, StoreSetupError> {
        let client = redis::Client::open(url).map_err(|e| StoreSetupError::Url(e.to_string()))?;
        Ok(Self {
            client,
            connection: tokio::sync::Mutex::new(None),
            key,
            location: without_password(url),
            instance,
            reachable: AtomicBool::new(false),
            key_confirmed: AtomicBool::new(false),
            last_error: Mutex::new(None),
            errors: AtomicU64::new(0),
            lock_waits: AtomicU64::new(0),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn status(&self) -> StoreStatus {
        StoreStatus {
            location: self.location.clone(),
            instance: self.instance.clone(),
            reachable: self.reachable.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            errors: self.errors.load(Ordering::Relaxed),
            lock_waits: self.lock_waits.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_lock_wait(&self) {
        self.lock_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs one operation on the connection (made first if need be), bounded in time; notes
    /// whether the store answered.
    async fn with_connection<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let outcome = tokio::time::timeout(OPERATION_TIMEOUT, async {
            let connection = self.connection().await?;
            operation(connection).await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()));
        self.note(outcome.as_ref().err());
        outcome.map_err(StoreError::Unreachable)
    }

    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        self.with_connection(|mut connection| async move {
            command.query_async::<T>(&mut connection).await
        })
        .await
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        self.with_connection(|mut connection| async move {
            invocation.invoke_async::<T>(&mut connection).await
        })
        .await
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, String> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OPERATION_TIMEOUT))
            .set_response_timeout(Some(OPERATION_TIMEOUT))
            .set_number_of_retries(1);
        let connection =
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config)
                .await
                .map_err(|e| e.to_string())?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Records the outcome of an operation; logs a change between reachable and not loudly.
    fn note(&self, error: Option<&String>) {
        match error {
            None => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(store = %self.location, "Shared certificate store reachable");
                }
            }
            Some(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.clone());
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::error!(store = %self.location, %error, "Shared certificate store unreachable; serving the certificates last seen, orders wait");
                }
            }
        }
    }

    /// Checks the store key against the store (once it has passed, without asking again),
    /// writing the check value if there is none. Nothing is ordered until it passes: a
    /// certificate stored under the wrong key would be of no use to the other instances.
    pub async fn check_key(&self) -> Result<(), StoreError> {
        if self.key_confirmed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let outcome = self.check_key_now().await;
        if let Err(StoreError::WrongKey { .. }) = &outcome {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                outcome.as_ref().err().map(|e| e.to_string());
        }
        if outcome.is_ok() {
            self.key_confirmed.store(true, Ordering::Relaxed);
        }
        outcome
    }

    async fn check_key_now(&self) -> Result<(), StoreError> {
        let name = format!("{PREFIX}keycheck");
        match self.put_sealed_if_absent(&name, KEYCHECK_PLAINTEXT).await {
            Ok(None) => Ok(()),
            Ok(Some(plain)) if plain == KEYCHECK_PLAINTEXT => Ok(()),
            Ok(Some(_)) | Err(StoreError::WrongKey { .. }) => Err(StoreError::WrongKey {
                what: "the key check value".into(),
            }),
            Err(other) => Err(other),
        }
    }

    /// Stores `plaintext` sealed under `name` unless a value is there already (one `SET NX
    /// GET`, so two instances cannot both win); returns that earlier value, opened.
    async fn put_sealed_if_absent(
        &self,
        name: &str,
        plaintext: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let sealed = self.key.seal(name, plaintext);
        let existing: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(name)
                    .arg(&sealed)
                    .arg("NX")
                    .arg("GET"),
            )
            .await?;
        existing
            .map(|existing| self.key.open(name, &existing))
            .transpose()
    }

    /// The certificate for `host` under ACME `directory`, if the store has one.
    pub async fn certificate(
        &self,
        directory: &str,
        host: &str,
    ) -> Result<Option<SharedCertificate>, StoreError> {
        let name = certificate_key(directory, host);
        let Some(json): Option<String> = self.query(redis::cmd("GET").arg(&name)).await? else {
            return Ok(None);
        };
        let what = format!("the certificate of {host}");
        let stored: StoredCertificate =
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                what: what.clone(),
                reason: e.to_string(),
            })?;
        let key_pem = self.key.open(&name, &stored.key).map_err(|e| match e {
            StoreError::WrongKey { .. } => StoreError::WrongKey {
                what: format!("the private key of {host}"),
            },
            other => other,
        })?;
        let key_pem = String::from_utf8(key_pem).map_err(|e| StoreError::Corrupt {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        let certificate =
            Certificate::from_pem(&stored.chain, &key_pem).map_err(|e| StoreError::Corrupt {
                what,
                reason: e.to_string(),
            })?;
        Ok(Some(SharedCertificate {
            certificate,
            ordered_by: stored.ordered_by,
            ordered_at: UNIX_EPOCH + Duration::from_secs(stored.ordered_at),
        }))
    }

    /// Stores `certificate` for `host` as ordered by this instance now, and tells the others.
    pub async fn put_certificate(
        &self,
        directory: &str,
        host: &str,
        certificate: &Certificate,
    ) -> Result<SystemTime, StoreError> {
        let name = certificate_key(directory, host);
        let now = SystemTime::now();
        let stored = StoredCertificate {
            chain: certificate.chain_pem.clone(),
            key: self.key.seal(&name, certificate.key_pem.as_bytes()),
            ordered_by: self.instance.clone(),
            ordered_at: now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
        };
        let json = serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt {
            what: format!("the certificate of {host}"),
            reason: e.to_string(),
        })?;
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .cmd("SET")
            .arg(&name)
            .arg(json)
            .ignore()
            .cmd("INCR")
            .arg(format!("{PREFIX}generation"))
            .ignore();
        self.with_connection(|mut connection| async move {
            pipeline.query_async::<()>(&mut connection).await
        })
        .await?;
        Ok(now)
    }

    /// The generation counter: it moves whenever any instance stores a certificate.
    pub async fn generation(&self) -> Result<u64, StoreError> {
        let value: Option<u64> = self
            .query(redis::cmd("GET").arg(format!("{PREFIX}generation")))
            .await?;
        Ok(value.unwrap_or(0))
    }

    /// The sealed ACME account key (PKCS#8 DER) for `directory`, if one is stored.
    pub async fn account_key(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = account_key_name(directory);
        let sealed: Option<String> = self.query(redis::cmd("GET").arg(&name)).await?;
        match sealed {
            None => Ok(None),
            Some(sealed) => self
                .key
                .open(&name, &sealed)
                .map(Some)
                .map_err(|e| match e {
                    StoreError::WrongKey { .. } => StoreError::WrongKey {
                        what: "the ACME account key".into(),
                    },
                    other => other,
                }),
        }
    }

    /// Stores `key` as the account key for `directory` unless another instance stored one
    /// first; returns the key to use (ours, or theirs).
    pub async fn offer_account_key(
        &self,
        directory: &str,
        key: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let existing = self
            .put_sealed_if_absent(&account_key_name(directory), key)
            .await?;
        Ok(existing.unwrap_or_else(|| key.to_vec()))
    }

    /// Publishes an HTTP-01 answer for any instance to serve.
    pub async fn put_challenge(&self, token: &str, answer: &str) -> Result<(), StoreError> {
        self.query::<()>(
            redis::cmd("SET")
                .arg(challenge_key(token))
                .arg(answer)
                .arg("PX")
                .arg(CHALLENGE_TTL.as_millis() as u64),
        )
        .await
    }

    pub async fn challenge(&self, token: &str) -> Result<Option<String>, StoreError> {
        self.query(redis::cmd("GET").arg(challenge_key(token)))
            .await
    }

    pub async fn remove_challenge(&self, token: &str) -> Result<(), StoreError> {
        self.query::<()>(redis::cmd("DEL").arg(challenge_key(token)))
            .await
    }

    /// Takes the order lock for `host`, if no other instance holds it. The returned token
    /// names this holding; pass it to [`SharedStore::extend_lock`] and
    /// [`SharedStore::release_lock`].
    pub async fn try_lock(
        &self,
        directory: &str,
        host: &str,
    ) -> Result<Option<String>, StoreError> {
        let token = format!("{}/{}", self.instance, uuid_like());
        let taken: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(lock_key(directory, host))
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64),
            )
            .await?;
        Ok(taken.map(|_| token))
    }

    /// Extends a lock this instance holds; `false` if it is no longer ours.
    pub async fn extend_lock(
        &self,
        directory: &str,
        host: &str,
        token: &str,
    ) -> Result<bool, StoreError> {
        static EXTEND: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                   return redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
                 else return 0 end",
            )
        });
        let ttl = LOCK_TTL.as_millis().to_string();
        let extended: i64 = self
            .invoke(&EXTEND, &[&lock_key(directory, host)], &[token, &ttl])
            .await?;
        Ok(extended == 1)
    }

    /// Frees a lock this instance holds (and only then).
    pub async fn release_lock(
        &self,
        directory: &str,
        host: &str,
        token: &str,
    ) -> Result<(), StoreError> {
        static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                   return redis.call('DEL', KEYS[1]) \
                 else return 0 end",
            )
        });
        self.invoke::<i64>(&RELEASE, &[&lock_key(directory, host)], &[token])
            .await
            .map(|_| ())
    }
}

/// A short name for an ACME directory in keys: the start of its hash, as the cache's folder
/// is named.
fn directory_id(directory: &str) -> String {
    let mut hash = crate::directory_hash(directory);
    hash.truncate(16);
    hash
}

fn certificate_key(directory: &str, host: &str) -> String {
    format!("{PREFIX}cert:{}:{host}", directory_id(directory))
}

fn account_key_name(directory: &str) -> String {
    format!("{PREFIX}account:{}", directory_id(directory))
}

fn challenge_key(token: &str) -> String {
    format!("{PREFIX}challenge:{token}")
}

fn lock_key(directory: &str, host: &str) -> String {
    format!("{PREFIX}lock:{}:{host}", directory_id(directory))
}

/// 128 random bits as hex: tells one holding of a lock from another.
fn uuid_like() -> String {
    let mut bytes = [0u8; 16];
    let _ = SystemRandom::new().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `redis://:secret@host:6379/0` → `redis://host:6379/0`, for logs.
fn without_password(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> StoreKey {
        StoreKey::parse(&format!("{byte:02x}").repeat(32)).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_with_its_key_and_name_only() {
        let sealed = key(1).seal("berth:cert:x:a.example", b"secret");
        assert_eq!(
            key(1).open("berth:cert:x:a.example", &sealed).unwrap(),
            b"secret"
        );
        assert!(matches!(
            key(2).open("berth:cert:x:a.example", &sealed),
            Err(StoreError::WrongKey { .. })
        ));
        assert!(matches!(
            key(1).open("berth:cert:x:b.example", &sealed),
            Err(StoreError::WrongKey { .. })
        ));
    }

    #[test]
    fn store_keys_are_read_as_hex_or_base64_of_32_bytes() {
        assert!(StoreKey::parse(&"ab".repeat(32)).is_ok());
        assert!(StoreKey::parse(&format!("{}\n", "ab".repeat(32))).is_ok());
        let base64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(StoreKey::parse(&base64).is_ok());
        assert!(StoreKey::parse("short").is_err());
        let sixteen = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert!(StoreKey::parse(&sixteen).is_err());
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            without_password("redis://:hunter2@10.0.0.9:6379/0"),
            "redis://10.0.0.9:6379/0"
        );
        assert_eq!(
            without_password("rediss://user:pw@redis.example:6380"),
            "rediss://redis.example:6380"
        );
        assert_eq!(
            without_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
