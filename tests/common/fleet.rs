//! What the fleet tests run besides the proxies: a real `redis-server` as the shared store and
//! a real HAProxy as the load balancer in front of several proxies' HTTP ports.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pebble::free_port;

fn require(binary: &str) -> PathBuf {
    let path = ["/usr/bin", "/usr/sbin"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(binary))
        .find(|path| path.exists());
    path.unwrap_or_else(|| {
        panic!("{binary} is missing: the fleet tests need it. Install it with `apt-get install redis-server haproxy` (.ci/run does).")
    })
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` on a free loopback port, with a password and an append-only file, so a
/// restart (`stop` then `start`) keeps what was stored.
pub struct Redis {
    pub port: u16,
    pub password: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Serving TLS only (`rediss://`), with a certificate from this CA (PEM file).
    tls_ca: Option<PathBuf>,
}

impl Redis {
    pub fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            password: "fleet-secret".to_string(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls_ca: None,
        };
        redis.start_again();
        redis
    }

    /// A server that speaks TLS only, for `rediss://` URLs, with a certificate for
    /// 127.0.0.1 from a CA made here.
    pub fn start_tls() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca, issuer) = super::certs::test_ca("berth test Redis CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let mut redis = Self {
            port: free_port(),
            password: "fleet-secret".to_string(),
            tls_ca: Some(dir.path().join("ca.pem")),
            dir,
            child: None,
        };
        redis.start_again();
        redis
    }

    /// The CA that signs a TLS server's certificate.
    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.tls_ca.as_deref()
    }

    /// The URL the proxies are given.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://:{}@127.0.0.1:{}/0", self.password, self.port)
    }

    /// Kills the server (SIGKILL: the store going away, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn start_again(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let mut command = Command::new(require("redis-server"));
        match &self.tls_ca {
            None => command.args(["--port", &self.port.to_string()]),
            Some(ca) => {
                let file = |name: &str| self.dir.path().join(name).display().to_string();
                command
                    .args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .args(["--tls-cert-file", &file("cert.pem")])
                    .args(["--tls-key-file", &file("key.pem")])
                    .args(["--tls-ca-cert-file", &ca.display().to_string()])
                    .args(["--tls-auth-clients", "no"])
            }
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--requirepass", &self.password])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_for_port(self.port, "redis-server");
    }

    /// A connection for the test itself to look at the store.
    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_connection().unwrap()
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query::<bool>(&mut self.connection())
            .unwrap()
    }

    /// The keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut self.connection())
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// HAProxy in TCP mode on `port`, sending each connection to one of `backends` at random
/// (those that accept connections).
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(port: u16, backends: &[u16]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = format!(
            "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             frontend acme\n  bind 127.0.0.1:{port}\n  default_backend proxies\n\
             backend proxies\n  balance random\n"
        );
        for (index, backend) in backends.iter().enumerate() {
            // Checked, as any load balancer's backends are: a dead proxy gets no traffic.
            config.push_str(&format!(
                "  server proxy{index} 127.0.0.1:{backend} check inter 200ms fall 1 rise 1\n"
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new(require("haproxy"))
            .args(["-db", "-f", path.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start haproxy");
        wait_for_port(port, "haproxy");
        Self { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
