//! HTTP/3 (`run --http3`): QUIC on the HTTPS port's UDP twin, through the same routing and
//! pipeline as TCP; advertised to TCP clients with Alt-Svc; kept through deploys and handed
//! over with the listeners.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::certs::{certificate_files, CertificateFiles};
use common::h3_client::H3Client;
use common::pebble::https_get;
use common::{ProxyProcess, Upstream};
use http::{HeaderMap, HeaderValue, Method};

const HOST: &str = "app.example";

fn quic_address(proxy: &ProxyProcess) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], proxy.https_port))
}

fn deploy_tls(proxy: &ProxyProcess, target: &str, certs: &CertificateFiles) {
    proxy.deploy(
        "web",
        target,
        &[
            &format!("--host={HOST}"),
            "--tls",
            &certs.flags[0],
            &certs.flags[1],
        ],
    );
}

fn server_of(body: &str) -> String {
    let report: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    report["server"].as_str().unwrap_or("?").to_string()
}

/// The `Alt-Svc` of a 200 answer over HTTPS on TCP, from `port`.
async fn alt_svc_over_tcp(port: u16, certs: &CertificateFiles) -> Option<String> {
    let reply = https_get(port, HOST, "/", std::slice::from_ref(&certs.root))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let alt_svc = reply.headers.get("alt-svc")?;
    Some(alt_svc.to_str().unwrap().to_string())
}

/// Connects over QUIC, retrying for up to `limit` (the endpoint may not be reading yet).
async fn connect_within(
    address: SocketAddr,
    root: &rustls::pki_types::CertificateDer<'static>,
    limit: Duration,
) -> H3Client {
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout(
            Duration::from_secs(2),
            H3Client::connect(address, HOST, root),
        )
        .await
        {
            Ok(Ok(client)) => return client,
            Ok(Err(error)) if Instant::now() > deadline => panic!("no HTTP/3: {error}"),
            Err(_) if Instant::now() > deadline => panic!("no HTTP/3: connect timed out"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_serves_the_routes_https_serves_and_tcp_advertises_it() {
    let proxy = ProxyProcess::start_with(&["--http3"]);
    let app = Upstream::start("app").await;
    let certs = certificate_files(HOST);
    deploy_tls(&proxy, &app.target(), &certs);

    // TCP clients learn where HTTP/3 is, as kamal-proxy tells them.
    let expected = format!("h3=\":{}\"; ma=2592000", proxy.https_port);
    assert_eq!(
        alt_svc_over_tcp(proxy.https_port, &certs).await,
        Some(expected)
    );

    let mut client =
        connect_within(quic_address(&proxy), &certs.root, Duration::from_secs(5)).await;
    let reply = client.get(HOST, "/hello?x=1").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.headers.get("alt-svc").is_none(),
        "an HTTP/3 response does not advertise HTTP/3"
    );
    let report: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(report["server"], "app");
    assert_eq!(report["path"], "/hello");
    assert_eq!(report["headers"]["host"], HOST);
    assert_eq!(report["headers"]["x-forwarded-proto"], "https");
    assert_eq!(report["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(
        report["headers"]["transfer-encoding"].is_null(),
        "a GET with no body goes upstream with none: {report}"
    );

    // A request body, streamed to the app and back.
    let body = Bytes::from(vec![b'q'; 300_000]);
    let mut headers = HeaderMap::new();
    headers.insert("content-length", HeaderValue::from(body.len()));
    let echoed = client
        .request(Method::POST, HOST, "/echo", headers, Some(body.clone()))
        .await
        .unwrap();
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.body, body);

    // Same routing as TCP: an unknown path prefix on a known host, an unknown host.
    let unknown = client.get("other.example", "/").await.unwrap();
    assert_eq!(unknown.status, 404);

    // A name with no certificate gets no QUIC handshake.
    let stranger = tokio::time::timeout(
        Duration::from_secs(5),
        H3Client::connect(quic_address(&proxy), "stranger.example", &certs.root),
    )
    .await;
    assert!(
        !matches!(stranger, Ok(Ok(_))),
        "a handshake for a name without a certificate must fail"
    );

    // Logged like any request, as HTTP/3.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = proxy.log_lines();
        if lines.iter().any(|line| {
            line["path"] == "/hello" && line["proto"] == "HTTP/3.0" && line["status"] == 200
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no HTTP/3 request log line:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Without --http3 nothing is advertised.
    let plain = ProxyProcess::start();
    deploy_tls(&plain, &app.target(), &certs);
    assert_eq!(alt_svc_over_tcp(plain.https_port, &certs).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_under_http3_load_fails_no_request() {
    let proxy = ProxyProcess::start_with(&["--http3"]);
    let first = Upstream::start("first").await;
    let second = Upstream::start("second").await;
    let certs = certificate_files(HOST);
    deploy_tls(&proxy, &first.target(), &certs);

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client =
            connect_within(quic_address(&proxy), &certs.root, Duration::from_secs(5)).await;
        let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                match client.get(HOST, "/").await {
                    Ok(reply) if reply.status == 200 => {
                        seen.insert(server_of(&reply.text()));
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(reply) => failures.push(format!("status {}", reply.status)),
                    Err(error) => failures.push(error),
                }
            }
            (failures, seen)
        }));
    }
    let wait_for_more = |count: usize| {
        let served = Arc::clone(&served);
        async move {
            let goal = served.load(Ordering::Relaxed) + count;
            let deadline = Instant::now() + Duration::from_secs(20);
            while served.load(Ordering::Relaxed) < goal {
                assert!(Instant::now() < deadline, "the load stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for_more(200).await;
    for target in [&second, &first, &second] {
        let target = target.target();
        let proxy_ref = &proxy;
        let certs_ref = &certs;
        tokio::task::block_in_place(|| deploy_tls(proxy_ref, &target, certs_ref));
        wait_for_more(200).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut seen = std::collections::BTreeSet::new();
    for client in clients {
        let (failures, servers) = client.await.unwrap();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        seen.extend(servers);
    }
    assert!(served.load(Ordering::Relaxed) >= 800);
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["first", "second"],
        "both targets served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_finishes_http3_requests_and_the_new_process_serves_http3() {
    let mut old = ProxyProcess::start_with(&["--http3"]);
    let app = Upstream::start("app").await;
    let certs = certificate_files(HOST);
    deploy_tls(&old, &app.target(), &certs);
    let address = quic_address(&old);

    let mut before = connect_within(address, &certs.root, Duration::from_secs(5)).await;
    assert_eq!(before.get(HOST, "/").await.unwrap().status, 200);
    // A request still running when the new process takes over.
    let in_flight = tokio::spawn(async move {
        let reply = before.get(HOST, "/slow?ms=1500").await;
        (reply, before)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let new = tokio::task::block_in_place(|| old.upgrade());
    let (reply, mut before) = in_flight.await.unwrap();
    let reply = reply.expect("the request in flight during the handover finishes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "app slow");
    // The old process told the connection to go away: new requests on it are refused, not
    // lost, and the client opens a new connection.
    let _ = before.get(HOST, "/").await;

    // The old process lets go of the socket once its HTTP/3 requests are done; the new one
    // then serves HTTP/3, with the same certificate and routes.
    let status = tokio::task::block_in_place(|| old.wait_for_exit(Duration::from_secs(30)));
    assert!(status.success(), "the old process exits cleanly: {status}");
    let mut after = connect_within(address, &certs.root, Duration::from_secs(10)).await;
    let reply = after.get(HOST, "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(server_of(&reply.text()), "app");
    assert!(
        new.log()
            .contains("The old process let go of the HTTP/3 socket"),
        "{}",
        new.log()
    );
}

/// The same requests through Berth and, when it is at hand, kamal-proxy, both run with
/// `--http3`: the same Alt-Svc over TCP, the same answers over HTTP/3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_answers_as_kamal_proxys_does() {
    let app = Upstream::start("app").await;
    let certs = certificate_files(HOST);
    for peer in common::kamal_proxy::Peer::both_with(|| vec!["--http3".to_string()]) {
        let name = peer.name();
        peer.deploy(
            "web",
            &app.target(),
            &[
                &format!("--host={HOST}"),
                "--tls",
                &certs.flags[0],
                &certs.flags[1],
            ],
        );
        let port = peer.https_port();
        let expected = format!("h3=\":{port}\"; ma=2592000");
        assert_eq!(
            alt_svc_over_tcp(port, &certs).await,
            Some(expected),
            "{name}"
        );

        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let mut client = connect_within(address, &certs.root, Duration::from_secs(5)).await;
        let reply = client.get(HOST, "/hello?x=1").await.unwrap();
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        let report: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(report["path"], "/hello", "{name}");
        assert_eq!(report["query"], "x=1", "{name}");
        assert_eq!(report["headers"]["host"], HOST, "{name}");
        assert_eq!(report["headers"]["x-forwarded-proto"], "https", "{name}");

        let body = Bytes::from_static(b"over quic");
        let mut headers = HeaderMap::new();
        headers.insert("content-length", HeaderValue::from(body.len()));
        let echoed = client
            .request(Method::POST, HOST, "/echo", headers, Some(body.clone()))
            .await
            .unwrap();
        assert_eq!((echoed.status.as_u16(), echoed.body), (200, body), "{name}");

        let unknown = client.get("other.example", "/").await.unwrap();
        assert_eq!(unknown.status, 404, "{name}");
    }
}
