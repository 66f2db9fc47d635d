//! The request pipeline: route → admit (pause/stop) → pick a target → forward → log.
//!
//! Protocol details (HTTP/1.1, HTTP/2, upgrades) stay at the edges: the listener hands every
//! request here as an `http::Request`, and upgrades are tunnelled in `tunnel`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::signal::Signal;

use crate::answer::Answer;
use crate::body::{self, BoxError, ProxyBody};
use crate::buffer::{buffer_body, BufferError};
use crate::client_io::InterimResponses;
use crate::config::{BufferConfig, ServiceConfig};
use crate::drain::Drain;
use crate::error_page::ErrorPages;
use crate::headers::{self, TrustedProxies};
use crate::metrics::Metrics;
use crate::read_targets;
use crate::request_log::RequestRecord;
use crate::request_target::{self, PathShape};
use crate::route::{strip_prefix, RouteTableHandle};
use crate::service::{Admission, Service, ServiceSettings};
use crate::sniff;
use crate::target::{InFlight, Target};
use crate::tunnel::ClientUpgrade;
use crate::upstream::{describe_error, Outgoing, Received, UpstreamClient};

/// Where a connection came from, as the listener saw it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    pub local_port: u16,
    pub tls: bool,
}

impl ConnectionInfo {
    /// The scheme the client used, as the log line and X-Forwarded-Proto name it.
    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// Why forwarding failed, and so which error page the client gets.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("body larger than the service allows")]
    BodyTooLarge,
    #[error("response body larger than the service allows")]
    ResponseTooLarge,
    #[error("malformed request body: {0}")]
    BadRequestBody(BoxError),
    #[error("target unreachable: {0}")]
    Unreachable(String),
    #[error("target sent no response head within the target timeout")]
    Timeout,
    #[error("request cut: target drain timeout reached")]
    Cut,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ForwardError {
    fn status(&self) -> StatusCode {
        match self {
            ForwardError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            // The client asked for nothing too large: kamal-proxy answers 500.
            ForwardError::ResponseTooLarge => StatusCode::INTERNAL_SERVER_ERROR,
            ForwardError::BadRequestBody(_) => StatusCode::BAD_REQUEST,
            ForwardError::Unreachable(_) => StatusCode::BAD_GATEWAY,
            // As kamal-proxy: a request cut by a drain timed out waiting for its target.
            ForwardError::Timeout | ForwardError::Cut => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A request body as a listener hands it over: hyper's for HTTP/1.1 and HTTP/2, the QUIC
/// stream's for HTTP/3.
pub trait ClientRequestBody:
    Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<B> ClientRequestBody for B where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// Answers ACME HTTP-01 challenges on the plain HTTP listener.
pub trait ChallengeResponder: Send + Sync + 'static {
    /// The key authorization for a `/.well-known/acme-challenge/<token>` path we expect.
    /// Asynchronous because with a store shared by several proxies, the answer may be
    /// another instance's, looked up in that store.
    fn answer<'a>(
        &'a self,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;
}

/// Everything a request needs to find its way. One shared allocation: cloning it for a
/// request costs one reference count.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<ProxyInner>,
}

#[derive(Clone)]
struct ProxyInner {
    routes: RouteTableHandle<Service>,
    client: UpstreamClient,
    challenges: Option<Arc<dyn ChallengeResponder>>,
    https_port: u16,
    drain: Drain,
    metrics: Option<Arc<Metrics>>,
    trusted_proxies: Arc<TrustedProxies>,
    /// `Alt-Svc` for responses over TLS on TCP, when HTTP/3 is served.
    alt_svc: Option<HeaderValue>,
}

const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The service name requests for no service are logged and counted under.
static NO_SERVICE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

impl Proxy {
    pub fn new(routes: RouteTableHandle<Service>, client: UpstreamClient) -> Self {
        let inner = ProxyInner {
            routes,
            client,
            challenges: None,
            https_port: 443,
            drain: Drain::new(),
            metrics: None,
            trusted_proxies: Arc::default(),
            alt_svc: None,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The drain of the process this proxy serves in.
    pub fn drain(&self) -> &Drain {
        &self.inner.drain
    }

    /// Where requests (and TLS handshakes) are counted, if anywhere.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.inner.metrics.as_ref()
    }

    /// Sends requests through `client` (each worker thread has its own pool).
    pub fn with_upstream_client(mut self, client: UpstreamClient) -> Self {
        Arc::make_mut(&mut self.inner).client = client;
        self
    }

    /// Counts requests and upstream response times into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        Arc::make_mut(&mut self.inner).metrics = Some(metrics);
        self
    }

    /// Believes the X-Forwarded-* headers of requests from these proxies, for every service.
    pub fn with_trusted_proxies(mut self, trusted: TrustedProxies) -> Self {
        Arc::make_mut(&mut self.inner).trusted_proxies = Arc::new(trusted);
        self
    }

    /// Answers ACME challenges before routing, and redirects to HTTPS on `https_port`.
    pub fn with_tls(mut self, challenges: Arc<dyn ChallengeResponder>, https_port: u16) -> Self {
        Arc::make_mut(&mut self.inner).challenges = Some(challenges);
        Arc::make_mut(&mut self.inner).https_port = https_port;
        self
    }

    /// Tells clients of HTTPS over TCP that HTTP/3 is served on UDP `port` (as kamal-proxy
    /// does with `--http3`).
    pub fn with_http3(mut self, port: u16) -> Self {
        Arc::make_mut(&mut self.inner).alt_svc = Some(crate::http3::alt_svc(port));
        self
    }

    /// Adds `Alt-Svc` to a response on a TLS connection over TCP, when HTTP/3 is served: a
    /// connection-level header, like the drain's `Connection: close`, so the TCP listeners
    /// add it after the pipeline.
    pub(crate) fn advertise_http3(&self, conn: ConnectionInfo, fields: &mut http::HeaderMap) {
        if let (Some(alt_svc), true) = (&self.inner.alt_svc, conn.tls) {
            fields.append(header::ALT_SVC, alt_svc.clone());
        }
    }

    /// Serves one request. Never fails: every problem becomes an error page. `hints` passes
    /// the app's interim responses (`103 Early Hints`, `102 Processing`) on to the client,
    /// when its connection can take them.
    ///
    /// Its phases, in order: check the head, answer ACME, route, redirect, admit, pick a
    /// target, forward, pass the answer on.
    ///
    /// A function returning an `async` block rather than an `async fn`, here and in
    /// `forward`: an `async fn` holds its arguments twice in its state (as passed, and as its
    /// body's locals), and this state is copied whole each time it moves into its caller's.
    #[allow(clippy::manual_async_fn)]
    pub fn handle<B: ClientRequestBody>(
        &self,
        conn: ConnectionInfo,
        request: Request<B>,
        hints: Option<InterimResponses>,
    ) -> impl Future<Output = Answer<ProxyBody>> + '_ {
        async move {
            let path_shape = match headers::check_request_head(&request) {
                Ok(path_shape) => path_shape,
                Err(reason) => return refuse_head(conn, &request, reason),
            };
            if request.method() == Method::OPTIONS && request.uri().path() == "*" {
                return server_options();
            }
            // Boxed: the record travels with the response to its body's end, and moving it
            // there whole (over 500 bytes) cost several copies a request.
            let mut record = Box::new(RequestRecord::begin(
                &request,
                conn.peer,
                conn.local_port,
                conn.scheme(),
            ));
            if !conn.tls && request.uri().path().starts_with(ACME_CHALLENGE_PREFIX) {
                if let Some(answer) = self
                    .answer_challenge(request.uri().path(), &mut record)
                    .await
                {
                    return answer;
                }
            }
            let Some(Routed {
                service,
                path_and_query,
                cookie_scope,
            }) = self.route(&request, path_shape, &mut record)
            else {
                return self.not_routed(record);
            };
            let settings = service.settings();
            let config = &settings.config;
            let uri = request.uri();
            if let Some(location) =
                redirect_location(config, conn, &record, uri, self.inner.https_port)
            {
                return redirect(request.method(), &location, &mut record).into();
            }

            match service.admit(uri.path()).await {
                Admission::Proceed => {}
                Admission::HealthCheck => {
                    record.status = 200;
                    record.emit();
                    return Response::new(body::empty()).into();
                }
                Admission::Stopped(message) => {
                    let status = StatusCode::SERVICE_UNAVAILABLE;
                    let pages = &settings.error_pages;
                    return finish_with_error(&mut record, pages, status, message.as_deref())
                        .into();
                }
                Admission::PauseTimedOut => {
                    let status = StatusCode::GATEWAY_TIMEOUT;
                    return finish_with_error(&mut record, &settings.error_pages, status, None)
                        .into();
                }
            }

            let assignment = service.assign(request.headers());
            // Read targets: only services that have them pay for looking at the request.
            let reading = service
                .has_readers()
                .then(|| read_targets::decide(&request, config.read_target_websockets));
            let to_reader = reading.is_some_and(|reading| reading.to_reader);
            let Some(claim) = service.pick_target(assignment.rollout, to_reader) else {
                let status = StatusCode::SERVICE_UNAVAILABLE;
                let message = Some("No target is available.");
                return finish_with_error(&mut record, &settings.error_pages, status, message)
                    .into();
            };
            record.target = Some(Arc::clone(claim.target().shared_address()));

            let downstream = Downstream { conn, hints };
            let forwarded = self
                .forward(
                    downstream,
                    &settings,
                    &claim,
                    request,
                    path_and_query,
                    &mut record,
                )
                .await;
            let passing = PassingOn {
                settings: &settings,
                reading,
                cookie_scope,
                set_cookie: assignment.set_cookie,
            };
            match forwarded {
                Ok(Forwarded::Upgraded(response)) => {
                    record.status = response.status().as_u16();
                    record.emit();
                    response.into()
                }
                Ok(Forwarded::Response(response)) => passing.answer(response, claim, record),
                Err(error) => {
                    let status = error.status();
                    tracing::info!(service = %service.name(), address = %claim.target().address(), %error, "Forwarding failed");
                    drop(claim);
                    finish_with_error(&mut record, &settings.error_pages, status, None).into()
                }
            }
        }
    }

    /// The ACME challenge's answer, when the path is one this proxy expects.
    async fn answer_challenge(
        &self,
        path: &str,
        record: &mut RequestRecord,
    ) -> Option<Answer<ProxyBody>> {
        let answer = self.inner.challenges.as_ref()?.answer(path).await?;
        record.status = 200;
        record.resp_content_length = Some(answer.len() as u64);
        record.emit();
        let mut response = Response::new(body::full(answer));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        Some(response.into())
    }

    /// The service the request's host and path name, and what it makes of the request's
    /// path; noted in the record (its name, its request fields to log, its metrics).
    fn route<B>(
        &self,
        request: &Request<B>,
        path_shape: PathShape,
        record: &mut RequestRecord,
    ) -> Option<Routed> {
        let routes = self.inner.routes.current();
        let host = record.host_name();
        let found = routes.lookup(host, request.uri().path())?;
        let uri = request.uri();
        let config = &found.service.settings().config;
        let stripped = if config.strip_path_prefix {
            strip_prefix(found.prefix, uri.path())
        } else {
            uri.path()
        };
        let path_and_query = match uri.path_and_query() {
            // As it came (nothing stripped, nothing to encode): a cheap clone of the parsed
            // request line.
            Some(original)
                if stripped.len() == uri.path().len() && path_shape == PathShape::AsItCame =>
            {
                original.clone()
            }
            _ => upstream_path(&request_target::escape_path(stripped), uri.query()),
        };
        // `--scope-cookie-paths`: the app's cookies are scoped under its prefix.
        let cookie_scope = (config.scope_cookie_paths && found.prefix != "/").then(|| {
            let host = crate::route::strip_port(host).to_ascii_lowercase();
            (found.prefix.to_string(), host)
        });
        let service = Arc::clone(found.service);
        drop(routes);

        record.service = Some(Arc::clone(service.shared_name()));
        if let Some(metrics) = &self.inner.metrics {
            let excluded = config
                .exclude_metrics_path
                .iter()
                .any(|path| path == path_and_query.path());
            if !excluded {
                record.metrics = Some(Arc::clone(metrics));
            }
        }
        record.capture_headers("req_", &config.log_request_headers, |name| {
            request.headers().get(name).cloned()
        });
        Some(Routed {
            service,
            path_and_query,
            cookie_scope,
        })
    }

    /// A 404 for a request no service takes: counted, as kamal-proxy counts them, under the
    /// empty service name.
    fn not_routed(&self, mut record: Box<RequestRecord>) -> Answer<ProxyBody> {
        if let Some(metrics) = &self.inner.metrics {
            record.metrics = Some(Arc::clone(metrics));
            record.service = Some(Arc::clone(&NO_SERVICE));
        }
        let pages = ErrorPages::default();
        finish_with_error(&mut record, &pages, StatusCode::NOT_FOUND, None).into()
    }

    /// Sends the request on to the claimed target and waits for its response head.
    #[allow(clippy::manual_async_fn)]
    fn forward<'a, B: ClientRequestBody>(
        &'a self,
        client: Downstream,
        settings: &'a ServiceSettings,
        claim: &'a InFlight,
        mut request: Request<B>,
        path_and_query: PathAndQuery,
        record: &'a mut RequestRecord,
    ) -> impl Future<Output = Result<Forwarded, ForwardError>> + 'a {
        async move {
            let Downstream { conn, hints } = client;
            let config = &settings.config;
            let target = claim.target();
            let upgrade = request.version() == Version::HTTP_11
                && headers::is_upgrade_request(request.headers());
            let client_upgrade = upgrade.then(|| ClientUpgrade::of(&mut request));
            // Only a streamed body can fail as it is read; the flag is not allocated otherwise.
            let mut client_body_failed: Option<Arc<AtomicBool>> = None;

            // In a block of its own: what it borrows is gone from this future's state by the
            // time the response is awaited.
            let sent = {
                let (mut parts, incoming) = request.into_parts();
                let added_headers = self.upstream_head(
                    conn,
                    config,
                    target,
                    &mut parts,
                    path_and_query,
                    upgrade,
                    record,
                )?;
                let buffering = &config.buffering;
                let outgoing = if upgrade || (!incoming.is_end_stream() && !buffering.requests) {
                    let failed = client_body_failed.get_or_insert_with(Default::default);
                    Outgoing::Streaming(streamed_body(incoming, Arc::clone(failed)))
                } else if incoming.is_end_stream() {
                    // Most requests: nothing to buffer or stream.
                    Outgoing::Whole(Bytes::new())
                } else {
                    // Boxed: buffering's state is large, and the future of every request,
                    // bodiless ones included, would otherwise be sized for it.
                    let buffered;
                    (parts, buffered) =
                        Box::pin(buffer_request(buffering, parts, incoming)).await?;
                    buffered
                };
                // Boxed: a future is copied whole each time it moves into its caller's state,
                // and this one would sit inline in every level of the pipeline above it.
                Box::pin(self.inner.client.send(
                    Request::from_parts(parts, outgoing),
                    added_headers,
                    hints,
                ))
            };

            let sent_at = tokio::time::Instant::now();
            // A coarse timer's deadline: tokio's would cost a timer-wheel entry per request.
            let timed_out = self
                .inner
                .client
                .response_deadline(sent_at, config.target_timeout.get());
            let response = tokio::select! {
                // The response first: most are in by the first poll after the send's wake.
                biased;
                result = sent => Some(result),
                _ = target.cut_requests().cancelled() => return Err(ForwardError::Cut),
                () = timed_out => None,
            };
            record.upstream_duration = Some(sent_at.elapsed());
            let arrived = Arrived {
                response,
                client_body_failed,
                client_upgrade,
            };
            // Bound first: a match on the call itself would keep its temporaries in this
            // future's state across the await below.
            let taken = self.take_response(arrived, target, &config.buffering, record)?;
            match taken {
                AppResponse::Ready(forwarded) => Ok(forwarded),
                AppResponse::Streamed(head, incoming, finish) => {
                    // Boxed, as the request's buffering is.
                    let finished =
                        Box::pin(finish_streamed(&config.buffering, head, incoming, finish));
                    Ok(Forwarded::Response(finished.await?))
                }
            }
        }
    }

    /// The target's answer (or its absence) made into what the client gets: an upgrade
    /// joined to the client's, an error, or the app's response.
    fn take_response(
        &self,
        arrived: Arrived,
        target: &Target,
        buffering: &BufferConfig,
        record: &mut RequestRecord,
    ) -> Result<AppResponse, ForwardError> {
        let response = match arrived.response {
            None => return Err(ForwardError::Timeout),
            Some(Err(error))
                if arrived
                    .client_body_failed
                    .is_some_and(|failed| failed.load(Ordering::Relaxed)) =>
            {
                return Err(ForwardError::BadRequestBody(error))
            }
            Some(Err(error)) => return Err(ForwardError::Unreachable(describe_error(&*error))),
            Some(Ok(response)) => response,
        };
        if let Some(client_upgrade) = arrived.client_upgrade {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let mut response = response.into_response();
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                client_upgrade.join(
                    &self.inner.drain,
                    upstream_upgrade,
                    target.close_upgrades().clone(),
                );
                let upgraded = Forwarded::Upgraded(response.map(|_| body::empty()));
                return Ok(AppResponse::Ready(upgraded));
            }
        }
        // A target that switches protocols unasked (an h2c handler answering a request the
        // proxy sent on as a plain one) would have the client talk past the proxy.
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ForwardError::Unreachable(
                "the target switched protocols without being asked".into(),
            ));
        }
        app_response(buffering, response, record)
    }

    /// The request head for the target: its URI, this hop's fields out, the forwarding
    /// fields in (noting the request ID and client address in the record).
    #[allow(clippy::too_many_arguments)]
    fn upstream_head(
        &self,
        conn: ConnectionInfo,
        config: &ServiceConfig,
        target: &Target,
        parts: &mut http::request::Parts,
        path_and_query: PathAndQuery,
        upgrade: bool,
        record: &mut RequestRecord,
    ) -> Result<Option<headers::AddedHeaders>, ForwardError> {
        // From its parts rather than through `Uri::builder`, whose every step moves the
        // whole builder: about 300 instructions a request.
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(target.authority().clone());
        uri.path_and_query = Some(path_and_query);
        parts.uri = Uri::from_parts(uri).map_err(|e| ForwardError::Internal(e.to_string()))?;
        parts.version = Version::HTTP_11;
        headers::remove_hop_by_hop(&mut parts.headers, upgrade);
        let original_host = record.host().cloned();
        // An empty Host goes on as none: the target's address is sent instead, as kamal-proxy
        // (Go) sends it.
        if original_host.as_ref().is_some_and(HeaderValue::is_empty) {
            parts.headers.remove(header::HOST);
        }
        // A Host header the client sent is forwarded as it is; one taken from HTTP/2's
        // `:authority` is added. (Inserting it anyway grew a full map on every request.)
        if let (Some(host), true) = (&original_host, record.host_from_authority()) {
            parts.headers.insert(header::HOST, host.clone());
        }
        let peer_ip = conn.peer.ip();
        let trusted_peer =
            !self.inner.trusted_proxies.is_empty() && self.inner.trusted_proxies.contains(peer_ip);
        let client_ip_header = config.client_ip_header.as_deref();
        // The log's remote_addr, as kamal-proxy gives it: the client-IP header, else the first
        // X-Forwarded-For line (which the record kept), else the peer.
        record.remote_addr = client_ip_header.and_then(|name| parts.headers.get(name).cloned());
        let forwarding = headers::Forwarding {
            peer: peer_ip,
            scheme: conn.scheme(),
            host: original_host.as_ref(),
            trust_incoming: config.forward_headers || trusted_peer,
            client_ip_header,
        };
        let (request_id, added_headers) =
            headers::forwarding_headers(&mut parts.headers, &forwarding, target.address_header());
        record.request_id = Some(request_id);
        Ok(added_headers)
    }
}

/// The answer to `OPTIONS *`, a question about the server rather than any resource: 200
/// and nothing more, from the proxy itself, as Go's server (so kamal-proxy) gives it. Not
/// logged, as kamal-proxy does not log it.
fn server_options() -> Answer<ProxyBody> {
    Response::new(body::empty()).into()
}

/// The 400 for a request head no target should see.
fn refuse_head<B>(conn: ConnectionInfo, request: &Request<B>, reason: &str) -> Answer<ProxyBody> {
    let mut record = RequestRecord::begin(request, conn.peer, conn.local_port, conn.scheme());
    let pages = ErrorPages::default();
    let mut response =
        finish_with_error(&mut record, &pages, StatusCode::BAD_REQUEST, Some(reason));
    if request.version() < Version::HTTP_2 {
        // What follows on this connection cannot be trusted to be framed as we think.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response.into()
}

/// A request body streamed to the target as it comes. `failed` is set if reading it from
/// the client fails.
fn streamed_body<B: ClientRequestBody>(incoming: B, failed: Arc<AtomicBool>) -> ProxyBody {
    if incoming.is_end_stream() {
        return body::empty();
    }
    body::boxed(ClientBody {
        inner: incoming,
        failed,
    })
}

/// The request body read whole, for a service that buffers requests; its head given the
/// length read.
async fn buffer_request<B: ClientRequestBody>(
    buffering: &BufferConfig,
    mut parts: http::request::Parts,
    mut incoming: B,
) -> Result<(http::request::Parts, Outgoing), ForwardError> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if buffering.max_request_body > 0
        && declared.is_some_and(|len| len > buffering.max_request_body)
    {
        discard_lingering(incoming);
        return Err(ForwardError::BodyTooLarge);
    }
    let buffered =
        match buffer_body(&mut incoming, buffering.memory, buffering.max_request_body).await {
            Ok(buffered) => buffered,
            Err(BufferError::TooLarge(_)) => {
                discard_lingering(incoming);
                return Err(ForwardError::BodyTooLarge);
            }
            Err(BufferError::Read(e)) => return Err(ForwardError::BadRequestBody(e)),
            Err(BufferError::Spill(e)) => return Err(ForwardError::Internal(e.to_string())),
        };
    if buffered.len > 0 || declared.is_some() {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(buffered.len));
    }
    let outgoing = match buffered.into_memory() {
        Ok(bytes) => Outgoing::Whole(bytes),
        Err(spilled) => Outgoing::Streaming(spilled),
    };
    Ok((parts, outgoing))
}

/// What the target sent, and what the request knew when it was sent.
struct Arrived {
    /// `None` when the target timeout passed first.
    response: Option<Result<Answer<Received>, BoxError>>,
    client_body_failed: Option<Arc<AtomicBool>>,
    client_upgrade: Option<ClientUpgrade>,
}

/// The app's response, as `take_response` found it.
enum AppResponse {
    Ready(Forwarded),
    /// Streamed by the target, with work to do before it is passed on.
    Streamed(Answer<()>, ProxyBody, Finish),
}

/// The target's response as the pipeline passes it on: this hop's fields out, and its body
/// as it is, or to be held whole when the service buffers responses (an event stream never
/// is: it never ends).
fn app_response(
    buffering: &BufferConfig,
    response: Answer<Received>,
    record: &mut RequestRecord,
) -> Result<AppResponse, ForwardError> {
    let (mut head, received) = response.into_head_and_body();
    // The log's type is the one the app sent, as kamal-proxy logs it, not one named from the
    // body ([`sniff`]) for an app that sent none.
    record.resp_content_type = head.get(&header::CONTENT_TYPE);
    let untyped =
        record.resp_content_type.is_none() && sniff::allowed(&head, no_body_status(head.status()));
    // Looked at only for a streamed body, before this hop's fields go.
    let chunked = untyped
        && matches!(received, Received::Streaming(_))
        && head.get(&header::TRANSFER_ENCODING).is_some();
    // Fields passed on as received hold nothing for this hop only; a map may.
    headers::remove_hop_by_hop(head.map_mut(), false);
    let body = match received {
        Received::Whole(bytes) => {
            let max = buffering.max_response_body;
            if buffering.responses && max > 0 && bytes.len() as u64 > max {
                return Err(ForwardError::ResponseTooLarge);
            }
            if untyped && !bytes.is_empty() {
                sniff::name_from(&mut head, &bytes);
            }
            AppBody::Whole(Some(bytes))
        }
        Received::Streaming(incoming)
            if buffering.responses && !is_event_stream(head.get(&header::CONTENT_TYPE)) =>
        {
            let finish = Finish {
                buffer: true,
                name_type: untyped,
            };
            return Ok(AppResponse::Streamed(head, incoming, finish));
        }
        // Streamed without a type: named from its first frame. One the app sends in chunks
        // goes on without a type, as kamal-proxy sends it when its head-flush timer wins the
        // race with the first write ([`sniff`]).
        Received::Streaming(incoming) if untyped && !chunked => {
            let finish = Finish {
                buffer: false,
                name_type: true,
            };
            return Ok(AppResponse::Streamed(head, incoming, finish));
        }
        Received::Streaming(incoming) => AppBody::Streamed(incoming),
    };
    Ok(AppResponse::Ready(Forwarded::Response(
        head.with_body(body),
    )))
}

/// What a streamed response needs before it is passed on.
struct Finish {
    /// Read whole first: the service buffers responses.
    buffer: bool,
    /// Given the Content-Type its first bytes name ([`sniff`]): the app sent none.
    name_type: bool,
}

/// A streamed response made ready to pass on: read whole, its type named, or both.
async fn finish_streamed(
    buffering: &BufferConfig,
    head: Answer<()>,
    incoming: ProxyBody,
    finish: Finish,
) -> Result<Answer<AppBody>, ForwardError> {
    let (mut head, mut body) = if finish.buffer {
        buffer_response(buffering, head, incoming).await?
    } else {
        (head, incoming)
    };
    if finish.name_type {
        body = sniff::name_from_first_frame(&mut head, body).await;
    }
    Ok(head.with_body(AppBody::Streamed(body)))
}

/// A streamed response body read whole; its head given the length read.
async fn buffer_response(
    buffering: &BufferConfig,
    mut head: Answer<()>,
    mut incoming: ProxyBody,
) -> Result<(Answer<()>, ProxyBody), ForwardError> {
    let buffered = buffer_body(&mut incoming, buffering.memory, buffering.max_response_body)
        .await
        .map_err(|e| match e {
            BufferError::TooLarge(_) => ForwardError::ResponseTooLarge,
            BufferError::Read(e) => ForwardError::Unreachable(describe_error(&*e)),
            BufferError::Spill(e) => ForwardError::Internal(e.to_string()),
        })?;
    if !no_body_status(head.status()) {
        head.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(buffered.len));
    }
    Ok((head, buffered.into_body()))
}

/// Where routing sent a request.
struct Routed {
    service: Arc<Service>,
    /// The path and query the target is sent (its prefix stripped, if the service says so).
    path_and_query: PathAndQuery,
    /// `--scope-cookie-paths`: the prefix and host the app's cookies are scoped to.
    cookie_scope: Option<(String, String)>,
}

/// What the app's response gets on its way to the client, decided before it was sent.
struct PassingOn<'a> {
    settings: &'a ServiceSettings,
    reading: Option<read_targets::ReadDecision>,
    cookie_scope: Option<(String, String)>,
    /// The rollout's `Set-Cookie`, for a client newly assigned to a group.
    set_cookie: Option<String>,
}

impl PassingOn<'_> {
    /// The app's response with the proxy's changes, its body watched to the end (which
    /// releases the claim and writes the log line).
    fn answer(
        self,
        mut response: Answer<AppBody>,
        claim: InFlight,
        mut record: Box<RequestRecord>,
    ) -> Answer<ProxyBody> {
        let config = &self.settings.config;
        let timeout = config.writer_affinity_timeout.get();
        if self.reading.is_some_and(|reading| !reading.read_request) && !timeout.is_zero() {
            read_targets::mark_write(response.headers_mut(), timeout);
        }
        if let Some((prefix, host)) = &self.cookie_scope {
            headers::scope_cookie_paths(response.headers_mut(), prefix, host);
        }
        if let Some(cookie) = self
            .set_cookie
            .and_then(|cookie| HeaderValue::from_str(&cookie).ok())
        {
            // Added after the app's fields: no need to move them into the map.
            response.map_mut().append(header::SET_COOKIE, cookie);
        }
        record.status = response.status().as_u16();
        record.capture_headers("resp_", &config.log_response_headers, |name| {
            response.get(name)
        });
        let cut = claim.target().cut_requests().clone();
        response.map_body(|inner| {
            body::boxed_as_is(ObservedBody {
                inner,
                claim: Some(claim),
                record: Some(record),
                cut,
                waiting_for_cut: None,
                sent: 0,
            })
        })
    }
}

/// The client's side of a request: its connection, and whether it can take interim
/// responses.
struct Downstream {
    conn: ConnectionInfo,
    hints: Option<InterimResponses>,
}

enum Forwarded {
    Response(Answer<AppBody>),
    Upgraded(Response<ProxyBody>),
}

/// The app's response body as the pipeline passes it on: most arrive whole with their head
/// and are held as they are, sparing a boxed body (an allocation, and a call through a
/// pointer for each frame) on the way.
enum AppBody {
    /// Not yet sent (`None` once it has been).
    Whole(Option<Bytes>),
    Streamed(ProxyBody),
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            AppBody::Whole(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            AppBody::Streamed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AppBody::Whole(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            AppBody::Streamed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AppBody::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            AppBody::Streamed(body) => body.size_hint(),
        }
    }
}

/// How long, and how much, of a refused upload is read and thrown away: enough for a client
/// that writes its whole body before reading to get to the 413 (nginx's lingering close).
const LINGER_FOR: std::time::Duration = std::time::Duration::from_secs(30);
const LINGER_QUIET: std::time::Duration = std::time::Duration::from_secs(5);
const LINGER_BYTES: u64 = 128 * 1024 * 1024;

/// Reads and discards the rest of a refused request body in the background while the error
/// response goes out. Closing with the upload unread would make the kernel reset the
/// connection, and a client still writing would see a broken pipe instead of the answer.
/// Bounded in time, quiet time and bytes; once the body ends, the connection can even be
/// reused.
fn discard_lingering<B: ClientRequestBody>(mut incoming: B) {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut discarded: u64 = 0;
        while started.elapsed() < LINGER_FOR && discarded < LINGER_BYTES {
            match tokio::time::timeout(LINGER_QUIET, incoming.frame()).await {
                Ok(Some(Ok(frame))) => {
                    discarded += frame.data_ref().map_or(0, |data| data.len() as u64);
                }
                _ => break,
            }
        }
    });
}

fn is_event_stream(content_type: Option<HeaderValue>) -> bool {
    content_type
        .as_ref()
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim_start()
                .get(..17)
                .is_some_and(|kind| kind.eq_ignore_ascii_case("text/event-stream"))
        })
}

fn no_body_status(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// A zero timeout means none. Not a wrapper future around the request: that would hold the
/// request's future twice over in the pipeline's state, which is copied as it moves.
/// Where to send a request that should be on HTTPS or on the canonical host, if anywhere.
fn redirect_location(
    config: &ServiceConfig,
    conn: ConnectionInfo,
    record: &RequestRecord,
    uri: &Uri,
    https_port: u16,
) -> Option<String> {
    // Most services redirect nothing: settled before looking at the request.
    if !(config.tls.enabled && config.tls.redirect && !conn.tls)
        && config.tls.canonical_host.is_none()
    {
        return None;
    }
    let host = crate::route::strip_port(record.host_name());
    // The on-demand TLS check for a path is asked over plain HTTP and must be answered there.
    let is_on_demand_check = config.tls.on_demand_url.as_deref().is_some_and(|url| {
        url.starts_with('/') && uri.path() == url.split('?').next().unwrap_or(url)
    });
    let to_https = config.tls.enabled && config.tls.redirect && !conn.tls && !is_on_demand_check;
    let canonical = config
        .tls
        .canonical_host
        .as_deref()
        .filter(|canonical| !canonical.eq_ignore_ascii_case(host));
    if !to_https && canonical.is_none() {
        return None;
    }
    let (scheme, port) = if to_https || conn.tls {
        (
            "https",
            if to_https {
                https_port
            } else {
                conn.local_port
            },
        )
    } else {
        ("http", conn.local_port)
    };
    let port = match (scheme, port) {
        ("https", 443) | ("http", 80) => String::new(),
        (_, port) => format!(":{port}"),
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Some(format!(
        "{scheme}://{}{port}{path}",
        canonical.unwrap_or(host)
    ))
}

/// A 301 to `location`, logged, as Go's `http.Redirect` writes it (so kamal-proxy): a GET
/// or HEAD also gets a line of HTML linking there, for a client that does not follow it.
fn redirect(method: &Method, location: &str, record: &mut RequestRecord) -> Response<ProxyBody> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    record.status = 301;
    if *method == Method::GET || *method == Method::HEAD {
        let mut page = String::with_capacity(location.len() + 40);
        page.push_str("<a href=\"");
        crate::page_template::escape_html_into(location, &mut page);
        page.push_str("\">Moved Permanently</a>.\n\n");
        let content_type = HeaderValue::from_static("text/html; charset=utf-8");
        record.resp_content_length = Some(page.len() as u64);
        record.resp_content_type = Some(content_type.clone());
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
        *response.body_mut() = body::full(Bytes::from(page));
    }
    record.emit();
    response
}

/// The path and the untouched query for the upstream request.
fn upstream_path(path: &str, query: Option<&str>) -> PathAndQuery {
    let joined = match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    joined
        .parse()
        .unwrap_or_else(|_| PathAndQuery::from_static("/"))
}

fn finish_with_error(
    record: &mut RequestRecord,
    pages: &ErrorPages,
    status: StatusCode,
    message: Option<&str>,
) -> Response<ProxyBody> {
    record.status = status.as_u16();
    record.resp_content_type = Some(HeaderValue::from_static("text/html; charset=utf-8"));
    let page = pages.render(status, message);
    // The bytes written, as kamal-proxy logs them for its error pages too.
    record.resp_content_length = page.body().size_hint().exact();
    record.emit();
    page
}

/// A streamed request body on its way to the target. Remembers whether reading it from the
/// client failed, so a malformed body is answered 400 rather than blamed on the target.
struct ClientBody<B> {
    inner: B,
    failed: Arc<AtomicBool>,
}

impl<B: ClientRequestBody> Body for ClientBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            this.failed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body on its way to the client. It holds the target claim until the last byte
/// is sent (so draining waits for streaming responses), cuts the stream when the drain
/// timeout fires, and writes the log line at the end.
struct ObservedBody {
    inner: AppBody,
    claim: Option<InFlight>,
    record: Option<Box<RequestRecord>>,
    cut: Signal,
    /// Registered only once the body has to wait: most bodies are already complete when
    /// first polled, and registering a waiter costs two locks.
    waiting_for_cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    sent: u64,
}

impl ObservedBody {
    fn cut_off(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finish();
        Poll::Ready(Some(Err(
            "response cut: target drain timeout reached".into()
        )))
    }

    fn finish(&mut self) {
        self.claim = None;
        if let Some(mut record) = self.record.take() {
            record.resp_content_length = Some(self.sent);
            record.emit();
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.claim.is_some() && this.cut.is_cancelled() {
            return this.cut_off();
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() && this.claim.is_some() {
            let cut = &this.cut;
            let waiting = this
                .waiting_for_cut
                .get_or_insert_with(|| Box::pin(cut.cancelled_owned()));
            if waiting.as_mut().poll(cx).is_ready() {
                return this.cut_off();
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
impl Proxy {
    /// A proxy with no routes whose target client gives up after a second, for unit tests.
    pub(crate) fn for_tests() -> Self {
        let client = crate::upstream::upstream_client(std::time::Duration::from_secs(1));
        Proxy::new(RouteTableHandle::default(), client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's future is moved whole into each level above it (and into its box), so
    /// every byte it holds is copied several times a request. Guards against a change that
    /// puts a large state back into it, such as buffering's (about 600 bytes) unboxed.
    #[tokio::test]
    async fn a_request_future_stays_small() {
        let proxy = Proxy::for_tests();
        let info = ConnectionInfo {
            peer: ([127, 0, 0, 1], 1).into(),
            local_port: 80,
            tls: false,
        };
        let request = Request::new(http_body_util::Empty::<Bytes>::new());
        let size = std::mem::size_of_val(&proxy.handle(info, request, None));
        // 2,952 bytes in a test build when written; 3,544 with buffering inline; 1,296 once
        // `handle` and `forward` held their arguments once and their dead values no longer.
        assert!(size <= 1600, "a request's future takes {size} bytes");
    }
}
