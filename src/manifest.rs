//! `_MANIFEST.json`: the record of what a job committed, written after every file.
//!
//! A consumer that finds the manifest knows every file it lists is complete: each entry has
//! the row count, byte size and SHA-256 computed while the bytes streamed out (no second read).
//! The manifest is the last file written (before the optional `_SUCCESS` marker), so its
//! presence means the export is whole.

use serde::{Deserialize, Serialize};

use crate::read::SourceDescription;

pub const DEFAULT_MANIFEST_NAME: &str = "_MANIFEST.json";
pub const DEFAULT_SUCCESS_NAME: &str = "_SUCCESS";

/// One committed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    /// The read stream the rows came from (0 in single-file mode).
    pub stream: usize,
    /// The file's number within its stream.
    pub seq: u64,
    pub rows: u64,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the file's bytes as committed.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub tool: String,
    pub source: SourceDescription,
    pub target: String,
    pub format: String,
    pub compression: String,
    pub started_at: String,
    pub finished_at: String,
    pub total_rows: u64,
    pub total_bytes: u64,
    pub total_files: usize,
    pub files: Vec<FileRecord>,
    /// Set in a shard's manifest (`bq2sftp export --plan … --shard I/N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::pipeline::Shard>,
    /// The plan's streams whose every row is in `files`.
    #[serde(default)]
    pub streams: Vec<usize>,
}

impl Manifest {
    pub const VERSION: u32 = 1;

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}
