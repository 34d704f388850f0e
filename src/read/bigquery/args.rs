//! The BigQuery flags of `export`, flattened into [`crate::cli::ExportArgs`], and how they turn
//! `--from`/`--query` into a validated [`SourceConfig`]. Kept here so the BigQuery source owns
//! its configuration; `cli.rs` only flattens this struct.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::auth::{AuthOptions, CredentialsSource, SCOPE_BIGQUERY, SCOPE_DRIVE_READONLY};
use super::decode::BufferCompression;
use super::query::QueryOptions;
use super::retry::RetryPolicy;
use super::{BigQueryOptions, Endpoints, ReadTarget, TableRef};
use crate::error::ConfigError;
use crate::read::SourceConfig;
use crate::secret::{DEFAULT_SECRET_MANAGER_ENDPOINT, SecretManagerOptions};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ArrowCompressionArg {
    #[default]
    /// LZ4 frame compression of Arrow buffers (what Google's Python client requests).
    Lz4,
    Zstd,
    None,
}

#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "BigQuery")]
pub struct BigQueryArgs {
    /// Export the result of this SQL (GoogleSQL) instead of --from.
    #[arg(long, value_name = "SQL", conflicts_with_all = ["query_file", "from"])]
    pub query: Option<String>,

    /// Like --query, reading the SQL from a file.
    #[arg(long, value_name = "PATH", conflicts_with = "from")]
    pub query_file: Option<PathBuf>,

    /// Project that runs the query job (default: --billing-project, GOOGLE_CLOUD_PROJECT, or the key's project).
    #[arg(long, value_name = "PROJECT")]
    pub project: Option<String>,

    /// Location of the query job (e.g. US, EU, europe-west1).
    #[arg(long, value_name = "LOCATION")]
    pub location: Option<String>,

    /// Project billed for the read session (default: the table's project).
    #[arg(long, value_name = "PROJECT")]
    pub billing_project: Option<String>,

    /// Columns to read, comma-separated; `record.field` selects a nested field. Output keeps the table's order.
    #[arg(long, value_name = "COLS", value_delimiter = ',')]
    pub columns: Vec<String>,

    /// Row filter evaluated by BigQuery, e.g. "country = 'DE' AND amount > 100".
    #[arg(long = "where", value_name = "FILTER")]
    pub row_filter: Option<String>,

    /// Read the table as of this time (RFC 3339, e.g. 2024-05-01T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    pub snapshot_time: Option<String>,

    /// At most this many read streams (0: BigQuery decides).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_streams: u32,

    /// Ask BigQuery for at least this many read streams.
    #[arg(long, value_name = "N")]
    pub min_streams: Option<u32>,

    /// Compression of Arrow buffers on the wire.
    #[arg(long, value_enum, default_value = "lz4")]
    pub arrow_compression: ArrowCompressionArg,

    /// Print what would be read (schema, estimated rows and bytes, streams) and read nothing.
    #[arg(long)]
    pub plan_only: bool,

    /// Service-account key or gcloud credentials file (default: Application Default Credentials).
    #[arg(long, value_name = "PATH")]
    pub credentials: Option<PathBuf>,

    /// Environment variable holding a base64-encoded service-account key (e.g. SERVICE_ACCOUNT_KEY).
    #[arg(long, value_name = "VAR", conflicts_with = "credentials")]
    pub credentials_base64_env: Option<String>,

    /// Use only the metadata server (GCE, Cloud Run, GKE) for credentials.
    #[arg(long, conflicts_with_all = ["credentials", "credentials_base64_env"])]
    pub metadata_credentials: bool,

    /// Domain-wide delegation: act as this Workspace user (needs a service-account key).
    #[arg(long, value_name = "EMAIL")]
    pub impersonate_subject: Option<String>,

    /// Act as this service account through IAM Credentials (needs roles/iam.serviceAccountTokenCreator).
    #[arg(long, value_name = "EMAIL")]
    pub impersonate_service_account: Option<String>,

    /// Also request the drive.readonly scope (tables backed by Google Sheets or Drive files).
    #[arg(long)]
    pub drive_scope: bool,

    /// OAuth scopes instead of the default bigquery scope (repeatable).
    #[arg(long = "scope", value_name = "URL")]
    pub scopes: Vec<String>,

    /// Use a BigQuery emulator at HOST:PORT over plain HTTP, without credentials.
    #[arg(long, env = "BIGQUERY_EMULATOR_HOST", value_name = "HOST:PORT")]
    pub emulator: Option<String>,

    /// Storage Read API endpoint (default https://bigquerystorage.googleapis.com).
    #[arg(long, value_name = "URL")]
    pub storage_endpoint: Option<String>,

    /// BigQuery REST root (default https://bigquery.googleapis.com).
    #[arg(long, value_name = "URL")]
    pub bigquery_endpoint: Option<String>,

    /// OAuth token endpoint (default: the key file's token_uri).
    #[arg(long, value_name = "URL")]
    pub token_uri: Option<String>,

    /// Metadata server host[:port] (default: GCE_METADATA_HOST or metadata.google.internal).
    #[arg(long, value_name = "HOST")]
    pub metadata_host: Option<String>,

    /// Secret Manager REST root for gcp-secret: references (default https://secretmanager.googleapis.com).
    #[arg(long, env = "BQ2SFTP_SECRET_MANAGER_ENDPOINT", value_name = "URL")]
    pub secret_manager_endpoint: Option<String>,

    /// IAM Credentials endpoint for --impersonate-service-account.
    #[arg(long, value_name = "URL")]
    pub iam_endpoint: Option<String>,

    /// Attempts in a row without progress before a BigQuery call gives up.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub read_retries: u32,

    /// First retry delay (e.g. 100ms); grows ×1.3 per attempt.
    #[arg(long, value_name = "DURATION", default_value = "100ms")]
    pub retry_initial_backoff: String,

    /// Longest retry delay.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub retry_max_backoff: String,

    /// How long to wait for a query job.
    #[arg(long, value_name = "DURATION", default_value = "6h")]
    pub query_timeout: String,
}

/// Parses `250ms`, `30s`, `5m`, `6h`, or plain seconds.
pub fn parse_duration(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    let v = value.trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        ConfigError::invalid(format!("--{flag} {value}"), "not a duration; use e.g. 250ms, 30s, 5m, 6h")
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(ConfigError::invalid(format!("--{flag} {value}"), "unknown unit; use ms, s, m or h")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(ConfigError::invalid(format!("--{flag} {value}"), "out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) fn is_loopback_url(url: &str) -> bool {
    url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string)).is_some_and(|h| {
        h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) || h == "[::1]"
    })
}

impl BigQueryArgs {
    /// What these flags change about which rows are read, for the job fingerprint that
    /// `--resume` checks (credentials and endpoints are not part of it).
    pub fn identity(&self) -> String {
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            self.query,
            self.query_file,
            self.columns,
            self.row_filter,
            self.snapshot_time,
            self.max_streams,
            self.min_streams
        )
    }

    fn uses_bigquery_flags(&self) -> Option<&'static str> {
        [
            (!self.columns.is_empty(), "--columns"),
            (self.row_filter.is_some(), "--where"),
            (self.snapshot_time.is_some(), "--snapshot-time"),
            (self.billing_project.is_some(), "--billing-project"),
            (self.max_streams != 0, "--max-streams"),
            (self.min_streams.is_some(), "--min-streams"),
            (self.project.is_some(), "--project"),
            (self.location.is_some(), "--location"),
        ]
        .into_iter()
        .find_map(|(used, flag)| used.then_some(flag))
    }

    /// The Google credentials these flags name, for BigQuery and for Secret Manager alike
    /// (scopes are the caller's business).
    pub fn google_auth(&self) -> AuthOptions {
        let mut auth = AuthOptions {
            source: match (&self.credentials, &self.credentials_base64_env, self.metadata_credentials) {
                (Some(p), _, _) => CredentialsSource::File(p.clone()),
                (None, Some(var), _) => CredentialsSource::Base64Env(var.clone()),
                (None, None, true) => CredentialsSource::MetadataServer,
                (None, None, false) => CredentialsSource::ApplicationDefault,
            },
            subject: self.impersonate_subject.clone(),
            impersonate_service_account: self.impersonate_service_account.clone(),
            token_uri: self.token_uri.clone(),
            metadata_host: self.metadata_host.clone(),
            ..AuthOptions::default()
        };
        if let Some(iam) = &self.iam_endpoint {
            auth.iam_endpoint = iam.clone();
        }
        auth
    }

    /// `--read-retries` and the backoff flags.
    pub fn retry_policy(&self) -> Result<RetryPolicy, ConfigError> {
        if self.read_retries == 0 {
            return Err(ConfigError::invalid("--read-retries", "must be at least 1"));
        }
        Ok(RetryPolicy {
            max_attempts: self.read_retries,
            initial_backoff: parse_duration("retry-initial-backoff", &self.retry_initial_backoff)?,
            max_backoff: parse_duration("retry-max-backoff", &self.retry_max_backoff)?,
            ..RetryPolicy::default()
        })
    }

    /// Where `gcp-secret:` references are fetched, with the same credentials as BigQuery but
    /// without `--impersonate-subject`: domain-wide delegation is granted for BigQuery's scopes,
    /// and the secrets belong to the service account, not to the Workspace user.
    pub fn secret_manager(&self) -> Result<SecretManagerOptions, ConfigError> {
        let endpoint = self.secret_manager_endpoint.clone().unwrap_or_else(|| DEFAULT_SECRET_MANAGER_ENDPOINT.into());
        let mut auth = self.google_auth();
        auth.subject = None;
        auth.retry = self.retry_policy()?;
        SecretManagerOptions::new(endpoint, auth)
    }

    /// Builds the source from `--from` (any scheme) or `--query`/`--query-file`, applying the
    /// BigQuery flags. Flags that only make sense for BigQuery are refused elsewhere.
    pub fn source_config(&self, from: Option<&str>) -> Result<SourceConfig, ConfigError> {
        let sql = match (&self.query, &self.query_file) {
            (Some(q), _) => Some(q.clone()),
            (None, Some(path)) => Some(std::fs::read_to_string(path).map_err(|e| {
                ConfigError::invalid(format!("--query-file {}", path.display()), format!("cannot read it: {e}"))
            })?),
            (None, None) => None,
        };
        let mut options = match (sql, from) {
            (Some(sql), _) => {
                if sql.trim().is_empty() {
                    return Err(ConfigError::invalid("--query", "the SQL is empty"));
                }
                let mut o = BigQueryOptions::table(TableRef {
                    project: String::new(),
                    dataset: String::new(),
                    table: String::new(),
                });
                o.target = ReadTarget::Query(QueryOptions {
                    sql,
                    project: self.project.clone(),
                    location: self.location.clone(),
                    timeout: parse_duration("query-timeout", &self.query_timeout)?,
                });
                o
            }
            (None, Some(from)) => match SourceConfig::parse(from)? {
                SourceConfig::BigQuery(o) => {
                    if self.project.is_some() || self.location.is_some() {
                        return Err(ConfigError::invalid("--project/--location", "only apply to --query"));
                    }
                    *o
                }
                other => {
                    if let Some(flag) = self.uses_bigquery_flags() {
                        return Err(ConfigError::invalid(flag, "only applies to bq:// sources and --query"));
                    }
                    if self.plan_only {
                        return Err(ConfigError::invalid("--plan-only", "only applies to bq:// sources and --query"));
                    }
                    return Ok(other);
                }
            },
            (None, None) => return Err(ConfigError::invalid("--from", "missing: give --from URL or --query SQL")),
        };
        self.apply(&mut options)?;
        Ok(SourceConfig::BigQuery(Box::new(options)))
    }

    fn apply(&self, o: &mut BigQueryOptions) -> Result<(), ConfigError> {
        o.billing_project = self.billing_project.clone();
        o.columns = self.columns.iter().map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
        o.row_restriction = self.row_filter.clone().filter(|w| !w.trim().is_empty());
        if o.row_restriction.as_ref().is_some_and(|w| w.len() > 1 << 20) {
            return Err(ConfigError::invalid("--where", "longer than BigQuery's 1 MB limit"));
        }
        if let Some(t) = &self.snapshot_time {
            let parsed = chrono::DateTime::parse_from_rfc3339(t).map_err(|_| {
                ConfigError::invalid(
                    format!("--snapshot-time {t}"),
                    "not an RFC 3339 time such as 2024-05-01T00:00:00Z",
                )
            })?;
            o.snapshot_time = Some(parsed.with_timezone(&chrono::Utc));
        }
        if self.max_streams > 1000 {
            return Err(ConfigError::invalid("--max-streams", "BigQuery allows at most 1000 streams"));
        }
        if let Some(min) = self.min_streams {
            if min == 0 || min > 1000 {
                return Err(ConfigError::invalid("--min-streams", "must be between 1 and 1000"));
            }
            if self.max_streams != 0 && min > self.max_streams {
                return Err(ConfigError::invalid("--min-streams", "cannot exceed --max-streams"));
            }
        }
        o.max_streams = self.max_streams;
        o.min_streams = self.min_streams;
        o.compression = match self.arrow_compression {
            ArrowCompressionArg::Lz4 => BufferCompression::Lz4Frame,
            ArrowCompressionArg::Zstd => BufferCompression::Zstd,
            ArrowCompressionArg::None => BufferCompression::None,
        };
        o.retry = self.retry_policy()?;

        // Credentials.
        o.auth = self.google_auth();
        o.auth.retry = o.retry.clone();
        let mut scopes = if self.scopes.is_empty() { vec![SCOPE_BIGQUERY.to_string()] } else { self.scopes.clone() };
        if self.drive_scope && !scopes.iter().any(|s| s == SCOPE_DRIVE_READONLY) {
            scopes.push(SCOPE_DRIVE_READONLY.to_string());
        }
        o.auth.scopes = scopes;

        // Endpoints. The emulator convention sends no credentials; anything else does, and
        // credentials never travel in clear text except to this machine.
        o.endpoints = Endpoints {
            storage: self.storage_endpoint.clone().unwrap_or(o.endpoints.storage.clone()),
            bigquery: self.bigquery_endpoint.clone().unwrap_or(o.endpoints.bigquery.clone()),
        };
        if let Some(host) = self.emulator.as_deref().filter(|h| !h.is_empty()) {
            if self.storage_endpoint.is_some() || self.bigquery_endpoint.is_some() {
                return Err(ConfigError::invalid(
                    "--emulator",
                    "cannot be combined with --storage-endpoint/--bigquery-endpoint (BIGQUERY_EMULATOR_HOST may be set)",
                ));
            }
            o.use_emulator(host);
        } else {
            for (flag, url) in
                [("--storage-endpoint", &o.endpoints.storage), ("--bigquery-endpoint", &o.endpoints.bigquery)]
            {
                if url::Url::parse(url).is_err() {
                    return Err(ConfigError::invalid(format!("{flag} {url}"), "not a URL (http(s)://host[:port])"));
                }
                if url.starts_with("http://") && !is_loopback_url(url) {
                    return Err(ConfigError::invalid(
                        format!("{flag} {url}"),
                        "would send credentials in clear text; use https://, or --emulator for an emulator",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut BigQueryArgs)) -> BigQueryArgs {
        let mut a = BigQueryArgs {
            read_retries: 8,
            retry_initial_backoff: "100ms".into(),
            retry_max_backoff: "60s".into(),
            query_timeout: "6h".into(),
            arrow_compression: ArrowCompressionArg::Lz4,
            ..Default::default()
        };
        f(&mut a);
        a
    }

    fn bq(c: SourceConfig) -> BigQueryOptions {
        match c {
            SourceConfig::BigQuery(o) => *o,
            _ => panic!("not bigquery"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("x", "6h").unwrap(), Duration::from_secs(6 * 3600));
        assert_eq!(parse_duration("x", "2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("x", "soon").is_err());
        assert!(parse_duration("x", "5d").is_err());
    }

    #[test]
    fn flags_become_options() {
        let a = args(|a| {
            a.columns = vec!["a".into(), " b.c ".into()];
            a.row_filter = Some("a > 1".into());
            a.max_streams = 8;
            a.min_streams = Some(2);
            a.snapshot_time = Some("2024-05-01T00:00:00Z".into());
            a.drive_scope = true;
        });
        let o = bq(a.source_config(Some("bq://p.d.t")).unwrap());
        assert_eq!(o.columns, ["a", "b.c"]);
        assert_eq!(o.row_restriction.as_deref(), Some("a > 1"));
        assert_eq!((o.max_streams, o.min_streams), (8, Some(2)));
        assert_eq!(o.auth.scopes, [SCOPE_BIGQUERY, SCOPE_DRIVE_READONLY]);
        assert_eq!(o.snapshot_time.unwrap().timestamp(), 1_714_521_600);
    }

    #[test]
    fn emulator_means_plain_http_without_credentials() {
        let o = bq(args(|a| a.emulator = Some("127.0.0.1:9050".into())).source_config(Some("bq://p.d.t")).unwrap());
        assert_eq!(o.endpoints.storage, "http://127.0.0.1:9050");
        assert_eq!(o.endpoints.bigquery, "http://127.0.0.1:9050");
        assert_eq!(o.auth.source, CredentialsSource::None);
    }

    #[test]
    fn refusals() {
        let bad = |f: fn(&mut BigQueryArgs), from: Option<&str>| args(f).source_config(from).unwrap_err().to_string();
        assert!(
            bad(|a| a.storage_endpoint = Some("http://bq.example.com".into()), Some("bq://p.d.t"))
                .contains("clear text")
        );
        assert!(bad(|a| a.columns = vec!["x".into()], Some("synthetic://?rows=1")).contains("--columns"));
        assert!(bad(|a| a.min_streams = Some(0), Some("bq://p.d.t")).contains("between"));
        assert!(bad(|a| a.snapshot_time = Some("yesterday".into()), Some("bq://p.d.t")).contains("RFC 3339"));
        assert!(bad(|a| a.query = Some("  ".into()), None).contains("empty"));
        assert!(bad(|_| {}, None).contains("--from"));
        // http to loopback is fine (tests, local proxies).
        args(|a| a.storage_endpoint = Some("http://127.0.0.1:1".into())).source_config(Some("bq://p.d.t")).unwrap();
    }

    #[test]
    fn query_mode() {
        let o = bq(args(|a| {
            a.query = Some("SELECT 1".into());
            a.project = Some("p".into());
        })
        .source_config(None)
        .unwrap());
        match o.target {
            ReadTarget::Query(q) => assert_eq!((q.sql.as_str(), q.project.as_deref()), ("SELECT 1", Some("p"))),
            _ => panic!(),
        }
    }
}
