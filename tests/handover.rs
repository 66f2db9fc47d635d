//! Upgrading the proxy itself: a new process takes over the listeners of the running one
//! under load, and not one request fails.

mod common;

use std::time::{Duration, Instant};

use common::load::{Load, LoadResult, Traffic};
use common::{get, ProxyProcess, Upstream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long an old process drains in these tests.
const DRAIN: &str = "--upgrade-drain-timeout=3s";

fn assert_no_failures(served: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failed requests (of {}): {:?}",
        failures.len(),
        served + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served > 100, "load was applied ({served} requests)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_under_load_drops_no_request() {
    let mut old = ProxyProcess::start_with(&[DRAIN]);
    let app = Upstream::start("app").await;
    old.deploy("web", &app.target(), &["--host=app.test"]);
    let routes_before = old.ok(&["list"]);

    let load = Load::start(old.address(), "app.test", "/", 32);
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let address = old.address();
            tokio::spawn(async move { get(address, "app.test", "/slow?ms=2000").await })
        })
        .collect();
    let stream = TcpStream::connect(old.address()).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async("ws://app.test/ws", stream)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let new = tokio::task::block_in_place(|| old.upgrade());
    // The WebSocket opened on the old process keeps working while it drains...
    socket.send(Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(2), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.to_text().unwrap(), "still here");

    for request in slow {
        let reply = request.await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "app slow"),
            "a slow request was cut"
        );
    }
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| old.wait_for_exit(Duration::from_secs(15)));
    assert!(
        status.success(),
        "old process exited with {status}:\n{}",
        old.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "old process outlived its drain time"
    );
    // ...until the old process's drain time is up.
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the old process's WebSocket outlived the process"
    );

    let served_before_end = load.served();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let LoadResult {
        served, failures, ..
    } = load.finish().await;
    assert_no_failures(served, &failures);
    assert!(served > served_before_end, "the new process serves");

    assert_eq!(
        new.ok(&["list"]),
        routes_before,
        "routes identical after the handover"
    );
    let stream = TcpStream::connect(new.address()).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async("ws://app.test/ws", stream)
        .await
        .unwrap();
    socket.send(Message::text("new process")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(2), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.to_text().unwrap(), "new process");
    let is_request = |line: &serde_json::Value| line["msg"] == "Request";
    assert!(
        new.log_lines_once(|lines| lines.iter().any(is_request))
            .iter()
            .any(is_request),
        "requests reached the new process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_handovers_in_a_row_under_load() {
    let mut current = ProxyProcess::start_with(&[DRAIN]);
    let app = Upstream::start("app").await;
    current.deploy("web", &app.target(), &["--host=app.test"]);
    let routes = current.ok(&["list"]);
    let load = Load::start(current.address(), "app.test", "/", 32);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for round in 1..=3 {
        let next = tokio::task::block_in_place(|| current.upgrade());
        let status = tokio::task::block_in_place(|| current.wait_for_exit(Duration::from_secs(15)));
        assert!(
            status.success(),
            "round {round}: old process exited with {status}"
        );
        assert_eq!(next.ok(&["list"]), routes, "round {round}: routes changed");
        current = next;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let LoadResult {
        served, failures, ..
    } = load.finish().await;
    assert_no_failures(served, &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_under_way_finishes_first_and_one_issued_during_the_handover_reaches_the_new_process(
) {
    let mut old = ProxyProcess::start_with(&[DRAIN]);
    let app = Upstream::start("app").await;
    let late = std::sync::Arc::new(Upstream::start("late").await);
    let other = Upstream::start("other").await;
    old.deploy("web", &app.target(), &["--host=app.test"]);

    // A deploy that waits ~1 s for its target to turn healthy is under way when the
    // handover starts: the old process finishes it before handing over.
    late.set_health(503);
    let slow_deploy = {
        let target = late.target();
        let home = old.home().to_path_buf();
        let socket = old.socket();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
                .args([
                    "deploy",
                    "late",
                    &format!("--target={target}"),
                    "--host=late.test",
                    "--health-check-interval=100ms",
                ])
                .env("HOME", home)
                .env("KAMAL_PROXY_SOCKET", socket)
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let healthy_soon = tokio::spawn({
        let late = late.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2000)).await;
            late.set_health(200);
        }
    });
    // The upgrade starts while the slow deploy runs; a deploy issued meanwhile meets the
    // frozen old process, is told to retry, and lands in the new one.
    let other_target = other.target();
    let (new, other_deploy) = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let upgrading = scope.spawn(|| old.upgrade());
            let deadline = Instant::now() + Duration::from_secs(10);
            while !old.log().contains("A new process asks to take over") {
                assert!(Instant::now() < deadline, "the handover did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            let deploy = old.cli(&[
                "deploy",
                "other",
                &format!("--target={other_target}"),
                "--host=other.test",
                "--health-check-interval=100ms",
            ]);
            (upgrading.join().unwrap(), deploy)
        })
    });
    healthy_soon.await.unwrap();
    assert!(
        other_deploy.status.success(),
        "deploy during the handover failed: {}",
        String::from_utf8_lossy(&other_deploy.stderr)
    );
    assert!(
        old.log().contains("Change refused: handing over"),
        "the deploy never met the frozen old process"
    );

    let output = slow_deploy.await.unwrap();
    assert!(
        output.status.success(),
        "deploy under way failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let status = tokio::task::block_in_place(|| old.wait_for_exit(Duration::from_secs(15)));
    assert!(status.success());
    let list = new.ok(&["list"]);
    for service in ["web", "late", "other"] {
        assert!(
            list.contains(service),
            "{service} missing after the handover:\n{list}"
        );
    }
    let body = get(new.address(), "late.test", "/").await.body;
    assert!(body.contains("\"late\""), "{body}");
    assert!(get(new.address(), "other.test", "/")
        .await
        .body
        .contains("\"other\""));
}

/// What `systemctl reload` does (ExecReload sends SIGUSR2): the running process starts the
/// binary at its path with `--upgrade`, which takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_a_successor_that_takes_over() {
    let mut old = ProxyProcess::start_with(&[DRAIN]);
    let app = Upstream::start("app").await;
    old.deploy("web", &app.target(), &["--host=app.test"]);
    let load = Load::start(old.address(), "app.test", "/", 8);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let old_pid = old.pid();
    std::process::Command::new("kill")
        .args(["-USR2", &old_pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::task::block_in_place(|| old.wait_for_exit(Duration::from_secs(20)));
    assert!(
        status.success(),
        "old process exited with {status}:\n{}",
        old.log()
    );

    let successor_pid = old
        .log_lines()
        .iter()
        .filter(|l| l["msg"] == "Proxy started" && l["upgrade"] == true)
        .filter_map(|l| l["pid"].as_u64())
        .next()
        .unwrap_or_else(|| panic!("no successor started:\n{}", old.log()));
    let LoadResult {
        served, failures, ..
    } = load.finish().await;
    let list = old.cli(&["list"]);
    let reply = get(old.address(), "app.test", "/").await;
    std::process::Command::new("kill")
        .args(["-TERM", &successor_pid.to_string()])
        .status()
        .unwrap();

    assert_no_failures(served, &failures);
    assert!(list.status.success() && String::from_utf8_lossy(&list.stdout).contains("web"));
    assert_eq!(reply.status, 200);
}

/// Fifty upgrades in a row under load, keep-alive clients and clients opening a connection
/// for every request (so connections are being accepted at every instant of each hand-off):
/// not one request may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_handovers_in_a_row_under_load_fail_no_request() {
    let mut current = ProxyProcess::start_with(&["--upgrade-drain-timeout=2s"]);
    let app = Upstream::start("app").await;
    current.deploy("web", &app.target(), &["--host=app.test"]);
    let keep_alive = Load::start(current.address(), "app.test", "/", 8);
    let fresh = Load::start_traffic(
        current.address(),
        Traffic::GetOnNewConnections {
            host: "app.test".into(),
            path: "/".into(),
        },
        8,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for round in 1..=50 {
        let next = tokio::task::block_in_place(|| current.upgrade());
        let status = tokio::task::block_in_place(|| current.wait_for_exit(Duration::from_secs(15)));
        assert!(
            status.success(),
            "round {round}: old process exited with {status}:\n{}",
            current.log()
        );
        current = next;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (kind, load) in [("keep-alive", keep_alive), ("new connections", fresh)] {
        let LoadResult {
            served, failures, ..
        } = load.finish().await;
        assert!(
            failures.is_empty(),
            "{kind}: {failures:?}\nconnections the drain deadline closed:\n{}",
            deadline_closes(current.home())
        );
        assert_no_failures(served, &failures);
    }
}

/// The "Drain time is up" lines of every process that ran in `home`: which connections each
/// old process still had when its drain time ran out.
fn deadline_closes(home: &std::path::Path) -> String {
    let mut lines = String::new();
    for entry in std::fs::read_dir(home).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("proxy-") && name.ends_with(".log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("Drain time is up")) {
                lines.push_str(&format!("{name}: {line}\n"));
            }
        }
    }
    lines
}
