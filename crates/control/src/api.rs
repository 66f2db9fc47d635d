//! The control API: axum routes over a Unix socket, owner-only. See [`crate::protocol`] for
//! the endpoints. Changes run in their own task, so a CLI that goes away mid-deploy does not
//! leave a deploy half done.

use std::path::Path;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use tokio::net::UnixListener;

use crate::protocol::{
    ApiError, DeployRequest, PauseRequest, RolloutDeployRequest, RolloutSetRequest, StopRequest,
};
use crate::registry::{Registry, RegistryError};

/// Request bodies over this size are refused: no deploy needs more.
const MAX_BODY_BYTES: usize = 1024 * 1024;

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/services", get(list))
        .route("/v1/status", get(status))
        .route("/v1/services/{name}", delete(remove))
        .route("/v1/services/{name}/deploy", post(deploy))
        .route("/v1/services/{name}/stop", post(stop))
        .route("/v1/services/{name}/pause", post(pause))
        .route("/v1/services/{name}/resume", post(resume))
        .route(
            "/v1/services/{name}/rollout",
            post(rollout_deploy).delete(rollout_stop),
        )
        .route("/v1/services/{name}/rollout/split", put(rollout_set))
        .route("/v1/services/{name}/progress", get(progress))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(registry)
}

/// Binds the control socket with owner-only permissions. A socket file left by a dead
/// process is replaced; one that still answers means another daemon is running.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another proxy is already running (its control socket {} answers)",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    bind_replacing(path).await
}

/// Binds the control socket in place of a running daemon's (a handover): connections made
/// from now on reach this process.
pub async fn bind_replacing(path: &Path) -> std::io::Result<UnixListener> {
    // Bound under a temporary name and renamed once owner-only, so no one can connect in
    // between with wider permissions.
    let staging = path.with_extension(format!("sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    std::fs::rename(&staging, path)?;
    Ok(listener)
}

/// Serves the API until `shutdown` completes.
pub async fn serve<F>(
    listener: UnixListener,
    registry: Arc<Registry>,
    shutdown: F,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router(registry))
        .with_graceful_shutdown(shutdown)
        .await
}

struct ApiFailure(StatusCode, String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<RegistryError> for ApiFailure {
    fn from(error: RegistryError) -> Self {
        let status = match &error {
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            RegistryError::ServiceNotFound => StatusCode::NOT_FOUND,
            RegistryError::HostConflict => StatusCode::CONFLICT,
            RegistryError::Upgrading => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Unhealthy { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::State(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(status, error.to_string())
    }
}

impl From<JsonRejection> for ApiFailure {
    fn from(rejection: JsonRejection) -> Self {
        // 400 for malformed JSON, 413 for a body over the limit, 415 without a JSON
        // content type, 422 for JSON of the wrong shape.
        ApiFailure(
            rejection.status(),
            format!("invalid request: {}", rejection.body_text()),
        )
    }
}

type ApiResult = Result<Json<serde_json::Value>, ApiFailure>;

fn done() -> ApiResult {
    Ok(Json(serde_json::json!({})))
}

/// Runs a change to completion even if the caller disconnects.
async fn detached<F>(change: F) -> Result<(), ApiFailure>
where
    F: std::future::Future<Output = Result<(), RegistryError>> + Send + 'static,
{
    match tokio::spawn(change).await {
        Ok(result) => result.map_err(ApiFailure::from),
        Err(error) => Err(ApiFailure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("change failed: {error}"),
        )),
    }
}

async fn deploy(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<DeployRequest>, JsonRejection>,
) -> ApiResult {
    let Json(request) = body?;
    detached(async move { registry.deploy(&name, request).await }).await?;
    done()
}

async fn remove(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    detached(async move { registry.remove(&name).await }).await?;
    done()
}

async fn stop(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<StopRequest>, JsonRejection>,
) -> ApiResult {
    let Json(request) = body?;
    detached(async move {
        registry
            .stop(&name, request.drain_timeout.get(), request.message)
            .await
    })
    .await?;
    done()
}

async fn pause(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<PauseRequest>, JsonRejection>,
) -> ApiResult {
    let Json(request) = body?;
    detached(async move {
        registry
            .pause(&name, request.drain_timeout.get(), request.max_pause.get())
            .await
    })
    .await?;
    done()
}

async fn resume(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    registry.resume(&name).await?;
    done()
}

async fn rollout_deploy(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<RolloutDeployRequest>, JsonRejection>,
) -> ApiResult {
    let Json(request) = body?;
    detached(async move { registry.rollout_deploy(&name, request).await }).await?;
    done()
}

async fn rollout_set(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<RolloutSetRequest>, JsonRejection>,
) -> ApiResult {
    let Json(request) = body?;
    registry.rollout_set(&name, request).await?;
    done()
}

async fn rollout_stop(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    detached(async move { registry.rollout_stop(&name).await }).await?;
    done()
}

async fn progress(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<crate::protocol::DeployProgress>, ApiFailure> {
    registry.deploy_progress(&name).map(Json).ok_or_else(|| {
        ApiFailure(
            StatusCode::NOT_FOUND,
            format!("no deploy of {name} under way"),
        )
    })
}

async fn list(State(registry): State<Arc<Registry>>) -> Json<crate::protocol::ServiceList> {
    Json(registry.list())
}

async fn status(State(registry): State<Arc<Registry>>) -> Json<crate::protocol::StatusReport> {
    Json(registry.status())
}
