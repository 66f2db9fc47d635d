//! The body type every response and upstream request uses, and small constructors for it.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body of any origin: a streamed client or upstream body, a buffer, a spilled file.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body all in memory. An empty one is [`empty`]: boxing nothing allocates nothing.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    let bytes = bytes.into();
    if bytes.is_empty() {
        return empty();
    }
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// [`boxed`] for a body whose errors are already a [`BoxError`]: no conversion layer, so
/// one move of the body less on the way in and one call less for each frame.
pub fn boxed_as_is<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    UnsyncBoxBody::new(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body;

    #[tokio::test]
    async fn a_full_body_of_nothing_is_an_empty_one() {
        let mut body = full(Bytes::new());
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());

        let mut body = full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        assert!(body.frame().await.is_none());
    }
}
