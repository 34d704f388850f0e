//! Query mode: run SQL as a BigQuery job over REST, then read its destination table.
//!
//! The flow is python-bigquery's (research notes §3):
//!
//! 1. `POST /bigquery/v2/projects/{p}/jobs` (jobs.insert) with a **client-generated job id**, so
//!    a retried insert after a lost response is idempotent: the second insert answers 409
//!    "Already Exists" and we simply go on with that job.
//! 2. `GET /projects/{p}/queries/{job}?maxResults=0&timeoutMs=…` (jobs.getQueryResults) until
//!    `jobComplete`; a failed job answers with its error here.
//! 3. `GET /projects/{p}/jobs/{job}` (jobs.get): `status.errorResult` is the job's failure, and
//!    `configuration.query.destinationTable` the (anonymous, cached) result table. A script
//!    (`statementType` SCRIPT) has none: that is a clear error, not an empty export.
//!
//! Every call is retried on 5xx/429/transport errors within the bounded [`RetryPolicy`], and
//! the whole wait is bounded by the query timeout.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::auth::TokenProvider;
use super::retry::RetryPolicy;
use super::{BigQueryError, TableRef};

#[derive(Debug, Clone)]
pub struct QueryOptions {
    pub sql: String,
    /// The project the job runs in (and is billed to).
    pub project: Option<String>,
    pub location: Option<String>,
    /// How long to wait for the job to finish.
    pub timeout: Duration,
}

/// A finished query job.
#[derive(Debug, Clone)]
pub struct QueryDone {
    /// `project:location.job_id`, as BigQuery shows it.
    pub job: String,
    pub destination: TableRef,
}

/// What a dry-run job reports.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub total_bytes_processed: u64,
    /// `name TYPE MODE` per field.
    pub schema: Vec<String>,
}

pub struct RestClient<'a> {
    pub http: &'a reqwest::Client,
    pub auth: &'a TokenProvider,
    /// REST root, without the trailing slash.
    pub base: &'a str,
    pub retry: &'a RetryPolicy,
}

/// A REST error body: `{"error": {"code", "message", "status", "errors": [{"reason", "message"}]}}`.
fn api_error(body: &str) -> (String, Option<String>) {
    let v: Value = serde_json::from_str(body).unwrap_or_default();
    let e = &v["error"];
    let message = e["message"].as_str().map(str::to_string).unwrap_or_else(|| body.chars().take(300).collect());
    let reason = e["errors"][0]["reason"].as_str().map(str::to_string);
    (message, reason)
}

impl RestClient<'_> {
    /// Sends a request with bounded retries. 2xx returns the JSON body; other answers become
    /// `Err((status, body))` for the caller to interpret.
    async fn call(
        &self,
        operation: &str,
        url: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Result<Value, (u16, String)>, BigQueryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = build(self.http).timeout(Duration::from_secs(120));
            if let Some(token) = self.auth.token().await? {
                req = req.bearer_auth(token.expose());
            }
            let failure = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp.text().await.unwrap_or_default();
                    if (200..300).contains(&status) {
                        return serde_json::from_str(&body).map(Ok).map_err(|e| BigQueryError::Rest {
                            operation: operation.into(),
                            url: url.into(),
                            status,
                            message: format!("the response is not JSON: {e}"),
                        });
                    }
                    if !(status >= 500 || status == 429) || attempt >= self.retry.max_attempts {
                        return Ok(Err((status, body)));
                    }
                    format!("HTTP {status}")
                }
                Err(e) if attempt >= self.retry.max_attempts => {
                    return Err(BigQueryError::Rest {
                        operation: operation.into(),
                        url: url.into(),
                        status: 0,
                        message: format!("{e} (after {attempt} attempts)"),
                    });
                }
                Err(e) => e.to_string(),
            };
            let delay = self.retry.backoff(attempt);
            tracing::warn!(operation, attempt, "{failure}; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
        }
    }

    fn rest_error(operation: &str, url: &str, status: u16, body: &str) -> BigQueryError {
        let (message, _) = api_error(body);
        BigQueryError::Rest { operation: operation.into(), url: url.into(), status, message }
    }

    fn job_body(q: &QueryOptions, project: &str, job_id: Option<&str>, dry_run: bool) -> Value {
        let mut reference = json!({ "projectId": project });
        if let Some(id) = job_id {
            reference["jobId"] = json!(id);
        }
        if let Some(loc) = &q.location {
            reference["location"] = json!(loc);
        }
        json!({
            "jobReference": reference,
            "configuration": {
                "dryRun": dry_run,
                "query": { "query": q.sql, "useLegacySql": false }
            }
        })
    }

    /// Runs `q` in `project` and waits for it; returns the job and its destination table.
    pub async fn run_query(&self, q: &QueryOptions, project: &str) -> Result<QueryDone, BigQueryError> {
        let job_id = format!("bq2sftp_{}", uuid::Uuid::new_v4().simple());
        let base = self.base;
        let insert_url = format!("{base}/bigquery/v2/projects/{project}/jobs");
        let body = Self::job_body(q, project, Some(&job_id), false);
        let inserted = self.call("jobs.insert", &insert_url, |c| c.post(&insert_url).json(&body)).await?;
        let mut location = q.location.clone();
        match inserted {
            Ok(job) => {
                location = job["jobReference"]["location"].as_str().map(str::to_string).or(location);
                check_job_error(&job, &job_id)?;
            }
            // Our own earlier attempt got through: same id, same job.
            Err((409, _)) => tracing::info!(job = %job_id, "jobs.insert: job already exists (a retried insert)"),
            Err((status, body)) => return Err(Self::rest_error("jobs.insert", &insert_url, status, &body)),
        }
        let shown = format!("{project}:{}.{job_id}", location.as_deref().unwrap_or("?"));
        tracing::info!(job = %shown, "query job started");

        let loc_query: Vec<(&str, String)> = location.iter().map(|l| ("location", l.clone())).collect();
        let deadline = Instant::now() + q.timeout;
        let results_url = format!("{base}/bigquery/v2/projects/{project}/queries/{job_id}");
        loop {
            let wait_ms = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(10)).as_millis();
            let query = [("maxResults", "0".to_string()), ("timeoutMs", wait_ms.to_string())];
            let got = self
                .call("jobs.getQueryResults", &results_url, |c| c.get(&results_url).query(&query).query(&loc_query))
                .await?;
            match got {
                Ok(v) if v["jobComplete"].as_bool() == Some(true) => break,
                Ok(_) => {}
                // A failed job answers getQueryResults with its error (HTTP 400).
                Err((status, body)) if (400..500).contains(&status) && status != 401 && status != 403 => {
                    let (message, reason) = api_error(&body);
                    return Err(BigQueryError::QueryFailed { job: shown, message, reason });
                }
                Err((status, body)) => {
                    return Err(Self::rest_error("jobs.getQueryResults", &results_url, status, &body));
                }
            }
            if Instant::now() >= deadline {
                return Err(BigQueryError::QueryFailed {
                    job: shown,
                    message: format!("not finished after {:?}; raise --query-timeout", q.timeout),
                    reason: Some("timeout".into()),
                });
            }
        }

        let job_url = format!("{base}/bigquery/v2/projects/{project}/jobs/{job_id}");
        let job = match self.call("jobs.get", &job_url, |c| c.get(&job_url).query(&loc_query)).await? {
            Ok(v) => v,
            Err((status, body)) => return Err(Self::rest_error("jobs.get", &job_url, status, &body)),
        };
        check_job_error(&job, &shown)?;
        let dest = &job["configuration"]["query"]["destinationTable"];
        let destination = match (dest["projectId"].as_str(), dest["datasetId"].as_str(), dest["tableId"].as_str()) {
            (Some(p), Some(d), Some(t)) => TableRef { project: p.into(), dataset: d.into(), table: t.into() },
            _ => {
                let statement_type =
                    job["statistics"]["query"]["statementType"].as_str().unwrap_or("unknown").to_string();
                return Err(BigQueryError::NoDestination { job: shown, statement_type });
            }
        };
        tracing::info!(job = %shown, destination = %destination, "query job done");
        Ok(QueryDone { job: shown, destination })
    }

    /// A dry-run job: schema and bytes processed, nothing run or billed.
    pub async fn dry_run(&self, q: &QueryOptions, project: &str) -> Result<DryRun, BigQueryError> {
        let url = format!("{}/bigquery/v2/projects/{project}/jobs", self.base);
        let body = Self::job_body(q, project, None, true);
        let job = match self.call("jobs.insert (dry run)", &url, |c| c.post(&url).json(&body)).await? {
            Ok(v) => v,
            Err((400, body)) => {
                let (message, reason) = api_error(&body);
                return Err(BigQueryError::QueryFailed { job: "dry run".into(), message, reason });
            }
            Err((status, body)) => return Err(Self::rest_error("jobs.insert", &url, status, &body)),
        };
        check_job_error(&job, "dry run")?;
        let stats = &job["statistics"];
        let total = stats["totalBytesProcessed"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| stats["totalBytesProcessed"].as_u64())
            .unwrap_or(0);
        let fields = stats["query"]["schema"]["fields"].as_array().cloned().unwrap_or_default();
        Ok(DryRun { total_bytes_processed: total, schema: fields.iter().map(describe_rest_field).collect() })
    }
}

fn describe_rest_field(f: &Value) -> String {
    format!(
        "{} {} {}",
        f["name"].as_str().unwrap_or("?"),
        f["type"].as_str().unwrap_or("?"),
        f["mode"].as_str().unwrap_or("NULLABLE")
    )
}

fn check_job_error(job: &Value, shown: &str) -> Result<(), BigQueryError> {
    let err = &job["status"]["errorResult"];
    if err.is_object() {
        return Err(BigQueryError::QueryFailed {
            job: shown.to_string(),
            message: err["message"].as_str().unwrap_or("the job failed").to_string(),
            reason: err["reason"].as_str().map(str::to_string),
        });
    }
    Ok(())
}
