//! The `bq2sftp` command: parses flags, builds a [`bq2sftp::Job`], runs it with progress,
//! metrics and signal handling, prints a summary and exits with the documented code (see
//! `bq2sftp::exit` and the README).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use bq2sftp::cli::ExportArgs;
use bq2sftp::logging::{self, LogFormat};
use bq2sftp::progress::{group, human_bytes};
use bq2sftp::{Error, Progress, Report, exit, metrics};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

const EXAMPLES: &str = "\
Examples:
  # The demo: a generated table exported to ./bq2sftp-demo as gzipped CSV
  bq2sftp demo

  # A BigQuery table to an SFTP server, as gzipped CSV files of at most 1 GiB
  bq2sftp export --from bq://my-project.sales.orders \\
      --to sftp://partner@sftp.example.com/incoming --format csv --compression gzip

  # Local Parquet files to a directory as NDJSON
  bq2sftp export --from parquet:///data/orders --to dir:///srv/out --format ndjson

  # Query mode: export a query's result; --plan-only shows the plan and reads nothing
  bq2sftp export --query 'SELECT id, total FROM sales.orders WHERE day = CURRENT_DATE()' \\
      --project my-project --location EU --to dir:///srv/out --format parquet

  # A local BigQuery emulator serving ./tables/PROJECT.DATASET.TABLE.parquet
  bq2sftp emulator --tables ./tables --port 9050 &
  BIGQUERY_EMULATOR_HOST=127.0.0.1:9050 bq2sftp export --from bq://p.d.t --to dir://out

  # Check credentials, BigQuery and the SFTP server of a job before its first run
  bq2sftp doctor nightly.toml

  # Measure encoding throughput without writing anything
  bq2sftp export --from 'synthetic://?rows=10M&streams=4&flat=true' --to null: --compression gzip

Exit codes:
  0 success   2 usage/configuration   3 authentication/permission
  4 source failure   5 target failure   6 interrupted, resumable   1 internal error
";

#[derive(Parser)]
#[command(name = "bq2sftp", version, about = "Stream BigQuery tables to SFTP as CSV, Parquet or NDJSON", after_help = EXAMPLES)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). BQ2SFTP_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Log as text, or as JSON lines with Cloud Logging's fields (severity, message, timestamp).
    #[arg(long, value_enum, default_value = "text", global = true, env = "BQ2SFTP_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a table (or query result, or file) to a target.
    #[command(after_help = EXAMPLES)]
    Export(Box<ExportArgs>),
    /// Run the export a job file describes (TOML; its keys are the export flags). Flags after
    /// the file override it; environment variables override the file.
    Run(RunArgs),
    /// Open the source once and print a plan (streams, schema, snapshot, expiry, export flags)
    /// that shards run with `export --plan plan.json --shard I/N`.
    Plan(Box<ExportArgs>),
    /// After the shards of a plan: check every stream is committed, then write the combined
    /// manifest and _SUCCESS. `bq2sftp finalize --plan plan.json --shard-count N`.
    Finalize(Box<ExportArgs>),
    /// Serve HTTP: POST /jobs/NAME/run starts a configured job (callers authenticated with
    /// Google OIDC tokens), GET /runs/ID reports on it, GET /metrics, GET /healthz.
    Serve(Box<bq2sftp::serve::ServeArgs>),
    /// Run a real export of a generated table to a local directory and show the result.
    Demo(DemoArgs),
    /// Serve Parquet files as BigQuery tables (Storage Read API + query REST calls) for tests and demos.
    Emulator(bq2sftp::emulator::EmulatorArgs),
    /// Upload local files as they are, with the same publishing and resume rules as export.
    Put(Box<PutArgs>),
    /// Check everything an export needs (credentials, BigQuery, the SFTP server or directory)
    /// and print a checklist with the fix for each failure: `bq2sftp doctor [JOB.toml] [FLAGS]`.
    Doctor(bq2sftp::doctor::DoctorArgs),
}

#[derive(clap::Args)]
struct PutArgs {
    /// Files to upload; each keeps its file name.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<std::path::PathBuf>,
    /// Target URL: sftp://USER@HOST[:PORT]/DIR or dir:///path.
    #[arg(long, value_name = "URL")]
    to: String,
    /// Replace files that already exist in the target.
    #[arg(long)]
    overwrite: bool,
    /// Create the target directory when it does not exist.
    #[arg(long)]
    create_dirs: bool,
    /// Suffix of files being uploaded, renamed away on completion.
    #[arg(long, default_value = bq2sftp::write::DEFAULT_PARTIAL_SUFFIX, value_name = "SUFFIX")]
    partial_suffix: String,
    #[command(flatten)]
    sftp: bq2sftp::write::sftp::args::SftpArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The job file.
    job: std::path::PathBuf,
    /// Export flags that override the job file, e.g. `--to null:` or `--print-config`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "FLAGS")]
    overrides: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Directory to write into (created; files from an earlier demo are replaced).
    #[arg(long, default_value = "bq2sftp-demo")]
    out: String,
    /// Rows to generate.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bq2sftp").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let format = cli.log_format;
    // The doctor reports on stdout and exits with its own code, not through an error.
    if let Command::Doctor(args) = &cli.command {
        return ExitCode::from(runtime.block_on(bq2sftp::doctor::main(args)));
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Export(args) => match with_plan_flags(&args, "export") {
                Ok((args, matches)) => export(&args, matches, format).await,
                Err(e) => Err(e),
            },
            Command::Plan(args) => plan(&args).await,
            Command::Finalize(args) => match with_plan_flags(&args, "finalize") {
                Ok((args, _)) => finalize(&args).await,
                Err(e) => Err(e),
            },
            Command::Serve(args) => serve(&args).await,
            Command::Run(run) => match bq2sftp::jobfile::load(&run.job, &run.overrides) {
                Ok((args, matches, from_file)) => export(&args, Some((matches, from_file)), format).await,
                Err(e) => Err(Error::from(e).into()),
            },
            Command::Demo(args) => demo(&args, format).await,
            Command::Emulator(args) => emulator(&args).await,
            Command::Put(args) => put(&args).await,
            Command::Doctor(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            let code = e.downcast_ref::<Error>().map_or(exit::INTERNAL, Error::exit_code);
            report_error(format, &format!("{e:#}"), code);
            if let Some(hint) = RESUME_HINT.get()
                && code != exit::USAGE
            {
                report_error(format, hint, code);
            }
            ExitCode::from(code)
        }
    }
}

fn report_error(format: LogFormat, message: &str, code: u8) {
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "severity": "ERROR",
                "message": message,
                "exit_code": code,
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            })
        ),
    }
}

/// Cancels `token` on SIGINT or SIGTERM (what Kubernetes and Cloud Run send before killing).
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::warn!("signal received: stopping; committed files stay, the file in progress is removed");
        token.cancel();
    });
}

/// Set when a failed job left a state file: how to continue it.
static RESUME_HINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn run_job(args: &ExportArgs) -> anyhow::Result<Report> {
    let job = args.to_job().map_err(Error::from)?;
    let server = match args.metrics.metrics_addr {
        Some(addr) => {
            let (bound, task) = metrics::serve(addr).await.map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!("serving metrics on http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let progress = Arc::new(Progress::default());
    let display = bq2sftp::progress::spawn(progress.clone());
    let result = job.run_with(cancel, progress).await;
    display.abort();
    let _ = display.await;
    metrics::publish(&args.metrics).await;
    if let Some(task) = server {
        task.abort();
    }
    if result.is_err()
        && let Some(state) = job.pipeline.state.as_ref().filter(|s| s.path.exists())
    {
        let _ = RESUME_HINT.set(format!(
            "hint: committed files are kept and progress is saved in {}; run the same command with --resume to finish the job",
            state.path.display()
        ));
    }
    Ok(result?)
}

async fn export(args: &ExportArgs, matches: Option<Origins>, format: LogFormat) -> anyhow::Result<()> {
    if args.print_config {
        args.to_job().map_err(Error::from)?;
        if let Some((m, from_file)) = matches {
            print!("{}", bq2sftp::jobfile::describe(&m, &from_file));
        }
        return Ok(());
    }
    if args.bigquery.plan_only {
        return plan_only(args).await;
    }
    let report = run_job(args).await?;
    if args.dry_run {
        eprintln!("dry run: nothing was written; {} would have received:", args.to.as_deref().unwrap_or("the target"));
        for f in &report.files {
            eprintln!("  {:<40} {:>12} rows {:>10}", f.name, group(f.rows), human_bytes(f.bytes));
        }
    }
    print_summary(&report, format);
    Ok(())
}

/// `--plan-only`: the read plan of a BigQuery source, nothing read.
async fn plan_only(args: &ExportArgs) -> anyhow::Result<()> {
    use bq2sftp::read::{ReadError, SourceConfig, bigquery::BigQuerySource};
    let job = args.to_job().map_err(Error::from)?;
    let SourceConfig::BigQuery(options) = &job.source else {
        let problem = "only applies to bq:// sources and --query";
        anyhow::bail!(Error::from(bq2sftp::ConfigError::invalid("--plan-only", problem)));
    };
    let source = BigQuerySource::new((**options).clone()).map_err(|e| Error::from(ReadError::from(e)))?;
    let text = source.dry_run().await.map_err(|e| Error::from(ReadError::from(e)))?;
    print!("{text}");
    Ok(())
}

/// Where each flag's value came from: clap's matches, and the flags a job file or plan set.
type Origins = (clap::ArgMatches, Vec<String>);

/// The flags of `subcommand` as clap matches (to tell defaults from given values), with a
/// `--plan`'s recorded export flags underneath (flags given here override them).
fn with_plan_flags(args: &ExportArgs, subcommand: &str) -> anyhow::Result<(ExportArgs, Option<Origins>)> {
    let raw: Vec<_> = std::env::args_os().skip_while(|a| a != subcommand).skip(1).collect();
    let Some(path) = &args.plan else {
        let matches = bq2sftp::jobfile::export_command().try_get_matches_from(raw).ok();
        return Ok((args.clone(), matches.map(|m| (m, Vec::new()))));
    };
    let plan = bq2sftp::plan::PlanFile::load(path).map_err(Error::from)?;
    let what = format!("--plan {}", path.display());
    let (merged, matches, from_plan) =
        bq2sftp::jobfile::from_table(&plan.export_table(), &raw, &what).map_err(Error::from)?;
    Ok((merged, Some((matches, from_plan))))
}

/// `bq2sftp plan`: opens the source once and prints the plan as JSON on stdout.
async fn plan(args: &ExportArgs) -> anyhow::Result<()> {
    let raw: Vec<_> = std::env::args_os().skip_while(|a| a != "plan").skip(1).collect();
    let matches = bq2sftp::jobfile::export_command().try_get_matches_from(raw).map_err(|e| anyhow::anyhow!(e))?;
    let job = args.to_job().map_err(Error::from)?;
    let source = job.source.build().map_err(Error::from)?;
    let read_plan = source.plan().await.map_err(Error::from)?;
    let file = bq2sftp::plan::PlanFile::new(&read_plan, bq2sftp::plan::given_flags(&matches));
    println!("{}", serde_json::to_string_pretty(&file)?);
    eprintln!(
        "plan: {} streams of {}{}; run shards with `bq2sftp export --plan PLAN --shard I/N`, then `bq2sftp finalize --plan PLAN --shard-count N`",
        read_plan.streams.len(),
        read_plan.description.name,
        read_plan.description.expires_at.as_ref().map(|e| format!(" (readable until {e})")).unwrap_or_default()
    );
    Ok(())
}

/// `bq2sftp finalize`: the combined manifest once every shard has committed.
async fn finalize(args: &ExportArgs) -> anyhow::Result<()> {
    let Some(path) = &args.plan else {
        anyhow::bail!(Error::from(bq2sftp::ConfigError::invalid("finalize", "needs --plan PATH")));
    };
    let plan = bq2sftp::plan::PlanFile::load(path).map_err(Error::from)?;
    let count = args
        .shard_count
        .or_else(|| std::env::var("CLOUD_RUN_TASK_COUNT").ok().and_then(|n| n.trim().parse().ok()))
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            Error::from(bq2sftp::ConfigError::invalid(
                "finalize",
                "needs --shard-count N (the number of shards that ran)",
            ))
        })?;
    // Finalize is no shard itself: only the count matters.
    let mut whole = args.clone();
    (whole.shard, whole.shard_count) = (None, None);
    let job = whole.to_job().map_err(Error::from)?;
    let sink = job.sink().await?;
    let manifest = bq2sftp::plan::finalize(&plan, sink, &job.pipeline, count).await?;
    eprintln!(
        "finalized: {} shards, {} streams, {} files, {} rows; manifest written",
        count,
        plan.streams.len(),
        manifest.total_files,
        group(manifest.total_rows)
    );
    Ok(())
}

/// `bq2sftp serve`: until SIGINT/SIGTERM, then drains.
async fn serve(args: &bq2sftp::serve::ServeArgs) -> anyhow::Result<()> {
    let handle = bq2sftp::serve::start(args).await?;
    eprintln!("bq2sftp serve: listening on http://{}", handle.local_addr);
    let stop = CancellationToken::new();
    cancel_on_signal(stop.clone());
    stop.cancelled().await;
    handle.shutdown().await;
    Ok(())
}

/// `bq2sftp emulator`: serves until SIGINT/SIGTERM.
async fn emulator(args: &bq2sftp::emulator::EmulatorArgs) -> anyhow::Result<()> {
    let config = args.to_config().map_err(Error::from)?;
    let handle = bq2sftp::emulator::start(config)
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    eprintln!(
        "bq2sftp emulator: serving {}/PROJECT.DATASET.TABLE.parquet on {} (gRPC and REST); \
         use BIGQUERY_EMULATOR_HOST={}",
        args.tables.display(),
        handle.local_addr(),
        handle.host_port()
    );
    let stop = CancellationToken::new();
    cancel_on_signal(stop.clone());
    stop.cancelled().await;
    handle.shutdown().await;
    Ok(())
}

const DEMO_TABLE: &str = "demo-project.demo.orders";

/// Removes a temporary directory when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn demo(args: &DemoArgs, format: LogFormat) -> anyhow::Result<()> {
    let dir = std::path::Path::new(&args.out);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the demo directory {}", dir.display()))?;
    // A generated table with every flat BigQuery type, written as Parquet and served by the
    // in-process emulator on 127.0.0.1: the export below is a real Storage Read API read.
    let tables = std::env::temp_dir().join(format!("bq2sftp-demo-tables-{}", std::process::id()));
    std::fs::create_dir_all(&tables).with_context(|| format!("cannot create {}", tables.display()))?;
    let _cleanup = RemoveOnDrop(tables.clone());
    let table = bq2sftp::read::bigquery::TableRef::parse(DEMO_TABLE).map_err(Error::from)?;
    eprintln!("demo: generating a {}-row table with every BigQuery type as Parquet…", group(args.rows));
    let options = bq2sftp::read::synthetic::SyntheticOptions { rows: args.rows, flat: true, ..Default::default() };
    let dir2 = tables.clone();
    tokio::task::spawn_blocking(move || bq2sftp::emulator::write_synthetic_table(&dir2, &table, options))
        .await?
        .context("cannot write the demo table")?;
    let config = bq2sftp::emulator::EmulatorConfig { tables: Some(tables.clone()), ..Default::default() };
    let emulator = bq2sftp::emulator::start(config).await.context("cannot start the BigQuery emulator")?;
    let export = demo_export(&args.out, &emulator.host_port())?;
    eprintln!(
        "demo: exporting bq://{DEMO_TABLE} from the BigQuery emulator on {} (Storage Read API, 4 streams) as gzipped CSV to {}/",
        emulator.host_port(),
        args.out
    );
    let report = run_job(&export).await;
    emulator.shutdown().await;
    let report = report?;
    for f in &report.files {
        eprintln!(
            "  {:<32} {:>12} rows {:>10}  sha256 {}…",
            f.name,
            group(f.rows),
            human_bytes(f.bytes),
            &f.sha256[..16]
        );
    }
    if let Some(m) = &report.manifest {
        eprintln!("  {m:<32} (file list with rows, bytes and SHA-256)");
    }
    print_summary(&report, format);
    eprintln!(
        "next: `zcat {}/*.csv.gz | head` to look at the rows; `bq2sftp export --help` for real exports",
        args.out
    );
    Ok(())
}

/// `bq2sftp put`: streams each file to the target in 4 MiB chunks.
async fn put(args: &PutArgs) -> anyhow::Result<()> {
    use bq2sftp::write::{PutMode, SinkConfig, TargetOptions};
    const CHUNK: usize = 4 << 20;

    let usage = |what: String, problem: String| Error::from(bq2sftp::ConfigError::invalid(what, problem));
    let mut target = SinkConfig::parse(&args.to).map_err(Error::from)?;
    args.sftp.apply(&mut target).map_err(Error::from)?;
    let options = TargetOptions { create_dirs: args.create_dirs, partial_suffix: args.partial_suffix.clone() };
    let secret_manager = bq2sftp::secret::SecretManagerOptions::from_env().map_err(Error::from)?;
    let target = target.with_secrets(&secret_manager).await.map_err(Error::from)?;
    let sink = target.build(&options).map_err(Error::from)?;
    sink.check().await.map_err(Error::from)?;
    let mode = if args.overwrite { PutMode::Overwrite } else { PutMode::Create };
    let start = std::time::Instant::now();
    let mut total = 0u64;
    for path in &args.files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| usage(path.display().to_string(), "not a file name".into()))?;
        let file =
            std::fs::File::open(path).map_err(|e| usage(path.display().to_string(), format!("cannot open: {e}")))?;
        let began = std::time::Instant::now();
        let mut upload = sink.create(&name, mode).await.map_err(Error::from)?;
        // A reader thread reads straight into each chunk (tokio::fs would copy every byte once
        // more through its own buffer), two chunks ahead of the upload.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(2);
        let reader = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = file;
            loop {
                let mut buf = Vec::with_capacity(CHUNK);
                let read = (&mut file).take(CHUNK as u64).read_to_end(&mut buf);
                let done = !matches!(read, Ok(n) if n > 0);
                if tx.blocking_send(read.map(|_| buf)).is_err() || done {
                    return;
                }
            }
        });
        while let Some(chunk) = rx.recv().await {
            let chunk = match chunk {
                Ok(c) if c.is_empty() => break,
                Ok(c) => c,
                Err(e) => {
                    let _ = upload.abort().await;
                    return Err(usage(path.display().to_string(), format!("cannot read: {e}")).into());
                }
            };
            if let Err(e) = upload.put_part(bytes::Bytes::from(chunk)).await {
                let _ = upload.abort().await;
                return Err(Error::from(e).into());
            }
        }
        let _ = reader.await;
        let bytes = upload.complete().await.map_err(Error::from)?;
        total += bytes;
        let secs = began.elapsed().as_secs_f64().max(1e-9);
        eprintln!("put {name}: {} in {secs:.2}s ({}/s)", human_bytes(bytes), human_bytes((bytes as f64 / secs) as u64));
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "uploaded {} file(s), {} in {secs:.2}s: {:.1} MB/s to {}",
        args.files.len(),
        human_bytes(total),
        total as f64 / secs / 1e6,
        sink.describe()
    );
    Ok(())
}

fn demo_export(out: &str, emulator: &str) -> anyhow::Result<ExportArgs> {
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        export: ExportArgs,
    }
    let from = format!("bq://{DEMO_TABLE}");
    let to = format!("dir://{out}");
    let w = Wrapper::try_parse_from([
        "demo",
        "--from",
        &from,
        "--to",
        &to,
        "--format",
        "csv",
        "--compression",
        "gzip",
        "--prefix",
        "demo",
        "--overwrite",
        "--success-marker",
        "--no-state",
        "--emulator",
        emulator,
        "--min-streams",
        "4",
    ])?;
    Ok(w.export)
}

/// The last line of every successful run: rows, files, bytes, duration, throughput, manifest.
fn print_summary(r: &Report, format: LogFormat) {
    let secs = r.duration.as_secs_f64().max(1e-9);
    let message = format!(
        "exported {} rows to {} file(s), {} ({} before compression) in {:.2}s: {:.0} rows/s, {}/s; target {}{}",
        group(r.rows),
        r.files.len(),
        human_bytes(r.bytes),
        human_bytes(r.encoded_bytes),
        secs,
        r.rows as f64 / secs,
        human_bytes((r.encoded_bytes as f64 / secs) as u64),
        r.target,
        r.manifest.as_ref().map(|m| format!(", manifest {m}")).unwrap_or_default()
    );
    match format {
        LogFormat::Text => eprintln!("{message}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "severity": "NOTICE",
                "message": message,
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "rows": r.rows,
                "files": r.files.len(),
                "bytes": r.bytes,
                "seconds": secs,
                "destination": r.target,
                "manifest": r.manifest,
            })
        ),
    }
}
