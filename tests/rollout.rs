//! Canary rollouts: `rollout deploy`, `rollout set --percent --list`, `rollout stop`, with the
//! `kamal-rollout` cookie deciding which requests the rollout targets get.

mod common;

use common::{request, Connection, ProxyProcess, Upstream};

/// Which upstream answered a request carrying `cookie` (if any), and the cookie the proxy
/// set, if it did.
async fn visit(connection: &mut Connection, cookie: Option<&str>) -> (String, Option<String>) {
    let mut sent = request("GET", "shop.test", "/", "");
    if let Some(cookie) = cookie {
        sent.headers_mut().insert("cookie", cookie.parse().unwrap());
    }
    let reply = connection.send(sent).await.expect("request through proxy");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let report: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    let set_cookie = reply
        .headers
        .get("set-cookie")
        .map(|value| value.to_str().unwrap().to_string());
    (report["server"].as_str().unwrap().to_string(), set_cookie)
}

/// Which upstream answered a request carrying `cookie` (if any).
async fn served_by(connection: &mut Connection, cookie: Option<&str>) -> String {
    visit(connection, cookie).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_takes_its_share_of_visitors_and_all_allowlisted_ones() {
    let proxy = ProxyProcess::start();
    let main = Upstream::start("main").await;
    let canary = Upstream::start("canary").await;
    proxy.deploy("shop", &main.target(), &["--host=shop.test"]);

    // A split needs rollout targets, and a rollout needs a service.
    let early = proxy.cli(&["rollout", "set", "shop", "--percent=25"]);
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stderr).contains("rollout target not set"));
    let unknown = proxy.cli(&[
        "rollout",
        "deploy",
        "nope",
        &format!("--target={}", canary.target()),
    ]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("service not found"));

    proxy.ok(&[
        "rollout",
        "deploy",
        "shop",
        &format!("--target={}", canary.target()),
    ]);
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    assert_eq!(
        served_by(&mut connection, Some("kamal-rollout=staff")).await,
        "main",
        "rollout targets get nothing until a split is set"
    );
    assert_eq!(
        visit(&mut connection, None).await,
        ("main".to_string(), None),
        "and nobody is given a cookie"
    );

    proxy.ok(&["rollout", "set", "shop", "--percent=25", "--list=staff,qa"]);
    let mut to_canary = 0;
    for visitor in 0..400 {
        let cookie = format!("session=x; kamal-rollout=visitor-{visitor}");
        if served_by(&mut connection, Some(&cookie)).await == "canary" {
            to_canary += 1;
        }
    }
    assert!(
        (70..=130).contains(&to_canary),
        "about a quarter of 400 visitors go to the rollout, got {to_canary}"
    );
    for _ in 0..10 {
        assert_eq!(
            served_by(&mut connection, Some("kamal-rollout=staff")).await,
            "canary"
        );
        assert_eq!(
            served_by(&mut connection, Some("kamal-rollout=qa")).await,
            "canary"
        );
    }
    // Anonymous visitors (no cookie) go to the main targets, with no cookie, as in kamal-proxy.
    for _ in 0..20 {
        assert_eq!(
            visit(&mut connection, None).await,
            ("main".to_string(), None)
        );
    }
    // With --assign-cookies, about a quarter go to the rollout, and each is given a cookie
    // that keeps it on its side.
    proxy.ok(&[
        "rollout",
        "set",
        "shop",
        "--percent=25",
        "--list=staff,qa",
        "--assign-cookies",
    ]);
    let mut anonymous_to_canary = 0;
    let mut given = Vec::new();
    for _ in 0..400 {
        let (server, cookie) = visit(&mut connection, None).await;
        let cookie = cookie.expect("an anonymous visitor gets a kamal-rollout cookie");
        assert!(
            cookie.starts_with("kamal-rollout=") && cookie.contains("Path=/"),
            "{cookie}"
        );
        anonymous_to_canary += usize::from(server == "canary");
        given.push((cookie.split(';').next().unwrap().to_string(), server));
    }
    assert!(
        (70..=130).contains(&anonymous_to_canary),
        "about a quarter of 400 anonymous visitors go to the rollout, got {anonymous_to_canary}"
    );
    for (cookie, server) in given.iter().take(20) {
        let (again, set) = visit(&mut connection, Some(cookie)).await;
        assert_eq!(&again, server, "{cookie} sticks to its side");
        assert_eq!(set, None, "a visitor with the cookie is not given another");
    }

    // Sticky: a visitor stays on the side it first landed on.
    let first = served_by(&mut connection, Some("kamal-rollout=visitor-7")).await;
    for _ in 0..10 {
        assert_eq!(
            served_by(&mut connection, Some("kamal-rollout=visitor-7")).await,
            first
        );
    }

    let status: serde_json::Value = serde_json::from_str(&proxy.ok(&["status", "--json"])).unwrap();
    let rollout = &status["routes"][0]["rollout"];
    assert_eq!(rollout["split"]["percent"], 25, "{status}");
    assert_eq!(rollout["targets"][0]["address"], canary.target());
    assert!(proxy.ok(&["status"]).contains("(rollout 25% + staff,qa)"));

    // The rollout survives a restart.
    drop(connection);
    let proxy = proxy.restart();
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    assert_eq!(
        served_by(&mut connection, Some("kamal-rollout=staff")).await,
        "canary"
    );

    proxy.ok(&["rollout", "stop", "shop"]);
    assert_eq!(
        visit(&mut connection, None).await,
        ("main".to_string(), None)
    );
    for _ in 0..5 {
        assert_eq!(
            served_by(&mut connection, Some("kamal-rollout=staff")).await,
            "main"
        );
    }
    // As in kamal-proxy, the rollout targets stay, with no split, so `rollout set` works again.
    let status: serde_json::Value = serde_json::from_str(&proxy.ok(&["status", "--json"])).unwrap();
    let rollout = &status["routes"][0]["rollout"];
    assert!(rollout["split"].is_null(), "{status}");
    assert_eq!(rollout["targets"][0]["address"], canary.target());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(proxy.state_path()).unwrap()).unwrap();
    assert_eq!(state[0]["rollout_targets"][0], canary.target(), "{state}");
    assert!(state[0]["rollout_controller"].is_null(), "{state}");
    proxy.ok(&["rollout", "set", "shop", "--list=staff"]);
    assert_eq!(
        served_by(&mut connection, Some("kamal-rollout=staff")).await,
        "canary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rollout_flags_are_refused_by_name() {
    let proxy = ProxyProcess::start();
    let neither = proxy.cli(&["rollout", "set", "shop"]);
    assert_eq!(neither.status.code(), Some(1));
    let message = String::from_utf8_lossy(&neither.stderr);
    assert!(
        message.contains("--percent") && message.contains("--list"),
        "{message}"
    );

    let too_much = proxy.cli(&["rollout", "set", "shop", "--percent=150"]);
    assert_eq!(too_much.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&too_much.stderr).contains("--percent"));

    let no_target = proxy.cli(&["rollout", "deploy", "shop"]);
    assert_eq!(no_target.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_target.stderr).contains("--target"));
}
