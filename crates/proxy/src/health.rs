//! Health checks: each target is polled at its interval for as long as it is not retired.
//! A 2xx answer within the timeout is healthy; anything else is unhealthy with a reason.

use std::sync::{Arc, Weak};

use http::{header, Request, Uri};
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

/// Redirects a check follows, as Go's HTTP client (and so kamal-proxy) does.
const MAX_REDIRECTS: usize = 10;

async fn probe(target: &Target, client: &UpstreamClient) -> Result<(), String> {
    let config = target.health_check_config();
    let mut uri = target
        .health_check_uri()
        .map_err(|e| format!("invalid health check URL: {e}"))?;
    let configured_host = config
        .host
        .clone()
        .unwrap_or_else(|| target.authority().to_string());
    let timeout = config.timeout.get();
    let checked = async {
        for _ in 0..=MAX_REDIRECTS {
            // A redirect elsewhere names its own host; one on the target keeps ours.
            let host = match uri.authority() {
                Some(authority) if authority != target.authority() => authority.to_string(),
                _ => configured_host.clone(),
            };
            let request = Request::get(uri.clone())
                .header(header::HOST, host)
                .header(header::USER_AGENT, "kamal-proxy")
                .body(body::empty())
                .map_err(|e| format!("invalid health check request: {e}"))?;
            let response = client
                .request(request)
                .await
                .map_err(|error| describe_error(&error))?;
            let status = response.status();
            let location = status
                .is_redirection()
                .then(|| response.headers().get(header::LOCATION).cloned())
                .flatten();
            // Reading the body to its end lets the next check reuse the connection instead
            // of opening a new one every interval; a body too long to bother with is left.
            let _ = Limited::new(response.into_body(), MAX_BODY_READ)
                .collect()
                .await;
            match location {
                Some(location) => uri = redirected(&uri, &location)?,
                None if status.is_success() => return Ok(()),
                None => return Err(format!("status {}", status.as_u16())),
            }
        }
        Err(format!("stopped after {MAX_REDIRECTS} redirects"))
    };
    match tokio::time::timeout(timeout, checked).await {
        Err(_) => Err(format!("timed out after {}", config.timeout)),
        Ok(outcome) => outcome,
    }
}

/// Where a redirect from `from` to `location` leads: an absolute `http` URL, a path on the
/// same target, or a path relative to the current one.
fn redirected(from: &Uri, location: &http::HeaderValue) -> Result<Uri, String> {
    let location = location
        .to_str()
        .map_err(|_| "redirected to an unreadable location".to_string())?;
    if location.starts_with("https://") {
        return Err(format!("redirected to {location}, which needs TLS"));
    }
    if location.starts_with("http://") {
        return location
            .parse()
            .map_err(|_| format!("redirected to an invalid location {location:?}"));
    }
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let base = from.path();
        let directory = &base[..base.rfind('/').map_or(0, |i| i + 1)];
        format!("{directory}{location}")
    };
    let mut parts = from.clone().into_parts();
    parts.path_and_query = Some(
        path.parse()
            .map_err(|_| format!("redirected to an invalid location {location:?}"))?,
    );
    Uri::from_parts(parts).map_err(|_| format!("redirected to an invalid location {location:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_current_url() {
        let from: Uri = "http://10.0.0.1:3000/health/up".parse().unwrap();
        let to = |location: &'static str| {
            redirected(&from, &http::HeaderValue::from_static(location)).map(|u| u.to_string())
        };
        assert_eq!(to("/ok").unwrap(), "http://10.0.0.1:3000/ok");
        assert_eq!(
            to("ready?x=1").unwrap(),
            "http://10.0.0.1:3000/health/ready?x=1"
        );
        assert_eq!(to("http://other:80/up").unwrap(), "http://other:80/up");
        assert!(to("https://10.0.0.1:3000/up").is_err());
    }
}
