//! Health checks: each target is polled at its interval for as long as it is not retired.
//! A 2xx answer within the timeout is healthy; anything else is unhealthy with a reason.

use std::sync::{Arc, Weak};

use http::{header, Request};
use http_body_util::{BodyExt, Limited};

use crate::body;
use crate::target::Target;
use crate::upstream::{describe_error, UpstreamClient};

/// Health check bodies are read up to this size so the connection can be reused.
const MAX_BODY_READ: usize = 64 * 1024;

/// Starts checking `target` now and every interval until it is retired or dropped.
pub fn spawn_health_check(target: &Arc<Target>, client: UpstreamClient) {
    let weak = Arc::downgrade(target);
    let retired = target.retired().clone();
    let interval = target.health_check_config().interval.get();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval.max(std::time::Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = retired.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if !check_once(&weak, &client).await {
                return;
            }
        }
    });
}

/// Runs one check; false when the target is gone.
async fn check_once(weak: &Weak<Target>, client: &UpstreamClient) -> bool {
    let Some(target) = weak.upgrade() else {
        return false;
    };
    let outcome = probe(&target, client).await;
    target.record_health(outcome);
    true
}

async fn probe(target: &Target, client: &UpstreamClient) -> Result<(), String> {
    let config = target.health_check_config();
    let uri = target
        .health_check_uri()
        .map_err(|e| format!("invalid health check URL: {e}"))?;
    let host = config
        .host
        .clone()
        .unwrap_or_else(|| target.authority().to_string());
    let request = Request::get(uri)
        .header(header::HOST, host)
        .header(header::USER_AGENT, "berth/health-check")
        .body(body::empty())
        .map_err(|e| format!("invalid health check request: {e}"))?;
    let timeout = config.timeout.get();
    let checked = async {
        let response = client.request(request).await?;
        let status = response.status();
        // Reading the body to its end lets the next check reuse the connection instead of
        // opening a new one every interval; a body too long to bother with is left unread.
        let _ = Limited::new(response.into_body(), MAX_BODY_READ)
            .collect()
            .await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    };
    match tokio::time::timeout(timeout, checked).await {
        Err(_) => Err(format!("timed out after {}", config.timeout)),
        Ok(Err(error)) => Err(describe_error(&error)),
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(format!("status {}", status.as_u16())),
    }
}
