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
use tokio::net::TcpListener;

use crate::pipeline::{ConnectionInfo, Proxy};
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

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until the proxy's drain starts. Connections keep being served (and
/// tracked by the drain) after this returns. With `tls`, connections are TLS.
pub async fn serve(listener: TcpListener, proxy: Proxy, tls: Option<Arc<dyn CertificateSource>>) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
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
        let _ = stream.set_nodelay(true);
        let info = ConnectionInfo {
            peer,
            local_port,
            tls: tls.is_some(),
        };
        let (builder, proxy, tls) = (Arc::clone(&builder), proxy.clone(), tls.clone());
        drain.clone().track(async move {
            match tls {
                None => serve_connection(&builder, stream, info, proxy).await,
                Some(certificates) => match tls::accept(stream, certificates.as_ref()).await {
                    Ok(stream) => serve_connection(&builder, stream, info, proxy).await,
                    Err(error) => tracing::debug!(%error, %peer, "TLS handshake refused"),
                },
            }
        });
    }
}

/// Serves one connection until it closes, ending it gently when the drain starts.
async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    info: ConnectionInfo,
    proxy: Proxy,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = proxy.drain().clone();
    let speaks_h2 = Arc::new(AtomicBool::new(false));
    let seen_h2 = Arc::clone(&speaks_h2);
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        if request.version() == hyper::Version::HTTP_2 {
            seen_h2.store(true, Ordering::Relaxed);
        }
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(info, request).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let outcome = tokio::select! {
        outcome = connection.as_mut() => Some(outcome),
        _ = drain.started().cancelled() => None,
    };
    let outcome = match outcome {
        Some(outcome) => outcome,
        None => {
            // HTTP/2 clients get GOAWAY now; HTTP/1.1 clients are told by `Connection: close`
            // on their next response, and idle ones are closed when the drain time is up.
            if !speaks_h2.load(Ordering::Relaxed) {
                tokio::select! {
                    outcome = connection.as_mut() => return log_end(outcome, info),
                    _ = drain.deadline().cancelled() => {}
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
