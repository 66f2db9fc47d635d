//! Header rules for forwarding: hop-by-hop removal, X-Forwarded-*, X-Request-ID.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::ip_text::IpText;
use crate::request_target::PathShape;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");
static X_KAMAL_TARGET: HeaderName = HeaderName::from_static("x-kamal-target");

/// Headers meant for one hop only (RFC 9110 7.6.1, plus the legacy `keep-alive` and
/// `proxy-connection`), and `upgrade`, kept only for an upgrade; also the client's
/// `proxy-authorization` (credentials for this proxy, not the app) and `forwarded` (which
/// kamal-proxy drops, so apps read only the X-Forwarded-* the proxy vouches for). As header
/// names, so that finding and removing them compares names instead of parsing strings.
/// `Trailer` is not one (RFC 9110 section 6.6.2): it announces the trailers passed on.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("http2-settings"),
];

/// Places in [`HOP_BY_HOP`] that callers look for by name.
pub(crate) const HOP_CONNECTION: usize = 0;
pub(crate) const HOP_KEEP_ALIVE: usize = 1;
const HOP_TE: usize = 4;
pub(crate) const HOP_TRANSFER_ENCODING: usize = 5;

/// Where `name` sits in [`HOP_BY_HOP`], if it is one. A `HeaderName` is lowercase, so its
/// text is matched as it is: a length test and at most two comparisons; it runs for every
/// field of every request.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    hop_by_hop_index_by(name.as_str().as_bytes(), |text, lower| text == lower)
}

/// [`hop_by_hop_index`] for a name as a parser accepted it, in any case spelling.
pub(crate) fn hop_by_hop_index_any_case(name: &[u8]) -> Option<usize> {
    hop_by_hop_index_by(name, token_is)
}

/// The one list of [`HOP_BY_HOP`]'s names as text, compared by `is`.
#[inline(always)]
fn hop_by_hop_index_by(name: &[u8], is: impl Fn(&[u8], &[u8]) -> bool) -> Option<usize> {
    Some(match name.len() {
        10 if is(name, b"connection") => HOP_CONNECTION,
        10 if is(name, b"keep-alive") => HOP_KEEP_ALIVE,
        16 if is(name, b"proxy-connection") => 2,
        18 if is(name, b"proxy-authenticate") => 3,
        2 if is(name, b"te") => HOP_TE,
        17 if is(name, b"transfer-encoding") => HOP_TRANSFER_ENCODING,
        7 if is(name, b"upgrade") => 6,
        19 if is(name, b"proxy-authorization") => 7,
        9 if is(name, b"forwarded") => 8,
        14 if is(name, b"http2-settings") => 9,
        _ => return None,
    })
}

/// Whether `name`, made of token characters (as every name a parser accepted is), is
/// `lower` (lowercase letters, digits, `-`) in any case spelling. OR-ing 0x20 lowercases a
/// letter and maps no other token character onto a lowercase letter, digit or `-`, so one
/// pass with no branch per byte tells: a third of `eq_ignore_ascii_case`'s cost.
#[inline]
pub(crate) fn token_is(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len()
        && name.iter().zip(lower).fold(0, |differ, (byte, wanted)| {
            differ | ((byte | 0x20) ^ wanted)
        }) == 0
}

/// The names request and response heads usually carry, spelled as browsers, HTTP libraries,
/// servers and app frameworks send them. Matched on the bytes (a length test, then a
/// comparison or a few), they skip `HeaderName::from_bytes`, which lowercases and looks up
/// each name (130 to 180 instructions), and allocates a copy of each name it does not know,
/// such as the `Sec-Fetch-*` a browser sends with every request.
pub(crate) fn common_name(name: &[u8]) -> Option<HeaderName> {
    const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
    const SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");
    const SEC_FETCH_DEST: HeaderName = HeaderName::from_static("sec-fetch-dest");
    const SEC_FETCH_USER: HeaderName = HeaderName::from_static("sec-fetch-user");
    const SEC_CH_UA: HeaderName = HeaderName::from_static("sec-ch-ua");
    const SEC_CH_UA_MOBILE: HeaderName = HeaderName::from_static("sec-ch-ua-mobile");
    const SEC_CH_UA_PLATFORM: HeaderName = HeaderName::from_static("sec-ch-ua-platform");
    Some(match name {
        // Both ways.
        b"Connection" | b"connection" => header::CONNECTION,
        b"Cache-Control" | b"cache-control" => header::CACHE_CONTROL,
        b"Content-Type" | b"content-type" => header::CONTENT_TYPE,
        b"Content-Length" | b"content-length" => header::CONTENT_LENGTH,
        b"Transfer-Encoding" | b"transfer-encoding" => header::TRANSFER_ENCODING,
        // Requests.
        b"Host" | b"host" => header::HOST,
        b"User-Agent" | b"user-agent" => header::USER_AGENT,
        b"Accept" | b"accept" => header::ACCEPT,
        b"Accept-Encoding" | b"accept-encoding" => header::ACCEPT_ENCODING,
        b"Accept-Language" | b"accept-language" => header::ACCEPT_LANGUAGE,
        b"Cookie" | b"cookie" => header::COOKIE,
        b"Referer" | b"referer" => header::REFERER,
        b"Origin" | b"origin" => header::ORIGIN,
        b"Pragma" | b"pragma" => header::PRAGMA,
        b"If-None-Match" | b"if-none-match" => header::IF_NONE_MATCH,
        b"If-Modified-Since" | b"if-modified-since" => header::IF_MODIFIED_SINCE,
        b"Authorization" | b"authorization" => header::AUTHORIZATION,
        b"Upgrade-Insecure-Requests" | b"upgrade-insecure-requests" => {
            header::UPGRADE_INSECURE_REQUESTS
        }
        b"Sec-Fetch-Site" | b"sec-fetch-site" => SEC_FETCH_SITE,
        b"Sec-Fetch-Mode" | b"sec-fetch-mode" => SEC_FETCH_MODE,
        b"Sec-Fetch-Dest" | b"sec-fetch-dest" => SEC_FETCH_DEST,
        b"Sec-Fetch-User" | b"sec-fetch-user" => SEC_FETCH_USER,
        b"sec-ch-ua" | b"Sec-Ch-Ua" => SEC_CH_UA,
        b"sec-ch-ua-mobile" | b"Sec-Ch-Ua-Mobile" => SEC_CH_UA_MOBILE,
        b"sec-ch-ua-platform" | b"Sec-Ch-Ua-Platform" => SEC_CH_UA_PLATFORM,
        // Responses.
        b"Date" | b"date" => header::DATE,
        b"Server" | b"server" => header::SERVER,
        b"Last-Modified" | b"last-modified" => header::LAST_MODIFIED,
        b"ETag" | b"etag" => header::ETAG,
        b"Accept-Ranges" | b"accept-ranges" => header::ACCEPT_RANGES,
        b"Vary" | b"vary" => header::VARY,
        b"Set-Cookie" | b"set-cookie" => header::SET_COOKIE,
        b"Content-Encoding" | b"content-encoding" => header::CONTENT_ENCODING,
        b"Location" | b"location" => header::LOCATION,
        b"Expires" | b"expires" => header::EXPIRES,
        b"Referrer-Policy" | b"referrer-policy" => header::REFERRER_POLICY,
        b"X-Content-Type-Options" | b"x-content-type-options" => header::X_CONTENT_TYPE_OPTIONS,
        b"X-Frame-Options" | b"x-frame-options" => header::X_FRAME_OPTIONS,
        b"Strict-Transport-Security" | b"strict-transport-security" => {
            header::STRICT_TRANSPORT_SECURITY
        }
        b"Content-Security-Policy" | b"content-security-policy" => header::CONTENT_SECURITY_POLICY,
        _ => return None,
    })
}

/// The options the Connection fields list, trimmed: `keep-alive`, `close`, `upgrade`, or
/// names of other fields meant for this hop only.
pub fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}

/// A Content-Length value that is plain digits (and fits), as most are: read without a map
/// lookup or a string conversion where a head is parsed or written.
pub fn plain_length(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |length, &byte| {
        let digit = byte.wrapping_sub(b'0');
        (digit <= 9).then_some(())?;
        length.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// True for an HTTP/1.1 request asking to switch protocols (WebSocket and the like) that the
/// proxy tunnels. Never for `h2c`: a tunnelled HTTP/2 connection would carry requests past
/// routing, limits, logging and pause; such a request goes on as a plain one instead, its
/// `Upgrade` and `HTTP2-Settings` removed with the other hop-by-hop fields.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    let Some(upgrade) = headers.get(header::UPGRADE) else {
        return false;
    };
    let asks_h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim().eq_ignore_ascii_case("h2c"));
    !upgrade.is_empty()
        && !asks_h2c
        && connection_options(headers).any(|option| option.eq_ignore_ascii_case("upgrade"))
}

/// Removes headers meant for one hop only, including those the Connection header names.
/// For an upgrade, `Connection: upgrade` and `Upgrade` are kept so the target can switch.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names, and removals (each a hash lookup) only for what is there:
    // most messages carry none, or only `Connection: keep-alive`. Nothing is allocated.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(index) = hop_by_hop_index(name) {
            present[index] = true;
            any = true;
        }
    }
    if !any {
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    if present[HOP_CONNECTION] {
        remove_listed_in_connection(headers);
    }
    // `TE: trailers` says the client takes trailers, which the proxy passes on.
    let te_trailers = present[HOP_TE]
        && headers
            .get_all(header::TE)
            .iter()
            .any(|value| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present[index] && !(upgrade && *name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Removes the headers the Connection header names. Most list only `keep-alive`, `close`
/// or `upgrade`, handled with the other hop-by-hop ones; only other names cost allocations.
fn remove_listed_in_connection(headers: &mut HeaderMap) {
    // The usual value, a single `keep-alive` or `close`, names nothing else.
    let mut values = headers.get_all(header::CONNECTION).iter();
    if let (Some(only), None) = (values.next(), values.next()) {
        let value = only.as_bytes();
        if value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close") {
            return;
        }
    }
    // Empty, so not allocated, unless other names are listed.
    let listed: Vec<HeaderName> = connection_options(headers)
        .filter(|token| {
            !token.is_empty()
                && !token.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|hop| hop.as_str().eq_ignore_ascii_case(token))
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

/// What the X-Forwarded-* headers are made from: the connection, the request's host, and
/// whether what the client sent is trusted (`--forward-headers`, or a trusted proxy).
pub struct Forwarding<'a> {
    pub peer: IpAddr,
    pub scheme: &'static str,
    pub host: Option<&'a HeaderValue>,
    pub trust_incoming: bool,
    /// `--client-ip-header`: a trusted header naming the client, which X-Forwarded-For then
    /// starts from.
    pub client_ip_header: Option<&'a str>,
}

/// Sets X-Forwarded-For/Proto/Host as kamal-proxy does. With `trust_incoming`, values from
/// the client are kept: X-Forwarded-For (all its lines, joined) or, when given, the client-IP
/// header's value, with the peer appended; otherwise they are replaced.
pub fn set_forwarded(headers: &mut HeaderMap, forwarding: &Forwarding<'_>) {
    let Forwarding {
        peer,
        scheme,
        host,
        trust_incoming,
        client_ip_header,
    } = *forwarding;
    let peer = IpText::new(peer);
    let peer = peer.as_str();
    // Looked up only when it is kept: the untrusted case, the usual one, replaces it unread.
    let kept = if trust_incoming {
        let from_header = client_ip_header.and_then(|name| headers.get(name));
        match from_header {
            Some(value) => joined(std::iter::once(value), peer),
            None => {
                let mut lines = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
                lines
                    .peek()
                    .is_some()
                    .then(|| joined(lines, peer))
                    .flatten()
            }
        }
    } else {
        None
    };
    let forwarded_for = kept.unwrap_or_else(|| {
        HeaderValue::from_str(peer).expect("an IP address is a valid header value")
    });
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    if !(trust_incoming && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    }
    if !(trust_incoming && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
}

/// The headers the proxy adds to a request for its app (X-Forwarded-For, -Proto and -Host,
/// X-Request-Start, X-Kamal-Target, X-Request-ID), when the client sent none of them: then
/// no rule needs to read the request's map, and the upstream client writes them straight
/// into the request head it sends. Inserting six names into the map (each hashed, probed and
/// read back when the head is written) cost about 3,600 instructions of every request.
pub struct AddedHeaders {
    forwarded_for: IpText,
    forwarded_proto: &'static str,
    forwarded_host: Option<HeaderValue>,
    request_start: HeaderValue,
    kamal_target: HeaderValue,
    request_id: HeaderValue,
}

impl AddedHeaders {
    /// Appends them as HTTP/1.1 header lines.
    pub fn write_to(&self, head: &mut Vec<u8>) {
        let mut line = |name: &[u8], value: &[u8]| {
            head.extend_from_slice(name);
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        };
        line(b"x-forwarded-for: ", self.forwarded_for.as_bytes());
        line(b"x-forwarded-proto: ", self.forwarded_proto.as_bytes());
        if let Some(host) = &self.forwarded_host {
            line(b"x-forwarded-host: ", host.as_bytes());
        }
        line(b"x-request-start: ", self.request_start.as_bytes());
        line(b"x-kamal-target: ", self.kamal_target.as_bytes());
        line(b"x-request-id: ", self.request_id.as_bytes());
    }

    /// Puts them in `headers`, for a request sent by a client that writes its own head.
    pub fn insert_into(self, headers: &mut HeaderMap) {
        let forwarded_for = HeaderValue::from_bytes(self.forwarded_for.as_bytes())
            .expect("an IP address is a valid header value");
        headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.forwarded_proto),
        );
        if let Some(host) = self.forwarded_host {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        headers.insert(X_REQUEST_START.clone(), self.request_start);
        headers.insert(X_KAMAL_TARGET.clone(), self.kamal_target);
        headers.insert(X_REQUEST_ID.clone(), self.request_id);
    }
}

/// One of the names [`AddedHeaders`] sets. A match on the text, like [`hop_by_hop_index`].
fn is_added_name(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-request-start"
            | "x-kamal-target"
            | "x-request-id"
    )
}

/// What the app is told about the request, as kamal-proxy tells it: X-Forwarded-For, -Proto
/// and -Host ([`set_forwarded`]), X-Request-Start and X-Kamal-Target ([`set_kamal_headers`])
/// and X-Request-ID ([`ensure_request_id`]). Returns the request's ID, and the headers to
/// add when the client sent none of them (see [`AddedHeaders`]); otherwise they are set in
/// `headers`, by the rules for what the client sent.
pub fn forwarding_headers(
    headers: &mut HeaderMap,
    forwarding: &Forwarding<'_>,
    target: &HeaderValue,
) -> (HeaderValue, Option<AddedHeaders>) {
    let trust_incoming = forwarding.trust_incoming;
    // A trusted client-IP header (any name) decides X-Forwarded-For: the rules read it.
    let rules_needed = (trust_incoming && forwarding.client_ip_header.is_some())
        || headers.keys().any(is_added_name);
    if rules_needed {
        set_forwarded(headers, forwarding);
        set_kamal_headers(headers, target, trust_incoming);
        return (ensure_request_id(headers), None);
    }
    let request_id = new_request_id();
    let added = AddedHeaders {
        forwarded_for: IpText::new(forwarding.peer),
        forwarded_proto: forwarding.scheme,
        forwarded_host: forwarding.host.cloned(),
        request_start: request_start_now(),
        kamal_target: target.clone(),
        request_id: request_id.clone(),
    };
    (request_id, Some(added))
}

/// `a, b, ..., last`: header lines joined as one list, with `last` appended.
fn joined<'a>(lines: impl Iterator<Item = &'a HeaderValue>, last: &str) -> Option<HeaderValue> {
    let mut text = Vec::new();
    for line in lines {
        text.extend_from_slice(line.as_bytes());
        text.extend_from_slice(b", ");
    }
    text.extend_from_slice(last.as_bytes());
    HeaderValue::from_bytes(&text).ok()
}

/// The headers kamal-proxy adds for the app: `X-Request-Start: t=<unix ms>` when the request
/// has none (APM queue-time metrics read it), and `X-Kamal-Target` naming the target, after
/// the client's value only when its forwarded headers are trusted.
pub fn set_kamal_headers(headers: &mut HeaderMap, target: &HeaderValue, trust_incoming: bool) {
    // Each through the entry API: one hash and probe per header instead of a look and a set.
    match headers.entry(&X_REQUEST_START) {
        header::Entry::Vacant(vacant) => {
            vacant.insert(request_start_now());
        }
        header::Entry::Occupied(mut occupied) if occupied.get().is_empty() => {
            occupied.insert(request_start_now());
        }
        header::Entry::Occupied(_) => {}
    }
    match headers.entry(&X_KAMAL_TARGET) {
        header::Entry::Vacant(vacant) => {
            vacant.insert(target.clone());
        }
        header::Entry::Occupied(mut occupied) => {
            let kept = trust_incoming
                .then(|| joined(occupied.iter(), target.to_str().ok()?))
                .flatten();
            occupied.insert(kept.unwrap_or_else(|| target.clone()));
        }
    }
}

thread_local! {
    /// The last `t=<unix ms>` value made on this thread: requests in the same millisecond
    /// share it (a reference count) instead of formatting and allocating their own.
    static REQUEST_START: std::cell::RefCell<(u128, Option<HeaderValue>)> =
        const { std::cell::RefCell::new((0, None)) };
}

fn request_start_now() -> HeaderValue {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    REQUEST_START.with(|cached| {
        let mut cached = cached.borrow_mut();
        if let (at, Some(value)) = &*cached {
            if *at == now {
                return value.clone();
            }
        }
        // Made in one shared buffer (one allocation: a `Vec` turned into `Bytes` allocates
        // again on its first clone), as a server that sees less than a request a millisecond
        // does for every request.
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(now).as_bytes();
        let mut text = RequestStart {
            bytes: [0; 2 + 39],
            len: 2 + digits.len(),
        };
        text.bytes[..2].copy_from_slice(b"t=");
        text.bytes[2..text.len].copy_from_slice(digits);
        // SAFETY: `t=` and decimal digits are bytes a header value may hold; the check would
        // only go over them again (`request_start_is_t_equals_milliseconds` tests the form).
        let value =
            unsafe { HeaderValue::from_maybe_shared_unchecked(bytes::Bytes::from_owner(text)) };
        *cached = (now, Some(value.clone()));
        value
    })
}

/// `t=<unix ms>` on the stack, for `Bytes::from_owner`: a u128 has at most 39 digits.
struct RequestStart {
    bytes: [u8; 2 + 39],
    len: usize,
}

impl AsRef<[u8]> for RequestStart {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The X-Forwarded-For header's name, for code that compares names.
pub fn x_forwarded_for() -> &'static HeaderName {
    &X_FORWARDED_FOR
}

/// Scopes the app's cookies under `prefix` (`--scope-cookie-paths`), as kamal-proxy does: each
/// `Set-Cookie` whose Domain is absent or `host` gets its Path joined under the prefix
/// (`Path=/` → `Path=/app`, `Path=/x` → `Path=/app/x`, none → `Path=/app`); cookies for other
/// domains are left alone.
pub fn scope_cookie_paths(headers: &mut HeaderMap, prefix: &str, host: &str) {
    let scoped: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|cookie| scope_cookie(cookie, prefix, host))
                .and_then(|cookie| HeaderValue::from_str(&cookie).ok())
                .unwrap_or_else(|| value.clone())
        })
        .collect();
    if scoped.is_empty() {
        return;
    }
    headers.remove(header::SET_COOKIE);
    for value in scoped {
        headers.append(header::SET_COOKIE, value);
    }
}

/// One `Set-Cookie` value with its Path under `prefix`, or `None` to leave it as it is.
fn scope_cookie(cookie: &str, prefix: &str, host: &str) -> Option<String> {
    let mut parts = cookie.split(';');
    let pair = parts.next()?.trim();
    pair.split_once('=')?;
    let mut attributes = Vec::new();
    let mut path = String::new();
    for attribute in parts {
        let attribute = attribute.trim();
        let (name, value) = attribute.split_once('=').unwrap_or((attribute, ""));
        if name.eq_ignore_ascii_case("path") {
            path = value.trim().to_string();
            continue;
        }
        if name.eq_ignore_ascii_case("domain") {
            let domain = value.trim().trim_start_matches('.');
            if !domain.is_empty() && !domain.eq_ignore_ascii_case(host) {
                return None;
            }
        }
        if !attribute.is_empty() {
            attributes.push(attribute);
        }
    }
    let rest = path.trim_matches('/');
    let scoped_path = if rest.is_empty() {
        prefix.to_string()
    } else {
        format!("{}/{rest}", prefix.trim_end_matches('/'))
    };
    let mut out = format!("{pair}; Path={scoped_path}");
    for attribute in attributes {
        out.push_str("; ");
        out.push_str(attribute);
    }
    Some(out)
}

/// Returns the request's X-Request-ID, adding a new UUID when it has none.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(existing) = headers.get(&X_REQUEST_ID).filter(|v| !v.is_empty()) {
        return existing.clone();
    }
    let value = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), value.clone());
    value
}

/// A new random request ID (a UUID v4).
fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    // Owned by a shared buffer from the start, so the clone for the log costs no allocation
    // (a value copied from a slice is copied again on its first clone).
    let shared = bytes::Bytes::from_owner(text);
    // SAFETY: `from_maybe_shared_unchecked` asks for bytes a header value may hold; a
    // hyphenated UUID is lowercase hex digits and `-`. Checking them costs ~200 instructions
    // a request (`request_ids_are_uuids` checks the form).
    unsafe { HeaderValue::from_maybe_shared_unchecked(shared) }
}

/// Refuses request heads whose framing or host two parsers could read differently, the
/// ground request smuggling grows on. hyper already refuses malformed lengths, chunk sizes,
/// header names and line folding; these are the cases it lets through. Also refuses a path
/// with a broken percent-escape, as kamal-proxy does, and says what the path needs before
/// it goes on ([`crate::request_target`]), and CONNECT, which asks for a tunnel to anywhere.
pub fn check_request_head<B>(request: &http::Request<B>) -> Result<PathShape, &'static str> {
    // A forward proxy's method: never sent on to an app (kamal-proxy's Go transport refuses
    // it before reaching the app too; nginx answers 400).
    if request.method() == http::Method::CONNECT {
        return Err("CONNECT is not supported: this is a reverse proxy.");
    }
    let headers = request.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("More than one Host header.");
    }
    match host {
        // Empty when the target has no host part (RFC 9112 section 3.2): only a service
        // without hosts takes it, as in kamal-proxy.
        Some(host) if host.is_empty() && request.uri().authority().is_none() => {}
        Some(host) => {
            if !is_host_and_port(host.as_bytes()) {
                return Err("Invalid Host header.");
            }
            if let Some(target) = request.uri().authority() {
                if !target
                    .as_str()
                    .as_bytes()
                    .eq_ignore_ascii_case(host.as_bytes())
                {
                    return Err("The Host header and the request target name different hosts.");
                }
            }
        }
        None if request.version() == http::Version::HTTP_11
            && request.uri().authority().is_none() =>
        {
            return Err("Missing Host header.");
        }
        None => {}
    }
    // With both Transfer-Encoding and Content-Length, hyper has already dropped the length
    // and will close the connection after the response (RFC 9112 section 6.3); what it lets
    // through is a stack of codings ending in chunked.
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(coding) = codings.next() {
        if codings.next().is_some() || !coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err("Unsupported Transfer-Encoding.");
        }
    }
    crate::request_target::inspect_path(request.uri().path())
        .map_err(|_| "Invalid percent-encoding in the request target.")
}

/// Whether a Host value is `host[:port]` (a name, an IPv4 address or a bracketed IPv6 one),
/// checked without allocating: it runs on every request.
fn is_host_and_port(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(colon) if !value.ends_with(b"]") => (&value[..colon], &value[colon + 1..]),
        _ => (value, &b""[..]),
    };
    let host_ok = match host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        Some(address) => {
            !address.is_empty()
                && address
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        }
        None => {
            !host.is_empty()
                && host
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        }
    };
    host_ok && port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// Address ranges of proxies in front of this one (a load balancer, a CDN) whose
/// X-Forwarded-* headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    pub fn new(ranges: Vec<ipnet::IpNet>) -> Self {
        Self(ranges)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|range| range.contains(&address))
    }

    /// The client behind a trusted `peer`: walking X-Forwarded-For from the right, the first
    /// address that is not a trusted proxy. A malformed entry stops the walk at the last good
    /// one, so a client cannot pose as someone else by writing garbage.
    pub fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let mut client = peer;
        let hops = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            if !self.contains(client) {
                break;
            }
            match hop.trim().parse::<IpAddr>() {
                Ok(address) => client = address,
                Err(_) => break,
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    /// The shortcut gives the same names `HeaderName::from_bytes` would, in either spelling.
    #[test]
    fn common_names_are_the_names_a_full_parse_gives() {
        let spelled = [
            "Connection",
            "Cache-Control",
            "Content-Type",
            "Content-Length",
            "Transfer-Encoding",
            "Host",
            "User-Agent",
            "Accept",
            "Accept-Encoding",
            "Accept-Language",
            "Cookie",
            "Referer",
            "Origin",
            "Pragma",
            "If-None-Match",
            "If-Modified-Since",
            "Authorization",
            "Upgrade-Insecure-Requests",
            "Sec-Fetch-Site",
            "Sec-Fetch-Mode",
            "Sec-Fetch-Dest",
            "Sec-Fetch-User",
            "Sec-Ch-Ua",
            "Sec-Ch-Ua-Mobile",
            "Sec-Ch-Ua-Platform",
            "Date",
            "Server",
            "Last-Modified",
            "ETag",
            "Accept-Ranges",
            "Vary",
            "Set-Cookie",
            "Content-Encoding",
            "Location",
            "Expires",
            "Referrer-Policy",
            "X-Content-Type-Options",
            "X-Frame-Options",
            "Strict-Transport-Security",
            "Content-Security-Policy",
        ];
        for name in spelled {
            for spelling in [name.to_string(), name.to_ascii_lowercase()] {
                let parsed = HeaderName::from_bytes(spelling.as_bytes()).unwrap();
                assert_eq!(common_name(spelling.as_bytes()), Some(parsed), "{spelling}");
            }
        }
        for other in ["HOST", "CONTENT-TYPE", "X-Custom"] {
            assert_eq!(
                common_name(other.as_bytes()),
                None,
                "{other}: the full parse"
            );
        }
    }

    #[test]
    fn each_hop_by_hop_name_is_found_at_its_place() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(index), "{name}");
            let text = name.as_str();
            assert_eq!(hop_by_hop_index_any_case(text.as_bytes()), Some(index));
            let upper = text.to_ascii_uppercase();
            assert_eq!(
                hop_by_hop_index_any_case(upper.as_bytes()),
                Some(index),
                "{upper}"
            );
        }
        for name in ["host", "content-length", "x-connection", "tes", "upgrades"] {
            let name = HeaderName::from_static(name);
            assert_eq!(hop_by_hop_index(&name), None, "{name}");
            assert_eq!(hop_by_hop_index_any_case(name.as_str().as_bytes()), None);
        }
        assert_eq!(HOP_BY_HOP[HOP_CONNECTION], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[HOP_KEEP_ALIVE], "keep-alive");
        assert_eq!(HOP_BY_HOP[HOP_TE], header::TE);
        assert_eq!(HOP_BY_HOP[HOP_TRANSFER_ENCODING], header::TRANSFER_ENCODING);
    }

    #[test]
    fn token_names_compare_as_eq_ignore_ascii_case_does() {
        const TOKEN: &[u8] =
            b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        for wanted in [&b"content-length"[..], b"te", b"http2-settings", b"date"] {
            // Every token character in every position of a name of the wanted length.
            for at in 0..wanted.len() {
                for &byte in TOKEN {
                    let mut name = wanted.to_vec();
                    name[at] = byte;
                    assert_eq!(
                        token_is(&name, wanted),
                        name.eq_ignore_ascii_case(wanted),
                        "{:?}",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
            assert!(!token_is(&wanted[1..], wanted));
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut map, false);
        let names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["accept"]);
    }

    #[test]
    fn names_listed_in_any_connection_header_are_removed_whatever_their_case() {
        let mut map = headers(&[
            ("connection", "Keep-Alive, X-Secret"),
            ("connection", " close ,x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]);
        remove_hop_by_hop(&mut map, false);
        let names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn an_upgrade_drops_other_names_its_connection_header_lists() {
        let mut map = headers(&[
            ("connection", "Upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
        ]);
        remove_hop_by_hop(&mut map, true);
        assert!(!map.contains_key("x-secret"));
        assert_eq!(map["upgrade"], "websocket");
        assert_eq!(map["connection"], "upgrade");
    }

    #[test]
    fn h2c_is_never_an_upgrade_the_proxy_tunnels() {
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert!(!is_upgrade_request(&h2c));
        let mut forwarded = h2c.clone();
        remove_hop_by_hop(&mut forwarded, false);
        assert!(forwarded.is_empty(), "{forwarded:?}");
        assert!(!is_upgrade_request(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket, H2C"),
        ])));
        assert!(is_upgrade_request(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ])));
    }

    #[test]
    fn upgrades_keep_their_upgrade_headers() {
        let mut map = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(&map));
        remove_hop_by_hop(&mut map, true);
        assert_eq!(map["upgrade"], "websocket");
        assert_eq!(map["connection"], "upgrade");
    }

    #[test]
    fn forwarded_for_is_appended_when_trusted_and_replaced_otherwise() {
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let host = HeaderValue::from_static("app.test");
        let mut trusted = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        trusted.append("x-forwarded-for", HeaderValue::from_static("5.6.7.8"));
        let forwarding = |host, trust_incoming, client_ip_header| Forwarding {
            peer: ip,
            scheme: "http",
            host,
            trust_incoming,
            client_ip_header,
        };
        set_forwarded(&mut trusted, &forwarding(Some(&host), true, None));
        assert_eq!(trusted["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(trusted["x-forwarded-proto"], "https");
        assert_eq!(trusted["x-forwarded-host"], "app.test");

        let mut untrusted = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(
            &mut untrusted,
            &forwarding(Some(&host), false, Some("x-real-ip")),
        );
        assert_eq!(untrusted["x-forwarded-for"], "10.0.0.9");
        assert_eq!(untrusted["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_client_ip_header_replaces_forwarded_for_when_trusted_as_in_kamal_proxy() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut map = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-real-ip", "9.9.9.9")]);
        let forwarding = Forwarding {
            peer: ip,
            scheme: "http",
            host: None,
            trust_incoming: true,
            client_ip_header: Some("x-real-ip"),
        };
        set_forwarded(&mut map, &forwarding);
        assert_eq!(map["x-forwarded-for"], "9.9.9.9, 127.0.0.1");
    }

    #[test]
    fn kamal_headers_name_the_target_and_the_request_start() {
        let mut trusted = headers(&[("x-kamal-target", "evil"), ("x-request-start", "")]);
        let target = HeaderValue::from_static("10.0.0.1:3000");
        set_kamal_headers(&mut trusted, &target, true);
        assert_eq!(trusted["x-kamal-target"], "evil, 10.0.0.1:3000");
        let start = trusted["x-request-start"].to_str().unwrap();
        assert!(
            start.starts_with("t=") && start[2..].parse::<u64>().is_ok(),
            "{start}"
        );

        let mut untrusted = headers(&[("x-kamal-target", "evil"), ("x-request-start", "t=1")]);
        set_kamal_headers(&mut untrusted, &target, false);
        assert_eq!(untrusted["x-kamal-target"], "10.0.0.1:3000");
        assert_eq!(untrusted["x-request-start"], "t=1");
    }

    #[test]
    fn proxy_credentials_and_forwarded_are_dropped_and_te_trailers_kept() {
        let mut map = headers(&[
            ("proxy-authorization", "Basic x"),
            ("forwarded", "for=1.1.1.1"),
            ("te", "trailers"),
        ]);
        remove_hop_by_hop(&mut map, false);
        assert!(!map.contains_key("proxy-authorization") && !map.contains_key("forwarded"));
        assert_eq!(map["te"], "trailers");
        let mut other = headers(&[("te", "gzip")]);
        remove_hop_by_hop(&mut other, false);
        assert!(!other.contains_key("te"));
    }

    #[test]
    fn cookies_are_scoped_under_the_prefix_unless_for_another_domain() {
        let mut map = HeaderMap::new();
        for cookie in [
            "a=1; Path=/; HttpOnly",
            "b=2",
            "c=3; path=/x/y/; Secure",
            "d=4; Domain=app.test; Path=/",
            "e=5; Domain=.other.test; Path=/",
        ] {
            map.append(header::SET_COOKIE, HeaderValue::from_static(cookie));
        }
        scope_cookie_paths(&mut map, "/app", "app.test");
        let cookies: Vec<&str> = map
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            cookies,
            [
                "a=1; Path=/app; HttpOnly",
                "b=2; Path=/app",
                "c=3; Path=/app/x/y; Secure",
                "d=4; Path=/app; Domain=app.test",
                "e=5; Domain=.other.test; Path=/",
            ]
        );
    }

    #[test]
    fn request_start_is_t_equals_milliseconds() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let value = request_start_now();
        let millis: u128 = value
            .to_str()
            .unwrap()
            .strip_prefix("t=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(millis >= before && millis < before + 1000, "{value:?}");
        assert_eq!(HeaderValue::from_bytes(value.as_bytes()).unwrap(), value);
    }

    #[test]
    fn request_ids_are_uuids() {
        for _ in 0..100 {
            let id = new_request_id();
            let parsed = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(HeaderValue::from_bytes(id.as_bytes()).unwrap(), id);
            assert_eq!(id.as_bytes(), parsed.hyphenated().to_string().as_bytes());
        }
    }

    #[test]
    fn an_existing_request_id_is_kept() {
        let mut map = headers(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut map), "abc");
        let mut fresh = HeaderMap::new();
        let id = ensure_request_id(&mut fresh);
        assert_eq!(id.len(), 36);
        assert_eq!(fresh["x-request-id"], id);
    }

    #[test]
    fn the_client_behind_trusted_proxies_is_the_first_untrusted_hop_from_the_right() {
        let trusted = TrustedProxies::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ]);
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let map = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 192.0.2.7")]);
        assert_eq!(
            trusted.client_ip(&map, peer),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let garbage = headers(&[("x-forwarded-for", "1.1.1.1, nonsense, 192.0.2.7")]);
        assert_eq!(
            trusted.client_ip(&garbage, peer),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        let untrusted_peer: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(trusted.client_ip(&map, untrusted_peer), untrusted_peer);
        assert!(trusted.contains("::ffff:10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn host_values_are_a_host_and_an_optional_port() {
        for valid in [
            &b"app.test"[..],
            b"app.test:8080",
            b"127.0.0.1:80",
            b"[::1]",
            b"[::1]:443",
            b"a_b",
        ] {
            assert!(is_host_and_port(valid), "{valid:?}");
        }
        for invalid in [
            &b""[..],
            b"app.test/evil",
            b"user@app.test",
            b"a b",
            b"app.test:x",
            b"[::1",
            b"app.test:123456",
            b":80",
        ] {
            assert!(!is_host_and_port(invalid), "{invalid:?}");
        }
    }
}
