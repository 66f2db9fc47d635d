//! HTTP/3: QUIC on the HTTPS port's UDP twin, with the same certificates, routing and pipeline
//! as HTTP/1.1 and HTTP/2. quinn carries QUIC, h3 the HTTP framing; every request goes through
//! [`Proxy::handle`] like any other.
//!
//! The certificate is chosen inside the QUIC handshake, which cannot wait: a name whose
//! certificate is not ready yet fails the handshake, and the client (which only tries HTTP/3
//! after an `Alt-Svc` from a TCP response) falls back to TCP, where the wait happens.
//!
//! Draining: new QUIC connections are ignored (their clients retry the first packet, by then
//! at the process that took the socket over, or fall back to TCP); each open connection gets
//! a GOAWAY, finishes the requests it has, and closes. [`serve`] returns once the socket is no
//! longer read, so a handover can let the next process read it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::pipeline::{ConnectionInfo, Proxy};
use crate::tls::CertificateSource;

/// Longest time a client may take to complete the QUIC handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the endpoint waits, at the end, for its last close frames to go out.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Http3Error {
    #[error("cannot open the QUIC endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Crypto(String),
}

/// The value of the `Alt-Svc` header that points TCP clients at HTTP/3 on `port`.
pub fn alt_svc(port: u16) -> HeaderValue {
    HeaderValue::from_str(&format!("h3=\":{port}\"; ma=2592000"))
        .unwrap_or_else(|_| HeaderValue::from_static("h3=\":443\"; ma=2592000"))
}

/// A QUIC endpoint serving HTTP/3 on `socket` (bound, non-blocking), with certificates from
/// `certificates`. Idle connections close after `idle_timeout`. Must be called inside the
/// Tokio runtime that will drive it.
pub fn endpoint(
    socket: std::net::UdpSocket,
    certificates: Arc<dyn CertificateSource>,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, Http3Error> {
    let provider = Arc::new(crate::tls::crypto_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Http3Error::Crypto(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ReadyCertificates(certificates)));
    tls.alpn_protocols = vec![b"h3".to_vec()];
    crate::tls::share_resumption(&mut tls);
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| Http3Error::Crypto(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// Serves HTTP/3 on `endpoint` until the proxy drains and every connection has finished (or
/// the drain deadline closed it). When this returns, this process no longer reads the socket.
pub async fn serve(endpoint: quinn::Endpoint, proxy: Proxy) {
    let drain = proxy.drain().clone();
    let local_port = endpoint.local_addr().map(|a| a.port()).unwrap_or_default();
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            biased;
            _ = drain.started().cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    connections.spawn(serve_connection(incoming, proxy.clone(), local_port));
                }
                None => break,
            },
        }
    }
    connections.close();
    let ignore_new = async {
        while let Some(incoming) = endpoint.accept().await {
            incoming.ignore();
        }
    };
    tokio::select! {
        _ = connections.wait() => {}
        _ = ignore_new => {}
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"");
    let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
}

/// One QUIC connection: its handshake, then its requests, each on its own task.
async fn serve_connection(incoming: quinn::Incoming, proxy: Proxy, local_port: u16) {
    let drain = proxy.drain().clone();
    // IPv4 clients on a dual-stack socket appear as `::ffff:a.b.c.d`; shown plain, as for TCP.
    let remote = incoming.remote_address();
    let peer = SocketAddr::new(remote.ip().to_canonical(), remote.port());
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "QUIC handshake timed out");
            return;
        }
    };
    let info = ConnectionInfo {
        peer,
        local_port,
        tls: true,
    };
    let mut h3 = match h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(
        connection.clone(),
    ))
    .await
    {
        Ok(h3) => h3,
        Err(error) => {
            tracing::debug!(%peer, %error, "HTTP/3 connection setup failed");
            return;
        }
    };
    let requests = TaskTracker::new();
    let mut going_away = false;
    loop {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    requests.spawn(serve_request(resolver, proxy.clone(), info));
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%peer, %error, "HTTP/3 connection ended");
                    break;
                }
            },
            _ = drain.started().cancelled(), if !going_away => {
                going_away = true;
                // Requests already on their way are still taken; the client sends the rest
                // on a new connection.
                let _ = h3.shutdown(1).await;
                requests.close();
            }
            _ = requests.wait(), if going_away => break,
            _ = drain.deadline().cancelled() => break,
        }
    }
    requests.close();
    if drain.deadline().is_cancelled() {
        connection.close(quinn::VarInt::from_u32(0x0100), b"shutting down");
    }
    // Dropping the HTTP/3 connection closes it with H3_NO_ERROR once its requests are done.
    requests.wait().await;
}

type RequestStream<S> = h3::server::RequestStream<S, Bytes>;

/// One request: read its head, run it through the pipeline, send the response back.
async fn serve_request(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    proxy: Proxy,
    info: ConnectionInfo,
) {
    let (request, stream) = match resolver.resolve_request().await {
        Ok(resolved) => resolved,
        Err(error) => {
            tracing::debug!(peer = %info.peer, %error, "Malformed HTTP/3 request");
            return;
        }
    };
    let (mut send, receive) = stream.split();
    let (parts, ()) = request.into_parts();
    let request = Request::from_parts(parts, RequestBody::new(receive));
    let response = proxy.handle(info, request, None).await.into_response();
    if let Err(error) = send_response(&mut send, response).await {
        tracing::debug!(peer = %info.peer, %error, "HTTP/3 response not sent whole");
    }
}

async fn send_response(
    send: &mut RequestStream<h3_quinn::SendStream<Bytes>>,
    response: Response<crate::body::ProxyBody>,
) -> Result<(), BoxError> {
    let (mut parts, mut body) = response.into_parts();
    // HTTP/3 has no connection-level headers (RFC 9114 §4.2): one would make the response
    // malformed to the client.
    crate::headers::remove_hop_by_hop(&mut parts.headers, false);
    send.send_response(Response::from_parts(parts, ())).await?;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                // The client must not take a cut response for a whole one.
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Err(error);
            }
        };
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    send.send_data(data).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

/// The request body, read from the QUIC stream as the pipeline asks for it.
struct RequestBody {
    stream: RequestStream<h3_quinn::RecvStream>,
    state: BodyState,
    /// What [`RequestBody::new`] read ahead.
    first: Option<Result<Frame<Bytes>, BoxError>>,
}

enum BodyState {
    Data,
    Trailers,
    Done,
}

impl RequestBody {
    /// Looks at what has already arrived: a request that ended with its head (a GET, mostly)
    /// must be known to have no body, or it would go upstream with a chunked empty one.
    fn new(stream: RequestStream<h3_quinn::RecvStream>) -> Self {
        let mut body = Self {
            stream,
            state: BodyState::Data,
            first: None,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Some(first)) = Pin::new(&mut body).poll_frame(&mut cx) {
            body.first = Some(first);
        }
        body
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        loop {
            match this.state {
                BodyState::Data => match this.stream.poll_recv_data(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Some(mut data))) => {
                        let bytes = data.copy_to_bytes(data.remaining());
                        if !bytes.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(bytes))));
                        }
                    }
                    Poll::Ready(Ok(None)) => this.state = BodyState::Trailers,
                    Poll::Ready(Err(error)) => {
                        this.state = BodyState::Done;
                        return Poll::Ready(Some(Err(error.into())));
                    }
                },
                BodyState::Trailers => {
                    let polled = this.stream.poll_recv_trailers(cx);
                    if polled.is_pending() {
                        return Poll::Pending;
                    }
                    this.state = BodyState::Done;
                    match polled {
                        Poll::Ready(Ok(Some(trailers))) => {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                        Poll::Ready(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                        _ => return Poll::Ready(None),
                    }
                }
                BodyState::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && matches!(self.state, BodyState::Done)
    }
}

/// Certificates as the QUIC handshake can use them: those ready now.
struct ReadyCertificates(Arc<dyn CertificateSource>);

impl std::fmt::Debug for ReadyCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadyCertificates")
    }
}

impl ResolvesServerCert for ReadyCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0
            .certificate_ready(hello.server_name().unwrap_or_default())
    }
}
