//! Apps written in raw bytes, for what the real upstream (`upstream.rs`) does not do: odd
//! status codes, trailers, cookies, redirects. Each request head is handed to the test's
//! closure, which gives the bytes to answer with; bodies are not read, so the apps serve
//! requests without one.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The next request head on `stream`, up to and including its blank line; `None` at the end.
pub async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Starts an app on a free port answering each request head with `answer(head)`. Its health
/// check (`GET /up`) is answered 200 unless `answer` handles it.
pub async fn raw_app<F>(answer: F) -> SocketAddr
where
    F: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut stream).await {
                    if stream.write_all(&answer(&head)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// `200 OK` with a two-byte body: what an app's health check answers.
pub fn ok() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
}

/// Reads from `stream` until what arrived contains `needle`, for up to `limit`; returns what
/// arrived, and whether the needle did.
pub async fn read_until(
    stream: &mut TcpStream,
    needle: &str,
    limit: std::time::Duration,
) -> (Vec<u8>, bool) {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(limit, async {
        let mut buffer = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(needle) {
            match stream.read(&mut buffer).await {
                Ok(n) if n > 0 => seen.extend_from_slice(&buffer[..n]),
                _ => return false,
            }
        }
        true
    })
    .await;
    (seen, found == Ok(true))
}
