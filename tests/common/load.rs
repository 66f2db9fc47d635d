//! Keep-alive load for zero-downtime tests: N clients, each on its own connection, sending
//! requests back to back and recording every failure. A connection the server closed after
//! `Connection: close` is reopened, as any HTTP client does; that is not a failure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{request, Connection};

/// What each client sends, over and over.
#[derive(Clone)]
pub enum Traffic {
    /// `GET path`, expecting 200.
    Get { host: String, path: String },
    /// `POST path` with `body` to the upstream's `/echo`, expecting the same body back.
    Echo { host: String, body: Bytes },
    /// `GET path` with `Connection: close`, each on a new connection: every request is a
    /// new accept for the proxy.
    GetOnNewConnections { host: String, path: String },
}

/// What a load run saw.
pub struct LoadResult {
    pub served: usize,
    pub failures: Vec<String>,
    /// Connections reopened after the server closed them (`Connection: close`).
    pub reconnects: usize,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    served: Arc<AtomicUsize>,
    reconnects: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `clients` clients sending `GET path` with `Host: host` to `address`.
    pub fn start(address: SocketAddr, host: &str, path: &str, clients: usize) -> Self {
        let traffic = Traffic::Get {
            host: host.to_string(),
            path: path.to_string(),
        };
        Self::start_traffic(address, traffic, clients)
    }

    /// Starts `clients` clients each sending `traffic` to `address`.
    pub fn start_traffic(address: SocketAddr, traffic: Traffic, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let reconnects = Arc::new(AtomicUsize::new(0));
        let clients = (0..clients)
            .map(|_| {
                let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
                let reconnects = reconnects.clone();
                let traffic = traffic.clone();
                tokio::spawn(async move {
                    let mut connection: Option<Connection> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let open = match connection.as_mut() {
                            Some(open) => open,
                            None => match Connection::open(address).await {
                                Ok(opened) => connection.insert(opened),
                                Err(error) => {
                                    failures.lock().unwrap().push(format!("connect: {error}"));
                                    continue;
                                }
                            },
                        };
                        let sent = match &traffic {
                            Traffic::Get { host, path } => open.get(host, path).await,
                            Traffic::Echo { host, body } => {
                                open.send(request("POST", host, "/echo", body.clone()))
                                    .await
                            }
                            Traffic::GetOnNewConnections { host, path } => {
                                let mut once = request("GET", host, path, Bytes::new());
                                once.headers_mut()
                                    .insert("connection", "close".parse().unwrap());
                                let sent = open.send(once).await;
                                connection = None;
                                sent
                            }
                        };
                        let expected_body = match &traffic {
                            Traffic::Echo { body, .. } => Some(body),
                            Traffic::Get { .. } | Traffic::GetOnNewConnections { .. } => None,
                        };
                        match sent {
                            Ok(reply)
                                if reply.status == 200
                                    && expected_body
                                        .is_none_or(|body| reply.body.as_bytes() == &body[..]) =>
                            {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(reply) => failures.lock().unwrap().push(format!(
                                "status {} ({} body bytes)",
                                reply.status,
                                reply.body.len()
                            )),
                            Err(error) if error.starts_with("not sent") => {
                                reconnects.fetch_add(1, Ordering::Relaxed);
                                connection = None;
                            }
                            Err(error) => {
                                failures.lock().unwrap().push(error);
                                connection = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            failures,
            served,
            reconnects,
            clients,
        }
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops the clients and reports what they saw.
    pub async fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.unwrap();
        }
        LoadResult {
            served: self.served.load(Ordering::Relaxed),
            failures: self.failures.lock().unwrap().clone(),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }
}
