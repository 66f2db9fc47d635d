//! A target: one upstream address (an app container) with its health, its in-flight request
//! count and the signals that drain it.
//!
//! Invariant that makes swaps lossless: a request counts itself in flight *before* it checks
//! whether the target is draining, and drain marks the target draining *before* it reads the
//! count (both SeqCst). So either the request sees the drain and picks again, or the drain
//! sees the request and waits for it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Uri};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::HealthCheckConfig;
use crate::signal::Signal;

#[derive(Debug, thiserror::Error)]
#[error("invalid target {0:?}: expected host or host:port")]
pub struct InvalidTarget(pub String);

/// Health as the target's checks last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Unknown,
    Healthy,
    Unhealthy,
}

/// What the last health check said, for status views and deploy errors.
#[derive(Debug, Clone)]
pub struct HealthReport {
    pub health: Health,
    pub last_failure: Option<String>,
}

pub struct Target {
    address: Arc<str>,
    /// The address as a header value (`X-Kamal-Target`), made once: a clone shares it.
    address_header: http::HeaderValue,
    authority: Authority,
    healthy: AtomicBool,
    report: watch::Sender<HealthReport>,
    in_flight: AtomicUsize,
    /// Health checks completed, for progress reports.
    checks: AtomicU32,
    draining: AtomicBool,
    drained: Notify,
    /// Cancelled when the drain timeout runs out: requests still running are cut.
    cut_requests: Signal,
    /// Cancelled when draining starts: upgraded connections (WebSockets) are closed.
    close_upgrades: CancellationToken,
    /// Cancelled when the target is retired: its health check stops.
    retired: CancellationToken,
    health_check: HealthCheckConfig,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("address", &self.address)
            .finish()
    }
}

impl Target {
    /// A target at `address` (`host:port`), health unknown until its first check.
    pub fn new(address: &str, health_check: HealthCheckConfig) -> Result<Self, InvalidTarget> {
        let invalid = || InvalidTarget(address.to_string());
        let mut authority: Authority = address.parse().map_err(|_| invalid())?;
        if authority.host().is_empty() || address.contains('@') {
            return Err(invalid());
        }
        // A target without a port is on port 80, as in kamal-proxy (an app container's
        // name, say); it keeps the name it was deployed with.
        if authority.port().is_none() {
            authority = format!("{address}:80").parse().map_err(|_| invalid())?;
        }
        let address_header =
            http::HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(address.as_bytes()))
                .map_err(|_| invalid())?;
        Ok(Self {
            address: address.into(),
            address_header,
            authority,
            healthy: AtomicBool::new(false),
            report: watch::Sender::new(HealthReport {
                health: Health::Unknown,
                last_failure: None,
            }),
            in_flight: AtomicUsize::new(0),
            checks: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            drained: Notify::new(),
            cut_requests: Signal::new(),
            close_upgrades: CancellationToken::new(),
            retired: CancellationToken::new(),
            health_check,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The address as a header value, cheap to clone.
    pub fn address_header(&self) -> &http::HeaderValue {
        &self.address_header
    }

    /// The address as a shared string, for what outlives a borrow (a request's log record).
    pub fn shared_address(&self) -> &Arc<str> {
        &self.address
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn health_check_config(&self) -> &HealthCheckConfig {
        &self.health_check
    }

    /// The URL its health check fetches.
    pub fn health_check_uri(&self) -> Result<Uri, http::Error> {
        let port = self
            .health_check
            .port
            .or(self.authority.port_u16())
            .unwrap_or(80);
        let path = if self.health_check.path.starts_with('/') {
            self.health_check.path.clone()
        } else {
            format!("/{}", self.health_check.path)
        };
        Uri::builder()
            .scheme("http")
            .authority(format!("{}:{}", self.authority.host(), port))
            .path_and_query(path)
            .build()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// How many health checks have completed.
    pub fn health_checks(&self) -> u32 {
        self.checks.load(Ordering::Relaxed)
    }

    pub fn health_report(&self) -> HealthReport {
        self.report.borrow().clone()
    }

    /// Takes a restored target as healthy until its checks say otherwise.
    pub fn assume_healthy(&self) {
        self.record_health(Ok(()));
    }

    pub(crate) fn record_health(&self, outcome: Result<(), String>) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let report = match outcome {
            Ok(()) => HealthReport {
                health: Health::Healthy,
                last_failure: None,
            },
            Err(reason) => HealthReport {
                health: Health::Unhealthy,
                last_failure: Some(reason),
            },
        };
        let healthy = report.health == Health::Healthy;
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            tracing::info!(address = %self.address, healthy, reason = report.last_failure.as_deref().unwrap_or(""), "Target health changed");
        }
        self.report.send_replace(report);
    }

    /// Waits until a health check passes, up to `timeout`. On failure returns the last reason.
    pub async fn wait_until_healthy(&self, timeout: Duration) -> Result<(), String> {
        let mut reports = self.report.subscribe();
        let became_healthy = tokio::time::timeout(
            timeout,
            reports.wait_for(|report| report.health == Health::Healthy),
        )
        .await;
        match became_healthy {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self
                .report
                .borrow()
                .last_failure
                .clone()
                .unwrap_or_else(|| "no health check completed".to_string())),
        }
    }

    /// Counts a request in flight, unless the target has started draining.
    pub fn try_acquire(self: &Arc<Self>) -> Option<InFlight> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(Arc::clone(self));
        if self.draining.load(Ordering::SeqCst) {
            return None; // dropping the guard undoes the count
        }
        Some(guard)
    }

    /// Stops new requests, closes upgraded connections, waits for in-flight requests up to
    /// `timeout`, then cuts the rest. Returns how many had to be cut.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        self.close_upgrades.cancel();
        let finished = tokio::time::timeout(timeout, self.wait_idle())
            .await
            .is_ok();
        let cut = if finished { 0 } else { self.in_flight() };
        if cut > 0 {
            tracing::warn!(address = %self.address, cut, "Drain timeout reached; cutting requests");
            self.cut_requests.fire();
        }
        self.retire();
        cut
    }

    /// Waits until no request is in flight on this target.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stops the health check; the target gets no more traffic from a pool that drops it.
    pub fn retire(&self) {
        self.retired.cancel();
    }

    pub fn retired(&self) -> &CancellationToken {
        &self.retired
    }

    /// Waited on by every request to this target: a [`Signal`], so that costs no lock.
    pub fn cut_requests(&self) -> &Signal {
        &self.cut_requests
    }

    pub fn close_upgrades(&self) -> &CancellationToken {
        &self.close_upgrades
    }
}

/// One request in flight on a target; dropping it ends the request's claim.
pub struct InFlight(Arc<Target>);

impl InFlight {
    pub fn target(&self) -> &Arc<Target> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Arc<Target> {
        Arc::new(Target::new("127.0.0.1:3000", HealthCheckConfig::default()).unwrap())
    }

    #[test]
    fn an_address_without_a_port_is_on_port_80_as_in_kamal_proxy() {
        let target = Target::new("app", HealthCheckConfig::default()).unwrap();
        assert_eq!(target.address(), "app");
        assert_eq!(target.authority().as_str(), "app:80");
        assert!(Target::new("http://x:1/", HealthCheckConfig::default()).is_err());
        assert!(Target::new("app:3000", HealthCheckConfig::default()).is_ok());
        assert!(Target::new(":3000", HealthCheckConfig::default()).is_err());
    }

    #[test]
    fn a_draining_target_accepts_no_new_requests() {
        let target = target();
        let first = target.try_acquire().unwrap();
        target.draining.store(true, Ordering::SeqCst);
        assert!(target.try_acquire().is_none());
        assert_eq!(target.in_flight(), 1);
        drop(first);
        assert_eq!(target.in_flight(), 0);
    }

    #[tokio::test]
    async fn drain_waits_for_in_flight_requests() {
        let target = target();
        let guard = target.try_acquire().unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(guard);
        });
        assert_eq!(target.drain(Duration::from_secs(5)).await, 0);
        assert!(!target.cut_requests().is_cancelled());
        release.await.unwrap();
    }

    #[tokio::test]
    async fn drain_cuts_requests_after_its_timeout() {
        let target = target();
        let _stuck = target.try_acquire().unwrap();
        assert_eq!(target.drain(Duration::from_millis(20)).await, 1);
        assert!(target.cut_requests().is_cancelled());
        assert!(target.close_upgrades().is_cancelled());
    }

    #[test]
    fn health_check_uri_uses_the_configured_port_and_path() {
        let config = HealthCheckConfig {
            port: Some(9000),
            path: "health".into(),
            ..HealthCheckConfig::default()
        };
        let target = Target::new("app:3000", config).unwrap();
        assert_eq!(
            target.health_check_uri().unwrap().to_string(),
            "http://app:9000/health"
        );
    }
}
