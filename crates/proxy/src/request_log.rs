//! The request log: one JSON object per request on stdout, with kamal-proxy's field names.
//!
//! Written directly rather than through `tracing`, because the `req_<header>` and
//! `resp_<header>` fields are named at deploy time and tracing fields are fixed at compile time.
//! The line has kamal-proxy's shape, since log pipelines are keyed on it: `time`, `level`,
//! `msg` first (as the daemon's other lines), then kamal-proxy's fields in its order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{header, HeaderName, HeaderValue, Method, Uri, Version};

use crate::ip_text::IpText;
use crate::metrics::Metrics;

/// A field's key with the punctuation around it, `,"name":`, as one constant: the line is
/// written once per request, and one copy per key is much cheaper than five small writes.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// Everything known about one request, logged once when it ends. Request parts are kept as
/// cheap clones (`Uri`, `HeaderValue` share the request's buffer) and turned into text only
/// when the line is written.
pub struct RequestRecord {
    started: Instant,
    host: Option<HeaderValue>,
    /// The host came from the target's authority (HTTP/2's `:authority`), not a Host header.
    host_from_authority: bool,
    pub port: u16,
    uri: Uri,
    pub method: Method,
    pub proto: Version,
    pub scheme: &'static str,
    pub peer: SocketAddr,
    /// The service's client-IP header as the client sent it, if the service names one and
    /// the request has it.
    pub remote_addr: Option<HeaderValue>,
    /// The request's first X-Forwarded-For line, read at `begin` (before forwarding replaces
    /// it) and parsed only when the line is written: the client the request names.
    forwarded_for: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    /// As Go reports it: the declared length, -1 for a chunked body, 0 for none.
    pub req_content_length: i64,
    req_content_type: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    /// Shared with the routing table, so naming them costs no allocation per request.
    pub service: Option<Arc<str>>,
    pub target: Option<Arc<str>>,
    pub status: u16,
    pub resp_content_length: Option<u64>,
    pub resp_content_type: Option<HeaderValue>,
    pub extra: Vec<(String, String)>,
    /// Where the request is counted once logged; `None` for unrouted or excluded paths.
    pub metrics: Option<Arc<Metrics>>,
    /// Time from sending the request to the target to its response head.
    pub upstream_duration: Option<std::time::Duration>,
    emitted: bool,
}

impl RequestRecord {
    pub fn begin<B>(
        request: &http::Request<B>,
        peer: SocketAddr,
        local_port: u16,
        scheme: &'static str,
    ) -> Self {
        // One pass over the few headers a request has, rather than a hashed lookup for each
        // of the four the log wants. The first of each counts, as with `HeaderMap::get`.
        let (mut host, mut user_agent, mut content_length, mut content_type) =
            (None, None, None, None);
        let mut chunked = false;
        let mut forwarded_for = None;
        for (name, value) in request.headers() {
            if name == crate::headers::x_forwarded_for() {
                forwarded_for.get_or_insert(value);
                continue;
            }
            let slot = match *name {
                header::HOST => &mut host,
                header::USER_AGENT => &mut user_agent,
                header::CONTENT_LENGTH => &mut content_length,
                header::CONTENT_TYPE => &mut content_type,
                header::TRANSFER_ENCODING => {
                    chunked = true;
                    continue;
                }
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        let host_from_authority = host.is_none();
        let host = host.cloned().or_else(|| {
            let authority = request.uri().authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        Self {
            started: Instant::now(),
            host_from_authority: host_from_authority && host.is_some(),
            host,
            port: local_port,
            uri: request.uri().clone(),
            method: request.method().clone(),
            proto: request.version(),
            scheme,
            peer,
            remote_addr: None,
            forwarded_for: forwarded_for.cloned(),
            user_agent: user_agent.cloned(),
            req_content_length: content_length
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(if chunked { -1 } else { 0 }),
            req_content_type: content_type.cloned(),
            request_id: None,
            service: None,
            target: None,
            status: 0,
            resp_content_length: None,
            resp_content_type: None,
            extra: Vec::new(),
            metrics: None,
            upstream_duration: None,
            emitted: false,
        }
    }

    /// The request's Host header, else its target's authority (HTTP/2's `:authority`). Found
    /// by `begin`'s pass over the headers, so routing, redirects and forwarding need not look
    /// it up again.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// Whether [`RequestRecord::host`] came from the target's authority: a request forwarded
    /// with it needs a Host header added.
    pub fn host_from_authority(&self) -> bool {
        self.host_from_authority
    }

    /// [`RequestRecord::host`] as text; empty when absent. A Host header that is not visible
    /// ASCII never gets this far: `check_request_head` refuses it.
    pub fn host_name(&self) -> &str {
        header_text(self.host.as_ref())
    }

    /// kamal-proxy's `remote_addr`: the client-IP header's value, else the first
    /// X-Forwarded-For line's, each as the client wrote it (a list, or not an address at
    /// all, is logged as it came); `None` for the peer's address.
    fn remote_addr(&self) -> Option<&HeaderValue> {
        self.remote_addr
            .as_ref()
            .or(self.forwarded_for.as_ref())
            .filter(|value| !value.is_empty())
    }

    /// Copies the named headers into `<prefix><lowercase name>` fields; `""` for one the
    /// message lacks, as kamal-proxy logs it.
    pub fn capture_headers(
        &mut self,
        prefix: &str,
        names: &[String],
        lookup: impl Fn(&HeaderName) -> Option<HeaderValue>,
    ) {
        for name in names {
            let value = HeaderName::from_bytes(name.as_bytes())
                .ok()
                .and_then(|name| lookup(&name));
            let text = header_text(value.as_ref());
            let key = format!("{prefix}{}", name.to_ascii_lowercase().replace('-', "_"));
            self.extra.push((key, text.to_string()));
        }
    }

    /// Writes the log line (once).
    pub fn emit(&mut self) {
        if std::mem::replace(&mut self.emitted, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        crate::log_output::write_line(|out| self.write_line(out, elapsed));
        // Only routed requests are counted, so a record with metrics names its service.
        if let (Some(metrics), Some(service)) = (self.metrics.take(), &self.service) {
            if let (Some(upstream), Some(target)) = (self.upstream_duration, &self.target) {
                metrics.observe_upstream(service, target, upstream);
            }
            metrics.observe_request(service, &self.method, self.status, elapsed);
        }
    }

    /// The line, with kamal-proxy's keys in its order, and a newline.
    fn write_line(&self, out: &mut Vec<u8>, elapsed: std::time::Duration) {
        let host = header_text(self.host.as_ref());
        let mut line = JsonObject::start(out, SystemTime::now());
        line.constant(concat!(
            key!("level"),
            "\"INFO\"",
            key!("msg"),
            "\"Request\""
        ));
        // With its port, if it has one, as kamal-proxy logs it.
        line.string(key!("host"), host);
        line.number(key!("port"), u64::from(self.port));
        line.string(
            key!("path"),
            &crate::request_target::decoded_path(self.uri.path()),
        );
        line.header_string(key!("request_id"), self.request_id.as_ref());
        line.number(key!("status"), u64::from(self.status));
        line.string(key!("service"), self.service.as_deref().unwrap_or_default());
        line.string(key!("target"), self.target.as_deref().unwrap_or_default());
        line.number(
            key!("duration"),
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        );
        // A method is a token (RFC 9110), which has no quote, backslash or control character.
        line.plain_string(key!("method"), self.method.as_str());
        line.signed(key!("req_content_length"), self.req_content_length);
        line.header_string(key!("req_content_type"), self.req_content_type.as_ref());
        line.number(
            key!("resp_content_length"),
            self.resp_content_length.unwrap_or(0),
        );
        line.header_string(key!("resp_content_type"), self.resp_content_type.as_ref());
        let client_addr = IpText::new(self.peer.ip());
        line.plain_bytes(key!("client_addr"), client_addr.as_bytes());
        line.plain_string(
            key!("client_port"),
            itoa::Buffer::new().format(self.peer.port()),
        );
        match self.remote_addr() {
            Some(named) => line.header_string(key!("remote_addr"), Some(named)),
            // Usually the peer itself, already formatted above.
            None => line.plain_bytes(key!("remote_addr"), client_addr.as_bytes()),
        }
        line.header_string(key!("user_agent"), self.user_agent.as_ref());
        line.plain_string(key!("proto"), proto_name(self.proto));
        line.plain_string(key!("scheme"), self.scheme);
        line.string(key!("query"), self.uri.query().unwrap_or_default());
        for (key, value) in &self.extra {
            line.named_string(key, value);
        }
        line.end();
    }
}

/// A header's text for the log; empty when absent or not visible ASCII.
fn header_text(value: Option<&HeaderValue>) -> &str {
    value.and_then(|v| v.to_str().ok()).unwrap_or_default()
}

thread_local! {
    /// The date and time to the second of the last line this thread wrote, so the calendar
    /// arithmetic runs once a second rather than once a request.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// Writes one JSON object whose first field is the timestamp. Keys are ours (plain ASCII);
/// values are escaped as serde_json escapes them.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> JsonObject<'a> {
    /// Opens the object with `"time"`: RFC 3339 in UTC with microseconds, as
    /// `2026-11-22T10:00:00.123456Z`.
    fn start(out: &'a mut Vec<u8>, now: SystemTime) -> Self {
        out.extend_from_slice(b"{\"time\":\"");
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let seconds = since_epoch.as_secs();
        let (cached_second, mut date_time) = SECOND.get();
        if cached_second != seconds {
            let whole_second = UNIX_EPOCH + std::time::Duration::from_secs(seconds);
            let text = humantime::format_rfc3339_seconds(whole_second).to_string();
            if let Some(prefix) = text.as_bytes().get(..19) {
                date_time.copy_from_slice(prefix);
            }
            SECOND.set((seconds, date_time));
        }
        out.extend_from_slice(&date_time);
        let micros = since_epoch.subsec_micros();
        let mut fraction = *b".000000Z\"";
        let mut rest = micros;
        for digit in fraction[1..7].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.extend_from_slice(&fraction);
        JsonObject { out }
    }

    /// Fields whose keys and values are both fixed: written as they are.
    fn constant(&mut self, fields: &'static str) {
        self.out.extend_from_slice(fields.as_bytes());
    }

    /// `key` is a [`key!`] fragment.
    fn string(&mut self, key: &'static str, value: &str) {
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'"');
        escape_into(self.out, value);
        self.out.push(b'"');
    }

    /// A header's value, as [`header_text`] gives it (empty unless visible ASCII), escaped.
    /// The usual value, visible ASCII with nothing to escape, is found so by one scan a word
    /// at a time and copied, where `to_str`'s byte loop and then the escape scan each went
    /// over it.
    fn header_string(&mut self, key: &'static str, value: Option<&HeaderValue>) {
        let bytes = value.map_or(&b""[..], HeaderValue::as_bytes);
        if is_plain_visible_ascii(bytes) {
            self.plain_bytes(key, bytes);
        } else {
            self.string(key, header_text(value));
        }
    }

    /// A string that cannot hold anything JSON escapes (an IP address, digits, a method
    /// token, a constant): copied as it is. Six of a line's fields, about 100 instructions
    /// each saved.
    fn plain_string(&mut self, key: &'static str, value: &str) {
        self.plain_bytes(key, value.as_bytes());
    }

    /// As [`JsonObject::plain_string`], for text held as bytes (ASCII with nothing to escape).
    fn plain_bytes(&mut self, key: &'static str, value: &[u8]) {
        debug_assert!(
            value.is_ascii() && first_to_escape(value).is_none(),
            "{value:?}"
        );
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'"');
        self.out.extend_from_slice(value);
        self.out.push(b'"');
    }

    /// `key` is a [`key!`] fragment.
    fn number(&mut self, key: &'static str, value: u64) {
        self.out.extend_from_slice(key.as_bytes());
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn signed(&mut self, key: &'static str, value: i64) {
        self.out.extend_from_slice(key.as_bytes());
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// A string field whose key is only known at run time (`req_`/`resp_` plus a header
    /// name, lowercase ASCII: nothing to escape).
    fn named_string(&mut self, key: &str, value: &str) {
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":\"");
        escape_into(self.out, value);
        self.out.push(b'"');
    }

    fn end(self) {
        self.out.extend_from_slice(b"}\n");
    }
}

/// Appends `text` as the inside of a JSON string: `"`, `\\` and control characters escaped.
fn escape_into(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    // Almost every value has nothing to escape: one scan, eight bytes at a time, one copy.
    let Some(first) = first_to_escape(bytes) else {
        out.extend_from_slice(bytes);
        return;
    };
    out.extend_from_slice(&bytes[..first]);
    let mut plain_from = first;
    for (i, &byte) in bytes.iter().enumerate().skip(first) {
        let escaped: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain_from..i]);
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(escaped);
        }
        plain_from = i + 1;
    }
    out.extend_from_slice(&bytes[plain_from..]);
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// Where the first byte JSON needs escaped sits, if any.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        if word_has_byte_to_escape(word) {
            return word_position(&bytes[offset..offset + 8]).map(|i| offset + i);
        }
        offset += 8;
    }
    word_position(words.remainder()).map(|i| offset + i)
}

/// Whether every byte is visible ASCII (0x20 to 0x7e) and none is `"` or `\\`.
fn is_plain_visible_ascii(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // 0x7f and above: the high bit, or DEL itself.
        let not_ascii = word & HIGH_BITS | has_zero_byte(word ^ (ONES * 0x7f));
        if not_ascii != 0 || word_has_byte_to_escape(word) {
            return false;
        }
    }
    words
        .remainder()
        .iter()
        .all(|&byte| (0x20..0x7f).contains(&byte) && !needs_escape(byte))
}

fn word_position(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&byte| needs_escape(byte))
}

/// Whether any of eight bytes is below 0x20, `"` or `\\`, without looking at each: the
/// "has a byte less than n" and "has a zero byte" word tricks. Both are exact about whether
/// such a byte exists (a borrow only crosses into the next byte after a real match).
fn word_has_byte_to_escape(word: u64) -> bool {
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH_BITS;
    let quote = has_zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = has_zero_byte(word ^ (ONES * u64::from(b'\\')));
    below_space | quote | backslash != 0
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each zero byte of `word` (non-zero exactly when it has one).
fn has_zero_byte(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGH_BITS
}

fn proto_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP",
    }
}

impl Drop for RequestRecord {
    /// A request dropped before it was logged ended because the client went away.
    fn drop(&mut self) {
        if !self.emitted {
            self.status = 499;
            self.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_strings_as_serde_json_does() {
        for text in [
            "plain",
            "",
            "quote \" and backslash \\",
            "lines\nand\ttabs\r",
            "\u{0}\u{1}\u{8}\u{c}\u{1f}\u{7f}",
            "unicode é ✓ 🚢",
        ] {
            let mut out = Vec::new();
            escape_into(&mut out, text);
            let expected = serde_json::to_string(text).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected[1..expected.len() - 1]
            );
        }
    }

    #[test]
    fn plain_visible_ascii_is_told_by_words_as_byte_by_byte() {
        let plain = |byte: u8| (0x20..0x7f).contains(&byte) && byte != b'"' && byte != b'\\';
        for byte in 0..=255u8 {
            for length in 1..=19 {
                for at in 0..length {
                    let mut text = vec![b'a'; length];
                    text[at] = byte;
                    assert_eq!(
                        is_plain_visible_ascii(&text),
                        plain(byte),
                        "{byte:#x} at {at} of {length}"
                    );
                }
            }
        }
        assert!(is_plain_visible_ascii(b""));
    }

    #[test]
    fn header_values_are_logged_as_header_text_gives_them() {
        for value in [
            "text/html",
            "a \"quoted\" \\ value",
            "tab\there",
            "",
            "caf\u{e9}",
        ] {
            let header = HeaderValue::from_str(value).unwrap();
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            JsonObject { out: &mut fast }.header_string(key!("k"), Some(&header));
            JsonObject { out: &mut slow }.string(key!("k"), header_text(Some(&header)));
            assert_eq!(fast, slow, "{value:?}");
        }
    }

    #[test]
    fn finds_a_byte_to_escape_at_every_place_in_a_word_and_after_it() {
        // The scan reads eight bytes at a time: each special byte at each offset, in strings
        // of every length around a word boundary, next to bytes that sit near it in value.
        let special = (0u8..0x20).chain([b'"', b'\\']);
        for byte in special {
            for length in 1..=19 {
                for at in 0..length {
                    let mut text = vec![b'a'; length];
                    text[..at].fill(if at % 2 == 0 { b' ' } else { 0x7f });
                    text[at] = byte;
                    assert_eq!(
                        first_to_escape(&text),
                        Some(at),
                        "{byte:#x} at {at} of {length}"
                    );
                }
            }
        }
        for neighbour in [b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xff] {
            for length in 0..=19 {
                assert_eq!(
                    first_to_escape(&vec![neighbour; length]),
                    None,
                    "{neighbour:#x}"
                );
            }
        }
    }

    #[test]
    fn keys_come_in_kamal_proxys_order() {
        let request = http::Request::builder()
            .uri("/")
            .header("host", "app.example")
            .body(())
            .unwrap();
        let mut record =
            RequestRecord::begin(&request, "10.1.2.3:5555".parse().unwrap(), 80, "http");
        record.extra.push(("resp_x_custom".into(), "v".into()));
        record.emitted = true;
        let mut out = Vec::new();
        record.write_line(&mut out, std::time::Duration::ZERO);
        let line = String::from_utf8(out).unwrap();
        // Each key is the text between a quote and the `":` that follows it; what comes
        // after the last `":` is the last value.
        let pieces: Vec<&str> = line.split("\":").collect();
        let keys: Vec<&str> = pieces[..pieces.len() - 1]
            .iter()
            .filter_map(|before| before.rsplit('"').next())
            .collect();
        let expected = [
            "time",
            "level",
            "msg",
            "host",
            "port",
            "path",
            "request_id",
            "status",
            "service",
            "target",
            "duration",
            "method",
            "req_content_length",
            "req_content_type",
            "resp_content_length",
            "resp_content_type",
            "client_addr",
            "client_port",
            "remote_addr",
            "user_agent",
            "proto",
            "scheme",
            "query",
            "resp_x_custom",
        ];
        assert_eq!(keys, expected, "{line}");
    }

    #[test]
    fn a_line_is_one_json_object_with_the_request_fields() {
        let request = http::Request::builder()
            .uri("/search?q=%22x%22")
            .header("host", "app.example:8080")
            .header("user-agent", "agent \"quoted\"")
            .header("content-type", "text/plain")
            .header("content-length", "12")
            .header("content-type", "text/html")
            .body(())
            .unwrap();
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut record = RequestRecord::begin(&request, peer, 80, "http");
        record.status = 200;
        record.service = Some("web".into());
        record.extra.push(("req_x_custom".into(), "v".into()));
        record.emitted = true;
        let mut out = Vec::new();
        record.write_line(&mut out, std::time::Duration::from_micros(1500));
        assert_eq!(out.last(), Some(&b'\n'));
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            line["host"], "app.example:8080",
            "with its port, as kamal-proxy logs it"
        );
        assert_eq!(line["path"], "/search");
        assert_eq!(line["query"], "q=%22x%22");
        assert_eq!(line["user_agent"], "agent \"quoted\"");
        assert_eq!(line["req_content_type"], "text/plain", "the first of two");
        assert_eq!(line["req_content_length"], 12);
        assert_eq!(line["client_addr"], "10.1.2.3");
        assert_eq!(line["remote_addr"], "10.1.2.3");
        assert_eq!(line["client_port"], "5555");
        assert_eq!(line["duration"], 1_500_000);
        assert_eq!(line["status"], 200);
        assert_eq!(line["req_x_custom"], "v");
        let timestamp = line["time"].as_str().unwrap();
        let parsed = humantime::parse_rfc3339(timestamp).unwrap();
        let age = SystemTime::now().duration_since(parsed).unwrap();
        assert!(age < std::time::Duration::from_secs(60), "{timestamp}");
        assert_eq!(timestamp.len(), "2026-11-22T10:00:00.123456Z".len());
    }

    #[test]
    fn remote_addr_is_the_header_the_client_wrote() {
        let logged = |forwarded_for: Option<&str>, client_ip: Option<&str>| {
            let mut request = http::Request::builder().uri("/");
            if let Some(value) = forwarded_for {
                request = request.header("x-forwarded-for", value);
            }
            let request = request.body(()).unwrap();
            let mut record =
                RequestRecord::begin(&request, "10.1.2.3:5555".parse().unwrap(), 80, "http");
            record.remote_addr = client_ip.map(|value| HeaderValue::from_str(value).unwrap());
            record.emitted = true;
            let mut out = Vec::new();
            record.write_line(&mut out, std::time::Duration::ZERO);
            let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
            line["remote_addr"].as_str().unwrap().to_string()
        };
        assert_eq!(logged(None, None), "10.1.2.3");
        assert_eq!(logged(Some(""), None), "10.1.2.3");
        assert_eq!(logged(Some("9.9.9.9, 8.8.8.8"), None), "9.9.9.9, 8.8.8.8");
        assert_eq!(logged(Some("not an address"), None), "not an address");
        assert_eq!(
            logged(Some("9.9.9.9"), Some("7.7.7.7, 6.6.6.6")),
            "7.7.7.7, 6.6.6.6"
        );
    }
}
