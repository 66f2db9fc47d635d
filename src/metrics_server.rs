//! The Prometheus endpoint (`--metrics-port`): `GET /metrics` on its own listener.
//!
//! Counters come from the data and control planes as they work; the state gauges (target
//! health, in-flight requests, certificate expiry) are read from the registry and the
//! certificates at each scrape.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::Context;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use berth_control::Registry;
use berth_proxy::metrics::{
    ConnectionCounts, ServiceSample, StateSample, TargetSample, CONTENT_TYPE,
};
use berth_proxy::Health;
use berth_proxy::Metrics;
use tokio::net::TcpListener;

use crate::tls::TlsBridge;

#[derive(Clone)]
struct Sources {
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    certificates: Arc<TlsBridge>,
}

/// Binds the metrics port with `SO_REUSEPORT`, so a process taking over in a handover can
/// bind it while the old one still holds it.
pub fn bind(bind: Option<IpAddr>, port: u16) -> anyhow::Result<TcpListener> {
    let address = SocketAddr::new(bind.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), port);
    let listen = |address: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if address.is_ipv6() {
            socket.set_only_v6(false)?;
        }
        socket.bind(&address.into())?;
        socket.listen(128)?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    };
    match listen(address) {
        Ok(listener) => Ok(listener),
        // No IPv6 on this host: every IPv4 address instead.
        Err(_) if bind.is_none() => {
            let address = SocketAddr::from(([0, 0, 0, 0], port));
            listen(address).with_context(|| format!("cannot listen for metrics on {address}"))
        }
        Err(error) => Err(error).with_context(|| format!("cannot listen for metrics on {address}")),
    }
}

/// Serves `/metrics` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    certificates: Arc<TlsBridge>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let sources = Sources {
        metrics,
        registry,
        certificates,
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(sources);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(%error, "Metrics endpoint failed");
    }
}

async fn scrape(State(sources): State<Sources>) -> impl IntoResponse {
    let sample = sample_state(&sources.registry, &sources.certificates);
    let mut text = sources.metrics.encode(&sample);
    text.push_str(&cert_store_families(&sources.certificates));
    text.push_str(&process_families());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}

/// The shared certificate store's counters, when one is in use.
fn cert_store_families(certificates: &TlsBridge) -> String {
    let Some(store) = certificates.certificates.store_status() else {
        return String::new();
    };
    let reachable = u8::from(store.reachable);
    format!(
        "# HELP berth_cert_store_reachable Whether the shared certificate store answered its last operation.\n\
         # TYPE berth_cert_store_reachable gauge\n\
         berth_cert_store_reachable {reachable}\n\
         # HELP berth_cert_store_errors_total Shared certificate store operations that failed.\n\
         # TYPE berth_cert_store_errors_total counter\n\
         berth_cert_store_errors_total {}\n\
         # HELP berth_cert_store_lock_waits_total Times a certificate order waited for another instance holding its lock.\n\
         # TYPE berth_cert_store_lock_waits_total counter\n\
         berth_cert_store_lock_waits_total {}\n",
        store.errors, store.lock_waits
    )
}

/// The `process_*` families Go's client (and so kamal-proxy) serves, read from `/proc`.
fn process_families() -> String {
    let mut text = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(value) = value {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
    };
    // /proc/self/stat: fields after the command's closing parenthesis, from `state` (3rd).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    let cpu = field(14).zip(field(15)).map(|(u, s)| (u + s) / ticks);
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        cpu,
    );
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as f64)
        .ok();
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
    family(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        max_fds,
    );
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        open_fds,
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        field(24).map(|pages| pages * page),
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        field(22)
            .zip(boot_time)
            .map(|(start, boot)| boot + start / ticks),
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        field(23),
    );
    text
}

fn sample_state(registry: &Registry, certificates: &TlsBridge) -> StateSample {
    let status = registry.status();
    let mut services = BTreeMap::new();
    let mut certificate_expiry = BTreeMap::new();
    for route in &status.routes {
        services.entry(route.service.clone()).or_insert_with(|| {
            let rollout_targets = route
                .rollout
                .iter()
                .flat_map(|r| r.targets.iter().chain(r.read_targets.iter()));
            route
                .targets
                .iter()
                .chain(route.read_targets.iter())
                .chain(rollout_targets)
                .map(|target| TargetSample {
                    address: target.address.clone(),
                    healthy: target.health == Health::Healthy,
                    in_flight: target.in_flight,
                })
                .collect::<Vec<_>>()
        });
        if route.tls {
            let expiry = certificates
                .certificates
                .info(&route.host)
                .and_then(|info| info.not_after)
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .and_then(|since| i64::try_from(since.as_secs()).ok());
            if let Some(expiry) = expiry {
                certificate_expiry.insert(route.host.clone(), expiry);
            }
        }
    }
    StateSample {
        services: services
            .into_iter()
            .map(|(name, targets)| ServiceSample { name, targets })
            .collect(),
        certificate_expiry: certificate_expiry.into_iter().collect(),
        client_connections: ConnectionCounts::now(),
    }
}
