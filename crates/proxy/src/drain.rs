//! The process-wide drain, used when this process shuts down or hands its listeners to a
//! newer one: stop accepting, tell clients to go elsewhere without cutting them off, wait for
//! open work up to a deadline, then close what is left.
//!
//! "Tell clients" is per protocol: an HTTP/1.1 connection gets `Connection: close` on its next
//! response (so a keep-alive client is not cut off while it sends a request), an HTTP/2
//! connection gets GOAWAY, and upgraded connections (WebSockets) run until the deadline.
//!
//! A shutdown differs from a handover in one way: nothing takes over, so an idle keep-alive
//! connection has no better place to send its next request. It is closed at once instead of
//! being kept open to the deadline, so the process exits as soon as its requests are done.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::signal::Signal;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

#[derive(Clone)]
pub struct Drain {
    started: Signal,
    close_idle: CancellationToken,
    deadline: CancellationToken,
    tasks: TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        let deadline = CancellationToken::new();
        Self {
            started: Signal::default(),
            // A child: the deadline closes idle connections too, so that one wait covers both
            // (an idle connection's wait is held for as long as it is idle).
            close_idle: deadline.child_token(),
            deadline,
            tasks: TaskTracker::new(),
        }
    }
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops accepting and starts turning clients away gently.
    pub fn start(&self) {
        self.started.fire();
    }

    pub fn is_started(&self) -> bool {
        self.started.is_cancelled()
    }

    /// Tested on every response and polled by every HTTP/1.1 connection's loop: a
    /// [`Signal`], not a bare token, so that costs no lock.
    pub fn started(&self) -> &Signal {
        &self.started
    }

    /// Fires when idle connections should close: at once in a shutdown, else at the deadline.
    pub fn close_idle(&self) -> &CancellationToken {
        &self.close_idle
    }

    /// Fires when the drain time is up: whatever is still open gets closed.
    pub fn deadline(&self) -> &CancellationToken {
        &self.deadline
    }

    /// Runs `work` (a connection or a tunnel) as something the drain waits for.
    pub fn track<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(work);
    }

    /// Like [`Drain::track`], on `runtime` (when called from outside it).
    pub fn track_on<F>(&self, work: F, runtime: &tokio::runtime::Handle)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(work, runtime);
    }

    /// Keeps the drain waiting, as tracked work does, until the token is dropped: for work on
    /// its way to becoming tracked.
    pub fn hold(&self) -> TaskTrackerToken {
        self.tasks.token()
    }

    /// Drains for a shutdown: like [`Drain::finish`], but idle connections close at once.
    pub async fn shut_down(&self, grace: Duration) -> bool {
        self.close_idle.cancel();
        self.finish(grace).await
    }

    /// Waits for tracked work to end, up to `grace`; then closes the rest and waits briefly
    /// for it to go. Returns whether everything finished within `grace`.
    pub async fn finish(&self, grace: Duration) -> bool {
        self.start();
        self.tasks.close();
        let finished = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        if !finished {
            tracing::warn!(
                open = self.tasks.len(),
                "Drain time is up; closing remaining connections"
            );
            self.deadline.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        }
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finish_waits_for_tracked_work() {
        let drain = Drain::new();
        drain.track(async { tokio::time::sleep(Duration::from_millis(50)).await });
        assert!(drain.finish(Duration::from_secs(5)).await);
        assert!(!drain.deadline().is_cancelled());
    }

    #[tokio::test]
    async fn work_past_the_grace_period_is_told_to_close() {
        let drain = Drain::new();
        let deadline = drain.deadline().clone();
        drain.track(async move { deadline.cancelled().await });
        assert!(!drain.finish(Duration::from_millis(20)).await);
        assert!(drain.deadline().is_cancelled());
        // Idle connections wait on close_idle alone: the deadline must reach them.
        assert!(drain.close_idle().is_cancelled());
    }

    #[tokio::test]
    async fn a_shutdown_closes_idle_connections_without_the_deadline() {
        let drain = Drain::new();
        assert!(drain.shut_down(Duration::from_secs(5)).await);
        assert!(drain.close_idle().is_cancelled());
        assert!(!drain.deadline().is_cancelled());
    }
}
