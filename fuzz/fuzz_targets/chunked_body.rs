//! The chunked decoder for response bodies from targets: any bytes, split anywhere, never
//! panic, and decode to the same data and outcome however they are split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/proxy/src/upstream/chunked.rs"]
mod chunked;

use chunked::{ChunkedDecoder, Decoded};

/// Feeds `input` in pieces of `step` bytes: the data, and `Some(ended)` or `None` on error.
fn decode(input: &[u8], step: usize) -> (Vec<u8>, Option<bool>) {
    let mut decoder = ChunkedDecoder::new();
    let mut buffer = BytesMut::new();
    let mut data = Vec::new();
    for piece in input.chunks(step.max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Decoded::Data(bytes)) => data.extend_from_slice(&bytes),
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::Done) => return (data, Some(true)),
                Err(_) => return (data, None),
            }
        }
    }
    (data, Some(false))
}

fuzz_target!(|input: (u8, &[u8])| {
    let (step, bytes) = input;
    let whole = decode(bytes, bytes.len());
    let split = decode(bytes, usize::from(step));
    // An error may surface at a different point, with less data decoded before it; otherwise
    // the split input must decode exactly as the whole.
    if whole.1.is_some() && split.1.is_some() {
        assert_eq!(whole, split);
    } else {
        assert_eq!(whole.1, split.1, "an error in one reading only");
    }
});
