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
    pub body: ProxyBody,
    pub len: u64,
}

/// Reads all of `incoming`. `memory` bytes stay in memory; `max` (0 = unlimited) caps the total.
pub async fn buffer_body<B>(mut incoming: B, memory: u64, max: u64) -> Result<Buffered, BufferError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut in_memory = BytesMut::new();
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
                file.write_all(&in_memory).await?;
                file.write_all(&data).await?;
                in_memory = BytesMut::new();
                spill = Some(file);
            }
            None => in_memory.extend_from_slice(&data),
        }
    }
    let body = match spill {
        None => body::full(in_memory.freeze()),
        Some(mut file) => {
            file.flush().await?;
            file.rewind().await?;
            let chunks = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024)
                .map_ok(Frame::data)
                .map_err(BoxError::from);
            body::boxed(StreamBody::new(chunks))
        }
    };
    Ok(Buffered { body, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: ProxyBody) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory() {
        let buffered = buffer_body(body::full("hello"), 1024, 0).await.unwrap();
        assert_eq!(buffered.len, 5);
        assert_eq!(collect(buffered.body).await, b"hello");
    }

    #[tokio::test]
    async fn large_bodies_spill_to_disk_and_read_back_whole() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let buffered = buffer_body(body::full(data.clone()), 1024, 0)
            .await
            .unwrap();
        assert_eq!(buffered.len, data.len() as u64);
        assert_eq!(collect(buffered.body).await, data);
    }

    #[tokio::test]
    async fn bodies_over_the_maximum_are_refused() {
        let result = buffer_body(body::full(vec![0u8; 2000]), 1024, 1000).await;
        assert!(matches!(result, Err(BufferError::TooLarge(1000))));
    }
}
