//! Request smuggling and malformed input: each case is sent over a raw socket, and a
//! recording upstream shows what, if anything, reached it. A rejected request never reaches
//! the upstream, and nothing sent after it on the same connection does either.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::ProxyProcess;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the upstream received it.
#[derive(Debug, Clone, PartialEq)]
struct Received {
    method: String,
    path: String,
    body: String,
}

/// An upstream that answers 200 to everything and records every request but health checks.
struct Recorder {
    address: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let log = Arc::clone(&log);
                            async move {
                                let method = request.method().to_string();
                                let path = request.uri().path().to_string();
                                let body = request.into_body().collect().await?.to_bytes();
                                if path != "/up" {
                                    log.lock().unwrap().push(Received {
                                        method,
                                        path,
                                        body: String::from_utf8_lossy(&body).into_owned(),
                                    });
                                }
                                Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                                    "ok",
                                ))))
                            }
                        });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { address, received }
    }

    fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// Sends `bytes` and reads until the proxy closes the connection (or 5 s pass). Returns the
/// status of the first response and whether the connection was closed.
async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> (u16, bool) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut response = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .is_ok();
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, closed)
}

/// Appended to every rejected case: if the proxy kept reading the connection after the bad
/// request, this would reach the upstream.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_ambiguous_http1_requests_are_refused_and_never_reach_the_upstream() {
    let proxy = ProxyProcess::start();
    let upstream = Recorder::start().await;
    proxy.deploy("app", &upstream.address.to_string(), &[]);
    let long_path = "a".repeat(70 * 1024);

    // (what, request head and body, acceptable statuses)
    let refused: Vec<(&str, String, &[u16])> = vec![
        ("two different Content-Lengths", "POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".into(), &[400]),
        ("Content-Length with a sign", "POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: +4\r\n\r\nabcd".into(), &[400]),
        ("negative Content-Length", "POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: -1\r\n\r\n".into(), &[400]),
        ("Content-Length list", "POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4, 5\r\n\r\nabcde".into(), &[400]),
        ("chunk size not hex", "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".into(), &[400]),
        ("chunk size overflowing", "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n".into(), &[400]),
        ("bare LF after a chunk size", "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n4\nabcd\r\n0\r\n\r\n".into(), &[400]),
        ("obsolete line folding", "GET / HTTP/1.1\r\nHost: app.test\r\nX-Folded: a\r\n b\r\n\r\n".into(), &[400]),
        ("space in a header name", "GET / HTTP/1.1\r\nHost: app.test\r\nBad Header: x\r\n\r\n".into(), &[400]),
        ("space before the colon", "GET / HTTP/1.1\r\nHost: app.test\r\nX-Spaced : x\r\n\r\n".into(), &[400]),
        ("NUL in a header value", "GET / HTTP/1.1\r\nHost: app.test\r\nX-Nul: a\0b\r\n\r\n".into(), &[400]),
        ("unknown transfer coding", "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".into(), &[400, 501]),
        ("chunked not last", "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into(), &[400, 501]),
        ("chunked twice", "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), &[400]),
        ("Transfer-Encoding on HTTP/1.0", "POST / HTTP/1.0\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), &[400]),
        ("absolute-form naming another host", "GET http://other.test/ HTTP/1.1\r\nHost: app.test\r\n\r\n".into(), &[400]),
        ("no Host", "GET / HTTP/1.1\r\n\r\n".into(), &[400]),
        ("two Hosts", "GET / HTTP/1.1\r\nHost: app.test\r\nHost: other.test\r\n\r\n".into(), &[400]),
        ("invalid Host", "GET / HTTP/1.1\r\nHost: app.test/evil\r\n\r\n".into(), &[400]),
        ("Host with userinfo", "GET / HTTP/1.1\r\nHost: user@app.test\r\n\r\n".into(), &[400]),
        ("oversized target", format!("GET /{long_path} HTTP/1.1\r\nHost: app.test\r\n\r\n"), &[400, 414, 431]),
        ("a target character only hyper refuses", "GET /a<b> HTTP/1.1\r\nHost: app.test\r\n\r\n".into(), &[400]),
        ("garbage request line", "GET  / HTTP/1.1\r\nHost: app.test\r\n\r\n".into(), &[400]),
        ("unknown HTTP version", "GET / HTTP/7.1\r\nHost: app.test\r\n\r\n".into(), &[400, 505]),
    ];
    let mut failures = Vec::new();
    for (what, request, statuses) in &refused {
        let sent = format!("{request}{SMUGGLED}");
        let (status, closed) = exchange(proxy.address(), sent.as_bytes()).await;
        let reached = upstream.take();
        if !statuses.contains(&status) || !closed || !reached.is_empty() {
            failures.push(format!(
                "{what}: status {status}, connection closed: {closed}, upstream got {reached:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Both Content-Length and Transfer-Encoding: the chunked framing wins and the length is
    // dropped (RFC 9112 section 6.3), the request goes on once, and the connection is closed
    // after the response, so whatever followed is never read.
    for (what, head) in [
        (
            "Content-Length and Transfer-Encoding",
            "POST /e HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding and Content-Length",
            "POST /e HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        ),
    ] {
        let (status, closed) = exchange(proxy.address(), format!("{head}{SMUGGLED}").as_bytes()).await;
        assert_eq!((status, closed), (200, true), "{what}");
        let expected = Received { method: "POST".into(), path: "/e".into(), body: String::new() };
        assert_eq!(upstream.take(), vec![expected], "{what}");
    }

    // Unusual but unambiguous: forwarded once, re-framed, with exactly the body sent.
    let normalised: Vec<(&str, &str, Received)> = vec![
        (
            "chunk extension",
            "POST /a HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4;name=value\r\nabcd\r\n0\r\n\r\n",
            Received { method: "POST".into(), path: "/a".into(), body: "abcd".into() },
        ),
        (
            "absolute-form naming the same host",
            "GET http://app.test/b?x=1 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
            Received { method: "GET".into(), path: "/b".into(), body: String::new() },
        ),
        (
            "identical Content-Lengths",
            "POST /c HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
            Received { method: "POST".into(), path: "/c".into(), body: "abcd".into() },
        ),
        (
            "trailers after the last chunk",
            "POST /d HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nab\r\n0\r\nX-Trailer: 1\r\n\r\n",
            Received { method: "POST".into(), path: "/d".into(), body: "ab".into() },
        ),
    ];
    for (what, request, expected) in normalised {
        let (status, _) = exchange(proxy.address(), request.as_bytes()).await;
        assert_eq!(status, 200, "{what}");
        assert_eq!(upstream.take(), vec![expected], "{what}");
    }
}

/// HTTP/2 frames by hand, since a conforming client library will not send malformed ones.
mod h2_frames {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const GOAWAY: u8 = 0x7;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = length[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// An HPACK header block of literal fields, never indexed, no Huffman coding.
    pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in fields {
            block.push(0x10);
            for text in [name, value] {
                assert!(text.len() < 127);
                block.push(text.len() as u8);
                block.extend_from_slice(text.as_bytes());
            }
        }
        block
    }

    /// The client side of a connection that sends one request with `fields`.
    pub fn request(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        bytes.extend(frame(HEADERS, 0x5, 1, &header_block(fields))); // END_STREAM | END_HEADERS
        bytes
    }
}

/// What the proxy answered to stream 1: its HEADERS payload, or the frame type that ended it.
async fn h2_answer(proxy: SocketAddr, fields: &[(&str, &str)]) -> Result<Vec<u8>, u8> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(&h2_frames::request(fields)).await.unwrap();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                return Err(0);
            }
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            if stream.read_exact(&mut payload).await.is_err() {
                return Err(0);
            }
            let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match head[3] {
                h2_frames::GOAWAY => return Err(h2_frames::GOAWAY),
                h2_frames::RST_STREAM if stream_id == 1 => return Err(h2_frames::RST_STREAM),
                h2_frames::HEADERS if stream_id == 1 => return Ok(payload),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the proxy answers stream 1 in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http2_requests_are_refused_and_never_reach_the_upstream() {
    let proxy = ProxyProcess::start();
    let upstream = Recorder::start().await;
    proxy.deploy("app", &upstream.address.to_string(), &[]);
    let base = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "app.test"),
        (":path", "/x"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };

    // A well-formed request, to show the hand-built frames are right: 200 is HPACK's static
    // entry 8, sent as the single byte 0x88.
    let answer = h2_answer(proxy.address(), &base).await.expect("a response");
    assert!(answer.contains(&0x88), "{answer:?}");
    assert_eq!(upstream.take().len(), 1);

    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("two :path", with(&[(":path", "/y")])),
        ("unknown pseudo-header", with(&[(":smuggle", "1")])),
        ("pseudo-header after a regular one", {
            let mut fields = vec![("x-early", "1")];
            fields.extend(base);
            fields
        }),
        ("no :path", base[..3].to_vec()),
        ("upper-case header name", with(&[("X-Upper", "1")])),
        (
            "connection-specific header",
            with(&[("connection", "keep-alive")]),
        ),
        (
            "transfer-encoding",
            with(&[("transfer-encoding", "chunked")]),
        ),
        ("te other than trailers", with(&[("te", "gzip")])),
    ];
    for (what, fields) in cases {
        let answer = h2_answer(proxy.address(), &fields).await;
        assert!(
            matches!(answer, Err(h2_frames::RST_STREAM | h2_frames::GOAWAY)),
            "{what}: the stream is reset, got {answer:?}"
        );
        assert_eq!(upstream.take(), vec![], "{what}");
    }

    // Well-formed HTTP/2 but naming two hosts: our own check answers 400 (static entry 12).
    let answer = h2_answer(proxy.address(), &with(&[("host", "other.test")]))
        .await
        .expect("a response");
    assert!(answer.contains(&0x8c), "400 expected: {answer:?}");
    assert_eq!(upstream.take(), vec![]);
}

/// An upstream that switches protocols for every request but its health check, whatever was
/// asked (as a careless h2c handler does), recording each request head and every byte sent
/// after the 101.
async fn switching_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                while let Some(head) = common::raw_app::read_head(&mut stream).await {
                    if head.starts_with("GET /up ") {
                        let _ = stream.write_all(&common::raw_app::ok()).await;
                        continue;
                    }
                    log.lock().unwrap().push(head);
                    let _ = stream
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                        .await;
                    let mut tunnelled = vec![0u8; 4096];
                    while let Ok(n) = stream.read(&mut tunnelled).await {
                        if n == 0 {
                            return;
                        }
                        let text = String::from_utf8_lossy(&tunnelled[..n]).into_owned();
                        log.lock().unwrap().push(format!("TUNNELLED {text}"));
                    }
                    return;
                }
            });
        }
    });
    (address, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_never_tunnelled() {
    let (app, seen) = switching_upstream().await;
    let proxy = ProxyProcess::start();
    proxy.deploy(
        "web",
        &app.to_string(),
        &["--host=app.test", "--path-prefix=/public"],
    );
    for connection in [
        "Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "Connection: Upgrade\r\n",
    ] {
        seen.lock().unwrap().clear();
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        let smuggled = format!(
            "GET /public HTTP/1.1\r\nHost: app.test\r\nUpgrade: h2c\r\n{connection}\r\n\
             GET /admin HTTP/1.1\r\nHost: app.test\r\n\r\n"
        );
        stream.write_all(smuggled.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(
            !answer.contains(" 101 "),
            "the client was switched: {answer}"
        );
        let seen = seen.lock().unwrap().clone();
        let first = seen
            .first()
            .expect("the request reached the app")
            .to_ascii_lowercase();
        assert!(
            !first.contains("upgrade: h2c") && !first.contains("http2-settings"),
            "the upgrade was passed on: {first}"
        );
        assert!(
            seen.iter().all(|entry| !entry.starts_with("TUNNELLED")),
            "bytes were tunnelled past routing: {seen:?}"
        );
        // /admin is outside the service's prefix: routed, it is a 404, never the app's.
        assert!(
            seen.iter().all(|entry| !entry.contains("/admin")),
            "a request skipped routing: {seen:?}"
        );
    }
}
