//! How the proxy reads what targets send: every response framing HTTP/1.1 allows, interim
//! responses, malformed lengths, and the keep-alive connections it reuses (and must not reuse).
//! The target here is a raw TCP server answering with exact, hand-written bytes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{request, Connection, ProxyProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A target that answers each path with fixed bytes, and counts the connections it accepts.
struct ScriptedTarget {
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
}

const BIG_LENGTH: usize = 1024 * 1024;

impl ScriptedTarget {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        ScriptedTarget {
            address,
            connections,
        }
    }

    fn target(&self) -> String {
        self.address.to_string()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Serves requests on one connection until the script says to close it.
async fn serve(mut stream: TcpStream) {
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut stream, &mut buffer).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut more = [0u8; 4096];
            match stream.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&more[..n]),
            }
        }
        let body: Vec<u8> = buffer[head_end..head_end + length].to_vec();
        buffer.drain(..head_end + length);
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let path = words.next().unwrap_or_default().to_string();
        let (answer, then_close): (Vec<u8>, bool) = match path.as_str() {
            "/up" | "/plain" => (fixed(200, "plain body"), false),
            "/chunked" => (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
                  4;ext=1\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n"
                    .to_vec(),
                false,
            ),
            "/until-close" => (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread until the end".to_vec(),
                true,
            ),
            "/head" => (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_vec(),
                false,
            ),
            "/no-content" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
            "/not-modified" => (
                b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_vec(),
                false,
            ),
            "/interim" => (
                [
                    &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"[..],
                    &fixed(201, "after interim"),
                ]
                .concat(),
                false,
            ),
            "/conflicting-length" => (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
                true,
            ),
            "/close" => (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose".to_vec(),
                true,
            ),
            "/big" => {
                let mut answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG_LENGTH}\r\n\r\n").into_bytes();
                answer.extend((0..BIG_LENGTH).map(|i| (i % 251) as u8));
                (answer, false)
            }
            "/cut-short" => (
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this".to_vec(),
                true,
            ),
            // Answers, then closes the idle connection a moment later without saying so,
            // as an app server's keep-alive timeout does.
            "/then-idle-close" => {
                let _ = stream.write_all(&fixed(200, "first")).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            "/echo" => {
                let mut answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Method: {method}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                answer.extend_from_slice(&body);
                (answer, false)
            }
            _ => (fixed(404, "no such script"), false),
        };
        if stream.write_all(&answer).await.is_err() || then_close {
            return;
        }
    }
}

fn fixed(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads until `buffer` holds a request head; its length, or `None` at the end.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        let mut more = [0u8; 4096];
        match stream.read(&mut more).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&more[..n]),
        }
    }
}

fn start_proxy(target: &ScriptedTarget) -> ProxyProcess {
    let proxy = ProxyProcess::start();
    proxy.deploy("plain", &target.target(), &["--host=plain.test"]);
    proxy.deploy(
        "buffered",
        &target.target(),
        &[
            "--host=buffered.test",
            "--buffer-requests",
            "--buffer-responses",
        ],
    );
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_arrives_whole() {
    let target = ScriptedTarget::start().await;
    let proxy = start_proxy(&target);
    for host in ["plain.test", "buffered.test"] {
        let mut client = Connection::open(proxy.address()).await.unwrap();
        let reply = client.get(host, "/chunked").await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "wikipedia in\r\n\r\nchunks."),
            "{host}"
        );
        assert!(
            reply
                .headers
                .get("content-length")
                .is_none_or(|v| v == "23"),
            "{host}: {:?}",
            reply.headers
        );

        let reply = client.get(host, "/until-close").await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "read until the end"),
            "{host}"
        );

        let reply = client
            .send(request("HEAD", host, "/head", Bytes::new()))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{host}");
        assert_eq!(reply.body, "", "{host}");
        assert_eq!(
            reply.headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"1234"[..]),
            "{host}: a HEAD answer keeps the length a GET would have"
        );

        for (path, status) in [("/no-content", 204), ("/not-modified", 304)] {
            let reply = client.get(host, path).await.unwrap();
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (status, ""),
                "{host}{path}"
            );
        }

        let reply = client.get(host, "/interim").await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (201, "after interim"),
            "{host}"
        );

        let reply = client.get(host, "/big").await.unwrap();
        assert_eq!(reply.status, 200, "{host}");
        let expected: Vec<u8> = (0..BIG_LENGTH).map(|i| (i % 251) as u8).collect();
        let body = reply.body.as_bytes();
        assert_eq!(
            body.len(),
            String::from_utf8_lossy(&expected).len(),
            "{host}"
        );
        assert!(
            body == String::from_utf8_lossy(&expected).as_bytes(),
            "{host}: big body differs"
        );

        let reply = client
            .send(request("POST", host, "/echo", "sent body"))
            .await
            .unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "sent body"),
            "{host}"
        );
        let reply = client
            .send(request("POST", host, "/echo", Bytes::new()))
            .await
            .unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, ""),
            "{host}: empty POST"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_framing_from_a_target_is_a_502_or_a_cut_response() {
    let target = ScriptedTarget::start().await;
    let proxy = start_proxy(&target);
    for host in ["plain.test", "buffered.test"] {
        let mut client = Connection::open(proxy.address()).await.unwrap();
        let reply = client.get(host, "/conflicting-length").await.unwrap();
        assert_eq!(reply.status, 502, "{host}: {}", reply.body);

        // A body shorter than its length: buffered, the client gets a 502; streamed, the
        // head has gone out, so the response is cut and the client sees an error.
        let mut client = Connection::open(proxy.address()).await.unwrap();
        match client.get(host, "/cut-short").await {
            Ok(reply) => assert_eq!(reply.status, 502, "{host}: {}", reply.body),
            Err(error) => assert_eq!(host, "plain.test", "{error}"),
        }

        // Still serving.
        let mut client = Connection::open(proxy.address()).await.unwrap();
        let reply = client.get(host, "/plain").await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "plain body"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_reused_only_when_clean() {
    let target = ScriptedTarget::start().await;
    let proxy = start_proxy(&target);
    let mut client = Connection::open(proxy.address()).await.unwrap();
    client.get("plain.test", "/plain").await.unwrap();
    let before = target.connections();
    for _ in 0..20 {
        let reply = client.get("plain.test", "/plain").await.unwrap();
        assert_eq!(reply.body, "plain body");
        let reply = client.get("plain.test", "/chunked").await.unwrap();
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        target.connections(),
        before,
        "sequential requests should share one pooled connection"
    );

    // `Connection: close` and read-until-close responses end their connection.
    for path in ["/close", "/until-close"] {
        let before = target.connections();
        client.get("plain.test", path).await.unwrap();
        let reply = client.get("plain.test", "/plain").await.unwrap();
        assert_eq!(reply.body, "plain body", "after {path}");
        assert_eq!(target.connections(), before + 1, "after {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_target_closed_is_not_a_failed_request() {
    let target = ScriptedTarget::start().await;
    let proxy = start_proxy(&target);
    let mut client = Connection::open(proxy.address()).await.unwrap();
    for round in 0..5 {
        let reply = client.get("plain.test", "/then-idle-close").await.unwrap();
        assert_eq!(reply.body, "first", "round {round}");
        // Send while the target is closing the pooled connection, and after it has.
        for pause in [150, 250] {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let reply = client.get("plain.test", "/plain").await.unwrap();
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (200, "plain body"),
                "round {round}, after {pause} ms"
            );
        }
    }
    // Every one of the 15 requests logged, so a failure among the last is not missed.
    let requests =
        |lines: &[serde_json::Value]| lines.iter().filter(|line| line["msg"] == "Request").count();
    let failures: Vec<_> = proxy
        .log_lines_once(|lines| requests(lines) >= 15)
        .into_iter()
        .filter(|line| line["status"].as_u64().is_some_and(|s| s >= 500))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}
