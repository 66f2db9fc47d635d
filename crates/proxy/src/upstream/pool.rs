//! Idle keep-alive connections to targets, kept per worker thread and reused newest first,
//! and the read buffers of finished exchanges, handed to the next one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::uri::Authority;
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;

/// Idle connections kept per target; more are closed when they come back.
const MAX_IDLE_PER_TARGET: usize = 512;
/// Read buffers kept for reuse. A buffer still warm in the cache costs less than a fresh
/// allocation of that size (glibc serves those from its bins, not its per-thread cache),
/// and a few dozen cover the exchanges a worker has in flight at once.
const MAX_SPARE_BUFFERS: usize = 32;

#[derive(Debug)]
pub struct ConnectionPool {
    idle_timeout: Duration,
    inner: Mutex<Idle>,
}

#[derive(Debug)]
struct Idle {
    /// Keyed by the authority's text: `Authority`'s own hash lowercases byte by byte. Fx, not
    /// SipHash (two hashes per request): the keys are the operator's targets, not input
    /// an attacker chooses.
    by_target: FxHashMap<Box<str>, Vec<IdleConnection>>,
    last_sweep: Instant,
    spare_buffers: Vec<BytesMut>,
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
                by_target: FxHashMap::default(),
                last_sweep: Instant::now(),
                spare_buffers: Vec::new(),
            }),
        }
    }

    /// The newest idle connection to `target` that is still open, if any, and a read buffer
    /// (empty; a reused one when there is one).
    pub fn checkout(&self, target: &Authority) -> (Option<TcpStream>, BytesMut) {
        let Ok(mut idle) = self.inner.lock() else {
            return (None, BytesMut::new());
        };
        let buffer = idle.spare_buffers.pop().unwrap_or_default();
        let Some(connections) = idle.by_target.get_mut(target.as_str()) else {
            return (None, buffer);
        };
        while let Some(connection) = connections.pop() {
            if connection.since.elapsed() < self.idle_timeout && still_open(&connection.stream) {
                return (Some(connection.stream), buffer);
            }
        }
        (None, buffer)
    }

    /// Keeps a connection whose last exchange ended cleanly, for the next request, and the
    /// exchange's read buffer (empty: anything left in it would be a protocol error).
    pub fn checkin(&self, target: &Authority, stream: TcpStream, buffer: BytesMut) {
        let Ok(mut idle) = self.inner.lock() else {
            return;
        };
        if idle.spare_buffers.len() < MAX_SPARE_BUFFERS {
            idle.spare_buffers.push(buffer);
        }
        let now = Instant::now();
        // Connections to targets no longer asked for would otherwise stay open for good.
        if now.duration_since(idle.last_sweep) > self.idle_timeout {
            let timeout = self.idle_timeout;
            idle.by_target.retain(|_, connections| {
                connections.retain(|c| now.duration_since(c.since) < timeout);
                !connections.is_empty()
            });
            if idle.by_target.is_empty() {
                // Quiet for a while: the memory is better given back.
                idle.spare_buffers = Vec::new();
            }
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
        assert!(pool.checkout(&target).0.is_none());

        let (open, _open_peer) = connected_pair(&listener).await;
        let (closed, closed_peer) = connected_pair(&listener).await;
        pool.checkin(&target, open, BytesMut::new());
        pool.checkin(&target, closed, BytesMut::new());
        drop(closed_peer);
        // Let the reactor see the close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reused = pool.checkout(&target).0.expect("the open connection");
        assert!(pool.checkout(&target).0.is_none());

        let (chatty, mut chatty_peer) = connected_pair(&listener).await;
        chatty_peer.write_all(b"unasked").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.checkin(&target, chatty, BytesMut::new());
        assert!(pool.checkout(&target).0.is_none());
        drop(reused);
    }

    #[tokio::test]
    async fn read_buffers_are_handed_to_the_next_exchange() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: Authority = "127.0.0.1:1".parse().unwrap();
        let pool = ConnectionPool::new(Duration::from_secs(30));
        let (stream, _peer) = connected_pair(&listener).await;
        let mut buffer = BytesMut::with_capacity(4096);
        buffer.extend_from_slice(b"a response");
        let address = buffer.as_ptr();
        // A body cut from the buffer and already sent: the allocation is free again.
        drop(buffer.split().freeze());
        pool.checkin(&target, stream, buffer);

        let (stream, mut buffer) = pool.checkout(&target);
        assert!(stream.is_some());
        assert!(buffer.is_empty());
        buffer.reserve(4096);
        assert_eq!(buffer.as_ptr(), address, "the same allocation, reclaimed");
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: Authority = "127.0.0.1:1".parse().unwrap();
        let pool = ConnectionPool::new(Duration::from_millis(20));
        let (stream, _peer) = connected_pair(&listener).await;
        pool.checkin(&target, stream, BytesMut::new());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(pool.checkout(&target).0.is_none());
    }
}
