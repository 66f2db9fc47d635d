//! What each deploy under way is waiting for, so `deploy` can show it on a terminal: health
//! checks of the new targets (attempts, last failure, time left), then the old targets
//! draining (requests still in flight, time left).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proxy::{Health, Target};

use crate::protocol::{DeployProgress, TargetProgress};

enum Phase {
    HealthCheck,
    Draining,
}

struct Waiting {
    phase: Phase,
    targets: Vec<Arc<Target>>,
    deadline: Instant,
}

/// The deploys under way, by service.
#[derive(Default)]
pub(crate) struct DeployTracker {
    deploys: Mutex<HashMap<String, Waiting>>,
}

impl DeployTracker {
    /// Records that `service`'s deploy waits for `targets` to pass a health check.
    pub fn health_check(&self, service: &str, targets: &[Arc<Target>], timeout: Duration) {
        self.set(service, Phase::HealthCheck, targets, timeout);
    }

    /// Records that `service`'s deploy waits for `targets` to drain.
    pub fn draining(&self, service: &str, targets: &[Arc<Target>], timeout: Duration) {
        self.set(service, Phase::Draining, targets, timeout);
    }

    /// Forgets `service`'s deploy when the returned guard is dropped, however it ends.
    pub fn track<'a>(&'a self, service: &'a str) -> impl Drop + 'a {
        Finished(self, service)
    }

    pub fn report(&self, service: &str) -> Option<DeployProgress> {
        let deploys = self.lock();
        let waiting = deploys.get(service)?;
        let time_left = waiting.deadline.saturating_duration_since(Instant::now());
        Some(DeployProgress {
            phase: match waiting.phase {
                Phase::HealthCheck => "health_check",
                Phase::Draining => "draining",
            }
            .to_string(),
            time_left_ms: u64::try_from(time_left.as_millis()).unwrap_or(u64::MAX),
            targets: waiting
                .targets
                .iter()
                .map(|target| {
                    let report = target.health_report();
                    TargetProgress {
                        address: target.address().to_string(),
                        healthy: report.health == Health::Healthy,
                        checks: target.health_checks(),
                        last_failure: report.last_failure,
                        in_flight: target.in_flight(),
                    }
                })
                .collect(),
        })
    }

    fn set(&self, service: &str, phase: Phase, targets: &[Arc<Target>], timeout: Duration) {
        self.lock().insert(
            service.to_string(),
            Waiting {
                phase,
                targets: targets.to_vec(),
                deadline: Instant::now() + timeout,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.deploys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Finished<'a>(&'a DeployTracker, &'a str);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(self.1);
    }
}
