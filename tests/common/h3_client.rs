//! An HTTP/3 client for the tests: quinn for QUIC, h3 for the requests, trusting one root.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode};
use rustls::pki_types::CertificateDer;

/// One HTTP/3 connection to the proxy.
pub struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
    // Kept open while the connection lives.
    _endpoint: quinn::Endpoint,
}

/// What came back.
#[derive(Debug)]
pub struct H3Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl H3Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl H3Client {
    /// Connects to `address` for `server_name`, trusting certificates that chain to `root`.
    pub async fn connect(
        address: SocketAddr,
        server_name: &str,
        root: &CertificateDer<'static>,
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let connection = endpoint
            .connect(address, server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("QUIC connection failed: {e}"))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = driver.wait_idle().await;
        });
        Ok(Self {
            send,
            driver,
            _endpoint: endpoint,
        })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<H3Reply, String> {
        self.request(Method::GET, host, path, HeaderMap::new(), None)
            .await
    }

    /// Sends one request (with `body`, if any) and reads the whole response.
    pub async fn request(
        &mut self,
        method: Method,
        host: &str,
        path: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<H3Reply, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("https://{host}{path}"))
            .body(())
            .map_err(|e| e.to_string())?;
        *request.headers_mut() = headers;
        let mut stream = self
            .send
            .send_request(request)
            .await
            .map_err(|e| format!("request not sent: {e}"))?;
        if let Some(body) = body {
            stream
                .send_data(body)
                .await
                .map_err(|e| format!("body not sent: {e}"))?;
        }
        stream
            .finish()
            .await
            .map_err(|e| format!("request not finished: {e}"))?;
        let response = stream
            .recv_response()
            .await
            .map_err(|e| format!("no response: {e}"))?;
        let mut body = BytesMut::new();
        while let Some(mut chunk) = stream
            .recv_data()
            .await
            .map_err(|e| format!("response body cut: {e}"))?
        {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        Ok(H3Reply {
            status: response.status(),
            headers: response.headers().clone(),
            body: body.freeze(),
        })
    }
}

impl Drop for H3Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}
