//! Idle keep-alive connections are parked: after a quiet second hyper hands the connection
//! back and it waits holding no buffers, then a fresh hyper connection takes it up when the
//! client speaks. Nothing a client sends may be lost or misread across a park: requests after
//! one, a head split around one, pipelined requests, a WebSocket opened after one, TLS; and the
//! idle timeout still closes parked connections.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::pebble::free_port;
use common::{get, ProxyProcess, Upstream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const GET: &[u8] = b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\n";

/// The parked connection count the metrics report.
async fn parked(metrics_port: u16) -> usize {
    let reply = get(
        SocketAddr::from(([127, 0, 0, 1], metrics_port)),
        "localhost",
        "/metrics",
    )
    .await;
    reply
        .body
        .lines()
        .find_map(|line| line.strip_prefix("berth_parked_client_connections "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the metrics report parked connections")
}

async fn wait_until_parked(metrics_port: u16, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while parked(metrics_port).await != count {
        assert!(
            Instant::now() < deadline,
            "never saw {count} parked connections"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads more of a response into `pending`; the proxy must not close or stall.
async fn read_more(stream: &mut TcpStream, pending: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
        .await
        .expect("the response stalled")
        .expect("read a response");
    assert!(read > 0, "the proxy closed the connection");
    pending.extend_from_slice(&chunk[..read]);
}

/// Reads one response (head and a Content-Length body) and returns its status and body.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (u16, String) {
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        read_more(stream, pending).await;
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let status = head[9..12].parse().expect("a status code");
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a Content-Length");
    while pending.len() < head_end + length {
        read_more(stream, pending).await;
    }
    let body = String::from_utf8_lossy(&pending[head_end..head_end + length]).into_owned();
    pending.drain(..head_end + length);
    (status, body)
}

fn start() -> (ProxyProcess, u16) {
    let metrics_port = free_port();
    let proxy = ProxyProcess::start_with(&[&format!("--metrics-port={metrics_port}")]);
    (proxy, metrics_port)
}

/// A proxy with one service and a client connection that has had one answer.
struct Served {
    proxy: ProxyProcess,
    _app: Upstream,
    stream: TcpStream,
    pending: Vec<u8>,
}

async fn one_request_served(proxy: ProxyProcess) -> Served {
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    let mut pending = Vec::new();
    stream.write_all(GET).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    Served {
        proxy,
        _app: app,
        stream,
        pending,
    }
}

/// Sends `text` on the WebSocket and expects it echoed.
async fn echo<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    socket.send(Message::text(text)).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("an echo in time")
        .expect("the WebSocket is open")
        .unwrap();
    assert_eq!(echoed.to_text().unwrap(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_serves_what_its_client_sends_next() {
    let (proxy, metrics) = start();
    // Held whole: the proxy and the app live as long as it does.
    let mut served = one_request_served(proxy).await;
    wait_until_parked(metrics, 1).await;

    // A plain request wakes it.
    served.stream.write_all(GET).await.unwrap();
    assert_eq!(
        read_response(&mut served.stream, &mut served.pending)
            .await
            .0,
        200
    );
    assert_eq!(parked(metrics).await, 0);
    wait_until_parked(metrics, 1).await;

    // Two pipelined requests in one write: both answered, in order.
    let two = [
        GET,
        b"GET /two HTTP/1.1\r\nHost: app.test\r\n\r\n".as_slice(),
    ]
    .concat();
    served.stream.write_all(&two).await.unwrap();
    let first = read_response(&mut served.stream, &mut served.pending).await;
    let second = read_response(&mut served.stream, &mut served.pending).await;
    assert_eq!((first.0, second.0), (200, 200));
    assert!(
        first.1.contains("/one") && second.1.contains("/two"),
        "{first:?} {second:?}"
    );
    wait_until_parked(metrics, 1).await;

    // A head that starts after the park and pauses longer than the park delay midway.
    served
        .stream
        .write_all(b"GET /three HTTP/1.1\r\nHo")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    served
        .stream
        .write_all(b"st: app.test\r\n\r\n")
        .await
        .unwrap();
    let third = read_response(&mut served.stream, &mut served.pending).await;
    assert_eq!(third.0, 200);
    assert!(third.1.contains("/three"), "{third:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_begun_and_paused_is_not_parked_and_is_finished_after_the_pause() {
    let (proxy, metrics) = start();
    // Held whole: the proxy and the app live as long as it does.
    let mut served = one_request_served(proxy).await;
    // The start of the next head arrives, then the client goes quiet for longer than the park
    // delay. A connection with a head begun is not parked (it is held to the header read
    // timeout instead), and the head is finished when the rest comes.
    served
        .stream
        .write_all(b"GET /later HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(parked(metrics).await, 0, "parked with a head begun");
    served
        .stream
        .write_all(b"Host: app.test\r\n\r\n")
        .await
        .unwrap();
    let later = read_response(&mut served.stream, &mut served.pending).await;
    assert_eq!(later.0, 200);
    assert!(later.1.contains("/later"), "{later:?}");
    wait_until_parked(metrics, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_opens_on_a_connection_that_was_parked() {
    let (proxy, metrics) = start();
    let served = one_request_served(proxy).await;
    wait_until_parked(metrics, 1).await;

    let (mut socket, response) = tokio_tungstenite::client_async("ws://app.test/ws", served.stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    echo(&mut socket, "after").await;
    echo(&mut socket, "a park").await;
    // A relayed WebSocket is not an idle connection: it is never parked.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(parked(metrics).await, 0);
    echo(&mut socket, "still there").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_at_the_idle_timeout() {
    let metrics = free_port();
    let proxy = ProxyProcess::start_with(&[
        &format!("--metrics-port={metrics}"),
        // Shorter than the idle timeout: a quiet keep-alive connection is held to the idle
        // timeout, not to the time allowed for a request head.
        "--header-read-timeout=5s",
        "--idle-timeout=8s",
    ]);
    let Served {
        proxy: _proxy,
        _app,
        mut stream,
        ..
    } = one_request_served(proxy).await;
    let idle_from = Instant::now();
    wait_until_parked(metrics, 1).await;

    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte))
        .await
        .expect("a parked connection outlived the idle timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Parking does not restart the clock: the timeout counts from the last response.
    let idle_for = idle_from.elapsed();
    assert!(
        idle_for >= Duration::from_secs(7) && idle_for < Duration::from_secs(12),
        "closed after {idle_for:?}"
    );
    assert_eq!(parked(metrics).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_is_parked_and_taken_up_again() {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;

    let (proxy, metrics) = start();
    let app = Upstream::start("app").await;
    let (cert_pem, key_pem, root) = common::certs::short_lived_certificate("secure.test");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    proxy.deploy(
        "web",
        &app.target(),
        &[
            "--host=secure.test",
            "--tls",
            &format!("--tls-certificate-path={}", cert.display()),
            &format!("--tls-private-key-path={}", key.display()),
        ],
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let config = common::tls_client()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], proxy.https_port)))
        .await
        .unwrap();
    let name = ServerName::try_from("secure.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);

    for path in ["/before", "/after"] {
        sender.ready().await.expect("the connection is still open");
        let request = common::request("GET", "secure.test", path, bytes::Bytes::new());
        let response = sender.send_request(request).await.unwrap();
        let reply = common::read_reply(response).await.unwrap();
        assert_eq!(reply.status, 200);
        assert!(reply.body.contains(path), "{}", reply.body);
        if path == "/before" {
            wait_until_parked(metrics, 1).await;
        }
    }
}
