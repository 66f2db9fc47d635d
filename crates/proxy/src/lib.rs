//! Berth's data plane: everything a request touches on its way to an app and back.
//!
//! # Layout
//! - [`route`]: the immutable routing snapshot (host + path prefix → service) and the handle
//!   requests read it through.
//! - [`service`]: a service's settings, target pool (round-robin over healthy targets) and
//!   pause/stop state.
//! - [`rollout`]: which requests a canary rollout takes (the `kamal-rollout` cookie).
//! - `read_targets`: which requests read targets take, and writer affinity (`kamal-writer`).
//! - [`target`]: one upstream address with its health, in-flight count and drain signals.
//! - [`health`]: the periodic health check of each target.
//! - [`pipeline`]: the request pipeline: route → admit → pick target → forward → log.
//! - [`answer`]: a response on its way to the client, the target's fields passed on as
//!   received when nothing in them needs changing.
//! - [`proxy_protocol`]: the PROXY protocol header a TCP load balancer sends first.
//! - [`listener`]: listening sockets and the accept loop; `connection` serves one connection
//!   and parks it when idle, `parking` is the thread a parked connection's state is made on.
//! - [`drain`]: the process-wide drain (shutdown or handover): stop accepting, turn clients
//!   away gently, wait for open work up to a deadline.
//! - [`signal`]: a one-shot signal the request path tests without a lock (the drain's start,
//!   a target's cut).
//! - [`coarse_timer`]: deadlines swept every 100 ms (the target timeout), cheaper per
//!   request than a tokio timer.
//! - [`log_output`]: request log lines to stdout, batched on the worker threads.
//! - [`metrics`]: Prometheus counters and histograms, and the gauges filled in at scrape.
//! - [`tls`]: TLS termination with the certificate chosen by server name; `tickets` seals
//!   the session tickets returning clients resume with.
//! - [`http3`]: HTTP/3 over QUIC on the HTTPS port's UDP socket, into the same pipeline.
//! - `buffer`, `headers`, `tunnel`, `error_page` (with `page_template`, the Go template
//!   subset custom pages use), `request_log`, `request_target` (the path as kamal-proxy
//!   passes it on), `sniff` (the Content-Type named for a body the app sent without one):
//!   the layers the pipeline uses.
//! - [`GoDuration`] and [`config`]: the service options a deploy sets.
//!
//! The data plane never waits on the control plane: the control plane builds a new
//! [`RouteTable`] and publishes it, and swaps targets inside a [`Service`] atomically.

pub mod answer;
pub mod body;
mod buffer;
mod client_io;
pub mod coarse_timer;
pub mod config;
pub(crate) mod connection;
pub mod drain;
mod duration;
mod error_page;
mod fast_http1;
mod headers;
pub mod health;
pub mod http3;
mod ip_text;
pub mod listener;
pub mod log_output;
pub mod metrics;
mod page_template;
mod parking;
pub mod pipeline;
pub mod proxy_protocol;
mod read_targets;
mod request_log;
mod request_target;
pub mod rollout;
pub mod route;
pub mod service;
pub mod signal;
mod sniff;
pub mod target;
mod tickets;
pub mod tls;
mod tunnel;
pub mod upstream;

pub use drain::Drain;
pub use duration::{DurationError, GoDuration};
pub use error_page::{ErrorPages, ErrorPagesError};
pub use headers::TrustedProxies;
pub use metrics::Metrics;
pub use pipeline::Proxy;
pub use rollout::RolloutSplit;
pub use route::{RouteTable, RouteTableHandle};
pub use service::{PauseState, Service, ServiceSettings};
pub use target::{Health, Target};
pub use tls::CertificateSource;
