//! The Content-Type a response gets when the app sends a body without one.
//!
//! kamal-proxy is built on Go's HTTP server, which names the type of such a body from its
//! first bytes, as the WHATWG MIME Sniffing Standard does (section 7.1, "identifying a
//! resource with an unknown MIME type"): `<!DOCTYPE html` makes it
//! `text/html; charset=utf-8`, a PNG signature `image/png`, readable text
//! `text/plain; charset=utf-8`, anything else `application/octet-stream`. An app moved from
//! kamal-proxy may depend on it without knowing (a browser told `nosniff`, a client that
//! checks the type), so Berth names the type the same way.
//!
//! Only the first frame of the body is looked at, at most 512 bytes of it, as Go looks at
//! its first write. A body that has a Content-Type (even an empty one), a Content-Encoding,
//! or a status without a body is left as it is, and so is one the app sends in chunks while
//! the service streams responses. For those, Go's ReverseProxy sends the head from a timer
//! that races the body's first write, so kamal-proxy names a type on some runs and not on
//! others; Berth always sends the head as it came. (When it buffers responses, Kamal's
//! default, kamal-proxy names one for every body, and so does Berth.) The request log keeps
//! the type the app sent, as kamal-proxy's does.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::answer::Answer;
use crate::body::{BoxError, ProxyBody};

/// How much of the body decides.
const SNIFF_LEN: usize = 512;

/// Whether a type may be named from the body of an answer the app sent without a
/// Content-Type: its status allows a body (`bodiless` says it does not) and it is not coded.
pub fn allowed<B>(answer: &Answer<B>, bodiless: bool) -> bool {
    !bodiless
        && answer
            .get(&header::CONTENT_ENCODING)
            .is_none_or(|coding| coding.is_empty())
}

/// Names the answer's type from the start of its body.
pub fn name_from<B>(answer: &mut Answer<B>, body_start: &[u8]) {
    let named = detect(body_start);
    answer
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(named));
}

/// Names the answer's type from the body's first frame, if it has data (Go sends the head
/// with its first write, too); returns the body with that frame put back in front.
pub async fn name_from_first_frame<B>(answer: &mut Answer<B>, mut body: ProxyBody) -> ProxyBody {
    let first = body.frame().await;
    if let Some(Ok(frame)) = &first {
        if let Some(data) = frame.data_ref().filter(|data| !data.is_empty()) {
            name_from(answer, data);
        }
    }
    crate::body::boxed_as_is(Prepended { first, rest: body })
}

/// A body whose first frame was taken off to be looked at, put back in front.
struct Prepended {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    rest: ProxyBody,
}

impl Body for Prepended {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let first = match &self.first {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |data| data.len() as u64),
            _ => 0,
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

/// The type Go's `http.DetectContentType` names for `data` (at most its first 512 bytes).
pub fn detect(data: &[u8]) -> &'static str {
    let data = &data[..data.len().min(SNIFF_LEN)];
    let first_non_ws = data
        .iter()
        .position(|&b| !is_whitespace(b))
        .unwrap_or(data.len());
    let text = &data[first_non_ws..];
    if is_html(text) {
        return "text/html; charset=utf-8";
    }
    if text.starts_with(b"<?xml") {
        return "text/xml; charset=utf-8";
    }
    for signature in SIGNATURES {
        let named = match signature {
            Signature::Exact(start, named) => data.starts_with(start).then_some(named),
            Signature::Masked(pattern, mask, named) => {
                masked_match(data, pattern, mask).then_some(named)
            }
            Signature::Mp4 => is_mp4(data).then_some("video/mp4"),
        };
        if let Some(named) = named {
            return named;
        }
    }
    if text.iter().any(|&b| is_binary(b)) {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// The tags (and comment) that make a body HTML when it opens with one, followed by a
/// space or `>`; letters in any case.
const HTML_OPENINGS: [&[u8]; 17] = [
    b"<!DOCTYPE HTML",
    b"<HTML",
    b"<HEAD",
    b"<SCRIPT",
    b"<IFRAME",
    b"<H1",
    b"<DIV",
    b"<FONT",
    b"<TABLE",
    b"<A",
    b"<STYLE",
    b"<TITLE",
    b"<B",
    b"<BODY",
    b"<BR",
    b"<P",
    b"<!--",
];

fn is_html(text: &[u8]) -> bool {
    HTML_OPENINGS.iter().any(|opening| {
        text.get(..opening.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(opening))
            && matches!(text.get(opening.len()), Some(b' ' | b'>'))
    })
}

enum Signature {
    /// The data starts with these bytes.
    Exact(&'static [u8], &'static str),
    /// The data's first bytes, masked, equal the pattern (pattern, mask, type).
    Masked(&'static [u8], &'static [u8], &'static str),
    /// An ISO base media file with an `mp4` brand.
    Mp4,
}

/// The standard's table after HTML and XML, in its order: byte-order marks, documents,
/// images, audio and video, fonts, archives.
const SIGNATURES: [Signature; 32] = [
    Signature::Exact(b"%PDF-", "application/pdf"),
    Signature::Exact(b"%!PS-Adobe-", "application/postscript"),
    Signature::Masked(
        b"\xFE\xFF\x00\x00",
        b"\xFF\xFF\x00\x00",
        "text/plain; charset=utf-16be",
    ),
    Signature::Masked(
        b"\xFF\xFE\x00\x00",
        b"\xFF\xFF\x00\x00",
        "text/plain; charset=utf-16le",
    ),
    Signature::Masked(
        b"\xEF\xBB\xBF\x00",
        b"\xFF\xFF\xFF\x00",
        "text/plain; charset=utf-8",
    ),
    Signature::Exact(b"\x00\x00\x01\x00", "image/x-icon"),
    Signature::Exact(b"\x00\x00\x02\x00", "image/x-icon"),
    Signature::Exact(b"BM", "image/bmp"),
    Signature::Exact(b"GIF87a", "image/gif"),
    Signature::Exact(b"GIF89a", "image/gif"),
    Signature::Masked(
        b"RIFF\x00\x00\x00\x00WEBPVP",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF\xFF\xFF",
        "image/webp",
    ),
    Signature::Exact(b"\x89PNG\x0D\x0A\x1A\x0A", "image/png"),
    Signature::Exact(b"\xFF\xD8\xFF", "image/jpeg"),
    Signature::Masked(
        b"FORM\x00\x00\x00\x00AIFF",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF",
        "audio/aiff",
    ),
    Signature::Exact(b"ID3", "audio/mpeg"),
    Signature::Exact(b"OggS\x00", "application/ogg"),
    Signature::Exact(b"MThd\x00\x00\x00\x06", "audio/midi"),
    Signature::Masked(
        b"RIFF\x00\x00\x00\x00AVI ",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF",
        "video/avi",
    ),
    Signature::Masked(
        b"RIFF\x00\x00\x00\x00WAVE",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF",
        "audio/wave",
    ),
    Signature::Mp4,
    Signature::Exact(b"\x1A\x45\xDF\xA3", "video/webm"),
    // Embedded OpenType: "LP" at offset 34.
    Signature::Masked(&EOT_PATTERN, &EOT_MASK, "application/vnd.ms-fontobject"),
    Signature::Exact(b"\x00\x01\x00\x00", "font/ttf"),
    Signature::Exact(b"OTTO", "font/otf"),
    Signature::Exact(b"ttcf", "font/collection"),
    Signature::Exact(b"wOFF", "font/woff"),
    Signature::Exact(b"wOF2", "font/woff2"),
    Signature::Exact(b"\x1F\x8B\x08", "application/x-gzip"),
    Signature::Exact(b"PK\x03\x04", "application/zip"),
    Signature::Exact(b"Rar!\x1A\x07\x00", "application/x-rar-compressed"),
    Signature::Exact(b"Rar!\x1A\x07\x01\x00", "application/x-rar-compressed"),
    Signature::Exact(b"\x00\x61\x73\x6D", "application/wasm"),
];

const EOT_PATTERN: [u8; 36] = eot(b'L', b'P');
const EOT_MASK: [u8; 36] = eot(0xFF, 0xFF);

const fn eot(first: u8, second: u8) -> [u8; 36] {
    let mut bytes = [0; 36];
    bytes[34] = first;
    bytes[35] = second;
    bytes
}

fn masked_match(data: &[u8], pattern: &[u8], mask: &[u8]) -> bool {
    data.len() >= pattern.len()
        && pattern
            .iter()
            .zip(mask)
            .zip(data)
            .all(|((&p, &m), &d)| d & m == p)
}

/// An ISO base media file whose brands include one starting with `mp4`.
fn is_mp4(data: &[u8]) -> bool {
    let Some(size) = data.get(..4) else {
        return false;
    };
    let box_size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize;
    if data.len() < box_size || !box_size.is_multiple_of(4) || data.get(4..8) != Some(b"ftyp") {
        return false;
    }
    (8..box_size)
        .step_by(4)
        .filter(|&at| at != 12)
        .any(|at| data.get(at..at + 3) == Some(b"mp4"))
}

fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b'\t' | b'\n' | 0x0C | b'\r' | b' ')
}

/// A byte that never appears in text (the standard's "binary data byte").
fn is_binary(byte: u8) -> bool {
    matches!(byte, 0x00..=0x08 | 0x0B | 0x0E..=0x1A | 0x1C..=0x1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_named_as_go_names_them() {
        // Each as Go's http.DetectContentType names it.
        for (data, named) in [
            (&b""[..], "text/plain; charset=utf-8"),
            (b"x\n", "text/plain; charset=utf-8"),
            (b"  <!DOCTYPE html><html>", "text/html; charset=utf-8"),
            (b"<HtMl><b>", "text/html; charset=utf-8"),
            (b"<p>", "text/html; charset=utf-8"),
            (b"<pre>", "text/plain; charset=utf-8"),
            (b"<html", "text/plain; charset=utf-8"),
            (b"\n<!-- c -->", "text/html; charset=utf-8"),
            (b"<?xml version=\"1.0\"?>", "text/xml; charset=utf-8"),
            (b"%PDF-1.4", "application/pdf"),
            (b"\xEF\xBB\xBFtext", "text/plain; charset=utf-8"),
            (b"\xFE\xFF\x00a", "text/plain; charset=utf-16be"),
            (b"GIF89a....", "image/gif"),
            (b"\x89PNG\x0D\x0A\x1A\x0A....", "image/png"),
            (b"\xFF\xD8\xFF\xE0", "image/jpeg"),
            (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image/webp"),
            (b"\x1F\x8B\x08\x00", "application/x-gzip"),
            (b"PK\x03\x04rest", "application/zip"),
            (b"\x00asm\x01\x00\x00\x00", "application/wasm"),
            (b"wOF2....", "font/woff2"),
            (b"{\"json\": true}", "text/plain; charset=utf-8"),
            (b"\x00\x01\x02binary", "application/octet-stream"),
            (
                b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom",
                "video/mp4",
            ),
        ] {
            assert_eq!(detect(data), named, "{:?}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn only_the_first_512_bytes_count() {
        let mut data = vec![b'a'; 512];
        data.push(0);
        assert_eq!(detect(&data), "text/plain; charset=utf-8");
    }
}
