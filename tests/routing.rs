//! Routing end to end: hosts, wildcards, the catch-all service, path prefixes, conflicts.

mod common;

use common::{get, ProxyProcess, Upstream};

fn server_of(body: &str) -> String {
    let report: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    report["server"].as_str().unwrap_or("?").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_then_route_by_host() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    let staging = Upstream::start("staging").await;
    proxy.deploy("app-web", &app.target(), &["--host=app.example.com"]);
    proxy.deploy(
        "app-staging",
        &staging.target(),
        &["--host=staging.example.com"],
    );

    let reply = get(proxy.address(), "app.example.com", "/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(server_of(&reply.body), "app");
    assert_eq!(
        server_of(
            &get(proxy.address(), "STAGING.example.com:80", "/")
                .await
                .body
        ),
        "staging"
    );

    let unknown = get(proxy.address(), "nobody.example.com", "/").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("<html"), "error pages are HTML");

    let list = proxy.ok(&["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[0].starts_with("Service") && lines[0].contains("Host") && lines[0].contains("TLS")
    );
    assert!(
        lines[1].starts_with("app-staging") && lines[2].starts_with("app-web"),
        "sorted by name:\n{list}"
    );
    assert!(list.contains(&app.target()) && list.contains("running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_and_catch_all_hosts() {
    let proxy = ProxyProcess::start();
    let exact = Upstream::start("exact").await;
    let wildcard = Upstream::start("wildcard").await;
    let fallback = Upstream::start("fallback").await;
    proxy.deploy("exact", &exact.target(), &["--host=www.example.com"]);
    proxy.deploy("wildcard", &wildcard.target(), &["--host=*.example.com"]);
    proxy.deploy("fallback", &fallback.target(), &[]);

    assert_eq!(
        server_of(&get(proxy.address(), "www.example.com", "/").await.body),
        "exact"
    );
    assert_eq!(
        server_of(&get(proxy.address(), "shop.example.com", "/").await.body),
        "wildcard"
    );
    assert_eq!(
        server_of(&get(proxy.address(), "a.b.example.com", "/").await.body),
        "fallback"
    );
    assert_eq!(
        server_of(&get(proxy.address(), "other.org", "/").await.body),
        "fallback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_path_prefix_wins_and_is_stripped() {
    let proxy = ProxyProcess::start();
    let site = Upstream::start("site").await;
    let api = Upstream::start("api").await;
    let raw = Upstream::start("raw").await;
    proxy.deploy("site", &site.target(), &["--host=example.com"]);
    proxy.deploy(
        "api",
        &api.target(),
        &["--host=example.com", "--path-prefix=/api"],
    );
    proxy.deploy(
        "raw",
        &raw.target(),
        &[
            "--host=example.com",
            "--path-prefix=/raw",
            "--strip-path-prefix=false",
        ],
    );

    let reply = get(proxy.address(), "example.com", "/api/users?id=1").await;
    let report: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(report["server"], "api");
    assert_eq!(report["path"], "/users", "prefix stripped");
    assert_eq!(report["query"], "id=1");

    let report: serde_json::Value =
        serde_json::from_str(&get(proxy.address(), "example.com", "/api").await.body).unwrap();
    assert_eq!(
        (report["server"].as_str(), report["path"].as_str()),
        (Some("api"), Some("/"))
    );

    let report: serde_json::Value =
        serde_json::from_str(&get(proxy.address(), "example.com", "/raw/file").await.body).unwrap();
    assert_eq!(
        (report["server"].as_str(), report["path"].as_str()),
        (Some("raw"), Some("/raw/file"))
    );

    // A prefix matches on a segment boundary only.
    assert_eq!(
        server_of(&get(proxy.address(), "example.com", "/apis").await.body),
        "site"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_taken_by_another_service_is_refused() {
    let proxy = ProxyProcess::start();
    let first = Upstream::start("first").await;
    let second = Upstream::start("second").await;
    proxy.deploy("first", &first.target(), &["--host=example.com"]);

    let output = proxy.cli(&[
        "deploy",
        "second",
        &format!("--target={}", second.target()),
        "--host=example.com",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("Error: host settings conflict with another service"),
        "{stderr}"
    );
    assert_eq!(
        server_of(&get(proxy.address(), "example.com", "/").await.body),
        "first"
    );

    // The same host under another path prefix is fine.
    proxy.deploy(
        "second",
        &second.target(),
        &["--host=example.com", "--path-prefix=/second"],
    );
    assert_eq!(
        server_of(&get(proxy.address(), "example.com", "/second").await.body),
        "second"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hosts_redirect_to_the_canonical_host() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy(
        "web",
        &app.target(),
        &[
            "--host=example.com",
            "--host=www.example.com",
            "--canonical-host=example.com",
        ],
    );
    let reply = get(proxy.address(), "www.example.com", "/a?b=1").await;
    assert_eq!(reply.status, 301);
    assert_eq!(
        reply.headers["location"],
        format!("http://example.com:{}/a?b=1", proxy.port)
    );
    assert_eq!(
        server_of(&get(proxy.address(), "example.com", "/").await.body),
        "app"
    );
}
