//! The files operators install: the systemd unit must pass `systemd-analyze verify`, and the
//! image's user must own kamal-proxy's volume as kamal-proxy's own image does.

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

/// `docker build` cannot run here, so the Dockerfile is read: its user must be 1001:1001, the
/// ids kamal-proxy's image gets from `useradd` on ubuntu:noble (where 1000 is `ubuntu`), so
/// the `kamal-proxy-config` volume stays readable and writable across a swap either way.
#[test]
fn the_image_user_has_kamal_proxys_uid_and_gid() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let words: Vec<&str> = dockerfile.split_whitespace().collect();
    let after = |command: &str, flag: &str| -> Option<String> {
        let start = words.iter().position(|w| *w == command)?;
        let rest = &words[start..];
        let end = rest.iter().position(|w| *w == "&&").unwrap_or(rest.len());
        let args = &rest[..end];
        let at = args.iter().position(|w| *w == flag)?;
        args.get(at + 1).map(|v| v.to_string())
    };
    assert_eq!(
        after("groupadd", "--gid").as_deref(),
        Some("1001"),
        "{dockerfile}"
    );
    assert_eq!(
        after("useradd", "--uid").as_deref(),
        Some("1001"),
        "{dockerfile}"
    );
    assert_eq!(
        after("useradd", "--gid").as_deref(),
        Some("1001"),
        "{dockerfile}"
    );
    let user_line = dockerfile
        .lines()
        .find(|line| line.starts_with("USER "))
        .expect("a USER line");
    assert_eq!(user_line.trim(), "USER kamal-proxy:kamal-proxy");
    assert!(
        words.contains(&"kamal-proxy")
            && dockerfile.contains("/home/kamal-proxy/.config/kamal-proxy"),
        "the volume path is kamal-proxy's"
    );
}
