//! The state file loader: whatever bytes are on disk, restoring from them never panics. A
//! file that does not parse is set aside and the registry starts empty.
#![no_main]

use berth_control::{Registry, StateFile};
use berth_proxy::upstream::upstream_client;
use berth_proxy::RouteTableHandle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kamal-proxy.state");
    std::fs::write(&path, bytes).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = upstream_client(std::time::Duration::from_millis(1));
        let registry = Registry::new(RouteTableHandle::default(), client, StateFile::new(&path));
        let _ = registry.restore();
        let _ = registry.list();
        let _ = registry.status();
    });
});
