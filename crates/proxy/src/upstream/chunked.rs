//! Decoding a chunked response body (RFC 9112 section 7.1) as it arrives, from a buffer that
//! may end anywhere: mid size line, mid data, mid trailers.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Longest chunk size line we accept (size, extensions, CRLF), and longest trailer section.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    BadSize,
    #[error("chunk data not followed by CRLF")]
    BadDataEnd,
    #[error("chunk size line or trailers too long")]
    TooLong,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// More bytes are needed before anything can be returned.
    NeedMore,
    /// The last chunk and the trailers have been read (see [`ChunkedDecoder::take_trailers`]).
    Done,
}

#[derive(Debug, Clone, Copy)]
enum State {
    SizeLine,
    Data(u64),
    DataEnd,
    Trailers { seen: usize },
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    /// The trailer fields read so far (empty, so unallocated, for most bodies).
    trailers: HeaderMap,
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::SizeLine,
            trailers: HeaderMap::new(),
        }
    }

    /// The trailer fields, once [`Decoded::Done`] was returned. Fields that would change how
    /// the message is framed or routed are left out, as RFC 9110 section 6.5.1 asks.
    pub fn take_trailers(&mut self) -> HeaderMap {
        std::mem::take(&mut self.trailers)
    }

    /// Consumes what it can from `buffer`: the next piece of data, or the end.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::SizeLine => {
                    let Some(line_end) = find_crlf(buffer, MAX_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_size(&buffer[..line_end])?;
                    buffer.advance(line_end + 2);
                    self.state = if size == 0 {
                        State::Trailers { seen: 0 }
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(remaining) => {
                    if buffer.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    let data = buffer.split_to(take).freeze();
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => {
                    if buffer.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buffer[..2] != b"\r\n" {
                        return Err(ChunkError::BadDataEnd);
                    }
                    buffer.advance(2);
                    self.state = State::SizeLine;
                }
                State::Trailers { seen } => {
                    let Some(line_end) = find_crlf(buffer, MAX_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if let Some((name, value)) = trailer_field(&buffer[..line_end]) {
                        self.trailers.append(name, value);
                    }
                    buffer.advance(line_end + 2);
                    if line_end == 0 {
                        self.state = State::Done;
                    } else {
                        let seen = seen + line_end + 2;
                        if seen > MAX_TRAILERS {
                            return Err(ChunkError::TooLong);
                        }
                        self.state = State::Trailers { seen };
                    }
                }
            }
        }
    }
}

/// A trailer line's field, unless it is malformed or one a trailer may not carry.
fn trailer_field(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let forbidden = matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "host"
            | "connection"
            | "te"
            | "trailer"
            | "content-type"
            | "content-encoding"
            | "authorization"
            | "set-cookie"
    );
    if forbidden {
        return None;
    }
    let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
    Some((name, value))
}

/// Where the first CRLF starts, if one is within `max` bytes. A longer line is refused
/// whether or not its end has arrived, so the outcome does not depend on how bytes arrive.
fn find_crlf(buffer: &[u8], max: usize) -> Result<Option<usize>, ChunkError> {
    match buffer.iter().take(max + 1).position(|&b| b == b'\n') {
        Some(0) => Err(ChunkError::BadSize),
        Some(lf) if buffer[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(ChunkError::BadSize),
        None if buffer.len() > max => Err(ChunkError::TooLong),
        None => Ok(None),
    }
}

/// The hex size before any `;extension`, with optional whitespace around it.
fn parse_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits_end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let digits = line[..digits_end].trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(ChunkError::BadSize);
    }
    let mut size: u64 = 0;
    for &digit in digits {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            b'A'..=b'F' => digit - b'A' + 10,
            _ => return Err(ChunkError::BadSize),
        };
        size = size * 16 + u64::from(value);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the data and whether it ended.
    fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut decoder = ChunkedDecoder::new();
        let mut buffer = BytesMut::new();
        let mut data = Vec::new();
        for piece in input.chunks(step) {
            buffer.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buffer)? {
                    Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((data, true)),
                }
            }
        }
        Ok((data, false))
    }

    #[test]
    fn decodes_whatever_way_the_bytes_arrive() {
        let input =
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\nA \r\n0123456789\r\n0\r\nX-Trailer: a\r\n\r\n";
        for step in 1..=input.len() {
            let (data, done) = decode_in_steps(input, step).unwrap();
            assert_eq!(data, b"hello, world0123456789", "step {step}");
            assert!(done);
        }
    }

    #[test]
    fn trailers_are_kept_except_those_that_change_framing() {
        let mut decoder = ChunkedDecoder::new();
        let mut buffer = BytesMut::from(
            &b"0\r\nX-Checksum: abc\r\nContent-Length: 9\r\nbad line\r\nServer-Timing: db;dur=3\r\n\r\n"[..],
        );
        assert_eq!(decoder.decode(&mut buffer), Ok(Decoded::Done));
        let trailers = decoder.take_trailers();
        assert_eq!(trailers["x-checksum"], "abc");
        assert_eq!(trailers["server-timing"], "db;dur=3");
        assert_eq!(trailers.len(), 2, "{trailers:?}");
    }

    #[test]
    fn an_unfinished_body_is_not_done() {
        let (data, done) = decode_in_steps(b"5\r\nhel", 64).unwrap();
        assert_eq!(data, b"hel");
        assert!(!done);
    }

    #[test]
    fn malformed_framing_is_refused() {
        for input in [
            &b"z\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"-1\r\n",
            b"1000000000000000\r\n",
            b";ext\r\n",
        ] {
            assert!(decode_in_steps(input, 64).is_err(), "{input:?}");
        }
        let long_line = [b'1'; MAX_LINE + 1];
        assert_eq!(
            decode_in_steps(&long_line, MAX_LINE + 1),
            Err(ChunkError::TooLong)
        );
        // Too long even when its end is in the same read.
        let mut long_extension = b"1;".to_vec();
        long_extension.resize(MAX_LINE + 10, b'x');
        long_extension.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        for step in [1, 100, long_extension.len()] {
            assert_eq!(
                decode_in_steps(&long_extension, step),
                Err(ChunkError::TooLong),
                "step {step}"
            );
        }
    }
}
