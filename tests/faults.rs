//! Faults around the proxy: upstreams that refuse, reset, hang or talk nonsense; health
//! checks that flap; a target dying mid-deploy; the proxy killed with SIGKILL in the middle
//! of a burst of deploys; a state file that cannot be written.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::pebble::free_port;
use common::{get, Connection, ProxyProcess, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw TCP upstream: health checks pass; other paths misbehave as they are named.
async fn broken_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(misbehave(stream));
        }
    });
    address
}

async fn misbehave(mut stream: TcpStream) {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        match path.as_str() {
            "/up" => {
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                if stream.write_all(ok).await.is_err() {
                    return;
                }
            }
            "/garbage" => {
                let _ = stream.write_all(b"this is not HTTP at all\r\n\r\n").await;
                return;
            }
            "/cut-head" => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
                return;
            }
            "/reset" => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial body")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Linger 0: closing sends RST, not FIN.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                return;
            }
            _ => {
                // "/hang" and anything else: never answer.
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
        }
    }
}

async fn check_bystander(bystander: &mut Connection) {
    let reply = bystander
        .get("good.test", "/")
        .await
        .expect("bystander served");
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_upstream_fails_only_its_own_requests() {
    let proxy = ProxyProcess::start();
    let broken = broken_upstream().await.to_string();
    let good = Upstream::start("good").await;
    proxy.deploy("good", &good.target(), &["--host=good.test"]);
    proxy.deploy(
        "broken",
        &broken,
        &["--host=broken.test", "--target-timeout=1s"],
    );
    proxy.deploy(
        "buffered",
        &broken,
        &[
            "--host=buffered.test",
            "--target-timeout=1s",
            "--buffer-responses",
        ],
    );
    let closed_port = free_port();
    proxy.deploy(
        "refused",
        &format!("127.0.0.1:{closed_port}"),
        &["--host=refused.test", "--force"],
    );

    // One keep-alive client of the good service, used between every fault.
    let mut bystander = Connection::open(proxy.address()).await.unwrap();

    let cases = [
        ("broken.test", "/garbage", 502),
        ("broken.test", "/cut-head", 502),
        ("broken.test", "/hang", 504),
        ("buffered.test", "/reset", 502),
        ("buffered.test", "/garbage", 502),
        ("refused.test", "/", 502),
    ];
    for (host, path, status) in cases {
        check_bystander(&mut bystander).await;
        let reply = get(proxy.address(), host, path).await;
        assert_eq!(reply.status, status, "{host}{path}: {}", reply.body);
        assert!(reply.body.contains(&status.to_string()), "an error page");
    }

    // Unbuffered, the head has gone to the client when the target resets: the body is cut,
    // so the client sees an incomplete response rather than a complete wrong one.
    check_bystander(&mut bystander).await;
    let mut client = Connection::open(proxy.address()).await.unwrap();
    let cut = client.get("broken.test", "/reset").await;
    assert!(cut.is_err(), "a cut body must not look complete: {cut:?}");
    check_bystander(&mut bystander).await;
    assert_eq!(get(proxy.address(), "good.test", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_health_check_moves_traffic_and_fails_no_request() {
    let proxy = ProxyProcess::start();
    let steady = Upstream::start("steady").await;
    let flapping = Upstream::start("flapping").await;
    proxy.ok(&[
        "deploy",
        "web",
        &format!("--target={}", steady.target()),
        &format!("--target={}", flapping.target()),
        "--health-check-interval=50ms",
    ]);

    let flap = tokio::spawn({
        let flapping_health = flapping.health_control();
        async move {
            for round in 0..12 {
                flapping_health(if round % 2 == 0 { 503 } else { 200 });
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            flapping_health(200);
        }
    });
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    let mut served = 0;
    while !flap.is_finished() {
        let reply = connection.get("app.test", "/").await.expect("served");
        assert_eq!(reply.status, 200);
        served += 1;
    }
    flap.await.unwrap();
    assert!(served > 20, "load ran through the flapping: {served}");
    let changes = proxy
        .log_lines()
        .iter()
        .filter(|line| {
            line["msg"] == "Target health changed" && line["address"] == flapping.target()
        })
        .count();
    assert!(
        changes >= 4,
        "the proxy followed the flapping: {changes} changes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_dying_during_its_deploy_fails_the_deploy_and_the_old_one_serves() {
    let proxy = ProxyProcess::start();
    let old = Upstream::start("old").await;
    proxy.deploy("web", &old.target(), &[]);

    let doomed = Upstream::start("doomed").await;
    doomed.set_health(503);
    let target = doomed.target();
    let deploy = tokio::task::spawn_blocking({
        let socket = proxy.socket();
        let home = proxy.home().to_path_buf();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
                .args([
                    "deploy",
                    "web",
                    &format!("--target={target}"),
                    "--health-check-interval=100ms",
                    "--deploy-timeout=3s",
                ])
                .env("HOME", home)
                .env("KAMAL_PROXY_SOCKET", socket)
                .output()
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.stop();
    let output = deploy.await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("failed to become healthy") && error.contains("refused"),
        "the error names the last failure: {error}"
    );
    let reply = get(proxy.address(), "app.test", "/").await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("\"old\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_of_deploys_loses_neither_the_state_nor_a_finished_deploy() {
    let mut proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    for round in 0..3u64 {
        let deploys: Vec<(String, std::process::Child)> = (0..8)
            .map(|i| {
                let service = format!("svc-{round}-{i}");
                let child = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
                    .args([
                        "deploy",
                        &service,
                        &format!("--target={}", app.target()),
                        &format!("--host={service}.test"),
                        "--health-check-interval=20ms",
                    ])
                    .env("HOME", proxy.home())
                    .env("KAMAL_PROXY_SOCKET", proxy.socket())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                (service, child)
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30 + 40 * round)).await;
        proxy = proxy.crash_and_restart();
        let finished: Vec<String> = deploys
            .into_iter()
            .filter_map(|(service, mut child)| {
                let status = tokio::task::block_in_place(|| child.wait().unwrap());
                status.success().then_some(service)
            })
            .collect();

        let state = std::fs::read_to_string(proxy.state_path()).unwrap_or_default();
        if !state.is_empty() {
            serde_json::from_str::<serde_json::Value>(&state)
                .unwrap_or_else(|e| panic!("the state file is whole JSON ({e}): {state}"));
        }
        let listed = proxy.ok(&["list"]);
        for service in &finished {
            assert!(
                listed.contains(service.as_str()),
                "{service} was deployed before the kill, so it is back: {listed}"
            );
        }
        // Every service the state brought back serves its host.
        for line in listed.lines().skip(1) {
            let service = line.split_whitespace().next().unwrap();
            let reply = get(proxy.address(), &format!("{service}.test"), "/").await;
            assert_eq!(reply.status, 200, "{service}");
        }
    }
}

/// Size of the state file, or 0 if there is none.
fn state_bytes(proxy: &ProxyProcess) -> Vec<u8> {
    std::fs::read(proxy.state_path()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_the_change_and_keeps_the_previous_state() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("first", &app.target(), &["--host=first.test"]);
    let before = state_bytes(&proxy);
    assert!(!before.is_empty());

    // The file-size limit makes writes past it fail as a full disk does (EFBIG for ENOSPC).
    let limit = before.len() + 64;
    let set_limit = |limit: &str| {
        let status = std::process::Command::new("prlimit")
            // `N:` sets the soft limit only, so it can be raised again without privileges.
            .args([
                &format!("--fsize={limit}:"),
                "--pid",
                &proxy.pid().to_string(),
            ])
            .status()
            .expect("util-linux prlimit");
        assert!(status.success());
    };
    set_limit(&limit.to_string());
    let hosts: Vec<String> = (0..20).map(|i| format!("--host=second-{i}.test")).collect();
    let mut args = vec!["deploy", "second"];
    let target = format!("--target={}", app.target());
    args.push(&target);
    args.push("--health-check-interval=100ms");
    args.extend(hosts.iter().map(String::as_str));
    let refused = proxy.cli(&args);
    assert_eq!(refused.status.code(), Some(1));
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("cannot save state"), "{error}");

    assert_eq!(state_bytes(&proxy), before, "the previous state is intact");
    assert!(!proxy.ok(&["list"]).contains("second"));
    assert_eq!(get(proxy.address(), "second-1.test", "/").await.status, 404);
    assert_eq!(get(proxy.address(), "first.test", "/").await.status, 200);
    let leftovers: Vec<_> = std::fs::read_dir(proxy.state_path().parent().unwrap())
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary files left: {leftovers:?}"
    );

    // Space again: the same deploy goes through.
    set_limit("unlimited");
    proxy.ok(&args);
    assert_eq!(get(proxy.address(), "second-1.test", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_directory_refuses_changes_and_keeps_the_previous_state() {
    use std::os::unix::fs::PermissionsExt;
    let proxy = ProxyProcess::start_unprivileged();
    let app = Upstream::start("app").await;
    proxy.deploy("first", &app.target(), &["--host=first.test"]);
    let before = state_bytes(&proxy);
    let state_dir = proxy.state_path().parent().unwrap().to_path_buf();
    let set_mode = |mode: u32| {
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(mode)).unwrap()
    };

    set_mode(0o555);
    let target = format!("--target={}", app.target());
    let deploy = [
        "deploy",
        "second",
        target.as_str(),
        "--host=second.test",
        "--health-check-interval=100ms",
    ];
    let refused = proxy.cli(&deploy);
    let error = String::from_utf8_lossy(&refused.stderr).into_owned();
    let stop = proxy.cli(&["stop", "first", "--drain-timeout=1s"]);
    set_mode(0o755);

    assert_eq!(refused.status.code(), Some(1));
    assert!(
        error.contains("cannot save state") && error.contains("ermission denied"),
        "{error}"
    );
    assert_eq!(stop.status.code(), Some(1), "stopping is a change too");
    assert_eq!(state_bytes(&proxy), before, "the previous state is intact");
    let listed = proxy.ok(&["list"]);
    assert!(
        !listed.contains("second") && !listed.contains("stopped"),
        "{listed}"
    );
    assert_eq!(get(proxy.address(), "first.test", "/").await.status, 200);
    assert_eq!(get(proxy.address(), "second.test", "/").await.status, 404);

    // Writable again: the same deploy goes through.
    proxy.ok(&deploy);
    assert_eq!(get(proxy.address(), "second.test", "/").await.status, 200);
}
