//! Shared test support: the sink conformance suite and small helpers for running the binary.
#![allow(dead_code)]

pub mod conformance;
pub mod google;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `bq2sftp` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bq2sftp"))
}

/// Runs `bq2sftp ARGS` and returns its output.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("BQ2SFTP_LOG", "warn").output().expect("the binary runs")
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
