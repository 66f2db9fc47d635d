//! The request log: one JSON object per request on stdout, with kamal-proxy's field names.
//!
//! Written directly rather than through `tracing`, because the `req_<header>` and
//! `resp_<header>` fields are named at deploy time and tracing fields are fixed at compile time.
//! The line carries the same `timestamp`/`level`/`message` keys as the daemon's other logs.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use http::{header, HeaderMap, Method, Version};
use serde_json::{Map, Value};

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
        let take = std::mem::take::<String>;
        let mut line = Map::new();
        let now = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), "INFO".into());
        line.insert("message".into(), "Request".into());
        line.insert("host".into(), take(&mut self.host).into());
        line.insert("port".into(), self.port.into());
        line.insert("path".into(), take(&mut self.path).into());
        line.insert("request_id".into(), take(&mut self.request_id).into());
        line.insert("status".into(), self.status.into());
        line.insert("service".into(), take(&mut self.service).into());
        line.insert("target".into(), take(&mut self.target).into());
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        line.insert("duration".into(), nanos.into());
        line.insert("method".into(), self.method.as_str().into());
        line.insert(
            "req_content_length".into(),
            self.req_content_length.unwrap_or(0).into(),
        );
        line.insert(
            "req_content_type".into(),
            take(&mut self.req_content_type).into(),
        );
        line.insert(
            "resp_content_length".into(),
            self.resp_content_length.unwrap_or(0).into(),
        );
        line.insert(
            "resp_content_type".into(),
            take(&mut self.resp_content_type).into(),
        );
        line.insert("client_addr".into(), take(&mut self.client_addr).into());
        line.insert("client_port".into(), self.peer.port().into());
        line.insert("remote_addr".into(), self.peer.ip().to_string().into());
        line.insert("user_agent".into(), take(&mut self.user_agent).into());
        line.insert("proto".into(), format!("{:?}", self.proto).into());
        line.insert("scheme".into(), self.scheme.into());
        line.insert("query".into(), take(&mut self.query).into());
        for (key, value) in std::mem::take(&mut self.extra) {
            line.insert(key, value.into());
        }
        let Ok(mut bytes) = serde_json::to_vec(&Value::Object(line)) else {
            return;
        };
        bytes.push(b'\n');
        // A failed write to stdout (closed pipe) must not disturb the request.
        let _ = std::io::stdout().lock().write_all(&bytes);
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
