//! HTTP/1.1 without hyper, for the requests most traffic is made of.
//!
//! Nearly every request on a keep-alive connection is alike: a well-formed HTTP/1.1 head in
//! origin form, with no body. Those are served here, from one read buffer into the pipeline
//! and back out in one write, which skips hyper's dispatch machinery (about a quarter of the
//! proxy's instructions per request). Anything else (a body, an upgrade, `Expect`, HTTP/1.0,
//! a malformed or oversized head, a client that closes mid-head) is handed to hyper as it
//! came: the bytes read so far are put back in front of the stream, and hyper serves the
//! connection from there with its own checks and error answers.
//!
//! The connection's housekeeping is the same as under hyper (see `connection`): a one-second
//! tick parks the connection when quiet and holds a begun head to the header read timeout;
//! while the process drains, responses carry `Connection: close`, idle connections close when
//! asked to, and whatever is left is cut at the drain's deadline.
//!
//! Responses are framed as hyper frames them (the same status line, lower-case names,
//! `content-length` or chunked, a `date` when the app sent none), so a client cannot tell
//! which of the two served it.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::Empty;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::answer::{Answer, Known};
use crate::body::ProxyBody;
use crate::client_io::{Activity, ClientIo, InterimResponses};
use crate::connection::{add_connection_headers, close_quietly, QuietWatch, Tick};
use crate::headers;
use crate::pipeline::{ConnectionInfo, Proxy};

/// hyper's default limit on header fields, and so the most this module parses. A
/// configuration that allows more leaves every connection to hyper.
pub const MAX_HEADERS: usize = crate::listener::DEFAULT_MAX_HEADERS;

/// hyper's limit on a request target; longer ones get its `414`.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// The read buffer's size, as hyper's: one read takes in most request heads whole.
const READ_BUFFER: usize = 8 * 1024;

/// Below this much free room, the read buffer is grown (or reclaimed) before a read.
const MIN_READ_ROOM: usize = 1024;

/// Body data up to this size is copied behind the response head and sent in the same write;
/// larger frames are written as they are.
const COPY_BODY_UP_TO: usize = 16 * 1024;

/// What bounds a request head, as the listener was configured.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl Limits {
    /// Whether these limits leave room for this module at all (see [`MAX_HEADERS`]).
    pub fn allow_fast_path(&self) -> bool {
        self.max_headers <= MAX_HEADERS
    }
}

/// How a connection left this module.
pub enum FastEnd {
    /// Closed, by either side, by the drain, or on an error.
    Closed,
    /// Quiet since `quiet_since`, with nothing read: to be parked.
    Parked { quiet_since: Instant },
    /// Its next request is not one this module serves: hyper's from here, with the bytes
    /// read so far put back in front of the stream.
    ToHyper,
}

/// Serves the connection's simple requests until it closes, goes quiet, or sends something
/// that is hyper's to serve.
pub async fn serve<S>(
    io: &mut ClientIo<S>,
    info: ConnectionInfo,
    proxy: &Proxy,
    limits: Limits,
    park_after_quiet: Duration,
) -> FastEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    enum Event {
        Read(io::Result<usize>),
        Tick,
        DrainStarted,
        CloseIdle,
        DrainDeadline,
    }
    let activity = Arc::clone(io.activity());
    let drain = proxy.drain();
    let mut read_buf = BytesMut::with_capacity(READ_BUFFER);
    let mut write_buf = Vec::new();
    let mut ticks = tokio::time::interval_at(Instant::now() + park_after_quiet, park_after_quiet);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = QuietWatch::new(&activity);
    let mut draining = drain.is_started();
    let drain_started = drain.started().cancelled();
    tokio::pin!(drain_started);
    loop {
        while !read_buf.is_empty() {
            let (request, close_asked) = match parse_head(&mut read_buf, limits) {
                Head::Simple {
                    request,
                    close_asked,
                } => (request, close_asked),
                Head::Partial => break,
                Head::NotSimple => {
                    io.unread(read_buf.freeze());
                    return FastEnd::ToHyper;
                }
            };
            let outcome = {
                // Pinned where it is made: `tokio::pin!` would copy the whole state once more.
                let mut exchange = std::pin::pin!(exchange(
                    io,
                    &mut read_buf,
                    &mut write_buf,
                    info,
                    proxy,
                    &activity,
                    request,
                    close_asked,
                ));
                'exchange: loop {
                    tokio::select! {
                        biased;
                        outcome = &mut exchange => break 'exchange outcome,
                        _ = &mut drain_started, if !draining => draining = true,
                        _ = drain.deadline().cancelled(), if draining => {
                            // As under hyper: a client still here when the drain time is up was
                            // told nothing it could act on; logged so a cut request can be told apart.
                            tracing::info!(
                                peer = %info.peer,
                                request_in_flight = true,
                                requests = activity.requests(),
                                "Drain time is up; closing a client connection"
                            );
                            return FastEnd::Closed;
                        }
                    }
                }
            };
            match outcome {
                Ok(Next::KeepAlive) => {}
                Ok(Next::Close) => {
                    close_quietly(io).await;
                    return FastEnd::Closed;
                }
                Err(error) => {
                    tracing::debug!(%error, peer = %info.peer, "Connection ended with an error");
                    return FastEnd::Closed;
                }
            }
        }
        if read_buf.capacity() - read_buf.len() < MIN_READ_ROOM {
            read_buf.reserve(READ_BUFFER);
        }
        let idle = read_buf.is_empty();
        let event = tokio::select! {
            biased;
            read = io.read_buf(&mut read_buf) => Event::Read(read),
            _ = ticks.tick(), if !draining => Event::Tick,
            _ = &mut drain_started, if !draining => Event::DrainStarted,
            _ = drain.close_idle().cancelled(), if draining && idle => Event::CloseIdle,
            _ = drain.deadline().cancelled(), if draining => Event::DrainDeadline,
        };
        match event {
            Event::Read(Ok(0)) if idle => {
                close_quietly(io).await;
                return FastEnd::Closed;
            }
            Event::Read(Ok(0)) => {
                // Closed mid-head: hyper decides what such a client is told.
                io.unread(read_buf.freeze());
                return FastEnd::ToHyper;
            }
            Event::Read(Ok(_)) => {}
            Event::Read(Err(error)) => {
                tracing::debug!(%error, peer = %info.peer, "Connection ended with an error");
                return FastEnd::Closed;
            }
            // Bytes held unparsed are a head begun, whenever they arrived; between requests
            // nothing is in flight or waiting to be written.
            Event::Tick => match quiet.tick(&activity, !idle, idle, limits.header_read_timeout) {
                Tick::HeadTooSlow => {
                    tracing::debug!(peer = %info.peer, "No complete request head in time; closing the connection");
                    return FastEnd::Closed;
                }
                Tick::Quiet => {
                    return FastEnd::Parked {
                        quiet_since: quiet.since(),
                    }
                }
                Tick::Busy => {}
            },
            Event::DrainStarted => draining = true,
            Event::CloseIdle => {
                close_quietly(io).await;
                return FastEnd::Closed;
            }
            Event::DrainDeadline => {
                if !idle {
                    tracing::info!(
                        peer = %info.peer,
                        request_in_flight = false,
                        requests = activity.requests(),
                        "Drain time is up; closing a client connection"
                    );
                }
                return FastEnd::Closed;
            }
        }
    }
}

/// A request head as this module sees it. Not boxed: it is returned once per request, and
/// moved straight into the pipeline.
#[allow(clippy::large_enum_variant)]
enum Head {
    /// Complete and simple: the request, and whether its client asked to close after it.
    Simple {
        request: Request<Empty<Bytes>>,
        close_asked: bool,
    },
    /// Incomplete, with room left under the limit.
    Partial,
    /// Anything else: hyper's to serve, or to refuse.
    NotSimple,
}

/// Takes a complete, simple request head off the front of `read_buf`. Header values are
/// views of the buffer, not copies, as under hyper.
fn parse_head(read_buf: &mut BytesMut, limits: Limits) -> Head {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let slots = &mut slots[..limits.max_headers.min(MAX_HEADERS)];
    let mut parsed = httparse::Request::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        read_buf,
        slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read_buf.len() < limits.max_header_bytes => {
            return Head::Partial
        }
        _ => return Head::NotSimple,
    };
    if head_len > limits.max_header_bytes || parsed.version != Some(1) {
        return Head::NotSimple;
    }
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return Head::NotSimple;
    };
    if !path.starts_with('/') || path.len() > MAX_URI_LEN {
        return Head::NotSimple;
    }
    let method = match Method::from_bytes(method.as_bytes()) {
        Ok(method) if method != Method::CONNECT => method,
        _ => return Head::NotSimple,
    };
    let base = read_buf.as_ptr() as usize;
    let path_start = path.as_ptr() as usize - base;
    let path_range = path_start..path_start + path.len();

    // The head's bytes are frozen once, and every value and the target are views of them.
    let mut close_asked = false;
    let mut names: [MaybeUninit<(HeaderName, usize, usize)>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut count = 0;
    for field in parsed.headers.iter() {
        let name = match headers::common_name(field.name.as_bytes()) {
            Some(name) => name,
            None => match HeaderName::from_bytes(field.name.as_bytes()) {
                Ok(name) => name,
                Err(_) => {
                    drop_names(&mut names[..count]);
                    return Head::NotSimple;
                }
            },
        };
        // A body, an upgrade, an expectation, or trailers asked for: hyper's to serve.
        let not_simple = name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
            || name == header::TE;
        if not_simple {
            drop_names(&mut names[..count]);
            return Head::NotSimple;
        }
        if name == header::CONNECTION && has_close(field.value) {
            close_asked = true;
        }
        let start = field.value.as_ptr() as usize - base;
        names[count].write((name, start, start + field.value.len()));
        count += 1;
    }
    let head = read_buf.split_to(head_len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for slot in &names[..count] {
        // SAFETY: the first `count` slots were written above and are each read once.
        let (name, start, end) = unsafe { slot.assume_init_read() };
        // SAFETY: httparse accepted the value: visible ASCII, spaces, tabs and obs-text,
        // which is exactly what hyper hands on unchecked too.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(start..end)) };
        headers.append(name, value);
    }
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_range)) else {
        // A target httparse takes and `Uri` refuses (`<`, a backtick): hyper refuses it too,
        // with a 400, once the head is back in front of whatever followed it.
        let mut restored = BytesMut::with_capacity(head.len() + read_buf.len());
        restored.extend_from_slice(&head);
        restored.extend_from_slice(read_buf);
        *read_buf = restored;
        return Head::NotSimple;
    };
    let mut request = Request::new(Empty::new());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Head::Simple {
        request,
        close_asked,
    }
}

/// Drops header names parsed before the head turned out not to be simple.
fn drop_names(names: &mut [MaybeUninit<(HeaderName, usize, usize)>]) {
    for slot in names {
        // SAFETY: called with exactly the slots written so far, each dropped once.
        unsafe { slot.assume_init_drop() };
    }
}

/// Whether a `Connection` value lists `close`.
fn has_close(value: &[u8]) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// What follows a response on its connection.
enum Next {
    KeepAlive,
    Close,
}

/// Serves one request: the pipeline's answer, framed and written. A client that closes its
/// side before its answer is written abandons the request, as under hyper: the pipeline is
/// dropped, and logs a 499.
///
/// A function returning an `async` block rather than an `async fn`, which would hold its
/// arguments (the request among them) twice in its state, copied as the state moves.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn exchange<'a, S>(
    io: &'a mut ClientIo<S>,
    read_buf: &'a mut BytesMut,
    write_buf: &'a mut Vec<u8>,
    info: ConnectionInfo,
    proxy: &'a Proxy,
    activity: &'a Arc<Activity>,
    request: Request<Empty<Bytes>>,
    close_asked: bool,
) -> impl Future<Output = io::Result<Next>> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let _guard = activity.request_started();
        let method = request.method().clone();
        let hints = InterimResponses::new(Arc::clone(activity));
        let handled = proxy.handle(info, request, Some(hints));
        // Awaited as one future made in place: a pipeline pinned in this block would take
        // room of its own beside the response's writing, and be copied once more.
        let mut response = Answering {
            io: &mut *io,
            read_buf: &mut *read_buf,
            handled,
        }
        .await?;
        add_connection_headers(proxy, info, &mut response);
        write_response(io, read_buf, write_buf, &method, response, close_asked).await
    }
}

pin_project_lite::pin_project! {
    /// The pipeline's answer to come. While the pipeline works, interim responses it queues
    /// are written as they come (flushing the stream writes them, and registers the task to
    /// be woken for the next), and the client is watched for closing.
    struct Answering<'a, S, F> {
        io: &'a mut ClientIo<S>,
        read_buf: &'a mut BytesMut,
        #[pin]
        handled: F,
    }
}

impl<S, F> Future for Answering<'_, S, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future,
{
    type Output = io::Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(Err(error)) = Pin::new(&mut **this.io).poll_flush(cx) {
            return Poll::Ready(Err(error));
        }
        if let Some(gone) = poll_client_gone(this.io, this.read_buf, cx) {
            return Poll::Ready(Err(gone));
        }
        this.handled.poll(cx).map(Ok)
    }
}

/// Watches the client while it waits for its answer: bytes it sends (its next request) are
/// kept, and watching stops there, as under hyper; `Some` once it has closed or failed.
fn poll_client_gone<S>(
    io: &mut ClientIo<S>,
    read_buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> Option<io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !read_buf.is_empty() {
        return None;
    }
    // Any room will do to see a close. Growing the buffer here would allocate a new one:
    // the request's head, a view of the current one, is still alive.
    if read_buf.capacity() == 0 {
        read_buf.reserve(MIN_READ_ROOM);
    }
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, read_buf) {
        Poll::Ready(Ok(0)) => Some(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the client closed its connection before its answer",
        )),
        Poll::Ready(Ok(_)) | Poll::Pending => None,
        Poll::Ready(Err(error)) => Some(error),
    }
}

/// How a response body is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// Nothing after the head: HEAD, 204, 304, or an empty body.
    Bodiless,
    Length(u64),
    Chunked,
}

/// Writes the response's head and body, as hyper would have.
async fn write_response<S>(
    io: &mut ClientIo<S>,
    read_buf: &mut BytesMut,
    out: &mut Vec<u8>,
    method: &Method,
    response: Answer<ProxyBody>,
    close_asked: bool,
) -> io::Result<Next>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (head, mut body) = response.into_head_and_body();
    out.clear();
    let (framing, close_after) = encode_head(out, &head, &body, method, close_asked);
    // The head's fields may share the target's buffer: let it go before the body is awaited.
    drop(head);
    let mut written: u64 = 0;
    if framing != Framing::Bodiless {
        loop {
            // Whatever is ready joins the head in one write; a frame not yet arrived sends
            // what is held first, so the client never waits on it.
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending if !out.is_empty() => {
                    io.write_all(out).await?;
                    io.flush().await?;
                    out.clear();
                    continue;
                }
                Poll::Pending => {
                    poll_fn(|cx| {
                        if let Some(gone) = poll_client_gone(io, read_buf, cx) {
                            return Poll::Ready(Some(Err(gone.into())));
                        }
                        Pin::new(&mut body).poll_frame(cx)
                    })
                    .await
                }
            };
            let data = match frame {
                None => break,
                Some(Err(error)) => return Err(io::Error::other(error)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: HTTP/1.1 clients are sent none, as under hyper.
                    Err(_) => continue,
                },
            };
            if data.is_empty() {
                continue;
            }
            written += data.len() as u64;
            if let Framing::Length(length) = framing {
                if written > length {
                    return Err(io::Error::other("response body longer than its length"));
                }
            }
            if framing == Framing::Chunked {
                write_chunk_size(out, data.len());
            }
            if data.len() <= COPY_BODY_UP_TO {
                out.extend_from_slice(&data);
            } else {
                io.write_all(out).await?;
                out.clear();
                io.write_all(&data).await?;
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
        match framing {
            Framing::Length(length) if written != length => {
                return Err(io::Error::other("response body shorter than its length"));
            }
            Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            _ => {}
        }
    }
    // The body is done with (and its request logged) before the last write, as under hyper.
    drop(body);
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    io.flush().await?;
    Ok(if close_after {
        Next::Close
    } else {
        Next::KeepAlive
    })
}

/// Writes the status line and header fields, and says how the body is framed and whether
/// the connection closes after it. The rules are hyper's (`proto::h1::role::Server::encode`).
/// The target's fields, when passed on as received, go first, as it spelled them.
fn encode_head(
    out: &mut Vec<u8>,
    head: &Answer<()>,
    body: &ProxyBody,
    method: &Method,
    close_asked: bool,
) -> (Framing, bool) {
    let (status, map) = (head.status(), head.map());
    crate::answer::write_status_line(out, status);
    let is_head = *method == Method::HEAD;
    let bodiless_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let ended = body.is_end_stream();
    let exact = body.size_hint().exact();

    let mut length: Option<u64> = None;
    // Whether a Content-Length field is written as it is: the first one, when a body follows
    // (or for HEAD, which declares the length of the body it leaves out).
    let mut keep_length = |value: &[u8]| {
        if length.is_some() || (ended && !is_head) {
            // No body: an implicit length is written below.
            return false;
        }
        length = match exact {
            Some(exact) if !ended => Some(exact),
            _ => headers::plain_length(value),
        };
        length.is_some()
    };
    let mut close_after = close_asked;
    let mut close_written = false;
    let mut date_written = false;
    if let Some(received) = head.received() {
        received.write_http1(out, |known, value| match known {
            Known::ContentLength => keep_length(value),
            Known::Date => {
                date_written = true;
                true
            }
            Known::ContentType | Known::Other => true,
        });
    }
    for (name, value) in map {
        let keep = match *name {
            header::CONTENT_LENGTH => keep_length(value.as_bytes()),
            // Framing is this module's to choose; the pipeline leaves none of its own.
            header::TRANSFER_ENCODING => false,
            header::CONNECTION if has_close(value.as_bytes()) => {
                close_after = true;
                close_written = true;
                true
            }
            header::DATE => {
                date_written = true;
                true
            }
            _ => true,
        };
        if keep {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    let framing = if ended {
        if length.is_none() && !is_head && !bodiless_status {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Bodiless
    } else {
        let framing = match (length, exact) {
            (Some(length), _) => Framing::Length(length),
            (None, Some(exact)) => {
                if !bodiless_status {
                    write_length(out, exact);
                }
                Framing::Length(exact)
            }
            (None, None) if is_head || bodiless_status => {
                // hyper sends such a response close-delimited: with no body, that only
                // means the connection closes after it.
                close_after = true;
                Framing::Bodiless
            }
            (None, None) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        };
        if is_head || bodiless_status {
            Framing::Bodiless
        } else {
            framing
        }
    };
    if close_after && !close_written {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !date_written {
        write_date(out);
    }
    out.extend_from_slice(b"\r\n");
    (framing, close_after)
}

fn write_length(out: &mut Vec<u8>, length: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn write_chunk_size(out: &mut Vec<u8>, size: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = size;
    loop {
        at -= 1;
        digits[at] = b"0123456789ABCDEF"[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends `date: <now>`, formatted once a second per thread, as hyper caches it.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == cached.1.len() {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = second;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&cached.1);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Response;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(1),
            max_header_bytes: 8 * 1024,
            max_headers: MAX_HEADERS,
        }
    }

    fn parse(text: &str) -> Head {
        parse_head(&mut BytesMut::from(text), limits())
    }

    #[test]
    fn a_plain_get_is_simple() {
        let mut buf = BytesMut::from(
            "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Thing: one\r\nx-thing: two\r\n\r\nGET /next",
        );
        let Head::Simple {
            request,
            close_asked,
        } = parse_head(&mut buf, limits())
        else {
            panic!("not simple");
        };
        assert!(!close_asked);
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a?b=1");
        assert_eq!(request.headers()["host"], "example.com");
        let things: Vec<_> = request.headers().get_all("x-thing").iter().collect();
        assert_eq!(things, ["one", "two"]);
        assert_eq!(
            &buf[..],
            b"GET /next",
            "the next request stays in the buffer"
        );
    }

    #[test]
    fn connection_close_is_noticed() {
        let Head::Simple { close_asked, .. } =
            parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n")
        else {
            panic!("not simple");
        };
        assert!(close_asked);
    }

    #[test]
    fn anything_unusual_is_left_to_hyper() {
        for text in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n bad fold\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a<b> HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a`b HTTP/1.1\r\nHost: a\r\nX-Thing: one\r\n\r\n",
        ] {
            // hyper reads the head from the start: every byte stays in the buffer.
            let sent = format!("{text}GET /next");
            let mut buf = BytesMut::from(sent.as_str());
            assert!(
                matches!(parse_head(&mut buf, limits()), Head::NotSimple),
                "{text:?} should be hyper's"
            );
            assert_eq!(&buf[..], sent.as_bytes(), "{text:?} was not put back whole");
        }
    }

    #[test]
    fn a_partial_head_waits_until_the_limit() {
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: a\r\n"),
            Head::Partial
        ));
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert!(matches!(parse(&long), Head::NotSimple));
    }

    #[test]
    fn too_many_headers_are_left_to_hyper() {
        let mut text = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            text.push_str(&format!("x-{i}: v\r\n"));
        }
        text.push_str("\r\n");
        assert!(matches!(parse(&text), Head::NotSimple));
    }

    fn head_of(
        response: impl Into<Answer<ProxyBody>>,
        method: Method,
        close_asked: bool,
    ) -> (String, Framing, bool) {
        let (head, body) = response.into().into_head_and_body();
        let mut out = Vec::new();
        let (framing, close) = encode_head(&mut out, &head, &body, &method, close_asked);
        (String::from_utf8(out).unwrap(), framing, close)
    }

    fn without_date(head: &str) -> String {
        head.lines()
            .filter(|line| !line.starts_with("date: "))
            .map(|line| format!("{line}\r\n"))
            .collect()
    }

    #[test]
    fn heads_are_framed_as_hyper_frames_them() {
        let (head, framing, close) = head_of(
            Response::new(crate::body::full("hello")),
            Method::GET,
            false,
        );
        assert_eq!(
            without_date(&head),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!((framing, close), (Framing::Length(5), false));
        assert!(head.contains("\r\ndate: ") && head.ends_with(" GMT\r\n\r\n"));

        let mut response = Response::new(crate::body::empty());
        *response.status_mut() = StatusCode::NOT_FOUND;
        let (head, framing, _) = head_of(response, Method::GET, true);
        assert_eq!(
            without_date(&head),
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(framing, Framing::Bodiless);

        let mut response = Response::new(crate::body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("10"));
        let (head, ..) = head_of(response, Method::GET, false);
        assert_eq!(without_date(&head), "HTTP/1.1 304 Not Modified\r\n\r\n");

        // A HEAD response keeps the length the app gave.
        let mut response = Response::new(crate::body::empty());
        response
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("10"));
        let (head, framing, _) = head_of(response, Method::HEAD, false);
        assert_eq!(
            without_date(&head),
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
        );
        assert_eq!(framing, Framing::Bodiless);

        let mut response = Response::new(crate::body::empty());
        *response.status_mut() = StatusCode::from_u16(599).unwrap();
        let (head, ..) = head_of(response, Method::GET, false);
        assert!(head.starts_with("HTTP/1.1 599 status code 599\r\n"));
    }

    #[test]
    fn received_fields_go_first_as_the_target_spelled_them() {
        use crate::answer::ReceivedFields;
        let received =
            || ReceivedFields::from_lines("Server: app\r\nContent-Length: 5\r\nDate: today\r\n");
        let mut answer =
            Answer::with_received(Response::new(crate::body::full("hello")), received());
        answer
            .map_mut()
            .append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        let (head, framing, close) = head_of(answer, Method::GET, false);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nServer: app\r\nContent-Length: 5\r\nDate: today\r\n\
             set-cookie: a=1\r\n\r\n"
        );
        assert_eq!((framing, close), (Framing::Length(5), false));

        // The rules for the length are the map's: left out with no body, kept for HEAD.
        let bodiless = Answer::with_received(Response::new(crate::body::empty()), received());
        let (head, ..) = head_of(bodiless, Method::GET, false);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nServer: app\r\nDate: today\r\ncontent-length: 0\r\n\r\n"
        );
        let bodiless = Answer::with_received(Response::new(crate::body::empty()), received());
        let (head, framing, _) = head_of(bodiless, Method::HEAD, false);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nServer: app\r\nContent-Length: 5\r\nDate: today\r\n\r\n"
        );
        assert_eq!(framing, Framing::Bodiless);
    }

    #[test]
    fn a_body_of_unknown_length_is_chunked() {
        let frames = futures_util::stream::iter([Ok::<_, crate::body::BoxError>(
            http_body::Frame::data(Bytes::from_static(b"x")),
        )]);
        let body = crate::body::boxed(http_body_util::StreamBody::new(frames));
        let (head, framing, _) = head_of(Response::new(body), Method::GET, false);
        assert_eq!(
            without_date(&head),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);
    }

    #[test]
    fn chunk_sizes_are_hex() {
        let mut out = Vec::new();
        write_chunk_size(&mut out, 0x1a2b);
        write_chunk_size(&mut out, 0);
        assert_eq!(out, b"1A2B\r\n0\r\n");
    }
}
