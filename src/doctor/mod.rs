//! `bq2sftp doctor`: checks, in order, everything an export needs, and prints a checklist
//! with a mark per check and, for each failure, the fix.
//!
//! It takes exactly what `export` and `run` take (the export flags, or a job file with flags
//! over it), builds the same validated [`Job`](crate::Job), and then walks the path a real
//! export would take, one step at a time, so the failing step names itself: Google
//! credentials and token ([`bigquery`]), BigQuery's answer to a read session of one stream
//! (nothing is read), then the target: for SFTP ([`sftp`]) DNS, TCP, the SSH handshake, the
//! host key, authentication, the directory, a probe file written, renamed and removed, and the
//! free space. A step that depends on a failed one is marked skipped rather than run, so one
//! root cause gives one failure. The process exits with the documented code of the first
//! failure (see the README's exit codes), 0 when every check passed.
//!
//! Checks are reported as they finish (a callback), so a step that hangs until its timeout
//! shows what already passed.

pub mod bigquery;
pub mod sftp;

use std::ffi::OsString;
use std::path::Path;

use crate::cli::ExportArgs;
use crate::error::{ConfigError, exit};
use crate::read::SourceConfig;
use crate::write::{SinkConfig, TargetOptions};

/// `bq2sftp doctor [JOB.toml] [FLAGS]`: a job file as for `run` and/or the export flags.
/// Not `Debug`: the raw flags may hold a password as typed.
#[derive(Clone, clap::Args)]
pub struct DoctorArgs {
    /// A job file (as `bq2sftp run` takes) followed by export flags that override it, or
    /// the export flags alone (`bq2sftp export --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "[JOB.toml] [FLAGS]")]
    pub args: Vec<OsString>,
}

impl DoctorArgs {
    /// The export arguments, parsed and merged exactly as `run` (a job file first) or
    /// `export` (flags only) would. Environment variables apply as for those.
    pub fn export_args(&self) -> Result<ExportArgs, ConfigError> {
        match self.args.split_first() {
            Some((first, rest)) if !first.to_string_lossy().starts_with('-') => {
                crate::jobfile::load(Path::new(first), rest).map(|(args, _, _)| args)
            }
            _ => crate::jobfile::from_table(&toml::Table::new(), &self.args, "doctor").map(|(args, _, _)| args),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Ok,
    Fail,
    Skip,
}

/// One line of the checklist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub mark: Mark,
    /// What was checked, `area: step` (`sftp: host key`).
    pub name: String,
    /// What was found; for a skipped check, why it was not run.
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
    /// The exit code a failure stands for (0 otherwise).
    pub exit_code: u8,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mark {
            Mark::Ok => write!(f, "[ ok ] {}: {}", self.name, self.detail),
            Mark::Skip => write!(f, "[skip] {}: skipped: {}", self.name, self.detail),
            Mark::Fail => {
                write!(f, "[FAIL] {}: {}", self.name, self.detail)?;
                match &self.fix {
                    Some(fix) => write!(f, " -> fix: {fix}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The checks so far, each handed to the callback as it is added.
pub struct Checklist {
    pub checks: Vec<Check>,
    on_check: Box<dyn FnMut(&Check) + Send>,
}

impl std::fmt::Debug for Checklist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checklist").field("checks", &self.checks).finish_non_exhaustive()
    }
}

impl Checklist {
    pub fn new(on_check: impl FnMut(&Check) + Send + 'static) -> Self {
        Checklist { checks: Vec::new(), on_check: Box::new(on_check) }
    }

    fn push(&mut self, check: Check) {
        (self.on_check)(&check);
        self.checks.push(check);
    }

    pub fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.push(Check { mark: Mark::Ok, name: name.into(), detail: detail.into(), fix: None, exit_code: 0 });
    }

    pub fn fail(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>, exit_code: u8) {
        self.push(Check {
            mark: Mark::Fail,
            name: name.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
            exit_code,
        });
    }

    pub fn skip(&mut self, name: &str, why: impl Into<String>) {
        self.push(Check { mark: Mark::Skip, name: name.into(), detail: why.into(), fix: None, exit_code: 0 });
    }

    /// The code of the first failure, or 0.
    pub fn exit_code(&self) -> u8 {
        self.checks.iter().find(|c| c.mark == Mark::Fail).map_or(exit::OK, |c| c.exit_code)
    }

    /// `doctor: 9 passed, 1 failed, 3 skipped`.
    pub fn summary(&self) -> String {
        let count = |m: Mark| self.checks.iter().filter(|c| c.mark == m).count();
        let failed = count(Mark::Fail);
        let verdict =
            if failed == 0 { "ready to export" } else { "fix the first failure above, then run doctor again" };
        format!("doctor: {} passed, {failed} failed, {} skipped; {verdict}", count(Mark::Ok), count(Mark::Skip))
    }
}

/// A run of dependent checks: each step needs the ones before it, so a failure marks every
/// later step skipped ("needs ..."), and the caller returns.
pub struct Steps<'a> {
    list: &'a mut Checklist,
    names: &'static [&'static str],
    next: usize,
}

impl<'a> Steps<'a> {
    pub fn new(list: &'a mut Checklist, names: &'static [&'static str]) -> Self {
        Steps { list, names, next: 0 }
    }

    fn current(&mut self) -> &'static str {
        let name = self.names.get(self.next).copied().unwrap_or("check");
        self.next += 1;
        name
    }

    pub fn ok(&mut self, detail: impl Into<String>) {
        let name = self.current();
        self.list.ok(name, detail);
    }

    /// Skips this step only (it does not apply); later steps still run.
    pub fn skip(&mut self, why: impl Into<String>) {
        let name = self.current();
        self.list.skip(name, why);
    }

    /// Fails this step and skips every later one.
    pub fn fail(&mut self, detail: impl Into<String>, fix: impl Into<String>, exit_code: u8) {
        let name = self.current();
        self.list.fail(name, detail, fix, exit_code);
        self.skip_rest(&format!("needs {name}"));
    }

    /// Skips every step not reported yet.
    pub fn skip_rest(&mut self, why: &str) {
        while self.next < self.names.len() {
            let name = self.current();
            self.list.skip(name, why);
        }
    }
}

/// Runs every check for the export `args` describe, reporting each to `on_check`.
pub async fn run(args: &ExportArgs, on_check: impl FnMut(&Check) + Send + 'static) -> Checklist {
    let mut list = Checklist::new(on_check);
    let job = match args.to_job() {
        Ok(job) => job,
        Err(e) => {
            config_failure(&mut list, &e);
            return list;
        }
    };
    let from = match (&args.from, &args.bigquery.query, &args.bigquery.query_file) {
        (Some(from), _, _) => from.clone(),
        (None, Some(_), _) | (None, None, Some(_)) => "--query".to_string(),
        _ => "?".to_string(),
    };
    let to = match &job.target {
        SinkConfig::Sftp(cfg) => cfg.describe(),
        _ => job.dry_run.clone().or_else(|| args.to.clone()).unwrap_or_default(),
    };
    list.ok("config", format!("flags are valid; from {from} to {to}"));

    match &job.source {
        SourceConfig::BigQuery(options) => bigquery::check(options, &mut list).await,
        other => {
            list.skip("google", "the source is not BigQuery");
            local_source(other, &mut list).await;
        }
    }

    if job.dry_run.is_some() {
        list.skip("target", "--dry-run writes nothing (BQ2SFTP_TEST_MODE)");
        return list;
    }
    let target = match secrets(&job, &mut list).await {
        Some(target) => target,
        None => return list,
    };
    match &target {
        SinkConfig::Sftp(cfg) => sftp::check(cfg, &job.target_options, &mut list).await,
        SinkConfig::Dir(d) => local_dir(&d.path, &job.target_options, &mut list),
        SinkConfig::Null => list.skip("target", "null: discards everything; nothing to check"),
    }
    list
}

/// Fetches the target's `gcp-secret:` references (a line only when there are any); `None`
/// when one cannot be read, after failing the check and skipping the target's.
async fn secrets(job: &crate::Job, list: &mut Checklist) -> Option<SinkConfig> {
    let SinkConfig::Sftp(cfg) = &job.target else { return Some(job.target.clone()) };
    let references = cfg.gcp_references();
    if references.is_empty() {
        return Some(job.target.clone());
    }
    let shown = references.join(", ");
    // Like the BigQuery checks, two attempts: doctor answers in seconds, not minutes.
    let mut options = job.secret_manager.clone();
    options.auth.retry.max_attempts = options.auth.retry.max_attempts.min(2);
    match job.target.with_secrets(&options).await {
        Ok(target) => {
            list.ok("secrets", format!("read from Secret Manager: {shown}"));
            Some(target)
        }
        Err(e) => {
            let detail = e.to_string();
            let code = crate::Error::from(e).exit_code();
            list.fail(
                "secrets",
                detail,
                "make the secret readable by the job's account (roles/secretmanager.secretAccessor), \
                 correct its name, or pass the value another way (env:NAME, file:PATH)",
                code,
            );
            list.skip("target", "needs its secrets");
            None
        }
    }
}

fn config_failure(list: &mut Checklist, e: &ConfigError) {
    list.fail(
        "config",
        e.to_string(),
        "correct the flag, environment variable or job file key it names (`bq2sftp export --help` lists them)",
        exit::USAGE,
    );
    list.skip("source and target", "needs a valid configuration");
}

/// `bq2sftp doctor`: prints the checklist on stdout as it goes and returns the exit code.
pub async fn main(args: &DoctorArgs) -> u8 {
    let export = match args.export_args() {
        Ok(a) => a,
        Err(e) => {
            let mut list = Checklist::new(|c| println!("{c}"));
            config_failure(&mut list, &e);
            println!("{}", list.summary());
            return list.exit_code();
        }
    };
    let list = run(&export, |c| println!("{c}")).await;
    println!("{}", list.summary());
    list.exit_code()
}

/// Parquet files and the synthetic source: the plan opens them (file metadata only).
async fn local_source(source: &SourceConfig, list: &mut Checklist) {
    let name = "source";
    let planned = match source.build() {
        Ok(s) => s.plan().await,
        Err(e) => Err(e),
    };
    match planned {
        Ok(plan) => list.ok(
            name,
            format!(
                "{} is readable: {} column(s), {} stream(s)",
                plan.description.name,
                plan.schema.fields().len(),
                plan.streams.len()
            ),
        ),
        Err(e) => {
            let text = e.to_string();
            list.fail(
                name,
                text,
                "check the --from path and that this user can read it",
                crate::Error::from(e).exit_code(),
            )
        }
    }
}

/// A local target directory: exists (or will be created), and a probe file can be written.
/// Plain std::fs: a handful of metadata calls on a local disk, before any transfer.
fn local_dir(path: &Path, options: &TargetOptions, list: &mut Checklist) {
    const STEPS: &[&str] = &["dir: directory", "dir: writable"];
    let mut steps = Steps::new(list, STEPS);
    let shown = path.display().to_string();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => steps.ok(format!("{shown} exists")),
        Ok(_) => {
            return steps.fail(
                format!("{shown} is not a directory"),
                "point --to at a directory (dir:///path/to/dir)",
                exit::TARGET,
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && options.create_dirs => {
            steps.ok(format!("{shown} does not exist; the export creates it (--create-dirs)"));
            return steps.skip_rest("the directory does not exist yet");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return steps.fail(
                format!("{shown} does not exist"),
                format!("create it (`mkdir -p {shown}`) or pass --create-dirs"),
                exit::TARGET,
            );
        }
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::PermissionDenied { exit::AUTH } else { exit::TARGET };
            return steps.fail(
                format!("cannot open {shown}: {e}"),
                "check the path and its parents' permissions",
                code,
            );
        }
    }
    let probe = path.join(probe_name());
    let written = std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).and_then(|mut f| {
        std::io::Write::write_all(&mut f, PROBE_CONTENT).inspect_err(|_| {
            // Created but not written (disk full, quota): leave nothing behind.
            let _ = std::fs::remove_file(&probe);
        })
    });
    match written {
        Ok(()) => match std::fs::remove_file(&probe) {
            Ok(()) => steps.ok(format!("wrote and removed {}", probe.display())),
            Err(e) => steps.fail(
                format!("wrote {} but cannot remove it: {e}", probe.display()),
                "remove the probe file by hand and check the directory's permissions",
                exit::TARGET,
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => steps.fail(
            format!("permission denied: cannot create files in {shown}"),
            format!("make {shown} writable for this user (chown/chmod), or export to another directory"),
            exit::AUTH,
        ),
        Err(e) => {
            steps.fail(format!("cannot create files in {shown}: {e}"), "check the disk and the mount", exit::TARGET)
        }
    }
}

/// `.bq2sftp-doctor-<12 hex digits>`: unpredictable, so it never collides with a file of
/// an export or of a doctor running at the same time.
pub fn probe_name() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!(".bq2sftp-doctor-{}", &id[..12])
}

/// What a probe file holds.
pub const PROBE_CONTENT: &[u8] = b"bq2sftp doctor probe; safe to delete\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ExportArgs, ConfigError> {
        DoctorArgs { args: args.iter().map(OsString::from).collect() }.export_args()
    }

    #[test]
    fn flags_or_a_job_file_with_overrides() {
        let a = parse(&["--from", "synthetic://?rows=1", "--to", "null:", "--format", "ndjson"]).unwrap();
        assert_eq!((a.from.as_deref(), a.format.as_str()), (Some("synthetic://?rows=1"), "ndjson"));
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job.toml");
        std::fs::write(&job, "from = \"synthetic://?rows=1\"\nto = \"null:\"\nformat = \"ndjson\"\n").unwrap();
        let a = parse(&[job.to_str().unwrap(), "--format", "parquet"]).unwrap();
        assert_eq!(a.format, "parquet", "flags after the job file win");
        assert!(parse(&["--to", "null:"]).unwrap_err().to_string().contains("--from"));
    }

    #[test]
    fn a_failure_skips_the_steps_after_it_and_sets_the_exit_code() {
        let mut list = Checklist::new(|_| {});
        let mut steps = Steps::new(&mut list, &["a", "b", "c"]);
        steps.ok("fine");
        steps.fail("broken", "mend it", exit::AUTH);
        let lines: Vec<String> = list.checks.iter().map(ToString::to_string).collect();
        assert_eq!(lines, ["[ ok ] a: fine", "[FAIL] b: broken -> fix: mend it", "[skip] c: skipped: needs b"]);
        assert_eq!(list.exit_code(), exit::AUTH);
        assert!(list.summary().starts_with("doctor: 1 passed, 1 failed, 1 skipped"), "{}", list.summary());
    }

    #[tokio::test]
    async fn a_local_directory_missing_then_writable() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let to = format!("dir://{}", missing.display());
        let args = parse(&["--from", "synthetic://?rows=1", "--to", &to, "--no-state"]).unwrap();
        let list = run(&args, |_| {}).await;
        let text: Vec<String> = list.checks.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|l| l.starts_with("[FAIL] dir: directory:") && l.contains("--create-dirs")),
            "{text:?}"
        );
        assert!(text.iter().any(|l| l == "[skip] dir: writable: skipped: needs dir: directory"), "{text:?}");
        assert_eq!(list.exit_code(), exit::TARGET);

        std::fs::create_dir(&missing).unwrap();
        let list = run(&args, |_| {}).await;
        assert_eq!(list.exit_code(), exit::OK, "{:?}", list.checks);
        assert!(std::fs::read_dir(&missing).unwrap().next().is_none(), "the probe file is gone");
    }
}
