//! Shared pieces of the end-to-end tests: the real `proxy` binary in a private home and
//! socket, real upstream servers on loopback, and plain HTTP/WebSocket clients.

#![allow(dead_code)]

pub mod certs;
pub mod fleet;
pub mod h3_client;
pub mod kamal_proxy;
pub mod load;
pub mod pebble;
pub mod raw_app;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

// Not every test crate uses it.
#[allow(unused_imports)]
pub use upstream::Upstream;

/// A running `proxy run`, killed when dropped.
pub struct ProxyProcess {
    child: Option<Child>,
    home: std::sync::Arc<tempfile::TempDir>,
    pub port: u16,
    pub https_port: u16,
    extra_args: Vec<String>,
    /// Environment variables beyond the home's, kept for restarts.
    extra_env: Vec<(String, String)>,
    log_path: PathBuf,
    /// The user the daemon runs as, when not the test's own.
    run_as: Option<u32>,
}

/// `nobody`, for running the daemon unprivileged when the tests run as root.
const UNPRIVILEGED_UID: u32 = 65534;

/// Whether this process runs as root, whom file permissions do not stop.
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = tempfile::NamedTempFile::new().expect("temp file");
    probe.as_file().metadata().expect("metadata").uid() == 0
}

impl ProxyProcess {
    /// Starts the daemon on a free loopback port with a fresh home directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts the daemon in a home directory the test prepared.
    pub fn start_in_home(home: tempfile::TempDir) -> Self {
        Self::start_in(std::sync::Arc::new(home), 0, 0, Vec::new(), None)
    }

    /// Starts the daemon in a home directory other processes use too (kamal-proxy, in a
    /// swap), on the given ports (0 = free ones), with extra `run` flags.
    pub fn start_in_shared_home(
        home: std::sync::Arc<tempfile::TempDir>,
        port: u16,
        https_port: u16,
        extra_args: &[&str],
    ) -> Self {
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        Self::start_in(home, port, https_port, extra_args, None)
    }

    /// Starts the daemon as a user whom file permissions bind: the test's own, or `nobody`
    /// (with a copy of the binary it can run, in a home it owns) when the tests run as root.
    pub fn start_unprivileged() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().expect("temp home");
        if !running_as_root() {
            return Self::start_in(std::sync::Arc::new(home), 0, 0, Vec::new(), None);
        }
        let binary = home.path().join("proxy");
        std::fs::copy(env!("CARGO_BIN_EXE_proxy"), &binary).expect("copy the binary");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        for path in [home.path(), &binary] {
            std::os::unix::fs::chown(path, Some(UNPRIVILEGED_UID), Some(UNPRIVILEGED_UID))
                .expect("chown to nobody");
        }
        Self::start_in(
            std::sync::Arc::new(home),
            0,
            0,
            Vec::new(),
            Some(UNPRIVILEGED_UID),
        )
    }

    /// Starts the daemon with extra `run` flags (ports default to free ones).
    pub fn start_with(extra_args: &[&str]) -> Self {
        let home = std::sync::Arc::new(tempfile::tempdir().expect("temp home"));
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        Self::start_in(home, 0, 0, extra_args, None)
    }

    /// Like `start_with`, with extra environment variables too.
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let home = std::sync::Arc::new(tempfile::tempdir().expect("temp home"));
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_in_env(home, 0, 0, extra_args, None, env)
    }

    fn start_in(
        home: std::sync::Arc<tempfile::TempDir>,
        port: u16,
        https_port: u16,
        extra_args: Vec<String>,
        run_as: Option<u32>,
    ) -> Self {
        Self::start_in_env(home, port, https_port, extra_args, run_as, Vec::new())
    }

    fn start_in_env(
        home: std::sync::Arc<tempfile::TempDir>,
        port: u16,
        https_port: u16,
        extra_args: Vec<String>,
        run_as: Option<u32>,
        extra_env: Vec<(String, String)>,
    ) -> Self {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let start_number = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path = home.path().join(format!("proxy-{start_number}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut args = vec!["run".to_string()];
        if !extra_args.iter().any(|a| a.starts_with("--bind")) {
            args.extend(["--bind".to_string(), "127.0.0.1".into()]);
        }
        if !extra_args.iter().any(|a| a.starts_with("--http-port")) {
            args.extend(["--http-port".to_string(), port.to_string()]);
        }
        args.extend(["--https-port".to_string(), https_port.to_string()]);
        args.extend(extra_args.iter().cloned());
        let mut command = match run_as {
            Some(uid) => {
                let mut command = Command::new(home.path().join("proxy"));
                std::os::unix::process::CommandExt::uid(&mut command, uid);
                std::os::unix::process::CommandExt::gid(&mut command, uid);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_proxy")),
        };
        let child = command
            .args(&args)
            .envs(env_for(home.path()))
            .envs(extra_env.iter().cloned())
            .env_remove("HTTP_PORT")
            .env_remove("KAMAL_PROXY_HTTP_PORT")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start proxy");
        let mut proxy = Self {
            child: Some(child),
            home,
            port,
            https_port,
            extra_args,
            extra_env,
            log_path,
            run_as,
        };
        (proxy.port, proxy.https_port) = proxy.wait_until_started();
        proxy
    }

    /// Waits for the "Proxy started" log line and returns the HTTP and HTTPS ports it names.
    fn wait_until_started(&mut self) -> (u16, u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("proxy exited early with {status}:\n{}", self.log());
                }
            }
            for line in self.log_lines() {
                if line["msg"] == "Proxy started" {
                    let port = |key: &str| {
                        line[key]
                            .as_str()
                            .unwrap()
                            .parse::<SocketAddr>()
                            .unwrap()
                            .port()
                    };
                    return (port("http"), port("https"));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("proxy did not start:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("proxy running").id()
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.home.path().join("proxy.sock")
    }

    pub fn state_path(&self) -> PathBuf {
        self.home
            .path()
            .join(".config/kamal-proxy/kamal-proxy.state")
    }

    /// Runs a CLI command against this daemon.
    /// Blocks only this test's worker thread (tests run on the multi-thread runtime), so the
    /// upstream servers in the same runtime keep answering health checks meanwhile.
    pub fn cli(&self, args: &[&str]) -> Output {
        let run = || {
            Command::new(env!("CARGO_BIN_EXE_proxy"))
                .args(args)
                .envs(env_for(self.home.path()))
                .output()
                .expect("run proxy CLI")
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(run),
            Err(_) => run(),
        }
    }

    /// Runs a CLI command and fails the test unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "`proxy {}` failed ({}): {}\n--- proxy log ---\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Deploys `service` to `target` with a fast health check, plus `extra` flags.
    pub fn deploy(&self, service: &str, target: &str, extra: &[&str]) -> String {
        let target_flag = format!("--target={target}");
        let mut args = vec![
            "deploy",
            service,
            &target_flag,
            "--health-check-interval=100ms",
        ];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The JSON lines the daemon has written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        let Ok(file) = std::fs::File::open(&self.log_path) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str(&line).ok())
            .collect()
    }

    /// The JSON lines the daemon has written once `ready` holds for them, or after 5 s. A
    /// worker writes its request lines when it runs out of work, so a request's line may
    /// arrive moments after its response.
    pub fn log_lines_once(
        &self,
        ready: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.log_lines();
            if ready(&lines) || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait_for_exit(Duration::from_secs(20))
    }

    /// Starts another daemon with this one's home, ports and user, and `extra_args`.
    fn start_another(&self, extra_args: Vec<String>) -> Self {
        Self::start_in_env(
            self.home.clone(),
            self.port,
            self.https_port,
            extra_args,
            self.run_as,
            self.extra_env.clone(),
        )
    }

    /// Stops the daemon and starts a new one with the same home (state), ports and flags.
    pub fn restart(mut self) -> Self {
        let status = self.terminate();
        assert!(status.success(), "proxy exited with {status}");
        let extra_args = std::mem::take(&mut self.extra_args);
        self.start_another(extra_args)
    }

    /// Kills the daemon with SIGKILL (no chance to clean up, as when the power goes) and
    /// starts a new one with the same home, ports and flags.
    pub fn crash_and_restart(mut self) -> Self {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL the proxy");
            let _ = child.wait();
        }
        let extra_args = std::mem::take(&mut self.extra_args);
        self.start_another(extra_args)
    }

    /// Kills the daemon with SIGKILL and leaves it dead.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL the proxy");
            let _ = child.wait();
        }
    }

    /// Starts `proxy run --upgrade` with the same home, socket and flags: the new process
    /// takes over from this one, which then drains and exits by itself.
    pub fn upgrade(&self) -> Self {
        let mut extra_args = self.extra_args.clone();
        extra_args.push("--upgrade".to_string());
        let successor = self.start_another(extra_args);
        let mut successor = successor;
        successor.extra_args.retain(|a| a != "--upgrade");
        successor
    }

    /// Waits for this process to exit by itself, up to `limit`.
    pub fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("proxy running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("proxy did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn env_for(home: &Path) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), home.display().to_string()),
        (
            "KAMAL_PROXY_SOCKET".into(),
            home.join("proxy.sock").display().to_string(),
        ),
    ]
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// One keep-alive HTTP/1.1 connection to the proxy.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(address: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    /// Sends a request. An error starting with `not sent` means the connection was already
    /// closed by the server (after `Connection: close`): the request never left, and a client
    /// simply reconnects.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("not sent: {e}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        read_reply(response).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, String> {
        self.send(request("GET", host, path, Bytes::new())).await
    }
}

/// Reads a whole response into a `Reply`.
pub async fn read_reply(response: hyper::Response<hyper::body::Incoming>) -> Result<Reply, String> {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

pub fn request(
    method: &str,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body.into()))
        .unwrap()
}

/// A GET on a new connection.
pub async fn get(address: SocketAddr, host: &str, path: &str) -> Reply {
    let mut connection = Connection::open(address).await.expect("connect to proxy");
    connection
        .get(host, path)
        .await
        .expect("request through proxy")
}

/// A TLS client configuration builder on aws-lc (rustls has two providers built in, so it
/// picks none by itself).
pub fn tls_client() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    tls_client_speaking(rustls::DEFAULT_VERSIONS)
}

/// [`tls_client`], speaking only `versions`.
pub fn tls_client_speaking(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("aws-lc speaks TLS 1.2 and 1.3")
}
