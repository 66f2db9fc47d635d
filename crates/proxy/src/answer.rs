//! A response on its way to the client, with the target's header fields passed on as they
//! arrived when nothing in them needs changing.
//!
//! Turning a target's response head into a `HeaderMap` (a name lookup, a hash and an insert
//! per field), then walking the map again to write the head to the client, was the largest
//! single cost of a proxied request. The usual response (a fixed length, no hop-by-hop field
//! beyond connection management) needs none of it: its fields are kept as the head's bytes
//! and where each field sits in them ([`ReceivedFields`]), and the HTTP/1.1 fast path writes
//! them out as they came, in runs. Whatever needs a map (hyper for HTTP/1.1 bodies and
//! HTTP/2, HTTP/3, the pipeline changing one of the app's fields) asks for one, and the
//! fields are moved into it then.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::headers::token_is;

/// A response: status, fields and body. The target's fields are either in the map with the
/// rest or, passed on as received, in [`ReceivedFields`]; the map then holds only what the
/// proxy adds, which comes after them.
pub struct Answer<B> {
    response: Response<B>,
    received: Option<ReceivedFields>,
}

impl<B> From<Response<B>> for Answer<B> {
    fn from(response: Response<B>) -> Self {
        Answer {
            response,
            received: None,
        }
    }
}

impl<B> Answer<B> {
    /// A target's response whose own fields are `received`; `response`'s map starts empty.
    pub(crate) fn with_received(response: Response<B>, received: ReceivedFields) -> Self {
        Answer {
            response,
            received: Some(received),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    /// The target's fields, when they are passed on as received.
    pub(crate) fn received(&self) -> Option<&ReceivedFields> {
        self.received.as_ref()
    }

    /// The fields held in the map: all of them, or only those the proxy adds when the
    /// target's are passed on as received. For adding a field, not for changing the app's.
    pub fn map(&self) -> &HeaderMap {
        self.response.headers()
    }

    /// See [`Answer::map`].
    pub fn map_mut(&mut self) -> &mut HeaderMap {
        self.response.headers_mut()
    }

    /// Every field in one map, to look at or change the app's: the received fields are moved
    /// into it first.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        if let Some(received) = self.received.take() {
            let added = std::mem::take(self.response.headers_mut());
            let mut all = received.into_map(added.len());
            append_all(&mut all, added);
            *self.response.headers_mut() = all;
        }
        self.response.headers_mut()
    }

    /// The first field named `name`, the target's before the proxy's.
    pub fn get(&self, name: &HeaderName) -> Option<HeaderValue> {
        self.received
            .as_ref()
            .and_then(|received| received.get(name))
            .or_else(|| self.response.headers().get(name).cloned())
    }

    /// The response as `http` has it, every field in its map.
    pub fn into_response(mut self) -> Response<B> {
        self.headers_mut();
        let status = self.response.status();
        if status.canonical_reason().is_none() {
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(unknown_reason(status)) {
                self.response.extensions_mut().insert(reason);
            }
        }
        self.response
    }

    pub fn map_body<C>(self, f: impl FnOnce(B) -> C) -> Answer<C> {
        Answer {
            response: self.response.map(f),
            received: self.received,
        }
    }

    /// The head (status and fields) apart from the body.
    pub fn into_head_and_body(self) -> (Answer<()>, B) {
        let (parts, body) = self.response.into_parts();
        let head = Answer {
            response: Response::from_parts(parts, ()),
            received: self.received,
        };
        (head, body)
    }
}

impl Answer<()> {
    pub fn with_body<B>(self, body: B) -> Answer<B> {
        self.map_body(|()| body)
    }
}

/// Appends every value of `from` to `to`, in `from`'s order.
fn append_all(to: &mut HeaderMap, from: HeaderMap) {
    let mut last: Option<HeaderName> = None;
    for (name, value) in from {
        // The iterator names a field once, before the first of its values.
        if let Some(name) = name {
            last = Some(name);
        }
        if let Some(name) = &last {
            to.append(name.clone(), value);
        }
    }
}

/// The fields the proxy looks for in a target's response, told apart as they are parsed so
/// that no name is compared twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    ContentLength,
    ContentType,
    Date,
    Other,
}

impl Known {
    fn of(name: &HeaderName) -> Known {
        match *name {
            header::CONTENT_LENGTH => Known::ContentLength,
            header::CONTENT_TYPE => Known::ContentType,
            header::DATE => Known::Date,
            _ => Known::Other,
        }
    }

    /// Which field `name` (a parsed name: token characters only) is, in any case spelling.
    pub(crate) fn of_bytes(name: &[u8]) -> Known {
        match name.len() {
            4 if token_is(name, b"date") => Known::Date,
            12 if token_is(name, b"content-type") => Known::ContentType,
            14 if token_is(name, b"content-length") => Known::ContentLength,
            _ => Known::Other,
        }
    }
}

/// Where one field's name and value sit in the head. Offsets within a head of at most
/// 64 KiB: they fit a u32.
#[derive(Debug, Clone, Copy)]
struct Place {
    name_at: u32,
    name_len: u32,
    value_at: u32,
    value_len: u32,
    known: Known,
}

impl Place {
    fn name(self) -> std::ops::Range<usize> {
        self.name_at as usize..(self.name_at + self.name_len) as usize
    }

    fn value(self) -> std::ops::Range<usize> {
        self.value_at as usize..(self.value_at + self.value_len) as usize
    }
}

/// A target's response fields as they arrived: its head's bytes, already checked by the
/// parser, and the place of each field passed on (connection management left out).
pub struct ReceivedFields {
    head: Bytes,
    places: Vec<Place>,
}

impl ReceivedFields {
    /// Room for `fields` fields, noted with [`ReceivedFields::push`] while the parser still
    /// holds the head, which [`ReceivedFields::with_head`] then hands over.
    pub(crate) fn with_capacity(fields: usize) -> Self {
        ReceivedFields {
            head: Bytes::new(),
            places: Vec::with_capacity(fields),
        }
    }

    /// The head the noted places are in.
    pub(crate) fn with_head(mut self, head: Bytes) -> Self {
        debug_assert!(self
            .places
            .iter()
            .all(|place| place.name().end <= head.len() && place.value().end <= head.len()));
        self.head = head;
        self
    }

    /// Notes a field by where its name and value sit in the head.
    pub(crate) fn push(
        &mut self,
        name: std::ops::Range<usize>,
        value: std::ops::Range<usize>,
        known: Known,
    ) {
        self.places.push(Place {
            name_at: name.start as u32,
            name_len: name.len() as u32,
            value_at: value.start as u32,
            value_len: value.len() as u32,
            known,
        });
    }

    /// The first field named `name`.
    pub fn get(&self, name: &HeaderName) -> Option<HeaderValue> {
        let known = Known::of(name);
        let wanted = name.as_str().as_bytes();
        let place = self.places.iter().find(|place| {
            if known != Known::Other {
                place.known == known
            } else {
                place.known == Known::Other && self.head[place.name()].eq_ignore_ascii_case(wanted)
            }
        })?;
        Some(self.value(*place))
    }

    fn value(&self, place: Place) -> HeaderValue {
        // SAFETY: `from_maybe_shared_unchecked` asks for bytes `HeaderValue` accepts: tab,
        // 0x20 to 0x7e and 0x80 to 0xff. The head's parser (httparse) checked every byte of
        // every value against exactly that set (`upstream::http1`'s
        // `its_header_value_bytes_are_the_ones_header_value_accepts` tests it), so checking
        // again would only cost a second pass over every value.
        unsafe { HeaderValue::from_maybe_shared_unchecked(self.head.slice(place.value())) }
    }

    /// The fields in a map, with room for `more`.
    pub(crate) fn into_map(self, more: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.places.len() + more);
        for place in &self.places {
            let name_bytes = &self.head[place.name()];
            let name = match crate::headers::common_name(name_bytes) {
                Some(name) => name,
                // The parser accepts the same name characters as `HeaderName`: a name it
                // refuses cannot come from a parsed head.
                None => match HeaderName::from_bytes(name_bytes) {
                    Ok(name) => name,
                    Err(_) => continue,
                },
            };
            map.append(name, self.value(*place));
        }
        map
    }

    /// Writes the fields as HTTP/1.1 lines, as the target spelled them. `keep` is asked about
    /// each field the proxy looks at (not [`Known::Other`]) and leaves it out by answering
    /// false. Fields that lay one after another in the target's head go in one copy.
    pub(crate) fn write_http1(
        &self,
        out: &mut Vec<u8>,
        mut keep: impl FnMut(Known, &[u8]) -> bool,
    ) {
        let head = &self.head[..];
        let mut run: Option<(usize, usize)> = None;
        for place in &self.places {
            let (line_at, line_end) = (place.name().start, place.value().end);
            if place.known != Known::Other && !keep(place.known, &head[place.value()]) {
                continue;
            }
            run = match run {
                // The previous field's line ended right where this one begins.
                Some((run_at, run_end)) if head.get(run_end..line_at) == Some(b"\r\n") => {
                    Some((run_at, line_end))
                }
                Some((run_at, run_end)) => {
                    write_line(out, &head[run_at..run_end]);
                    Some((line_at, line_end))
                }
                None => Some((line_at, line_end)),
            };
        }
        if let Some((run_at, run_end)) = run {
            write_line(out, &head[run_at..run_end]);
        }
    }
}

/// Writes `HTTP/1.1 <code> <reason>\r\n`: the standard reason, or for a status without one
/// the reason Go's server writes ([`unknown_reason`]).
#[inline]
pub(crate) fn write_status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match status.canonical_reason() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(unknown_reason(status).as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
}

/// The reason phrase for a status without a standard one, as Go's server writes it (so
/// kamal-proxy): `599 status code 599`, where hyper would write `599 <none>`.
pub(crate) fn unknown_reason(status: StatusCode) -> String {
    format!("status code {}", status.as_u16())
}

#[cfg(test)]
impl ReceivedFields {
    /// Fields as the parser would note them: each `Name: value` line of `head`.
    pub(crate) fn from_lines(head: &'static str) -> Self {
        let mut fields = ReceivedFields::with_capacity(8);
        let mut at = 0;
        for line in head.split_inclusive('\n') {
            let text = line.trim_end_matches(['\r', '\n']);
            if let Some((name, value)) = text.split_once(':') {
                let value_at = at + name.len() + 1 + (value.len() - value.trim_start().len());
                let value = value.trim();
                fields.push(
                    at..at + name.len(),
                    value_at..value_at + value.len(),
                    Known::of_bytes(name.as_bytes()),
                );
            }
            at += line.len();
        }
        fields.with_head(Bytes::from_static(head.as_bytes()))
    }
}

fn write_line(out: &mut Vec<u8>, lines: &[u8]) {
    out.extend_from_slice(lines);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(head: &'static str) -> ReceivedFields {
        ReceivedFields::from_lines(head)
    }

    #[test]
    fn known_fields_are_told_apart_in_any_spelling() {
        for (spelling, known) in [
            ("Content-Length", Known::ContentLength),
            ("CONTENT-LENGTH", Known::ContentLength),
            ("content-type", Known::ContentType),
            ("DaTe", Known::Date),
            ("Content-Typo", Known::Other),
            ("X-Date", Known::Other),
        ] {
            assert_eq!(Known::of_bytes(spelling.as_bytes()), known, "{spelling}");
            if let Ok(name) = HeaderName::from_bytes(spelling.as_bytes()) {
                assert_eq!(Known::of(&name), known, "{spelling}");
            }
        }
    }

    #[test]
    fn fields_are_found_by_name_in_any_spelling_first_one_first() {
        let fields =
            received("Content-Type: text/html\r\nX-Trace: 1\r\nx-trace: 2\r\nDATE: today\r\n");
        assert_eq!(fields.get(&header::CONTENT_TYPE).unwrap(), "text/html");
        assert_eq!(
            fields.get(&HeaderName::from_static("x-trace")).unwrap(),
            "1"
        );
        assert_eq!(fields.get(&header::DATE).unwrap(), "today");
        assert_eq!(fields.get(&header::CONTENT_LENGTH), None);
    }

    #[test]
    fn a_map_holds_every_field_in_order() {
        let fields =
            received("Content-Type: text/html\r\nX-Trace: 1\r\nSet-Cookie: a=1\r\nx-trace: 2\r\n");
        let map = fields.into_map(0);
        let pairs: Vec<(&str, &str)> = map
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("content-type", "text/html"),
                ("x-trace", "1"),
                ("x-trace", "2"),
                ("set-cookie", "a=1"),
            ]
        );
    }

    #[test]
    fn fields_are_written_as_received_with_left_out_ones_cut_from_their_run() {
        let fields = received(
            "Server: app\r\nDate: today\r\nContent-Length: 4\r\nX-Padded:   spaced  \r\nETag: x\r\n",
        );
        let mut out = Vec::new();
        fields.write_http1(&mut out, |known, _| known != Known::ContentLength);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Server: app\r\nDate: today\r\nX-Padded:   spaced\r\nETag: x\r\n"
        );
        // Bare line feeds become CRLF.
        let fields = received("A: 1\nB: 2\n");
        let mut out = Vec::new();
        fields.write_http1(&mut out, |_, _| true);
        assert_eq!(out, b"A: 1\r\nB: 2\r\n");
    }

    #[test]
    fn an_answer_moves_received_fields_into_the_map_before_the_proxys_own() {
        let response = Response::new(());
        let mut answer =
            Answer::with_received(response, received("Set-Cookie: app=1\r\nVary: a\r\n"));
        answer
            .map_mut()
            .append(header::SET_COOKIE, HeaderValue::from_static("proxy=1"));
        assert_eq!(answer.get(&header::SET_COOKIE).unwrap(), "app=1");
        assert_eq!(answer.get(&header::VARY).unwrap(), "a");
        let response = answer.into_response();
        let cookies: Vec<&HeaderValue> = response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .collect();
        assert_eq!(cookies, ["app=1", "proxy=1"]);
        assert_eq!(response.headers().len(), 3);
    }
}
