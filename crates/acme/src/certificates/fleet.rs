//! The per-host certificate loop when several instances share one store: adopt what the
//! store has, order only under the fleet-wide lock, store what was ordered, and follow the
//! store's generation so a certificate another instance ordered is served here within a
//! second or so.
//!
//! The store going away never takes a certificate away: the last one seen stays in memory
//! and in the local cache, and orders wait until the store is back. A store entry this
//! instance cannot decrypt (a wrong store key) or read is reported, never ordered over.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{Certificates, FIRST_RETRY, LONGEST_RETRY};
use crate::certificate::Certificate;
use crate::shared::{SharedStore, StoreError, LOCK_TTL};
use crate::store::CertStore;

/// How often each instance asks the store whether any certificate changed.
const GENERATION_POLL: Duration = Duration::from_secs(1);
/// How soon a host's loop tries the store again when it could not be reached.
const STORE_RETRY: Duration = Duration::from_secs(2);
/// How often a host waiting for another instance's order looks again (besides the
/// generation, which moves as soon as that order is stored).
const LOCK_WAIT_POLL: Duration = Duration::from_secs(1);

/// Polls the store's generation until `certificates` is dropped.
pub(super) async fn watch_store(certificates: Weak<Certificates>) {
    loop {
        let Some(this) = certificates.upgrade() else {
            return;
        };
        if let Some(shared) = &this.shared {
            if let Ok(generation) = shared.generation().await {
                this.generation.send_if_modified(|seen| {
                    let moved = *seen != generation;
                    *seen = generation;
                    moved
                });
            }
        }
        drop(this);
        tokio::time::sleep(GENERATION_POLL).await;
    }
}

/// Why a host's loop could not go on with the store this time.
enum Blocked {
    /// The store cannot be reached: serve what we have, try again soon.
    Unreachable,
    /// The store holds something this instance cannot use: report it, order nothing.
    Unusable(String),
}

impl From<StoreError> for Blocked {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unreachable(_) => Blocked::Unreachable,
            unusable => Blocked::Unusable(unusable.to_string()),
        }
    }
}

impl Certificates {
    pub(super) async fn keep_certified_in_fleet(
        &self,
        shared: &Arc<SharedStore>,
        host: &str,
        directory: &str,
        store: &CertStore,
    ) {
        let mut generation = self.generation.subscribe();
        let mut retry_in = FIRST_RETRY;
        loop {
            match self.fleet_step(shared, host, directory, store).await {
                Ok(Step::Certified(wait)) => {
                    retry_in = FIRST_RETRY;
                    wait_for_change(&mut generation, wait).await;
                }
                Ok(Step::OtherInstanceOrdering) => {
                    wait_for_change(&mut generation, LOCK_WAIT_POLL).await;
                }
                Ok(Step::OrderFailed(reason)) => {
                    tracing::error!(host, error = %reason, retry_in_secs = retry_in.as_secs(), "Certificate order failed");
                    self.publish(host, Err(reason));
                    wait_for_change(&mut generation, retry_in).await;
                    retry_in = (retry_in * 2).min(LONGEST_RETRY);
                }
                Err(Blocked::Unreachable) => {
                    wait_for_change(&mut generation, STORE_RETRY).await;
                }
                Err(Blocked::Unusable(reason)) => {
                    tracing::error!(host, error = %reason, "Cannot use the shared certificate store's entry; not ordering over it");
                    self.publish(host, Err(reason));
                    wait_for_change(&mut generation, retry_in).await;
                    retry_in = (retry_in * 2).min(LONGEST_RETRY);
                }
            }
        }
    }

    /// One pass: adopt the store's certificate, or order one under the lock.
    async fn fleet_step(
        &self,
        shared: &SharedStore,
        host: &str,
        directory: &str,
        store: &CertStore,
    ) -> Result<Step, Blocked> {
        shared.check_key().await?;
        if let Some(wait) = self
            .adopt_from_store(shared, host, directory, store)
            .await?
        {
            return Ok(Step::Certified(wait));
        }
        let Some(lock) = shared.try_lock(directory, host).await? else {
            shared.count_lock_wait();
            tracing::info!(
                host,
                "Another instance is ordering this certificate; waiting for it"
            );
            return Ok(Step::OtherInstanceOrdering);
        };
        // Another instance may have stored one between the look above and the lock.
        let adopted = self.adopt_from_store(shared, host, directory, store).await;
        if let Ok(Some(wait)) = adopted {
            let _ = shared.release_lock(directory, host, &lock).await;
            return Ok(Step::Certified(wait));
        }
        tracing::info!(
            host,
            directory = crate::directory_url(directory),
            instance = shared.instance(),
            "Requesting certificate (holding the fleet's order lock)"
        );
        let ordered = self
            .order_holding_lock(shared, host, directory, store, &lock)
            .await;
        let step = match ordered {
            Ok(certificate) => {
                let ordered_at = match shared.put_certificate(directory, host, &certificate).await {
                    Ok(at) => at,
                    Err(error) => {
                        tracing::error!(host, %error, "Certificate obtained but not in the shared store; the other instances will not see it");
                        SystemTime::now()
                    }
                };
                if let Err(error) = store.save(host, &certificate) {
                    tracing::warn!(host, %error, "Certificate not written to the local cache");
                }
                tracing::info!(host, issuer = %certificate.issuer, not_after = %humantime::format_rfc3339_seconds(certificate.not_after), "Certificate obtained");
                let wait = until_renewal(&certificate);
                let origin = (shared.instance().to_string(), ordered_at);
                self.publish_from(host, Ok(Arc::new(certificate)), Some(origin));
                Step::Certified(wait)
            }
            Err(reason) => Step::OrderFailed(reason),
        };
        let _ = shared.release_lock(directory, host, &lock).await;
        Ok(step)
    }

    /// Takes the store's certificate for `host` when it is newer than ours; returns how long
    /// until ours (whichever it is now) is due, or `None` when there is none or it is due.
    async fn adopt_from_store(
        &self,
        shared: &SharedStore,
        host: &str,
        directory: &str,
        store: &CertStore,
    ) -> Result<Option<Duration>, StoreError> {
        let current = self
            .read_hosts()
            .get(host)
            .and_then(|h| h.certificate.clone());
        let found = shared.certificate(directory, host).await?;
        if let Some(found) = found {
            let newer = current
                .as_ref()
                .is_none_or(|c| found.certificate.not_after > c.not_after);
            if newer && !found.certificate.is_expired() && found.certificate.covers(host) {
                if let Err(error) = store.save(host, &found.certificate) {
                    tracing::warn!(host, %error, "Certificate not written to the local cache");
                }
                tracing::info!(host, ordered_by = %found.ordered_by, not_after = %humantime::format_rfc3339_seconds(found.certificate.not_after), "Certificate taken from the shared store");
                let due = found.certificate.is_due_for_renewal();
                let wait = until_renewal(&found.certificate);
                self.publish_from(
                    host,
                    Ok(Arc::new(found.certificate)),
                    Some((found.ordered_by, found.ordered_at)),
                );
                return Ok((!due).then_some(wait));
            }
        }
        Ok(current
            .filter(|c| !c.is_due_for_renewal())
            .map(|c| until_renewal(&c)))
    }

    /// Orders while extending the lock, so a long validation does not let it lapse.
    async fn order_holding_lock(
        &self,
        shared: &SharedStore,
        host: &str,
        directory: &str,
        store: &CertStore,
        lock: &str,
    ) -> Result<Certificate, String> {
        let order = self.order(host, directory, store);
        tokio::pin!(order);
        let mut extend = tokio::time::interval(LOCK_TTL / 3);
        extend.tick().await;
        loop {
            tokio::select! {
                ordered = &mut order => return ordered,
                _ = extend.tick() => {
                    if let Ok(false) = shared.extend_lock(directory, host, lock).await {
                        tracing::warn!(host, "The order lock lapsed during the order");
                    }
                }
            }
        }
    }
}

enum Step {
    /// A usable certificate is served; look again after this long (or when the store moves).
    Certified(Duration),
    OtherInstanceOrdering,
    OrderFailed(String),
}

fn until_renewal(certificate: &Certificate) -> Duration {
    certificate
        .renew_at()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

/// Sleeps for `limit`, or until the store's generation moves.
async fn wait_for_change(generation: &mut watch::Receiver<u64>, limit: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(limit) => {}
        _ = generation.changed() => {}
    }
}
