//! The command line, flag for flag compatible with kamal-proxy: `--flag value` and
//! `--flag=value`, booleans as `--flag` or `--flag=false`, Go-style durations, repeatable
//! list flags that also take comma-separated values.

use std::net::IpAddr;

use berth_proxy::config::{
    DEFAULT_BUFFER_MEMORY, DEFAULT_DEPLOY_TIMEOUT, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEALTH_CHECK_INTERVAL, DEFAULT_HEALTH_CHECK_PATH, DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_PAUSE_TIMEOUT, DEFAULT_TARGET_TIMEOUT, DEFAULT_WRITER_AFFINITY_TIMEOUT,
};
use berth_proxy::GoDuration;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "proxy",
    version,
    about = "Berth: a reverse proxy for zero-downtime deploys, compatible with kamal-proxy",
    long_about = "Berth routes requests by host and path to app containers, swaps to a new \
container only once it is healthy, drains the old one without dropping a request.\n\n\
`proxy run` starts the daemon; every other command talks to it over the control socket \
($KAMAL_PROXY_SOCKET, else $XDG_RUNTIME_DIR/kamal-proxy.sock, else /tmp/kamal-proxy.sock)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy daemon
    Run(Box<RunArgs>),
    /// Deploy a service: wait for its new targets to be healthy, switch, drain the old ones
    Deploy(Box<DeployArgs>),
    /// Remove a service
    #[command(visible_alias = "rm")]
    Remove(ServiceArg),
    /// List the services currently running
    #[command(visible_alias = "ls")]
    List(OutputArgs),
    /// Show what serves each host and path, with target health and in-flight requests
    Status(OutputArgs),
    /// Stop a service: drain in-flight requests, then answer 503 with a message
    Stop(StopArgs),
    /// Pause a service: drain in-flight requests, then hold new ones until resumed
    Pause(PauseArgs),
    /// Resume a paused or stopped service
    Resume(ServiceArg),
    /// Canary rollouts: extra targets that get a share of a service's traffic
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Deploy the rollout targets of an existing service (health-gated; no traffic until `rollout set`)
    Deploy(RolloutDeployArgs),
    /// Set the traffic split: a percentage of `kamal-rollout` cookie values, and cookie values that always go to the rollout
    Set(RolloutSetArgs),
    /// Stop the rollout: all traffic back to the main targets; the rollout targets drain
    Stop(ServiceArg),
}

#[derive(Debug, Args)]
pub struct RolloutDeployArgs {
    /// Service name
    pub service: String,
    /// Rollout target host:port (repeatable, or comma-separated)
    #[arg(
        long = "target",
        value_name = "HOST:PORT",
        required = true,
        value_delimiter = ','
    )]
    pub targets: Vec<String>,
    /// Rollout read target host:port (repeatable, or comma-separated): GET and HEAD requests of the rollout go to it
    #[arg(long = "read-target", value_name = "HOST:PORT", value_delimiter = ',')]
    pub read_targets: Vec<String>,
    /// Maximum time to wait for the rollout targets to become healthy
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEPLOY_TIMEOUT, value_parser = parse_duration)]
    pub deploy_timeout: GoDuration,
    /// Maximum time to let requests on replaced rollout targets finish
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: GoDuration,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("split").required(true).multiple(true).args(["percent", "allowlist"])))]
pub struct RolloutSetArgs {
    /// Service name
    pub service: String,
    /// Percentage (0-100) of `kamal-rollout` cookie values sent to the rollout targets
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub percent: Option<u32>,
    /// `kamal-rollout` cookie values always sent to the rollout targets (comma-separated)
    #[arg(long = "list", value_name = "VALUES", value_delimiter = ',')]
    pub allowlist: Vec<String>,
    /// Give visitors without a `kamal-rollout` cookie a random one, so the percentage applies to all traffic (Berth only; kamal-proxy sends them to the main targets)
    #[arg(long)]
    pub assign_cookies: bool,
}

/// Options of `run`. Each may also come from the environment as `KAMAL_PROXY_<NAME>`;
/// kamal-proxy's own (`HTTP_PORT`, `HTTPS_PORT`, `METRICS_PORT`, `DEBUG`) also as `<NAME>`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Port to serve HTTP on [env: HTTP_PORT] [default: 80]
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<u16>,
    /// Port to serve HTTPS on [env: HTTPS_PORT] [default: 443]
    #[arg(long, value_name = "PORT")]
    pub https_port: Option<u16>,
    /// Port for Prometheus metrics, 0 for none [env: METRICS_PORT] [default: 0]
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Address to listen on [env: KAMAL_PROXY_BIND] [default: all addresses]
    #[arg(long, value_name = "ADDRESS")]
    pub bind: Option<IpAddr>,
    /// Log at debug level [env: DEBUG]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub debug: Option<bool>,
    /// ACME directory URL for automatic certificates [env: KAMAL_PROXY_ACME_DIRECTORY] [default: Let's Encrypt production]
    #[arg(long, value_name = "URL")]
    pub acme_directory: Option<String>,
    /// PEM file with a root certificate to trust when talking to the ACME server (for test servers) [env: KAMAL_PROXY_ACME_CA_ROOT]
    #[arg(long, value_name = "PATH")]
    pub acme_ca_root: Option<std::path::PathBuf>,
    /// Contact email for the ACME account [env: KAMAL_PROXY_ACME_EMAIL]
    #[arg(long, value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// Time a client has to send a request head [env: KAMAL_PROXY_HEADER_READ_TIMEOUT] [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Option<GoDuration>,
    /// How long an idle keep-alive connection is kept between requests; keep it above the idle timeout of any load balancer in front [env: KAMAL_PROXY_IDLE_TIMEOUT] [default: 75s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<GoDuration>,
    /// Largest request head in bytes, at least 8192; larger ones get 431 [env: KAMAL_PROXY_MAX_HEADER_SIZE] [default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub max_header_size: Option<usize>,
    /// Most header fields in a request; more get 431 [env: KAMAL_PROXY_MAX_HEADERS] [default: 100]
    #[arg(long, value_name = "COUNT")]
    pub max_headers: Option<usize>,
    /// Most open client connections; beyond it new ones wait until one closes [env: KAMAL_PROXY_MAX_CONNECTIONS] [default: 16384]
    #[arg(long, value_name = "COUNT")]
    pub max_connections: Option<usize>,
    /// Longest time to connect to a target before answering 502 [env: KAMAL_PROXY_TARGET_CONNECT_TIMEOUT] [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub target_connect_timeout: Option<GoDuration>,
    /// Keep certificates in a store several proxies share, so each is ordered once for the fleet and any instance answers any challenge: redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss://... (TLS) [env: KAMAL_PROXY_CERT_STORE] [default: the local directory]
    #[arg(long, value_name = "URL")]
    pub cert_store: Option<String>,
    /// File holding the key that seals private keys in the shared store (32 bytes as 64 hex digits or base64; the same on every instance) [env: KAMAL_PROXY_CERT_STORE_KEY_FILE, or the key itself in KAMAL_PROXY_CERT_STORE_KEY]
    #[arg(long, value_name = "PATH")]
    pub cert_store_key_file: Option<std::path::PathBuf>,
    /// This instance's name in the shared store (who ordered each certificate) [env: KAMAL_PROXY_INSTANCE_NAME] [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub instance_name: Option<String>,
    /// Read run options from this TOML file (flags and environment take precedence); see proxy.toml.example
    #[arg(long, value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,
    /// Take over from the proxy running on the same control socket without dropping a request
    #[arg(long)]
    pub upgrade: bool,
    /// How long the old process drains after handing over [env: KAMAL_PROXY_UPGRADE_DRAIN_TIMEOUT] [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub upgrade_drain_timeout: Option<GoDuration>,
    /// Serve HTTP/3 over QUIC on the HTTPS port (UDP), advertised to HTTPS clients with Alt-Svc [default: false]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub http3: Option<bool>,
    /// Require a PROXY protocol header (v1 or v2) on every connection, as a TCP load balancer sends; connections without one are closed [env: KAMAL_PROXY_PROXY_PROTOCOL] [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub proxy_protocol: Option<bool>,
    /// Address ranges (CIDR or single addresses, comma-separated) of proxies in front of this one whose X-Forwarded-For is believed, for every service [env: KAMAL_PROXY_TRUSTED_PROXIES] [default: none]
    #[arg(long, value_name = "RANGES")]
    pub trusted_proxies: Option<IpRanges>,
    /// Hosts (comma-separated) served with automatic HTTPS even when deployed without --tls: for Kamal roles on several servers, where Kamal refuses ssl: true [env: KAMAL_PROXY_TLS_HOSTS] [default: none]
    #[arg(long, value_name = "HOSTS")]
    pub tls_hosts: Option<HostList>,
}

#[derive(Debug, Args)]
pub struct ServiceArg {
    /// Service name
    pub service: String,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Service name
    pub service: String,
    /// Time to wait for in-flight requests before stopping
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: GoDuration,
    /// Message shown on the 503 page while stopped
    #[arg(long)]
    pub message: Option<String>,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Service name
    pub service: String,
    /// Time to wait for in-flight requests before pausing
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: GoDuration,
    /// Longest time a request is held while paused
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_PAUSE_TIMEOUT, value_parser = parse_duration)]
    pub max_pause: GoDuration,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Service name
    pub service: String,

    /// Target host:port to deploy (repeatable, or comma-separated)
    #[arg(
        long = "target",
        value_name = "HOST:PORT",
        required = true,
        value_delimiter = ','
    )]
    pub targets: Vec<String>,
    /// Read target host:port (repeatable, or comma-separated): GET and HEAD go to it while healthy, unless the client wrote within the writer affinity timeout
    #[arg(long = "read-target", value_name = "HOST:PORT", value_delimiter = ',')]
    pub read_targets: Vec<String>,
    /// Host to serve this service on (repeatable; none = all hosts; `*.example.com` for a wildcard)
    #[arg(long = "host", value_name = "HOST", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Serve the service below this path prefix (repeatable) [default: /]
    #[arg(long = "path-prefix", value_name = "PATH", value_delimiter = ',')]
    pub path_prefixes: Vec<String>,
    /// With --path-prefix, strip the prefix before forwarding
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = parse_bool)]
    pub strip_path_prefix: bool,

    /// Serve this service over HTTPS, with automatic certificates for its hosts (ACME HTTP-01)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub tls: bool,
    /// Use Let's Encrypt's staging environment for certificates
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub tls_staging: bool,
    /// URL asked before issuing a certificate on demand (`?host=<name>`; 200 allows)
    #[arg(long, value_name = "URL")]
    pub tls_on_demand_url: Option<String>,
    /// Custom TLS certificate (PEM); needs --tls-private-key-path
    #[arg(long, value_name = "PATH", requires = "tls_private_key_path")]
    pub tls_certificate_path: Option<String>,
    /// Custom TLS private key (PEM); needs --tls-certificate-path
    #[arg(long, value_name = "PATH", requires = "tls_certificate_path")]
    pub tls_private_key_path: Option<String>,
    /// Directory for the ACME certificate cache [default: $HOME/.config/kamal-proxy/certs]
    #[arg(long, value_name = "PATH")]
    pub tls_acme_cache_path: Option<String>,
    /// Redirect plain HTTP to HTTPS for this service
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = parse_bool)]
    pub tls_redirect: bool,
    /// Redirect the service's other hosts to this one
    #[arg(long, value_name = "HOST")]
    pub canonical_host: Option<String>,

    /// Longest wait for the new targets to become healthy
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEPLOY_TIMEOUT, value_parser = parse_duration)]
    pub deploy_timeout: GoDuration,
    /// Longest wait for in-flight requests on the old targets before they are cut
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: GoDuration,
    /// Skip the health gate: switch to the new targets at once
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub force: bool,

    /// Interval between health checks
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_HEALTH_CHECK_INTERVAL, value_parser = parse_duration)]
    pub health_check_interval: GoDuration,
    /// Time each health check must complete in
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_HEALTH_CHECK_TIMEOUT, value_parser = parse_duration)]
    pub health_check_timeout: GoDuration,
    /// Path to check for health (a 2xx answer is healthy)
    #[arg(long, value_name = "PATH", default_value = DEFAULT_HEALTH_CHECK_PATH)]
    pub health_check_path: String,
    /// Port to check for health [default: the target's port]
    #[arg(long, value_name = "PORT")]
    pub health_check_port: Option<u16>,
    /// Host header to send with health checks [default: the target address]
    #[arg(long, value_name = "HOST")]
    pub health_check_host: Option<String>,

    /// Longest wait for a target's response head when serving a request (0 = no limit)
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_TARGET_TIMEOUT, value_parser = parse_duration)]
    pub target_timeout: GoDuration,
    /// Read whole request bodies before forwarding them
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub buffer_requests: bool,
    /// Read whole response bodies before sending them on
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub buffer_responses: bool,
    /// Bytes of a buffered body kept in memory before spilling to a temporary file
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BUFFER_MEMORY)]
    pub buffer_memory: u64,
    /// Largest request body when buffering, in bytes (0 = unlimited)
    #[arg(long, value_name = "BYTES", requires = "buffer_requests")]
    pub max_request_body: Option<u64>,
    /// Largest response body when buffering, in bytes (0 = unlimited)
    #[arg(long, value_name = "BYTES", requires = "buffer_responses")]
    pub max_response_body: Option<u64>,
    /// Directory of custom error pages (`<status>.html`)
    #[arg(long, value_name = "DIR")]
    pub error_pages: Option<String>,

    /// Request header to add to the request log (repeatable)
    #[arg(
        long = "log-request-header",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub log_request_headers: Vec<String>,
    /// Response header to add to the request log (repeatable)
    #[arg(
        long = "log-response-header",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub log_response_headers: Vec<String>,
    /// Keep incoming X-Forwarded-* headers [default: true without --tls, false with it]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_bool)]
    pub forward_headers: Option<bool>,
    /// Header to take the client IP from instead of the connection's address
    #[arg(long, value_name = "NAME")]
    pub client_ip_header: Option<String>,
    /// Path to leave out of metrics (repeatable): requests whose path, after prefix stripping, equals it are not counted
    #[arg(
        long = "exclude-metrics-path",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub exclude_metrics_paths: Vec<String>,
    /// Scope the app's cookies (Set-Cookie Path) under the service's path prefix
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub scope_cookie_paths: bool,
    /// Time after a write during which the client's reads go to a writer (the kamal-writer cookie; 0 = none)
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_WRITER_AFFINITY_TIMEOUT, value_parser = parse_duration)]
    pub writer_affinity_timeout: GoDuration,
    /// Send WebSocket upgrades to read targets (they go to writers otherwise)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub read_target_websockets: bool,
}

fn parse_duration(text: &str) -> Result<GoDuration, String> {
    text.parse()
        .map_err(|e: berth_proxy::DurationError| e.to_string())
}

/// Booleans as Go's flag package reads them.
/// Address ranges given as `10.0.0.0/8,192.0.2.1`: a single address is a range of one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct IpRanges(pub Vec<ipnet::IpNet>);

impl std::str::FromStr for IpRanges {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{entry:?} is not an address range (like 10.0.0.0/8)"))
            })
            .collect::<Result<_, _>>()
            .map(IpRanges)
    }
}

/// Host names given as `a.example.com,b.example.com`, lowercased.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostList(pub Vec<String>);

impl std::str::FromStr for HostList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let plausible = entry
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*');
                if plausible {
                    Ok(entry.to_ascii_lowercase())
                } else {
                    Err(format!("{entry:?} is not a host name"))
                }
            })
            .collect::<Result<_, _>>()
            .map(HostList)
    }
}

impl<'de> serde::Deserialize<'de> for HostList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hosts = Vec::<String>::deserialize(deserializer)?;
        hosts.join(",").parse().map_err(serde::de::Error::custom)
    }
}

pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean (use true or false)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("proxy").chain(args.iter().copied()))
    }

    #[test]
    fn kamal_deploy_command_line_parses() {
        let Command::Deploy(args) = parse(&[
            "deploy",
            "app-web",
            "--target=10.0.0.5:80",
            "--host=a.test",
            "--host",
            "b.test",
            "--tls",
            "--deploy-timeout=30s",
            "--buffer-requests",
            "--buffer-responses",
            "--log-request-header=Cache-Control",
        ])
        .unwrap()
        .command
        else {
            panic!("not a deploy");
        };
        assert_eq!(args.targets, vec!["10.0.0.5:80"]);
        assert_eq!(args.hosts, vec!["a.test", "b.test"]);
        assert!(args.tls && args.buffer_requests && args.buffer_responses);
        assert!(args.strip_path_prefix && args.tls_redirect);
        assert_eq!(args.deploy_timeout.to_string(), "30s");
    }

    #[test]
    fn booleans_take_explicit_false() {
        let Command::Deploy(args) = parse(&[
            "deploy",
            "s",
            "--target=a:1",
            "--tls-redirect=false",
            "--strip-path-prefix=false",
        ])
        .unwrap()
        .command
        else {
            panic!("not a deploy");
        };
        assert!(!args.tls_redirect && !args.strip_path_prefix && !args.tls);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let error = parse(&["deploy", "s", "--target=a:1", "--deploy-timeout=soon"]).unwrap_err();
        assert!(error.to_string().contains("--deploy-timeout"), "{error}");
        let error = parse(&["deploy", "s"]).unwrap_err();
        assert!(error.to_string().contains("--target"), "{error}");
        let error = parse(&["deploy", "s", "--target=a:1", "--max-request-body=10"]).unwrap_err();
        assert!(error.to_string().contains("--buffer-requests"), "{error}");
    }
}
