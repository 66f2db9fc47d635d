//! The daemon's life and a service's states: restart with restored routes, stop and resume,
//! pause and resume, remove, graceful SIGTERM.

mod common;

use std::time::Duration;

use common::{get, Connection, ProxyProcess, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_routes_at_once() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    let api = Upstream::start("api").await;
    proxy.deploy("app", &app.target(), &["--host=app.test"]);
    proxy.deploy(
        "api",
        &api.target(),
        &["--host=app.test", "--path-prefix=/api", "--buffer-requests"],
    );
    let list_before = proxy.ok(&["list"]);
    let state = std::fs::read_to_string(proxy.state_path()).unwrap();
    assert!(state.contains(&app.target()) && state.contains("/api"));

    let proxy = proxy.restart();
    // No wait for health checks: restored targets serve immediately.
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 200);
    let report: serde_json::Value =
        serde_json::from_str(&get(proxy.address(), "app.test", "/api/x").await.body).unwrap();
    assert_eq!(report["server"], "api");
    assert_eq!(proxy.ok(&["list"]), list_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_serves_503_with_the_message_until_resume() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);

    proxy.ok(&[
        "stop",
        "web",
        "--drain-timeout=1s",
        "--message=Back in five minutes",
    ]);
    let reply = get(proxy.address(), "app.test", "/").await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.body.contains("Back in five minutes"),
        "{}",
        reply.body
    );
    assert!(proxy.ok(&["list"]).contains("stopped"));

    // Stopped survives a restart, like every other state.
    let proxy = proxy.restart();
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 503);

    proxy.ok(&["resume", "web"]);
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_requests_until_resume() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);
    proxy.ok(&["pause", "web", "--max-pause=10s"]);

    let address = proxy.address();
    let held = tokio::spawn(async move { get(address, "app.test", "/").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "request was not held while paused");
    assert_eq!(app.requests(), 0);

    proxy.ok(&["resume", "web"]);
    let reply = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_past_max_pause_answers_504() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);
    proxy.ok(&["pause", "web", "--max-pause=300ms"]);
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_forgets_the_service() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);
    proxy.ok(&["rm", "web"]);
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 404);
    assert!(!proxy.ok(&["ls"]).contains("web"));
    assert!(!std::fs::read_to_string(proxy.state_path())
        .unwrap()
        .contains("\"web\""));

    let output = proxy.cli(&["remove", "web"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "Error: service not found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let mut proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);

    let address = proxy.address();
    // An idle keep-alive client: with nobody to take over, it must not hold the shutdown.
    let mut idle = Connection::open(address).await.unwrap();
    assert_eq!(idle.get("app.test", "/").await.unwrap().status, 200);
    let in_flight = tokio::spawn(async move { get(address, "app.test", "/slow?ms=1000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::block_in_place(|| proxy.terminate());
    assert!(status.success(), "exit status {status}");
    let reply = in_flight.await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "app slow"));
    let stopped = proxy
        .log_lines()
        .into_iter()
        .find(|line| line["msg"] == "Stopped")
        .expect("a Stopped line");
    assert_eq!(
        stopped["finished_in_time"], true,
        "the idle connection was closed at once, not kept to the drain deadline"
    );
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "still accepting after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_it_cannot_read_is_set_aside_and_the_daemon_starts() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join(".config/kamal-proxy");
    std::fs::create_dir_all(&dir).unwrap();
    // JSON, but no state file any version of kamal-proxy or Berth wrote.
    std::fs::write(dir.join("kamal-proxy.state"), r#"[{"name":42}]"#).unwrap();
    let proxy = ProxyProcess::start_in_home(home);
    assert!(
        proxy.ok(&["list"]).lines().count() == 1,
        "started with no services"
    );
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kamal-proxy.state.unreadable-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the old file is kept");
    let app = Upstream::start("app").await;
    proxy.deploy("app-web", &app.target(), &[]);
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_error_pages_replace_the_built_in_ones() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    let pages = tempfile::tempdir().unwrap();
    std::fs::write(
        pages.path().join("503.html"),
        "<h1>Acme is down</h1><p>{{ .Message }}</p>",
    )
    .unwrap();
    let flag = format!("--error-pages={}", pages.path().display());
    proxy.deploy("web", &app.target(), &[&flag]);
    proxy.ok(&["stop", "web", "--message=Back at 5 <pm>"]);
    let reply = get(proxy.address(), "app.test", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.body,
        "<h1>Acme is down</h1><p>Back at 5 &lt;pm&gt;</p>"
    );

    let output = proxy.cli(&[
        "deploy",
        "web",
        &format!("--target={}", app.target()),
        "--error-pages=/nonexistent/pages",
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a missing error page directory fails the deploy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_directory_is_created_owner_only_at_start_as_by_kamal_proxy() {
    use std::os::unix::fs::PermissionsExt;
    let proxy = ProxyProcess::start();
    let dir = proxy.home().join(".config/kamal-proxy");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", dir.display());
}
