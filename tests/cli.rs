//! The binary as a user runs it: the end-to-end export, the demo, and every bad input
//! with its one-line error, its documented exit code, and no half file left behind.

mod common;

use std::path::Path;

use bq2sftp::exit;
use common::*;

fn to(dir: &Path) -> String {
    format!("dir://{}", dir.display())
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the binary and checks the exit code and that stderr mentions every `needles`.
fn expect_failure(args: &[&str], code: u8, needles: &[&str]) -> String {
    let out = run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code as i32), "exit code for {args:?}; stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn gzip_csv_export_of_a_million_rows_is_exact_and_matches_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&[
        "export",
        "--from",
        "synthetic://?rows=1000000&streams=4&flat=true",
        "--to",
        &to(tmp.path()),
        "--format",
        "csv",
        "--compression",
        "gzip",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("exported 1,000,000 rows"), "{}", stderr(&out));
    let m = assert_manifest_matches(tmp.path());
    let mut rows = 0;
    for f in &m.files {
        let data = decompressed(&tmp.path().join(&f.name));
        let n = csv_records(&data).len() as u64;
        assert_eq!(n, f.rows);
        rows += n;
    }
    assert_eq!(rows, 1_000_000);
    assert_eq!(m.total_rows, 1_000_000);
}

#[test]
fn demo_writes_files_a_manifest_and_a_success_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = run(&["demo", "--out", dir.to_str().unwrap(), "--rows", "20000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.join("_SUCCESS").exists());
    let m = assert_manifest_matches(&dir);
    assert_eq!(m.total_rows, 20_000);
    // Running the demo again replaces its own output.
    assert!(run(&["demo", "--out", dir.to_str().unwrap(), "--rows", "100"]).status.success());
}

#[test]
fn help_shows_examples_and_exit_codes() {
    let out = run(&["export", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in ["--from", "--to", "--format", "--compression", "Examples:", "Exit codes:", "--max-file-bytes"] {
        assert!(text.contains(needle), "help lacks {needle}");
    }
}

#[test]
fn usage_errors_exit_2_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let t = to(tmp.path());
    expect_failure(
        &["export", "--from", "synthetic://?rows=10", "--to", &t, "--format", "xml"],
        exit::USAGE,
        &["unknown format", "csv"],
    );
    expect_failure(
        &["export", "--from", "mysql://db/table", "--to", &t],
        exit::USAGE,
        &["unknown source scheme", "synthetic://"],
    );
    expect_failure(
        &["export", "--from", "synthetic://?rows=10", "--to", "s3://bucket"],
        exit::USAGE,
        &["unknown target scheme"],
    );
    expect_failure(
        &["export", "--from", "synthetic://?rows=10", "--to", &t, "--name-template", "{prefix}-{colour}"],
        exit::USAGE,
        &["unknown placeholder '{colour}'"],
    );
    expect_failure(
        &["export", "--from", "synthetic://?rows=10", "--to", &t, "--compression", "gzip", "--compression-level", "99"],
        exit::USAGE,
        &["out of range"],
    );
    expect_failure(&["export", "--from", "synthetic://?rows=ten", "--to", &t], exit::USAGE, &["rows"]);
    expect_failure(
        &["export", "--from", "synthetic://?rows=10", "--to", &t, "--max-file-bytes", "big"],
        exit::USAGE,
        &["not a size"],
    );
    // clap's own usage errors use the same code.
    expect_failure(&["export", "--from", "synthetic://"], exit::USAGE, &["--to"]);
    assert_eq!(files_in(tmp.path()), Vec::<String>::new());
}

#[test]
fn nested_columns_in_csv_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    expect_failure(
        &["export", "--from", "synthetic://?rows=100", "--to", &to(tmp.path())],
        exit::USAGE,
        &["int64_list", "--csv-nested json"],
    );
    assert_eq!(files_in(tmp.path()), Vec::<String>::new());
    let out = run(&["export", "--from", "synthetic://?rows=100", "--to", &to(tmp.path()), "--csv-nested", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn target_problems_name_the_directory_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    expect_failure(
        &["export", "--from", "synthetic://?rows=10&flat=true", "--to", &to(&missing)],
        exit::TARGET,
        &["does not exist", "--create-dirs"],
    );
    let out = run(&["export", "--from", "synthetic://?rows=10&flat=true", "--to", &to(&missing), "--create-dirs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Root ignores mode bits, but nobody may create files in sysfs.
    expect_failure(
        &["export", "--from", "synthetic://?rows=10&flat=true", "--to", "dir:///sys"],
        exit::AUTH,
        &["permission denied", "/sys"],
    );
}

#[test]
fn existing_files_are_refused_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["export", "--from", "synthetic://?rows=10&flat=true", "--to", &to(tmp.path())];
    assert!(run(&args).status.success());
    expect_failure(&args, exit::USAGE, &["already exists", "--overwrite"]);
    assert!(run(&[&args[..], &["--overwrite"]].concat()).status.success());
}

#[test]
fn a_corrupt_parquet_file_is_a_source_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.parquet");
    std::fs::write(&bad, b"PAR1 this is not really parquet at all PAR1").unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let from = format!("parquet://{}", bad.display());
    expect_failure(
        &["export", "--from", &from, "--to", &to(&out_dir)],
        exit::SOURCE,
        &["broken.parquet", "not a readable Parquet file"],
    );
    assert_eq!(files_in(&out_dir), Vec::<String>::new());
    let empty_dir = tmp.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let from = format!("parquet://{}", empty_dir.display());
    expect_failure(&["export", "--from", &from, "--to", &to(&out_dir)], exit::SOURCE, &["no *.parquet files"]);
}

#[test]
fn zero_rows_write_one_header_only_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out =
        run(&["export", "--from", "synthetic://?rows=0&flat=true", "--to", &to(tmp.path()), "--compression", "gzip"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = assert_manifest_matches(tmp.path());
    assert_eq!(m.files.len(), 1);
    let text = decompressed(&tmp.path().join(&m.files[0].name));
    assert!(text.starts_with(b"id,int64_col,") && text.iter().filter(|&&b| b == b'\n').count() == 1);
}

#[test]
fn a_killed_export_resumed_writes_every_row_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let state = tmp.path().join("state.json");
    let rows = 1_500_000u64;
    let from = format!("synthetic://?rows={rows}&streams=3&flat=true");
    let args = [
        "export",
        "--from",
        &from,
        "--to",
        &to(&out),
        "--compression",
        "gzip",
        "--max-file-rows",
        "50000",
        "--state-file",
        state.to_str().unwrap(),
    ];
    let mut child = std::process::Command::new(bin()).args(args).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill it (SIGKILL: no cleanup at all) once a few files are committed.
    let committed = |d: &Path| files_in(d).iter().filter(|n| n.ends_with(".csv.gz")).count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while committed(&out) < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the export finished before it could be killed");
        assert!(std::time::Instant::now() < deadline, "no file committed in time");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(state.exists(), "the killed run left its state");
    assert!(!out.join("_MANIFEST.json").exists());

    let out_run = run(&[&args[..], &["--resume"]].concat());
    assert!(out_run.status.success(), "{}", stderr(&out_run));
    let m = assert_manifest_matches(&out);
    let mut ids = Vec::with_capacity(rows as usize);
    for f in &m.files {
        let records = csv_records(&decompressed(&out.join(&f.name)));
        assert_eq!(records.len() as u64, f.rows, "{}", f.name);
        ids.extend(records.iter().map(|r| r[0].parse::<u64>().unwrap()));
    }
    ids.sort_unstable();
    assert_eq!(ids.len() as u64, rows);
    assert!(ids.iter().copied().eq(0..rows), "every row exactly once");
    assert!(!files_in(&out).iter().any(|n| n.ends_with(".partial")));
}

#[test]
fn job_files_run_with_flags_over_environment_over_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let job = tmp.path().join("nightly.toml");
    std::fs::write(
        &job,
        format!(
            "# nightly export\nfrom = \"synthetic://?rows=300&flat=true\"\nto = \"{}\"\nformat = \"ndjson\"\nprefix = \"orders\"\nsuccess_marker = true\n",
            to(&out)
        ),
    )
    .unwrap();
    let job = job.to_str().unwrap();
    let ran = run(&["run", job]);
    assert!(ran.status.success(), "{}", stderr(&ran));
    assert!(out.join("orders-000-00000.json").exists() && out.join("_SUCCESS").exists(), "{:?}", files_in(&out));

    // The environment beats the file, a flag beats both.
    let show = |env: Option<&str>, flags: &[&str]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["run", job]).args(flags).arg("--print-config");
        if let Some(v) = env {
            cmd.env("BQ2SFTP_FORMAT", v);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    assert!(show(None, &[]).contains("format = \"ndjson\"  # job file"));
    assert!(show(Some("parquet"), &[]).contains("format = \"parquet\"  # environment"));
    assert!(show(Some("parquet"), &["--format", "csv"]).contains("format = \"csv\"  # flag"));
    assert!(show(None, &[]).contains("max-file-bytes = \"1GiB\"  # default"));
    // The binary's global flags may follow the subcommand and its job file.
    assert!(show(None, &["-v", "--log-format", "json"]).contains("format = \"ndjson\"  # job file"));

    // A bad job file fails before anything runs, naming the file and the key.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "from = \"synthetic://?rows=1\"\nto = \"null:\"\nformmat = \"csv\"\n").unwrap();
    expect_failure(&["run", bad.to_str().unwrap()], exit::USAGE, &["bad.toml", "unknown key 'formmat'"]);
    expect_failure(&["run", "/nonexistent/job.toml"], exit::USAGE, &["cannot read it"]);
}

#[test]
fn print_config_validates_and_masks_nothing_it_should_not() {
    let out =
        run(&["export", "--from", "synthetic://?rows=1", "--to", "null:", "--compression", "zstd", "--print-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("compression = \"zstd\"  # flag") && text.contains("to = \"null:\"  # flag"), "{text}");
    let out = run(&[
        "export",
        "--from",
        "synthetic://?rows=1",
        "--to",
        "null:",
        "--print-config",
        "-vv",
        "--log-format=json",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("to = \"null:\"  # flag"), "{}", stderr(&out));
    expect_failure(
        &["export", "--from", "synthetic://?rows=1", "--to", "null:", "--format", "xml", "--print-config"],
        exit::USAGE,
        &["unknown format"],
    );
}

#[test]
fn dry_run_reads_and_encodes_but_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "export",
        "--from",
        "synthetic://?rows=5000&streams=2&flat=true",
        "--to",
        &to(tmp.path()),
        "--compression",
        "gzip",
    ];
    let out = run(&[&args[..], &["--dry-run"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("dry run: nothing was written") && err.contains("synthetic-001-00000.csv.gz"), "{err}");
    assert!(err.contains("exported 5,000 rows"), "{err}");
    assert_eq!(files_in(tmp.path()), Vec::<String>::new());
    // The seed guide's TEST_MODE, as an environment variable.
    let o = std::process::Command::new(bin())
        .args(args)
        .env("BQ2SFTP_TEST_MODE", "true")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success() && stderr(&o).contains("dry run"), "{}", stderr(&o));
    assert_eq!(files_in(tmp.path()), Vec::<String>::new());
    let o = std::process::Command::new(bin())
        .args(args)
        .arg("--no-state")
        .env("BQ2SFTP_TEST_MODE", "false")
        .output()
        .unwrap();
    assert!(o.status.success() && !stderr(&o).contains("dry run"));
    assert!(tmp.path().join("_MANIFEST.json").exists(), "false means a real run");
}
