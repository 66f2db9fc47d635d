//! Upgraded connections end to end: a WebSocket echoes through the proxy, and is closed when
//! its target drains.

mod common;

use std::time::Duration;

use common::{ProxyProcess, Upstream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echoes_through_the_proxy_and_closes_on_drain() {
    let proxy = ProxyProcess::start();
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    proxy.deploy("web", &blue.target(), &["--host=app.test"]);

    let stream = TcpStream::connect(proxy.address()).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async("ws://app.test/ws", stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "the proxy"] {
        socket.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.to_text().unwrap(), text);
    }

    proxy.deploy("web", &green.target(), &["--host=app.test"]);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "upgraded connection was not closed when its target drained"
    );
}
