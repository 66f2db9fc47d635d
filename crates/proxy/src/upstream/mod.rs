//! The pooled HTTP/1.1 client that carries requests to targets. Each worker thread has its
//! own, so keep-alive connections are reused across requests without crossing threads.
//!
//! Requests whose body is already whole (no body, or buffered in memory: every GET, and every
//! request under Kamal's default buffering) take a lean path, `http1`: one task, one write,
//! the response head parsed straight from the socket. Requests that stream their body while
//! the target answers, and protocol upgrades, go through hyper's client, which writes and
//! reads at once.

mod chunked;
mod http1;
mod pool;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::future::{Either, TryFutureExt};
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::answer::Answer;
use crate::body::{self, BoxError, ProxyBody};
use crate::client_io::InterimResponses;
use crate::coarse_timer::{CoarseDeadline, CoarseTimer};
use crate::headers::AddedHeaders;
use pool::ConnectionPool;

pub use http1::UpstreamError;

/// How long an idle pooled connection to a target is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A request body as the client gets it.
pub enum Outgoing {
    /// The whole body (possibly empty), already in memory.
    Whole(Bytes),
    /// A body still arriving, or read back from disk.
    Streaming(ProxyBody),
}

/// A target's response body, as the client hands it on.
pub enum Received {
    /// Read whole, with the response head: most small responses. Buffering it would only
    /// copy it, and its length is already the one the target declared.
    Whole(Bytes),
    /// Still arriving.
    Streaming(ProxyBody),
}

#[derive(Clone)]
pub struct UpstreamClient {
    streaming: Client<HttpConnector, ProxyBody>,
    whole: Arc<http1::Http1Client>,
    /// The deadlines of responses awaited through this client (one per worker).
    deadlines: CoarseTimer,
}

pub fn upstream_client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    let streaming = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    let whole = http1::Http1Client::new(ConnectionPool::new(POOL_IDLE_TIMEOUT), connect_timeout);
    UpstreamClient {
        streaming,
        whole: Arc::new(whole),
        deadlines: CoarseTimer::default(),
    }
}

const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

impl UpstreamClient {
    /// Sends a request to the target its URI names (`http://host:port/path`). The response's
    /// fields come as received when the lean path read them and they need no change.
    ///
    /// The request is made ready to go when this is called; the future holds only what
    /// the exchange needs.
    pub fn send(
        &self,
        request: Request<Outgoing>,
        added: Option<AddedHeaders>,
        hints: Option<InterimResponses>,
    ) -> impl Future<Output = Result<Answer<Received>, BoxError>> + '_ {
        let (mut parts, outgoing) = request.into_parts();
        match outgoing {
            Outgoing::Whole(bytes) => {
                let request = Request::from_parts(parts, bytes);
                Either::Left(self.whole.send(request, added.as_ref(), hints).err_into())
            }
            Outgoing::Streaming(body) => {
                if let Some(added) = added {
                    added.insert_into(&mut parts.headers);
                }
                let mut request = Request::from_parts(parts, body);
                if let Some(hints) = hints {
                    hyper::ext::on_informational(&mut request, move |interim| {
                        if passes_on(interim.status()) {
                            hints.send(&interim_head(interim.status(), interim.headers()));
                        }
                    });
                }
                let response = self.request(request);
                Either::Right(async move {
                    let response = response.await?;
                    Ok(Answer::from(
                        response.map(|body| Received::Streaming(body::boxed(body))),
                    ))
                })
            }
        }
    }

    /// Completes when a response awaited since `sent_at` is `timeout` late (within
    /// [`crate::coarse_timer::SWEEP_EVERY`]); never, for a zero timeout.
    pub fn response_deadline(&self, sent_at: Instant, timeout: Duration) -> CoarseDeadline<'_> {
        let deadline = (!timeout.is_zero()).then(|| sent_at + timeout);
        self.deadlines.deadline(deadline)
    }

    /// Sends a request through hyper's client: for upgrades, whose response keeps the
    /// connection for the tunnel, and for health checks.
    pub fn request(&self, request: Request<ProxyBody>) -> ResponseFuture {
        self.streaming.request(request)
    }
}

/// Whether an interim response from the app goes on to the client, as Go's reverse proxy
/// passes them on: `103 Early Hints`, `102 Processing` and the like. Not `100 Continue`,
/// which answered the proxy's own request (the client's `Expect` is answered by the
/// proxy), nor `101`, which is not interim.
pub(crate) fn passes_on(status: http::StatusCode) -> bool {
    status.is_informational()
        && status != http::StatusCode::CONTINUE
        && status != http::StatusCode::SWITCHING_PROTOCOLS
}

/// An interim response head for an HTTP/1.1 client, with the app's fields (hop-by-hop ones
/// left out).
pub(crate) fn interim_head(status: http::StatusCode, headers: &http::HeaderMap) -> Vec<u8> {
    let mut head = Vec::new();
    crate::answer::write_status_line(&mut head, status);
    let mut fields = headers.clone();
    crate::headers::remove_hop_by_hop(&mut fields, false);
    for (name, value) in &fields {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A short human description of why a request to a target failed: the innermost cause.
pub fn describe_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    if let Some(io) = innermost.downcast_ref::<std::io::Error>() {
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            std::io::ErrorKind::ConnectionReset => "connection reset".to_string(),
            std::io::ErrorKind::TimedOut => "connect timed out".to_string(),
            _ => io.to_string(),
        };
    }
    innermost.to_string()
}
