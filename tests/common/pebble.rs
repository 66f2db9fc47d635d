//! A real ACME server for the tests: Debian's `pebble`, with `pebble-challtestsrv` as its DNS
//! server so every test hostname resolves to 127.0.0.1. Pebble validates HTTP-01 challenges by
//! connecting to the proxy's HTTP port, so it is started for one proxy port.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Settings that change how pebble behaves.
#[derive(Debug, Default, Clone, Copy)]
pub struct PebbleOptions {
    /// How long the certificates it issues are valid (default: five years).
    pub validity_secs: Option<u64>,
    /// Wait up to this many seconds (at random) before each validation, as a slow CA
    /// would; by default it validates at once.
    pub validation_sleep_secs: Option<u64>,
}

pub struct Pebble {
    dir: tempfile::TempDir,
    pebble: Child,
    dns: Child,
    acme_port: u16,
    management_port: u16,
    dns_management_port: u16,
    /// The root that signs pebble's own HTTPS listener (made by the test).
    pub api_ca_pem: String,
}

/// A port nobody listens on right now, for a listener that must be named before it is made
/// (pebble is told the proxy's HTTP port before the proxy starts).
///
/// Taken below the kernel's ephemeral range (32768 and up): a port the kernel hands out for
/// `bind(0)` is also what it hands the many outgoing connections of the tests running
/// alongside, and one of those took such a port before the proxy could bind it ("Address
/// already in use", seen in CI). Below that range only another test's pick can collide, and
/// picks are spread at random.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    static PICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for _ in 0..1000 {
        let pick = PICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let random = RandomState::new().hash_one((pick, std::process::id(), Instant::now()));
        let port = 20_000 + (random % 12_000) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

fn require(binary: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(binary);
    assert!(
        path.exists(),
        "{binary} is missing: the TLS tests need a real ACME server. Install it with `apt-get install pebble` (.ci/run does)."
    );
    path
}

impl Pebble {
    /// Starts pebble validating HTTP-01 challenges on `http_port` of 127.0.0.1 (TLS-ALPN-01
    /// on a port nobody listens on).
    pub fn start(http_port: u16) -> Self {
        Self::start_validating(http_port, free_port())
    }

    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`.
    pub fn start_validating(http_port: u16, tls_port: u16) -> Self {
        Self::start_with(http_port, tls_port, PebbleOptions::default())
    }

    /// Starts pebble with `options`. Its own ports are picked free just before it starts, so
    /// another test can take one in between: pebble then exits at once ("address already in
    /// use"), and it is started again on fresh ports.
    pub fn start_with(http_port: u16, tls_port: u16, options: PebbleOptions) -> Self {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let mut started = Self::start_once(http_port, tls_port, options);
            if started.wait_until_serving() {
                return started;
            }
            eprintln!(
                "pebble exited while starting (attempt {attempt} of {ATTEMPTS}), starting it again on fresh ports:\n{}",
                started.log()
            );
        }
        panic!("pebble did not start in {ATTEMPTS} attempts");
    }

    fn start_once(http_port: u16, tls_port: u16, options: PebbleOptions) -> Self {
        let pebble_bin = require("pebble");
        let dns_bin = require("pebble-challtestsrv");
        let dir = tempfile::tempdir().unwrap();

        let (ca, issuer) = super::certs::test_ca("berth test API CA");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut server_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        server_params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let server = server_params.signed_by(&server_key, &issuer).unwrap();
        std::fs::write(dir.path().join("api-cert.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("api-key.pem"), server_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("api-ca.pem"), ca.pem()).unwrap();

        let (acme_port, management_port, dns_port, dns_management_port) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": dir.path().join("api-cert.pem"),
                "privateKey": dir.path().join("api-key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": options.validity_secs.unwrap_or(157_766_400)
            }
        });
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();

        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let dns = Command::new(dns_bin)
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_management_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("dns.log"))
            .stderr(Stdio::from(log("dns.err")))
            .spawn()
            .expect("start pebble-challtestsrv");
        let mut pebble = Command::new(pebble_bin);
        pebble
            .args(["-config", dir.path().join("pebble.json").to_str().unwrap()])
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_WFE_NONCEREJECT", "0");
        match options.validation_sleep_secs {
            Some(secs) => pebble.env("PEBBLE_VA_SLEEPTIME", secs.to_string()),
            None => pebble.env("PEBBLE_VA_NOSLEEP", "1"),
        };
        let pebble = pebble
            .stdout(log("pebble.log"))
            .stderr(Stdio::from(log("pebble.err")))
            .spawn()
            .expect("start pebble");
        let api_ca_pem = ca.pem();
        Self {
            dir,
            pebble,
            dns,
            acme_port,
            management_port,
            dns_management_port,
            api_ca_pem,
        }
    }

    /// Waits until both processes answer on their ports and are still running a moment later;
    /// false when one of them exited (a port was taken). A port that answers is not proof on
    /// its own: whoever took it answers too.
    fn wait_until_serving(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [
            self.acme_port,
            self.management_port,
            self.dns_management_port,
        ] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if self.exited() {
                    return false;
                }
                assert!(
                    Instant::now() < deadline,
                    "pebble did not start:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        !self.exited()
    }

    fn exited(&mut self) -> bool {
        [&mut self.pebble, &mut self.dns]
            .into_iter()
            .any(|child| !matches!(child.try_wait(), Ok(None)))
    }

    /// How many orders pebble has finalized (certificates it issued).
    pub fn finalized_orders(&self) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains("POST /finalize-order/"))
            .count()
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    pub fn api_ca_path(&self) -> PathBuf {
        self.dir.path().join("api-ca.pem")
    }

    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "{}{}{}",
            read("pebble.log"),
            read("pebble.err"),
            read("dns.err")
        )
    }

    /// The root that signs the certificates pebble issues (new for every pebble run).
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let pem = self.management_get("/roots/0").await;
        let root = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        root
    }

    async fn management_get(&self, path: &str) -> String {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.api_ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = super::tls_client()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let stream = TcpStream::connect(("127.0.0.1", self.management_port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), stream)
            .await
            .unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header("host", "127.0.0.1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Makes `host` resolve to `address` for pebble (to send its validation elsewhere).
    pub async fn resolve(&self, host: &str, address: &str) {
        let stream = TcpStream::connect(("127.0.0.1", self.dns_management_port))
            .await
            .unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let body = serde_json::json!({ "host": host, "addresses": [address] }).to_string();
        let request = hyper::Request::post("/add-a")
            .header("host", "127.0.0.1")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert!(
            response.status().is_success(),
            "challtestsrv refused add-a: {}",
            response.status()
        );
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [&mut self.pebble, &mut self.dns] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What an HTTPS request through the proxy saw.
#[derive(Debug)]
pub struct HttpsReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    pub alpn: Option<Vec<u8>>,
    pub leaf: CertificateDer<'static>,
}

/// GET `/` over TLS until it succeeds (a certificate being ordered), for up to 60 s.
pub async fn wait_for_https(
    port: u16,
    host: &str,
    roots: &[CertificateDer<'static>],
) -> HttpsReply {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match https_get(port, host, "/", roots).await {
            Ok(reply) => return reply,
            Err(error) => {
                assert!(Instant::now() < deadline, "no HTTPS for {host}: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// GET over TLS to 127.0.0.1:`port` with SNI and Host `host`, trusting `roots` only.
pub async fn https_get(
    port: u16,
    host: &str,
    path: &str,
    roots: &[CertificateDer<'static>],
) -> Result<HttpsReply, String> {
    https_get_with_alpn(port, host, path, roots, &[b"http/1.1"]).await
}

/// Like `https_get`, offering the given ALPN protocols and speaking HTTP/2 if `h2` is chosen.
pub async fn https_get_with_alpn(
    port: u16,
    host: &str,
    path: &str,
    roots: &[CertificateDer<'static>],
    offered: &[&[u8]],
) -> Result<HttpsReply, String> {
    https_request(port, host, path, roots, offered, &[]).await
}

/// Like `https_get`, sending `headers` too (over HTTP/1.1).
pub async fn https_get_with_headers(
    port: u16,
    host: &str,
    path: &str,
    roots: &[CertificateDer<'static>],
    headers: &[(&str, &str)],
) -> Result<HttpsReply, String> {
    https_request(port, host, path, roots, &[b"http/1.1"], headers).await
}

async fn https_request(
    port: u16,
    host: &str,
    path: &str,
    roots: &[CertificateDer<'static>],
    offered: &[&[u8]],
    headers: &[(&str, &str)],
) -> Result<HttpsReply, String> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(|e| e.to_string())?;
    }
    let mut config = super::tls_client()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = offered.iter().map(|p| p.to_vec()).collect();
    let stream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("no certificate")?;
    let response = if alpn.as_deref() == Some(&b"h2"[..]) {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = hyper::Request::get(format!("https://{host}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = hyper::Request::get(path).header("host", host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::<Bytes>::new()).unwrap();
        sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?
    };
    let reply = super::read_reply(response).await?;
    Ok(HttpsReply {
        status: reply.status,
        headers: reply.headers,
        body: reply.body,
        alpn,
        leaf,
    })
}
