//! Behind a TCP load balancer: `--proxy-protocol` (v1 and v2 headers on the HTTP and HTTPS
//! listeners) and `--trusted-proxies` (whose X-Forwarded-For is believed).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::certs::certificate_files;
use common::{ProxyProcess, Upstream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY protocol v2 header for a TCP/IPv4 connection from `source`.
fn v2_header(source: SocketAddr, destination_port: u16) -> Vec<u8> {
    let SocketAddr::V4(source) = source else {
        panic!("IPv4 only")
    };
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 address bytes
    header.extend(source.ip().octets());
    header.extend([127, 0, 0, 1]);
    header.extend(source.port().to_be_bytes());
    header.extend(destination_port.to_be_bytes());
    header
}

/// Sends one request (after `preamble`) on `stream` and returns the upstream's report of
/// what it received, or `None` if the proxy closed the connection without an answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    extra_headers: &str,
) -> Option<serde_json::Value> {
    let request = format!(
        "GET /report HTTP/1.1\r\nHost: app.test\r\n{extra_headers}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the proxy answers or closes in time");
    if read.is_err() || response.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").unwrap().1;
    Some(serde_json::from_str(body).unwrap())
}

async fn plain(
    proxy: &ProxyProcess,
    preamble: &[u8],
    extra_headers: &str,
) -> Option<serde_json::Value> {
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    stream.write_all(preamble).await.unwrap();
    exchange(stream, extra_headers).await
}

fn forwarded_for(report: &serde_json::Value) -> &str {
    report["headers"]["x-forwarded-for"]
        .as_str()
        .unwrap_or_default()
}

/// The `key` of the `nth` (from 1) request line for `/report`: `client_addr` (the connection's
/// client, from the PROXY header) or `remote_addr` (the client the request names, as
/// kamal-proxy logs it).
fn logged(proxy: &ProxyProcess, nth: usize, key: &str) -> String {
    let is_report =
        |line: &&serde_json::Value| line["msg"] == "Request" && line["path"] == "/report";
    proxy
        .log_lines_once(|lines| lines.iter().filter(is_report).count() >= nth)
        .iter()
        .filter(is_report)
        .nth(nth - 1)
        .map(|line| line[key].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_carry_the_client_address_and_are_required() {
    let proxy = ProxyProcess::start_with(&["--proxy-protocol", "--trusted-proxies=10.0.0.0/8"]);
    let app = Upstream::start("app").await;
    let certificate = certificate_files("app.test");
    // Forwarded headers off: only a trusted proxy's X-Forwarded-For is kept.
    proxy.deploy(
        "app",
        &app.target(),
        &[
            "--host=app.test",
            "--tls",
            "--tls-redirect=false",
            "--forward-headers=false",
            &certificate.flags[0],
            &certificate.flags[1],
        ],
    );

    // v1 from an untrusted client: its address is the client, its X-Forwarded-For is replaced.
    let report = plain(
        &proxy,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 80\r\n",
        "X-Forwarded-For: 6.6.6.6\r\n",
    )
    .await
    .expect("answered");
    assert_eq!(forwarded_for(&report), "203.0.113.7");
    assert_eq!(logged(&proxy, 1, "client_addr"), "203.0.113.7");

    // v2 from a trusted proxy: its X-Forwarded-For is kept and names the client.
    let report = plain(
        &proxy,
        &v2_header("10.1.2.3:40000".parse().unwrap(), proxy.port),
        "X-Forwarded-For: 198.51.100.4\r\n",
    )
    .await
    .expect("answered");
    assert_eq!(forwarded_for(&report), "198.51.100.4, 10.1.2.3");
    assert_eq!(logged(&proxy, 2, "client_addr"), "10.1.2.3");
    assert_eq!(logged(&proxy, 2, "remote_addr"), "198.51.100.4");

    // v1 UNKNOWN (the balancer's own health check) keeps the socket's address.
    let report = plain(&proxy, b"PROXY UNKNOWN\r\n", "")
        .await
        .expect("answered");
    assert_eq!(forwarded_for(&report), "127.0.0.1");

    // No header, or a broken one: closed without an answer.
    assert!(plain(&proxy, b"", "").await.is_none());
    assert!(plain(&proxy, b"PROXY TCP4 nonsense\r\n", "")
        .await
        .is_none());

    // HTTPS: the header comes before the TLS handshake.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate.root.clone()).unwrap();
    let config = common::tls_client()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut stream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], proxy.https_port)))
        .await
        .unwrap();
    stream
        .write_all(&v2_header(
            "192.0.2.44:1234".parse().unwrap(),
            proxy.https_port,
        ))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("app.test").unwrap(), stream)
        .await
        .expect("TLS handshake after the PROXY header");
    let report = exchange(tls, "").await.expect("answered over HTTPS");
    assert_eq!(forwarded_for(&report), "192.0.2.44");
    assert_eq!(report["headers"]["x-forwarded-proto"], "https");

    // Without a header, no TLS handshake happens either.
    let stream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], proxy.https_port)))
        .await
        .unwrap();
    let config = common::tls_client()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("app.test").unwrap(), stream),
    )
    .await
    .expect("refused in time");
    assert!(refused.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_trusted_proxy_ranges_are_refused_by_name() {
    let home = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["run", "--trusted-proxies=10.0.0.0/8,not-a-range"])
        .env("HOME", home.path())
        .env("KAMAL_PROXY_SOCKET", home.path().join("proxy.sock"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("--trusted-proxies") && message.contains("not-a-range"),
        "{message}"
    );
}
