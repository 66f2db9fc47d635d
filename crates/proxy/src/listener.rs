//! Listening sockets and the accept loop. Sockets are created here (with `SO_REUSEADDR`, as
//! plain file descriptors that can be handed to a later process) and served with HTTP/1.1 and
//! HTTP/2 (by ALPN over TLS, by prior knowledge on plain TCP) until the process drains.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

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

/// Limits that keep slow, idle or hostile clients from using up the proxy.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time a client has to send a request head. hyper also applies it while a keep-alive
    /// connection waits for its next request, so it is the idle timeout too.
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes (at least 8 KiB); larger ones get 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request; more get 431.
    pub max_headers: usize,
    /// Open client connections at most, over all listeners sharing these limits. Beyond it new
    /// connections wait in the kernel's backlog until one closes; open ones keep being served.
    pub connections: Arc<tokio::sync::Semaphore>,
}

pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
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
            max_header_bytes: max_header_bytes.max(MIN_MAX_HEADER_BYTES),
            max_headers,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        }
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
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    tls: Option<Arc<dyn CertificateSource>>,
    limits: ServerLimits,
    proxy_protocol: bool,
) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let drain = proxy.drain().clone();

    loop {
        let (stream, peer) = tokio::select! {
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
        let permit = tokio::select! {
            _ = drain.started().cancelled() => break,
            permit = Arc::clone(&limits.connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let _ = stream.set_nodelay(true);
        let mut info = ConnectionInfo {
            peer,
            local_port,
            tls: tls.is_some(),
        };
        let (builder, proxy, tls) = (Arc::clone(&builder), proxy.clone(), tls.clone());
        let first_request_timeout = limits.header_read_timeout;
        drain.clone().track(async move {
            let _permit = permit;
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
                None => {
                    serve_connection(&builder, stream, info, proxy, first_request_timeout).await
                }
                // Boxed: a TLS connection's state is about 4 KB larger, and every plain
                // connection's task would otherwise be sized for it.
                Some(certificates) => {
                    Box::pin(serve_tls(
                        &builder,
                        stream,
                        certificates,
                        info,
                        proxy,
                        first_request_timeout,
                    ))
                    .await
                }
            }
        });
    }
}

/// Completes the TLS handshake, then serves the connection.
async fn serve_tls(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    certificates: Arc<dyn CertificateSource>,
    info: ConnectionInfo,
    proxy: Proxy,
    first_request_timeout: Duration,
) {
    match tls::accept(stream, certificates.as_ref()).await {
        Ok(stream) => serve_connection(builder, stream, info, proxy, first_request_timeout).await,
        Err(error) => tracing::debug!(%error, peer = %info.peer, "TLS handshake refused"),
    }
}

/// Serves one connection until it closes, ending it gently when the drain starts.
async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    info: ConnectionInfo,
    proxy: Proxy,
    first_request_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = proxy.drain().clone();
    let speaks_h2 = Arc::new(AtomicBool::new(false));
    let seen_h2 = Arc::clone(&speaks_h2);
    let got_request = Arc::new(AtomicBool::new(false));
    let seen_request = Arc::clone(&got_request);
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        seen_request.store(true, Ordering::Relaxed);
        if request.version() == hyper::Version::HTTP_2 {
            seen_h2.store(true, Ordering::Relaxed);
        }
        let proxy = proxy.clone();
        // Boxed: a request's state then takes memory only while the request is in flight,
        // instead of being reserved inside every connection's task, idle ones included.
        Box::pin(async move { Ok::<_, Infallible>(proxy.handle(info, request).await) })
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);

    // hyper's header timer starts only once it knows the protocol, which takes the client's
    // first bytes: a client that never sends any would be held forever without this.
    let first_request_deadline = tokio::time::sleep(first_request_timeout);
    tokio::pin!(first_request_deadline);
    let outcome = loop {
        tokio::select! {
            outcome = connection.as_mut() => break Some(outcome),
            _ = drain.started().cancelled() => break None,
            _ = &mut first_request_deadline, if !got_request.load(Ordering::Relaxed) => {
                if !got_request.load(Ordering::Relaxed) {
                    tracing::debug!(peer = %info.peer, "No request in time; closing the connection");
                    return;
                }
            }
        }
    };
    let outcome = match outcome {
        Some(outcome) => outcome,
        None => {
            // HTTP/2 clients get GOAWAY now; HTTP/1.1 clients are told by `Connection: close`
            // on their next response, and idle ones are closed when the drain time is up (or
            // at once in a shutdown, where no other process will serve them).
            if !speaks_h2.load(Ordering::Relaxed) {
                tokio::select! {
                    outcome = connection.as_mut() => return log_end(outcome, info),
                    _ = drain.deadline().cancelled() => {}
                    _ = drain.close_idle().cancelled() => {}
                }
            }
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                outcome = connection.as_mut() => outcome,
                _ = drain.deadline().cancelled() => return,
            }
        }
    };
    log_end(outcome, info);
}

fn log_end(outcome: Result<(), Box<dyn std::error::Error + Send + Sync>>, info: ConnectionInfo) {
    if let Err(error) = outcome {
        tracing::debug!(%error, peer = %info.peer, "Connection ended with an error");
    }
}
