//! The data plane's worker threads: one single-threaded async runtime per core, each accepting
//! on the shared listening sockets and serving its connections from start to end with its own
//! pool of upstream connections. A connection never moves between threads, so its tasks wake
//! each other without cross-thread hand-offs (nginx's worker model); on one core this serves
//! about a third more requests than a work-stealing runtime. The control plane (API, health
//! checks, certificates, metrics) runs on the main thread's runtime.

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use berth_proxy::http3;
use berth_proxy::listener::{self, ServerLimits};
use berth_proxy::log_output;
use berth_proxy::upstream::upstream_client;
use berth_proxy::{CertificateSource, Proxy};
use tokio_util::sync::CancellationToken;

/// What every worker serves with.
pub struct WorkerSetup {
    pub proxy: Proxy,
    pub certificates: Arc<dyn CertificateSource>,
    pub limits: ServerLimits,
    pub proxy_protocol: bool,
    pub target_connect_timeout: Duration,
}

/// HTTP/3, served by the first worker: one QUIC endpoint reads one UDP socket.
pub struct Http3Start {
    /// The socket, once this process may read it (at once, or when the process it took over
    /// from lets go of it).
    pub socket: tokio::sync::oneshot::Receiver<std::net::UdpSocket>,
    /// Told when this process no longer reads the socket.
    pub released: tokio::sync::oneshot::Sender<()>,
}

/// The running workers.
pub struct Workers {
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

/// How many workers to run: `TOKIO_WORKER_THREADS` if set, else one per available core.
pub fn worker_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .filter(|count| *count > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// Writes the worker's request log lines at least every [`log_output::LONGEST_WAIT`], for a
/// worker too busy to park (where they are written otherwise).
async fn flush_the_log_while_busy() {
    let mut every = tokio::time::interval(log_output::LONGEST_WAIT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        log_output::flush_this_thread();
    }
}

impl Workers {
    /// Starts `count` workers accepting on `http` and `https`. They serve until
    /// [`Workers::stop`]; the proxy's drain decides when they stop accepting.
    pub fn start(
        count: usize,
        http: &StdListener,
        https: &StdListener,
        setup: WorkerSetup,
        mut http3: Option<Http3Start>,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let http = http.try_clone().context("cannot share the HTTP listener")?;
            let https = https
                .try_clone()
                .context("cannot share the HTTPS listener")?;
            // Each worker has its own upstream pool, so a pooled connection is always driven
            // by the thread that uses it.
            let proxy = setup
                .proxy
                .clone()
                .with_upstream_client(upstream_client(setup.target_connect_timeout));
            let certificates = Arc::clone(&setup.certificates);
            let (limits, proxy_protocol) = (setup.limits.clone(), setup.proxy_protocol);
            let stop = stop.clone();
            let http3 = http3.take();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // The request log's lines go out together when the worker runs out of work.
                .on_thread_park(log_output::flush_this_thread)
                .build()
                .context("cannot start a worker runtime")?;
            let thread = std::thread::Builder::new()
                .name(format!("berth-worker-{index}"))
                .spawn(move || {
                    log_output::batch_on_this_thread();
                    runtime.block_on(async move {
                        tokio::spawn(flush_the_log_while_busy());
                        let (http, https) = match (
                            tokio::net::TcpListener::from_std(http),
                            tokio::net::TcpListener::from_std(https),
                        ) {
                            (Ok(http), Ok(https)) => (http, https),
                            (Err(error), _) | (_, Err(error)) => {
                                tracing::error!(%error, "Worker cannot listen");
                                return;
                            }
                        };
                        let plain = listener::serve(
                            http,
                            proxy.clone(),
                            None,
                            limits.clone(),
                            proxy_protocol,
                        );
                        if let Some(start) = http3 {
                            let idle_timeout = limits.idle_timeout;
                            let drain = proxy.drain().clone();
                            drain.track(serve_http3(
                                start,
                                proxy.clone(),
                                Arc::clone(&certificates),
                                idle_timeout,
                            ));
                        }
                        let tls = listener::serve(
                            https,
                            proxy,
                            Some(certificates),
                            limits,
                            proxy_protocol,
                        );
                        tokio::spawn(plain);
                        tokio::spawn(tls);
                        // Connections outlive the accept loops (the drain waits for them), so
                        // the runtime runs until told to stop.
                        stop.cancelled().await;
                    })
                    // The lines the worker still holds are written as its thread ends.
                })
                .context("cannot start a worker thread")?;
            threads.push(thread);
        }
        Ok(Self { stop, threads })
    }

    /// Stops the workers (after the drain) and waits briefly for their threads to end.
    pub async fn stop(self) {
        self.stop.cancel();
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
    }
}

/// Serves HTTP/3 once its socket may be read, until the drain ends it; then says so.
async fn serve_http3(
    start: Http3Start,
    proxy: Proxy,
    certificates: Arc<dyn CertificateSource>,
    idle_timeout: Duration,
) {
    let socket = tokio::select! {
        socket = start.socket => socket.ok(),
        _ = proxy.drain().started().cancelled() => None,
    };
    if let Some(socket) = socket {
        let address = socket.local_addr().ok();
        match http3::endpoint(socket, certificates, idle_timeout) {
            Ok(endpoint) => {
                tracing::info!(address = ?address, "Serving HTTP/3");
                http3::serve(endpoint, proxy).await;
            }
            Err(error) => tracing::error!(%error, "Cannot serve HTTP/3"),
        }
    }
    let _ = start.released.send(());
}
