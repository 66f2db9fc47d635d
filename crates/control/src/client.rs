//! The client the CLI uses: one HTTP/1.1 request per command over the control socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{
    ApiError, DeployProgress, DeployRequest, PauseRequest, RolloutDeployRequest, RolloutSetRequest,
    ServiceList, StatusReport, StopRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the proxy at {socket}: {source} (is `proxy run` running?)")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Api(String),
    #[error("unexpected answer from the proxy: {0}")]
    Protocol(String),
    /// The daemon is handing over to a new process; the call is retried until the new one
    /// answers.
    #[error("{0}")]
    Upgrading(String),
}

/// How long a command keeps retrying while the proxy hands over to a new process.
const HANDOVER_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ControlClient {
    socket: PathBuf,
}

impl ControlClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn deploy(&self, service: &str, request: &DeployRequest) -> Result<(), ClientError> {
        self.call_unit(
            Method::POST,
            &service_path(service, "/deploy"),
            Some(request),
        )
        .await
    }

    pub async fn remove(&self, service: &str) -> Result<(), ClientError> {
        self.call_unit::<()>(Method::DELETE, &service_path(service, ""), None)
            .await
    }

    pub async fn stop(&self, service: &str, request: &StopRequest) -> Result<(), ClientError> {
        self.call_unit(Method::POST, &service_path(service, "/stop"), Some(request))
            .await
    }

    pub async fn pause(&self, service: &str, request: &PauseRequest) -> Result<(), ClientError> {
        self.call_unit(
            Method::POST,
            &service_path(service, "/pause"),
            Some(request),
        )
        .await
    }

    pub async fn resume(&self, service: &str) -> Result<(), ClientError> {
        self.call_unit::<()>(Method::POST, &service_path(service, "/resume"), None)
            .await
    }

    pub async fn rollout_deploy(
        &self,
        service: &str,
        request: &RolloutDeployRequest,
    ) -> Result<(), ClientError> {
        self.call_unit(
            Method::POST,
            &service_path(service, "/rollout"),
            Some(request),
        )
        .await
    }

    pub async fn rollout_set(
        &self,
        service: &str,
        request: &RolloutSetRequest,
    ) -> Result<(), ClientError> {
        self.call_unit(
            Method::PUT,
            &service_path(service, "/rollout/split"),
            Some(request),
        )
        .await
    }

    pub async fn rollout_stop(&self, service: &str) -> Result<(), ClientError> {
        self.call_unit::<()>(Method::DELETE, &service_path(service, "/rollout"), None)
            .await
    }

    /// What the deploy of `service` under way waits for; an error when none is.
    pub async fn deploy_progress(&self, service: &str) -> Result<DeployProgress, ClientError> {
        self.call::<(), _>(Method::GET, &service_path(service, "/progress"), None)
            .await
    }

    pub async fn list(&self) -> Result<ServiceList, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/services", None).await
    }

    pub async fn status(&self) -> Result<StatusReport, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/status", None).await
    }

    async fn call_unit<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), ClientError> {
        self.call::<B, serde_json::Value>(method, path, body)
            .await
            .map(|_| ())
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let deadline = std::time::Instant::now() + HANDOVER_RETRY;
        loop {
            match self.call_once(method.clone(), path, body).await {
                Err(ClientError::Upgrading(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(ClientError::Upgrading(message)) => return Err(ClientError::Api(message)),
                outcome => return outcome,
            }
        }
    }

    async fn call_once<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(connection);

        let payload = match body {
            Some(body) => {
                serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?
            }
            None => Vec::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                return Err(ClientError::Upgrading(message));
            }
            return Err(ClientError::Api(message));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// `/v1/services/<name><suffix>`, with the name percent-encoded.
fn service_path(service: &str, suffix: &str) -> String {
    let mut encoded = String::with_capacity(service.len());
    for byte in service.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("/v1/services/{encoded}{suffix}")
}
