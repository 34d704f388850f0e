//! The job state file: what an interrupted run had committed, so `--resume` can finish it.
//!
//! The rule (README, "Resume"): in per-stream mode every file holds a contiguous range of one
//! source stream's rows, and a stream's files are committed in order. So a stream's progress is
//! one number, the rows its committed files hold; a resumed run re-reads each unfinished stream
//! from that offset (the Storage Read API's `ReadRows.offset`, or the local sources' row
//! position) and continues the file numbering. The file that was in progress when the run died
//! is produced again from its first row and replaces any partial upload. Committed files are
//! never touched; every row ends up in exactly one file.
//!
//! The state is rewritten atomically (temporary file, fsync, rename) after every committed
//! file, so a crash at any point leaves either the old or the new state, never a torn one.
//! A crash between a file's rename and the state update means that file is produced again
//! with the same rows and replaces itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow_schema::Schema;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::manifest::FileRecord;
use crate::read::{ReadPlan, SourceDescription, StreamSpec};

/// Where state files go unless `--state-file` says otherwise (relative to the working directory).
pub const DEFAULT_STATE_DIR: &str = ".bq2sftp-state";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("state file {path}: {message}")]
    Io { path: String, message: String },
    #[error(
        "state file {path} belongs to a different job (its source, target or output options differ); remove it or point --state-file elsewhere"
    )]
    OtherJob { path: String },
    #[error("state file {path} is not a bq2sftp state file ({message}); remove it to start over")]
    Corrupt { path: String, message: String },
}

/// One stream's progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LaneState {
    /// Committed files, in order.
    pub files: Vec<FileRecord>,
    /// Rows of the stream those files hold: where a resumed read starts.
    pub rows: u64,
    /// Every row of the stream is committed.
    pub done: bool,
}

impl LaneState {
    pub fn next_seq(&self) -> u64 {
        self.files.last().map_or(0, |f| f.seq + 1)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobState {
    pub state_version: u32,
    /// Identifies the job (source, target, format, naming); see `PipelineOptions::fingerprint`.
    pub fingerprint: String,
    pub started_at: String,
    pub source: SourceDescription,
    /// The plan's Arrow schema as an IPC schema message, base64.
    pub schema: String,
    pub streams: Vec<StreamSpec>,
    pub estimated_rows: Option<u64>,
    pub lanes: BTreeMap<usize, LaneState>,
}

impl JobState {
    pub const VERSION: u32 = 1;

    pub fn new(fingerprint: String, started_at: String, plan: &ReadPlan) -> Self {
        JobState {
            state_version: Self::VERSION,
            fingerprint,
            started_at,
            source: plan.description.clone(),
            schema: encode_schema(&plan.schema),
            streams: plan.streams.clone(),
            estimated_rows: plan.estimated_rows,
            lanes: BTreeMap::new(),
        }
    }

    /// The plan the interrupted run was reading.
    pub fn plan(&self, path: &Path) -> Result<ReadPlan, StateError> {
        let schema = decode_schema(&self.schema)
            .map_err(|message| StateError::Corrupt { path: path.display().to_string(), message })?;
        Ok(ReadPlan {
            schema: Arc::new(schema),
            streams: self.streams.clone(),
            estimated_rows: self.estimated_rows,
            description: self.source.clone(),
        })
    }
}

/// An Arrow schema as a base64 IPC schema message (field metadata included).
pub fn encode_schema(schema: &Schema) -> String {
    let data = arrow_ipc::writer::IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
        schema,
        &mut arrow_ipc::writer::DictionaryTracker::new(false),
        &arrow_ipc::writer::IpcWriteOptions::default(),
    );
    base64::engine::general_purpose::STANDARD.encode(&data.ipc_message)
}

/// The inverse of [`encode_schema`].
pub fn decode_schema(text: &str) -> Result<Schema, String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| e.to_string())?;
    arrow_ipc::convert::try_schema_from_flatbuffer_bytes(&bytes).map_err(|e| e.to_string())
}

/// The state of a running job and the file it lives in.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    state: Mutex<JobState>,
}

impl StateStore {
    /// Loads the state at `path`, if there is one.
    pub fn load(path: &Path, fingerprint: &str) -> Result<Option<JobState>, StateError> {
        let shown = || path.display().to_string();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Io { path: shown(), message: e.to_string() }),
        };
        let state: JobState = serde_json::from_slice(&bytes)
            .map_err(|e| StateError::Corrupt { path: shown(), message: e.to_string() })?;
        if state.state_version != JobState::VERSION {
            return Err(StateError::Corrupt { path: shown(), message: format!("version {}", state.state_version) });
        }
        if state.fingerprint != fingerprint {
            return Err(StateError::OtherJob { path: shown() });
        }
        Ok(Some(state))
    }

    pub fn new(path: PathBuf, state: JobState) -> Self {
        StateStore { path, state: Mutex::new(state) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn snapshot(&self) -> JobState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a committed file and persists the state.
    pub fn commit_file(&self, lane: usize, record: &FileRecord) -> Result<(), StateError> {
        let mut state = self.lock();
        let lane = state.lanes.entry(lane).or_default();
        lane.rows += record.rows;
        lane.files.push(record.clone());
        write_atomically(&self.path, &state)
    }

    /// Marks a lane complete and persists the state.
    pub fn finish_lane(&self, lane: usize) -> Result<(), StateError> {
        let mut state = self.lock();
        state.lanes.entry(lane).or_default().done = true;
        write_atomically(&self.path, &state)
    }

    /// Writes the current state (the start of a job).
    pub fn save(&self) -> Result<(), StateError> {
        write_atomically(&self.path, &self.lock())
    }

    /// The job finished: nothing is left to resume.
    pub fn remove(&self) -> Result<(), StateError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StateError::Io { path: self.path.display().to_string(), message: e.to_string() })
            }
            _ => Ok(()),
        }
    }
}

fn write_atomically(path: &Path, state: &JobState) -> Result<(), StateError> {
    let io = |e: std::io::Error| StateError::Io { path: path.display().to_string(), message: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::Source;
    use crate::read::synthetic::{SyntheticOptions, SyntheticSource};

    #[tokio::test]
    async fn state_round_trips_the_plan_and_rejects_other_jobs() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s/state.json");
        let plan = SyntheticSource::new(SyntheticOptions { streams: 3, ..Default::default() }).plan().await.unwrap();
        let store = StateStore::new(path.clone(), JobState::new("job-a".into(), "now".into(), &plan));
        store.save().unwrap();
        let record = FileRecord { name: "f".into(), stream: 1, seq: 0, rows: 10, bytes: 5, sha256: "x".into() };
        store.commit_file(1, &record).unwrap();
        store.finish_lane(2).unwrap();
        let loaded = StateStore::load(&path, "job-a").unwrap().unwrap();
        assert_eq!(loaded.lanes[&1].rows, 10);
        assert_eq!(loaded.lanes[&1].next_seq(), 1);
        assert!(loaded.lanes[&2].done);
        let back = loaded.plan(&path).unwrap();
        assert_eq!(back.schema, plan.schema, "schema incl. metadata survives");
        assert_eq!(back.streams, plan.streams);
        assert!(matches!(StateStore::load(&path, "job-b"), Err(StateError::OtherJob { .. })));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(StateStore::load(&path, "job-a"), Err(StateError::Corrupt { .. })));
        assert!(StateStore::load(&tmp.path().join("none.json"), "job-a").unwrap().is_none());
    }
}
