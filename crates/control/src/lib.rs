//! Berth's control plane: how deploy tools change what the data plane serves.
//!
//! # Layout
//! - [`registry`]: the set of services and every change to it (deploy with its health gate
//!   and drain, remove, stop, pause, resume), publishing routing snapshots to the data plane.
//! - [`state`]: the state file, written atomically after every change and restored at start.
//! - [`api`]: the axum JSON API on the owner-only Unix socket; [`protocol`] lists its
//!   endpoints and messages.
//! - [`client`]: the client the CLI uses to call the API.
//! - [`paths`]: where the socket, state and certificates live (kamal-proxy's paths).

pub mod api;
pub mod client;
pub mod paths;
mod progress;
pub mod protocol;
pub mod registry;
pub mod state;

pub use client::{ClientError, ControlClient};
pub use protocol::{
    DeployRequest, PauseRequest, RolloutDeployRequest, RolloutSetRequest, StopRequest,
};
pub use registry::{Registry, RegistryError, TlsProvider};
pub use state::StateFile;
