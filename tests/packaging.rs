//! The files operators install: the systemd unit must pass `systemd-analyze verify`.

use std::process::Command;

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "systemd-analyze is missing: apt-get install systemd (.ci/run does)"
    );
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/proxy.service"
    ))
    .unwrap();
    for directive in [
        "ExecReload=/bin/kill -USR2 $MAINPID",
        "Type=notify",
        "NotifyAccess=all",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "StateDirectory=kamal-proxy",
        "RuntimeDirectory=kamal-proxy",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "User=kamal-proxy",
    ] {
        assert!(unit.contains(directive), "the unit lacks {directive}");
    }
    // Verified against the binary this build made, in place of the installed path.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/proxy", env!("CARGO_BIN_EXE_proxy")),
    )
    .unwrap();
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
