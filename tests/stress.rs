//! Zero downtime under stress: 20 back-to-back deploys alternating between two upstreams,
//! with Kamal's buffering on, while keep-alive clients send quick GETs, slow GETs, POSTs
//! with bodies, and a WebSocket client reconnects whenever a drain closes its tunnel.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::load::{Load, LoadResult, Traffic};
use common::{ProxyProcess, Upstream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

struct WebSocketResult {
    handshakes: usize,
    echoes: usize,
    failures: Vec<String>,
}

/// One WebSocket client: echoes messages, reconnecting when its tunnel is closed. A failed
/// handshake is a failed HTTP request; a tunnel closed by a drain is not.
fn websocket_client(
    address: SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<WebSocketResult> {
    tokio::spawn(async move {
        let mut result = WebSocketResult {
            handshakes: 0,
            echoes: 0,
            failures: Vec::new(),
        };
        while !stop.load(Ordering::Relaxed) {
            let stream = match TcpStream::connect(address).await {
                Ok(stream) => stream,
                Err(error) => {
                    result.failures.push(format!("connect: {error}"));
                    continue;
                }
            };
            let mut socket = match tokio_tungstenite::client_async("ws://app.test/ws", stream).await
            {
                Ok((socket, response)) if response.status() == 101 => socket,
                Ok((_, response)) => {
                    result
                        .failures
                        .push(format!("handshake: {}", response.status()));
                    continue;
                }
                Err(error) => {
                    result.failures.push(format!("handshake: {error}"));
                    continue;
                }
            };
            result.handshakes += 1;
            while !stop.load(Ordering::Relaxed) {
                if socket.send(Message::text("ping")).await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) if text.as_str() == "ping" => {
                        result.echoes += 1;
                    }
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        result
    })
}

fn assert_clean(what: &str, result: &LoadResult) {
    assert!(
        result.failures.is_empty(),
        "{what}: {} failed of {}: {:?}",
        result.failures.len(),
        result.served + result.failures.len(),
        &result.failures[..result.failures.len().min(10)]
    );
    assert!(result.served > 0, "{what}: no request served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_deploys_under_mixed_load_fail_no_request() {
    let proxy = ProxyProcess::start();
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let flags = [
        "--host=app.test",
        "--buffer-requests",
        "--buffer-responses",
        "--drain-timeout=10s",
    ];
    proxy.deploy("web", &blue.target(), &flags);

    let address = proxy.address();
    let host = "app.test".to_string();
    let quick = Load::start(address, "app.test", "/", 8);
    let slow = Load::start(address, "app.test", "/slow?ms=300", 2);
    let body = Bytes::from(
        (0..64 * 1024)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let posts = Load::start_traffic(address, Traffic::Echo { host, body }, 2);
    let stop_websocket = Arc::new(AtomicBool::new(false));
    let websocket = websocket_client(address, stop_websocket.clone());

    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let target = if round % 2 == 0 { &green } else { &blue };
        proxy.deploy("web", &target.target(), &flags);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let quick = quick.finish().await;
    let slow = slow.finish().await;
    let posts = posts.finish().await;
    stop_websocket.store(true, Ordering::Relaxed);
    let websocket = websocket.await.unwrap();

    assert_clean("quick GETs", &quick);
    assert_clean("slow GETs", &slow);
    assert_clean("POSTs with 64 KB bodies", &posts);
    assert!(
        websocket.failures.is_empty(),
        "WebSocket handshakes failed: {:?}",
        websocket.failures
    );
    assert!(
        websocket.handshakes > 1 && websocket.echoes > 0,
        "the WebSocket client reconnected after drains: {} handshakes, {} echoes",
        websocket.handshakes,
        websocket.echoes
    );
    assert!(blue.requests() > 0 && green.requests() > 0);
    let deploys = proxy
        .log_lines()
        .iter()
        .filter(|line| line["msg"] == "Deployed")
        .count();
    assert_eq!(deploys, 21);
}
