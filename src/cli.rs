//! The `export` flags, and how they become a validated [`Job`].
//!
//! Everything is parsed and checked here, before any I/O: a bad flag fails in milliseconds,
//! not after a read session was created. The same struct will back job files, so the flag
//! names are the configuration keys.

use clap::{Args, ValueEnum};

use crate::Job;
use crate::encode::{
    self, Compression, FormatOptions, csv::CsvOptions, csv::NestedMode, parquet::Codec, parquet::ParquetOptions,
};
use crate::error::ConfigError;
use crate::pipeline::{self, FileMode, PipelineOptions, StateOptions};
use crate::read::bigquery::args::BigQueryArgs;
use crate::template::{DEFAULT_TEMPLATE, NameTemplate};
use crate::write::{PutMode, SinkConfig, TargetOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileModeArg {
    /// One file series per read stream, uploaded in parallel.
    PerStream,
    /// One file series for the whole table.
    Single,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NestedArg {
    /// Refuse ARRAY/STRUCT columns, as BigQuery's CSV export does.
    Error,
    /// Write ARRAY/STRUCT columns as JSON text.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Source URL: bq://PROJECT.DATASET.TABLE, parquet:///path (file or directory),
    /// synthetic://?rows=N&streams=K[&seed=S][&flat=true].
    #[arg(
        long,
        value_name = "URL",
        env = "BQ2SFTP_FROM",
        required_unless_present_any = ["query", "query_file", "plan"]
    )]
    pub from: Option<String>,

    /// Target URL: dir:///path, sftp://USER@HOST[:PORT]/DIR, null: (discard, for benchmarks).
    #[arg(long, value_name = "URL", env = "BQ2SFTP_TO", required_unless_present = "plan")]
    pub to: Option<String>,

    /// Export a share of a plan made by `bq2sftp plan` (its source, target and options; flags
    /// given here override them). Use with --shard I/N.
    #[arg(long, value_name = "PATH", env = "BQ2SFTP_PLAN")]
    pub plan: Option<std::path::PathBuf>,

    /// This process's shard of the plan's streams: I/N takes streams I, I+N, I+2N, ... (I from 0).
    #[arg(long, value_name = "I/N", requires = "plan", conflicts_with = "shard_count")]
    pub shard: Option<String>,

    /// Shards in all, the index coming from CLOUD_RUN_TASK_INDEX or JOB_COMPLETION_INDEX
    /// (Cloud Run Jobs and Kubernetes Indexed Jobs set them). Without --shard or this, both
    /// come from CLOUD_RUN_TASK_INDEX/CLOUD_RUN_TASK_COUNT when set.
    #[arg(long, value_name = "N", requires = "plan")]
    pub shard_count: Option<usize>,

    /// Output format: csv, parquet or ndjson.
    #[arg(long, default_value = "csv", env = "BQ2SFTP_FORMAT")]
    pub format: String,

    /// csv/ndjson: none, gzip or zstd (default none). parquet: zstd (default), snappy, gzip, none.
    #[arg(long, env = "BQ2SFTP_COMPRESSION")]
    pub compression: Option<String>,

    /// Compression level (gzip 1-12, default 6; zstd 1-22, default 3, for parquet 1).
    #[arg(long, value_name = "N", env = "BQ2SFTP_COMPRESSION_LEVEL")]
    pub compression_level: Option<i32>,

    /// per-stream: a file series per read stream, in parallel. single: one file series.
    #[arg(long, value_enum, default_value = "per-stream")]
    pub file_mode: FileModeArg,

    /// Start a new file when this size would be exceeded (e.g. 1GiB, 500MB, 1048576).
    #[arg(long, default_value = "1GiB", value_name = "SIZE", env = "BQ2SFTP_MAX_FILE_BYTES")]
    pub max_file_bytes: String,

    /// Start a new file after this many rows.
    #[arg(long, value_name = "N", env = "BQ2SFTP_MAX_FILE_ROWS")]
    pub max_file_rows: Option<u64>,

    /// File names: {prefix} {stream} {seq} {date} {ext}, numbers padded as {seq:05}.
    #[arg(long, default_value = DEFAULT_TEMPLATE, value_name = "TEMPLATE", env = "BQ2SFTP_NAME_TEMPLATE")]
    pub name_template: String,

    /// {prefix} in file names (default: the table or file name).
    #[arg(long, env = "BQ2SFTP_PREFIX")]
    pub prefix: Option<String>,

    /// Replace files that already exist in the target (refused by default).
    #[arg(long)]
    pub overwrite: bool,

    /// Name of the manifest written after all files.
    #[arg(long, default_value = crate::manifest::DEFAULT_MANIFEST_NAME, value_name = "NAME")]
    pub manifest: String,

    /// Do not write a manifest.
    #[arg(long, conflicts_with = "manifest")]
    pub no_manifest: bool,

    /// Write an empty _SUCCESS marker after the manifest.
    #[arg(long)]
    pub success_marker: bool,

    /// Create the target directory when it does not exist.
    #[arg(long)]
    pub create_dirs: bool,

    /// Suffix of files being uploaded, renamed away on completion.
    #[arg(long, default_value = crate::write::DEFAULT_PARTIAL_SUFFIX, value_name = "SUFFIX")]
    pub partial_suffix: String,

    /// CSV field delimiter: one character, or "tab".
    #[arg(long, default_value = ",", value_name = "CHAR")]
    pub csv_delimiter: String,

    /// CSV: leave out the header row.
    #[arg(long)]
    pub no_header: bool,

    /// CSV: text written for NULL (default: an empty field).
    #[arg(long, default_value = "", value_name = "TEXT")]
    pub csv_null_marker: String,

    /// CSV: quote every non-NULL field.
    #[arg(long)]
    pub csv_quote_all: bool,

    /// CSV: what to do with ARRAY/STRUCT columns.
    #[arg(long, value_enum, default_value = "error")]
    pub csv_nested: NestedArg,

    /// Parquet: close a row group once it holds this much encoded data.
    #[arg(long, default_value = "32MiB", value_name = "SIZE")]
    pub parquet_row_group_bytes: String,

    /// Streams read and uploaded at once (default: twice the cores, at least 4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,

    /// Encoder threads (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Continue an interrupted run of this same job from its state file: committed files are
    /// kept, each unfinished stream restarts at its first uncommitted row. Without a state
    /// file the job starts afresh.
    #[arg(long)]
    pub resume: bool,

    /// Where this job records its progress for --resume (default:
    /// .bq2sftp-state/JOB-ID.json in the working directory).
    #[arg(long, value_name = "PATH", env = "BQ2SFTP_STATE_FILE")]
    pub state_file: Option<std::path::PathBuf>,

    /// Keep no state file (the job cannot be resumed).
    #[arg(long, conflicts_with_all = ["resume", "state_file"])]
    pub no_state: bool,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    /// Print the effective configuration (flags, environment, job file, defaults; secrets
    /// masked) after validating it, and exit without running.
    #[arg(long)]
    pub print_config: bool,

    /// Test mode: read and encode everything but write nothing (the target is replaced by
    /// null:), then print what would have been written.
    #[arg(long, env = "BQ2SFTP_TEST_MODE")]
    pub dry_run: bool,

    /// Rows per encoding job.
    #[arg(long, default_value_t = pipeline::DEFAULT_CHUNK_ROWS, value_name = "N", hide_short_help = true)]
    pub chunk_rows: usize,

    #[command(flatten)]
    pub bigquery: BigQueryArgs,

    #[command(flatten)]
    pub sftp: crate::write::sftp::args::SftpArgs,
}

/// Where the job's Prometheus metrics go (any combination).
#[derive(Debug, Clone, Default, Args)]
pub struct MetricsArgs {
    /// Serve /metrics on HOST:PORT while the job runs (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "HOST:PORT", env = "BQ2SFTP_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Push the metrics to this Pushgateway when the job ends, success or failure.
    #[arg(long, value_name = "URL", env = "BQ2SFTP_PUSHGATEWAY")]
    pub pushgateway: Option<String>,

    /// Pushgateway grouping: job name.
    #[arg(long, default_value = "bq2sftp", value_name = "NAME", env = "BQ2SFTP_PUSHGATEWAY_JOB")]
    pub pushgateway_job: String,

    /// Pushgateway grouping: instance (default: the host name).
    #[arg(long, value_name = "NAME", env = "BQ2SFTP_PUSHGATEWAY_INSTANCE")]
    pub pushgateway_instance: Option<String>,

    /// Write the metrics for node_exporter's textfile collector when the job ends (atomically).
    #[arg(long, value_name = "PATH", env = "BQ2SFTP_METRICS_TEXTFILE")]
    pub metrics_textfile: Option<std::path::PathBuf>,
}

/// Parses `1GiB`, `512MiB`, `100MB`, `64k`, `1048576`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        _ => return None,
    };
    let v = num * mult as f64;
    (1.0..1.8e19).contains(&v).then_some(v as u64)
}

fn size(flag: &str, value: &str) -> Result<u64, ConfigError> {
    parse_size(value).ok_or_else(|| {
        ConfigError::invalid(format!("--{flag} {value}"), "not a size; use e.g. 1GiB, 500MB or a byte count")
    })
}

fn delimiter(value: &str) -> Result<u8, ConfigError> {
    let d = match value {
        "tab" | "\\t" | "\t" => b'\t',
        v if v.len() == 1 => v.as_bytes()[0],
        _ => {
            return Err(ConfigError::invalid(
                format!("--csv-delimiter {value}"),
                "must be one ASCII character or 'tab'",
            ));
        }
    };
    if matches!(d, b'"' | b'\n' | b'\r') {
        return Err(ConfigError::invalid(format!("--csv-delimiter {value}"), "cannot be a quote or a line break"));
    }
    Ok(d)
}

impl ExportArgs {
    /// Validates every flag and builds the job. No I/O happens here.
    pub fn to_job(&self) -> Result<Job, ConfigError> {
        let source = self.bigquery.source_config(self.from.as_deref())?;
        let to = self.to.as_deref().ok_or_else(|| ConfigError::invalid("--to", "missing: give --to URL"))?;
        let mut target = SinkConfig::parse(to)?;
        self.sftp.apply(&mut target)?;
        let format = encode::format(&self.format)?;

        let mut format_options = FormatOptions {
            csv: CsvOptions {
                delimiter: delimiter(&self.csv_delimiter)?,
                header: !self.no_header,
                null: self.csv_null_marker.clone(),
                quote_all: self.csv_quote_all,
                nested: match self.csv_nested {
                    NestedArg::Error => NestedMode::Error,
                    NestedArg::Json => NestedMode::Json,
                },
            },
            parquet: ParquetOptions {
                row_group_bytes: size("parquet-row-group-bytes", &self.parquet_row_group_bytes)? as usize,
                ..Default::default()
            },
        };
        if self.csv_null_marker.contains(['\n', '\r', '"'])
            || self.csv_null_marker.as_bytes().contains(&format_options.csv.delimiter)
        {
            return Err(ConfigError::invalid(
                "--csv-null-marker",
                "cannot contain the delimiter, a quote or a line break",
            ));
        }
        let compression = if format.internal_compression {
            format_options.parquet.codec =
                Codec::parse(self.compression.as_deref().unwrap_or("zstd"), self.compression_level)?;
            Compression::None
        } else {
            Compression::parse(self.compression.as_deref().unwrap_or("none"), self.compression_level)?
        };
        if self.compression_level.is_some() && compression == Compression::None && !format.internal_compression {
            return Err(ConfigError::invalid("--compression-level", "needs --compression gzip or zstd"));
        }

        let template = NameTemplate::parse(&self.name_template)?;
        let prefix = self.prefix.clone().unwrap_or_else(|| source.default_prefix());
        if prefix.contains(['/', '\\', '\0']) {
            return Err(ConfigError::invalid(
                format!("--prefix {prefix}"),
                "file names cannot contain '/', '\\' or NUL",
            ));
        }
        if self.partial_suffix.is_empty() || self.partial_suffix.contains('/') {
            return Err(ConfigError::invalid("--partial-suffix", "must be non-empty and contain no '/'"));
        }
        if self.max_file_rows == Some(0) {
            return Err(ConfigError::invalid("--max-file-rows", "must be at least 1"));
        }
        if let Some(url) = &self.metrics.pushgateway
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(format!("--pushgateway {url}"), "must be an http:// or https:// URL"));
        }
        if self.chunk_rows == 0 || self.concurrency == Some(0) || self.threads == Some(0) {
            return Err(ConfigError::invalid("--chunk-rows/--concurrency/--threads", "must be at least 1"));
        }

        let mut pipeline = PipelineOptions::new(format, template, prefix);
        pipeline.format_options = format_options;
        pipeline.compression = compression;
        pipeline.file_mode = match self.file_mode {
            FileModeArg::PerStream => FileMode::PerStream,
            FileModeArg::Single => FileMode::Single,
        };
        pipeline.max_file_bytes = size("max-file-bytes", &self.max_file_bytes)?;
        pipeline.max_file_rows = self.max_file_rows;
        pipeline.put_mode = if self.overwrite { PutMode::Overwrite } else { PutMode::Create };
        pipeline.manifest_name = (!self.no_manifest).then(|| self.manifest.clone());
        pipeline.success_marker = self.success_marker.then(|| crate::manifest::DEFAULT_SUCCESS_NAME.to_string());
        if let Some(c) = self.concurrency {
            pipeline.concurrency = c;
        }
        if let Some(t) = self.threads {
            pipeline.threads = t;
        }
        pipeline.chunk_rows = self.chunk_rows;

        if let Some(path) = &self.plan {
            let plan = crate::plan::PlanFile::load(path)?;
            pipeline.saved_plan = Some(plan.read_plan()?);
            pipeline.name_date = plan.created();
            pipeline.shard = self.resolve_shard(&|k| std::env::var(k))?;
            if pipeline.shard.is_some() && pipeline.file_mode == FileMode::Single {
                return Err(ConfigError::invalid("--shard", "shards need --file-mode per-stream"));
            }
        }
        let fingerprint = self.fingerprint(&pipeline);
        pipeline.state = (!self.no_state).then(|| StateOptions {
            path: self.state_file.clone().unwrap_or_else(|| {
                std::path::Path::new(crate::state::DEFAULT_STATE_DIR).join(format!("{}.json", &fingerprint[..16]))
            }),
            explicit: self.state_file.is_some(),
            resume: self.resume,
            fingerprint,
        });

        let target_options =
            TargetOptions { create_dirs: self.create_dirs, partial_suffix: self.partial_suffix.clone() };
        // A dry run validates the target URL, then writes nowhere and keeps no state.
        let (target, dry_run) = if self.dry_run {
            pipeline.state = None;
            (SinkConfig::Null, Some(to.to_string()))
        } else {
            (target, None)
        };
        let secret_manager = self.bigquery.secret_manager()?;
        Ok(Job { source, target, target_options, pipeline, dry_run, secret_manager })
    }
}

impl ExportArgs {
    /// The shard this process exports: `--shard I/N`, or `--shard-count N` with the index from
    /// the scheduler (Cloud Run Jobs' `CLOUD_RUN_TASK_INDEX`, Kubernetes' `JOB_COMPLETION_INDEX`),
    /// or both from `CLOUD_RUN_TASK_INDEX`/`CLOUD_RUN_TASK_COUNT`; `None`: every stream.
    pub fn resolve_shard(
        &self,
        env: &dyn Fn(&str) -> Result<String, std::env::VarError>,
    ) -> Result<Option<crate::pipeline::Shard>, ConfigError> {
        use crate::pipeline::Shard;
        if let Some(text) = &self.shard {
            return Shard::parse(text).map(Some);
        }
        let index_from_env = || -> Result<usize, ConfigError> {
            for var in ["CLOUD_RUN_TASK_INDEX", "JOB_COMPLETION_INDEX"] {
                if let Ok(v) = env(var) {
                    return v
                        .trim()
                        .parse()
                        .map_err(|_| ConfigError::invalid(var, format!("'{v}' is not a shard index")));
                }
            }
            Err(ConfigError::invalid(
                "--shard-count",
                "needs the shard index: --shard I/N, CLOUD_RUN_TASK_INDEX or JOB_COMPLETION_INDEX",
            ))
        };
        let count = match (self.shard_count, env("CLOUD_RUN_TASK_COUNT")) {
            (Some(n), _) => n,
            (None, Ok(n)) => n
                .trim()
                .parse()
                .map_err(|_| ConfigError::invalid("CLOUD_RUN_TASK_COUNT", format!("'{n}' is not a count")))?,
            (None, Err(_)) => return Ok(None),
        };
        let text = format!("{}/{count}", index_from_env()?);
        Shard::parse(&text).map(Some)
    }

    /// Identifies the job for its state file: what is read, where it goes and everything that
    /// decides which rows land in which file under which name. Tuning flags (threads,
    /// concurrency) are left out, so a resumed run may use different ones.
    fn fingerprint(&self, p: &PipelineOptions) -> String {
        use sha2::Digest;
        let identity = format!(
            "{:?}\n{}\n{:?}\n{:?}\n{}\n{:?}\n{:?}\n{}\n{}\n{:?}\n{}\n{:?}\n{:?}",
            self.from,
            self.bigquery.identity(),
            self.to,
            // Shards of one plan are separate jobs with separate state.
            p.shard,
            p.format.name,
            p.compression,
            p.format_options,
            p.template.as_str(),
            p.prefix,
            p.file_mode,
            p.max_file_bytes,
            p.max_file_rows,
            self.chunk_rows,
        );
        hex::encode(sha2::Sha256::digest(identity.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("1.5k"), Some(1500));
        assert_eq!(parse_size("1048576"), Some(1_048_576));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("0"), None);
    }

    #[test]
    fn delimiters() {
        assert_eq!(delimiter("tab").unwrap(), b'\t');
        assert_eq!(delimiter("|").unwrap(), b'|');
        assert!(delimiter("ab").is_err());
        assert!(delimiter("\"").is_err());
    }
}
