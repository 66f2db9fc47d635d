//! Listening sockets and the accept loop. Sockets are created here (with `SO_REUSEADDR`, as
//! plain file descriptors that can be handed to a later process) and served with HTTP/1.1 and
//! HTTP/2 (by ALPN over TLS, by prior knowledge on plain TCP) until the process drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::connection::{self, Protocols};
use crate::pipeline::{ConnectionInfo, Proxy};
use crate::proxy_protocol;
use crate::tls::{self, CertificateSource};

/// Opens a listening TCP socket.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Opens the UDP socket HTTP/3 is served on, as a plain descriptor that can be handed on.
pub fn bind_udp(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if address.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&address.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Limits that keep slow, idle or hostile clients from using up the proxy.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time a client has to send a request head (and its first bytes after connecting).
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may stay quiet between requests. Longer than the
    /// idle timeouts of common load balancers (60 s), so none reuses a connection the proxy
    /// has just closed; nginx uses 75 s. kamal-proxy never closes idle connections.
    pub idle_timeout: Duration,
    /// Largest request head, in bytes (at least 8 KiB); larger ones get 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request; more get 431.
    pub max_headers: usize,
    /// Open client connections at most, over all listeners sharing these limits. Beyond it new
    /// connections wait in the kernel's backlog until one closes; open ones keep being served.
    pub connections: Arc<tokio::sync::Semaphore>,
}

pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

impl ServerLimits {
    pub fn new(
        header_read_timeout: Duration,
        max_header_bytes: usize,
        max_headers: usize,
        max_connections: usize,
    ) -> Self {
        Self {
            header_read_timeout,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: max_header_bytes.max(MIN_MAX_HEADER_BYTES),
            max_headers,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        }
    }

    pub fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self::new(
            DEFAULT_HEADER_READ_TIMEOUT,
            DEFAULT_MAX_HEADER_BYTES,
            DEFAULT_MAX_HEADERS,
            DEFAULT_MAX_CONNECTIONS,
        )
    }
}

/// Accepts connections until the proxy's drain starts. Connections keep being served (and
/// tracked by the drain) after this returns. With `tls`, connections are TLS. With
/// `proxy_protocol`, each connection must open with a PROXY protocol header (v1 or v2),
/// whose client address then stands for the connection's peer; connections without one are
/// closed.
///
/// The drain waits for the accept loop as for a connection, from the moment this is called
/// until the loop has stopped: a connection accepted just as the drain starts is handed to the
/// drain only after `accept` returns, and a drain that had seen no connection left at that
/// instant would let the process exit under it (a request lost in a handover, seen under load).
pub fn serve(
    listener: TcpListener,
    proxy: Proxy,
    tls: Option<Arc<dyn CertificateSource>>,
    limits: ServerLimits,
    proxy_protocol: bool,
) -> impl std::future::Future<Output = ()> + Send {
    let accepting = proxy.drain().hold();
    async move {
        let _accepting = accepting;
        accept_until_drained(listener, proxy, tls, limits, proxy_protocol).await;
    }
}

async fn accept_until_drained(
    listener: TcpListener,
    proxy: Proxy,
    tls: Option<Arc<dyn CertificateSource>>,
    limits: ServerLimits,
    proxy_protocol: bool,
) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // Kept by the connection's own tick (see `connection`), which costs nothing per request.
        .header_read_timeout(None::<Duration>)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    // hyper's own limit is the same 100; set explicitly, it builds the header index table
    // element by element on every request (about 650 instructions) instead of as a constant.
    if limits.max_headers != DEFAULT_MAX_HEADERS {
        http1.max_headers(limits.max_headers);
    }
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let protocols = Arc::new(Protocols {
        http1,
        http2,
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
    });
    let drain = proxy.drain().clone();

    loop {
        let (stream, peer) = tokio::select! {
            // Checked first: once the drain has begun, nothing more is accepted here.
            biased;
            _ = drain.started().cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // At the cap, this connection waits (unread) for a slot, and so does accepting more on
        // this listener. The permit is taken after accept, not before: a permit held by an
        // idle listener's accept would starve clients waiting on the other listener.
        //
        // A connection accepted is always served, even when the drain starts meanwhile (it is
        // then told to close after its first response): dropping it would lose the request
        // its client may already have sent. That was the rare failed request in a handover:
        // a connection accepted just as the old process began to drain. Past the cap while
        // draining, it is served without a slot rather than waiting for one.
        let permit = tokio::select! {
            biased;
            permit = Arc::clone(&limits.connections).acquire_owned() => match permit {
                Ok(permit) => Some(permit),
                Err(_) => break,
            },
            _ = drain.started().cancelled() => {
                tracing::debug!(%peer, "Connection accepted as the drain began; served without a slot");
                None
            }
        };
        let _ = stream.set_nodelay(true);
        // A dual-stack socket reports IPv4 clients as `::ffff:a.b.c.d`; apps and logs want
        // the plain IPv4 address, as kamal-proxy gives them.
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let mut info = ConnectionInfo {
            peer,
            local_port,
            tls: tls.is_some(),
        };
        let (protocols, proxy, tls) = (Arc::clone(&protocols), proxy.clone(), tls.clone());
        let first_request_timeout = limits.header_read_timeout;
        drain.clone().track(async move {
            let slot = connection::ConnectionSlot::new(permit);
            let mut stream = stream;
            if proxy_protocol {
                let header = tokio::time::timeout(
                    first_request_timeout,
                    proxy_protocol::read_header(&mut stream),
                )
                .await;
                match header {
                    Ok(Ok(Some(client))) => info.peer = client,
                    Ok(Ok(None)) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%error, %peer, "Connection closed: PROXY protocol required");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "Connection closed: no PROXY protocol header in time");
                        return;
                    }
                }
            }
            match tls {
                None => connection::serve(&protocols, stream, info, proxy, slot).await,
                // Boxed: a TLS connection's state is about 4 KB larger, and every plain
                // connection's task would otherwise be sized for it.
                Some(certificates) => {
                    Box::pin(serve_tls(&protocols, stream, certificates, info, proxy, slot)).await
                }
            }
        });
    }
}

/// Completes the TLS handshake, then serves the connection.
async fn serve_tls(
    protocols: &Arc<Protocols>,
    stream: TcpStream,
    certificates: Arc<dyn CertificateSource>,
    info: ConnectionInfo,
    proxy: Proxy,
    slot: connection::ConnectionSlot,
) {
    // Boxed: the handshake's state is needed only until it completes.
    let handshake = Box::pin(tls::accept(stream, certificates.as_ref())).await;
    match handshake {
        // Boxed: rustls's connection state is large, and every future that holds the stream
        // (a parked connection's included) would otherwise be sized for it several times.
        Ok(stream) => {
            if let Some(metrics) = proxy.metrics() {
                let resumed =
                    stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                metrics.observe_tls_handshake(resumed);
            }
            connection::serve(protocols, Box::new(stream), info, proxy, slot).await
        }
        Err(error) => tracing::debug!(%error, peer = %info.peer, "TLS handshake refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain must not finish while an accept loop could still hand it a connection: one
    /// accepted as the drain starts would be served by a process about to exit.
    #[tokio::test]
    async fn the_drain_waits_for_the_accept_loop_to_stop() {
        let proxy = Proxy::for_tests();
        let listener = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let accepting = serve(
            listener,
            proxy.clone(),
            None,
            ServerLimits::default(),
            false,
        );

        let drain = proxy.drain().clone();
        let finish = tokio::spawn(async move { drain.finish(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !finish.is_finished(),
            "the drain finished before the accept loop stopped"
        );

        tokio::spawn(accepting);
        assert!(finish.await.unwrap(), "the accept loop stops once drained");
    }
}
