//! The doctor's Google and BigQuery checks: which credentials, a token, then what BigQuery
//! says to the very request an export starts with.
//!
//! Table mode creates a read session of at most one stream and reads nothing (sessions are
//! free until ReadRows; BigQuery drops unused ones when they expire), so it proves what the
//! export needs: the endpoint answers, the table exists, and the caller may create read
//! sessions on it. Query mode sends a dry-run job (free: nothing is run or billed). One
//! CreateReadSession answers three questions, told apart by its status: a transport failure
//! means unreachable, NOT_FOUND a missing table, PERMISSION_DENIED missing IAM roles.
//!
//! Retries are cut to two attempts: the doctor reports a broken path, it does not wait out a
//! retry budget meant for a transfer at 3 a.m.

use tonic::Code;

use super::{Checklist, Steps};
use crate::error::exit;
use crate::read::bigquery::auth::{AuthError, CredentialsSource};
use crate::read::bigquery::{BigQueryError, BigQueryOptions, BigQuerySource, ReadTarget};
use crate::read::{ReadError, Source};

const GOOGLE: &[&str] = &["google: credentials", "google: scopes and delegation", "google: access token"];
const TABLE: &[&str] = &["bigquery: reachable", "bigquery: table exists", "bigquery: read session"];
const QUERY: &[&str] = &["bigquery: reachable", "bigquery: query (dry run)"];

const IAM_FIX: &str = "grant roles/bigquery.readSessionUser on the billing project and roles/bigquery.dataViewer on \
                       the table or dataset to the account above";

/// Google, then BigQuery; BigQuery is skipped when the credentials fail.
pub async fn check(options: &BigQueryOptions, list: &mut Checklist) {
    let mut o = options.clone();
    o.retry.max_attempts = o.retry.max_attempts.min(2);
    o.auth.retry = o.retry.clone();
    // One stream proves that a session can be made; nothing is read from it.
    o.max_streams = 1;
    o.min_streams = None;
    let steps: &'static [&'static str] = match o.target {
        ReadTarget::Table(_) => TABLE,
        ReadTarget::Query(_) => QUERY,
    };
    let source = match BigQuerySource::new(o.clone()) {
        Ok(s) => s,
        Err(e) => {
            let text = e.to_string();
            return Steps::new(list, steps).fail(text, "correct the endpoint flags", exit_code(&e));
        }
    };

    if o.auth.source == CredentialsSource::None {
        list.skip("google", format!("emulator at {}, no credentials are sent", o.endpoints.storage));
    } else if !google(&source, list).await {
        return Steps::new(list, steps).skip_rest("needs Google credentials");
    }

    match &o.target {
        ReadTarget::Table(_) => table(&source, &o, list).await,
        ReadTarget::Query(_) => query(&source, &o, list).await,
    }
}

/// The credentials, the scopes and subject they are used with, and a token. False on failure.
async fn google(source: &BigQuerySource, list: &mut Checklist) -> bool {
    let provider = source.token_provider();
    let auth = provider.options();
    let mut steps = Steps::new(list, GOOGLE);
    match provider.describe().await {
        Ok(info) => {
            let account = info.account.map(|a| format!(" {a}")).unwrap_or_default();
            steps.ok(format!("{}{account} from {}", info.kind, info.origin));
        }
        Err(e) => {
            let fix = auth_fix(&e, auth.subject.as_deref(), auth.impersonate_service_account.as_deref());
            steps.fail(e.to_string(), fix, exit::AUTH);
            return false;
        }
    }
    let subject = match &auth.subject {
        Some(s) => format!("acting as {s} (domain-wide delegation)"),
        None => "no delegation subject".to_string(),
    };
    let impersonate = match &auth.impersonate_service_account {
        Some(sa) => format!("; impersonating {sa} through IAM Credentials"),
        None => String::new(),
    };
    steps.ok(format!("scopes {}; {subject}{impersonate}", auth.scopes.join(" ")));
    match provider.token().await {
        // The token itself is a secret: only that there is one is shown.
        Ok(_) => {
            steps.ok("obtained (valid about an hour, refreshed as needed)");
            true
        }
        Err(e) => {
            let fix = auth_fix(&e, auth.subject.as_deref(), auth.impersonate_service_account.as_deref());
            steps.fail(e.to_string(), fix, exit::AUTH);
            false
        }
    }
}

fn auth_fix(e: &AuthError, subject: Option<&str>, impersonate: Option<&str>) -> String {
    match e {
        AuthError::NoCredentials { .. } => {
            "set GOOGLE_APPLICATION_CREDENTIALS or pass --credentials KEY.json or --credentials-base64-env VAR".into()
        }
        AuthError::BadCredentials { .. } => {
            "use a service-account key JSON (IAM > Service accounts > Keys) or gcloud's application default credentials"
                .into()
        }
        AuthError::TokenEndpoint { .. } if subject.is_some() => format!(
            "authorize the service account's client ID for these scopes in the Workspace admin console (Security > API \
             controls > Domain-wide delegation), and check that {} exists",
            subject.unwrap_or_default()
        ),
        AuthError::TokenEndpoint { .. } if impersonate.is_some() => format!(
            "grant roles/iam.serviceAccountTokenCreator on {} to the credentials above",
            impersonate.unwrap_or_default()
        ),
        AuthError::TokenEndpoint { .. } => {
            "check that the key is not deleted or disabled (IAM > Service accounts > Keys) and this machine's clock"
                .into()
        }
        _ => "use a service-account key, gcloud credentials or the metadata server".into(),
    }
}

/// CreateReadSession with one stream, read nothing.
async fn table(source: &BigQuerySource, o: &BigQueryOptions, list: &mut Checklist) {
    let mut steps = Steps::new(list, TABLE);
    let endpoint = &o.endpoints.storage;
    let e = match source.plan().await {
        Ok(plan) => {
            steps.ok(format!("Storage Read API at {endpoint} answered"));
            let rows = plan.estimated_rows.map(|r| format!(", about {r} rows")).unwrap_or_default();
            steps.ok(format!("{}: {} column(s){rows}", plan.description.name, plan.schema.fields().len()));
            let session = source.session_info().map(|s| s.session).unwrap_or_default();
            return steps.ok(format!(
                "may create read sessions: created {session} with {} stream(s); nothing was read",
                plan.streams.len()
            ));
        }
        Err(ReadError::BigQuery(e)) => e,
        Err(other) => {
            let text = other.to_string();
            return steps.fail(text, "see the message", crate::Error::from(other).exit_code());
        }
    };
    let text = e.to_string();
    let code = exit_code(&e);
    match &e {
        BigQueryError::Api {
            code: Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled,
            ..
        } => {
            steps.fail(
                text,
                "check the endpoint (--storage-endpoint, BIGQUERY_EMULATOR_HOST) and the network path to it: proxy, \
                 firewall, Private Google Access",
                exit::SOURCE,
            );
        }
        BigQueryError::NotFound { .. } => {
            steps.ok(format!("Storage Read API at {endpoint} answered"));
            steps.fail(
                text,
                "check the project, dataset and table in bq://PROJECT.DATASET.TABLE (`bq show PROJECT:DATASET.TABLE`); \
                 views and external tables need --query",
                code,
            );
        }
        BigQueryError::PermissionDenied { .. } | BigQueryError::Unauthenticated { .. } => {
            steps.ok(format!("Storage Read API at {endpoint} answered"));
            steps.skip("BigQuery does not tell whether a table exists to a caller without permission");
            steps.fail(text, IAM_FIX, exit::AUTH);
        }
        BigQueryError::InvalidRequest { .. } => {
            steps.ok(format!("Storage Read API at {endpoint} answered"));
            steps.ok("the table was found");
            steps.fail(text, "check --columns, --where and --snapshot-time against the table's schema", code);
        }
        _ => {
            steps.ok(format!("Storage Read API at {endpoint} answered"));
            steps.skip("unknown: the read session failed for another reason");
            steps.fail(text, "see the message; run with -vv for the details", code);
        }
    }
}

/// The exit code an export would end with on `e` (as `Error::exit_code` maps a read error).
fn exit_code(e: &BigQueryError) -> u8 {
    if e.is_permission() {
        exit::AUTH
    } else if e.is_resumable() {
        exit::RESUMABLE
    } else if e.is_usage() {
        exit::USAGE
    } else {
        exit::SOURCE
    }
}

/// A dry-run query job: valid SQL, readable tables, permission to run jobs.
async fn query(source: &BigQuerySource, o: &BigQueryOptions, list: &mut Checklist) {
    let mut steps = Steps::new(list, QUERY);
    let endpoint = &o.endpoints.bigquery;
    let e = match source.dry_run().await {
        Ok(text) => {
            steps.ok(format!("BigQuery REST API at {endpoint} answered"));
            let bytes = text
                .lines()
                .find_map(|l| l.strip_prefix("bytes processed: "))
                .map(|b| format!("; it would process {b} bytes"))
                .unwrap_or_default();
            steps.ok(format!("the query is valid{bytes} (dry run: nothing was run or billed)"));
            return list.skip(
                "bigquery: read session",
                "query mode: the result table exists once the query runs (needs roles/bigquery.readSessionUser too)",
            );
        }
        Err(e) => e,
    };
    let text = e.to_string();
    let code = exit_code(&e);
    match &e {
        BigQueryError::Rest { status: 0, .. } => steps.fail(
            text,
            "check the endpoint (--bigquery-endpoint, BIGQUERY_EMULATOR_HOST) and the network path to it",
            exit::SOURCE,
        ),
        BigQueryError::Config { .. } => {
            steps.skip("not contacted: there is no project to send the job to");
            steps.fail(text, "pass --project (the project that runs and pays for the query job)", exit::USAGE);
        }
        _ => {
            steps.ok(format!("BigQuery REST API at {endpoint} answered"));
            let fix = if e.is_permission() {
                "grant roles/bigquery.jobUser on the job's project and roles/bigquery.dataViewer on the tables it reads"
            } else {
                "correct the SQL (GoogleSQL; try it in the BigQuery console) and the table names it uses"
            };
            steps.fail(text, fix, code);
        }
    }
}
