//! A service: a named app with its settings, its pool of targets and its pause state.
//!
//! The control plane swaps a service's targets and settings atomically; requests already
//! holding the old ones finish with them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderMap;
use tokio::sync::watch;

use crate::config::ServiceConfig;
use crate::error_page::ErrorPages;
use crate::rollout::{Assignment, RolloutSplit};
use crate::target::{InFlight, Target};

/// What a service does with new requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseState {
    Running,
    /// Requests wait until resumed, each for at most `max_pause` from its arrival (as in
    /// kamal-proxy: a pause may outlast it).
    Paused {
        max_pause: Duration,
    },
    /// Requests get a 503 with this message.
    Stopped {
        message: Option<String>,
    },
}

impl PauseState {
    pub fn name(&self) -> &'static str {
        match self {
            PauseState::Running => "running",
            PauseState::Paused { .. } => "paused",
            PauseState::Stopped { .. } => "stopped",
        }
    }
}

/// What `admit` decided for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Proceed,
    Stopped(Option<String>),
    PauseTimedOut,
    /// The service's own health-check path while paused or stopped: answered 200 by the
    /// proxy, so a load balancer or uptime check in front keeps the node in its pool.
    HealthCheck,
}

/// Settings that change together on a redeploy.
#[derive(Debug)]
pub struct ServiceSettings {
    pub config: ServiceConfig,
    pub error_pages: ErrorPages,
}

/// The targets serving a service, in round-robin order.
#[derive(Debug, Default)]
pub struct TargetPool {
    targets: Vec<Arc<Target>>,
    next: AtomicUsize,
}

impl TargetPool {
    pub fn new(targets: Vec<Arc<Target>>) -> Self {
        Self {
            targets,
            next: AtomicUsize::new(0),
        }
    }

    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// The next healthy target in turn; if none is healthy, the next one at all, since a
    /// request that may succeed beats a certain 503.
    fn pick(&self) -> Option<InFlight> {
        let count = self.targets.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let in_turn = (0..count).map(|i| &self.targets[(start + i) % count]);
        in_turn
            .clone()
            .filter(|target| target.is_healthy())
            .find_map(|target| target.try_acquire())
            .or_else(|| in_turn.into_iter().find_map(|target| target.try_acquire()))
    }

    /// The next healthy target in turn, or none: read targets are a preference, and a read
    /// with no healthy reader goes to a writer.
    fn pick_healthy(&self) -> Option<InFlight> {
        let count = self.targets.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|i| &self.targets[(start + i) % count])
            .filter(|target| target.is_healthy())
            .find_map(|target| target.try_acquire())
    }
}

pub struct Service {
    name: Arc<str>,
    settings: ArcSwap<ServiceSettings>,
    pool: ArcSwap<TargetPool>,
    /// Read targets (`--read-target`): GET and HEAD go to them when healthy.
    readers: ArcSwap<TargetPool>,
    /// Canary targets; they get traffic only while a split is set.
    rollout_pool: ArcSwap<TargetPool>,
    rollout_readers: ArcSwap<TargetPool>,
    rollout_split: ArcSwapOption<RolloutSplit>,
    pause: watch::Sender<PauseState>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("name", &self.name).finish()
    }
}

impl Service {
    pub fn new(name: &str, settings: ServiceSettings) -> Self {
        Self {
            name: name.into(),
            settings: ArcSwap::from_pointee(settings),
            pool: ArcSwap::from_pointee(TargetPool::default()),
            readers: ArcSwap::from_pointee(TargetPool::default()),
            rollout_pool: ArcSwap::from_pointee(TargetPool::default()),
            rollout_readers: ArcSwap::from_pointee(TargetPool::default()),
            rollout_split: ArcSwapOption::empty(),
            pause: watch::Sender::new(PauseState::Running),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as a shared string, for what outlives a borrow (a request's log record).
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn settings(&self) -> Arc<ServiceSettings> {
        self.settings.load_full()
    }

    pub fn set_settings(&self, settings: ServiceSettings) {
        self.settings.store(Arc::new(settings));
    }

    pub fn pool(&self) -> Arc<TargetPool> {
        self.pool.load_full()
    }

    /// Makes `targets` the ones serving; returns the ones replaced (for draining).
    pub fn replace_targets(&self, targets: Vec<Arc<Target>>) -> Vec<Arc<Target>> {
        let old = self.pool.swap(Arc::new(TargetPool::new(targets)));
        old.targets.clone()
    }

    pub fn readers(&self) -> Arc<TargetPool> {
        self.readers.load_full()
    }

    /// Makes `targets` the read targets; returns the ones replaced (for draining).
    pub fn replace_readers(&self, targets: Vec<Arc<Target>>) -> Vec<Arc<Target>> {
        let old = self.readers.swap(Arc::new(TargetPool::new(targets)));
        old.targets.clone()
    }

    /// Whether the service has read targets (cheap: one atomic load).
    pub fn has_readers(&self) -> bool {
        !self.readers.load().targets.is_empty()
    }

    pub fn rollout_readers(&self) -> Arc<TargetPool> {
        self.rollout_readers.load_full()
    }

    /// Makes `targets` the rollout's read targets; returns the ones replaced.
    pub fn replace_rollout_readers(&self, targets: Vec<Arc<Target>>) -> Vec<Arc<Target>> {
        let old = self
            .rollout_readers
            .swap(Arc::new(TargetPool::new(targets)));
        old.targets.clone()
    }

    pub fn rollout_pool(&self) -> Arc<TargetPool> {
        self.rollout_pool.load_full()
    }

    /// Makes `targets` the rollout targets; returns the ones replaced (for draining).
    pub fn replace_rollout_targets(&self, targets: Vec<Arc<Target>>) -> Vec<Arc<Target>> {
        let old = self.rollout_pool.swap(Arc::new(TargetPool::new(targets)));
        old.targets.clone()
    }

    pub fn rollout_split(&self) -> Option<Arc<RolloutSplit>> {
        self.rollout_split.load_full()
    }

    /// Sets (or with `None`, ends) the split of traffic to the rollout targets.
    pub fn set_rollout_split(&self, split: Option<RolloutSplit>) {
        self.rollout_split.store(split.map(Arc::new));
    }

    /// Which of the service's target groups a request goes to (see [`crate::rollout`]).
    pub fn assign(&self, headers: &HeaderMap) -> Assignment {
        match self.rollout_split.load().as_ref() {
            Some(split) if !self.rollout_pool.load().targets.is_empty() => split.assign(headers),
            _ => Assignment::default(),
        }
    }

    /// Claims a target for one request: a rollout target if `use_rollout` and there is one,
    /// else a main one; for a `read`, a healthy read target of that group first. A pool
    /// swapped mid-pick is read again.
    pub fn pick_target(&self, use_rollout: bool, read: bool) -> Option<InFlight> {
        for _ in 0..3 {
            if use_rollout {
                if read {
                    if let Some(claim) = self.rollout_readers.load().pick_healthy() {
                        return Some(claim);
                    }
                }
                if let Some(claim) = self.rollout_pool.load().pick() {
                    return Some(claim);
                }
            }
            if read {
                if let Some(claim) = self.readers.load().pick_healthy() {
                    return Some(claim);
                }
            }
            if let Some(claim) = self.pool.load().pick() {
                return Some(claim);
            }
        }
        None
    }

    pub fn pause_state(&self) -> PauseState {
        self.pause.borrow().clone()
    }

    pub fn set_pause_state(&self, state: PauseState) {
        self.pause.send_replace(state);
    }

    /// Waits while the service is paused; says whether a request for `path` may go on.
    pub async fn admit(&self, path: &str) -> Admission {
        let max_pause = match &*self.pause.borrow() {
            PauseState::Running => return Admission::Proceed,
            _ if path == self.settings.load().config.health_check.path => {
                return Admission::HealthCheck
            }
            PauseState::Stopped { message } => return Admission::Stopped(message.clone()),
            PauseState::Paused { max_pause } => *max_pause,
        };
        let mut changes = self.pause.subscribe();
        let resumed = tokio::time::timeout(
            max_pause,
            changes.wait_for(|state| !matches!(state, PauseState::Paused { .. })),
        )
        .await;
        match resumed {
            Ok(Ok(state)) => match &*state {
                PauseState::Stopped { message } => Admission::Stopped(message.clone()),
                _ => Admission::Proceed,
            },
            _ => Admission::PauseTimedOut,
        }
    }

    /// Every current target: main and rollout, writers and readers.
    fn all_targets(&self) -> Vec<Arc<Target>> {
        [
            self.pool(),
            self.readers(),
            self.rollout_pool(),
            self.rollout_readers(),
        ]
        .iter()
        .flat_map(|pool| pool.targets.iter().cloned())
        .collect()
    }

    /// Waits for in-flight requests on the current targets to finish, up to `timeout`.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let targets = self.all_targets();
        let all_idle = futures_util::future::join_all(targets.iter().map(|t| t.wait_idle()));
        tokio::time::timeout(timeout, all_idle).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthCheckConfig;

    fn target(address: &str, healthy: bool) -> Arc<Target> {
        let target = Arc::new(Target::new(address, HealthCheckConfig::default()).unwrap());
        if healthy {
            target.assume_healthy();
        }
        target
    }

    fn service() -> Service {
        Service::new(
            "app",
            ServiceSettings {
                config: ServiceConfig::default(),
                error_pages: ErrorPages::default(),
            },
        )
    }

    #[test]
    fn round_robin_skips_unhealthy_targets() {
        let service = service();
        service.replace_targets(vec![
            target("a:1", true),
            target("b:1", false),
            target("c:1", true),
        ]);
        let picks: Vec<String> = (0..4)
            .map(|_| {
                service
                    .pick_target(false, false)
                    .unwrap()
                    .target()
                    .address()
                    .to_string()
            })
            .collect();
        assert!(!picks.contains(&"b:1".to_string()));
        assert!(picks.contains(&"a:1".to_string()) && picks.contains(&"c:1".to_string()));
    }

    #[test]
    fn with_no_healthy_target_any_target_is_tried() {
        let service = service();
        service.replace_targets(vec![target("a:1", false)]);
        assert!(service.pick_target(false, false).is_some());
    }

    #[tokio::test]
    async fn paused_requests_wait_for_resume() {
        let service = Arc::new(service());
        service.set_pause_state(PauseState::Paused {
            max_pause: Duration::from_secs(5),
        });
        let waiting = tokio::spawn({
            let service = Arc::clone(&service);
            async move { service.admit("/").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        service.set_pause_state(PauseState::Running);
        assert_eq!(waiting.await.unwrap(), Admission::Proceed);
    }

    #[tokio::test]
    async fn a_stop_while_held_answers_with_the_stop_message() {
        let service = Arc::new(service());
        service.set_pause_state(PauseState::Paused {
            max_pause: Duration::from_secs(5),
        });
        let waiting = tokio::spawn({
            let service = Arc::clone(&service);
            async move { service.admit("/").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        service.set_pause_state(PauseState::Stopped {
            message: Some("later".into()),
        });
        assert_eq!(
            waiting.await.unwrap(),
            Admission::Stopped(Some("later".into()))
        );
    }

    #[tokio::test]
    async fn the_health_check_path_is_answered_while_paused_or_stopped() {
        let service = service();
        assert_eq!(service.admit("/up").await, Admission::Proceed);
        service.set_pause_state(PauseState::Stopped { message: None });
        assert_eq!(service.admit("/up").await, Admission::HealthCheck);
        assert_eq!(service.admit("/").await, Admission::Stopped(None));
        service.set_pause_state(PauseState::Paused {
            max_pause: Duration::from_secs(5),
        });
        assert_eq!(service.admit("/up").await, Admission::HealthCheck);
    }

    #[tokio::test]
    async fn a_pause_past_its_deadline_times_out() {
        let service = service();
        service.set_pause_state(PauseState::Paused {
            max_pause: Duration::from_millis(10),
        });
        assert_eq!(service.admit("/").await, Admission::PauseTimedOut);
    }

    #[test]
    fn reads_go_to_healthy_readers_and_everything_else_to_writers() {
        let service = service();
        service.replace_targets(vec![target("writer:1", true)]);
        service.replace_readers(vec![target("reader:1", true)]);
        let picked = |read| {
            service
                .pick_target(false, read)
                .unwrap()
                .target()
                .address()
                .to_string()
        };
        assert_eq!(picked(true), "reader:1");
        assert_eq!(picked(false), "writer:1");
        service.replace_readers(vec![target("reader:2", false)]);
        assert_eq!(picked(true), "writer:1", "no healthy reader: a writer");
    }
}
