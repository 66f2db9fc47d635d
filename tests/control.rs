//! The control socket under misuse and contention: oversized and malformed requests get a
//! clear error and change nothing; deploys of one service queue, of different ones overlap.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{get, ProxyProcess, Upstream};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Sends one raw request to the control API; returns the status and the body.
async fn call(
    proxy: &ProxyProcess,
    method: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> (u16, String) {
    let stream = UnixStream::connect(proxy.socket()).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends a request whose body is over the limit over a raw socket and returns the answer.
/// The daemon answers from the declared length and closes without reading the body, so the
/// write may fail part way; the answer is in the socket by then and is read anyway.
async fn send_oversized(proxy: &ProxyProcess, path: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = UnixStream::connect(proxy.socket()).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_are_refused_with_a_message() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    proxy.deploy("web", &app.target(), &[]);
    let state_before = std::fs::read(proxy.state_path()).unwrap();

    let huge = format!(
        r#"{{"targets":["{}"],"config":{{}},"padding":"{}"}}"#,
        app.target(),
        "x".repeat(2 * 1024 * 1024)
    );
    let answer = send_oversized(&proxy, "/v1/services/web/deploy", huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"error\"") && answer.contains("length limit"),
        "{answer}"
    );

    let (status, body) = call(&proxy, "POST", "/v1/services/web/deploy", "{\"targets\": [").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid request"), "{body}");

    let (status, body) = call(
        &proxy,
        "POST",
        "/v1/services/web/deploy",
        r#"{"targets": 7}"#,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("targets"),
        "the message names the field: {body}"
    );

    let (status, _) = call(&proxy, "POST", "/v1/services/web/stop", "not json").await;
    assert_eq!(status, 400);

    assert_eq!(std::fs::read(proxy.state_path()).unwrap(), state_before);
    assert_eq!(get(proxy.address(), "app.test", "/").await.status, 200);
}

/// Starts `proxy deploy <service> --target=<target>` without waiting for it.
fn start_deploy(proxy: &ProxyProcess, service: &str, target: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args([
            "deploy",
            service,
            &format!("--target={target}"),
            &format!("--host={service}.test"),
            "--health-check-interval=50ms",
        ])
        .env("HOME", proxy.home())
        .env("KAMAL_PROXY_SOCKET", proxy.socket())
        .spawn()
        .unwrap()
}

fn finished(child: &mut std::process::Child) -> bool {
    child.try_wait().unwrap().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_of_one_service_queue_and_of_different_services_overlap() {
    let proxy = ProxyProcess::start();
    let waiting = Upstream::start("waiting").await;
    waiting.set_health(503);
    let ready = Upstream::start("ready").await;

    // A deploy of `one` waits on a target that is not healthy yet.
    let mut slow = start_deploy(&proxy, "one", &waiting.target());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Another service deploys meanwhile, to completion.
    let mut other = start_deploy(&proxy, "two", &ready.target());
    let other_status = tokio::task::block_in_place(|| other.wait().unwrap());
    assert!(other_status.success());
    assert!(
        !finished(&mut slow),
        "`one` is still waiting for its target"
    );

    // A second deploy of `one`, to a healthy target, queues behind the first.
    let mut queued = start_deploy(&proxy, "one", &ready.target());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !finished(&mut queued),
        "the second deploy of `one` waits for the first"
    );

    waiting.set_health(200);
    let first = tokio::task::block_in_place(|| slow.wait().unwrap());
    let second = tokio::task::block_in_place(|| queued.wait().unwrap());
    assert!(first.success() && second.success());
    // The queued deploy ran last, so its target serves.
    let reply = get(proxy.address(), "one.test", "/").await;
    assert!(reply.body.contains("\"ready\""), "{}", reply.body);
}
