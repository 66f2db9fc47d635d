//! Deploys end to end: the health gate, the swap under load, draining, load sharing.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::Load;
use common::{get, Connection, ProxyProcess, Upstream};

fn server_of(body: &str) -> String {
    let report: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    report["server"].as_str().unwrap_or("?").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_health_check_exits_1_and_old_target_keeps_serving() {
    let proxy = ProxyProcess::start();
    let old = Upstream::start("old").await;
    let broken = Upstream::start("broken").await;
    broken.set_health(503);
    proxy.deploy("web", &old.target(), &["--host=app.test"]);

    let output = proxy.cli(&[
        "deploy",
        "web",
        &format!("--target={}", broken.target()),
        "--host=app.test",
        "--deploy-timeout=1s",
        "--health-check-interval=100ms",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("target failed to become healthy within configured timeout"),
        "{stderr}"
    );
    assert!(
        stderr.contains("status 503"),
        "names the last failure: {stderr}"
    );
    assert_eq!(
        server_of(&get(proxy.address(), "app.test", "/").await.body),
        "old"
    );

    // A target nobody listens on fails with the connection error named.
    broken.stop();
    let output = proxy.cli(&[
        "deploy",
        "web",
        "--target=127.0.0.1:1",
        "--host=app.test",
        "--deploy-timeout=500ms",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("connection refused"));
    assert_eq!(
        server_of(&get(proxy.address(), "app.test", "/").await.body),
        "old"
    );
    assert!(
        proxy.ok(&["list"]).contains(&old.target()),
        "state still names the old target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_skips_the_health_gate() {
    let proxy = ProxyProcess::start();
    let unhealthy = Upstream::start("unhealthy").await;
    unhealthy.set_health(500);
    proxy.deploy(
        "web",
        &unhealthy.target(),
        &["--force", "--deploy-timeout=1s"],
    );
    assert_eq!(
        server_of(&get(proxy.address(), "any.test", "/").await.body),
        "unhealthy"
    );
}

/// The promise users judge us on: 32 keep-alive clients plus requests in flight for 2 s, a
/// swap in the middle, and not one failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_under_keep_alive_load_drops_no_request() {
    let proxy = Arc::new(ProxyProcess::start());
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    proxy.deploy("web", &blue.target(), &["--host=app.test"]);

    let load = Load::start(proxy.address(), "app.test", "/", 32);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let slow_started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let address = proxy.address();
        slow.push(tokio::spawn(async move {
            let reply = get(address, "app.test", "/slow?ms=2000").await;
            (reply, Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let deploying = {
        let proxy = proxy.clone();
        let green = green.target();
        tokio::task::spawn_blocking(move || {
            let output = proxy.cli(&[
                "deploy",
                "web",
                &format!("--target={green}"),
                "--host=app.test",
                "--health-check-interval=100ms",
            ]);
            (output, Instant::now())
        })
    };
    let (output, deployed_at) = deploying.await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    for request in slow {
        let (reply, finished_at) = request.await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "blue slow"));
        assert!(finished_at >= slow_started + Duration::from_millis(1900));
        // The deploy must have waited for the 2 s requests: it cannot return sooner.
        assert!(
            deployed_at >= slow_started + Duration::from_millis(1900),
            "deploy returned before the old target drained"
        );
    }

    let blue_after_deploy = blue.requests();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = load.finish().await;
    let failures = &result.failures;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(result.reconnects, 0, "a deploy closed client connections");
    assert!(result.served > 100, "load was applied");
    assert_eq!(
        blue.requests(),
        blue_after_deploy,
        "no request reached the drained target"
    );
    assert!(green.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cuts_requests_that_run_too_long() {
    let proxy = Arc::new(ProxyProcess::start());
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    proxy.deploy("web", &blue.target(), &[]);

    let address = proxy.address();
    let long = tokio::spawn(async move {
        let mut connection = Connection::open(address).await.unwrap();
        connection.get("app.test", "/slow?ms=10000").await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    proxy.deploy("web", &green.target(), &["--drain-timeout=500ms"]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "deploy waited past the drain timeout"
    );
    let outcome = long.await.unwrap();
    assert!(
        matches!(&outcome, Ok(reply) if reply.status == 504),
        "a request cut by the drain gets 504, as in kamal-proxy: {outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_targets_share_load_and_an_unhealthy_one_is_skipped() {
    let proxy = ProxyProcess::start();
    let one = Upstream::start("one").await;
    let two = Upstream::start("two").await;
    proxy.ok(&[
        "deploy",
        "web",
        &format!("--target={}", one.target()),
        &format!("--target={}", two.target()),
        "--health-check-interval=100ms",
    ]);
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    for _ in 0..20 {
        connection.get("app.test", "/").await.unwrap();
    }
    assert_eq!((one.requests(), two.requests()), (10, 10), "round robin");

    two.set_health(503);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !proxy.ok(&["status", "--json"]).contains("unhealthy") {
        assert!(Instant::now() < deadline, "health change not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = two.requests();
    for _ in 0..10 {
        assert_eq!(
            server_of(&connection.get("app.test", "/").await.unwrap().body),
            "one"
        );
    }
    assert_eq!(two.requests(), before);

    let status: serde_json::Value = serde_json::from_str(&proxy.ok(&["status", "--json"])).unwrap();
    let targets = status["routes"][0]["targets"].as_array().unwrap();
    let sick = targets
        .iter()
        .find(|t| t["address"] == two.target().as_str())
        .unwrap();
    assert_eq!(sick["health"], "unhealthy");
    assert_eq!(sick["last_failure"], "status 503");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_reuse_their_connection() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (checks, connections) = (app.health_checks(), app.connections());
    assert!(checks >= 8, "checks every 100 ms: {checks}");
    assert!(
        connections <= 2,
        "{checks} health checks over {connections} connections"
    );
}
