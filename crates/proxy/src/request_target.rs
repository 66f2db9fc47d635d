//! The request target's path as kamal-proxy hands it to the app.
//!
//! kamal-proxy is built on Go's `net/url`, which reads the path of every request and writes
//! it out again for the target. Two things come of that, and an app that moves from
//! kamal-proxy to Berth must not see them change:
//! - A path with a broken percent-escape (`/a%zz`, a lone `%`) is refused with 400.
//! - Bytes that a URL path may not carry as they are (anything outside ASCII, `"`, `\`,
//!   `^`, `{`, `|`, `}`) reach the app percent-encoded: `/café` arrives as `/caf%C3%A9`.
//!   Browsers encode these themselves; other clients and scanners often do not.
//!
//! Go re-encodes such a path whole, decoding what was already escaped, so `%2F` in it turns
//! into a real `/`. Here only the offending bytes are encoded and existing escapes are left
//! as they came: where the two differ, Go has changed the path the app routes on.
//!
//! The query is passed on untouched, as Go passes it. The request log shows the path
//! decoded, as kamal-proxy's does.

use std::borrow::Cow;

/// What a request's path needs before it goes on to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathShape {
    /// Nothing: it goes on as it came, as nearly every path does.
    AsItCame,
    /// Bytes to percent-encode, with [`escape_path`].
    ToEncode,
}

/// A path with a `%` not followed by two hex digits.
#[derive(Debug, PartialEq, Eq)]
pub struct BrokenEscape;

/// Looks at the path once, byte by byte: it runs for every request.
pub fn inspect_path(path: &str) -> Result<PathShape, BrokenEscape> {
    let bytes = path.as_bytes();
    let mut shape = PathShape::AsItCame;
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        match CLASS[usize::from(byte)] {
            KEPT => {}
            ENCODED => shape = PathShape::ToEncode,
            _ => match bytes.get(at + 1..at + 3) {
                Some([high, low]) if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                    at += 2;
                }
                _ => return Err(BrokenEscape),
            },
        }
        at += 1;
    }
    Ok(shape)
}

/// The path with the bytes Go's `url.URL.EscapedPath` would not leave as they are
/// percent-encoded; borrowed when there are none, as for nearly every request.
pub fn escape_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let Some(first) = bytes.iter().position(|&b| needs_escaping(b)) else {
        return Cow::Borrowed(path);
    };
    let mut escaped = String::with_capacity(path.len() + 8);
    escaped.push_str(&path[..first]);
    for &byte in &bytes[first..] {
        if needs_escaping(byte) {
            escaped.push_str(percent_encoding::percent_encode_byte(byte));
        } else {
            escaped.push(char::from(byte));
        }
    }
    Cow::Owned(escaped)
}

/// The path with its escapes decoded, as kamal-proxy logs it (Go's `URL.Path`): `/caf%C3%A9`
/// is logged as `/café`. Bytes that do not make UTF-8 once decoded are logged as U+FFFD, as
/// Go's JSON encoder writes them. Borrowed when there is no escape, as for nearly every
/// request.
pub fn decoded_path(path: &str) -> Cow<'_, str> {
    // The crate's decoder checks the result's UTF-8 even when there was nothing to decode:
    // about 120 instructions a request, where this scan is a few.
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    percent_encoding::percent_decode_str(path).decode_utf8_lossy()
}

/// A byte Go's `url` package does not leave as it is in a path: not unreserved, not a
/// sub-delimiter, not `:` `@` `/` `[` `]`, and not the `%` of an escape.
fn needs_escaping(byte: u8) -> bool {
    CLASS[usize::from(byte)] == ENCODED
}

const KEPT: u8 = 0;
const ENCODED: u8 = 1;
const PERCENT: u8 = 2;

/// Each byte's class in a path, looked up rather than tested: every request's path is read
/// byte by byte.
const CLASS: [u8; 256] = {
    let kept = b"-_.~!$&'()*+,;=:@/[]";
    let mut table = [ENCODED; 256];
    let mut byte = 0;
    while byte < 256 {
        if (byte as u8).is_ascii_alphanumeric() {
            table[byte] = KEPT;
        }
        byte += 1;
    }
    let mut i = 0;
    while i < kept.len() {
        table[kept[i] as usize] = KEPT;
        i += 1;
    }
    table[b'%' as usize] = PERCENT;
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_escapes_are_found() {
        for path in ["/a%zz", "/a%", "/a%4", "/ok%41/then%g1", "/%%41", "/é%"] {
            assert_eq!(inspect_path(path), Err(BrokenEscape), "{path}");
        }
        for path in [
            "/",
            "/a%41",
            "/a%2Fb%2f",
            "/plain/path",
            "/100%25",
            "/%41%42",
        ] {
            assert_eq!(inspect_path(path), Ok(PathShape::AsItCame), "{path}");
        }
    }

    #[test]
    fn bytes_a_path_may_not_carry_are_encoded_as_go_encodes_them() {
        // What the reference kamal-proxy passed on for each, read off the app.
        for (sent, passed_on) in [
            ("/é", "/%C3%A9"),
            ("/a|b", "/a%7Cb"),
            ("/a{b}", "/a%7Bb%7D"),
            ("/a\"b", "/a%22b"),
            ("/a\\b", "/a%5Cb"),
            ("/a^b", "/a%5Eb"),
            ("/a!'()*b", "/a!'()*b"),
            ("/a[b]", "/a[b]"),
            ("/a:b@c;d=e,f+g$h&i~j", "/a:b@c;d=e,f+g$h&i~j"),
        ] {
            assert_eq!(escape_path(sent), passed_on, "{sent}");
            let shape = if sent == passed_on {
                PathShape::AsItCame
            } else {
                PathShape::ToEncode
            };
            assert_eq!(inspect_path(sent), Ok(shape), "{sent}");
        }
    }

    #[test]
    fn the_logged_path_is_decoded_as_go_decodes_it() {
        assert_eq!(decoded_path("/plain"), "/plain");
        assert!(matches!(decoded_path("/plain"), Cow::Borrowed(_)));
        assert_eq!(decoded_path("/caf%C3%A9/%2F%20x"), "/café// x");
        assert_eq!(decoded_path("/%ff"), "/\u{fffd}");
    }

    #[test]
    fn existing_escapes_are_left_alone() {
        // Go would decode %2F into a separator here; the app gets what the client meant.
        assert_eq!(escape_path("/a%2Fb/é"), "/a%2Fb/%C3%A9");
        assert!(matches!(escape_path("/a%2Fb"), Cow::Borrowed(_)));
    }
}
