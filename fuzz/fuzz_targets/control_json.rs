//! The control API's JSON: any body for deploy, stop, pause or rollout either parses and is
//! validated, or is refused; never a panic.
#![no_main]

use berth_control::protocol::{PauseRequest, RolloutSetRequest, StopRequest};
use berth_control::registry::normalize_config;
use berth_control::DeployRequest;
use berth_proxy::{RolloutSplit, Target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<DeployRequest>(bytes) {
        if let Ok(config) = normalize_config(request.config) {
            for address in &request.targets {
                let _ = Target::new(address, config.health_check.clone());
            }
        }
    }
    let _ = serde_json::from_slice::<StopRequest>(bytes);
    let _ = serde_json::from_slice::<PauseRequest>(bytes);
    if let Ok(split) = serde_json::from_slice::<RolloutSetRequest>(bytes) {
        let _ = RolloutSplit::new(split.percent, split.allowlist);
    }
});
