//! The lean HTTP/1.1 exchange for requests whose body is whole: the request goes out in one
//! write, the response head is parsed with `httparse` straight from the socket, and the body
//! is read by the task that forwards it. No connection task, no channels: about a third of
//! hyper's client cost for a small request. A body that is in the buffer with its head (most
//! small responses) is handed on as one piece, so the client gets head and body in one write.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::uri::Uri;
use http::Version;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::{ChunkedDecoder, Decoded};
use super::pool::ConnectionPool;
use super::Received;
use super::TCP_KEEPALIVE;
use crate::answer::{Answer, Known, ReceivedFields};
use crate::body;
use crate::client_io::InterimResponses;
use crate::headers::AddedHeaders;

/// Largest response head accepted from a target: Go's transport allows 10 MiB, so an app
/// that worked behind kamal-proxy works here.
const MAX_HEAD: usize = 10 << 20;
/// Header fields parsed without allocating; a head with more is parsed again with room
/// for every line it has (Go sets no limit on their number).
const MAX_HEADERS: usize = 128;
/// The most fields a response head may have.
const MOST_HEADERS: usize = 16 * 1024;
/// How much is read from the target at a time.
const READ_SIZE: usize = 16 * 1024;
/// Bodies up to this size are sent in the same write as the request head.
const INLINE_BODY: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("request has no target address")]
    NoTarget,
    #[error("target closed the connection before responding")]
    ClosedBeforeResponse,
    #[error("invalid response from target: {0}")]
    InvalidResponse(&'static str),
}

pub struct Http1Client {
    pool: Arc<ConnectionPool>,
    connect_timeout: Duration,
}

/// Why an exchange failed, and whether trying again on another connection is safe.
struct Failed {
    error: UpstreamError,
    /// Nothing came back: the target may have closed a pooled connection as we sent.
    nothing_received: bool,
    /// The request could not even be written.
    write_failed: bool,
}

impl Http1Client {
    pub fn new(pool: ConnectionPool, connect_timeout: Duration) -> Self {
        Http1Client {
            pool: Arc::new(pool),
            connect_timeout,
        }
    }

    /// Sends a request with its whole body, on a pooled connection or a new one. The
    /// request is encoded when this is called, so the future holds the bytes to write but
    /// not the request (a function returning an `async` block, not an `async fn`, which
    /// would hold its arguments twice).
    pub fn send<'a>(
        &'a self,
        request: Request<Bytes>,
        added: Option<&AddedHeaders>,
        hints: Option<InterimResponses>,
    ) -> impl Future<Output = Result<Answer<Received>, UpstreamError>> + 'a {
        let target = request.uri().authority().cloned();
        let head_request = request.method() == Method::HEAD;
        let idempotent = is_idempotent(request.method());
        let message = Message::encode(&request, added);
        drop(request);
        async move {
            let target = target.ok_or(UpstreamError::NoTarget)?;
            loop {
                let (pooled, buffer) = self.pool.checkout(&target);
                let (stream, reused) = match pooled {
                    Some(stream) => (stream, true),
                    None => (self.connect(&target).await?, false),
                };
                let exchanged = self
                    .exchange(
                        stream,
                        buffer,
                        &target,
                        &message,
                        head_request,
                        hints.as_ref(),
                    )
                    .await;
                match exchanged {
                    Ok(response) => return Ok(response),
                    // A pooled connection the target closed as the request went out (its idle
                    // timeout): the request was not seen, so it goes on another connection.
                    // Each retry uses up a pooled connection; the last resort is a new one,
                    // not retried.
                    Err(failed)
                        if reused
                            && failed.nothing_received
                            && (idempotent || failed.write_failed) =>
                    {
                        tracing::debug!(error = %failed.error, %target, "Pooled connection closed; retrying");
                    }
                    Err(failed) => return Err(failed.error),
                }
            }
        }
    }

    async fn connect(&self, target: &Authority) -> Result<TcpStream, UpstreamError> {
        let connecting = TcpStream::connect(target.as_str());
        let stream = if self.connect_timeout.is_zero() {
            connecting.await?
        } else {
            tokio::time::timeout(self.connect_timeout, connecting)
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??
        };
        stream.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(stream)
    }

    async fn exchange(
        &self,
        mut stream: TcpStream,
        mut buffer: BytesMut,
        target: &Authority,
        message: &Message,
        head_request: bool,
        hints: Option<&InterimResponses>,
    ) -> Result<Answer<Received>, Failed> {
        if let Err(error) = message.write_to(&mut stream).await {
            return Err(Failed {
                error: error.into(),
                nothing_received: true,
                write_failed: true,
            });
        }
        let failed = |error, nothing_received| Failed {
            error,
            nothing_received,
            write_failed: false,
        };
        // A reused buffer is reclaimed whole if the body last read into it is gone.
        buffer.reserve(READ_SIZE);
        let mut received_any = false;
        // Where the search for the end of a head that was not whole resumes: a long head is
        // parsed once it has all come, not again at every read.
        let mut unended_from = None;
        let head = 'head: loop {
            // One read may bring an interim response and the final one together.
            // (Nothing to parse before the first read: the buffer starts empty.)
            while !buffer.is_empty() && head_may_be_whole(&buffer, unended_from) {
                let Some(head) = parse_head(&mut buffer).map_err(|error| failed(error, false))?
                else {
                    unended_from = Some(buffer.len());
                    break;
                };
                unended_from = None;
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    let error = UpstreamError::InvalidResponse("switching protocols unasked");
                    return Err(failed(error, false));
                }
                if !head.status.is_informational() {
                    break 'head head;
                }
                // 103 Early Hints and the like reach the client at once (HTTP/1.1 clients);
                // 100 Continue was for the proxy, which sent the whole body.
                if let (true, Some(hints)) = (super::passes_on(head.status), hints) {
                    hints.send(&super::interim_head(head.status, &head.fields.into_map(0)));
                }
            }
            if buffer.capacity() - buffer.len() < 1024 {
                buffer.reserve(READ_SIZE);
            }
            match stream.read_buf(&mut buffer).await {
                Err(error) => return Err(failed(error.into(), !received_any)),
                Ok(0) if !received_any => {
                    return Err(failed(UpstreamError::ClosedBeforeResponse, true));
                }
                Ok(0) => {
                    let error =
                        UpstreamError::InvalidResponse("connection closed in the response head");
                    return Err(failed(error, false));
                }
                Ok(_) => received_any = true,
            }
        };

        // The usual head goes to the client as it came; any other is put in a map, for the
        // forwarding to take out what is for this hop only.
        let (mut headers, received) = if head.passes_as_received() {
            (HeaderMap::new(), Some(head.fields))
        } else {
            (head.fields.into_map(0), None)
        };
        let framing = body_framing(head_request, head.status, &mut headers, head.noted)
            .map_err(|error| failed(error, false))?;
        let close = head.connection_close
            || (head.noted.connection_kept && connection_says_close(&headers));
        let keep_alive =
            head.version == Version::HTTP_11 && !close && !matches!(framing, Framing::UntilClose);
        let mut response = Response::new(());
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        let answer = match received {
            Some(received) => Answer::with_received(response, received),
            None => Answer::from(response),
        };

        let whole_body = match framing {
            Framing::Empty => Some(Bytes::new()),
            Framing::Length(length) if buffer.len() as u64 >= length => {
                // `length` is at most the buffer's length here, so it fits a usize.
                Some(buffer.split_to(length as usize).freeze())
            }
            _ => None,
        };
        if let Some(data) = whole_body {
            // Bytes beyond the body would be taken for the next response: not reusable.
            if keep_alive && buffer.is_empty() {
                self.pool.checkin(target, stream, buffer);
            }
            return Ok(answer.with_body(Received::Whole(data)));
        }
        let state = match framing {
            Framing::Length(length) => BodyState::Length(length),
            Framing::Chunked => BodyState::Chunked(ChunkedDecoder::new()),
            Framing::UntilClose | Framing::Empty => BodyState::UntilClose,
        };
        let body = body::boxed(ResponseBody {
            stream: Some(stream),
            buffer,
            state,
            keep_alive,
            pool: Arc::clone(&self.pool),
            target: target.clone(),
        });
        Ok(answer.with_body(Received::Streaming(body)))
    }
}

/// A request encoded once, so a retry sends the same bytes.
struct Message {
    head: Vec<u8>,
    /// A body too large to copy behind the head.
    body: Option<Bytes>,
}

impl Message {
    fn encode(request: &Request<Bytes>, added: Option<&AddedHeaders>) -> Self {
        let body = request.body();
        let inline = body.len() <= INLINE_BODY;
        let mut head = Vec::with_capacity(512 + if inline { body.len() } else { 0 });
        head.extend_from_slice(request.method().as_str().as_bytes());
        head.push(b' ');
        let uri: &Uri = request.uri();
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        head.extend_from_slice(if path.is_empty() { "/" } else { path }.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        if !request.headers().contains_key(header::HOST) {
            if let Some(authority) = uri.authority() {
                head.extend_from_slice(b"host: ");
                head.extend_from_slice(authority.as_str().as_bytes());
                head.extend_from_slice(b"\r\n");
            }
        }
        for (name, value) in request.headers() {
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if let Some(added) = added {
            added.write_to(&mut head);
        }
        // The length we send is the body's: the only framing the target sees is ours.
        if !body.is_empty() || method_expects_body(request.method()) {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        if inline {
            head.extend_from_slice(body);
            Message { head, body: None }
        } else {
            Message {
                head,
                body: Some(body.clone()),
            }
        }
    }

    async fn write_to(&self, stream: &mut TcpStream) -> std::io::Result<()> {
        stream.write_all(&self.head).await?;
        if let Some(body) = &self.body {
            stream.write_all(body).await?;
        }
        Ok(())
    }
}

fn method_expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// A target's response head.
struct Head {
    status: StatusCode,
    version: Version,
    /// The fields, less those for this hop only that [`parse_head`] could settle by itself.
    fields: ReceivedFields,
    /// `Connection: close` was among them (and so left out).
    connection_close: bool,
    /// What the fields said about framing and the connection, noted as they were parsed so
    /// that the framing and keep-alive decisions look at the fields only for what is there.
    noted: NotedFields,
}

impl Head {
    /// Whether the fields can go to the client as they are: nothing in them for this hop
    /// only is left to remove, and the body's length, if given, is given plainly.
    fn passes_as_received(&self) -> bool {
        let noted = self.noted;
        !noted.transfer_encoding
            && !noted.connection_kept
            && !noted.other_hop_by_hop
            && noted.content_length != NotedLength::Other
    }
}

/// The framing and connection fields of a response head, as [`parse_head`] met them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct NotedFields {
    transfer_encoding: bool,
    content_length: NotedLength,
    /// A Connection field that stayed (it names more than close or keep-alive).
    connection_kept: bool,
    /// A field for this hop only besides those (Upgrade, TE, Proxy-Authenticate...), which
    /// the forwarding removes.
    other_hop_by_hop: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum NotedLength {
    #[default]
    Absent,
    /// One Content-Length field of plain digits.
    One(u64),
    /// Several fields, or one that is not plain digits: [`body_framing`] reads them all.
    Other,
}

/// What [`parse_head`] does with a field, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldRole {
    Connection,
    KeepAlive,
    TransferEncoding,
    /// Another field for this hop only (`headers::remove_hop_by_hop`'s list).
    HopByHop,
    /// One the proxy looks for, or any other.
    Known(Known),
}

impl FieldRole {
    /// By `headers`' one list of hop-by-hop names, in any case spelling.
    fn of(name: &[u8]) -> FieldRole {
        match crate::headers::hop_by_hop_index_any_case(name) {
            Some(crate::headers::HOP_CONNECTION) => FieldRole::Connection,
            Some(crate::headers::HOP_KEEP_ALIVE) => FieldRole::KeepAlive,
            Some(crate::headers::HOP_TRANSFER_ENCODING) => FieldRole::TransferEncoding,
            Some(_) => FieldRole::HopByHop,
            None => FieldRole::Known(Known::of_bytes(name)),
        }
    }
}

/// Whether `buffer` may now hold a whole head: always before a first parse, and after one
/// found it unfinished at `unended_from`, once a blank line has come after that (or the head
/// has outgrown the limit, for the parse to refuse it).
fn head_may_be_whole(buffer: &[u8], unended_from: Option<usize>) -> bool {
    let Some(from) = unended_from else {
        return true;
    };
    if buffer.len() > MAX_HEAD {
        return true;
    }
    // A line feed the last search saw may start the blank line: look back two bytes.
    let fresh = &buffer[from.saturating_sub(2)..];
    memchr::memchr_iter(b'\n', fresh)
        .any(|at| fresh.get(at + 1) == Some(&b'\n') || fresh.get(at + 1..at + 3) == Some(b"\r\n"))
}

/// Parses a complete response head off the front of `buffer`, if it holds one. The fields
/// stay in the head's memory: [`ReceivedFields`] notes where each sits.
///
/// The usual `Connection: keep-alive` or `close`, and `Keep-Alive`, are read here and left
/// out: the client gets its own connection management, and leaving them out lets most heads
/// pass on as they are. Any other Connection value stays, for the forwarding to remove what
/// it names.
fn parse_head(buffer: &mut BytesMut) -> Result<Option<Head>, UpstreamError> {
    // Left uninitialised: filling 128 slots would cost more than parsing a small head.
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut more_slots;
    let mut parsed = httparse::Response::new(&mut []);
    let parsing = httparse::ParserConfig::default();
    let mut parsing_outcome =
        parsing.parse_response_with_uninit_headers(&mut parsed, buffer, &mut slots);
    if let Err(httparse::Error::TooManyHeaders) = parsing_outcome {
        // Rare: parsed again with room for as many fields as the head has lines.
        more_slots = room_for_every_line(buffer);
        parsed = httparse::Response::new(&mut []);
        parsing_outcome =
            parsing.parse_response_with_uninit_headers(&mut parsed, buffer, &mut more_slots);
    }
    let head_len = match parsing_outcome {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD => {
            return Err(UpstreamError::InvalidResponse("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::InvalidResponse("too many header fields"));
        }
        Err(_) => return Err(UpstreamError::InvalidResponse("malformed response head")),
    };
    if head_len > MAX_HEAD {
        return Err(UpstreamError::InvalidResponse("response head too large"));
    }
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(UpstreamError::InvalidResponse("invalid status code"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Each field is noted by where it sits in the head, so that it can refer to the head
    // once that is frozen.
    let start = buffer.as_ptr() as usize;
    let mut fields = ReceivedFields::with_capacity(parsed.headers.len());
    let mut connection_close = false;
    let mut noted = NotedFields::default();
    for field in parsed.headers.iter() {
        let (name, text) = (field.name.as_bytes(), field.value);
        let known = match FieldRole::of(name) {
            FieldRole::Connection => {
                if text.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                    continue;
                }
                if text.eq_ignore_ascii_case(b"keep-alive") {
                    continue;
                }
                noted.connection_kept = true;
                Known::Other
            }
            FieldRole::KeepAlive => continue,
            FieldRole::TransferEncoding => {
                noted.transfer_encoding = true;
                Known::Other
            }
            FieldRole::HopByHop => {
                noted.other_hop_by_hop = true;
                Known::Other
            }
            FieldRole::Known(Known::ContentLength) => {
                noted.content_length =
                    match (noted.content_length, crate::headers::plain_length(text)) {
                        (NotedLength::Absent, Some(length)) => NotedLength::One(length),
                        _ => NotedLength::Other,
                    };
                Known::ContentLength
            }
            FieldRole::Known(known) => known,
        };
        let name_at = name.as_ptr() as usize - start;
        let value_at = text.as_ptr() as usize - start;
        fields.push(
            name_at..name_at + name.len(),
            value_at..value_at + text.len(),
            known,
        );
    }
    let head = buffer.split_to(head_len).freeze();
    Ok(Some(Head {
        status,
        version,
        fields: fields.with_head(head),
        connection_close,
        noted,
    }))
}

/// Slots for as many header fields as `head` has lines, up to [`MOST_HEADERS`].
#[cold]
fn room_for_every_line<'head>(head: &[u8]) -> Vec<MaybeUninit<httparse::Header<'head>>> {
    let lines = memchr::memchr_iter(b'\n', head).count();
    let mut slots = Vec::new();
    slots.resize_with(lines.min(MOST_HEADERS), MaybeUninit::uninit);
    slots
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// How the response body is delimited (RFC 9112 section 6.3). A chunked body's
/// Content-Length is dropped: it must not reach the client beside another framing. Any
/// transfer coding but a lone `chunked` is refused, as kamal-proxy (Go) refuses it: after
/// taking the chunks apart, what is left would still be coded (gzip, say), and the client
/// would be given it with nothing saying so.
fn body_framing(
    head_request: bool,
    status: StatusCode,
    headers: &mut HeaderMap,
    noted: NotedFields,
) -> Result<Framing, UpstreamError> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if noted.transfer_encoding {
        let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
        let only_chunked = match (codings.next(), codings.next()) {
            (Some(coding), None) => coding
                .to_str()
                .is_ok_and(|coding| coding.trim().eq_ignore_ascii_case("chunked")),
            _ => false,
        };
        if !only_chunked {
            return Err(UpstreamError::InvalidResponse(
                "unsupported transfer coding",
            ));
        }
        headers.remove(header::CONTENT_LENGTH);
        return Ok(Framing::Chunked);
    }
    match noted.content_length {
        NotedLength::Absent => return Ok(Framing::UntilClose),
        NotedLength::One(length) => return Ok(Framing::Length(length)),
        NotedLength::Other => {}
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let text = value
            .to_str()
            .map_err(|_| UpstreamError::InvalidResponse("invalid Content-Length"))?;
        // Digits only, as Go's transport reads it: a list (`2, 2`) is refused, not passed
        // on for the client to make sense of.
        let parsed = crate::headers::plain_length(text.trim().as_bytes())
            .ok_or(UpstreamError::InvalidResponse("invalid Content-Length"))?;
        if length.is_some_and(|seen| seen != parsed) {
            return Err(UpstreamError::InvalidResponse("conflicting Content-Length"));
        }
        length = Some(parsed);
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

fn connection_says_close(headers: &HeaderMap) -> bool {
    crate::headers::connection_options(headers).any(|option| option.eq_ignore_ascii_case("close"))
}

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// A response body still arriving from the target. The connection goes back to the pool
/// once the body has been read to its end; a body dropped before that closes it.
struct ResponseBody {
    stream: Option<TcpStream>,
    buffer: BytesMut,
    state: BodyState,
    keep_alive: bool,
    pool: Arc<ConnectionPool>,
    target: Authority,
}

impl ResponseBody {
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(stream) = self.stream.take() {
            if self.keep_alive && self.buffer.is_empty() {
                let buffer = std::mem::take(&mut self.buffer);
                self.pool.checkin(&self.target, stream, buffer);
            }
        }
    }

    fn fail(&mut self, error: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.state = BodyState::Done;
        self.stream = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        loop {
            // First what the buffer already holds.
            match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                BodyState::Length(remaining) if !this.buffer.is_empty() => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(this.buffer.len());
                    let data = this.buffer.split_to(take).freeze();
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut this.buffer) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Done) => {
                        let trailers = decoder.take_trailers();
                        this.finish();
                        if trailers.is_empty() {
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(_) => {
                        return this.fail(UpstreamError::InvalidResponse("malformed chunked body"))
                    }
                },
                BodyState::UntilClose if !this.buffer.is_empty() => {
                    let data = this.buffer.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Length(_) | BodyState::UntilClose => {}
            }
            // Then more from the target.
            let Some(stream) = this.stream.as_mut() else {
                return Poll::Ready(None);
            };
            if this.buffer.capacity() - this.buffer.len() < 1024 {
                this.buffer.reserve(READ_SIZE);
            }
            match tokio_util::io::poll_read_buf(Pin::new(stream), cx, &mut this.buffer) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return this.fail(error.into()),
                Poll::Ready(Ok(0)) if matches!(this.state, BodyState::UntilClose) => {
                    this.state = BodyState::Done;
                    this.stream = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    let error = UpstreamError::InvalidResponse("connection closed mid-body");
                    return this.fail(error);
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(remaining) => SizeHint::with_exact(remaining),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Methods safe to send twice if the first attempt may have reached the target: Go's
/// client's list (kamal-proxy's), which leaves out PUT and DELETE, since apps do not always
/// make those idempotent.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn parse(text: &str) -> Head {
        let mut buffer = BytesMut::from(text);
        let head = parse_head(&mut buffer).unwrap().expect("a complete head");
        assert_eq!(
            &buffer[..],
            b"body",
            "the head is taken off the front, the body left"
        );
        head
    }

    #[test]
    fn the_usual_connection_fields_are_read_and_left_out() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nETag: \"x\"\r\n\r\nbody",
        );
        assert_eq!(head.status, StatusCode::OK);
        assert!(!head.connection_close && head.passes_as_received());
        let headers = head.fields.into_map(0);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-length", "etag"]);

        let head = parse("HTTP/1.1 200 OK\r\nconnection: CLOSE\r\n\r\nbody");
        assert!(head.connection_close && head.passes_as_received());
        assert!(head.fields.into_map(0).is_empty());
    }

    #[test]
    fn a_connection_field_naming_other_fields_is_kept_for_the_forwarding() {
        let head = parse("HTTP/1.1 200 OK\r\nConnection: close, x-trace\r\nX-Trace: 1\r\n\r\nbody");
        assert!(!head.connection_close && !head.passes_as_received());
        let headers = head.fields.into_map(0);
        assert!(headers.contains_key(header::CONNECTION));
        assert!(connection_says_close(&headers));
        assert_eq!(headers.len(), 2);
    }

    #[test]
    fn its_header_value_bytes_are_the_ones_header_value_accepts() {
        // parse_head builds values unchecked, trusting httparse's check: the two must agree
        // on every byte.
        for byte in 0..=255u8 {
            let value = [b'a', byte, b'a'];
            let mut text = b"HTTP/1.1 200 OK\r\nX-Value: ".to_vec();
            text.extend_from_slice(&value);
            text.extend_from_slice(b"\r\n\r\nbody");
            let mut buffer = BytesMut::from(&text[..]);
            let parsed = parse_head(&mut buffer).ok().flatten();
            let name = HeaderName::from_static("x-value");
            let stored = parsed.and_then(|head| head.fields.get(&name));
            match HeaderValue::from_bytes(&value) {
                Ok(accepted) => assert_eq!(stored, Some(accepted), "byte {byte:#04x}"),
                Err(_) => assert!(stored.is_none(), "byte {byte:#04x} got through"),
            }
        }
    }

    #[test]
    fn framing_and_connection_fields_are_noted_as_they_are_parsed() {
        let noted = |text: &str| parse(text).noted;
        assert_eq!(
            noted("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"),
            NotedFields {
                content_length: NotedLength::One(4),
                ..NotedFields::default()
            }
        );
        for other in ["4, 4", "+4", " ", "99999999999999999999"] {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {other}\r\n\r\nbody");
            assert_eq!(noted(&head).content_length, NotedLength::Other, "{other:?}");
        }
        let twice = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nbody";
        assert_eq!(noted(twice).content_length, NotedLength::Other);
        let chunked = noted("HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: chunked\r\n\r\nbody");
        assert!(chunked.transfer_encoding && !chunked.connection_kept);
        assert!(noted("HTTP/1.1 200 OK\r\nConnection: close, x-a\r\n\r\nbody").connection_kept);
        assert_eq!(
            noted("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody"),
            NotedFields::default()
        );
    }

    #[test]
    fn framing_follows_the_noted_fields_as_it_followed_the_map() {
        let framing = |text: &str| {
            let head = parse(text);
            let mut headers = head.fields.into_map(0);
            body_framing(false, head.status, &mut headers, head.noted).map_err(|_| ())
        };
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nbody"),
            Ok(Framing::Length(12))
        );
        // A list is refused, as Go's transport refuses it; repeated fields that agree are one.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\nbody"),
            Err(())
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nbody"),
            Ok(Framing::Length(4))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nbody"),
            Err(())
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nbody"),
            Err(())
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nX: y\r\n\r\nbody"),
            Ok(Framing::UntilClose)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\nbody"),
            Ok(Framing::Chunked)
        );
        for refused in [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ] {
            let head = format!("HTTP/1.1 200 OK\r\n{refused}\r\nbody");
            assert_eq!(framing(&head), Err(()), "{refused:?}");
        }
        let head =
            parse("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\nbody");
        assert!(!head.passes_as_received());
        let mut headers = head.fields.into_map(0);
        let chunked = body_framing(false, head.status, &mut headers, head.noted).ok();
        assert_eq!(chunked, Some(Framing::Chunked));
        assert!(
            !headers.contains_key(header::CONTENT_LENGTH),
            "dropped beside chunked"
        );
    }

    #[test]
    fn only_heads_with_nothing_to_take_out_pass_as_received() {
        let passes = |fields: &str| {
            parse(&format!("HTTP/1.1 200 OK\r\n{fields}\r\nbody")).passes_as_received()
        };
        assert!(passes(
            "Content-Length: 4\r\nConnection: keep-alive\r\nKeep-Alive: x\r\n"
        ));
        assert!(passes("Date: today\r\nX-Upgraded: no\r\n"));
        for kept in [
            "Transfer-Encoding: chunked\r\n",
            "Content-Length: 4, 4\r\n",
            "Connection: x-trace\r\n",
            "Upgrade: h2c\r\n",
            "UPGRADE: h2c\r\n",
            "TE: trailers\r\n",
            "Proxy-Authenticate: Basic\r\n",
            "Proxy-Connection: keep-alive\r\n",
            "Forwarded: for=x\r\n",
        ] {
            assert!(!passes(kept), "{kept:?}");
        }
    }

    #[test]
    fn a_head_with_more_fields_than_the_first_parse_has_room_for_is_read_whole() {
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for field in 0..MAX_HEADERS * 3 {
            text.push_str(&format!("X-Field-{field}: {field}\r\n"));
        }
        text.push_str("Content-Length: 4\r\n\r\nbody");
        let head = parse(&text);
        let headers = head.fields.into_map(0);
        assert_eq!(headers.len(), MAX_HEADERS * 3 + 1);
        assert_eq!(headers["x-field-383"], "383");
    }

    #[test]
    fn a_head_over_the_limit_is_refused() {
        let mut buffer = BytesMut::from("HTTP/1.1 200 OK\r\nX-Big: ");
        buffer.extend_from_slice(&vec![b'a'; MAX_HEAD]);
        assert!(parse_head(&mut buffer).is_err(), "unfinished and too large");
        buffer.extend_from_slice(b"\r\n\r\n");
        assert!(parse_head(&mut buffer).is_err(), "whole and too large");
    }

    #[test]
    fn an_unfinished_head_is_parsed_again_only_once_a_blank_line_has_come() {
        let unfinished = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n";
        assert!(
            head_may_be_whole(unfinished, None),
            "a first parse is always tried"
        );
        // What came after the last parse, and where the blank line may start.
        let whole_with = |more: &[u8]| {
            let mut bytes = unfinished.to_vec();
            bytes.extend_from_slice(more);
            head_may_be_whole(&bytes, Some(unfinished.len()))
        };
        assert!(!whole_with(b"X-B: 2"));
        assert!(!whole_with(b"X-B: 2\r\nX-C: 3\r\n"));
        assert!(
            whole_with(b"\r\n"),
            "the blank line begins in the earlier bytes"
        );
        assert!(whole_with(b"\n"), "bare line feeds, which httparse accepts");
        assert!(whole_with(b"X-B: 2\r\n\r\nbody"));
        assert!(whole_with(b"X-B: 2\n\nbody"));
        // A head cut in the blank line itself.
        let mut bytes = unfinished.to_vec();
        bytes.push(b'\r');
        assert!(!head_may_be_whole(&bytes, Some(unfinished.len())));
        let searched = bytes.len();
        bytes.push(b'\n');
        assert!(head_may_be_whole(&bytes, Some(searched)));
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        let mut buffer = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Len");
        assert!(parse_head(&mut buffer).unwrap().is_none());
        assert_eq!(
            &buffer[..],
            b"HTTP/1.1 200 OK\r\nContent-Len",
            "nothing taken"
        );
    }
}
