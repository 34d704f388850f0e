//! The `bq2sftp` command: parses flags, builds a [`bq2sftp::Job`], runs it, prints a summary
//! and exits with the documented code (see `bq2sftp::exit` and the README).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bq2sftp::cli::ExportArgs;
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
        }
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e.downcast_ref::<Error>().map_or(exit::INTERNAL, Error::exit_code);
            if let Some(hint) = RESUME_HINT.get()
                && code != exit::USAGE
            {
                eprintln!("{hint}");
            }
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

/// Set when a failed job left a state file: how to continue it.
static RESUME_HINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn run_job(args: &ExportArgs) -> anyhow::Result<Report> {
    let job = args.to_job().map_err(Error::from)?;
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let progress = Arc::new(Progress::default());
    let ticker = spawn_ticker(progress.clone());
    let result = job.run_with(cancel, progress).await;
    ticker.abort();
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
    let report = run_job(args).await?;
    eprintln!("{}", summary(&report));
    Ok(())
}

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = std::path::Path::new(&args.out);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the demo directory {}", dir.display()))?;
    let export = ExportArgs::try_parse_demo(&args.out, args.rows)?;
    eprintln!(
        "demo: exporting a generated {}-row table (every BigQuery type, 4 streams) as gzipped CSV to {}/",
        group(args.rows),
        args.out
    );
    let report = run_job(&export).await?;
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

trait DemoExport {
    fn try_parse_demo(out: &str, rows: u64) -> anyhow::Result<ExportArgs>;
}

impl DemoExport for ExportArgs {
    fn try_parse_demo(out: &str, rows: u64) -> anyhow::Result<ExportArgs> {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            export: ExportArgs,
        }
        let from = format!("synthetic://?rows={rows}&streams=4&flat=true");
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
