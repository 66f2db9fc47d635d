//! A client connection's byte stream, as hyper sees it. It adds two things to the socket:
//!
//! - bytes read before hyper took the connection (while it was parked, or left over in
//!   hyper's buffer when hyper gave it back) are replayed first;
//! - reads, writes and requests are counted in an [`Activity`], which the connection's task
//!   reads to tell when the connection has gone quiet and can be parked;
//! - interim responses (`103 Early Hints` and the like) the app sends before its answer are
//!   written ahead of everything hyper writes: hyper's server cannot send them, so they go
//!   around it, while it waits for the service (see [`InterimResponses`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection's task needs to know to park it: has anything moved, is a request being
/// served, is a write waiting for a slow client. Written by the connection's own task (the
/// counters are atomics only because the service must be `Send`).
#[derive(Debug, Default)]
pub struct Activity {
    /// Reads and writes that moved bytes.
    events: AtomicU64,
    /// Requests handed to the service so far.
    requests: AtomicU64,
    /// Requests whose response body hyper has not yet finished with.
    in_flight: AtomicUsize,
    /// A write found the socket full and has not been flushed since.
    write_blocked: AtomicBool,
    /// Bytes of a request head have arrived and its request has not started yet: the
    /// connection's task holds such a head to the header read timeout.
    head_begun: AtomicBool,
    /// Interim responses to write before anything else; `interim_pending` says whether there
    /// are any without taking the lock.
    interim: std::sync::Mutex<BytesMut>,
    interim_pending: AtomicBool,
    /// Wakes the connection's task, so hyper polls the stream and the interim bytes go out.
    flusher: futures_util::task::AtomicWaker,
}

impl Activity {
    /// Changes whenever bytes move or a request starts.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed) + self.requests.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A request head has begun to arrive and is not yet complete.
    pub fn head_begun(&self) -> bool {
        self.head_begun.load(Ordering::Relaxed)
    }

    /// No request is being served and nothing is waiting to be written.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && !self.write_blocked.load(Ordering::Relaxed)
    }

    /// Counts a request from now until the returned guard is dropped (with its response body).
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_begun.store(false, Ordering::Relaxed);
        RequestGuard(Arc::clone(self))
    }

    fn moved_bytes(&self) {
        // One writer (the connection's task), so no read-modify-write instruction is needed.
        let events = self.events.load(Ordering::Relaxed);
        self.events.store(events.wrapping_add(1), Ordering::Relaxed);
    }

    /// Bytes read while no request is in flight are the start of the next request's head.
    fn read_bytes(&self) {
        self.moved_bytes();
        if !self.head_begun.load(Ordering::Relaxed) && self.in_flight.load(Ordering::Relaxed) == 0 {
            self.head_begun.store(true, Ordering::Relaxed);
        }
    }
}

/// Sends interim responses from the app (`103 Early Hints`, `102 Processing`) to this
/// connection's client ahead of the final response. Given to the pipeline with HTTP/1.1
/// requests only.
#[derive(Debug, Clone)]
pub struct InterimResponses(Arc<Activity>);

impl InterimResponses {
    pub fn new(activity: Arc<Activity>) -> Self {
        Self(activity)
    }

    /// Queues an interim response head (`HTTP/1.1 103 ...\r\n...\r\n\r\n`) and wakes the
    /// connection so it is written at once.
    pub fn send(&self, head: &[u8]) {
        let activity = &self.0;
        activity
            .interim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(head);
        activity.interim_pending.store(true, Ordering::Release);
        activity.flusher.wake();
    }
}

/// A request being served; see [`Activity::request_started`].
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// How many bytes a parked connection reads when its client speaks again: enough to tell
/// HTTP/2's preface, small enough to cost nothing while the connection waits.
const READ_AHEAD: usize = 64;

/// The client's stream with replayed bytes in front and its activity counted.
#[derive(Debug)]
pub struct ClientIo<S> {
    inner: S,
    replay: Bytes,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientIo<S> {
    /// A client's stream, with bytes already read from it to replay first.
    pub fn with_replay(inner: S, replay: Bytes) -> Self {
        let activity = Activity::default();
        // Bytes already read are the start of a request head.
        activity
            .head_begun
            .store(!replay.is_empty(), Ordering::Relaxed);
        Self {
            inner,
            replay,
            activity: Arc::new(activity),
        }
    }

    /// The stream and the bytes waiting to be replayed, without the activity counters.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.inner, self.replay)
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Bytes waiting to be replayed to the next reader.
    pub fn replayed(&self) -> &[u8] {
        &self.replay
    }

    /// Puts bytes hyper read but did not use in front of what is read next. They are copied:
    /// `bytes` is a view of hyper's whole read buffer, which would otherwise stay allocated
    /// for as long as the view, even an empty one.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let mut joined = BytesMut::with_capacity(bytes.len() + self.replay.len());
        joined.extend_from_slice(&bytes);
        joined.extend_from_slice(&self.replay);
        self.replay = joined.freeze();
    }

    /// Waits for the client's next bytes and keeps them for replay. Returns how many arrived:
    /// 0 means the client closed its side. Cancel-safe: bytes are kept only once read.
    pub async fn read_ahead(&mut self) -> io::Result<usize> {
        read_ahead(&mut self.inner, &mut self.replay).await
    }
}

/// Waits for `stream`'s next bytes and appends them to `replay`. Returns how many arrived: 0
/// means the client closed its side. Cancel-safe: bytes are kept only once read.
pub async fn read_ahead<S: AsyncRead + Unpin>(
    stream: &mut S,
    replay: &mut Bytes,
) -> io::Result<usize> {
    let read = read_some(stream).await?;
    if !read.is_empty() {
        let mut joined = BytesMut::with_capacity(replay.len() + read.len());
        joined.extend_from_slice(replay);
        joined.extend_from_slice(&read);
        *replay = joined.freeze();
    }
    Ok(read.len())
}

/// Waits for `stream`'s next bytes (none: the client closed its side). Cancel-safe.
///
/// The read buffer lives on the stack of each poll, not in the future, and the future is no
/// `async fn` (which would hold its argument twice): a parked connection waits in it for as
/// long as its client is quiet, and every byte of its state is held per idle connection.
pub fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> impl std::future::Future<Output = io::Result<Bytes>> + '_ {
    std::future::poll_fn(move |cx| poll_read_some(stream, cx))
}

fn poll_read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Bytes>> {
    let mut buffer = [0u8; READ_AHEAD];
    let mut read = ReadBuf::new(&mut buffer);
    std::task::ready!(Pin::new(stream).poll_read(cx, &mut read))?;
    Poll::Ready(Ok(Bytes::copy_from_slice(read.filled())))
}

/// A client stream that can move what it holds on the heap to new allocations, done when its
/// connection parks.
///
/// Why: a connection's long-lived allocations (its socket's registration with the event loop,
/// a TLS session's state) are made when it starts, between the large buffers hyper uses while
/// it serves. Once those buffers are freed, the small allocations left between the holes keep
/// whole pages resident: about 7 KB per idle connection for 2 KB of live data. Allocated
/// again at parking, after the buffers are gone, they pack together.
pub trait Relocate: Sized {
    fn relocate(self) -> io::Result<Self>;
}

impl Relocate for tokio::net::TcpStream {
    /// Registers the socket with the event loop anew (two `epoll_ctl` calls, once per park).
    fn relocate(self) -> io::Result<Self> {
        tokio::net::TcpStream::from_std(self.into_std()?)
    }
}

impl<T> Relocate for Box<T> {
    fn relocate(self) -> io::Result<Self> {
        Ok(Box::new(*self))
    }
}

#[cfg(test)]
impl Relocate for tokio::io::DuplexStream {
    fn relocate(self) -> io::Result<Self> {
        Ok(self)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let count = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..count]);
            this.replay.advance(count);
            if this.replay.is_empty() {
                // An emptied view still holds its buffer, made when the connection started:
                // let it go, or a parked connection would keep it among hyper's freed buffers.
                this.replay = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read_bytes();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> ClientIo<S> {
    /// Writes queued interim responses; `Ready(Ok)` once none are left.
    fn poll_write_interim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.activity.interim_pending.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let mut interim = self
            .activity
            .interim
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while !interim.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &interim) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => interim.advance(written),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.activity
            .interim_pending
            .store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_write_interim(cx))?;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_write_interim(cx))?;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper flushes on every turn of its loop, waiting for the service included: the
        // place to be woken, and to write interim responses from.
        this.activity.flusher.register(cx.waker());
        std::task::ready!(this.poll_write_interim(cx))?;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        let blocked = polled.is_pending();
        if this.activity.write_blocked.load(Ordering::Relaxed) != blocked {
            this.activity
                .write_blocked
                .store(blocked, Ordering::Relaxed);
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> ClientIo<S> {
    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(written)) if *written > 0 => self.activity.moved_bytes(),
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replayed_bytes_come_before_the_socket() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut io = ClientIo::with_replay(client, Bytes::new());
        server.write_all(b"GET").await.unwrap();
        assert_eq!(io.read_ahead().await.unwrap(), 3);
        assert_eq!(io.replayed(), b"GET");
        io.unread(Bytes::from_static(b"left "));
        server.write_all(b" /").await.unwrap();
        drop(server);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"left GET /");
    }

    #[tokio::test]
    async fn activity_counts_bytes_and_requests() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut io = ClientIo::with_replay(client, Bytes::new());
        let activity = Arc::clone(io.activity());
        let start = activity.events();
        server.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await.unwrap();
        assert_ne!(activity.events(), start);

        assert!(activity.is_idle());
        let request = activity.request_started();
        assert!(!activity.is_idle());
        assert_eq!(activity.requests(), 1);
        drop(request);
        assert!(activity.is_idle());
    }

    #[tokio::test]
    async fn a_full_socket_is_not_idle_until_flushed() {
        let (client, mut server) = tokio::io::duplex(4);
        let mut io = ClientIo::with_replay(client, Bytes::new());
        let activity = Arc::clone(io.activity());
        let writing = tokio::spawn(async move {
            io.write_all(b"more than four bytes").await.unwrap();
            io.flush().await.unwrap();
            io
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !activity.is_idle(),
            "the client has not read: the write waits"
        );
        let mut sink = vec![0u8; 20];
        server.read_exact(&mut sink).await.unwrap();
        let _io = writing.await.unwrap();
        assert!(activity.is_idle());
    }
}
