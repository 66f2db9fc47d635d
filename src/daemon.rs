//! `proxy run`: wires the data plane, the control plane and the state together, and shuts
//! down gracefully on SIGTERM/SIGINT.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_acme::{
    AcmeSettings, Certificates, SharedStore, StoreError, StoreKey, StoreSetupError,
    LETS_ENCRYPT_PRODUCTION,
};
use berth_control::{paths, Registry, StateFile};
use berth_proxy::listener::{self, ServerLimits};
use berth_proxy::upstream::{upstream_client, UpstreamClient};
use berth_proxy::{Metrics, Proxy, RouteTableHandle, Service, TrustedProxies};
use tokio_util::sync::CancellationToken;

use crate::cli::{parse_bool, RunArgs};
use crate::config_file::RunFile;
use crate::handover;
use crate::metrics_server;
use crate::workers::{self, Http3Start, WorkerSetup, Workers};

use crate::tls::TlsBridge;

/// How long the old process drains after handing over, unless told otherwise.
const UPGRADE_DRAIN: Duration = Duration::from_secs(30);
/// How much longer than its own drain timeout a new process waits for the old one to let go
/// of the HTTP/3 socket (the old one's drain timeout may differ).
const HTTP3_RELEASE_SLACK: Duration = Duration::from_secs(10);
/// Where a shared certificate store is and how to open its sealed keys.
pub struct CertStoreOptions {
    pub url: String,
    pub key: StoreKey,
    pub instance: String,
}

impl std::fmt::Debug for CertStoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the URL (it may hold a password) nor the key.
        f.debug_struct("CertStoreOptions")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl CertStoreOptions {
    fn resolve(args: &RunArgs, file: &RunFile) -> anyhow::Result<Option<Self>> {
        let Some(url) = layered(
            args.cert_store.clone(),
            "CERT_STORE",
            file.cert_store.clone(),
        )?
        else {
            return Ok(None);
        };
        let key_file = layered(
            args.cert_store_key_file.clone(),
            "CERT_STORE_KEY_FILE",
            file.cert_store_key_file.clone(),
        )?;
        let key_text = match (key_file, prefixed_env("CERT_STORE_KEY")) {
            (Some(path), _) => std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the store key file {}", path.display()))?,
            (None, Some((_, key))) => key,
            (None, None) => anyhow::bail!(StoreSetupError::MissingKey),
        };
        let key = StoreKey::parse(&key_text).context("--cert-store-key-file")?;
        let instance = match layered(
            args.instance_name.clone(),
            "INSTANCE_NAME",
            file.instance_name.clone(),
        )? {
            Some(name) => name,
            None => host_name(),
        };
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            anyhow::bail!("--cert-store must be a redis:// or rediss:// URL, not {url:?}");
        }
        Ok(Some(Self { url, key, instance }))
    }
}

/// Looks at the shared store once at start, so a problem is in the log from the first line:
/// unreachable (the instance serves its local cache and keeps trying) or a wrong store key
/// (nothing in the store can be used, and nothing is ordered over it).
async fn check_shared_store(shared: &SharedStore) {
    match shared.check_key().await {
        Ok(()) => {
            tracing::info!(store = %shared.status().location, instance = shared.instance(), "Using the shared certificate store")
        }
        Err(error @ StoreError::Unreachable(_)) => {
            tracing::error!(store = %shared.status().location, %error, "Shared certificate store unreachable at start; serving the local cache and retrying")
        }
        Err(error) => {
            tracing::error!(store = %shared.status().location, %error, "Shared certificate store unusable with this key; certificates in it will not be used and none will be ordered over them")
        }
    }
}

/// This machine's name, for the shared store's record of who ordered what.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

/// How long in-flight requests get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long connecting to a target may take before the request fails with 502, by default.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The run options after flags, environment and defaults are merged.
#[derive(Debug)]
pub struct RunOptions {
    pub http_port: u16,
    pub https_port: u16,
    pub metrics_port: u16,
    pub bind: Option<IpAddr>,
    pub debug: bool,
    pub acme: AcmeSettings,
    pub upgrade: bool,
    pub upgrade_drain_timeout: Duration,
    pub http3: bool,
    pub limits: ServerLimits,
    pub target_connect_timeout: Duration,
    pub proxy_protocol: bool,
    pub trusted_proxies: TrustedProxies,
    /// The certificate store several instances share, if any (else the local directory).
    pub cert_store: Option<CertStoreOptions>,
    /// Hosts served with automatic HTTPS even when deployed without `--tls`.
    pub tls_hosts: Vec<String>,
    /// Environment values that could not be read and were replaced by the default (logged
    /// once logging is set up).
    pub warnings: Vec<String>,
}

impl RunOptions {
    /// Merges flags, then the environment, then the `--config` file, then the defaults.
    pub fn resolve(args: RunArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => RunFile::load(path)?,
            None => RunFile::default(),
        };
        let mut warnings = Vec::new();
        let debug = args
            .debug
            .or_else(|| {
                let text = kamal_env::<String>("DEBUG", &mut warnings)?;
                let value = parse_bool(&text).ok();
                if value.is_none() {
                    warnings.push(format!(
                        "DEBUG={text:?} is not a boolean; using the default"
                    ));
                }
                value
            })
            .or(file.debug)
            .unwrap_or(false);
        let proxy_protocol =
            layered_bool(args.proxy_protocol, "PROXY_PROTOCOL", file.proxy_protocol)?;
        let http_port = args
            .http_port
            .or_else(|| kamal_env("HTTP_PORT", &mut warnings))
            .or(file.http_port);
        let https_port = args
            .https_port
            .or_else(|| kamal_env("HTTPS_PORT", &mut warnings))
            .or(file.https_port);
        let metrics_port = args
            .metrics_port
            .or_else(|| kamal_env("METRICS_PORT", &mut warnings))
            .or(file.metrics_port);
        let cert_store = CertStoreOptions::resolve(&args, &file)?;
        Ok(Self {
            cert_store,
            tls_hosts: layered(args.tls_hosts, "TLS_HOSTS", file.tls_hosts)?
                .unwrap_or_default()
                .0,
            warnings,
            http_port: http_port.unwrap_or(80),
            https_port: https_port.unwrap_or(443),
            metrics_port: metrics_port.unwrap_or(0),
            bind: layered(args.bind, "BIND", file.bind)?,
            debug,
            upgrade: args.upgrade,
            http3: args.http3.or(file.http3).unwrap_or(false),
            proxy_protocol,
            trusted_proxies: TrustedProxies::new(
                layered(
                    args.trusted_proxies,
                    "TRUSTED_PROXIES",
                    file.trusted_proxies,
                )?
                .unwrap_or_default()
                .0,
            ),
            limits: ServerLimits::new(
                layered(
                    args.header_read_timeout,
                    "HEADER_READ_TIMEOUT",
                    file.header_read_timeout,
                )?
                .map(|d| d.get())
                .unwrap_or(listener::DEFAULT_HEADER_READ_TIMEOUT),
                match layered(
                    args.max_header_size,
                    "MAX_HEADER_SIZE",
                    file.max_header_size,
                )? {
                    Some(bytes) if bytes < listener::MIN_MAX_HEADER_BYTES => {
                        anyhow::bail!(
                            "--max-header-size must be at least {} bytes, not {bytes}",
                            listener::MIN_MAX_HEADER_BYTES
                        )
                    }
                    bytes => bytes.unwrap_or(listener::DEFAULT_MAX_HEADER_BYTES),
                },
                layered(args.max_headers, "MAX_HEADERS", file.max_headers)?
                    .unwrap_or(listener::DEFAULT_MAX_HEADERS),
                match layered(
                    args.max_connections,
                    "MAX_CONNECTIONS",
                    file.max_connections,
                )? {
                    Some(0) => anyhow::bail!("--max-connections must be at least 1"),
                    count => count.unwrap_or(listener::DEFAULT_MAX_CONNECTIONS),
                },
            )
            .with_idle_timeout(
                layered(args.idle_timeout, "IDLE_TIMEOUT", file.idle_timeout)?
                    .map(|d| d.get())
                    .unwrap_or(listener::DEFAULT_IDLE_TIMEOUT),
            ),
            target_connect_timeout: layered(
                args.target_connect_timeout,
                "TARGET_CONNECT_TIMEOUT",
                file.target_connect_timeout,
            )?
            .map(|d| d.get())
            .unwrap_or(UPSTREAM_CONNECT_TIMEOUT),
            upgrade_drain_timeout: layered(
                args.upgrade_drain_timeout,
                "UPGRADE_DRAIN_TIMEOUT",
                file.upgrade_drain_timeout,
            )?
            .map(|d| d.get())
            .unwrap_or(UPGRADE_DRAIN),
            acme: AcmeSettings {
                directory: layered(args.acme_directory, "ACME_DIRECTORY", file.acme_directory)?
                    .unwrap_or_else(|| LETS_ENCRYPT_PRODUCTION.to_string()),
                ca_root: layered(args.acme_ca_root, "ACME_CA_ROOT", file.acme_ca_root)?,
                email: layered(args.acme_email, "ACME_EMAIL", file.acme_email)?,
                cache: paths::certificates_dir(),
            },
        })
    }
}

/// The flag if given, else the environment (`KAMAL_PROXY_<NAME>`), else the file. Berth's own
/// options are read only with the prefix: a host's unrelated `PROXY_PROTOCOL=true` must not
/// change how the proxy listens.
fn layered<T: FromStr>(flag: Option<T>, name: &str, file: Option<T>) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    if flag.is_some() {
        return Ok(flag);
    }
    Ok(env_value(name)?.or(file))
}

/// A boolean from the flag, the environment (`true`/`false`, `1`/`0`, ...) or the file;
/// false when none sets it.
fn layered_bool(flag: Option<bool>, name: &str, file: Option<bool>) -> anyhow::Result<bool> {
    Ok(match (flag, prefixed_env(name)) {
        (Some(value), _) => value,
        (None, Some((key, text))) => {
            parse_bool(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))?
        }
        (None, None) => file.unwrap_or(false),
    })
}

/// `KAMAL_PROXY_<NAME>`, when set and not empty; returns the variable's name too.
fn prefixed_env(name: &str) -> Option<(String, String)> {
    let key = format!("KAMAL_PROXY_{name}");
    let value = std::env::var(&key).ok().filter(|v| !v.is_empty())?;
    Some((key, value))
}

fn env_value<T: FromStr>(name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match prefixed_env(name) {
        None => Ok(None),
        Some((key, text)) => text
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("invalid value {text:?} for {key}: {e}")),
    }
}

/// One of kamal-proxy's own variables (`HTTP_PORT`, `HTTPS_PORT`, `METRICS_PORT`, `DEBUG`),
/// read as kamal-proxy reads them: `KAMAL_PROXY_<NAME>`, then `<NAME>`; a value that does not
/// parse is replaced by the default, with a warning, instead of stopping the daemon.
fn kamal_env<T: FromStr>(name: &str, warnings: &mut Vec<String>) -> Option<T> {
    let (key, text) = prefixed_env(name).or_else(|| {
        let value = std::env::var(name).ok().filter(|v| !v.is_empty())?;
        Some((name.to_string(), value))
    })?;
    match text.parse() {
        Ok(value) => Some(value),
        Err(_) => {
            warnings.push(format!("{key}={text:?} is not valid; using the default"));
            None
        }
    }
}

pub fn init_logging(debug: bool) {
    let level = if debug { "debug" } else { "info" };
    // rustls warns about what clients send (an IP address as the server name, which wrk and
    // some monitors send on every connection): a line per connection that any client can
    // cause. Its errors stay; its warnings only with --debug.
    let rustls_level = if debug { "warn" } else { "error" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROXY_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},hyper=info,hyper_util=info,rustls={rustls_level}"
        ))
    });
    tracing_subscriber::fmt()
        .event_format(crate::log_format::KamalJson)
        .with_env_filter(filter)
        .with_writer(|| LossyStdout)
        .init();
}

/// Standard output that never fails: a log line that cannot be written (a full disk under
/// a redirected stdout, a closed pipe) is dropped, rather than reported on stderr, which
/// would fail the same way and panic.
struct LossyStdout;

impl std::io::Write for LossyStdout {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        // After the request lines this thread holds, which came first.
        berth_proxy::log_output::flush_this_thread();
        let _ = std::io::stdout().write_all(buffer);
        Ok(buffer.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

/// Runs the daemon until SIGTERM/SIGINT, or until a new process has taken over and this one
/// has drained. Its steps, in order: open the certificates and the registry, take over from
/// the old process (with `--upgrade`) or bind, restore the state, start the workers and the
/// control API, say so, then wait for the end and drain.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    // A write past the file-size limit (RLIMIT_FSIZE) would kill the process with SIGXFSZ;
    // with a handler installed it fails with EFBIG instead, and the change is refused.
    let _file_size_signal =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
            .context("cannot watch SIGXFSZ")?;
    let routes = RouteTableHandle::default();
    let client = upstream_client(options.target_connect_timeout);
    let state_file = StateFile::new(paths::state_path());
    create_config_dir()?;
    let socket_path = paths::socket_path();
    let certificates = open_certificates(&options).await?;
    let metrics = (options.metrics_port != 0).then(|| Arc::new(Metrics::new()));
    let registry = new_registry(&routes, &client, &state_file, &certificates, &metrics);

    // Taking over: the old process has frozen changes before it sent its sockets, so the
    // state file read below is final.
    let taken_over = match options.upgrade {
        true => Some(take_over(&socket_path).await?),
        false => None,
    };
    let restored = registry
        .restore()
        .with_context(|| format!("cannot restore state from {}", state_file.path().display()))?;
    tracing::info!(path = %state_file.path().display(), services = restored, "Restored state");

    let sockets = Sockets::open(&options, taken_over)?;
    certificates
        .certificates
        .set_local_http(reachable(sockets.addresses.http));
    let control = bind_control(&socket_path, sockets.taken_over.is_some()).await?;
    let handover_socket = handover::listen(&socket_path)?;
    let metrics_listener = match &metrics {
        Some(_) => Some(metrics_server::bind(options.bind, options.metrics_port)?),
        None => None,
    };

    let proxy = new_proxy(
        &options,
        routes,
        client,
        &certificates,
        &metrics,
        &sockets.addresses,
    );
    let drain = proxy.drain().clone();
    let worker_count = workers::worker_count();
    let setup = WorkerSetup {
        proxy,
        certificates: certificates.clone(),
        limits: options.limits.clone(),
        proxy_protocol: options.proxy_protocol,
        target_connect_timeout: options.target_connect_timeout,
    };
    let workers = Workers::start(
        worker_count,
        &sockets.http,
        &sockets.https,
        setup,
        sockets.http3_start,
    )?;
    drop((sockets.http, sockets.https));
    let control_plane = ControlPlane::start(
        control,
        metrics_listener.zip(metrics),
        &registry,
        &certificates,
    )?;
    tracing::info!(
        http = %sockets.addresses.http,
        https = %sockets.addresses.https,
        socket = %socket_path.display(),
        acme_directory = %options.acme.directory,
        workers = worker_count,
        upgrade = options.upgrade,
        pid = std::process::id(),
        "Proxy started"
    );
    let old_process = announce_ready(sockets.taken_over)?;
    let http3_released = sockets.http3.map(|http3| {
        http3.start_reading(
            old_process,
            options.upgrade_drain_timeout + HTTP3_RELEASE_SLACK,
        )
    });
    let handed_over = spawn_handover_offers(
        handover_socket,
        sockets.for_handover,
        &registry,
        sockets.addresses,
    );

    let finished = match wait_for_end(handed_over).await? {
        End::Shutdown => {
            tracing::info!("Shutting down: no new connections; finishing in-flight requests");
            let _ = std::fs::remove_file(&socket_path);
            let _ = std::fs::remove_file(handover::socket_path(&socket_path));
            drain.shut_down(SHUTDOWN_GRACE).await
        }
        End::HandedOver(new_process) => {
            // The new process reads the HTTP/3 socket once this one has stopped reading it.
            tokio::spawn(async move {
                if let Some(released) = http3_released {
                    let _ = released.await;
                }
                drop(new_process);
            });
            let drain_timeout = options.upgrade_drain_timeout;
            let drain_timeout_ms = u64::try_from(drain_timeout.as_millis()).unwrap_or(u64::MAX);
            tracing::info!(drain_timeout_ms, "Handed over to the new process; draining");
            drain.finish(drain_timeout).await
        }
    };
    workers.stop().await;
    control_plane.stop().await;
    tracing::info!(finished_in_time = finished, "Stopped");
    Ok(())
}

/// Creates the configuration directory, owner-only as kamal-proxy creates it: it holds the
/// certificates' keys.
fn create_config_dir() -> anyhow::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(paths::config_dir())
        .with_context(|| format!("cannot create {}", paths::config_dir().display()))
}

/// The certificates the listeners present: the local store, or the shared one when
/// `--cert-store` names it (looked at once here, so a problem shows in the first lines).
async fn open_certificates(options: &RunOptions) -> anyhow::Result<Arc<TlsBridge>> {
    let shared_store = match &options.cert_store {
        Some(store) => {
            let shared = SharedStore::new(&store.url, store.key.clone(), store.instance.clone())
                .context("--cert-store")?;
            let shared = Arc::new(shared);
            check_shared_store(&shared).await;
            Some(shared)
        }
        None => None,
    };
    let certificates = Certificates::with_shared_store(options.acme.clone(), shared_store);
    Ok(Arc::new(
        TlsBridge::new(certificates).with_tls_hosts(options.tls_hosts.clone()),
    ))
}

/// The control plane's registry of services, publishing to `routes` and saving to
/// `state_file`.
fn new_registry(
    routes: &RouteTableHandle<Service>,
    client: &UpstreamClient,
    state_file: &StateFile,
    certificates: &Arc<TlsBridge>,
    metrics: &Option<Arc<Metrics>>,
) -> Arc<Registry> {
    let mut registry = Registry::new(routes.clone(), client.clone(), state_file.clone())
        .with_tls(certificates.clone());
    if let Some(metrics) = metrics {
        registry = registry.with_metrics(Arc::clone(metrics));
    }
    Arc::new(registry)
}

/// Receives the old process's sockets (`--upgrade`). Blocking, so off the runtime's threads.
async fn take_over(socket_path: &Path) -> anyhow::Result<handover::TakenOver> {
    let socket_path = socket_path.to_path_buf();
    tokio::task::spawn_blocking(move || handover::take_over(&socket_path)).await?
}

/// The control API's socket. A process taking over replaces the old one's socket file.
async fn bind_control(
    socket_path: &Path,
    taking_over: bool,
) -> anyhow::Result<tokio::net::UnixListener> {
    let bound = if taking_over {
        berth_control::api::bind_replacing(socket_path).await
    } else {
        berth_control::api::bind(socket_path).await
    };
    bound.with_context(|| format!("cannot open the control socket {}", socket_path.display()))
}

/// The data plane's proxy, before the workers take their copies of it.
fn new_proxy(
    options: &RunOptions,
    routes: RouteTableHandle<Service>,
    client: UpstreamClient,
    certificates: &Arc<TlsBridge>,
    metrics: &Option<Arc<Metrics>>,
    addresses: &handover::Addresses,
) -> Proxy {
    let mut proxy = Proxy::new(routes, client)
        .with_tls(certificates.clone(), addresses.https.port())
        .with_trusted_proxies(options.trusted_proxies.clone());
    if let Some(metrics) = metrics {
        proxy = proxy.with_metrics(Arc::clone(metrics));
    }
    if addresses.http3.is_some() {
        proxy = proxy.with_http3(addresses.https.port());
    }
    proxy
}

/// Tells whoever waits that this process serves: systemd, and the old process when this one
/// took over (which then drains). Returns the old process, told later when its HTTP/3
/// socket may be read.
fn announce_ready(
    taken_over: Option<handover::TakenOver>,
) -> anyhow::Result<Option<handover::OldProcess>> {
    match taken_over {
        Some(taken) => {
            let old_process = taken.ready()?;
            handover::notify_systemd(&format!("MAINPID={}\nREADY=1", std::process::id()));
            Ok(Some(old_process))
        }
        None => {
            handover::notify_systemd("READY=1");
            Ok(None)
        }
    }
}

/// The listening sockets: taken over from the old process, or bound here.
struct Sockets {
    http: std::net::TcpListener,
    https: std::net::TcpListener,
    http3: Option<Http3Socket>,
    http3_start: Option<Http3Start>,
    /// Copies of the three descriptors, to hand on to a later process.
    for_handover: handover::Listeners,
    addresses: handover::Addresses,
    /// The takeover, when there was one: the old process is told once this one serves.
    taken_over: Option<handover::TakenOver>,
}

impl Sockets {
    fn open(options: &RunOptions, taken_over: Option<handover::TakenOver>) -> anyhow::Result<Self> {
        let (http, https, mut taken_over) = match taken_over {
            Some(taken) => {
                taken.http.set_nonblocking(true)?;
                taken.https.set_nonblocking(true)?;
                let (http, https) = (taken.http.try_clone()?, taken.https.try_clone()?);
                (http, https, Some(taken))
            }
            None => (
                bind_listener(options.bind, options.http_port)?.into_std()?,
                bind_listener(options.bind, options.https_port)?.into_std()?,
                None,
            ),
        };
        let https_address = https.local_addr()?;
        let http3 = Http3Socket::open(
            options.http3,
            taken_over.as_mut().and_then(|t| t.http3.take()),
            https_address,
        )?;
        let (http3, http3_start) = http3.unzip();
        let for_handover = handover::Listeners {
            http: http.as_fd().try_clone_to_owned()?,
            https: https.as_fd().try_clone_to_owned()?,
            http3: http3.as_ref().map(Http3Socket::handover_fd).transpose()?,
        };
        let addresses = handover::Addresses {
            http: http.local_addr()?,
            https: https_address,
            http3: http3.as_ref().map(|http3| http3.address),
        };
        Ok(Self {
            http,
            https,
            http3,
            http3_start,
            for_handover,
            addresses,
            taken_over,
        })
    }
}

/// What the main thread's runtime serves beside the workers: the control API and metrics.
struct ControlPlane {
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    api_stop: CancellationToken,
    metrics_stop: CancellationToken,
}

impl ControlPlane {
    fn start(
        control: tokio::net::UnixListener,
        metrics: Option<(tokio::net::TcpListener, Arc<Metrics>)>,
        registry: &Arc<Registry>,
        certificates: &Arc<TlsBridge>,
    ) -> anyhow::Result<Self> {
        let api_stop = CancellationToken::new();
        let api = tokio::spawn(berth_control::api::serve(
            control,
            registry.clone(),
            api_stop.clone().cancelled_owned(),
        ));
        let metrics_stop = CancellationToken::new();
        if let Some((listener, metrics)) = metrics {
            tracing::info!(address = %listener.local_addr()?, "Serving metrics at /metrics");
            tokio::spawn(metrics_server::serve(
                listener,
                metrics,
                registry.clone(),
                certificates.clone(),
                metrics_stop.clone().cancelled_owned(),
            ));
        }
        Ok(Self {
            api,
            api_stop,
            metrics_stop,
        })
    }

    /// Stops both, giving the API a second to answer the calls it has.
    async fn stop(self) {
        self.api_stop.cancel();
        self.metrics_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.api).await;
    }
}

/// Offers this process's sockets to a new process on a plain thread, not `spawn_blocking`:
/// it blocks in accept for the life of the process, and the runtime would wait for a
/// blocking task at exit. The receiver hears of the new process once it has taken over.
fn spawn_handover_offers(
    handover_socket: std::os::unix::net::UnixListener,
    listeners: handover::Listeners,
    registry: &Arc<Registry>,
    addresses: handover::Addresses,
) -> tokio::sync::mpsc::Receiver<handover::NewProcess> {
    let (handed_over_tx, handed_over) = tokio::sync::mpsc::channel(1);
    let registry = registry.clone();
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        offer_handovers(
            runtime,
            handover_socket,
            listeners,
            registry,
            addresses,
            handed_over_tx,
        )
    });
    handed_over
}

/// How the process comes to an end.
enum End {
    /// SIGTERM or SIGINT.
    Shutdown,
    /// A new process has taken over; held until this one lets go of the HTTP/3 socket.
    HandedOver(handover::NewProcess),
}

async fn wait_for_end(
    mut handed_over: tokio::sync::mpsc::Receiver<handover::NewProcess>,
) -> anyhow::Result<End> {
    tokio::select! {
        signal = wait_for_signal() => signal.map(|()| End::Shutdown),
        new_process = handed_over.recv() => match new_process {
            Some(new_process) => Ok(End::HandedOver(new_process)),
            // The offering thread ended without a new process: it cannot accept any more.
            None => wait_for_signal().await.map(|()| End::Shutdown),
        },
    }
}

/// The HTTP/3 socket in this process: bound here, or taken over from the old process, which
/// may still be reading it.
struct Http3Socket {
    socket: std::net::UdpSocket,
    address: SocketAddr,
    from_old_process: bool,
    /// The workers' end of [`Http3Start`]: given the socket when they may read it.
    to_workers: tokio::sync::oneshot::Sender<std::net::UdpSocket>,
    /// Told by the workers when this process no longer reads the socket.
    released: tokio::sync::oneshot::Receiver<()>,
}

impl Http3Socket {
    /// The old process's socket (`taken`), or one bound on the HTTPS address; `None` without
    /// `--http3`. Also returns what the worker serving HTTP/3 starts from.
    fn open(
        wanted: bool,
        taken: Option<std::net::UdpSocket>,
        https: SocketAddr,
    ) -> anyhow::Result<Option<(Self, Http3Start)>> {
        if !wanted {
            return Ok(None);
        }
        let from_old_process = taken.is_some();
        let socket = match taken {
            Some(socket) => socket,
            None => listener::bind_udp(https)
                .with_context(|| format!("cannot listen for HTTP/3 on udp {https}"))?,
        };
        let (to_workers, socket_rx) = tokio::sync::oneshot::channel();
        let (released_tx, released) = tokio::sync::oneshot::channel();
        let opened = Self {
            address: socket.local_addr()?,
            socket,
            from_old_process,
            to_workers,
            released,
        };
        let start = Http3Start {
            socket: socket_rx,
            released: released_tx,
        };
        Ok(Some((opened, start)))
    }

    /// A descriptor of the socket, to hand on to a later process.
    fn handover_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.socket.as_fd().try_clone_to_owned()
    }

    /// Lets the workers read the socket: at once, or (taken over) once `old_process` has let
    /// go of it, waiting at most `limit`. Returns what tells when this process lets go.
    fn start_reading(
        self,
        old_process: Option<handover::OldProcess>,
        limit: Duration,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let Self {
            socket,
            from_old_process,
            to_workers,
            released,
            ..
        } = self;
        match old_process.filter(|_| from_old_process) {
            Some(old_process) => {
                std::thread::spawn(move || {
                    old_process.released(limit);
                    tracing::info!("The old process let go of the HTTP/3 socket");
                    let _ = to_workers.send(socket);
                });
            }
            None => {
                let _ = to_workers.send(socket);
            }
        }
        released
    }
}

/// Serves handover requests (blocking: run on its own thread) until one succeeds.
fn offer_handovers(
    runtime: tokio::runtime::Handle,
    socket: std::os::unix::net::UnixListener,
    listeners: handover::Listeners,
    registry: Arc<Registry>,
    addresses: handover::Addresses,
    handed_over: tokio::sync::mpsc::Sender<handover::NewProcess>,
) {
    for stream in socket.incoming() {
        let Ok(stream) = stream else { continue };
        tracing::info!("A new process asks to take over; finishing changes under way");
        runtime.block_on(registry.freeze());
        match handover::hand_over(stream, &listeners, &addresses) {
            Ok(new_process) => {
                let _ = handed_over.blocking_send(new_process);
                return;
            }
            Err(error) => {
                tracing::error!(%error, "Handover failed; this process keeps serving");
                runtime.block_on(registry.thaw());
            }
        }
    }
}

/// The address to reach a listener bound to `address` from this host.
fn reachable(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], address.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], address.port())),
        _ => address,
    }
}

/// Binds `port` on `bind`, or on every address (IPv6 and IPv4 where the host has IPv6).
fn bind_listener(bind: Option<IpAddr>, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    if let Some(address) = bind {
        let address = SocketAddr::new(address, port);
        return listener::bind(address).with_context(|| format!("cannot listen on {address}"));
    }
    let dual_stack = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    match listener::bind(dual_stack) {
        Ok(listener) => Ok(listener),
        Err(_) => {
            let address = SocketAddr::from(([0, 0, 0, 0], port));
            listener::bind(address).with_context(|| format!("cannot listen on {address}"))
        }
    }
}

/// Waits for SIGTERM or SIGINT. SIGUSR2 (what `systemctl reload` sends) starts a new process
/// that takes over from this one.
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut upgrade = signal(SignalKind::user_defined2()).context("cannot watch SIGUSR2")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = upgrade.recv() => match handover::spawn_successor() {
                Ok(pid) => tracing::info!(pid, "SIGUSR2: started a new process to take over"),
                Err(error) => tracing::error!(%error, "SIGUSR2: cannot start a new process"),
            },
        }
    }
}
