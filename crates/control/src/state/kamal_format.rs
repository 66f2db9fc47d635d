//! kamal-proxy's state file format, field for field (`../shared/spec/kamal-proxy-state.md`):
//! a JSON array of services, durations in nanoseconds, `""` and `null` for "not set". Berth
//! reads and writes this one format, so kamal-proxy can read what Berth wrote and back.
//!
//! Go's decoder ignores keys it does not know, and so does kamal-proxy; Berth keeps them
//! instead (in [`UnknownKeys`]) and writes them back, so a field of a newer kamal-proxy
//! survives a round trip through Berth.

use berth_proxy::config::{
    BufferConfig, HealthCheckConfig, ServiceConfig, TlsConfig, DEFAULT_HEALTH_CHECK_INTERVAL,
    DEFAULT_HEALTH_CHECK_PATH, DEFAULT_HEALTH_CHECK_TIMEOUT,
};
use berth_proxy::{GoDuration, RolloutSplit};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::{PersistedPause, ServiceState};

/// Keys of a saved service that Berth does not know, kept to be written back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnknownKeys {
    pub service: Map<String, Value>,
    pub options: Map<String, Value>,
    pub target_options: Map<String, Value>,
    pub health_check: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Service {
    name: String,
    #[serde(default)]
    options: Options,
    #[serde(default)]
    target_options: TargetOptions,
    #[serde(default, deserialize_with = "null_as_default")]
    active_targets: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    active_readers: Vec<String>,
    #[serde(default)]
    rollout_targets: Option<Vec<String>>,
    #[serde(default)]
    rollout_readers: Option<Vec<String>>,
    #[serde(default)]
    pause_controller: Option<PauseController>,
    #[serde(default)]
    rollout_controller: Option<RolloutController>,

    // Written by kamal-proxy before it had several targets per service; read, never written.
    #[serde(default, skip_serializing)]
    active_target: String,
    #[serde(default, skip_serializing)]
    rollout_target: String,
    #[serde(default, skip_serializing, deserialize_with = "null_as_default")]
    hosts: Vec<String>,
    #[serde(default, skip_serializing, deserialize_with = "null_as_default")]
    path_prefixes: Vec<String>,

    #[serde(flatten)]
    unknown: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Options {
    #[serde(deserialize_with = "null_as_default")]
    hosts: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    path_prefixes: Vec<String>,
    tls_enabled: bool,
    tls_certificate_path: String,
    tls_private_key_path: String,
    tls_on_demand_url: String,
    tls_redirect: bool,
    canonical_host: String,
    acme_directory: String,
    acme_cache_path: String,
    error_page_path: String,
    strip_prefix: bool,
    writer_affinity_timeout: Nanoseconds,
    read_targets_accept_websockets: bool,
    exclude_metrics_paths: Option<Vec<String>>,
    client_ip_header: String,
    #[serde(flatten)]
    unknown: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct TargetOptions {
    health_check_config: HealthCheck,
    response_timeout: Nanoseconds,
    buffer_requests: bool,
    buffer_responses: bool,
    max_memory_buffer_size: u64,
    max_request_body_size: u64,
    max_response_body_size: u64,
    log_request_headers: Option<Vec<String>>,
    log_response_headers: Option<Vec<String>>,
    forward_headers: bool,
    scope_cookie_paths: bool,
    #[serde(flatten)]
    unknown: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct HealthCheck {
    path: String,
    port: u16,
    interval: Nanoseconds,
    timeout: Nanoseconds,
    host: String,
    #[serde(flatten)]
    unknown: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct PauseController {
    /// 0 running, 1 paused, 2 stopped.
    state: u8,
    stop_message: String,
    /// The longest a request is held while paused.
    fail_after: Nanoseconds,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct RolloutController {
    percentage: u32,
    /// `u32::MAX × percentage / 100`: kamal-proxy compares a hash of the cookie with it.
    percentage_split_point: f64,
    #[serde(deserialize_with = "null_as_default")]
    allowlist: Vec<String>,
    /// Newer kamal-proxy versions keep a stopped split this way instead of as `null`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disabled: bool,
    /// Berth's own (`rollout set --assign-cookies`); kamal-proxy ignores it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    berth_assign_cookies: bool,
}

/// A Go `time.Duration` as JSON: an integer count of nanoseconds.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
struct Nanoseconds(i64);

impl Nanoseconds {
    fn to_duration(self) -> GoDuration {
        GoDuration(std::time::Duration::from_nanos(self.0.max(0) as u64))
    }

    /// Zero is what an older file without the field decodes to; it means "the default".
    fn or(self, default: GoDuration) -> GoDuration {
        if self.0 <= 0 {
            default
        } else {
            self.to_duration()
        }
    }

    fn from_duration(duration: GoDuration) -> Self {
        Self(i64::try_from(duration.get().as_nanos()).unwrap_or(i64::MAX))
    }
}

/// Go writes a nil slice as `null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn some_if_set(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn none_if_empty(list: Vec<String>) -> Option<Vec<String>> {
    (!list.is_empty()).then_some(list)
}

impl Service {
    pub(super) fn into_state(self) -> ServiceState {
        let Service {
            name,
            options,
            target_options,
            mut active_targets,
            active_readers,
            rollout_targets,
            rollout_readers,
            pause_controller,
            rollout_controller,
            active_target,
            rollout_target,
            hosts,
            path_prefixes,
            unknown,
        } = self;
        let mut rollout_targets = rollout_targets.unwrap_or_default();
        if active_targets.is_empty() && !active_target.is_empty() {
            active_targets = vec![active_target];
        }
        if rollout_targets.is_empty() && !rollout_target.is_empty() {
            rollout_targets = vec![rollout_target];
        }
        let health = target_options.health_check_config;
        let config = ServiceConfig {
            hosts: if options.hosts.is_empty() {
                hosts
            } else {
                options.hosts
            },
            path_prefixes: if options.path_prefixes.is_empty() {
                path_prefixes
            } else {
                options.path_prefixes
            },
            strip_path_prefix: options.strip_prefix,
            tls: TlsConfig {
                enabled: options.tls_enabled,
                redirect: options.tls_redirect,
                acme_directory: Some(options.acme_directory),
                on_demand_url: some_if_set(options.tls_on_demand_url),
                certificate_path: some_if_set(options.tls_certificate_path),
                private_key_path: some_if_set(options.tls_private_key_path),
                acme_cache_path: some_if_set(options.acme_cache_path),
                canonical_host: some_if_set(options.canonical_host),
            },
            health_check: HealthCheckConfig {
                path: some_if_set(health.path).unwrap_or_else(|| DEFAULT_HEALTH_CHECK_PATH.into()),
                port: (health.port != 0).then_some(health.port),
                host: some_if_set(health.host),
                interval: health.interval.or(DEFAULT_HEALTH_CHECK_INTERVAL),
                timeout: health.timeout.or(DEFAULT_HEALTH_CHECK_TIMEOUT),
            },
            target_timeout: target_options.response_timeout.to_duration(),
            buffering: BufferConfig {
                requests: target_options.buffer_requests,
                responses: target_options.buffer_responses,
                memory: target_options.max_memory_buffer_size,
                max_request_body: target_options.max_request_body_size,
                max_response_body: target_options.max_response_body_size,
            },
            forward_headers: target_options.forward_headers,
            client_ip_header: some_if_set(options.client_ip_header),
            log_request_headers: target_options.log_request_headers.unwrap_or_default(),
            log_response_headers: target_options.log_response_headers.unwrap_or_default(),
            error_pages: some_if_set(options.error_page_path),
            read_targets: active_readers,
            writer_affinity_timeout: options.writer_affinity_timeout.to_duration(),
            read_target_websockets: options.read_targets_accept_websockets,
            exclude_metrics_path: options.exclude_metrics_paths.unwrap_or_default(),
            scope_cookie_paths: target_options.scope_cookie_paths,
        };
        let pause = pause_controller.unwrap_or_default();
        let pause = match pause.state {
            1 => PersistedPause::Paused {
                max_pause: pause.fail_after.to_duration(),
            },
            2 => PersistedPause::Stopped {
                message: some_if_set(pause.stop_message),
            },
            _ => PersistedPause::Running,
        };
        let rollout = rollout_controller
            .filter(|controller| !controller.disabled)
            .map(|controller| RolloutSplit {
                percent: controller.percentage.min(100) as u8,
                allowlist: controller.allowlist,
                assign_cookies: controller.berth_assign_cookies,
            });
        ServiceState {
            name,
            targets: active_targets,
            config,
            pause,
            rollout_targets,
            rollout_read_targets: rollout_readers.unwrap_or_default(),
            rollout,
            unknown: UnknownKeys {
                service: unknown,
                options: options.unknown,
                target_options: target_options.unknown,
                health_check: health.unknown,
            },
        }
    }

    pub(super) fn from_state(state: &ServiceState) -> Self {
        let config = &state.config;
        let tls = &config.tls;
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        let unknown = state.unknown.clone();
        let (pause_state, stop_message, fail_after) = match &state.pause {
            PersistedPause::Running => (0, String::new(), GoDuration::default()),
            PersistedPause::Paused { max_pause } => (1, String::new(), *max_pause),
            PersistedPause::Stopped { message } => (2, text(message), GoDuration::default()),
        };
        let has_rollout = !state.rollout_targets.is_empty();
        Service {
            name: state.name.clone(),
            options: Options {
                hosts: config.hosts.clone(),
                path_prefixes: config.path_prefixes.clone(),
                tls_enabled: tls.enabled,
                tls_certificate_path: text(&tls.certificate_path),
                tls_private_key_path: text(&tls.private_key_path),
                tls_on_demand_url: text(&tls.on_demand_url),
                tls_redirect: tls.redirect,
                canonical_host: text(&tls.canonical_host),
                acme_directory: text(&tls.acme_directory),
                acme_cache_path: text(&tls.acme_cache_path),
                error_page_path: text(&config.error_pages),
                strip_prefix: config.strip_path_prefix,
                writer_affinity_timeout: Nanoseconds::from_duration(config.writer_affinity_timeout),
                read_targets_accept_websockets: config.read_target_websockets,
                exclude_metrics_paths: none_if_empty(config.exclude_metrics_path.clone()),
                client_ip_header: text(&config.client_ip_header),
                unknown: unknown.options,
            },
            target_options: TargetOptions {
                health_check_config: HealthCheck {
                    path: config.health_check.path.clone(),
                    port: config.health_check.port.unwrap_or(0),
                    interval: Nanoseconds::from_duration(config.health_check.interval),
                    timeout: Nanoseconds::from_duration(config.health_check.timeout),
                    host: text(&config.health_check.host),
                    unknown: unknown.health_check,
                },
                response_timeout: Nanoseconds::from_duration(config.target_timeout),
                buffer_requests: config.buffering.requests,
                buffer_responses: config.buffering.responses,
                max_memory_buffer_size: config.buffering.memory,
                max_request_body_size: config.buffering.max_request_body,
                max_response_body_size: config.buffering.max_response_body,
                log_request_headers: none_if_empty(config.log_request_headers.clone()),
                log_response_headers: none_if_empty(config.log_response_headers.clone()),
                forward_headers: config.forward_headers,
                scope_cookie_paths: config.scope_cookie_paths,
                unknown: unknown.target_options,
            },
            active_targets: state.targets.clone(),
            active_readers: config.read_targets.clone(),
            rollout_targets: has_rollout.then(|| state.rollout_targets.clone()),
            rollout_readers: has_rollout.then(|| state.rollout_read_targets.clone()),
            pause_controller: Some(PauseController {
                state: pause_state,
                stop_message,
                fail_after: Nanoseconds::from_duration(fail_after),
            }),
            rollout_controller: state.rollout.as_ref().map(|split| RolloutController {
                percentage: u32::from(split.percent),
                percentage_split_point: f64::from(u32::MAX) * f64::from(split.percent) / 100.0,
                allowlist: split.allowlist.clone(),
                disabled: false,
                berth_assign_cookies: split.assign_cookies,
            }),
            unknown: unknown.service,
            ..Service::default()
        }
    }
}
