//! `Certificates`: which hosts have which certificate, and the work of getting them.
//!
//! Each host served with automatic TLS has a task that loads its stored certificate, orders
//! one over ACME (HTTP-01, else TLS-ALPN-01) when none is stored or the stored one is due (a
//! third of its life left), sleeps until the next renewal, and retries failures with a growing backoff. A failed
//! order only affects its own host. Hosts with custom certificates are served from their files.
//!
//! With a shared store (`fleet`), the same task first looks there, orders only under the
//! fleet-wide lock, and stores what it orders for the other instances.

mod fleet;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeStatus, ChallengeType, Identifier, Key, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::certificate::{Certificate, CertificateError};
use crate::challenge::Challenges;
use crate::shared::{SharedStore, StoreStatus};
use crate::store::CertStore;

/// How long a TLS handshake may wait for a certificate that is being obtained.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(20);
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LONGEST_RETRY: Duration = Duration::from_secs(6 * 3600);
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// Run-wide ACME settings.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The directory URL new deploys use unless they ask for staging.
    pub directory: String,
    /// Extra root certificate (PEM) to trust when talking to the ACME server.
    pub ca_root: Option<PathBuf>,
    pub email: Option<String>,
    /// Where certificates are kept unless a service names another place.
    pub cache: PathBuf,
}

impl AcmeSettings {
    /// The run-wide directory as a service stores it (see [`crate::directory_key`]).
    pub fn directory_key(&self) -> &str {
        crate::directory_key(&self.directory)
    }
}

/// How a host gets its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    Acme {
        /// The directory key (`""` = Let's Encrypt production, else the directory URL).
        directory: String,
        cache: PathBuf,
    },
    Files {
        certificate: String,
        private_key: String,
    },
}

/// On-demand TLS: hosts not named by any service may get a certificate when `url` answers
/// 200 to `?host=<name>` within two seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDemand {
    /// An absolute URL, or a path asked of the proxy's own HTTP listener (and so routed to
    /// the on-demand service like any request for that host).
    pub url: String,
    pub directory: String,
    pub cache: PathBuf,
}

const ON_DEMAND_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type CheckClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// What the status view shows about a host's certificate.
#[derive(Debug, Clone)]
pub struct CertificateInfo {
    pub issuer: Option<String>,
    pub not_after: Option<SystemTime>,
    /// `valid`, `pending`, `failed: <reason>` or `custom`.
    pub state: String,
    /// With a shared store: the instance that ordered the certificate, and when.
    pub ordered_by: Option<String>,
    pub ordered_at: Option<SystemTime>,
}

#[derive(Debug, Clone)]
enum HostState {
    Pending,
    Valid,
    Failed(String),
}

struct Host {
    source: TlsSource,
    /// Admitted by the on-demand check rather than named by a service.
    on_demand: bool,
    certificate: Option<Arc<Certificate>>,
    /// Which instance ordered the certificate, and when (known from the shared store).
    origin: Option<(String, SystemTime)>,
    state: watch::Sender<HostState>,
    stop: CancellationToken,
}

pub struct Certificates {
    settings: AcmeSettings,
    challenges: Arc<Challenges>,
    hosts: RwLock<HashMap<String, Host>>,
    accounts: tokio::sync::Mutex<HashMap<String, Account>>,
    on_demand: RwLock<Option<OnDemand>>,
    /// Where a path-only on-demand URL is asked (the proxy's own HTTP listener).
    local_http: RwLock<Option<std::net::SocketAddr>>,
    check_client: Option<CheckClient>,
    /// The store several instances share, when there is one.
    shared: Option<Arc<SharedStore>>,
    /// The shared store's generation as last seen: moves when any instance stores one.
    generation: watch::Sender<u64>,
}

impl Certificates {
    pub fn new(settings: AcmeSettings) -> Arc<Self> {
        Self::with_shared_store(settings, None)
    }

    /// Certificates kept in `shared` (as well as in the local cache, which serves when the
    /// shared store cannot be reached). Must be called within a Tokio runtime when `shared`
    /// is given: it starts watching the store.
    pub fn with_shared_store(
        settings: AcmeSettings,
        shared: Option<Arc<SharedStore>>,
    ) -> Arc<Self> {
        let certificates = Arc::new(Self {
            settings,
            challenges: Arc::new(Challenges::default()),
            hosts: RwLock::new(HashMap::new()),
            accounts: tokio::sync::Mutex::new(HashMap::new()),
            on_demand: RwLock::new(None),
            local_http: RwLock::new(None),
            check_client: check_client(),
            shared,
            generation: watch::Sender::new(0),
        });
        if certificates.shared.is_some() {
            tokio::spawn(fleet::watch_store(Arc::downgrade(&certificates)));
        }
        certificates
    }

    /// The shared store's state, when one is in use.
    pub fn store_status(&self) -> Option<StoreStatus> {
        self.shared.as_ref().map(|shared| shared.status())
    }

    /// Tells where the proxy's HTTP listener is, for path-only on-demand URLs.
    pub fn set_local_http(&self, address: std::net::SocketAddr) {
        *self.local_http.write().unwrap_or_else(|e| e.into_inner()) = Some(address);
    }

    pub fn settings(&self) -> &AcmeSettings {
        &self.settings
    }

    /// The answer to an HTTP-01 challenge request path, if it is one: ours, or (with a shared
    /// store) one another instance's order is waiting on.
    pub async fn challenge_answer(&self, path: &str) -> Option<String> {
        if let Some(answer) = self.challenges.answer(path) {
            return Some(answer);
        }
        let token = path.strip_prefix(crate::CHALLENGE_PATH_PREFIX)?;
        let valid_token = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_token {
            return None;
        }
        self.shared.as_ref()?.challenge(token).await.ok().flatten()
    }

    /// Checks custom certificate files before a deploy accepts them.
    pub fn check_files(certificate: &str, private_key: &str) -> Result<(), CertificateError> {
        Certificate::from_files(certificate, private_key).map(|_| ())
    }

    /// Makes `wanted` the set of TLS hosts: new ones start getting certificates, ones no
    /// longer wanted are dropped, changed sources are restarted.
    pub fn sync(self: &Arc<Self>, wanted: HashMap<String, TlsSource>, on_demand: Option<OnDemand>) {
        let policy_kept = {
            let mut current = self.on_demand.write().unwrap_or_else(|e| e.into_inner());
            let kept = *current == on_demand;
            *current = on_demand;
            kept
        };
        let mut hosts = self.write_hosts();
        hosts.retain(|name, host| {
            let keep = wanted.get(name) == Some(&host.source)
                || (host.on_demand && policy_kept && !wanted.contains_key(name));
            if !keep {
                host.stop.cancel();
            }
            keep
        });
        for (name, source) in wanted {
            self.admit(&mut hosts, name, source, false);
        }
    }

    /// Starts serving `name` from `source` unless it is already served.
    fn admit(
        self: &Arc<Self>,
        hosts: &mut HashMap<String, Host>,
        name: String,
        source: TlsSource,
        on_demand: bool,
    ) {
        {
            if hosts.contains_key(&name) {
                return;
            }
            let stop = CancellationToken::new();
            let (certificate, state) = match &source {
                TlsSource::Files {
                    certificate,
                    private_key,
                } => match Certificate::from_files(certificate, private_key) {
                    Ok(loaded) => (Some(Arc::new(loaded)), HostState::Valid),
                    Err(error) => {
                        tracing::error!(host = %name, %error, "Custom certificate unusable");
                        (None, HostState::Failed(error.to_string()))
                    }
                },
                TlsSource::Acme { directory, cache } => {
                    let stored = CertStore::new(cache, directory).load(&name).map(Arc::new);
                    let state = if stored.is_some() {
                        HostState::Valid
                    } else {
                        HostState::Pending
                    };
                    let this = Arc::clone(self);
                    let (task_name, task_directory, task_cache) =
                        (name.clone(), directory.clone(), cache.clone());
                    let task_stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = task_stop.cancelled() => {}
                            _ = this.keep_certified(&task_name, &task_directory, &task_cache) => {}
                        }
                    });
                    (stored, state)
                }
            };
            hosts.insert(
                name,
                Host {
                    source,
                    on_demand,
                    certificate,
                    origin: None,
                    state: watch::Sender::new(state),
                    stop,
                },
            );
        }
    }

    /// The certificate for `server_name` if one is ready now: for handshakes that cannot wait
    /// (QUIC's, which resolve the certificate in place).
    pub fn certificate_ready(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        let hosts = self.read_hosts();
        let certificate = hosts.get(&name)?.certificate.as_ref()?;
        Some(Arc::clone(&certificate.certified))
    }

    /// The certificate to present for `server_name`. Waits (bounded) while a first one is
    /// being obtained; `None` for hosts we do not serve with TLS or whose order failed, so the
    /// handshake fails at once.
    pub async fn certificate_for(self: &Arc<Self>, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        if !self.read_hosts().contains_key(&name) {
            self.admit_on_demand(&name).await?;
        }
        let mut changes = {
            let hosts = self.read_hosts();
            let host = hosts.get(&name)?;
            if let Some(certificate) = &host.certificate {
                return Some(Arc::clone(&certificate.certified));
            }
            host.state.subscribe()
        };
        let waited = tokio::time::timeout(
            HANDSHAKE_WAIT,
            changes.wait_for(|s| !matches!(s, HostState::Pending)),
        )
        .await;
        if waited.is_err() {
            tracing::warn!(host = %name, "No certificate in time for a TLS handshake");
        }
        let hosts = self.read_hosts();
        hosts
            .get(&name)?
            .certificate
            .as_ref()
            .map(|c| Arc::clone(&c.certified))
    }

    /// Asks the on-demand URL whether `name` may have a certificate; admits it if so.
    async fn admit_on_demand(self: &Arc<Self>, name: &str) -> Option<()> {
        let policy = self
            .on_demand
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let plausible = !name.is_empty()
            && name.len() <= 253
            && name.contains('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !plausible {
            return None;
        }
        let allowed = self.on_demand_allows(&policy.url, name).await;
        tracing::info!(host = name, allowed, "On-demand TLS check");
        if !allowed {
            return None;
        }
        let source = TlsSource::Acme {
            directory: policy.directory,
            cache: policy.cache,
        };
        let mut hosts = self.write_hosts();
        self.admit(&mut hosts, name.to_string(), source, true);
        Some(())
    }

    async fn on_demand_allows(&self, url: &str, host: &str) -> bool {
        let Some(client) = &self.check_client else {
            return false;
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        let (target, host_header) = if url.starts_with('/') {
            let Some(local) = *self.local_http.read().unwrap_or_else(|e| e.into_inner()) else {
                return false;
            };
            (
                format!("http://{local}{url}{separator}host={host}"),
                Some(host),
            )
        } else {
            (format!("{url}{separator}host={host}"), None)
        };
        let Ok(uri) = target.parse::<hyper::Uri>() else {
            tracing::warn!(url, "Invalid on-demand TLS URL");
            return false;
        };
        let mut request = hyper::Request::get(uri);
        if let Some(host_header) = host_header {
            request = request.header(hyper::header::HOST, host_header);
        }
        let Ok(request) = request.body(http_body_util::Empty::new()) else {
            return false;
        };
        match tokio::time::timeout(ON_DEMAND_CHECK_TIMEOUT, client.request(request)).await {
            Ok(Ok(response)) => response.status() == hyper::StatusCode::OK,
            Ok(Err(error)) => {
                tracing::warn!(url, %error, "On-demand TLS check failed");
                false
            }
            Err(_) => {
                tracing::warn!(url, "On-demand TLS check timed out");
                false
            }
        }
    }

    pub fn info(&self, host: &str) -> Option<CertificateInfo> {
        let hosts = self.read_hosts();
        let entry = hosts.get(host)?;
        let state = match (&*entry.state.borrow(), &entry.source) {
            (HostState::Valid, TlsSource::Files { .. }) => "custom".to_string(),
            (HostState::Valid, _) => "valid".to_string(),
            (HostState::Pending, _) => "pending".to_string(),
            (HostState::Failed(reason), _) => format!("failed: {reason}"),
        };
        Some(CertificateInfo {
            issuer: entry.certificate.as_ref().map(|c| c.issuer.clone()),
            not_after: entry.certificate.as_ref().map(|c| c.not_after),
            state,
            ordered_by: entry.origin.as_ref().map(|(by, _)| by.clone()),
            ordered_at: entry.origin.as_ref().map(|(_, at)| *at),
        })
    }

    /// The per-host loop: obtain when missing or due, then sleep until due; back off on failure.
    async fn keep_certified(&self, host: &str, directory: &str, cache: &Path) {
        let store = CertStore::new(cache, directory);
        if let Some(shared) = &self.shared {
            return self
                .keep_certified_in_fleet(shared, host, directory, &store)
                .await;
        }
        let mut retry_in = FIRST_RETRY;
        loop {
            let current = self
                .read_hosts()
                .get(host)
                .and_then(|h| h.certificate.clone());
            if let Some(certificate) = current.filter(|c| !c.is_due_for_renewal()) {
                let wait = certificate
                    .renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::debug!(
                    host,
                    renew_in_secs = wait.as_secs(),
                    "Certificate valid; renewal scheduled"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            tracing::info!(
                host,
                directory = crate::directory_url(directory),
                "Requesting certificate"
            );
            match self.order(host, directory, &store).await {
                Ok(certificate) => {
                    retry_in = FIRST_RETRY;
                    if let Err(error) = store.save(host, &certificate) {
                        tracing::error!(host, %error, "Certificate obtained but not stored; it will be ordered again after a restart");
                    }
                    tracing::info!(host, issuer = %certificate.issuer, not_after = %humantime::format_rfc3339_seconds(certificate.not_after), "Certificate obtained");
                    self.publish(host, Ok(Arc::new(certificate)));
                }
                Err(reason) => {
                    tracing::error!(host, error = %reason, retry_in_secs = retry_in.as_secs(), "Certificate order failed");
                    self.publish(host, Err(reason));
                    tokio::time::sleep(retry_in).await;
                    retry_in = (retry_in * 2).min(LONGEST_RETRY);
                }
            }
        }
    }

    fn publish(&self, host: &str, outcome: Result<Arc<Certificate>, String>) {
        self.publish_from(host, outcome, None)
    }

    /// Like `publish`, noting which instance ordered the certificate and when.
    fn publish_from(
        &self,
        host: &str,
        outcome: Result<Arc<Certificate>, String>,
        origin: Option<(String, SystemTime)>,
    ) {
        let mut hosts = self.write_hosts();
        let Some(entry) = hosts.get_mut(host) else {
            return;
        };
        match outcome {
            Ok(certificate) => {
                entry.certificate = Some(certificate);
                entry.origin = origin;
                entry.state.send_replace(HostState::Valid);
            }
            // A failed renewal keeps serving the certificate we still have.
            Err(reason) if entry.certificate.is_none() => {
                entry.state.send_replace(HostState::Failed(reason));
            }
            Err(_) => {}
        }
    }

    /// One certificate for `host`: ordered with HTTP-01 on the HTTP port (which works behind
    /// CDNs), and if that cannot complete (port 80 closed or not reaching us), ordered again
    /// with TLS-ALPN-01 on the HTTPS port, as kamal-proxy does.
    async fn order(
        &self,
        host: &str,
        directory: &str,
        store: &CertStore,
    ) -> Result<Certificate, String> {
        let account = self
            .account(directory, store)
            .await
            .map_err(|e| format!("ACME account: {e}"))?;
        let http = match self.order_with(&account, host, ChallengeType::Http01).await {
            Ok(certificate) => return Ok(certificate),
            Err(reason) => reason,
        };
        tracing::warn!(host, reason = %http, "HTTP-01 could not complete; trying TLS-ALPN-01");
        self.order_with(&account, host, ChallengeType::TlsAlpn01)
            .await
            .map_err(|tls| format!("HTTP-01: {http}; TLS-ALPN-01: {tls}"))
    }

    /// One ACME order for `host`, answered with `kind`.
    async fn order_with(
        &self,
        account: &Account,
        host: &str,
        kind: ChallengeType,
    ) -> Result<Certificate, String> {
        let identifiers = [Identifier::Dns(host.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| format!("new order: {}", describe(&e)))?;

        let mut tokens = Vec::new();
        let mut alpn_hosts = Vec::new();
        let answered = async {
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization =
                    authorization.map_err(|e| format!("authorization: {}", describe(&e)))?;
                if authorization.status == AuthorizationStatus::Valid {
                    continue;
                }
                let mut challenge = authorization
                    .challenge(kind.clone())
                    .ok_or_else(|| format!("the ACME server offered no {kind:?} challenge"))?;
                let key_authorization = challenge.key_authorization();
                if kind == ChallengeType::TlsAlpn01 {
                    self.challenges
                        .add_tls_alpn(host, key_authorization.digest().as_ref())?;
                    alpn_hosts.push(host.to_string());
                } else {
                    self.challenges
                        .add(&challenge.token, key_authorization.as_str());
                    tokens.push(challenge.token.clone());
                    if let Some(shared) = &self.shared {
                        // The ACME server's request may reach any instance.
                        shared
                            .put_challenge(&challenge.token, key_authorization.as_str())
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                // Already being validated: another instance of a shared store asked for it
                // and died before the order finished; the answer is still being served.
                if challenge.status != ChallengeStatus::Processing {
                    challenge
                        .set_ready()
                        .await
                        .map_err(|e| format!("challenge: {}", describe(&e)))?;
                }
            }
            let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
            match order
                .poll_ready(&retries)
                .await
                .map_err(|e| format!("validation: {}", describe(&e)))?
            {
                OrderStatus::Ready => {}
                status => {
                    return Err(format!(
                        "order {status:?}: {}",
                        challenge_failure(&mut order).await
                    ))
                }
            }
            let key_pem = order
                .finalize()
                .await
                .map_err(|e| format!("finalize: {}", describe(&e)))?;
            let chain_pem = order
                .poll_certificate(&retries)
                .await
                .map_err(|e| format!("certificate: {}", describe(&e)))?;
            Certificate::from_pem(&chain_pem, &key_pem)
                .map_err(|e| format!("issued certificate unusable: {e}"))
        }
        .await;
        for token in tokens {
            self.challenges.remove(&token);
            if let Some(shared) = &self.shared {
                let _ = shared.remove_challenge(&token).await;
            }
        }
        for host in alpn_hosts {
            self.challenges.remove_tls_alpn(&host);
        }
        answered
    }

    /// The TLS-ALPN-01 certificate to show a client asking for `acme-tls/1` for
    /// `server_name`, while such a challenge is open.
    pub fn tls_alpn_certificate(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        self.challenges.tls_alpn_certificate(&name)
    }

    /// The ACME account for `directory` (a directory key): the one whose key the store
    /// holds (kamal-proxy's, after a swap), else a new one whose key is stored.
    async fn account(&self, directory: &str, store: &CertStore) -> Result<Account, String> {
        let mut accounts = self.accounts.lock().await;
        if let Some(account) = accounts.get(directory) {
            return Ok(account.clone());
        }
        let builder = || match &self.settings.ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let url = crate::directory_url(directory).to_string();
        let stored_key = match &self.shared {
            Some(shared) => match shared.account_key(directory).await {
                Ok(Some(der)) => Some(rustls::pki_types::PrivatePkcs8KeyDer::from(der)),
                // Adopted from the local cache (kamal-proxy's, after a swap) and offered.
                Ok(None) => match store.load_account_key() {
                    Some(local) => Some(rustls::pki_types::PrivatePkcs8KeyDer::from(
                        shared
                            .offer_account_key(directory, local.secret_pkcs8_der())
                            .await
                            .map_err(|e| e.to_string())?,
                    )),
                    None => None,
                },
                Err(error) => return Err(error.to_string()),
            },
            None => store.load_account_key(),
        };
        let account = match stored_key {
            Some(pkcs8) => {
                let key = Key::from_pkcs8_der(pkcs8.clone_key()).map_err(|e| describe(&e))?;
                // Finds the account registered with this key, or registers one.
                let (account, _) = builder()
                    .map_err(|e| describe(&e))?
                    .create_from_key((key, PrivateKeyDer::Pkcs8(pkcs8)), url)
                    .await
                    .map_err(|e| describe(&e))?;
                account
            }
            None => {
                let contact = self
                    .settings
                    .email
                    .as_ref()
                    .map(|email| format!("mailto:{email}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (account, credentials) = builder()
                    .map_err(|e| describe(&e))?
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        url,
                        None,
                    )
                    .await
                    .map_err(|e| describe(&e))?;
                store
                    .save_account_key(credentials.private_key())
                    .map_err(|e| format!("cannot store account key: {e}"))?;
                tracing::info!(directory, "ACME account created");
                match &self.shared {
                    Some(shared) => {
                        let ours = credentials.private_key().secret_pkcs8_der().to_vec();
                        let chosen = shared
                            .offer_account_key(directory, &ours)
                            .await
                            .map_err(|e| e.to_string())?;
                        if chosen == ours {
                            account
                        } else {
                            // Another instance stored its account first: use that one.
                            let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(chosen);
                            let key =
                                Key::from_pkcs8_der(pkcs8.clone_key()).map_err(|e| describe(&e))?;
                            builder()
                                .map_err(|e| describe(&e))?
                                .create_from_key(
                                    (key, PrivateKeyDer::Pkcs8(pkcs8)),
                                    crate::directory_url(directory).to_string(),
                                )
                                .await
                                .map_err(|e| describe(&e))?
                                .0
                        }
                    }
                    None => account,
                }
            }
        };
        accounts.insert(directory.to_string(), account.clone());
        Ok(account)
    }

    fn read_hosts(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Host>> {
        self.hosts.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_hosts(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Host>> {
        self.hosts.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn check_client() -> Option<CheckClient> {
    let connector = match hyper_rustls::HttpsConnectorBuilder::new().try_with_platform_verifier() {
        Ok(builder) => builder.https_or_http().enable_http1().build(),
        Err(error) => {
            tracing::warn!(%error, "No TLS roots for on-demand TLS checks; only path URLs will work");
            return None;
        }
    };
    Some(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

/// The ACME server's problem detail when it gave one.
fn describe(error: &instant_acme::Error) -> String {
    match error {
        instant_acme::Error::Api(problem) => {
            let mut text = problem
                .detail
                .clone()
                .unwrap_or_else(|| problem.to_string());
            if let Some(kind) = &problem.r#type {
                text = format!("{text} ({kind})");
            }
            text
        }
        other => other.to_string(),
    }
}

/// Why an order's challenge failed, from its authorizations.
async fn challenge_failure(order: &mut instant_acme::Order) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if let Ok(state) = authorization.refresh().await {
            for challenge in &state.challenges {
                if let Some(problem) = &challenge.error {
                    return problem
                        .detail
                        .clone()
                        .unwrap_or_else(|| problem.to_string());
                }
            }
        }
    }
    "no reason given".to_string()
}
