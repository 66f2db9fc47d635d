//! Several proxies behind one load balancer sharing one certificate store (Redis): each
//! certificate is ordered once for the fleet, any instance answers any challenge, and every
//! instance serves what any of them ordered. Real redis-server, HAProxy, pebble and proxies.

mod common;

use std::time::{Duration, Instant};

use common::fleet::{Haproxy, Redis};
use common::pebble::{free_port, https_get, wait_for_https, Pebble, PebbleOptions};
use common::{ProxyProcess, Upstream};
use rustls::pki_types::CertificateDer;

const HOST: &str = "fleet.test";

struct Fleet {
    pebble: Pebble,
    redis: Redis,
    proxies: Vec<ProxyProcess>,
    _balancer: Haproxy,
    key_file: tempfile::NamedTempFile,
    balancer_port: u16,
}

fn key_file(key: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{key}\n")).unwrap();
    file
}

const STORE_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn store_flags(redis: &Redis, pebble: &Pebble, key: &std::path::Path, name: &str) -> Vec<String> {
    vec![
        format!("--cert-store={}", redis.url()),
        format!("--cert-store-key-file={}", key.display()),
        format!("--instance-name={name}"),
        format!("--acme-directory={}", pebble.directory_url()),
        format!("--acme-ca-root={}", pebble.api_ca_path().display()),
    ]
}

/// Pebble validating through HAProxy, which picks one of `count` proxies at random.
fn start_fleet(count: usize, options: PebbleOptions) -> Fleet {
    start_fleet_with(count, options, &[])
}

/// Like `start_fleet`, each proxy run with `extra` flags too.
fn start_fleet_with(count: usize, options: PebbleOptions, extra: &[&str]) -> Fleet {
    let balancer_port = free_port();
    let pebble = Pebble::start_with(balancer_port, free_port(), options);
    let redis = Redis::start();
    let key_file = key_file(STORE_KEY);
    let proxies: Vec<ProxyProcess> = (0..count)
        .map(|index| {
            let mut flags =
                store_flags(&redis, &pebble, key_file.path(), &format!("proxy-{index}"));
            flags.extend(extra.iter().map(|flag| flag.to_string()));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            ProxyProcess::start_with(&flags)
        })
        .collect();
    let backends: Vec<u16> = proxies.iter().map(|p| p.port).collect();
    let balancer = Haproxy::start(balancer_port, &backends);
    Fleet {
        pebble,
        redis,
        proxies,
        _balancer: balancer,
        key_file,
        balancer_port,
    }
}

fn deploy_hosts(proxy: &ProxyProcess, upstream: &Upstream, hosts: &[&str]) {
    let mut flags: Vec<String> = hosts.iter().map(|h| format!("--host={h}")).collect();
    flags.push("--tls".to_string());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    proxy.deploy("web", &upstream.target(), &flags);
}

async fn leaf_of(proxy: &ProxyProcess, host: &str, root: &CertificateDer<'static>) -> Vec<u8> {
    wait_for_https(proxy.https_port, host, std::slice::from_ref(root))
        .await
        .leaf
        .to_vec()
}

fn status_json(proxy: &ProxyProcess) -> serde_json::Value {
    serde_json::from_str(&proxy.ok(&["status", "--json"])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_behind_a_balancer_order_one_certificate_and_all_serve_it() {
    let mut fleet = start_fleet(3, PebbleOptions::default());
    let app = Upstream::start("app").await;
    for proxy in &fleet.proxies {
        deploy_hosts(proxy, &app, &[HOST]);
    }
    let root = fleet.pebble.issuing_root().await;
    let mut leaves = Vec::new();
    for proxy in &fleet.proxies {
        leaves.push(leaf_of(proxy, HOST, &root).await);
    }
    assert!(
        leaves.iter().all(|leaf| *leaf == leaves[0]),
        "all three serve one certificate"
    );
    assert_eq!(
        fleet.pebble.finalized_orders(),
        1,
        "ordered once for the fleet:\n{}",
        fleet.pebble.log()
    );
    // The private key is sealed in the store, never in the clear.
    let stored: String = redis::cmd("GET")
        .arg(fleet.redis.keys("berth:cert:*")[0].clone())
        .query(&mut fleet.redis.connection())
        .unwrap();
    assert!(!stored.contains("PRIVATE KEY"), "{stored}");

    // Status: the store and who ordered the certificate.
    let status = status_json(&fleet.proxies[1]);
    assert_eq!(status["cert_store"]["reachable"], true, "{status}");
    assert_eq!(status["cert_store"]["instance"], "proxy-1");
    assert!(
        !status["cert_store"]["location"]
            .as_str()
            .unwrap()
            .contains(&fleet.redis.password),
        "no password in status: {status}"
    );
    let ordered_by = status["routes"][0]["certificate"]["ordered_by"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ordered_by.starts_with("proxy-"), "{status}");
    for proxy in &fleet.proxies {
        let status = status_json(proxy);
        assert_eq!(status["routes"][0]["certificate"]["ordered_by"], ordered_by);
    }
    let text = fleet.proxies[0].ok(&["status"]);
    assert!(
        text.contains("Certificate store: redis://127.0.0.1"),
        "{text}"
    );

    // The store goes away: every instance keeps serving; a restarted one serves its copy.
    fleet.redis.stop();
    for proxy in &fleet.proxies {
        let reply = https_get(proxy.https_port, HOST, "/", std::slice::from_ref(&root))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    let restarted = fleet.proxies.remove(2).restart();
    let reply = https_get(restarted.https_port, HOST, "/", std::slice::from_ref(&root))
        .await
        .expect("a restart without the store serves the cached certificate");
    assert_eq!(reply.leaf.to_vec(), leaves[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = status_json(&restarted);
        if status["cert_store"]["reachable"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never said unreachable: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A new host waits for the store...
    let second = "second.fleet.test";
    for proxy in fleet.proxies.iter().chain([&restarted]) {
        deploy_hosts(proxy, &app, &[HOST, second]);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fleet.pebble.finalized_orders(),
        1,
        "no order without the store"
    );
    // ...and is ordered once it is back.
    fleet.redis.start_again();
    let mut second_leaves = Vec::new();
    for proxy in fleet.proxies.iter().chain([&restarted]) {
        second_leaves.push(leaf_of(proxy, second, &root).await);
    }
    assert!(second_leaves.iter().all(|leaf| *leaf == second_leaves[0]));
    assert_eq!(fleet.pebble.finalized_orders(), 2, "{}", fleet.pebble.log());

    // An instance with the wrong store key: a clear error, no new order.
    let wrong_key = key_file(&"ff".repeat(32));
    let mut flags = store_flags(&fleet.redis, &fleet.pebble, wrong_key.path(), "wrong");
    flags.push(format!("--http-port={}", free_port()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let wrong = ProxyProcess::start_with(&flags);
    deploy_hosts(&wrong, &app, &[HOST, "third.fleet.test"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !wrong
        .log()
        .contains("store key is not the one it was written with")
    {
        assert!(
            Instant::now() < deadline,
            "no clear error:\n{}",
            wrong.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fleet.pebble.finalized_orders(),
        2,
        "a wrong key orders nothing"
    );
    let status = status_json(&wrong);
    let error = status["cert_store"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("cannot be decrypted"), "{status}");
    assert!(
        https_get(wrong.https_port, HOST, "/", std::slice::from_ref(&root))
            .await
            .is_err(),
        "nothing it cannot decrypt is served"
    );
    drop(fleet.key_file);
    let _ = fleet.balancer_port;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_holder_dies_is_finished_by_another_instance_once() {
    // Slow validation, so the holder is surely killed mid-order.
    let mut fleet = start_fleet(
        3,
        PebbleOptions {
            validation_sleep_secs: Some(4),
            ..Default::default()
        },
    );
    let app = Upstream::start("app").await;
    deploy_hosts(&fleet.proxies[0], &app, &[HOST]);
    // Killed once it holds the lock and has placed its order (its challenge answer is
    // published), while pebble is still validating.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.redis.keys("berth:lock:*").is_empty()
        || fleet.redis.keys("berth:challenge:*").is_empty()
    {
        assert!(Instant::now() < deadline, "no order under way");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.proxies[0].kill();
    assert!(
        fleet.redis.keys("berth:cert:*").is_empty(),
        "killed before it finished"
    );
    for proxy in &fleet.proxies[1..] {
        deploy_hosts(proxy, &app, &[HOST]);
    }
    let root = fleet.pebble.issuing_root().await;
    let first = leaf_of(&fleet.proxies[1], HOST, &root).await;
    let second = leaf_of(&fleet.proxies[2], HOST, &root).await;
    assert_eq!(first, second);
    assert_eq!(
        fleet.pebble.finalized_orders(),
        1,
        "nothing ordered twice:\n{}",
        fleet.pebble.log()
    );
    let waits: u64 = fleet.proxies[1..]
        .iter()
        .map(|p| status_json(p)["cert_store"]["lock_waits"].as_u64().unwrap())
        .sum();
    assert!(waits > 0, "the others waited for the lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_is_done_once_and_every_instance_serves_it_without_a_restart() {
    // 24 s certificates: due for renewal after 16 s.
    let fleet = start_fleet(
        3,
        PebbleOptions {
            validity_secs: Some(24),
            ..Default::default()
        },
    );
    let app = Upstream::start("app").await;
    for proxy in &fleet.proxies {
        deploy_hosts(proxy, &app, &[HOST]);
    }
    let root = fleet.pebble.issuing_root().await;
    let mut first = Vec::new();
    for proxy in &fleet.proxies {
        first.push(leaf_of(proxy, HOST, &root).await);
    }
    assert!(first.iter().all(|leaf| *leaf == first[0]));
    assert_eq!(fleet.pebble.finalized_orders(), 1);

    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut renewed = 0;
        for proxy in &fleet.proxies {
            let reply = https_get(proxy.https_port, HOST, "/", std::slice::from_ref(&root))
                .await
                .unwrap();
            if reply.leaf.to_vec() != first[0] {
                renewed += 1;
            }
        }
        if renewed == fleet.proxies.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{renewed} of 3 serve the renewed certificate"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        fleet.pebble.finalized_orders(),
        2,
        "renewed once for the fleet:\n{}",
        fleet.pebble.log()
    );
}

/// Kamal refuses `ssl: true` on a role with several servers, so such a role is deployed as
/// Kamal deploys `ssl: false` (no `--tls`); `--tls-hosts` makes those hosts HTTPS anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_named_by_tls_hosts_get_https_though_deployed_without_tls() {
    let fleet = start_fleet_with(2, PebbleOptions::default(), &["--tls-hosts=fleet.test"]);
    let app = Upstream::start("app").await;
    for proxy in &fleet.proxies {
        // What Kamal runs for `ssl: false`, path and all.
        proxy.deploy("web", &app.target(), &[&format!("--host={HOST}")]);
        proxy.deploy("plain", &app.target(), &["--host=plain.fleet.test"]);
    }
    let root = fleet.pebble.issuing_root().await;
    let first = leaf_of(&fleet.proxies[0], HOST, &root).await;
    assert_eq!(leaf_of(&fleet.proxies[1], HOST, &root).await, first);
    assert_eq!(fleet.pebble.finalized_orders(), 1);
    for proxy in &fleet.proxies {
        let redirect = common::get(proxy.address(), HOST, "/x").await;
        assert_eq!(redirect.status, 301, "plain HTTP goes to HTTPS");
        let plain = common::get(proxy.address(), "plain.fleet.test", "/").await;
        assert_eq!(plain.status, 200, "hosts not named stay on HTTP");
        let status = status_json(proxy);
        let web = status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|route| route["service"] == "web")
            .unwrap_or_else(|| panic!("{status}"))
            .clone();
        assert_eq!(web["tls"], true, "{status}");
    }
}

/// `rediss://` with a password: the store over TLS, verified against the CA the server's
/// certificate chains to (here given with `SSL_CERT_FILE`, as for any system root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_reached_over_tls_with_a_password() {
    let redis = Redis::start_tls();
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let key = key_file(STORE_KEY);
    let mut flags = store_flags(&redis, &pebble, key.path(), "tls-instance");
    flags.push(format!("--http-port={http_port}"));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ca = redis.ca_path().unwrap().display().to_string();
    let proxy = ProxyProcess::start_with_env(&flags, &[("SSL_CERT_FILE", &ca)]);
    let app = Upstream::start("app").await;
    deploy_hosts(&proxy, &app, &[HOST]);
    let root = pebble.issuing_root().await;
    leaf_of(&proxy, HOST, &root).await;
    let status = status_json(&proxy);
    assert_eq!(status["cert_store"]["reachable"], true, "{status}");
    assert!(
        status["cert_store"]["location"]
            .as_str()
            .unwrap()
            .starts_with("rediss://127.0.0.1"),
        "{status}"
    );
    assert_eq!(
        status["routes"][0]["certificate"]["ordered_by"], "tls-instance",
        "the certificate went through the store: {status}"
    );

    // Without the CA, the same store is refused: a server that cannot be verified is not
    // trusted with private keys, even sealed.
    let other = key_file(STORE_KEY);
    let mut flags = store_flags(&redis, &pebble, other.path(), "untrusting");
    flags.push(format!("--http-port={}", free_port()));
    let metrics_port = free_port();
    flags.push(format!("--metrics-port={metrics_port}"));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let untrusting = ProxyProcess::start_with(&flags);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = status_json(&untrusting);
        if let Some(error) = status["cert_store"]["last_error"].as_str() {
            assert!(error.contains("UnknownIssuer"), "{status}");
            assert_eq!(status["cert_store"]["reachable"], false, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The same, as metrics.
    let metrics_address = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let metrics = common::get(metrics_address, "127.0.0.1", "/metrics")
        .await
        .body;
    assert!(
        metrics.contains("berth_cert_store_reachable 0"),
        "{metrics}"
    );
    let errors: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("berth_cert_store_errors_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(errors > 0, "{metrics}");
    assert!(
        metrics.contains("berth_cert_store_lock_waits_total 0"),
        "{metrics}"
    );
}
