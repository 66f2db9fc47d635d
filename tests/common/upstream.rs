//! A real HTTP server standing in for an app container.
//!
//! - `GET /up`: the health check; answers the status set with `set_health`.
//! - `GET /slow?ms=N`: answers after N milliseconds.
//! - `GET /ws`: a WebSocket echo.
//! - `POST /echo`: answers the request body.
//! - `GET /allow?host=H`: 200 when H starts with `yes`, else 403 (on-demand TLS checks).
//! - anything else: a JSON report of what arrived (server name, method, path, query, headers).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

struct Shared {
    name: String,
    health: AtomicU16,
    requests: AtomicUsize,
    health_checks: AtomicUsize,
    connections: AtomicUsize,
}

pub struct Upstream {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts a server named `name` (it says its name in every answer) on a free port.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            health: AtomicU16::new(200),
            requests: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        let server_shared = Arc::clone(&shared);
        let server = tokio::spawn(async move {
            // Owned by this task, so aborting it (`stop`) closes every connection too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                };
                server_shared.connections.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&server_shared);
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(answer(shared, request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            address,
            shared,
            server,
        }
    }

    pub fn target(&self) -> String {
        self.address.to_string()
    }

    pub fn set_health(&self, status: u16) {
        self.shared.health.store(status, Ordering::SeqCst);
    }

    /// A handle that sets the health check status from another task.
    pub fn health_control(&self) -> impl Fn(u16) + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move |status| shared.health.store(status, Ordering::SeqCst)
    }

    /// Health checks answered.
    pub fn health_checks(&self) -> usize {
        self.shared.health_checks.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests served, health checks excluded.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Stops the server: it accepts no more connections and closes the open ones, as a
    /// container that dies does.
    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Body = Full<Bytes>;

async fn answer(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    if path == "/up" {
        shared.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(shared.health.load(Ordering::SeqCst)).unwrap();
        // A page of some size, as real apps answer: the proxy must read it to reuse the
        // connection.
        return respond(status, &"health ".repeat(6000));
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);
    match path.as_str() {
        "/slow" => {
            let ms: u64 = request
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            respond(StatusCode::OK, &format!("{} slow", shared.name))
        }
        "/ws" => websocket(request).await,
        // The on-demand TLS permission check: only hosts starting with "yes" may have one.
        "/allow" => match request.uri().query().and_then(|q| q.strip_prefix("host=")) {
            Some(host) if host.starts_with("yes") => respond(StatusCode::OK, "allowed"),
            _ => respond(StatusCode::FORBIDDEN, "denied"),
        },
        "/echo" => {
            let content_length = request.headers().get("content-length").cloned();
            let chunked = request.headers().contains_key("transfer-encoding");
            match request.into_body().collect().await {
                Ok(body) => {
                    let mut response = Response::new(Full::new(body.to_bytes()));
                    let framing = match (content_length, chunked) {
                        (Some(length), _) => {
                            format!("content-length {}", length.to_str().unwrap_or("?"))
                        }
                        (None, true) => "chunked".to_string(),
                        (None, false) => "none".to_string(),
                    };
                    response
                        .headers_mut()
                        .insert("x-request-framing", framing.parse().unwrap());
                    response
                }
                Err(error) => respond(StatusCode::BAD_REQUEST, &error.to_string()),
            }
        }
        _ => {
            let headers: serde_json::Map<String, serde_json::Value> = request
                .headers()
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("").into()))
                .collect();
            let report = serde_json::json!({
                "server": shared.name,
                "method": request.method().as_str(),
                "path": path,
                "query": request.uri().query(),
                "headers": headers,
            });
            respond(StatusCode::OK, &report.to_string())
        }
    }
}

fn respond(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}

async fn websocket(mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return respond(StatusCode::BAD_REQUEST, "not a websocket request");
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = socket.next().await {
            if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .unwrap()
}
