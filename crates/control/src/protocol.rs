//! The JSON messages of the control API, shared by the daemon and the CLI.
//!
//! | method and path                     | body            | answer          |
//! |-------------------------------------|-----------------|-----------------|
//! | `POST /v1/services/{name}/deploy`   | [`DeployRequest`] | `{}` when the new targets serve and the old ones are drained |
//! | `DELETE /v1/services/{name}`        |                 | `{}`            |
//! | `POST /v1/services/{name}/stop`     | [`StopRequest`]   | `{}` after draining |
//! | `POST /v1/services/{name}/pause`    | [`PauseRequest`]  | `{}` after draining |
//! | `POST /v1/services/{name}/resume`   |                 | `{}`            |
//! | `POST /v1/services/{name}/rollout`  | [`RolloutDeployRequest`] | `{}` when the rollout targets are healthy and the previous ones drained |
//! | `PUT /v1/services/{name}/rollout/split` | [`RolloutSetRequest`] | `{}` |
//! | `DELETE /v1/services/{name}/rollout` |                | `{}` after the rollout targets drained |
//! | `GET /v1/services/{name}/progress`  |                 | [`DeployProgress`] of the deploy under way, 404 if none |
//! | `GET /v1/services`                  |                 | [`ServiceList`]   |
//! | `GET /v1/status`                    |                 | [`StatusReport`]  |
//!
//! Failures answer a 4xx/5xx status with [`ApiError`] as the body.

use berth_proxy::config::{
    ServiceConfig, DEFAULT_DEPLOY_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_PAUSE_TIMEOUT,
};
use berth_proxy::{GoDuration, Health, RolloutSplit};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployRequest {
    pub targets: Vec<String>,
    pub config: ServiceConfig,
    #[serde(default = "default_deploy_timeout")]
    pub deploy_timeout: GoDuration,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: GoDuration,
    /// Skip the health gate: the new targets serve at once.
    #[serde(default)]
    pub force: bool,
}

fn default_deploy_timeout() -> GoDuration {
    DEFAULT_DEPLOY_TIMEOUT
}

fn default_drain_timeout() -> GoDuration {
    DEFAULT_DRAIN_TIMEOUT
}

fn default_pause_timeout() -> GoDuration {
    DEFAULT_PAUSE_TIMEOUT
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StopRequest {
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: GoDuration,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseRequest {
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: GoDuration,
    #[serde(default = "default_pause_timeout")]
    pub max_pause: GoDuration,
}

/// `rollout deploy`: canary targets for an existing service, health-gated like a deploy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutDeployRequest {
    pub targets: Vec<String>,
    /// Read targets of the rollout (`--read-target`).
    #[serde(default)]
    pub read_targets: Vec<String>,
    #[serde(default = "default_deploy_timeout")]
    pub deploy_timeout: GoDuration,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: GoDuration,
}

/// `rollout set`: the share of cookie values, and the cookie values always, sent to the
/// rollout targets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutSetRequest {
    #[serde(default)]
    pub percent: u32,
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// Give visitors without the cookie a random one (Berth's own; off as in kamal-proxy).
    #[serde(default)]
    pub assign_cookies: bool,
}

/// What a deploy under way waits for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployProgress {
    /// `health_check` (new targets) or `draining` (old targets).
    pub phase: String,
    /// Until the deploy timeout (health check) or the drain timeout (draining).
    pub time_left_ms: u64,
    pub targets: Vec<TargetProgress>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetProgress {
    pub address: String,
    pub healthy: bool,
    /// Health checks done so far.
    pub checks: u32,
    pub last_failure: Option<String>,
    pub in_flight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `list`: one entry per service, sorted by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceList {
    pub services: Vec<ServiceSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub hosts: Vec<String>,
    pub path_prefixes: Vec<String>,
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_targets: Vec<String>,
    pub state: String,
    pub tls: bool,
}

/// `status`: what serves each host and path, and how its targets are doing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub routes: Vec<RouteStatus>,
    /// The certificate store several instances share, when one is in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_store: Option<CertStoreStatus>,
}

/// The shared certificate store as this instance sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertStoreStatus {
    /// The store's URL, without its password.
    pub location: String,
    /// This instance's name in the store.
    pub instance: String,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Store operations that failed, since start.
    pub errors: u64,
    /// Times an order waited for another instance holding its lock, since start.
    pub lock_waits: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteStatus {
    /// `*` for a service that takes every host.
    pub host: String,
    pub path: String,
    pub service: String,
    pub state: String,
    pub tls: bool,
    pub targets: Vec<TargetStatus>,
    /// Read targets (`--read-target`), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_targets: Vec<TargetStatus>,
    /// For TLS hosts: the certificate served and any order in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    /// Canary targets and their split, while a rollout is deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub targets: Vec<TargetStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_targets: Vec<TargetStatus>,
    /// None until `rollout set`: the rollout targets get no traffic yet.
    pub split: Option<RolloutSplit>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateStatus {
    /// `valid`, `pending`, `custom` or `failed: <reason>`.
    pub state: String,
    pub issuer: Option<String>,
    /// RFC 3339.
    pub expires: Option<String>,
    /// With a shared store: the instance that ordered it, and when (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatus {
    pub address: String,
    pub health: Health,
    pub last_failure: Option<String>,
    pub in_flight: usize,
}
