//! The persisted state: every service with its options, targets and pause state, as one JSON
//! file. Written to a temporary file, synced and renamed over the old one, so a crash leaves
//! either the old state or the new one, never half of either.

use std::io::Write;
use std::path::{Path, PathBuf};

use berth_proxy::config::ServiceConfig;
use berth_proxy::{GoDuration, RolloutSplit};
use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u32 = 1;

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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub services: Vec<ServiceState>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub targets: Vec<String>,
    pub config: ServiceConfig,
    #[serde(default)]
    pub pause: PersistedPause,
    /// Canary targets from `rollout deploy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollout_targets: Vec<String>,
    /// The split from `rollout set`; none means the rollout targets get no traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSplit>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

    /// The saved state; an empty one when no file exists yet.
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
        serde_json::from_slice(&text).map_err(|source| StateError::Parse {
            path: self.path.clone(),
            source,
        })
    }

    /// Moves an unreadable state file aside (kept, for an operator to inspect) so the daemon
    /// can start; returns where it went.
    pub fn set_aside(&self) -> std::io::Result<PathBuf> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut aside = self.path.as_os_str().to_owned();
        aside.push(format!(".unreadable-{stamp}"));
        let aside = PathBuf::from(aside);
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
        std::fs::create_dir_all(dir).map_err(wrap)?;
        let mut state = state.clone();
        state.version = FORMAT_VERSION;
        let json = serde_json::to_vec_pretty(&state).map_err(|e| wrap(std::io::Error::other(e)))?;
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

    fn sample() -> State {
        State {
            version: FORMAT_VERSION,
            services: vec![ServiceState {
                name: "web".into(),
                targets: vec!["127.0.0.1:3000".into()],
                config: ServiceConfig::default(),
                pause: PersistedPause::Stopped {
                    message: Some("maintenance".into()),
                },
                rollout_targets: vec!["127.0.0.1:3001".into()],
                rollout: Some(RolloutSplit::new(25, vec!["staff".into()]).unwrap()),
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
    fn an_unreadable_file_is_set_aside_intact() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("kamal-proxy.state"));
        std::fs::write(file.path(), b"[{\"name\":\"from kamal-proxy\"}]").unwrap();
        assert!(file.load().is_err());
        let aside = file.set_aside().unwrap();
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            b"[{\"name\":\"from kamal-proxy\"}]"
        );
        assert_eq!(file.load().unwrap(), State::default());
    }

    #[test]
    fn garbage_is_reported_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("kamal-proxy.state"));
        std::fs::write(file.path(), b"{not json").unwrap();
        assert!(matches!(file.load(), Err(StateError::Parse { .. })));
    }
}
