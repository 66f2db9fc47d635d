//! The real kamal-proxy (`../shared/peers/kamal-proxy`, or `$KAMAL_PROXY_BIN`), run beside
//! `proxy` on the same home and socket, for swaps in both directions. Tests that need it skip
//! with a message when it is absent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The reference binary, if this checkout has one beside it.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("KAMAL_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/kamal-proxy")
        });
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: the reference kamal-proxy is not at {} (set KAMAL_PROXY_BIN to run this test)",
            path.display()
        );
        None
    }
}

/// A running `kamal-proxy run`, killed when dropped.
pub struct KamalProxy {
    binary: PathBuf,
    child: Option<Child>,
    home: PathBuf,
    log: PathBuf,
}

impl KamalProxy {
    /// Starts it with `home` as HOME (the socket inside it, as `proxy` uses) and waits until
    /// it answers on its socket.
    pub fn start(binary: &Path, home: &Path, http_port: u16, https_port: u16) -> Self {
        Self::start_with(binary, home, http_port, https_port, &[])
    }

    /// Like `start`, with extra `run` flags.
    pub fn start_with(
        binary: &Path,
        home: &Path,
        http_port: u16,
        https_port: u16,
        extra: &[&str],
    ) -> Self {
        let log = home.join(format!(
            "kamal-proxy-{http_port}-{}.log",
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(binary)
            .args(["run", "--http-port", &http_port.to_string()])
            .args(["--https-port", &https_port.to_string()])
            .args(extra)
            .envs(super::env_for(home))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start kamal-proxy");
        let proxy = Self {
            binary: binary.to_path_buf(),
            child: Some(child),
            home: home.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !proxy.cli(&["list"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "kamal-proxy did not start:\n{}",
                proxy.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        let run = || {
            Command::new(&self.binary)
                .args(args)
                .envs(super::env_for(&self.home))
                .env("NO_COLOR", "1")
                .output()
                .expect("run kamal-proxy CLI")
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
            "`kamal-proxy {}` failed: {}\n--- kamal-proxy log ---\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for it to exit, as `kamal proxy reboot` stops the container.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for KamalProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One of the two proxies a parity test runs the same input through.
pub enum Peer {
    Berth(super::ProxyProcess),
    KamalProxy {
        process: KamalProxy,
        http_port: u16,
        https_port: u16,
        _home: tempfile::TempDir,
    },
}

impl Peer {
    /// Berth, and the real kamal-proxy when it is at hand, each on its own home and ports.
    pub fn both() -> Vec<Peer> {
        Self::both_with(Vec::new)
    }

    /// Like `both`, each with the extra `run` flags `flags` gives it (asked once per proxy,
    /// so each can have ports of its own).
    pub fn both_with(flags: impl Fn() -> Vec<String>) -> Vec<Peer> {
        let berth_flags = flags();
        let berth_flags: Vec<&str> = berth_flags.iter().map(String::as_str).collect();
        let mut peers = vec![Peer::Berth(super::ProxyProcess::start_with(&berth_flags))];
        if let Some(binary) = binary() {
            let home = tempfile::tempdir().unwrap();
            let (http_port, https_port) = (super::pebble::free_port(), super::pebble::free_port());
            let kamal_flags = flags();
            let kamal_flags: Vec<&str> = kamal_flags.iter().map(String::as_str).collect();
            let process =
                KamalProxy::start_with(&binary, home.path(), http_port, https_port, &kamal_flags);
            peers.push(Peer::KamalProxy {
                process,
                http_port,
                https_port,
                _home: home,
            });
        }
        peers
    }

    pub fn name(&self) -> &'static str {
        match self {
            Peer::Berth(_) => "berth",
            Peer::KamalProxy { .. } => "kamal-proxy",
        }
    }

    pub fn ok(&self, args: &[&str]) -> String {
        match self {
            Peer::Berth(proxy) => proxy.ok(args),
            Peer::KamalProxy { process, .. } => process.ok(args),
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        match self {
            Peer::Berth(proxy) => proxy.cli(args),
            Peer::KamalProxy { process, .. } => process.cli(args),
        }
    }

    /// `deploy` with a fast health check, as `ProxyProcess::deploy`.
    pub fn deploy(&self, service: &str, target: &str, extra: &[&str]) -> String {
        let target = format!("--target={target}");
        let mut args = vec!["deploy", service, &target, "--health-check-interval=100ms"];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    pub fn address(&self) -> std::net::SocketAddr {
        match self {
            Peer::Berth(proxy) => proxy.address(),
            Peer::KamalProxy { http_port, .. } => {
                std::net::SocketAddr::from(([127, 0, 0, 1], *http_port))
            }
        }
    }

    pub fn https_port(&self) -> u16 {
        match self {
            Peer::Berth(proxy) => proxy.https_port,
            Peer::KamalProxy { https_port, .. } => *https_port,
        }
    }

    pub fn log(&self) -> String {
        match self {
            Peer::Berth(proxy) => proxy.log(),
            Peer::KamalProxy { process, .. } => process.log(),
        }
    }
}
