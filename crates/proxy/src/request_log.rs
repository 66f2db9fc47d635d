//! The request log: one JSON object per request on stdout, with kamal-proxy's field names.
//!
//! Written directly rather than through `tracing`, because the `req_<header>` and
//! `resp_<header>` fields are named at deploy time and tracing fields are fixed at compile time.
//! The line carries the same `timestamp`/`level`/`message` keys as the daemon's other logs.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{header, HeaderMap, Method, Version};
use serde::Serialize;

use crate::metrics::Metrics;

/// Everything known about one request, logged once when it ends.
pub struct RequestRecord {
    started: Instant,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub query: String,
    pub method: Method,
    pub proto: Version,
    pub scheme: &'static str,
    pub peer: SocketAddr,
    pub client_addr: String,
    pub user_agent: String,
    pub req_content_length: Option<u64>,
    pub req_content_type: String,
    pub request_id: String,
    pub service: String,
    pub target: String,
    pub status: u16,
    pub resp_content_length: Option<u64>,
    pub resp_content_type: String,
    pub extra: Vec<(String, String)>,
    /// Where the request is counted once logged; `None` for unrouted or excluded paths.
    pub metrics: Option<Arc<Metrics>>,
    /// Time from sending the request to the target to its response head.
    pub upstream_duration: Option<std::time::Duration>,
    emitted: bool,
}

fn header_str(headers: &HeaderMap, name: &header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

impl RequestRecord {
    pub fn begin<B>(
        request: &http::Request<B>,
        peer: SocketAddr,
        local_port: u16,
        scheme: &'static str,
    ) -> Self {
        let headers = request.headers();
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default();
        Self {
            started: Instant::now(),
            host: crate::route::strip_port(host).to_string(),
            port: local_port,
            path: request.uri().path().to_string(),
            query: request.uri().query().unwrap_or_default().to_string(),
            method: request.method().clone(),
            proto: request.version(),
            scheme,
            peer,
            client_addr: peer.ip().to_string(),
            user_agent: header_str(headers, &header::USER_AGENT),
            req_content_length: headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            req_content_type: header_str(headers, &header::CONTENT_TYPE),
            request_id: String::new(),
            service: String::new(),
            target: String::new(),
            status: 0,
            resp_content_length: None,
            resp_content_type: String::new(),
            extra: Vec::new(),
            metrics: None,
            upstream_duration: None,
            emitted: false,
        }
    }

    /// Copies the named headers into `<prefix><lowercase name>` fields.
    pub fn capture_headers(&mut self, prefix: &str, names: &[String], headers: &HeaderMap) {
        for name in names {
            if let Some(value) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                let key = format!("{prefix}{}", name.to_ascii_lowercase().replace('-', "_"));
                self.extra.push((key, value.to_string()));
            }
        }
    }

    /// Writes the log line (once).
    pub fn emit(&mut self) {
        if std::mem::replace(&mut self.emitted, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let line = Line {
            timestamp: Timestamp(SystemTime::now()),
            level: "INFO",
            message: "Request",
            host: &self.host,
            port: self.port,
            path: &self.path,
            request_id: &self.request_id,
            status: self.status,
            service: &self.service,
            target: &self.target,
            duration: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            method: self.method.as_str(),
            req_content_length: self.req_content_length.unwrap_or(0),
            req_content_type: &self.req_content_type,
            resp_content_length: self.resp_content_length.unwrap_or(0),
            resp_content_type: &self.resp_content_type,
            client_addr: &self.client_addr,
            client_port: self.peer.port(),
            remote_addr: PeerIp(self.peer),
            user_agent: &self.user_agent,
            proto: proto_name(self.proto),
            scheme: self.scheme,
            query: &self.query,
            extra: Extra(&self.extra),
        };
        LINE.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.clear();
            if serde_json::to_writer(&mut *buffer, &line).is_err() {
                return;
            }
            buffer.push(b'\n');
            // A failed write to stdout (closed pipe) must not disturb the request.
            let _ = std::io::stdout().lock().write_all(&buffer);
        });
        if let Some(metrics) = self.metrics.take() {
            let service = std::mem::take(&mut self.service);
            if let Some(upstream) = self.upstream_duration {
                let target = std::mem::take(&mut self.target);
                metrics.observe_upstream(service.clone(), target, upstream);
            }
            metrics.observe_request(service, &self.method, self.status, elapsed);
        }
    }
}

thread_local! {
    /// Each worker thread formats its log lines in one reused buffer.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
}

/// One request log line, borrowed from the record: no per-field allocation.
#[derive(Serialize)]
struct Line<'a> {
    timestamp: Timestamp,
    level: &'static str,
    message: &'static str,
    host: &'a str,
    port: u16,
    path: &'a str,
    request_id: &'a str,
    status: u16,
    service: &'a str,
    target: &'a str,
    duration: u64,
    method: &'a str,
    req_content_length: u64,
    req_content_type: &'a str,
    resp_content_length: u64,
    resp_content_type: &'a str,
    client_addr: &'a str,
    client_port: u16,
    remote_addr: PeerIp,
    user_agent: &'a str,
    proto: &'static str,
    scheme: &'static str,
    query: &'a str,
    #[serde(flatten)]
    extra: Extra<'a>,
}

struct Timestamp(SystemTime);

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

struct PeerIp(SocketAddr);

impl Serialize for PeerIp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0.ip())
    }
}

/// The `req_<header>`/`resp_<header>` fields, as extra keys of the line.
struct Extra<'a>(&'a [(String, String)]);

impl Serialize for Extra<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, value)| (key, value)))
    }
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
