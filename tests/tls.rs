//! TLS end to end against a real ACME server (pebble): certificates obtained over HTTP-01,
//! served by SNI, reused after a restart, renewed when due, and failures that stay contained.

mod common;

use std::time::{Duration, Instant};

use common::certs::short_lived_certificate;
use common::pebble::{free_port, https_get, wait_for_https, Pebble};
use common::{get, ProxyProcess, Upstream};

fn report(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not a report: {body}"))
}

/// A proxy whose ACME server is `pebble`, on the HTTP port pebble validates against.
fn proxy_for(pebble: &Pebble, http_port: u16) -> ProxyProcess {
    ProxyProcess::start_with(&[
        &format!("--http-port={http_port}"),
        &format!("--acme-directory={}", pebble.directory_url()),
        &format!("--acme-ca-root={}", pebble.api_ca_path().display()),
        "--acme-email=ops@example.com",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_service_gets_a_certificate_serves_https_and_reuses_it_after_restart() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let proxy = proxy_for(&pebble, http_port);
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test", "--tls"]);

    // The first HTTPS request waits for the certificate instead of failing.
    let root = pebble.issuing_root().await;
    let reply = https_get(
        proxy.https_port,
        "app.test",
        "/",
        std::slice::from_ref(&root),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "first HTTPS request failed: {e}\n{}\n{}",
            proxy.log(),
            pebble.log()
        )
    });
    assert_eq!(reply.status, 200);
    let seen = report(&reply.body);
    assert_eq!(seen["server"], "app");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert_eq!(
        seen["headers"].get("x-forwarded-for").map(|v| v.as_str()),
        Some(Some("127.0.0.1"))
    );
    assert_eq!(reply.alpn.as_deref(), Some(&b"http/1.1"[..]));

    // HTTP/2 is offered by ALPN.
    let roots = std::slice::from_ref(&root);
    let offered: &[&[u8]] = &[b"h2", b"http/1.1"];
    let h2 =
        common::pebble::https_get_with_alpn(proxy.https_port, "app.test", "/h2", roots, offered)
            .await
            .unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        (h2.status, report(&h2.body)["path"].as_str()),
        (200, Some("/h2"))
    );
    assert_eq!(report(&h2.body)["headers"]["host"], "app.test");

    // Plain HTTP is redirected, except the challenge path (issuance proved that).
    let redirect = get(proxy.address(), "app.test", "/page?x=1").await;
    assert_eq!(redirect.status, 301);
    assert_eq!(
        redirect.headers["location"],
        format!("https://app.test:{}/page?x=1", proxy.https_port)
    );

    // A name we hold no certificate for is refused, with no default certificate shown.
    let refused = https_get(
        proxy.https_port,
        "stranger.test",
        "/",
        std::slice::from_ref(&root),
    )
    .await;
    assert!(refused.is_err(), "unknown SNI got {refused:?}");

    let status: serde_json::Value = serde_json::from_str(&proxy.ok(&["status", "--json"])).unwrap();
    let certificate = &status["routes"][0]["certificate"];
    assert_eq!(certificate["state"], "valid", "{status}");
    assert!(
        certificate["issuer"].as_str().unwrap().contains("Pebble"),
        "{status}"
    );
    assert!(certificate["expires"].as_str().is_some());
    let certs = proxy.home().join(".config/kamal-proxy/certs");
    // kamal-proxy's layout: one file per host, key then chain.
    let key = walk(&certs)
        .into_iter()
        .find(|p| p.ends_with("app.test"))
        .expect("stored key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // After a restart the stored certificate is served; no new order is placed.
    let proxy = proxy.restart();
    let again = https_get(proxy.https_port, "app.test", "/", &[root])
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(
        again.leaf, reply.leaf,
        "a different certificate after restart"
    );
    assert!(
        !proxy
            .log_lines()
            .iter()
            .any(|l| l["msg"] == "Requesting certificate"),
        "a new order was placed after restart:\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_and_production_hosts_each_get_their_own_certificate_and_service() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let proxy = proxy_for(&pebble, http_port);
    let production = Upstream::start("production").await;
    let staging = Upstream::start("staging").await;
    proxy.deploy(
        "app-web",
        &production.target(),
        &["--host=app.test", "--tls"],
    );
    proxy.deploy(
        "app-web-staging",
        &staging.target(),
        &["--host=staging.app.test", "--tls"],
    );

    let root = pebble.issuing_root().await;
    let prod = wait_for_https(proxy.https_port, "app.test", std::slice::from_ref(&root)).await;
    let stag = wait_for_https(proxy.https_port, "staging.app.test", &[root]).await;
    assert_eq!(report(&prod.body)["server"], "production");
    assert_eq!(report(&stag.body)["server"], "staging");
    assert_ne!(prod.leaf, stag.leaf, "one certificate per host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_certificate_due_for_renewal_is_renewed() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let proxy = proxy_for(&pebble, http_port);
    let app = Upstream::start("app").await;

    // A short-lived certificate already in the store: 3 hours long, 1 hour left, so due.
    let (old_pem, old_key, old_root) = short_lived_certificate("renew.test");
    let store = berth_acme::CertStore::new(
        &proxy.home().join(".config/kamal-proxy/certs"),
        &pebble.directory_url(),
    );
    std::fs::create_dir_all(store.dir()).unwrap();
    std::fs::write(store.host_file("renew.test"), format!("{old_key}{old_pem}")).unwrap();
    // The ACME account kamal-proxy left (autocert's SEC1 key): renewal uses it, not a new one.
    let account_key = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kamal-proxy/certs/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/acme_account+key"
    ))
    .unwrap();
    std::fs::write(store.dir().join("acme_account+key"), &account_key).unwrap();

    proxy.deploy("web", &app.target(), &["--host=renew.test", "--tls"]);
    let root = pebble.issuing_root().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = https_get(
            proxy.https_port,
            "renew.test",
            "/",
            &[root.clone(), old_root.clone()],
        )
        .await;
        if let Ok(reply) = &reply {
            let renewed = https_get(
                proxy.https_port,
                "renew.test",
                "/",
                std::slice::from_ref(&root),
            )
            .await;
            if renewed.is_ok() {
                assert_eq!(reply.status, 200);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not renewed: {reply:?}\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = std::fs::read_to_string(store.host_file("renew.test")).unwrap();
    assert_eq!(
        std::fs::read(store.dir().join("acme_account+key")).unwrap(),
        account_key,
        "the adopted account key was kept"
    );
    assert!(proxy
        .log_lines()
        .iter()
        .all(|l| l["msg"] != "ACME account created"));
    let old_first_line = old_pem.lines().nth(1).unwrap();
    assert!(
        stored.contains("-----BEGIN CERTIFICATE-----") && !stored.contains(old_first_line),
        "the renewed certificate was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_certificates_are_served_and_a_bad_file_keeps_the_old_config() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    let (cert_pem, key_pem, root) = short_lived_certificate("custom.test");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, bad) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("bad.pem"),
    );
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    std::fs::write(&bad, "not a certificate").unwrap();
    let flag = |name: &str, path: &std::path::Path| format!("--{name}={}", path.display());

    proxy.deploy(
        "web",
        &app.target(),
        &[
            "--host=custom.test",
            "--tls",
            &flag("tls-certificate-path", &cert),
            &flag("tls-private-key-path", &key),
        ],
    );
    let reply = wait_for_https(proxy.https_port, "custom.test", std::slice::from_ref(&root)).await;
    assert_eq!(reply.status, 200);

    let output = proxy.cli(&[
        "deploy",
        "web",
        &format!("--target={}", app.target()),
        "--host=custom.test",
        "--tls",
        &flag("tls-certificate-path", &bad),
        &flag("tls-private-key-path", &key),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no certificate found"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let still = https_get(proxy.https_port, "custom.test", "/", &[root])
        .await
        .unwrap();
    assert_eq!(still.leaf, reply.leaf);
    assert!(proxy.ok(&["list"]).contains("custom.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_failures_stay_with_their_host() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let proxy = proxy_for(&pebble, http_port);
    let app = Upstream::start("app").await;
    let plain = Upstream::start("plain").await;

    // Pebble is told the rejected host lives elsewhere, so its HTTP-01 validation fails.
    pebble.resolve("rejected.test", "127.0.0.2").await;
    proxy.deploy(
        "rejected",
        &app.target(),
        &["--host=rejected.test", "--tls"],
    );
    proxy.deploy("good", &app.target(), &["--host=good.test", "--tls"]);
    proxy.deploy("plain", &plain.target(), &["--host=plain.test"]);

    let root = pebble.issuing_root().await;
    assert_eq!(
        wait_for_https(proxy.https_port, "good.test", std::slice::from_ref(&root))
            .await
            .status,
        200
    );
    assert_eq!(
        report(&get(proxy.address(), "plain.test", "/").await.body)["server"],
        "plain"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let failure = loop {
        let status: serde_json::Value =
            serde_json::from_str(&proxy.ok(&["status", "--json"])).unwrap();
        let route = status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["host"] == "rejected.test")
            .cloned()
            .unwrap();
        let state = route["certificate"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if state.starts_with("failed") {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "order did not fail: {route}\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        failure.contains("127.0.0.2")
            || failure.contains("connection refused")
            || failure.contains("connect"),
        "{failure}"
    );
    assert!(
        proxy
            .log_lines()
            .iter()
            .any(|l| l["msg"] == "Certificate order failed" && l["host"] == "rejected.test"),
        "the failure with the server's detail is logged"
    );
    assert!(https_get(
        proxy.https_port,
        "rejected.test",
        "/",
        std::slice::from_ref(&root)
    )
    .await
    .is_err());
    assert_eq!(
        https_get(proxy.https_port, "good.test", "/", &[root])
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_acme_server_leaves_plain_http_serving() {
    let proxy = ProxyProcess::start_with(&["--acme-directory=https://127.0.0.1:1/dir"]);
    let app = Upstream::start("app").await;
    proxy.deploy("secure", &app.target(), &["--host=secure.test", "--tls"]);
    proxy.deploy("plain", &app.target(), &["--host=plain.test"]);
    assert_eq!(get(proxy.address(), "plain.test", "/").await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.ok(&["status"]).contains("failed") {
        assert!(
            Instant::now() < deadline,
            "no failure reported:\n{}",
            proxy.ok(&["status"])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(proxy.address(), "plain.test", "/").await.status, 200);
    assert_eq!(get(proxy.address(), "secure.test", "/").await.status, 301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_tls_issues_only_for_hosts_the_app_allows() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let proxy = proxy_for(&pebble, http_port);
    let app = Upstream::start("app").await;
    proxy.deploy(
        "tenants",
        &app.target(),
        &["--tls", "--tls-on-demand-url=/allow"],
    );

    let root = pebble.issuing_root().await;
    let allowed = https_get(
        proxy.https_port,
        "yes.tenant.test",
        "/",
        std::slice::from_ref(&root),
    )
    .await;
    let allowed = allowed.unwrap_or_else(|e| panic!("allowed host refused: {e}\n{}", proxy.log()));
    assert_eq!(report(&allowed.body)["server"], "app");
    let denied = https_get(
        proxy.https_port,
        "no.tenant.test",
        "/",
        std::slice::from_ref(&root),
    )
    .await;
    assert!(
        denied.is_err(),
        "a host the app denied got a certificate: {denied:?}"
    );

    let output = proxy.cli(&[
        "deploy",
        "bad",
        &format!("--target={}", app.target()),
        "--tls",
        "--host=x.test",
        "--tls-on-demand-url=/allow",
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "on-demand with hosts is refused"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Port 80 closed (pebble's HTTP-01 validation is refused): the certificate is obtained with
/// TLS-ALPN-01 on the HTTPS port instead, as kamal-proxy obtains it. (With the TLS port
/// refused, every other test here shows HTTP-01 alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_http_port_unreachable_tls_alpn_01_gets_the_certificate() {
    let (closed_http, https_port) = (free_port(), free_port());
    let pebble = Pebble::start_validating(closed_http, https_port);
    let home = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let proxy = ProxyProcess::start_in_shared_home(
        home,
        0,
        https_port,
        &[
            &format!("--acme-directory={}", pebble.directory_url()),
            &format!("--acme-ca-root={}", pebble.api_ca_path().display()),
        ],
    );
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=alpn.test", "--tls"]);
    let root = pebble.issuing_root().await;
    let reply = wait_for_https(proxy.https_port, "alpn.test", std::slice::from_ref(&root)).await;
    assert_eq!(reply.status, 200);
    assert!(
        proxy
            .log_lines()
            .iter()
            .any(|l| l["msg"] == "HTTP-01 could not complete; trying TLS-ALPN-01"),
        "{}",
        proxy.log()
    );
}

/// A client that comes back resumes its TLS session (a TLS 1.3 ticket, or a cached TLS 1.2
/// session) instead of paying for a full handshake, and the metrics count both kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_clients_resume_their_tls_sessions() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let metrics_port = free_port();
    let proxy = ProxyProcess::start_with(&[&format!("--metrics-port={metrics_port}")]);
    let app = Upstream::start("app").await;
    let files = common::certs::certificate_files("resume.test");
    proxy.deploy(
        "web",
        &app.target(),
        &[
            "--host=resume.test",
            "--tls",
            &files.flags[0],
            &files.flags[1],
        ],
    );
    for versions in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(files.root.clone()).unwrap();
        // One client configuration, as one browser: it remembers its sessions.
        let config = std::sync::Arc::new(
            common::tls_client_speaking(&[versions])
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.https_port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("resume.test").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, stream)
                .await
                .unwrap();
            kinds.push(tls.get_ref().1.handshake_kind());
            tls.write_all(b"GET / HTTP/1.1\r\nHost: resume.test\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer).await;
            assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        }
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed),
                Some(rustls::HandshakeKind::Resumed)
            ],
            "{versions:?}"
        );
    }
    let text = get(
        std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port)),
        "localhost",
        "/metrics",
    )
    .await
    .body;
    assert!(
        text.contains("berth_tls_handshakes_total{kind=\"full\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("berth_tls_handshakes_total{kind=\"resumed\"} 4"),
        "{text}"
    );
}

/// A ClientHello whose server name is `name` (any bytes; clients such as wrk send an IP
/// address there, which RFC 6066 forbids), offering only TLS_AES_128_GCM_SHA256.
fn client_hello_naming(name: &[u8]) -> Vec<u8> {
    let name_len = name.len() as u16;
    let mut server_name = vec![0x00, 0x00]; // extension: server_name
    server_name.extend_from_slice(&(name_len + 5).to_be_bytes());
    server_name.extend_from_slice(&(name_len + 3).to_be_bytes());
    server_name.push(0x00); // host_name
    server_name.extend_from_slice(&name_len.to_be_bytes());
    server_name.extend_from_slice(name);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0x00); // no session ID
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
    body.extend_from_slice(&[0x01, 0x00]); // no compression
    body.extend_from_slice(&(server_name.len() as u16).to_be_bytes());
    body.extend_from_slice(&server_name);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// What a client sends is not a reason for a log line per connection: rustls's warning about
/// an IP address as the server name (wrk and some monitors send one on every connection)
/// stays out of the log unless `--debug` asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_address_as_server_name_writes_no_log_line_per_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let quiet = ProxyProcess::start();
    let verbose = ProxyProcess::start_with(&["--debug"]);
    let app = Upstream::start("app").await;
    let files = common::certs::certificate_files("ip.test");
    for proxy in [&quiet, &verbose] {
        proxy.deploy(
            "web",
            &app.target(),
            &["--host=ip.test", "--tls", &files.flags[0], &files.flags[1]],
        );
        for _ in 0..3 {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.https_port))
                .await
                .unwrap();
            stream
                .write_all(&client_hello_naming(b"127.0.0.1"))
                .await
                .unwrap();
            // The server has parsed the ClientHello once it answers (an alert: no suite in
            // common for the TLS 1.2 this hello negotiates), so any warning is written by then.
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            assert_eq!(answer.first(), Some(&0x15), "an alert record");
        }
    }
    let warned = |proxy: &ProxyProcess| proxy.log().matches("Illegal SNI").count();
    assert_eq!(warned(&quiet), 0, "{}", quiet.log());
    assert_eq!(warned(&verbose), 3, "{}", verbose.log());
}
