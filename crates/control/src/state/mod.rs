//! The persisted state: every service with its options, targets and pause state, in
//! kamal-proxy's own format ([`kamal_format`]), so a host moves from kamal-proxy to Berth and
//! back with nothing lost. Written to a temporary file, synced and renamed over the old one,
//! so a crash leaves either the old state or the new one, never half of either.
//!
//! A file in Berth's earlier format (`{"version": 1, "services": [...]}`) is converted on
//! first load; the original is kept beside it as `<state>.berth-v1`.

use std::io::Write;
use std::path::{Path, PathBuf};

use berth_proxy::config::ServiceConfig;
use berth_proxy::{GoDuration, RolloutSplit};
use serde::Deserialize;

mod kamal_format;

pub use kamal_format::UnknownKeys;

/// Where Berth's earlier format put `--tls-staging`'s directory.
const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot save state to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub services: Vec<ServiceState>,
}

/// One saved service. Also Berth's earlier on-disk form (read only, for the conversion).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub targets: Vec<String>,
    pub config: ServiceConfig,
    #[serde(default)]
    pub pause: PersistedPause,
    /// Canary targets from `rollout deploy`.
    #[serde(default)]
    pub rollout_targets: Vec<String>,
    /// Read targets of the canary (`rollout_readers`).
    #[serde(skip)]
    pub rollout_read_targets: Vec<String>,
    /// The split from `rollout set`; none means the rollout targets get no traffic.
    #[serde(default)]
    pub rollout: Option<RolloutSplit>,
    /// What the file held that Berth does not know, written back as it was.
    #[serde(skip)]
    pub unknown: UnknownKeys,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum PersistedPause {
    #[default]
    Running,
    Paused {
        max_pause: GoDuration,
    },
    Stopped {
        message: Option<String>,
    },
}

/// Berth's earlier state file.
#[derive(Deserialize)]
struct BerthV1 {
    services: Vec<ServiceState>,
}

/// The state file at a fixed path.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; an empty one when no file exists yet. A file in Berth's earlier
    /// format is converted and saved in kamal-proxy's, the original kept beside it.
    pub fn load(&self) -> Result<State, StateError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let parse_error = |source| StateError::Parse {
            path: self.path.clone(),
            source,
        };
        let value: serde_json::Value = serde_json::from_slice(&text).map_err(parse_error)?;
        if value.is_object() && value.get("services").is_some() {
            return self.convert_berth_v1(value);
        }
        let services: Vec<kamal_format::Service> =
            serde_json::from_value(value).map_err(parse_error)?;
        Ok(State {
            services: services
                .into_iter()
                .map(kamal_format::Service::into_state)
                .collect(),
        })
    }

    fn convert_berth_v1(&self, mut value: serde_json::Value) -> Result<State, StateError> {
        // The earlier format had `staging: true` where kamal-proxy names the directory.
        if let Some(services) = value["services"].as_array_mut() {
            for service in services {
                let tls = service
                    .pointer_mut("/config/tls")
                    .and_then(|tls| tls.as_object_mut());
                if let Some(tls) = tls.filter(|tls| tls.get("staging") == Some(&true.into())) {
                    tls.insert("acme_directory".into(), LETS_ENCRYPT_STAGING.into());
                }
            }
        }
        let old: BerthV1 = serde_json::from_value(value).map_err(|source| StateError::Parse {
            path: self.path.clone(),
            source,
        })?;
        let state = State {
            services: old.services,
        };
        let kept = self.beside("berth-v1");
        if !kept.exists() {
            std::fs::copy(&self.path, &kept).map_err(|source| StateError::Write {
                path: kept.clone(),
                source,
            })?;
        }
        self.save(&state)?;
        tracing::info!(path = %self.path.display(), kept = %kept.display(), services = state.services.len(), "State file converted to kamal-proxy's format");
        Ok(state)
    }

    /// `<state file>.<suffix>`.
    fn beside(&self, suffix: &str) -> PathBuf {
        let mut path = self.path.as_os_str().to_owned();
        path.push(format!(".{suffix}"));
        PathBuf::from(path)
    }

    /// Moves an unreadable state file aside (kept, for an operator to inspect) so the daemon
    /// can start; returns where it went.
    pub fn set_aside(&self) -> std::io::Result<PathBuf> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let aside = self.beside(&format!("unreadable-{stamp}"));
        std::fs::rename(&self.path, &aside)?;
        Ok(aside)
    }

    /// Replaces the saved state atomically.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let wrap = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        // Owner-only, as kamal-proxy makes its config directory.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .map_err(wrap)?;
        let services: Vec<kamal_format::Service> = state
            .services
            .iter()
            .map(kamal_format::Service::from_state)
            .collect();
        let json =
            serde_json::to_vec_pretty(&services).map_err(|e| wrap(std::io::Error::other(e)))?;
        let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(wrap)?;
        temp.write_all(&json).map_err(wrap)?;
        temp.as_file().sync_all().map_err(wrap)?;
        temp.persist(&self.path).map_err(|e| wrap(e.error))?;
        // The rename is durable only once the directory entry is.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proxy::config::TlsConfig;

    const FIXTURE: &str = include_str!("../../../../tests/fixtures/kamal-proxy/kamal-proxy.state");

    /// A state file path in a fresh directory (kept alive by the returned guard).
    fn scratch_state() -> (tempfile::TempDir, StateFile) {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("kamal-proxy.state"));
        (dir, file)
    }

    fn sample() -> State {
        State {
            services: vec![ServiceState {
                name: "web".into(),
                targets: vec!["127.0.0.1:3000".into()],
                config: ServiceConfig {
                    hosts: vec!["a.test".into()],
                    // What the file says when no directory is named: Let's Encrypt.
                    tls: TlsConfig {
                        acme_directory: Some(String::new()),
                        ..TlsConfig::default()
                    },
                    ..ServiceConfig::default()
                },
                pause: PersistedPause::Stopped {
                    message: Some("maintenance".into()),
                },
                rollout_targets: vec!["127.0.0.1:3001".into()],
                rollout_read_targets: vec!["127.0.0.1:3002".into()],
                rollout: Some(RolloutSplit::new(25, vec!["staff".into()]).unwrap()),
                unknown: UnknownKeys::default(),
            }],
        }
    }

    #[test]
    fn saved_state_loads_back_identical() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("sub/kamal-proxy.state"));
        assert_eq!(file.load().unwrap(), State::default());
        file.save(&sample()).unwrap();
        assert_eq!(file.load().unwrap(), sample());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files are left behind");
    }

    #[test]
    fn kamal_proxys_file_reads_and_writes_back_the_same_json() {
        let (_dir, file) = scratch_state();
        std::fs::write(file.path(), FIXTURE).unwrap();
        let state = file.load().unwrap();
        let names: Vec<&str> = state.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shop-web", "shop-api", "blog-staging", "reports"]);

        let api = &state.services[1];
        assert_eq!(api.config.path_prefixes, ["/api"]);
        assert!(api.config.buffering.requests && api.config.buffering.responses);
        assert_eq!(api.config.buffering.max_request_body, 1_000_000);
        assert_eq!(api.config.target_timeout, GoDuration::from_secs(10));
        assert_eq!(api.config.log_request_headers, ["User-Agent"]);
        assert_eq!(
            api.pause,
            PersistedPause::Paused {
                max_pause: GoDuration::from_secs(20)
            }
        );
        let blog = &state.services[2];
        assert_eq!(blog.rollout_targets, ["127.0.0.1:3011"]);
        assert_eq!(
            blog.rollout,
            Some(RolloutSplit::new(25, vec!["beta-1".into(), "beta-2".into()]).unwrap())
        );
        assert_eq!(blog.config.health_check.interval, GoDuration::from_secs(2));
        let reports = &state.services[3];
        assert_eq!(reports.config.read_targets, ["127.0.0.1:3012"]);
        assert_eq!(
            reports.pause,
            PersistedPause::Stopped {
                message: Some("Back at noon".into())
            }
        );

        // Written back, it is the same JSON kamal-proxy wrote, value for value.
        file.save(&state).unwrap();
        let original: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(file.path()).unwrap()).unwrap();
        assert_eq!(written, original);
    }

    #[test]
    fn keys_berth_does_not_know_survive_a_round_trip() {
        let (_dir, file) = scratch_state();
        let mut services: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        services[0]["future_field"] = serde_json::json!({"a": [1, 2]});
        services[0]["options"]["future_option"] = "x".into();
        services[0]["target_options"]["future_target_option"] = 7.into();
        services[0]["target_options"]["health_check_config"]["future_check"] = true.into();
        std::fs::write(file.path(), services.to_string()).unwrap();
        let state = file.load().unwrap();
        file.save(&state).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(file.path()).unwrap()).unwrap();
        assert_eq!(written, services);
    }

    #[test]
    fn older_kamal_proxy_single_target_fields_are_read() {
        let (_dir, file) = scratch_state();
        std::fs::write(
            file.path(),
            r#"[{"name":"old","hosts":["old.test"],"path_prefixes":["/app"],
                 "active_target":"127.0.0.1:3000","rollout_target":"127.0.0.1:3001",
                 "options":{"hosts":null,"tls_redirect":true},"target_options":{}}]"#,
        )
        .unwrap();
        let service = &file.load().unwrap().services[0];
        assert_eq!(service.targets, ["127.0.0.1:3000"]);
        assert_eq!(service.rollout_targets, ["127.0.0.1:3001"]);
        assert_eq!(service.config.hosts, ["old.test"]);
        assert_eq!(service.config.path_prefixes, ["/app"]);
        assert_eq!(service.config.health_check.path, "/up");
        assert_eq!(service.pause, PersistedPause::Running);
    }

    #[test]
    fn berths_earlier_format_is_converted_once_and_kept_beside() {
        let (dir, file) = scratch_state();
        let old = r#"{"version":1,"services":[{"name":"web","targets":["127.0.0.1:3000"],
            "config":{"hosts":["a.test"],"tls":{"enabled":true,"staging":true}},
            "pause":{"state":"paused","max_pause":"20s"},
            "rollout_targets":["127.0.0.1:3001"],"rollout":{"percent":10}}]}"#;
        std::fs::write(file.path(), old).unwrap();
        let state = file.load().unwrap();
        let web = &state.services[0];
        assert_eq!(web.targets, ["127.0.0.1:3000"]);
        assert_eq!(
            web.config.tls.acme_directory.as_deref(),
            Some(LETS_ENCRYPT_STAGING)
        );
        assert_eq!(
            web.pause,
            PersistedPause::Paused {
                max_pause: GoDuration::from_secs(20)
            }
        );
        assert_eq!(web.rollout, Some(RolloutSplit::new(10, vec![]).unwrap()));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("kamal-proxy.state.berth-v1")).unwrap(),
            old
        );
        let converted: serde_json::Value =
            serde_json::from_slice(&std::fs::read(file.path()).unwrap()).unwrap();
        assert!(converted.is_array(), "{converted}");
        assert_eq!(file.load().unwrap(), state);
    }

    #[test]
    fn an_unreadable_file_is_set_aside_intact() {
        let (_dir, file) = scratch_state();
        std::fs::write(file.path(), b"[{\"name\": 3}]").unwrap();
        assert!(file.load().is_err());
        let aside = file.set_aside().unwrap();
        assert_eq!(std::fs::read(&aside).unwrap(), b"[{\"name\": 3}]");
        assert_eq!(file.load().unwrap(), State::default());
    }

    #[test]
    fn garbage_is_reported_not_loaded() {
        let (_dir, file) = scratch_state();
        std::fs::write(file.path(), b"{not json").unwrap();
        assert!(matches!(file.load(), Err(StateError::Parse { .. })));
    }
}
