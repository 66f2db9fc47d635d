//! The options a deploy gives a service. The control plane validates and persists them; the
//! data plane reads them on every request through the service they belong to.

use serde::{Deserialize, Serialize};

use crate::GoDuration;

pub const DEFAULT_DEPLOY_TIMEOUT: GoDuration = GoDuration::from_secs(30);
pub const DEFAULT_DRAIN_TIMEOUT: GoDuration = GoDuration::from_secs(30);
pub const DEFAULT_PAUSE_TIMEOUT: GoDuration = GoDuration::from_secs(30);
pub const DEFAULT_TARGET_TIMEOUT: GoDuration = GoDuration::from_secs(30);
pub const DEFAULT_HEALTH_CHECK_INTERVAL: GoDuration = GoDuration::from_secs(1);
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: GoDuration = GoDuration::from_secs(5);
pub const DEFAULT_HEALTH_CHECK_PATH: &str = "/up";
pub const DEFAULT_BUFFER_MEMORY: u64 = 1024 * 1024;
pub const DEFAULT_WRITER_AFFINITY_TIMEOUT: GoDuration = GoDuration::from_secs(1);

/// Everything about a service except its name and targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceConfig {
    /// Host names served; empty means every host not claimed by another service.
    pub hosts: Vec<String>,
    /// Path prefixes served, normalised (`/` when none were given).
    pub path_prefixes: Vec<String>,
    pub strip_path_prefix: bool,
    pub tls: TlsConfig,
    pub health_check: HealthCheckConfig,
    /// Time allowed for the target to send its response head.
    pub target_timeout: GoDuration,
    pub buffering: BufferConfig,
    pub forward_headers: bool,
    /// Header to take the client address from instead of the peer address.
    pub client_ip_header: Option<String>,
    pub log_request_headers: Vec<String>,
    pub log_response_headers: Vec<String>,
    pub error_pages: Option<String>,
    // Accepted and stored for compatibility; see `proxy deploy --help` for which are active.
    pub read_targets: Vec<String>,
    pub writer_affinity_timeout: GoDuration,
    pub read_target_websockets: bool,
    pub exclude_metrics_path: Vec<String>,
    pub scope_cookie_paths: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            hosts: Vec::new(),
            path_prefixes: vec!["/".to_string()],
            strip_path_prefix: true,
            tls: TlsConfig::default(),
            health_check: HealthCheckConfig::default(),
            target_timeout: DEFAULT_TARGET_TIMEOUT,
            buffering: BufferConfig::default(),
            forward_headers: true,
            client_ip_header: None,
            log_request_headers: Vec::new(),
            log_response_headers: Vec::new(),
            error_pages: None,
            read_targets: Vec::new(),
            writer_affinity_timeout: DEFAULT_WRITER_AFFINITY_TIMEOUT,
            read_target_websockets: false,
            exclude_metrics_path: Vec::new(),
            scope_cookie_paths: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    pub enabled: bool,
    pub redirect: bool,
    /// The ACME directory as kamal-proxy stores it: `""` for Let's Encrypt production, else
    /// its URL (Let's Encrypt staging with `--tls-staging`). `None` until a deploy gives it
    /// the daemon's default.
    pub acme_directory: Option<String>,
    pub on_demand_url: Option<String>,
    pub certificate_path: Option<String>,
    pub private_key_path: Option<String>,
    pub acme_cache_path: Option<String>,
    pub canonical_host: Option<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            redirect: true,
            acme_directory: None,
            on_demand_url: None,
            certificate_path: None,
            private_key_path: None,
            acme_cache_path: None,
            canonical_host: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthCheckConfig {
    pub path: String,
    /// Port to check; `None` means the target's own port.
    pub port: Option<u16>,
    /// Host header to send; `None` means the target address.
    pub host: Option<String>,
    pub interval: GoDuration,
    pub timeout: GoDuration,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: DEFAULT_HEALTH_CHECK_PATH.to_string(),
            port: None,
            host: None,
            interval: DEFAULT_HEALTH_CHECK_INTERVAL,
            timeout: DEFAULT_HEALTH_CHECK_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BufferConfig {
    pub requests: bool,
    pub responses: bool,
    /// Bytes kept in memory per body before spilling to a temporary file.
    pub memory: u64,
    /// 0 means unlimited.
    pub max_request_body: u64,
    /// 0 means unlimited.
    pub max_response_body: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            requests: false,
            responses: false,
            memory: DEFAULT_BUFFER_MEMORY,
            max_request_body: 0,
            max_response_body: 0,
        }
    }
}

/// Lower-cases a host and removes a trailing dot and any port, the form routing compares.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim().trim_end_matches('.');
    host.to_ascii_lowercase()
}

/// `api/` → `/api`, `` → `/`: a leading slash and no trailing one, except the root.
/// Whether a normalised host pattern can match requests: a DNS name (labels of letters,
/// digits, `-` and `_`), optionally with `*.` in front, or a bracketed IPv6 address; never a
/// port, since requests are matched with theirs removed.
pub fn is_valid_host_pattern(host: &str) -> bool {
    if let Some(address) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return address.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

pub fn normalize_path_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim().trim_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        format!("/{trimmed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_prefixes_normalise_to_leading_slash_without_trailing() {
        assert_eq!(normalize_path_prefix("api/"), "/api");
        assert_eq!(normalize_path_prefix("/api"), "/api");
        assert_eq!(normalize_path_prefix(""), "/");
        assert_eq!(normalize_path_prefix("/"), "/");
        assert_eq!(normalize_path_prefix("/a/b/"), "/a/b");
    }

    #[test]
    fn host_patterns_that_could_never_match_are_invalid() {
        for valid in ["app.test", "*.example.com", "a_b-c.d", "[::1]", "localhost"] {
            assert!(is_valid_host_pattern(valid), "{valid}");
        }
        // Found by fuzzing (fuzz/route_patterns): a port or stray brackets made a host that
        // requests, matched without their port, could never reach.
        for invalid in [
            "app.test:8080",
            "[a]b",
            "[\0\0%\u{15}]\0;\u{15}",
            "a..b",
            "*",
            "*.",
            "[::1]:80",
            "a b",
        ] {
            assert!(!is_valid_host_pattern(invalid), "{invalid}");
        }
    }

    #[test]
    fn state_written_by_an_older_version_fills_in_defaults() {
        let config: ServiceConfig = serde_json::from_str(r#"{"hosts":["a.test"]}"#).unwrap();
        assert_eq!(config.hosts, vec!["a.test"]);
        assert_eq!(config.path_prefixes, vec!["/"]);
        assert!(config.strip_path_prefix);
        assert_eq!(config.health_check.path, "/up");
    }
}
