//! Whole-body buffering: a body is read completely before it is passed on, kept in memory up
//! to a limit and spilled to an anonymous temporary file beyond it. This is what lets a slow
//! client upload without holding an app worker, and a slow reader download likewise.

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::body::{self, BoxError, ProxyBody};

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("body larger than the {0} byte limit")]
    TooLarge(u64),
    #[error("body could not be read: {0}")]
    Read(BoxError),
    #[error("temporary file for the body failed: {0}")]
    Spill(#[from] std::io::Error),
}

/// A fully read body and its length.
pub struct Buffered {
    pub len: u64,
    contents: Contents,
}

enum Contents {
    Memory(Bytes),
    /// Spilled to a temporary file, streamed back from it.
    File(ProxyBody),
}

impl Buffered {
    /// The whole body as one buffer, or, if it was spilled to disk, as a stream.
    pub fn into_memory(self) -> Result<Bytes, ProxyBody> {
        match self.contents {
            Contents::Memory(bytes) => Ok(bytes),
            Contents::File(body) => Err(body),
        }
    }

    pub fn into_body(self) -> ProxyBody {
        match self.contents {
            Contents::Memory(bytes) => body::full(bytes),
            Contents::File(body) => body,
        }
    }
}

/// Reads all of `incoming`. `memory` bytes stay in memory; `max` (0 = unlimited) caps the total.
/// Over the cap, the rest is left in `incoming`, for the caller to discard.
pub async fn buffer_body<B>(
    incoming: &mut B,
    memory: u64,
    max: u64,
) -> Result<Buffered, BufferError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if incoming.is_end_stream() {
        return Ok(Buffered {
            len: 0,
            contents: Contents::Memory(Bytes::new()),
        });
    }
    let mut in_memory = InMemory::Empty;
    let mut spill: Option<tokio::fs::File> = None;
    let mut len: u64 = 0;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| BufferError::Read(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not kept when buffering
        };
        len += data.len() as u64;
        if max > 0 && len > max {
            return Err(BufferError::TooLarge(max));
        }
        match spill.as_mut() {
            Some(file) => file.write_all(&data).await?,
            None if len > memory => {
                let mut file = tokio::fs::File::from_std(tempfile::tempfile()?);
                file.write_all(&std::mem::take(&mut in_memory).into_bytes())
                    .await?;
                file.write_all(&data).await?;
                spill = Some(file);
            }
            None => in_memory.push(data),
        }
    }
    let contents = match spill {
        None => Contents::Memory(in_memory.into_bytes()),
        Some(mut file) => {
            file.flush().await?;
            file.rewind().await?;
            let chunks = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024)
                .map_ok(Frame::data)
                .map_err(BoxError::from);
            Contents::File(body::boxed(StreamBody::new(chunks)))
        }
    };
    Ok(Buffered { len, contents })
}

/// A body held in memory. Most bodies arrive as one chunk, which is kept as it came,
/// without a copy.
#[derive(Default)]
enum InMemory {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl InMemory {
    fn push(&mut self, data: Bytes) {
        *self = match std::mem::take(self) {
            InMemory::Empty => InMemory::One(data),
            InMemory::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + data.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                InMemory::Many(joined)
            }
            InMemory::Many(mut joined) => {
                joined.extend_from_slice(&data);
                InMemory::Many(joined)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            InMemory::Empty => Bytes::new(),
            InMemory::One(data) => data,
            InMemory::Many(joined) => joined.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: ProxyBody) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory() {
        let buffered = buffer_body(&mut body::full("hello"), 1024, 0)
            .await
            .unwrap();
        assert_eq!(buffered.len, 5);
        assert_eq!(collect(buffered.into_body()).await, b"hello");
    }

    #[tokio::test]
    async fn large_bodies_spill_to_disk_and_read_back_whole() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let buffered = buffer_body(&mut body::full(data.clone()), 1024, 0)
            .await
            .unwrap();
        assert_eq!(buffered.len, data.len() as u64);
        assert_eq!(collect(buffered.into_body()).await, data);
    }

    #[tokio::test]
    async fn bodies_in_several_chunks_are_joined_in_order() {
        let chunks = futures_util::stream::iter(
            ["ab", "cd", "ef"].map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c)))),
        );
        let buffered = buffer_body(&mut StreamBody::new(chunks), 1024, 0)
            .await
            .unwrap();
        assert_eq!(buffered.len, 6);
        assert_eq!(collect(buffered.into_body()).await, b"abcdef");
    }

    #[tokio::test]
    async fn bodies_over_the_maximum_are_refused() {
        let result = buffer_body(&mut body::full(vec![0u8; 2000]), 1024, 1000).await;
        assert!(matches!(result, Err(BufferError::TooLarge(1000))));
    }
}
