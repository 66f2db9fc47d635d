//! Serving one client connection, from its first bytes to its close.
//!
//! HTTP/2 is recognised by its connection preface; anything else is served as HTTP/1.1.
//!
//! An HTTP/1.1 connection that has been quiet for [`PARK_AFTER_QUIET`] is taken back from
//! hyper and *parked*. hyper holds an 8 KB read and an 8 KB write buffer for every connection
//! it serves, busy or idle; a parked keep-alive connection holds little more than its socket
//! until its client speaks again, and then a fresh hyper connection takes it up, with the
//! bytes already read replayed. Upgrades (WebSockets) are handed back from hyper the same way
//! once the 101 is written, and relayed from this task.
//!
//! The header read timeout is kept here too, by the same one-second tick that finds quiet
//! connections: a connection whose request head has begun is never parked, and is closed
//! once the head has taken longer than the timeout (to within a second).
//!
//! The drain: HTTP/2 clients get GOAWAY at once. HTTP/1.1 clients get `Connection: close` on
//! their next response (the pipeline adds it), and idle ones are closed when the drain time is
//! up, or at once in a shutdown, where no other process will serve them.

use std::convert::Infallible;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::answer::Answer;
use crate::body::{BoxError, ProxyBody};
use crate::client_io::{self, Activity, ClientIo, InterimResponses, Relocate, RequestGuard};
use crate::drain::Drain;
use crate::fast_http1::{self, FastEnd};
use crate::parking;
use crate::pipeline::{ConnectionInfo, Proxy};
use crate::tunnel::{self, UpgradeHandOff};

/// How long an HTTP/1.1 connection must be quiet (no bytes either way, no request being
/// served) before it is parked. Long enough that a busy connection is never parked between
/// its requests, where taking it up again would cost a little time for nothing.
pub const PARK_AFTER_QUIET: Duration = Duration::from_secs(1);

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Client connections of this process, for the metrics. Counted per connection and per
/// park, never per request.
static OPEN: AtomicUsize = AtomicUsize::new(0);
static PARKED: AtomicUsize = AtomicUsize::new(0);
static LET_GO: AtomicU64 = AtomicU64::new(0);

/// How many client connections are open, and how many of those are parked.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionCounts {
    pub open: usize,
    pub parked: usize,
    /// Times since the process started that a connection closed or parked, each freeing what
    /// hyper held for it: a sign that memory may be worth giving back to the system.
    pub let_go: u64,
}

impl ConnectionCounts {
    pub fn now() -> Self {
        Self {
            open: OPEN.load(Ordering::Relaxed),
            parked: PARKED.load(Ordering::Relaxed),
            let_go: LET_GO.load(Ordering::Relaxed),
        }
    }
}

/// Counts a connection among the open ones ([`CountedOpen`]) or the parked ones
/// ([`CountedParked`]) for as long as it lives. Zero-sized, the gauge chosen by its type
/// rather than held as an address: every byte is held in each idle connection's task.
struct Counted<const PARKED_GAUGE: bool>(());

type CountedOpen = Counted<false>;
type CountedParked = Counted<true>;

impl<const PARKED_GAUGE: bool> Counted<PARKED_GAUGE> {
    fn new() -> Self {
        Self::gauge().fetch_add(1, Ordering::Relaxed);
        Self(())
    }

    fn gauge() -> &'static AtomicUsize {
        if PARKED_GAUGE {
            &PARKED
        } else {
            &OPEN
        }
    }
}

impl<const PARKED_GAUGE: bool> Drop for Counted<PARKED_GAUGE> {
    fn drop(&mut self) {
        Self::gauge().fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection that closed or parked (see [`ConnectionCounts::let_go`]).
fn let_go() {
    LET_GO.fetch_add(1, Ordering::Relaxed);
}

/// Counts a connection as open for as long as it lives, and as let go when it closes.
struct OpenConnection {
    _open: CountedOpen,
}

impl OpenConnection {
    fn new() -> Self {
        Self {
            _open: CountedOpen::new(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let_go();
    }
}

/// How connections are served: hyper's settings for each protocol, how long a client may
/// take to send a request head, and how long an idle keep-alive connection is kept.
pub struct Protocols {
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Largest request head in bytes, and most header fields: hyper is told the same.
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// What a connection holds for as long as it is open, parked or not: its place under the
/// connection limit, and its count among the open connections.
pub struct ConnectionSlot {
    _permit: Option<OwnedSemaphorePermit>,
    _open: OpenConnection,
}

impl ConnectionSlot {
    /// `permit` is the connection's place under the limit (`None`: accepted while draining).
    pub fn new(permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            _permit: permit,
            _open: OpenConnection::new(),
        }
    }
}

/// Serves one connection until it closes or the drain ends it. A parked HTTP/1.1 connection
/// goes on in a task of its own (see [`park`]), so this may return while the connection is
/// still open.
pub async fn serve<S>(
    protocols: &Arc<Protocols>,
    mut stream: S,
    info: ConnectionInfo,
    proxy: Proxy,
    slot: ConnectionSlot,
) where
    S: AsyncRead + AsyncWrite + Relocate + Unpin + Send + 'static,
{
    // The header read timeout (kept by `drive_http1`'s tick) starts with a head's first bytes:
    // a client that never sends a byte is held to the same limit here.
    let timeout = &protocols.header_read_timeout;
    let Some(first_bytes) = wait_for_bytes(&mut stream, timeout, proxy.drain()).await else {
        tracing::debug!(peer = %info.peer, "No request in time; closing the connection");
        return;
    };
    let mut io = ClientIo::with_replay(stream, first_bytes);
    match speaks_http2(&mut io, protocols.header_read_timeout).await {
        // Boxed, as hyper's state is below: it would otherwise be reserved in every
        // connection's task, parked ones included.
        Some(true) => Box::pin(serve_http2(protocols, io, info, proxy)).await,
        Some(false) => serve_http1(protocols, io, info, proxy, slot).await,
        None => tracing::debug!(peer = %info.peer, "Connection closed during its preface"),
    }
}

/// Reads until the bytes seen rule HTTP/2's preface in or out. `None` if the client stops
/// or goes quiet first.
async fn speaks_http2<S>(io: &mut ClientIo<S>, timeout: Duration) -> Option<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let seen = io.replayed();
        let compared = seen.len().min(HTTP2_PREFACE.len());
        if seen[..compared] != HTTP2_PREFACE[..compared] {
            return Some(false);
        }
        if compared == HTTP2_PREFACE.len() {
            return Some(true);
        }
        match tokio::time::timeout(timeout, io.read_ahead()).await {
            Ok(Ok(read)) if read > 0 => {}
            _ => return None,
        }
    }
}

/// Waits, holding no buffers, until the client sends something (the bytes it sent), or until
/// it closes, `timeout` passes, or the drain says idle connections should go (`None`).
/// Not an `async fn`, for the reason given at [`wait_parked`], and `timeout` by reference: a
/// parked connection waits here, and a copy would be 8 bytes more in each of their tasks.
#[allow(clippy::manual_async_fn)]
fn wait_for_bytes<'a, S>(
    stream: &'a mut S,
    timeout: &'a Duration,
    drain: &'a Drain,
) -> impl std::future::Future<Output = Option<Bytes>> + Send + 'a
where
    S: AsyncRead + Unpin + Send,
{
    async move {
        tokio::select! {
            read = client_io::read_some(stream) => read.ok().filter(|bytes| !bytes.is_empty()),
            _ = tokio::time::sleep(*timeout) => None,
            // Fires at the deadline too.
            _ = drain.close_idle().cancelled() => None,
        }
    }
}

async fn serve_http2<S>(protocols: &Protocols, io: ClientIo<S>, info: ConnectionInfo, proxy: Proxy)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = proxy.drain().clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let proxy = proxy.clone();
        // Boxed: a request's state then takes memory only while the request is in flight.
        // HTTP/2 clients get no early hints: hyper's server cannot send interim responses.
        Box::pin(async move {
            let mut response = proxy.handle(info, request, None).await.into_response();
            proxy.advertise_http3(info, response.headers_mut());
            Ok::<_, Infallible>(response)
        })
    });
    let connection = protocols.http2.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        outcome = connection.as_mut() => return log_end(outcome, info),
        _ = drain.started().cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        outcome = connection.as_mut() => log_end(outcome, info),
        _ = drain.deadline().cancelled() => {}
    }
}

/// How an HTTP/1.1 connection left hyper.
enum Http1End<S> {
    /// Closed, by either side or by the drain.
    Closed,
    /// Quiet since `quiet_since`: given back to be parked.
    Parked {
        connection: Idle<S>,
        quiet_since: Instant,
    },
    /// Switched protocols: given back with the target's side to relay.
    Upgraded {
        io: ClientIo<S>,
        relay: tunnel::PendingRelay,
    },
}

/// An HTTP/1.1 connection hyper gave back.
struct Idle<S> {
    io: ClientIo<S>,
    service: Http1Service,
}

/// What a parked HTTP/1.1 connection keeps: its stream and what it needs to be served again.
/// Everything else (hyper's state, the activity counters, the upgrade hand-off) is made anew
/// when its client speaks.
struct Parked<S> {
    stream: S,
    protocols: Arc<Protocols>,
    info: ConnectionInfo,
    proxy: Proxy,
    slot: ConnectionSlot,
    idle_left: Duration,
}

/// What the connection's task watches while hyper serves the connection.
struct Watch {
    activity: Arc<Activity>,
    header_read_timeout: Duration,
    drain: Drain,
    hand_off: UpgradeHandOff,
    info: ConnectionInfo,
}

async fn serve_http1<S>(
    protocols: &Arc<Protocols>,
    mut io: ClientIo<S>,
    info: ConnectionInfo,
    proxy: Proxy,
    slot: ConnectionSlot,
) where
    S: AsyncRead + AsyncWrite + Relocate + Unpin + Send + 'static,
{
    let limits = fast_http1::Limits {
        header_read_timeout: protocols.header_read_timeout,
        max_header_bytes: protocols.max_header_bytes,
        max_headers: protocols.max_headers,
    };
    if limits.allow_fast_path() {
        match without_hyper(&mut io, info, &proxy, limits).await {
            FastEnd::Closed => return,
            FastEnd::Parked { quiet_since } => {
                return park_quiet(protocols, io, info, proxy, slot, quiet_since)
            }
            FastEnd::ToHyper => {}
        }
    }
    let watch = Watch {
        activity: Arc::clone(io.activity()),
        header_read_timeout: protocols.header_read_timeout,
        drain: proxy.drain().clone(),
        hand_off: UpgradeHandOff::default(),
        info,
    };
    let service = Http1Service {
        proxy,
        info,
        activity: Arc::clone(&watch.activity),
        hand_off: watch.hand_off.clone(),
    };
    let idle = Idle { io, service };
    match with_hyper(protocols, idle, &watch).await {
        Http1End::Closed => {}
        Http1End::Upgraded { io, relay } => relay_upgrade(io, relay, &watch.drain).await,
        Http1End::Parked {
            connection,
            quiet_since,
        } => {
            let Http1Service { proxy, info, .. } = connection.service;
            park_quiet(protocols, connection.io, info, proxy, slot, quiet_since);
        }
    }
}

/// Parks a connection that has been quiet since `quiet_since`: what it holds while serving
/// is let go, and the rest waits for its client in a task of its own.
fn park_quiet<S>(
    protocols: &Arc<Protocols>,
    io: ClientIo<S>,
    info: ConnectionInfo,
    proxy: Proxy,
    slot: ConnectionSlot,
    quiet_since: Instant,
) where
    S: AsyncRead + AsyncWrite + Relocate + Unpin + Send + 'static,
{
    let (stream, replay) = io.into_parts();
    let_go();
    if !replay.is_empty() {
        // The client spoke as hyper was let go (the tick found it quiet, then a request came):
        // served at once, in a task of its own as a parked connection would be.
        let io = ClientIo::with_replay(stream, replay);
        let drain = proxy.drain().clone();
        drain.track(serve_again(Arc::clone(protocols), io, info, proxy, slot));
        return;
    }
    park(Parked {
        stream,
        protocols: Arc::clone(protocols),
        info,
        proxy,
        slot,
        idle_left: protocols.idle_timeout.saturating_sub(quiet_since.elapsed()),
    });
}

/// Moves a parked connection into a task of its own, made on the parking thread (see
/// `parking` for why), and lets the serving task end. The drain waits for the connection
/// while it is on its way.
fn park<S>(parked: Parked<S>)
where
    S: AsyncRead + AsyncWrite + Relocate + Unpin + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let drain = parked.proxy.drain().clone();
    let on_its_way = drain.hold();
    parking::run(Box::new(move || {
        let _on_its_way = on_its_way;
        let _entered = runtime.enter();
        match parked.stream.relocate() {
            Ok(stream) => drain.track_on(wait_parked(Parked { stream, ..parked }), &runtime),
            Err(error) => {
                tracing::debug!(%error, peer = %parked.info.peer, "Parking failed; connection closed");
            }
        }
    }));
}

/// Waits, holding no buffers, for a parked connection's client to speak again, and serves it.
/// The serving is boxed, so this task is no larger than a parked connection needs.
///
/// Not an `async fn`: one moves its arguments into the body, so `parked` would be held twice
/// in every parked connection's task. An `async move` block waits on it where it lies.
#[allow(clippy::manual_async_fn)]
fn wait_parked<S>(mut parked: Parked<S>) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Relocate + Unpin + Send + 'static,
{
    async move {
        let counted = CountedParked::new();
        let woken =
            wait_for_bytes(&mut parked.stream, &parked.idle_left, parked.proxy.drain()).await;
        drop(counted);
        match woken {
            Some(bytes) => {
                let io = ClientIo::with_replay(parked.stream, bytes);
                serve_again(parked.protocols, io, parked.info, parked.proxy, parked.slot).await;
            }
            None => close_quietly(&mut ClientIo::with_replay(parked.stream, Bytes::new())).await,
        }
    }
}

/// A parked connection's HTTP/1.1 serving, boxed (see [`wait_parked`]).
fn serve_again<S>(
    protocols: Arc<Protocols>,
    io: ClientIo<S>,
    info: ConnectionInfo,
    proxy: Proxy,
    slot: ConnectionSlot,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>>
where
    S: AsyncRead + AsyncWrite + Relocate + Unpin + Send + 'static,
{
    Box::pin(async move { serve_http1(&protocols, io, info, proxy, slot).await })
}

// The three functions below are not `async`: what they start is boxed, so that hyper's state
// (about 2 KB) and a relay's are allocated only while in use, instead of being reserved in
// every connection's task, parked ones included.

/// Serves the connection's simple requests without hyper (see `fast_http1`).
fn without_hyper<'a, S>(
    io: &'a mut ClientIo<S>,
    info: ConnectionInfo,
    proxy: &'a Proxy,
    limits: fast_http1::Limits,
) -> Pin<Box<dyn std::future::Future<Output = FastEnd> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(fast_http1::serve(io, info, proxy, limits, PARK_AFTER_QUIET))
}

/// Serves the connection with hyper until it closes, parks or upgrades.
fn with_hyper<'a, S>(
    protocols: &Protocols,
    idle: Idle<S>,
    watch: &'a Watch,
) -> Pin<Box<dyn std::future::Future<Output = Http1End<S>> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = protocols
        .http1
        .serve_connection(TokioIo::new(idle.io), idle.service);
    Box::pin(drive_http1(connection, watch))
}

fn relay_upgrade<'a, S>(
    io: ClientIo<S>,
    relay: tunnel::PendingRelay,
    drain: &Drain,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(tunnel::relay(io, relay, drain.deadline().clone()))
}

/// The service hyper calls for each HTTP/1.1 request: it counts the request in `activity`
/// until hyper has sent its whole response, and leaves `hand_off` on upgrade requests.
struct Http1Service {
    proxy: Proxy,
    info: ConnectionInfo,
    activity: Arc<Activity>,
    hand_off: UpgradeHandOff,
}

type Http1Future =
    Pin<Box<dyn std::future::Future<Output = Result<Response<ServedBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Http1Service {
    type Response = Response<ServedBody>;
    type Error = Infallible;
    type Future = Http1Future;

    fn call(&self, mut request: Request<Incoming>) -> Http1Future {
        let guard = self.activity.request_started();
        if request.headers().contains_key(hyper::header::UPGRADE) {
            request.extensions_mut().insert(self.hand_off.clone());
        }

        let (proxy, info) = (self.proxy.clone(), self.info);
        // HTTP/1.0 clients are sent no interim responses (RFC 9110 section 15.2).
        let hints = (request.version() == hyper::Version::HTTP_11)
            .then(|| InterimResponses::new(Arc::clone(&self.activity)));
        // Boxed: a request's state then takes memory only while the request is in flight,
        // instead of being reserved inside every connection's task, idle ones included.
        Box::pin(async move {
            let mut response = proxy.handle(info, request, hints).await;
            add_connection_headers(&proxy, info, &mut response);
            let response = response.into_response();
            Ok(response.map(|body| ServedBody {
                body,
                _guard: guard,
            }))
        })
    }
}

/// The fields an HTTP/1.1 response gets from its connection rather than from the pipeline,
/// on either path: `Alt-Svc` when HTTP/3 is served, and while the process drains,
/// `Connection: close`, which takes the client to the process that is taking over.
pub(crate) fn add_connection_headers(
    proxy: &Proxy,
    info: ConnectionInfo,
    response: &mut Answer<ProxyBody>,
) {
    // Both go after the app's fields, which hold neither.
    proxy.advertise_http3(info, response.map_mut());
    if proxy.drain().is_started() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .map_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Runs hyper on the connection until it ends, parks or upgrades.
async fn drive_http1<S>(
    mut connection: http1::Connection<TokioIo<ClientIo<S>>, Http1Service>,
    watch: &Watch,
) -> Http1End<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Watch {
        activity,
        header_read_timeout,
        drain,
        hand_off,
        info,
    } = watch;
    enum Event {
        Ended(hyper::Result<()>),
        Tick,
        DrainStarted,
        CloseIdle,
        DrainDeadline,
    }
    let mut ticks = tokio::time::interval_at(Instant::now() + PARK_AFTER_QUIET, PARK_AFTER_QUIET);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = QuietWatch::new(activity);
    let mut parking = false;
    let mut draining = drain.is_started();
    let mut closing = false;
    // Made once: hyper wakes this task several times per request, and a fresh one would
    // register with the drain each time, while this one registers once (see `Signal`).
    let drain_started = drain.started().cancelled();
    tokio::pin!(drain_started);
    let ended = loop {
        // `biased`: hyper is polled first, so a tick is handled only while hyper is waiting,
        // never while it holds a finished response it has not yet reported.
        let event = tokio::select! {
            biased;
            ended = poll_fn(|cx| connection.poll_without_shutdown(cx)) => Event::Ended(ended),
            _ = ticks.tick(), if !parking && !draining => Event::Tick,
            _ = &mut drain_started, if !draining => Event::DrainStarted,
            _ = drain.close_idle().cancelled(), if draining && !closing => Event::CloseIdle,
            _ = drain.deadline().cancelled(), if draining => Event::DrainDeadline,
        };
        match event {
            Event::Ended(ended) => break ended,
            Event::Tick => {
                let head_begun = activity.head_begun();
                let idle = activity.is_idle() && !head_begun;
                match quiet.tick(activity, head_begun, idle, *header_read_timeout) {
                    Tick::HeadTooSlow => {
                        tracing::debug!(peer = %info.peer, "No complete request head in time; closing the connection");
                        return Http1End::Closed;
                    }
                    Tick::Quiet => {
                        // Idle: hyper closes its side at once, without writing anything.
                        Pin::new(&mut connection).graceful_shutdown();
                        parking = true;
                    }
                    Tick::Busy => {}
                }
            }
            Event::DrainStarted => draining = true,
            Event::CloseIdle => {
                Pin::new(&mut connection).graceful_shutdown();
                closing = true;
            }
            Event::DrainDeadline if !closing => {
                // A client still here when the drain time is up was told nothing it could
                // act on; logged so that a request cut here can be told apart.
                tracing::info!(
                    peer = %info.peer,
                    request_in_flight = !activity.is_idle(),
                    requests = activity.requests(),
                    "Drain time is up; closing a client connection"
                );
                Pin::new(&mut connection).graceful_shutdown();
                closing = true;
            }
            Event::DrainDeadline => return Http1End::Closed,
        }
    };
    if let Err(error) = ended {
        tracing::debug!(%error, peer = %info.peer, "Connection ended with an error");
        return Http1End::Closed;
    }
    let parts = connection.into_parts();
    let mut io = parts.io.into_inner();
    io.unread(parts.read_buf);
    if let Some(relay) = hand_off.take() {
        return Http1End::Upgraded { io, relay };
    }
    if parking && !closing {
        return Http1End::Parked {
            connection: Idle {
                io,
                service: parts.service,
            },
            quiet_since: quiet.since(),
        };
    }
    close_quietly(&mut io).await;
    Http1End::Closed
}

/// What a connection's one-second tick found, on either HTTP/1.1 path.
pub(crate) enum Tick {
    /// A request head has taken longer than the header read timeout: close.
    HeadTooSlow,
    /// Nothing has moved since the last tick and nothing is under way: park.
    Quiet,
    Busy,
}

/// What the one-second tick remembers between ticks: the activity it last saw, since when
/// the connection has been quiet, and when it first saw the current head begun.
pub(crate) struct QuietWatch {
    events_seen: u64,
    quiet_since: Instant,
    head_seen: Option<(u64, Instant)>,
}

impl QuietWatch {
    pub(crate) fn new(activity: &Activity) -> Self {
        Self {
            events_seen: activity.events(),
            quiet_since: Instant::now(),
            head_seen: None,
        }
    }

    /// `head_begun`: a request head has begun and is not yet complete; `idle`: no request in
    /// flight, no write waiting and no head begun. (Each path tells these its own way.)
    pub(crate) fn tick(
        &mut self,
        activity: &Activity,
        head_begun: bool,
        idle: bool,
        header_read_timeout: Duration,
    ) -> Tick {
        if head_read_too_long(
            head_begun,
            activity.requests(),
            &mut self.head_seen,
            header_read_timeout,
        ) {
            return Tick::HeadTooSlow;
        }
        let events = activity.events();
        if events != self.events_seen {
            self.events_seen = events;
            self.quiet_since = Instant::now();
            Tick::Busy
        } else if idle {
            Tick::Quiet
        } else {
            Tick::Busy
        }
    }

    /// Since when nothing has moved, as of the last tick.
    pub(crate) fn since(&self) -> Instant {
        self.quiet_since
    }
}

/// The header read timeout, kept by the connection's one-second tick instead of by hyper: its
/// timer cost a boxed sleep and a timer-wheel entry per request, about 1,300 instructions of
/// ~41,000. Whether the current head has been under way for longer than `timeout` since a
/// tick first saw it begun (`head_seen`, with the request count then): so it must be complete
/// within the timeout and a tick more after its first bytes.
fn head_read_too_long(
    head_begun: bool,
    requests: u64,
    head_seen: &mut Option<(u64, Instant)>,
    timeout: Duration,
) -> bool {
    if !head_begun {
        *head_seen = None;
        return false;
    }
    match *head_seen {
        Some((seen_at_request, since)) if seen_at_request == requests => since.elapsed() >= timeout,
        _ => {
            *head_seen = Some((requests, Instant::now()));
            false
        }
    }
}

/// Ends the connection with a FIN (or TLS close_notify), as hyper would have.
pub(crate) async fn close_quietly<S>(io: &mut ClientIo<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}

fn log_end(outcome: Result<(), hyper::Error>, info: ConnectionInfo) {
    if let Err(error) = outcome {
        tracing::debug!(%error, peer = %info.peer, "Connection ended with an error");
    }
}

/// A response body that keeps its request counted as in flight until hyper is done with it.
pub struct ServedBody {
    body: ProxyBody,
    _guard: RequestGuard,
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's task is sized for its largest state; what hyper holds while serving
    /// is boxed so that a parked connection's task stays small. Guards against a change that
    /// puts hyper's state (or a `Proxy` by value) back inline.
    #[test]
    fn a_connection_task_stays_small() {
        let protocols = Protocols {
            http1: http1::Builder::new(),
            http2: http2::Builder::new(TokioExecutor::new()),
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
            max_headers: 100,
        };
        let proxy = Proxy::for_tests();
        let info = ConnectionInfo {
            peer: ([127, 0, 0, 1], 1).into(),
            local_port: 80,
            tls: false,
        };
        let (stream, _peer) = tokio::io::duplex(64);
        let protocols = Arc::new(protocols);
        let task = serve(&protocols, stream, info, proxy, ConnectionSlot::new(None));
        let size = std::mem::size_of_val(&task);
        assert!(size < 2048, "a connection's future takes {size} bytes");
    }

    /// A parked connection's task is what an idle connection costs (with its socket's
    /// registration): guards against serving state creeping into it unboxed.
    #[test]
    fn a_parked_connection_task_stays_small() {
        let protocols = Arc::new(Protocols {
            http1: http1::Builder::new(),
            http2: http2::Builder::new(TokioExecutor::new()),
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
            max_headers: 100,
        });
        let parked = Parked {
            stream: tokio::io::duplex(64).0,
            protocols,
            info: ConnectionInfo {
                peer: ([127, 0, 0, 1], 1).into(),
                local_port: 80,
                tls: false,
            },
            proxy: Proxy::for_tests(),
            slot: ConnectionSlot::new(None),
            idle_left: Duration::from_secs(1),
        };
        let task = wait_parked(parked);
        let size = std::mem::size_of_val(&task);
        // With a TcpStream (16 bytes larger than this test's stream in a release build) the
        // future is 400 bytes. tokio puts about 110 bytes around it and rounds the task up to
        // 128: at 400 it is a 512-byte allocation, a few bytes more make it 640, and an idle
        // connection then holds about 1.2 KB instead of 1 KB (benches/memory.sh).
        assert!(
            size <= 384,
            "a parked connection's future takes {size} bytes"
        );
    }
}
