//! A local Secret Manager for the secrets tests: answers `GET /v1/{name}:access` as
//! https://secretmanager.googleapis.com does (base64 `payload.data`, `payload.dataCrc32c` as a
//! decimal int64 string, Google's JSON error body), and only to bearer tokens a test accepts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde_json::json;

/// One stored version and how the server should answer for it.
#[derive(Clone)]
pub enum Stored {
    Value(String),
    /// Sends the value with a wrong CRC32C, as a corrupted payload would arrive.
    Corrupt(String),
    /// Answers 403 PERMISSION_DENIED.
    Forbidden,
    /// Answers 503 UNAVAILABLE, as during an outage.
    Unavailable,
}

pub struct SecretManagerServer {
    pub endpoint: String,
    /// Version names asked for, in order (`projects/p/secrets/s/versions/latest`).
    pub accessed: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct St {
    versions: Arc<HashMap<String, Stored>>,
    token_ok: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    accessed: Arc<Mutex<Vec<String>>>,
}

fn google_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16(), "message": message, "status": code}});
    (status, Json(body)).into_response()
}

async fn access(State(s): State<St>, Path(rest): Path<String>, headers: HeaderMap) -> Response {
    let Some(name) = rest.strip_suffix(":access") else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method");
    };
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| (s.token_ok)(t)) {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    s.accessed.lock().unwrap().push(name.to_string());
    let (value, crc_flip) = match s.versions.get(name) {
        Some(Stored::Value(v)) => (v, 0),
        Some(Stored::Corrupt(v)) => (v, 1),
        Some(Stored::Forbidden) => {
            return google_error(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                &format!(
                    "Permission 'secretmanager.versions.access' denied for resource '{name}' (or it may not exist)."
                ),
            );
        }
        Some(Stored::Unavailable) => {
            return google_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "The service is currently unavailable.",
            );
        }
        None => {
            return google_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                &format!("Secret [{name}] not found or has no versions."),
            );
        }
    };
    let crc = crc32c::crc32c(value.as_bytes()) ^ crc_flip;
    Json(json!({
        "name": name,
        "payload": {
            "data": base64::engine::general_purpose::STANDARD.encode(value.as_bytes()),
            "dataCrc32c": crc.to_string(),
        }
    }))
    .into_response()
}

/// Serves `versions` (full version names, e.g. `projects/p/secrets/s/versions/latest`) to
/// requests whose bearer token passes `token_ok`.
pub async fn start(
    versions: HashMap<String, Stored>,
    token_ok: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> SecretManagerServer {
    let accessed = Arc::new(Mutex::new(Vec::new()));
    let state = St { versions: Arc::new(versions), token_ok: Arc::new(token_ok), accessed: accessed.clone() };
    let app = Router::new().route("/v1/{*rest}", get(access)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    SecretManagerServer { endpoint, accessed, _task: task }
}
