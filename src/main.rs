//! The `bq2sftp` command: parses flags, builds a [`bq2sftp::Job`], runs it, prints a summary
//! and exits with the documented code (see `bq2sftp::exit` and the README).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bq2sftp::cli::ExportArgs;
use bq2sftp::read::bigquery::BigQuerySource;
use bq2sftp::read::{ReadError, SourceConfig};
use bq2sftp::{Error, Progress, Report, exit};
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

  # Query mode: export a query's result; --dry-run shows the plan and reads nothing
  bq2sftp export --query 'SELECT id, total FROM sales.orders WHERE day = CURRENT_DATE()' \\
      --project my-project --location EU --to dir:///srv/out --format parquet

  # A local BigQuery emulator serving ./tables/PROJECT.DATASET.TABLE.parquet
  bq2sftp emulator --tables ./tables --port 9050 &
  BIGQUERY_EMULATOR_HOST=127.0.0.1:9050 bq2sftp export --from bq://p.d.t --to dir://out

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

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a table (or query result, or file) to a target.
    #[command(after_help = EXAMPLES)]
    Export(Box<ExportArgs>),
    /// Run a real export of a generated table to a local directory and show the result.
    Demo(DemoArgs),
    /// Serve Parquet files as BigQuery tables (Storage Read API + query REST calls) for tests and demos.
    Emulator(bq2sftp::emulator::EmulatorArgs),
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
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bq2sftp").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Export(args) => export(&args).await,
            Command::Demo(args) => demo(&args).await,
            Command::Emulator(args) => emulator(&args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e.downcast_ref::<Error>().map_or(exit::INTERNAL, Error::exit_code);
            ExitCode::from(code)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BQ2SFTP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("bq2sftp={default},warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
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

async fn run_job(args: &ExportArgs) -> anyhow::Result<Report> {
    let job = args.to_job().map_err(Error::from)?;
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let progress = Arc::new(Progress::default());
    let ticker = spawn_ticker(progress.clone());
    let result = job.run_with(cancel, progress).await;
    ticker.abort();
    Ok(result?)
}

/// A one-line progress report every few seconds on stderr (a bar comes with the metrics work).
fn spawn_ticker(progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    let interval = if std::io::stderr().is_terminal() { Duration::from_secs(2) } else { Duration::from_secs(30) };
    tokio::spawn(async move {
        let start = std::time::Instant::now();
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let rows = progress.rows_read.load(std::sync::atomic::Ordering::Relaxed);
            let bytes = progress.committed_bytes.load(std::sync::atomic::Ordering::Relaxed);
            let files = progress.committed_files.load(std::sync::atomic::Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "progress: {} rows read ({:.0} rows/s), {} files / {} committed",
                group(rows),
                rows as f64 / secs,
                files,
                human_bytes(bytes)
            );
        }
    })
}

async fn export(args: &ExportArgs) -> anyhow::Result<()> {
    if args.bigquery.dry_run {
        return dry_run(args).await;
    }
    let report = run_job(args).await?;
    eprintln!("{}", summary(&report));
    Ok(())
}

/// `--dry-run`: the read plan of a BigQuery source, nothing read.
async fn dry_run(args: &ExportArgs) -> anyhow::Result<()> {
    let job = args.to_job().map_err(Error::from)?;
    let SourceConfig::BigQuery(options) = &job.source else {
        anyhow::bail!(Error::from(bq2sftp::ConfigError::invalid(
            "--dry-run",
            "only applies to bq:// sources and --query"
        )));
    };
    let source = BigQuerySource::new((**options).clone()).map_err(|e| Error::from(ReadError::from(e)))?;
    let text = source.dry_run().await.map_err(|e| Error::from(ReadError::from(e)))?;
    print!("{text}");
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

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
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
    let export = ExportArgs::try_parse_demo(&args.out, &emulator.host_port())?;
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
    eprintln!("{}", summary(&report));
    eprintln!(
        "next: `zcat {}/*.csv.gz | head` to look at the rows; `bq2sftp export --help` for real exports",
        args.out
    );
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

trait DemoExport {
    fn try_parse_demo(out: &str, emulator: &str) -> anyhow::Result<ExportArgs>;
}

impl DemoExport for ExportArgs {
    fn try_parse_demo(out: &str, emulator: &str) -> anyhow::Result<ExportArgs> {
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
            "--emulator",
            emulator,
            "--min-streams",
            "4",
        ])?;
        Ok(w.export)
    }
}

fn summary(r: &Report) -> String {
    let secs = r.duration.as_secs_f64().max(1e-9);
    format!(
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
    )
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}
