//! Read targets and writer affinity, as kamal-proxy does them (`--read-target`,
//! `--writer-affinity-timeout`, `--read-target-websockets`): GET and HEAD go to a healthy read
//! target unless the client wrote recently, which the `kamal-writer` cookie says; every other
//! method goes to a writer, and its response sets the cookie, so the client reads its own
//! writes from the writer until the affinity timeout passes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderValue, Method, Request};

pub const WRITER_COOKIE: &str = "kamal-writer";
/// A response header with which the app opts a write out of affinity (`false`); removed
/// before the client sees it.
pub const AFFINITY_OPT_OUT: &str = "x-writer-affinity";

/// How a request to a service with read targets is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadDecision {
    /// GET or HEAD (and not a WebSocket, unless read targets take those).
    pub read_request: bool,
    /// Sent to a read target: a read request from a client without recent writes.
    pub to_reader: bool,
}

pub fn decide<B>(request: &Request<B>, readers_take_websockets: bool) -> ReadDecision {
    let read_request = matches!(*request.method(), Method::GET | Method::HEAD)
        && (readers_take_websockets || !is_websocket(request.headers()));
    ReadDecision {
        read_request,
        to_reader: read_request && !wrote_recently(request.headers(), now_millis()),
    }
}

fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Whether the request's `kamal-writer` cookie holds a time (Unix ms) still to come.
fn wrote_recently(headers: &HeaderMap, now: u128) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == WRITER_COOKIE)
        .and_then(|(_, value)| value.trim_matches('"').parse::<u128>().ok())
        .is_some_and(|until| now < until)
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// On the response to a write: sets `kamal-writer=<now + timeout, ms>; Path=/; HttpOnly;
/// Expires=<that + 1 s>`, unless the app sent `X-Writer-Affinity: false`; removes that header.
pub fn mark_write(headers: &mut HeaderMap, timeout: Duration) {
    let opted_out = headers
        .get(AFFINITY_OPT_OUT)
        .is_some_and(|value| value.as_bytes() == b"false");
    headers.remove(AFFINITY_OPT_OUT);
    if opted_out {
        return;
    }
    let until = SystemTime::now() + timeout;
    let millis = until
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let expires = httpdate::fmt_http_date(until + Duration::from_secs(1));
    let cookie = format!("{WRITER_COOKIE}={millis}; Path=/; Expires={expires}; HttpOnly");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn reads_go_to_readers_unless_the_client_wrote_recently() {
        let get = decide(&request(Method::GET, &[]), false);
        assert!(get.read_request && get.to_reader);
        let post = decide(&request(Method::POST, &[]), false);
        assert!(!post.read_request && !post.to_reader);
        let future = (now_millis() + 60_000).to_string();
        let cookie = format!("a=1; kamal-writer={future}");
        let recent = decide(&request(Method::GET, &[("cookie", &cookie)]), false);
        assert!(recent.read_request && !recent.to_reader);
        let past = decide(
            &request(Method::GET, &[("cookie", "kamal-writer=5")]),
            false,
        );
        assert!(past.to_reader);
        let websocket = [("upgrade", "websocket"), ("connection", "Upgrade")];
        assert!(!decide(&request(Method::GET, &websocket), false).to_reader);
        assert!(decide(&request(Method::GET, &websocket), true).to_reader);
    }

    #[test]
    fn a_write_sets_the_cookie_unless_the_app_opts_out() {
        let mut headers = HeaderMap::new();
        mark_write(&mut headers, Duration::from_secs(3));
        let cookie = headers[header::SET_COOKIE].to_str().unwrap().to_string();
        assert!(cookie.starts_with("kamal-writer=") && cookie.contains("; Path=/; Expires="));
        let value: u128 = cookie["kamal-writer=".len()..]
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(value > now_millis() + 2_000 && value <= now_millis() + 3_000);

        let mut opted_out = HeaderMap::new();
        opted_out.insert(AFFINITY_OPT_OUT, HeaderValue::from_static("false"));
        mark_write(&mut opted_out, Duration::from_secs(3));
        assert!(opted_out.is_empty());
    }
}
