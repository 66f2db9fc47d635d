//! Idle keep-alive connections to targets, kept per worker thread and reused newest first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::net::TcpStream;

/// Idle connections kept per target; more are closed when they come back.
const MAX_IDLE_PER_TARGET: usize = 512;

#[derive(Debug)]
pub struct ConnectionPool {
    idle_timeout: Duration,
    inner: Mutex<Idle>,
}

#[derive(Debug)]
struct Idle {
    /// Keyed by the authority's text: `Authority`'s own hash lowercases byte by byte.
    by_target: HashMap<Box<str>, Vec<IdleConnection>>,
    last_sweep: Instant,
}

#[derive(Debug)]
struct IdleConnection {
    stream: TcpStream,
    since: Instant,
}

impl ConnectionPool {
    pub fn new(idle_timeout: Duration) -> Self {
        ConnectionPool {
            idle_timeout,
            inner: Mutex::new(Idle {
                by_target: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }

    /// The newest idle connection to `target` that is still open, if any.
    pub fn checkout(&self, target: &Authority) -> Option<TcpStream> {
        let mut idle = self.inner.lock().ok()?;
        let connections = idle.by_target.get_mut(target.as_str())?;
        while let Some(connection) = connections.pop() {
            if connection.since.elapsed() < self.idle_timeout && still_open(&connection.stream) {
                return Some(connection.stream);
            }
        }
        None
    }

    /// Keeps a connection whose last exchange ended cleanly, for the next request.
    pub fn checkin(&self, target: &Authority, stream: TcpStream) {
        let Ok(mut idle) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        // Connections to targets no longer asked for would otherwise stay open for good.
        if now.duration_since(idle.last_sweep) > self.idle_timeout {
            let timeout = self.idle_timeout;
            idle.by_target.retain(|_, connections| {
                connections.retain(|c| now.duration_since(c.since) < timeout);
                !connections.is_empty()
            });
            idle.last_sweep = now;
        }
        let connections = match idle.by_target.get_mut(target.as_str()) {
            Some(connections) => connections,
            None => idle.by_target.entry(target.as_str().into()).or_default(),
        };
        if connections.len() < MAX_IDLE_PER_TARGET {
            connections.push(IdleConnection { stream, since: now });
        }
    }
}

/// False once the target has closed the connection (or sent something unasked). Costs no
/// system call while nothing has arrived: tokio knows the socket is not readable.
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn connected_pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn hands_back_open_connections_and_drops_closed_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: Authority = "127.0.0.1:1".parse().unwrap();
        let pool = ConnectionPool::new(Duration::from_secs(30));
        assert!(pool.checkout(&target).is_none());

        let (open, _open_peer) = connected_pair(&listener).await;
        let (closed, closed_peer) = connected_pair(&listener).await;
        pool.checkin(&target, open);
        pool.checkin(&target, closed);
        drop(closed_peer);
        // Let the reactor see the close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reused = pool.checkout(&target).expect("the open connection");
        assert!(pool.checkout(&target).is_none());

        let (chatty, mut chatty_peer) = connected_pair(&listener).await;
        chatty_peer.write_all(b"unasked").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.checkin(&target, chatty);
        assert!(pool.checkout(&target).is_none());
        drop(reused);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: Authority = "127.0.0.1:1".parse().unwrap();
        let pool = ConnectionPool::new(Duration::from_millis(20));
        let (stream, _peer) = connected_pair(&listener).await;
        pool.checkin(&target, stream);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(pool.checkout(&target).is_none());
    }
}
