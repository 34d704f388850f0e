//! The REST calls of query mode, answered as BigQuery's v2 API answers them
//! (googleapis `bigquery/v2/job.proto`, `table.proto`; research notes §3):
//!
//! - `POST /bigquery/v2/projects/{p}/jobs` (jobs.insert): runs `SELECT <columns> FROM <table>
//!   [WHERE …]` into an anonymous result table (`{p}._emulator_anonymous.anon_{job}`), or
//!   records a failed job (`status.errorResult` with `invalidQuery` / `notFound`), or a script
//!   job (several statements) that, like BigQuery's, has no destination table. A reused job id
//!   is 409 ALREADY_EXISTS. `configuration.dryRun` returns statistics and the schema only.
//! - `GET …/queries/{job}` (jobs.getQueryResults): `jobComplete: false` for the configured
//!   number of polls, then true; a failed job answers HTTP 400 with its error.
//! - `GET …/jobs/{job}` (jobs.get) and `GET …/datasets/{d}/tables/{t}` (tables.get).
//!
//! Errors use Google's JSON error body (`{"error": {"code", "message", "errors": [{"reason",
//! "message"}], "status"}}`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::State;
use super::catalog::{CatalogError, Projection, Table, rest_schema};
use super::sql::{Filter, Statement, parse_query};
use crate::read::bigquery::TableRef;

const ANONYMOUS_DATASET: &str = "_emulator_anonymous";

#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Done { destination: TableRef, schema: Value, rows: u64, bytes: u64 },
    Script { statements: usize },
    Failed { reason: String, message: String },
}

#[derive(Debug, Clone)]
pub(crate) struct Job {
    project: String,
    id: String,
    location: String,
    query: String,
    polls_left: u32,
    outcome: Outcome,
    created_ms: i64,
}

type Shared = Arc<State>;

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/bigquery/v2/projects/{project}/jobs", post(insert_job))
        .route("/bigquery/v2/projects/{project}/jobs/{job}", get(get_job))
        .route("/bigquery/v2/projects/{project}/queries/{job}", get(get_query_results))
        .route("/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}", get(get_table))
        .with_state(state)
}

fn error(status: StatusCode, reason: &str, message: &str) -> Response {
    let grpc_status = match status {
        StatusCode::BAD_REQUEST => "INVALID_ARGUMENT",
        StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
        StatusCode::FORBIDDEN => "PERMISSION_DENIED",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::CONFLICT => "ALREADY_EXISTS",
        _ => "INTERNAL",
    };
    let body = json!({
        "error": {
            "code": status.as_u16(),
            "message": message,
            "errors": [{ "reason": reason, "message": message, "domain": "global" }],
            "status": grpc_status,
        }
    });
    (status, Json(body)).into_response()
}

fn check_auth(state: &State, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    state.check_token(header).map_err(|m| Box::new(error(StatusCode::UNAUTHORIZED, "unauthorized", m)))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs a query (blocking): the outcome and the result table, if any.
fn run(state: &State, project: &str, job_id: &str, sql: &str) -> (Outcome, Option<(TableRef, Table)>) {
    let failed = |reason: &str, message: String| (Outcome::Failed { reason: reason.into(), message }, None);
    let select = match parse_query(sql) {
        Ok(Statement::Select(s)) => s,
        Ok(Statement::Script { statements }) => return (Outcome::Script { statements }, None),
        Err(e) => return failed("invalidQuery", e),
    };
    let source = match select.table.as_slice() {
        [d, t] => TableRef { project: project.into(), dataset: d.clone(), table: t.clone() },
        [p, d, t] => TableRef { project: p.clone(), dataset: d.clone(), table: t.clone() },
        _ => return failed("invalidQuery", "bad table name".into()),
    };
    let table = match state.catalog.get(&source) {
        Ok(t) => t,
        Err(CatalogError::NotFound(_)) => {
            let location = &state.config.location;
            return failed(
                "notFound",
                format!(
                    "Not found: Table {}:{}.{} was not found in location {location}",
                    source.project, source.dataset, source.table
                ),
            );
        }
        Err(e) => return failed("internalError", e.to_string()),
    };
    let projection = match Projection::new(&table.schema, &select.columns) {
        Ok(p) => p,
        Err(e) => return failed("invalidQuery", e),
    };
    let filter = match select.filter.as_ref().map(|f| Filter::bind(f, &table.schema)).transpose() {
        Ok(f) => f,
        Err(e) => return failed("invalidQuery", e),
    };
    let mut batches = Vec::new();
    for b in &table.batches {
        let part = match &filter {
            Some(f) => match f.apply(b) {
                Ok(p) => p,
                Err(e) => return failed("internalError", e),
            },
            None => b.clone(),
        };
        if part.num_rows() > 0 {
            batches.push(projection.apply(&part));
        }
    }
    let result = Table::new(projection.schema().clone(), batches);
    let destination =
        TableRef { project: project.into(), dataset: ANONYMOUS_DATASET.into(), table: format!("anon_{job_id}") };
    let outcome = Outcome::Done {
        destination: destination.clone(),
        schema: rest_schema(projection.schema()),
        rows: result.rows,
        bytes: table.bytes(projection.schema()),
    };
    (outcome, Some((destination, result)))
}

fn job_json(job: &Job) -> Value {
    let done = job.polls_left == 0;
    let mut query = json!({ "query": job.query, "useLegacySql": false });
    let mut statistics = json!({ "creationTime": job.created_ms.to_string(), "startTime": job.created_ms.to_string() });
    let mut status = json!({ "state": if done { "DONE" } else { "RUNNING" } });
    if done {
        statistics["endTime"] = json!(now_ms().to_string());
        match &job.outcome {
            Outcome::Done { destination, schema, bytes, .. } => {
                query["destinationTable"] = json!({
                    "projectId": destination.project, "datasetId": destination.dataset, "tableId": destination.table
                });
                statistics["totalBytesProcessed"] = json!(bytes.to_string());
                statistics["query"] = json!({
                    "statementType": "SELECT", "totalBytesProcessed": bytes.to_string(), "schema": schema
                });
            }
            Outcome::Script { statements } => {
                statistics["numChildJobs"] = json!(statements.to_string());
                statistics["query"] = json!({ "statementType": "SCRIPT" });
            }
            Outcome::Failed { reason, message } => {
                let e = json!({ "reason": reason, "message": message, "location": "query" });
                status["errorResult"] = e.clone();
                status["errors"] = json!([e]);
            }
        }
    }
    json!({
        "kind": "bigquery#job",
        "id": format!("{}:{}.{}", job.project, job.location, job.id),
        "jobReference": { "projectId": job.project, "jobId": job.id, "location": job.location },
        "configuration": { "jobType": "QUERY", "query": query },
        "status": status,
        "statistics": statistics,
    })
}

async fn insert_job(
    AxumState(state): AxumState<Shared>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = check_auth(&state, &headers) {
        return *r;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "parseError", "The request body is not valid JSON");
    };
    let Some(sql) = body["configuration"]["query"]["query"].as_str().map(str::to_string) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "The emulator runs query jobs only: configuration.query.query is required",
        );
    };
    if body["configuration"]["query"]["useLegacySql"].as_bool() == Some(true) {
        return error(StatusCode::BAD_REQUEST, "invalid", "The emulator supports GoogleSQL only (useLegacySql: false)");
    }
    let dry_run = body["configuration"]["dryRun"].as_bool() == Some(true);
    let job_id = body["jobReference"]["jobId"].as_str().map(str::to_string).unwrap_or_else(|| state.id("job_"));
    let location = body["jobReference"]["location"].as_str().unwrap_or(&state.config.location).to_string();
    let key = format!("{project}/{job_id}");
    if !dry_run && state.jobs.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key) {
        return error(StatusCode::CONFLICT, "duplicate", &format!("Already Exists: Job {project}:{location}.{job_id}"));
    }
    let (state2, project2, job2, sql2) = (state.clone(), project.clone(), job_id.clone(), sql.clone());
    let ran = tokio::task::spawn_blocking(move || run(&state2, &project2, &job2, &sql2)).await;
    let Ok((outcome, result)) = ran else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internalError", "the emulator's query task failed");
    };
    if dry_run {
        return match outcome {
            Outcome::Done { schema, bytes, .. } => Json(json!({
                "kind": "bigquery#job",
                "jobReference": { "projectId": project, "location": location },
                "configuration": { "dryRun": true, "query": { "query": sql, "useLegacySql": false } },
                "status": { "state": "DONE" },
                "statistics": {
                    "totalBytesProcessed": bytes.to_string(),
                    "query": { "statementType": "SELECT", "totalBytesProcessed": bytes.to_string(), "schema": schema }
                }
            }))
            .into_response(),
            Outcome::Failed { reason, message } => error(StatusCode::BAD_REQUEST, &reason, &message),
            Outcome::Script { .. } => Json(json!({
                "kind": "bigquery#job",
                "status": { "state": "DONE" },
                "statistics": { "totalBytesProcessed": "0", "query": { "statementType": "SCRIPT" } }
            }))
            .into_response(),
        };
    }
    if let Some((name, table)) = result {
        state.catalog.put(&name, table);
    }
    let job = Job {
        project,
        id: job_id,
        location,
        query: sql,
        polls_left: state.config.query_pending_polls,
        outcome,
        created_ms: now_ms(),
    };
    state.stats.jobs_inserted.fetch_add(1, Ordering::Relaxed);
    let body = job_json(&job);
    state.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(key, job);
    Json(body).into_response()
}

fn find_job(state: &State, project: &str, job: &str) -> Result<Job, Box<Response>> {
    state
        .jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&format!("{project}/{job}"))
        .cloned()
        .ok_or_else(|| Box::new(error(StatusCode::NOT_FOUND, "notFound", &format!("Not found: Job {project}:{job}"))))
}

async fn get_job(
    AxumState(state): AxumState<Shared>,
    Path((project, job)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check_auth(&state, &headers) {
        return *r;
    }
    match find_job(&state, &project, &job) {
        Ok(j) => Json(job_json(&j)).into_response(),
        Err(r) => *r,
    }
}

async fn get_query_results(
    AxumState(state): AxumState<Shared>,
    Path((project, job_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check_auth(&state, &headers) {
        return *r;
    }
    let job = {
        let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = jobs.get_mut(&format!("{project}/{job_id}")) else {
            return error(StatusCode::NOT_FOUND, "notFound", &format!("Not found: Job {project}:{job_id}"));
        };
        let snapshot = job.clone();
        job.polls_left = job.polls_left.saturating_sub(1);
        snapshot
    };
    let reference = json!({ "projectId": job.project, "jobId": job.id, "location": job.location });
    if job.polls_left > 0 {
        return Json(
            json!({ "kind": "bigquery#getQueryResultsResponse", "jobReference": reference, "jobComplete": false }),
        )
        .into_response();
    }
    match &job.outcome {
        Outcome::Failed { reason, message } => error(StatusCode::BAD_REQUEST, reason, message),
        Outcome::Done { schema, rows, .. } => Json(json!({
            "kind": "bigquery#getQueryResultsResponse",
            "jobReference": reference,
            "jobComplete": true,
            "schema": schema,
            "totalRows": rows.to_string(),
            "rows": [],
        }))
        .into_response(),
        Outcome::Script { .. } => Json(json!({
            "kind": "bigquery#getQueryResultsResponse", "jobReference": reference, "jobComplete": true, "totalRows": "0"
        }))
        .into_response(),
    }
}

async fn get_table(
    AxumState(state): AxumState<Shared>,
    Path((project, dataset, table)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check_auth(&state, &headers) {
        return *r;
    }
    let name = TableRef { project, dataset, table };
    let state2 = state.clone();
    let name2 = name.clone();
    let found = tokio::task::spawn_blocking(move || state2.catalog.get(&name2)).await;
    match found {
        Ok(Ok(t)) => Json(json!({
            "kind": "bigquery#table",
            "id": format!("{}:{}.{}", name.project, name.dataset, name.table),
            "tableReference": { "projectId": name.project, "datasetId": name.dataset, "tableId": name.table },
            "schema": rest_schema(&t.schema),
            "numRows": t.rows.to_string(),
            "numBytes": t.bytes(&t.schema).to_string(),
            "type": "TABLE",
            "location": state.config.location,
        }))
        .into_response(),
        Ok(Err(CatalogError::NotFound(m))) => error(StatusCode::NOT_FOUND, "notFound", &m),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "internalError", &e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internalError", "the emulator's table task failed"),
    }
}
