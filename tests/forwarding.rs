//! Forwarding end to end: what reaches the app, what the client gets back when things go
//! wrong, buffering, and the request log.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, request, Connection, ProxyProcess, Upstream};

fn report(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not a report: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_sees_original_host_exact_query_and_forwarded_headers() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);

    let mut connection = Connection::open(proxy.address()).await.unwrap();
    let mut sent = request(
        "GET",
        "app.test",
        "/search?q=a%2Fb+c&&x=%E2%9C%93&flag",
        Bytes::new(),
    );
    sent.headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    sent.headers_mut()
        .insert("x-hop", "secret".parse().unwrap());
    sent.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let reply = connection.send(sent).await.unwrap();
    let seen = report(&reply.body);
    let headers = &seen["headers"];
    assert_eq!(headers["host"], "app.test", "Host unchanged");
    assert_eq!(
        seen["query"], "q=a%2Fb+c&&x=%E2%9C%93&flag",
        "query byte for byte"
    );
    assert_eq!(
        headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1",
        "appended (forward-headers is on without TLS)"
    );
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "app.test");
    assert_eq!(
        headers["x-request-id"].as_str().unwrap().len(),
        36,
        "a UUID was added"
    );
    assert!(
        headers.get("x-hop").is_none(),
        "headers named by Connection are removed"
    );
    assert!(headers.get("connection").is_none() || headers["connection"] != "keep-alive, x-hop");

    let mut with_id = request("GET", "app.test", "/", Bytes::new());
    with_id
        .headers_mut()
        .insert("x-request-id", "abc-123".parse().unwrap());
    let seen = report(&connection.send(with_id).await.unwrap().body);
    assert_eq!(seen["headers"]["x-request-id"], "abc-123");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_headers_off_replaces_client_supplied_values() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--forward-headers=false"]);
    let mut spoofed = request("GET", "app.test", "/", Bytes::new());
    spoofed
        .headers_mut()
        .insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    spoofed
        .headers_mut()
        .insert("x-forwarded-proto", "https".parse().unwrap());
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    let seen = report(&connection.send(spoofed).await.unwrap().body);
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_is_502_and_slow_target_is_504() {
    let proxy = ProxyProcess::start();
    proxy.deploy("gone", "127.0.0.1:1", &["--host=gone.test", "--force"]);
    let reply = get(proxy.address(), "gone.test", "/").await;
    assert_eq!(reply.status, 502);
    assert!(reply.body.contains("502 Bad Gateway"));

    let app = Upstream::start("app").await;
    proxy.deploy(
        "slow",
        &app.target(),
        &["--host=slow.test", "--target-timeout=300ms"],
    );
    let started = Instant::now();
    let reply = get(proxy.address(), "slow.test", "/slow?ms=3000").await;
    assert_eq!(reply.status, 504);
    assert!(started.elapsed() < Duration::from_millis(2500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_requests_spill_to_disk_and_respect_the_maximum() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy(
        "web",
        &app.target(),
        &[
            "--buffer-requests",
            "--buffer-responses",
            "--buffer-memory=1024",
            "--max-request-body=100000",
        ],
    );
    let mut connection = Connection::open(proxy.address()).await.unwrap();

    let body: Vec<u8> = (0..50_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let reply = connection
        .send(request("POST", "app.test", "/echo", body.clone()))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body.as_bytes(),
        &body[..],
        "body intact after spilling past 1 KB"
    );
    assert_eq!(reply.headers["x-request-framing"], "content-length 50000");
    assert_eq!(reply.headers["content-length"], "50000");

    let reply = connection
        .send(request("POST", "app.test", "/echo", vec![b'x'; 200_000]))
        .await
        .unwrap();
    assert_eq!(reply.status, 413);
    assert_eq!(
        app.requests(),
        1,
        "the oversized body never reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbuffered_uploads_stream_through_unchanged() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);
    let body = vec![7u8; 300_000];
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    let reply = connection
        .send(request("POST", "app.test", "/echo", body.clone()))
        .await
        .unwrap();
    assert_eq!(reply.body.len(), body.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_logged_once_as_json_with_the_asked_headers() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy(
        "web",
        &app.target(),
        &[
            "--host=app.test",
            "--log-request-header=Cache-Control",
            "--log-response-header=Content-Type",
        ],
    );
    let mut logged = request("GET", "app.test", "/page?x=1", Bytes::new());
    logged
        .headers_mut()
        .insert("cache-control", "no-store".parse().unwrap());
    logged
        .headers_mut()
        .insert("x-request-id", "log-me".parse().unwrap());
    Connection::open(proxy.address())
        .await
        .unwrap()
        .send(logged)
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let found = proxy
            .log_lines()
            .into_iter()
            .filter(|l| l["request_id"] == "log-me")
            .collect::<Vec<_>>();
        if !found.is_empty() {
            assert_eq!(found.len(), 1, "logged once");
            break found[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no request log line:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for field in [
        "host",
        "port",
        "path",
        "request_id",
        "status",
        "service",
        "target",
        "duration",
        "method",
        "req_content_length",
        "req_content_type",
        "resp_content_length",
        "resp_content_type",
        "client_addr",
        "client_port",
        "remote_addr",
        "user_agent",
        "proto",
        "scheme",
        "query",
    ] {
        assert!(line.get(field).is_some(), "missing {field} in {line}");
    }
    assert_eq!(line["host"], "app.test");
    assert_eq!(line["path"], "/page");
    assert_eq!(line["query"], "x=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["service"], "web");
    assert_eq!(line["target"], app.target().as_str());
    assert_eq!(line["req_cache_control"], "no-store");
    assert!(line.get("resp_content_type").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_with_prior_knowledge() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);
    let stream = tokio::net::TcpStream::connect(proxy.address())
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let sent = hyper::Request::get("http://app.test/h2?x=1")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(sent).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let seen = report(&String::from_utf8_lossy(&body));
    assert_eq!(
        seen["headers"]["host"], "app.test",
        "the :authority becomes the Host header"
    );
    assert_eq!(seen["path"], "/h2");
}

/// Sends raw bytes and returns what the proxy answered (the connection is then closed).
async fn raw_exchange(address: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Splits pipelined HTTP/1.1 responses: (status line, lower-cased head, body) each, framed
/// by Content-Length (or none, for the HEAD request at `head_at`).
fn split_responses(mut raw: &[u8], head_at: Option<usize>) -> Vec<(String, String, String)> {
    let mut responses = Vec::new();
    while !raw.is_empty() {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        raw = &raw[end + 4..];
        let status = head.lines().next().unwrap_or_default().to_string();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .map_or(0, |length| length.trim().parse().unwrap());
        let length = if head_at == Some(responses.len()) {
            0
        } else {
            length
        };
        let body = String::from_utf8_lossy(&raw[..length]).into_owned();
        raw = &raw[length..];
        responses.push((status, head, body));
    }
    responses
}

/// Simple requests are served without hyper and anything else by hyper: one connection that
/// goes from one to the other mid-stream, pipelined, gets every answer in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_across_both_http1_paths() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);
    let sent = concat!(
        "GET /first HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "DELETE /second?x=1 HTTP/1.1\r\nHost: app.test\r\nX-Thing: a\r\nx-thing: b\r\n\r\n",
        "POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello",
        "GET /fourth HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "HEAD /fifth HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "GET /nowhere HTTP/1.1\r\nHost: unknown.test\r\n\r\n",
        "GET /last HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    );
    let answer = raw_exchange(proxy.address(), sent.as_bytes()).await;
    let responses = split_responses(answer.as_bytes(), Some(4));
    let statuses: Vec<_> = responses
        .iter()
        .map(|(status, ..)| status.as_str())
        .collect();
    assert_eq!(
        statuses,
        [
            "http/1.1 200 ok",
            "http/1.1 200 ok",
            "http/1.1 200 ok",
            "http/1.1 200 ok",
            "http/1.1 200 ok",
            "http/1.1 404 not found",
            "http/1.1 200 ok"
        ],
        "{answer}"
    );
    let first = report(&responses[0].2);
    assert_eq!(first["path"], "/first");
    assert_eq!(first["method"], "GET");
    let second = report(&responses[1].2);
    assert_eq!(second["method"], "DELETE");
    assert_eq!(second["query"], "x=1");
    // The stand-in app reports one value per name (the unit tests see both kept).
    assert_eq!(
        second["headers"]["x-thing"], "b",
        "a repeated field: {second}"
    );
    assert_eq!(responses[2].2, "hello", "the body hyper read");
    assert_eq!(report(&responses[3].2)["path"], "/fourth");
    let (_, head, body) = &responses[4];
    assert!(
        head.contains("content-length: "),
        "HEAD keeps the length: {head}"
    );
    assert!(body.is_empty());
    assert_eq!(report(&responses[6].2)["path"], "/last");
    for (status, head, _) in &responses {
        assert!(
            head.contains("\r\ndate: "),
            "{status}: a date, as hyper sends: {head}"
        );
    }
    assert!(
        responses[6].1.contains("connection: close"),
        "the client asked to close: {}",
        responses[6].1
    );
}

/// A head that arrives in pieces is put together before it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_sent_in_pieces_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);
    let mut stream = tokio::net::TcpStream::connect(proxy.address())
        .await
        .unwrap();
    for piece in [
        "GET /pie",
        "ces HTTP/1.1\r\nHo",
        "st: app.test\r\nConnection: close\r\n",
        "\r\n",
    ] {
        stream.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let responses = split_responses(&answer, None);
    assert_eq!(responses.len(), 1, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(responses[0].0, "http/1.1 200 ok");
    assert_eq!(report(&responses[0].2)["path"], "/pieces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_body_is_400_buffered_or_not() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("streamed", &app.target(), &["--host=streamed.test"]);
    proxy.deploy(
        "buffered",
        &app.target(),
        &["--host=buffered.test", "--buffer-requests"],
    );
    for host in ["streamed.test", "buffered.test"] {
        let sent = format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n");
        let answer = raw_exchange(proxy.address(), sent.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{host}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_early_is_logged_as_499() {
    use tokio::io::AsyncWriteExt;
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);
    let mut stream = tokio::net::TcpStream::connect(proxy.address())
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /slow?ms=3000 HTTP/1.1\r\nHost: app.test\r\nX-Request-ID: leaves-early\r\n\r\n",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = proxy.log_lines();
        if let Some(line) = lines.iter().find(|l| l["request_id"] == "leaves-early") {
            assert_eq!(line["status"], 499, "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for the abandoned request:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// On a dual-stack listener (`--bind ::`, as on a host with IPv6), an IPv4 client is seen as
/// `::ffff:a.b.c.d`; apps and logs get the plain IPv4 address, as kamal-proxy gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_clients_of_a_dual_stack_listener_appear_as_plain_ipv4() {
    let proxy = ProxyProcess::start_with(&["--bind=::"]);
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);
    let reply = get(proxy.address(), "app.test", "/dual").await;
    let seen: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1", "{seen}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logged = proxy
            .log_lines()
            .into_iter()
            .find(|l| l["msg"] == "Request" && l["path"] == "/dual");
        if let Some(line) = logged {
            assert_eq!(line["client_addr"], "127.0.0.1", "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An app that records the head of each request it gets (health checks aside) and answers
/// every request with an empty 200, reading Content-Length and chunked bodies alike.
struct HeadRecorder {
    address: std::net::SocketAddr,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HeadRecorder {
    async fn start() -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = heads.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push_str(&line);
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let lower = head.to_ascii_lowercase();
                        if let Some(length) = lower
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                        {
                            let mut body = vec![0u8; length];
                            stream.read_exact(&mut body).await.unwrap();
                        } else if lower.contains("transfer-encoding: chunked") {
                            loop {
                                let mut size = String::new();
                                stream.read_line(&mut size).await.unwrap();
                                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                                let mut chunk = vec![0u8; size + 2];
                                stream.read_exact(&mut chunk).await.unwrap();
                                if size == 0 {
                                    break;
                                }
                            }
                        }
                        if !head.starts_with("GET /up ") {
                            recorded.lock().unwrap().push(head);
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if stream.get_mut().write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { address, heads }
    }

    fn target(&self) -> String {
        self.address.to_string()
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// The headers the proxy adds when the client sent none of them take a shortcut (written
/// straight into the head sent to the app); whole and streamed bodies go different ways.
/// Either way each must arrive exactly once, with kamal-proxy's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_headers_reach_the_app_once_each_for_whole_and_streamed_bodies() {
    let proxy = ProxyProcess::start();
    let app = HeadRecorder::start().await;
    proxy.deploy("web", &app.target(), &["--host=app.test"]);
    let mut connection = Connection::open(proxy.address()).await.unwrap();
    let whole = connection
        .send(request("GET", "app.test", "/whole", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(whole.status, 200);
    let streamed = connection
        .send(request("POST", "app.test", "/streamed", vec![7u8; 300_000]))
        .await
        .unwrap();
    assert_eq!(streamed.status, 200);

    let heads = app.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        let fields: Vec<(String, String)> = head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(": "))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_string()))
            .collect();
        let values = |name: &str| -> Vec<&str> {
            fields
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(values("x-forwarded-for"), ["127.0.0.1"], "{head}");
        assert_eq!(values("x-forwarded-proto"), ["http"], "{head}");
        assert_eq!(values("x-forwarded-host"), ["app.test"], "{head}");
        assert_eq!(values("x-kamal-target"), [app.target().as_str()], "{head}");
        assert_eq!(values("host"), ["app.test"], "{head}");
        let start = values("x-request-start");
        assert!(start.len() == 1 && start[0].starts_with("t=1"), "{head}");
        let id = values("x-request-id");
        assert!(id.len() == 1 && id[0].len() == 36, "{head}");
    }
}
