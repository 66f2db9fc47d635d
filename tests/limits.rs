//! Limits on by default: slow and idle clients are cut off, oversized heads refused, and a
//! cap on connections that makes new clients wait without hurting open ones.

mod common;

use std::time::Duration;

use common::{get, Connection, ProxyProcess, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn raw(address: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await;
    let length = read.ok().and_then(Result::ok).unwrap_or(0);
    String::from_utf8_lossy(&answer[..length]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_slow_and_idle_clients_do_not_keep_a_new_one_waiting() {
    let proxy = ProxyProcess::start_with(&["--header-read-timeout=2s"]);
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);

    let mut slow = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        if i % 2 == 0 {
            // Slowloris: a request head that never ends.
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: ")
                .await
                .unwrap();
        }
        slow.push(stream);
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        get(proxy.address(), "app.test", "/"),
    )
    .await;
    assert_eq!(reply.expect("a new client was kept waiting").status, 200);

    // After the header read timeout the proxy has closed them all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for stream in slow.iter_mut().step_by(15) {
        let mut byte = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        match read {
            Ok(Ok(_)) | Ok(Err(_)) => {} // EOF, a 408, or a reset: closed by the proxy
            Err(_) => panic!("a slow or idle connection was still open after the timeout"),
        }
    }
}

/// The header read timeout holds each head of a keep-alive connection, not only the first:
/// a client that has been answered once and then trickles a head that never ends is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_whose_next_head_stalls_is_closed() {
    let proxy = ProxyProcess::start_with(&["--header-read-timeout=2s"]);
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);

    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let read = stream.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"));

    let stalled_at = std::time::Instant::now();
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: app.test\r\nX-Slow: ")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            // A byte every 500 ms: the connection is never quiet, so only the timeout ends it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if stream.write_all(b"x").await.is_err() {
                return;
            }
            let mut byte = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => panic!("the stalled head was answered"),
                Err(_) => {}
            }
        }
    })
    .await;
    closed.expect("a stalled head was still open 15 s later");
    let after = stalled_at.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "closed after {after:?}, before the timeout"
    );
    assert_eq!(app.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limit_is_100_header_fields() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);

    let head = |fields: usize| {
        let many: String = (0..fields).map(|i| format!("X-H{i}: v\r\n")).collect();
        format!("GET / HTTP/1.1\r\nHost: app.test\r\n{many}\r\n")
    };
    // 90 and Host (the test app, itself limited to 100, also gets the X-Forwarded-* ones).
    assert!(raw(proxy.address(), head(90).as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(raw(proxy.address(), head(101).as_bytes())
        .await
        .starts_with("HTTP/1.1 431"));
    assert_eq!(app.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_too_many_headers_get_431() {
    let proxy = ProxyProcess::start_with(&["--max-header-size=8192", "--max-headers=50"]);
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);

    let big = format!(
        "GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert!(raw(proxy.address(), big.as_bytes())
        .await
        .starts_with("HTTP/1.1 431"));
    let many: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: app.test\r\n{many}\r\n");
    assert!(raw(proxy.address(), request.as_bytes())
        .await
        .starts_with("HTTP/1.1 431"));
    assert_eq!(app.requests(), 0, "nothing reached the app");
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_new_clients_wait_and_open_ones_keep_being_served() {
    let proxy = ProxyProcess::start_with(&["--max-connections=3"]);
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);

    let mut open = Vec::new();
    for _ in 0..3 {
        let mut connection = Connection::open(proxy.address()).await.unwrap();
        assert_eq!(connection.get("app.test", "/").await.unwrap().status, 200);
        open.push(connection);
    }
    let address = proxy.address();
    let waiting = tokio::spawn(async move { get(address, "app.test", "/").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth connection was answered beyond the cap"
    );
    for connection in open.iter_mut() {
        assert_eq!(
            connection.get("app.test", "/").await.unwrap().status,
            200,
            "open ones keep being served"
        );
    }
    drop(open.pop());
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("still waiting after a slot freed");
    assert_eq!(reply.unwrap().status, 200);
}

#[test]
fn limits_that_cannot_work_are_refused_by_name() {
    let home = tempfile::tempdir().unwrap();
    for (flag, named) in [
        ("--max-header-size=100", "--max-header-size"),
        ("--max-connections=0", "--max-connections"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args([
                "run",
                "--http-port=0",
                "--https-port=0",
                "--bind=127.0.0.1",
                flag,
            ])
            .env("HOME", home.path())
            .env("KAMAL_PROXY_SOCKET", home.path().join("p.sock"))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&output.stderr).contains(named));
    }
}

/// Sends a whole upload before reading anything, as Python's `http.client` and many upload
/// libraries do, and returns the status line the client gets (or the error).
async fn upload_then_read<S>(mut stream: S, body: usize) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: {body}\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("head: {e}"))?;
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < body {
        let n = chunk.len().min(body - sent);
        stream
            .write_all(&chunk[..n])
            .await
            .map_err(|e| format!("body after {sent} bytes: {e}"))?;
        sent += n;
    }
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer[..read]).into_owned();
    Ok(text.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_reaches_a_client_that_sends_its_whole_upload_first() {
    let app = Upstream::start("app").await;
    let files = common::certs::certificate_files("app.test");
    let proxy = ProxyProcess::start();
    proxy.deploy(
        "web",
        &app.target(),
        &[
            "--host=app.test",
            "--tls",
            "--tls-redirect=false",
            &files.flags[0],
            &files.flags[1],
            "--buffer-requests",
            "--max-request-body=1000000",
        ],
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(files.root.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        common::tls_client()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ));
    for attempt in 0..10 {
        let plain = TcpStream::connect(proxy.address()).await.unwrap();
        let status = upload_then_read(plain, 1_500_000).await;
        assert_eq!(
            status.as_deref(),
            Ok("HTTP/1.1 413 Payload Too Large"),
            "plain HTTP, attempt {attempt}"
        );
        let stream = TcpStream::connect(("127.0.0.1", proxy.https_port))
            .await
            .unwrap();
        let secure = tls
            .connect(
                rustls::pki_types::ServerName::try_from("app.test").unwrap(),
                stream,
            )
            .await
            .unwrap();
        let status = upload_then_read(secure, 1_500_000).await;
        assert_eq!(
            status.as_deref(),
            Ok("HTTP/1.1 413 Payload Too Large"),
            "HTTPS, attempt {attempt}"
        );
    }
    assert_eq!(app.requests(), 0, "no oversized upload reached the app");
}
