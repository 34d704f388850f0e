//! `bq2sftp serve`: the sidecar a scheduler triggers over HTTP.
//!
//! ```text
//! POST /jobs/{name}/run[?wait=true]   start a configured job -> 202 {run_id} (or the result)
//! GET  /runs/{id}                     status, counters, and the files once done
//! GET  /metrics                       Prometheus metrics of every run
//! GET  /healthz                       200, or 503 while draining
//! ```
//!
//! Jobs come from a jobs file: `[jobs.NAME]` tables whose keys are the `export` flags (as in a
//! job file, [`crate::jobfile`]), plus `overridable = ["where", …]`: the only keys a request
//! body may set, so a caller can pick the day to export but never the target. Every job is
//! validated at startup.
//!
//! Callers prove who they are with a Google-signed OIDC token ([`oidc`]); `/jobs` and `/runs`
//! refuse everyone else. A job already running answers 409, and at most
//! `--max-concurrent-runs` run at once (429 beyond). SIGTERM (Cloud Run sends it before it
//! stops an instance) drains: new runs get 503, running ones get `--drain-timeout` to finish,
//! then are cancelled, which leaves their state for `--resume`.

pub mod oidc;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{ConfigError, Error};
use crate::metrics::Progress;
use crate::{Report, jobfile};

pub const DEFAULT_MAX_CONCURRENT_RUNS: usize = 2;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

/// `bq2sftp serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The jobs file: [jobs.NAME] tables of export flags, each with optional `overridable = [..]`.
    #[arg(long, value_name = "PATH", env = "BQ2SFTP_SERVE_JOBS")]
    pub jobs: PathBuf,

    /// Address to listen on (Cloud Run: 0.0.0.0:$PORT).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT", env = "BQ2SFTP_SERVE_ADDR")]
    pub addr: SocketAddr,

    /// The audience callers' OIDC tokens must carry: this service's URL.
    #[arg(long, value_name = "URL", env = "BQ2SFTP_SERVE_AUDIENCE")]
    pub audience: Option<String>,

    /// Service-account email allowed to call (repeatable, or comma-separated in the variable).
    #[arg(long = "allowed-caller", value_name = "EMAIL", env = "BQ2SFTP_SERVE_ALLOWED_CALLERS", value_delimiter = ',')]
    pub allowed_callers: Vec<String>,

    /// Where Google's token signing keys are published.
    #[arg(long, default_value = oidc::GOOGLE_JWKS_URL, value_name = "URL", env = "BQ2SFTP_SERVE_JWKS_URL")]
    pub jwks_url: String,

    /// Runs allowed at the same time.
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT_RUNS, value_name = "N")]
    pub max_concurrent_runs: usize,

    /// On SIGTERM, how long running jobs may continue before they are cancelled (resumable).
    #[arg(long, default_value = "8", value_name = "SECONDS")]
    pub drain_timeout: u64,

    /// Accept calls without a token. Only for local testing: refused unless the address is loopback.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// One configured job.
#[derive(Clone)]
pub struct JobSpec {
    /// The job's export flags.
    pub table: toml::Table,
    /// Keys (dashed form) a request may set.
    pub overridable: BTreeSet<String>,
}

/// Keys only: the table may hold a password as written in the jobs file.
impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSpec")
            .field("keys", &self.table.keys().collect::<Vec<_>>())
            .field("overridable", &self.overridable)
            .finish()
    }
}

/// Reads and validates a jobs file.
pub fn load_jobs(path: &Path) -> Result<BTreeMap<String, JobSpec>, ConfigError> {
    let what = format!("jobs file {}", path.display());
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::invalid(&what, format!("cannot read it: {e}")))?;
    let mut root: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::invalid(&what, e.to_string().trim()))?;
    let Some(toml::Value::Table(jobs)) = root.remove("jobs") else {
        return Err(ConfigError::invalid(&what, "no [jobs.NAME] tables"));
    };
    if let Some(key) = root.keys().next() {
        return Err(ConfigError::invalid(&what, format!("unknown top-level key '{key}'; jobs go in [jobs.NAME]")));
    }
    let mut specs = BTreeMap::new();
    for (name, value) in jobs {
        let job_what = format!("{what}, job '{name}'");
        let toml::Value::Table(mut table) = value else {
            return Err(ConfigError::invalid(job_what, "must be a table of export flags"));
        };
        let overridable = match table.remove("overridable") {
            None => BTreeSet::new(),
            Some(toml::Value::Array(keys)) => keys
                .iter()
                .map(|k| k.as_str().map(|s| s.replace('_', "-")))
                .collect::<Option<_>>()
                .ok_or_else(|| ConfigError::invalid(&job_what, "overridable must be a list of flag names"))?,
            Some(_) => return Err(ConfigError::invalid(&job_what, "overridable must be a list of flag names")),
        };
        let command = jobfile::export_command();
        for key in &overridable {
            if !jobfile::export_flags(&command).any(|a| a.get_long() == Some(key.as_str())) {
                return Err(ConfigError::invalid(&job_what, format!("overridable key '{key}' is not an export flag")));
            }
        }
        let (args, _, _) = jobfile::from_table(&table, &[], &job_what)?;
        args.to_job().map_err(|e| ConfigError::invalid(&job_what, e.to_string()))?;
        specs.insert(name, JobSpec { table, overridable });
    }
    Ok(specs)
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Running,
    Succeeded,
    Failed,
}

struct Run {
    id: String,
    job: String,
    started_at: String,
    progress: Arc<Progress>,
    outcome: Mutex<Option<(Status, Value)>>,
    done: watch::Sender<bool>,
}

impl Run {
    fn view(&self) -> Value {
        let outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (status, result) = outcome.unwrap_or((Status::Running, Value::Null));
        let p = &self.progress;
        let mut v = json!({
            "run_id": self.id,
            "job": self.job,
            "status": status,
            "started_at": self.started_at,
            "counters": {
                "rows_read": p.rows_read.load(Ordering::Relaxed),
                "estimated_rows": p.estimated_rows.load(Ordering::Relaxed),
                "files_committed": p.committed_files.load(Ordering::Relaxed),
                "bytes_committed": p.committed_bytes.load(Ordering::Relaxed),
            },
        });
        if let (Value::Object(map), Value::Object(extra)) = (&mut v, result) {
            map.extend(extra);
        }
        v
    }
}

struct AppState {
    jobs: BTreeMap<String, JobSpec>,
    verifier: Option<oidc::Verifier>,
    runs: Mutex<HashMap<String, Arc<Run>>>,
    running: Mutex<HashSet<String>>,
    slots: Arc<Semaphore>,
    draining: AtomicBool,
    tracker: TaskTracker,
    cancel_runs: CancellationToken,
}

/// A running server.
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    state: Arc<AppState>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    drain_timeout: Duration,
}

impl ServerHandle {
    /// Drains (new runs refused, running ones get the drain timeout, then are cancelled) and stops.
    pub async fn shutdown(self) {
        self.state.draining.store(true, Ordering::SeqCst);
        self.state.tracker.close();
        if tokio::time::timeout(self.drain_timeout, self.state.tracker.wait()).await.is_err() {
            tracing::warn!("drain timeout: cancelling running jobs; they can be resumed");
            self.state.cancel_runs.cancel();
            self.state.tracker.wait().await;
        }
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Validates the configuration and starts serving.
pub async fn start(args: &ServeArgs) -> Result<ServerHandle, Error> {
    let jobs = load_jobs(&args.jobs)?;
    let verifier = if args.insecure_no_auth {
        if !args.addr.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "--insecure-no-auth",
                format!(
                    "only allowed on a loopback address, not {}; configure --audience and --allowed-caller",
                    args.addr
                ),
            )
            .into());
        }
        tracing::warn!("serving WITHOUT caller authentication (--insecure-no-auth)");
        None
    } else {
        let audience = args.audience.clone().filter(|a| !a.is_empty()).ok_or_else(|| {
            ConfigError::invalid("serve", "needs --audience (this service's URL, as in the callers' OIDC tokens)")
        })?;
        let allowed: HashSet<String> =
            args.allowed_callers.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if allowed.is_empty() {
            return Err(ConfigError::invalid(
                "serve",
                "needs --allowed-caller EMAIL (the service account that triggers jobs)",
            )
            .into());
        }
        Some(oidc::Verifier::new(oidc::OidcConfig {
            audience,
            allowed_callers: allowed,
            jwks_url: args.jwks_url.clone(),
        }))
    };
    if args.max_concurrent_runs == 0 {
        return Err(ConfigError::invalid("--max-concurrent-runs", "must be at least 1").into());
    }
    let state = Arc::new(AppState {
        jobs,
        verifier,
        runs: Mutex::new(HashMap::new()),
        running: Mutex::new(HashSet::new()),
        slots: Arc::new(Semaphore::new(args.max_concurrent_runs)),
        draining: AtomicBool::new(false),
        tracker: TaskTracker::new(),
        cancel_runs: CancellationToken::new(),
    });
    let app = axum::Router::new()
        .route("/jobs/{name}/run", post(run_job))
        .route("/runs/{id}", get(get_run))
        .route("/healthz", get(healthz))
        .route(
            "/metrics",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::global().render())
            }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| ConfigError::invalid(format!("--addr {}", args.addr), format!("cannot listen: {e}")))?;
    let local_addr = listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move { stopped.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!("server stopped: {e}");
        }
    });
    tracing::info!(%local_addr, jobs = state.jobs.len(), "serving");
    Ok(ServerHandle { local_addr, state, stop, task, drain_timeout: Duration::from_secs(args.drain_timeout) })
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Option<String>, Response> {
    let Some(verifier) = &state.verifier else { return Ok(None) };
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match verifier.verify(value).await {
        Ok(email) => Ok(Some(email)),
        Err(e) => {
            tracing::warn!("refused a call: {e}");
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut response = problem(status, e.to_string());
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            Err(response)
        }
    }
}

#[derive(serde::Deserialize)]
struct RunQuery {
    #[serde(default)]
    wait: bool,
}

async fn run_job(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<RunQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let caller = match authorize(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if state.draining.load(Ordering::SeqCst) {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "shutting down; try again on another instance");
    }
    let Some(spec) = state.jobs.get(&name) else {
        return problem(StatusCode::NOT_FOUND, format!("no job named '{name}'"));
    };
    let job = match build_job(&name, spec, &body) {
        Ok(j) => j,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if !state.running.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone()) {
        return problem(StatusCode::CONFLICT, format!("job '{name}' is already running"));
    }
    let Ok(permit) = state.slots.clone().try_acquire_owned() else {
        state.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
        let mut r = problem(StatusCode::TOO_MANY_REQUESTS, "the server runs as many jobs as it may; try again later");
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        return r;
    };
    let id = uuid::Uuid::new_v4().to_string();
    let (done, mut done_rx) = watch::channel(false);
    let run = Arc::new(Run {
        id: id.clone(),
        job: name.clone(),
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        progress: Arc::new(Progress::default()),
        outcome: Mutex::new(None),
        done,
    });
    state.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), run.clone());
    tracing::info!(job = %name, run_id = %id, caller = caller.as_deref().unwrap_or("-"), "run started");
    let (task_state, task_run) = (state.clone(), run.clone());
    let cancel = state.cancel_runs.child_token();
    state.tracker.spawn(async move {
        let (export, job) = job;
        let result = job.run_with(cancel, task_run.progress.clone()).await;
        crate::metrics::publish(&export.metrics).await;
        let outcome = match result {
            Ok(report) => (Status::Succeeded, report_json(&report)),
            Err(e) => {
                tracing::error!(job = %task_run.job, run_id = %task_run.id, "run failed: {e}");
                (Status::Failed, json!({ "error": e.to_string(), "exit_code": e.exit_code() }))
            }
        };
        *task_run.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        task_state.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&task_run.job);
        drop(permit);
        let _ = task_run.done.send(true);
    });
    if query.wait {
        let _ = done_rx.wait_for(|d| *d).await;
        let view = run.view();
        let status = if view["status"] == "succeeded" { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
        return (status, Json(view)).into_response();
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({ "run_id": id, "job": name, "status": "running", "status_url": format!("/runs/{id}") })),
    )
        .into_response()
}

/// The job's flags with the request body's overrides (only keys the job allows).
fn build_job(name: &str, spec: &JobSpec, body: &[u8]) -> Result<(crate::cli::ExportArgs, crate::Job), ConfigError> {
    let what = format!("job '{name}'");
    let mut table = spec.table.clone();
    if !body.iter().all(u8::is_ascii_whitespace) {
        let overrides: serde_json::Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
            ConfigError::invalid(&what, format!("the request body must be a JSON object of overrides: {e}"))
        })?;
        for (key, value) in overrides {
            let dashed = key.replace('_', "-");
            if !spec.overridable.contains(&dashed) {
                let allowed: Vec<_> = spec.overridable.iter().cloned().collect();
                return Err(ConfigError::invalid(
                    &what,
                    format!("'{key}' may not be set by a request; this job allows: [{}]", allowed.join(", ")),
                ));
            }
            let value = match value {
                Value::String(s) => toml::Value::String(s),
                Value::Bool(b) => toml::Value::Boolean(b),
                Value::Number(n) => n
                    .as_i64()
                    .map(toml::Value::Integer)
                    .or_else(|| n.as_f64().map(toml::Value::Float))
                    .ok_or_else(|| ConfigError::invalid(&what, format!("'{key}': number out of range")))?,
                _ => return Err(ConfigError::invalid(&what, format!("'{key}' must be a string, number or boolean"))),
            };
            table.retain(|k, _| k.replace('_', "-") != dashed);
            table.insert(dashed, value);
        }
    }
    let (export, _, _) = jobfile::from_table(&table, &[] as &[OsString], &what)?;
    let job = export.to_job()?;
    Ok((export, job))
}

fn report_json(r: &Report) -> Value {
    json!({
        "rows": r.rows,
        "bytes": r.bytes,
        "seconds": r.duration.as_secs_f64(),
        "target": r.target,
        "manifest": r.manifest,
        "files": r.files,
    })
}

async fn get_run(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&state, &headers).await {
        return r;
    }
    let run = state.runs.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
    match run {
        Some(run) => Json(run.view()).into_response(),
        None => problem(StatusCode::NOT_FOUND, format!("no run {id}")),
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        (StatusCode::OK, "ok").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_spec_prints_its_keys_not_its_values() {
        let table: toml::Table = toml::from_str("to = \"sftp://u@h/d\"\nsftp_password = \"hunter2-9f\"\n").unwrap();
        let spec = JobSpec { table, overridable: BTreeSet::from(["where".to_string()]) };
        let shown = format!("{spec:?}");
        assert!(shown.contains("sftp_password") && shown.contains("where"), "{shown}");
        assert!(!shown.contains("hunter2-9f") && !shown.contains("sftp://u@h/d"), "{shown}");
    }
}
