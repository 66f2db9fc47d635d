//! Prometheus metrics: kamal-proxy's three request metrics under their names and labels, and
//! Berth's own (upstream response time, target health and load, deploys, certificate expiry).
//!
//! Counters and histograms are updated as requests and deploys happen. Gauges that describe
//! the current state (health, in-flight counts, certificate expiry) are filled in when
//! scraped, from a [`StateSample`] the caller provides, so the request path pays nothing for
//! them and they can never drift from the state they describe.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output: Prometheus text 0.0.4, what kamal-proxy
/// (Go's client) serves, so scrapers and dashboards built for it read the same text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Go's `prometheus.DefBuckets`, which kamal-proxy's request histogram uses.
const REQUEST_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Deploys wait on health checks and drains: seconds to minutes.
const DEPLOY_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A service or target name shared with the routing table: labelling a request costs a
/// reference count, not a copy of the name.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SharedName(Arc<str>);

impl EncodeLabelValue for SharedName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: SharedName,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    service: SharedName,
    target: SharedName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeployLabels {
    service: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    /// `full` or `resumed`.
    kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

fn deploy_histogram() -> Histogram {
    Histogram::new(DEPLOY_BUCKETS)
}

/// The state gauges describe, read by the caller at scrape time.
#[derive(Debug, Default)]
pub struct StateSample {
    pub services: Vec<ServiceSample>,
    /// Host and the certificate's expiry as Unix seconds.
    pub certificate_expiry: Vec<(String, i64)>,
    /// Client connections open, and how many of them are parked (idle, holding no buffers).
    pub client_connections: ConnectionCounts,
}

pub use crate::connection::ConnectionCounts;

#[derive(Debug)]
pub struct ServiceSample {
    pub name: String,
    pub targets: Vec<TargetSample>,
}

#[derive(Debug)]
pub struct TargetSample {
    pub address: String,
    pub healthy: bool,
    pub in_flight: usize,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RequestLabels>,
    in_flight: Family<ServiceLabels, Gauge>,
    upstream_duration: HistogramFamily<TargetLabels>,
    target_healthy: Family<TargetLabels, Gauge>,
    target_in_flight: Family<TargetLabels, Gauge>,
    deploys: Family<DeployLabels, Counter>,
    deploy_duration: HistogramFamily<ServiceLabels>,
    certificate_expiry: Family<HostLabels, Gauge>,
    client_connections: Gauge,
    parked_connections: Gauge,
    tls_handshakes: Family<HandshakeLabels, Counter>,
    /// One scrape at a time: a scrape clears and refills the state gauges.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let request_duration: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(request_histogram);
        let in_flight = Family::default();
        let upstream_duration: HistogramFamily<TargetLabels> =
            Family::new_with_constructor(request_histogram);
        let target_healthy = Family::default();
        let target_in_flight = Family::default();
        let deploys = Family::default();
        let deploy_duration: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(deploy_histogram);
        let certificate_expiry = Family::default();
        let client_connections = Gauge::default();
        let tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        let parked_connections = Gauge::default();

        let kamal = registry.sub_registry_with_prefix("kamal_proxy");
        kamal.register(
            "http_requests",
            "HTTP requests processed, labeled by service, status code and method",
            requests.clone(),
        );
        kamal.register(
            "http_request_duration_seconds",
            "Duration of HTTP requests, labeled by service, status code and method",
            request_duration.clone(),
        );
        kamal.register(
            "http_in_flight_requests",
            "Number of in-flight HTTP requests, labeled by service",
            in_flight.clone(),
        );
        let berth = registry.sub_registry_with_prefix("berth");
        berth.register(
            "upstream_response_duration_seconds",
            "Time from sending a request to a target to its response head",
            upstream_duration.clone(),
        );
        berth.register(
            "target_healthy",
            "1 when the target's last health check passed, else 0",
            target_healthy.clone(),
        );
        berth.register(
            "target_in_flight_requests",
            "Requests in flight on each target",
            target_in_flight.clone(),
        );
        berth.register(
            "deploys",
            "Deploys finished, by service and result (success or failure)",
            deploys.clone(),
        );
        berth.register(
            "deploy_duration_seconds",
            "Time from a deploy's start to the old targets drained, for successful deploys",
            deploy_duration.clone(),
        );
        berth.register(
            "certificate_expiry_timestamp_seconds",
            "When each host's TLS certificate expires, as Unix time",
            certificate_expiry.clone(),
        );
        berth.register(
            "client_connections",
            "Client connections open",
            client_connections.clone(),
        );
        berth.register(
            "tls_handshakes",
            "TLS handshakes completed, full or resumed (a session ticket or cached session)",
            tls_handshakes.clone(),
        );
        berth.register(
            "parked_client_connections",
            "Idle keep-alive client connections parked: waiting for their next request \
             without holding read or write buffers",
            parked_connections.clone(),
        );

        Self {
            registry,
            requests,
            request_duration,
            in_flight,
            upstream_duration,
            target_healthy,
            target_in_flight,
            deploys,
            deploy_duration,
            certificate_expiry,
            client_connections,
            parked_connections,
            tls_handshakes,
            scrape: Mutex::new(()),
        }
    }

    /// Counts one finished request.
    pub fn observe_request(
        &self,
        service: &Arc<str>,
        method: &Method,
        status: u16,
        duration: Duration,
    ) {
        let labels = RequestLabels {
            service: SharedName(Arc::clone(service)),
            method: normalize_method(method),
            status,
        };
        self.request_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        self.requests.get_or_create(&labels).inc();
    }

    /// Counts one completed TLS handshake.
    pub fn observe_tls_handshake(&self, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.tls_handshakes
            .get_or_create(&HandshakeLabels { kind })
            .inc();
    }

    /// Records how long a target took to send its response head.
    pub fn observe_upstream(&self, service: &Arc<str>, target: &Arc<str>, duration: Duration) {
        let labels = TargetLabels {
            service: SharedName(Arc::clone(service)),
            target: SharedName(Arc::clone(target)),
        };
        self.upstream_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
    }

    /// Counts a finished deploy; a successful one also records how long it took.
    pub fn observe_deploy(&self, service: &str, succeeded: bool, duration: Duration) {
        let result = if succeeded { "success" } else { "failure" };
        self.deploys
            .get_or_create(&DeployLabels {
                service: service.to_string(),
                result,
            })
            .inc();
        if succeeded {
            self.deploy_duration
                .get_or_create(&ServiceLabels {
                    service: service.to_string(),
                })
                .observe(duration.as_secs_f64());
        }
    }

    /// The Prometheus text for a scrape, with the state gauges set from `sample`.
    pub fn encode(&self, sample: &StateSample) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.in_flight.clear();
        self.target_healthy.clear();
        self.target_in_flight.clear();
        self.certificate_expiry.clear();
        for service in &sample.services {
            let total: usize = service.targets.iter().map(|t| t.in_flight).sum();
            self.in_flight
                .get_or_create(&ServiceLabels {
                    service: service.name.clone(),
                })
                .set(gauge_value(total));
            for target in &service.targets {
                let labels = TargetLabels {
                    service: SharedName(service.name.as_str().into()),
                    target: SharedName(target.address.as_str().into()),
                };
                self.target_healthy
                    .get_or_create(&labels)
                    .set(i64::from(target.healthy));
                self.target_in_flight
                    .get_or_create(&labels)
                    .set(gauge_value(target.in_flight));
            }
        }
        for (host, expiry) in &sample.certificate_expiry {
            self.certificate_expiry
                .get_or_create(&HostLabels { host: host.clone() })
                .set(*expiry);
        }
        self.client_connections
            .set(gauge_value(sample.client_connections.open));
        self.parked_connections
            .set(gauge_value(sample.client_connections.parked));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        openmetrics_to_prometheus_text(&text)
    }
}

/// Prometheus text 0.0.4 from the OpenMetrics text `prometheus-client` writes, as Go's client
/// writes it: a counter's HELP and TYPE name the `_total` series, bucket bounds are written as
/// Go formats floats (`le="1"`, not `"1.0"`), and there is no `# EOF`.
fn openmetrics_to_prometheus_text(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        let comment = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
        match comment {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => match line.split_once("le=\"") {
                Some((before, after)) => {
                    let (bound, rest) = after.split_once('"').unwrap_or((after, ""));
                    out.push_str(before);
                    out.push_str("le=\"");
                    out.push_str(bound.strip_suffix(".0").unwrap_or(bound));
                    out.push('"');
                    out.push_str(rest);
                }
                None => out.push_str(line),
            },
        }
        out.push('\n');
    }
    out
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Methods outside the standard set share one label value, so a scanner sending made-up
/// methods cannot grow the label space without bound.
fn normalize_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_prometheus_0_0_4_as_go_writes_it() {
        let metrics = Metrics::new();
        metrics.observe_request(&"app".into(), &Method::GET, 200, Duration::from_millis(3));
        let text = metrics.encode(&StateSample::default());
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE kamal_proxy_http_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP kamal_proxy_http_requests_total "),
            "{text}"
        );
        assert!(text.contains(r#"{le="1",service="app""#), "{text}");
        assert!(text.contains(r#"{le="0.005",service="app""#), "{text}");
        assert!(text.contains(r#"{le="+Inf",service="app""#), "{text}");
        assert!(
            !text.contains(".."),
            "help texts end with one period: {text}"
        );
        assert!(!text.contains(r#"le="1.0""#), "{text}");
    }

    #[test]
    fn request_metrics_use_kamal_proxy_names_and_labels() {
        let metrics = Metrics::new();
        metrics.observe_request(&"app".into(), &Method::GET, 200, Duration::from_millis(3));
        metrics.observe_request(
            &"app".into(),
            &Method::from_bytes(b"BREW").unwrap(),
            404,
            Duration::from_millis(3),
        );
        let text = metrics.encode(&StateSample::default());
        assert!(text.contains(
            r#"kamal_proxy_http_requests_total{service="app",method="GET",status="200"} 1"#
        ));
        assert!(text.contains(r#"method="OTHER",status="404"} 1"#));
        assert!(text.contains(
            r#"kamal_proxy_http_request_duration_seconds_bucket{le="0.005",service="app",method="GET",status="200"} 1"#
        ));
    }

    #[test]
    fn state_gauges_follow_the_latest_sample() {
        let metrics = Metrics::new();
        let sample = StateSample {
            services: vec![ServiceSample {
                name: "app".into(),
                targets: vec![TargetSample {
                    address: "a:1".into(),
                    healthy: true,
                    in_flight: 2,
                }],
            }],
            certificate_expiry: vec![("example.com".into(), 1_900_000_000)],
            client_connections: ConnectionCounts {
                open: 7,
                parked: 5,
                let_go: 9,
            },
        };
        let text = metrics.encode(&sample);
        assert!(text.contains("berth_client_connections 7"));
        assert!(text.contains("berth_parked_client_connections 5"));
        assert!(text.contains(r#"kamal_proxy_http_in_flight_requests{service="app"} 2"#));
        assert!(text.contains(r#"berth_target_healthy{service="app",target="a:1"} 1"#));
        assert!(text.contains(
            r#"berth_certificate_expiry_timestamp_seconds{host="example.com"} 1900000000"#
        ));
        let text = metrics.encode(&StateSample::default());
        assert!(
            !text.contains(r#"target="a:1""#),
            "a removed target must vanish"
        );
    }
}
