//! Moving a host from kamal-proxy to Berth and back: the state file and the certificate cache
//! kamal-proxy wrote are served as they were, and what Berth writes, kamal-proxy serves.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::kamal_proxy::{self, KamalProxy};
use common::pebble::{free_port, https_get, https_get_with_headers, wait_for_https, Pebble};
use common::{Connection, ProxyProcess, Upstream};
use rustls::pki_types::CertificateDer;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kamal-proxy");
/// Where the fixture's `acme_cache_path` points: inside Kamal's container.
const FIXTURE_CACHE: &str = "/home/kamal-proxy/.config/kamal-proxy/certs";

fn config_dir(home: &Path) -> std::path::PathBuf {
    home.join(".config/kamal-proxy")
}

fn fixture_root() -> CertificateDer<'static> {
    let pem = std::fs::read(format!("{FIXTURE}/fixture-ca.pem")).unwrap();
    let root = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    root
}

/// Copies kamal-proxy's certificate cache from the fixture into `home`.
fn install_fixture_certificates(home: &Path) {
    let from = Path::new(FIXTURE).join("certs");
    for folder in std::fs::read_dir(&from).unwrap() {
        let folder = folder.unwrap().path();
        let to = config_dir(home)
            .join("certs")
            .join(folder.file_name().unwrap());
        std::fs::create_dir_all(&to).unwrap();
        for file in std::fs::read_dir(&folder).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
        }
    }
}

/// The fixture's state and certificates in `home`, its two upstreams (`:3011`, `:3012`)
/// replaced by `main` and `other`.
fn install_fixture(home: &Path, main: &str, other: &str) {
    let state = std::fs::read_to_string(format!("{FIXTURE}/kamal-proxy.state"))
        .unwrap()
        .replace("127.0.0.1:3011", main)
        .replace("127.0.0.1:3012", other)
        .replace(
            FIXTURE_CACHE,
            &config_dir(home).join("certs").display().to_string(),
        );
    std::fs::create_dir_all(config_dir(home)).unwrap();
    std::fs::write(config_dir(home).join("kamal-proxy.state"), state).unwrap();
    install_fixture_certificates(home);
}

fn server_of(body: &str) -> String {
    let report: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not a report: {body}"));
    report["server"].as_str().unwrap_or_default().to_string()
}

fn listed(proxy: &ProxyProcess) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_str(&proxy.ok(&["list", "--json"])).unwrap();
    let mut by_name = serde_json::Map::new();
    for service in list["services"].as_array().unwrap() {
        by_name.insert(service["name"].as_str().unwrap().into(), service.clone());
    }
    by_name.into()
}

/// 32-bit FNV-1a, which kamal-proxy splits rollouts on: to pick cookie values on either side.
fn fnv1a(value: &str) -> u32 {
    value.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_left_by_kamal_proxy_serves_every_route_as_kamal_proxy_did() {
    let main = Upstream::start("main").await;
    let other = Upstream::start("other").await;
    let home = tempfile::tempdir().unwrap();
    install_fixture(home.path(), &main.target(), &other.target());
    // No ACME server anywhere: every certificate must come from kamal-proxy's cache.
    let proxy = ProxyProcess::start_in_home(home);
    let root = fixture_root();
    let roots = std::slice::from_ref(&root);

    let services = listed(&proxy);
    let state = |name: &str| services[name]["state"].as_str().unwrap().to_string();
    assert_eq!(state("shop-web"), "running", "{services}");
    assert_eq!(state("shop-api"), "paused");
    assert_eq!(state("blog-staging"), "running");
    assert_eq!(state("reports"), "stopped");
    assert_eq!(
        services["shop-api"]["tls"], true,
        "a path service on a TLS host"
    );
    assert_eq!(services["reports"]["tls"], false);

    // The TLS hosts: HTTPS with kamal-proxy's certificates, plain HTTP redirected.
    for host in ["shop.example.com", "www.shop.example.com"] {
        let reply = https_get(proxy.https_port, host, "/", roots)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}\n{}", proxy.log()));
        assert_eq!(reply.status, 200);
        assert_eq!(server_of(&reply.body), "main");
        let cached = std::fs::read(
            config_dir(proxy.home())
                .join("certs/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .join(host),
        )
        .unwrap();
        let leaf = rustls_pemfile::certs(&mut cached.as_slice())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            reply.leaf, leaf,
            "{host} is served kamal-proxy's certificate"
        );
    }
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    let redirect = connection
        .get("shop.example.com", "/cart?x=1")
        .await
        .unwrap();
    assert_eq!(redirect.status, 301);
    let location = redirect.headers["location"].to_str().unwrap();
    assert!(
        location.starts_with("https://shop.example.com") && location.ends_with("/cart?x=1"),
        "{location}"
    );
    // The path service shares its host's TLS settings, redirect included.
    let redirect = connection
        .get("shop.example.com", "/api/orders")
        .await
        .unwrap();
    assert_eq!(redirect.status, 301, "{redirect:?}");

    // The paused path service holds requests until resumed, then strips its prefix.
    let held = tokio::spawn({
        let https_port = proxy.https_port;
        let root = root.clone();
        async move { https_get(https_port, "shop.example.com", "/api/orders", &[root]).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "a paused service answered");
    proxy.ok(&["resume", "shop-api"]);
    let released = held.await.unwrap().unwrap();
    assert_eq!(released.status, 200);
    let seen: serde_json::Value = serde_json::from_str(&released.body).unwrap();
    assert_eq!(seen["server"], "main");
    assert_eq!(seen["path"], "/orders");

    // The stopped service answers 503 with its message.
    let stopped = connection.get("reports.example.com", "/").await.unwrap();
    assert_eq!(stopped.status, 503);
    assert!(stopped.body.contains("Back at noon"), "{}", stopped.body);

    // The canary: allowlisted cookies and the 25% of values that hash low go to the rollout
    // target (`main`); the rest stay on `other`.
    let low = (0..)
        .map(|i| format!("user-{i}"))
        .find(|v| u64::from(fnv1a(v)) * 100 < u64::from(u32::MAX) * 25)
        .unwrap();
    let high = (0..)
        .map(|i| format!("user-{i}"))
        .find(|v| u64::from(fnv1a(v)) * 100 > u64::from(u32::MAX) * 26)
        .unwrap();
    for _ in 0..10 {
        let reply = connection
            .get("staging.blog.example.com", "/")
            .await
            .unwrap();
        assert_eq!(server_of(&reply.body), "other");
        assert!(!reply.headers.contains_key("set-cookie"));
    }
    for (cookie, expected) in [
        ("beta-2", "main"),
        (low.as_str(), "main"),
        (high.as_str(), "other"),
    ] {
        let mut request = common::request("GET", "staging.blog.example.com", "/", "");
        request
            .headers_mut()
            .insert("cookie", format!("kamal-rollout={cookie}").parse().unwrap());
        let reply = connection.send(request).await.unwrap();
        assert_eq!(server_of(&reply.body), expected, "cookie {cookie}");
    }

    // Nothing was ordered: kamal-proxy's certificates were enough.
    assert!(
        !proxy
            .log_lines()
            .iter()
            .any(|l| l["msg"] == "Requesting certificate"),
        "{}",
        proxy.log()
    );
    // And the state is still kamal-proxy's format, with the resume in it.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(proxy.state_path()).unwrap()).unwrap();
    let api = saved
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "shop-api")
        .unwrap();
    assert_eq!(api["pause_controller"]["state"], 0, "{saved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kamal_proxy_to_berth_and_back_keeps_every_change_and_certificate() {
    let Some(binary) = kamal_proxy::binary() else {
        return;
    };
    let main = Upstream::start("main").await;
    let other = Upstream::start("other").await;
    let home = Arc::new(tempfile::tempdir().unwrap());
    install_fixture_certificates(home.path());
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(http_port);
    let fixture_root = fixture_root();

    // kamal-proxy registers the apps, as Kamal would.
    let mut kamal = KamalProxy::start(&binary, home.path(), http_port, https_port);
    let shop_hosts = ["--host=shop.example.com", "--host=www.shop.example.com"];
    kamal.ok(&[
        &[
            "deploy",
            "shop-web",
            &format!("--target={}", main.target()),
            "--tls",
        ][..],
        &shop_hosts[..],
    ]
    .concat());
    kamal.ok(&[
        "deploy",
        "blog",
        &format!("--target={}", other.target()),
        "--host=blog.example.com",
    ]);
    kamal.ok(&[
        "deploy",
        "reports",
        &format!("--target={}", other.target()),
        "--host=reports.example.com",
    ]);
    let before = https_get(
        https_port,
        "shop.example.com",
        "/",
        std::slice::from_ref(&fixture_root),
    )
    .await
    .unwrap_or_else(|e| panic!("kamal-proxy HTTPS: {e}\n{}", kamal.log()));
    kamal.stop();

    // Berth takes over the same home, as `kamal proxy reboot` with Berth's image would.
    let berth = ProxyProcess::start_in_shared_home(
        Arc::clone(&home),
        http_port,
        https_port,
        &[
            &format!("--acme-directory={}", pebble.directory_url()),
            &format!("--acme-ca-root={}", pebble.api_ca_path().display()),
        ],
    );
    let services = listed(&berth);
    for name in ["shop-web", "blog", "reports"] {
        assert_eq!(services[name]["state"], "running", "{services}");
    }
    let adopted = https_get(
        berth.https_port,
        "www.shop.example.com",
        "/",
        std::slice::from_ref(&fixture_root),
    )
    .await
    .unwrap_or_else(|e| panic!("Berth HTTPS: {e}\n{}", berth.log()));
    assert_eq!(server_of(&adopted.body), "main");
    let shop = https_get(
        berth.https_port,
        "shop.example.com",
        "/",
        std::slice::from_ref(&fixture_root),
    )
    .await
    .unwrap();
    assert_eq!(
        shop.leaf, before.leaf,
        "the same certificate as kamal-proxy served"
    );

    // Berth changes the routes, and orders a certificate for a new host.
    berth.deploy(
        "new-app",
        &main.target(),
        &["--host=new.example.com", "--tls"],
    );
    let pebble_root = pebble.issuing_root().await;
    let issued = wait_for_https(
        berth.https_port,
        "new.example.com",
        std::slice::from_ref(&pebble_root),
    )
    .await;
    berth.ok(&["remove", "blog"]);
    berth.deploy(
        "shop-api",
        &other.target(),
        &["--host=shop.example.com", "--path-prefix=/api"],
    );
    berth.ok(&["stop", "reports", "--message=Gone fishing"]);
    berth.ok(&[
        "rollout",
        "deploy",
        "shop-web",
        &format!("--target={}", other.target()),
    ]);
    berth.ok(&["rollout", "set", "shop-web", "--percent=0", "--list=vip"]);
    let mut berth = berth;
    assert!(berth.terminate().success());

    // kamal-proxy takes the host back and serves every change.
    let kamal = KamalProxy::start(&binary, home.path(), http_port, https_port);
    let list = kamal.ok(&["list"]);
    assert!(!list.contains("blog"), "{list}");
    for name in ["new-app", "shop-api", "shop-web", "reports"] {
        assert!(
            list.contains(name),
            "{name} missing from kamal-proxy's list:\n{list}"
        );
    }
    let new = https_get(
        https_port,
        "new.example.com",
        "/",
        std::slice::from_ref(&pebble_root),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "kamal-proxy serving Berth's certificate: {e}\n{}",
            kamal.log()
        )
    });
    assert_eq!(
        new.leaf, issued.leaf,
        "kamal-proxy serves the certificate Berth ordered"
    );
    assert_eq!(server_of(&new.body), "main");
    let api = https_get(
        https_port,
        "shop.example.com",
        "/api/x",
        std::slice::from_ref(&fixture_root),
    )
    .await
    .unwrap();
    assert_eq!(server_of(&api.body), "other");
    let shop = https_get(
        https_port,
        "shop.example.com",
        "/",
        std::slice::from_ref(&fixture_root),
    )
    .await
    .unwrap();
    assert_eq!(server_of(&shop.body), "main");
    assert_eq!(shop.leaf, before.leaf);
    let vip = https_get_with_headers(
        https_port,
        "shop.example.com",
        "/",
        std::slice::from_ref(&fixture_root),
        &[("cookie", "kamal-rollout=vip")],
    )
    .await
    .unwrap();
    assert_eq!(server_of(&vip.body), "other", "the rollout survived");
    let mut connection = Connection::open(std::net::SocketAddr::from(([127, 0, 0, 1], http_port)))
        .await
        .unwrap();
    let stopped = connection.get("reports.example.com", "/").await.unwrap();
    assert_eq!(stopped.status, 503);
    assert!(stopped.body.contains("Gone fishing"), "{}", stopped.body);
    let removed = connection.get("blog.example.com", "/").await.unwrap();
    assert_eq!(removed.status, 404);
}
