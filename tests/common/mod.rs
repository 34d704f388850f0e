//! Shared test support: the sink conformance suite and small helpers for running the binary.
#![allow(dead_code)]

pub mod conformance;
pub mod google;
pub mod oidc;
pub mod proxy;
pub mod pushgateway;
pub mod secretmanager;
pub mod sshd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `bq2sftp` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bq2sftp"))
}

/// Runs `bq2sftp ARGS` (in the temp directory, where default state files then land) and
/// returns its output.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("BQ2SFTP_LOG", "warn")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("the binary runs")
}

/// The binary run in `home` with a clean environment: no developer `SFTP_*` or Google
/// variables, `HOME` there (no gcloud file, no known_hosts), the metadata host on a closed
/// loopback port, quiet logs.
pub fn clean_command(home: &Path) -> Command {
    let mut c = Command::new(bin());
    c.current_dir(home)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("GCE_METADATA_HOST", "127.0.0.1:9")
        .env("BQ2SFTP_LOG", "warn");
    c
}

/// [`clean_command`] with the emulator as the only BigQuery there is.
pub fn emulator_command(home: &Path, emulator: &str) -> Command {
    let mut c = clean_command(home);
    c.env("BIGQUERY_EMULATOR_HOST", emulator);
    c
}

/// Runs `bq2sftp ARGS` in a fresh temp `HOME` with a clean environment plus `env`.
pub async fn run_clean(args: &[&str], env: &[(&str, &str)]) -> Output {
    let home = tempfile::tempdir().expect("temp dir");
    let mut cmd = tokio::process::Command::from(clean_command(home.path()));
    cmd.args(args).envs(env.iter().copied());
    cmd.output().await.expect("the binary runs")
}

/// Names of the regular files in `dir`, sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Builds a job from `export` flags, as the CLI would.
pub fn job(args: &[&str]) -> bq2sftp::Job {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        export: bq2sftp::cli::ExportArgs,
    }
    // Tests that are not about resuming keep no state file (it would land in the source tree).
    let stateful = args.iter().any(|a| a.starts_with("--state-file") || *a == "--resume");
    let extra = if stateful { None } else { Some("--no-state") };
    Wrapper::try_parse_from(std::iter::once("bq2sftp").chain(args.iter().copied()).chain(extra))
        .expect("flags parse")
        .export
        .to_job()
        .expect("flags are valid")
}

/// The bytes of `path`, gunzipped / unzstded according to its extension.
pub fn decompressed(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let raw = std::fs::read(path).unwrap();
    let name = path.to_string_lossy();
    if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).unwrap();
        out
    } else if name.ends_with(".zst") {
        zstd::stream::decode_all(&raw[..]).unwrap()
    } else {
        raw
    }
}

/// Parses CSV text (with header) into records.
pub fn csv_records(data: &[u8]) -> Vec<csv::StringRecord> {
    csv::ReaderBuilder::new().has_headers(true).from_reader(data).records().map(|r| r.unwrap()).collect()
}

/// The manifest in `dir`.
pub fn manifest(dir: &Path) -> bq2sftp::manifest::Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("_MANIFEST.json")).expect("manifest exists")).unwrap()
}

/// Checks every manifest entry against the file on disk (size and SHA-256) and that the
/// manifest lists exactly the data files present.
pub fn assert_manifest_matches(dir: &Path) -> bq2sftp::manifest::Manifest {
    let m = manifest(dir);
    for f in &m.files {
        let bytes = std::fs::read(dir.join(&f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.bytes, "{}", f.name);
        assert_eq!(sha256_hex(&bytes), f.sha256, "{}", f.name);
    }
    let mut listed: Vec<String> = m.files.iter().map(|f| f.name.clone()).collect();
    listed.sort();
    let present: Vec<String> = files_in(dir).into_iter().filter(|n| !n.starts_with('_')).collect();
    assert_eq!(listed, present);
    assert_eq!(m.total_rows, m.files.iter().map(|f| f.rows).sum::<u64>());
    m
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The value of the first sample of `metric` whose labels include every `labels` pair.
pub fn sample(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (name_labels, value) = line.rsplit_once(' ')?;
        let (name, rest) = name_labels.split_once('{').unwrap_or((name_labels, ""));
        if name != metric || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}
