//! Canary rollouts: `rollout deploy`, `rollout set --percent --list`, `rollout stop`, with the
//! `kamal-rollout` cookie deciding which requests the rollout targets get.

mod common;

use common::{request, Connection, ProxyProcess, Upstream};

/// Which upstream answered a request carrying `cookie` (if any).
async fn served_by(connection: &mut Connection, cookie: Option<&str>) -> String {
    let mut sent = request("GET", "shop.test", "/", "");
    if let Some(cookie) = cookie {
        sent.headers_mut().insert("cookie", cookie.parse().unwrap());
    }
    let reply = connection.send(sent).await.expect("request through proxy");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let report: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    report["server"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_takes_its_share_of_cookie_values_and_all_allowlisted_ones() {
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
        assert_eq!(
            served_by(&mut connection, None).await,
            "main",
            "no cookie, no rollout"
        );
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
    let proxy = proxy.restart();
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    assert_eq!(
        served_by(&mut connection, Some("kamal-rollout=staff")).await,
        "canary"
    );

    proxy.ok(&["rollout", "stop", "shop"]);
    for _ in 0..5 {
        assert_eq!(
            served_by(&mut connection, Some("kamal-rollout=staff")).await,
            "main"
        );
    }
    let status: serde_json::Value = serde_json::from_str(&proxy.ok(&["status", "--json"])).unwrap();
    assert!(status["routes"][0].get("rollout").is_none(), "{status}");
    let state = std::fs::read_to_string(proxy.state_path()).unwrap();
    assert!(
        !state.contains(&canary.target()),
        "the rollout is gone from the state: {state}"
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
