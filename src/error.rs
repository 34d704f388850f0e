//! The crate's top-level error and the exit codes a scheduler sees.
//!
//! Each stage has its own error enum with the context that stage knows (which file, which
//! stream, which column); this module only gathers them and decides which documented exit code
//! a failure maps to, so `main.rs` never has to guess from message text.

use crate::encode::EncodeError;
use crate::read::ReadError;
use crate::write::WriteError;

/// Exit codes, documented in the README. Schedulers branch on these, so they never change meaning.
pub mod exit {
    /// The job finished and everything it announced is committed.
    pub const OK: u8 = 0;
    /// A bug: an unexpected internal failure. Please report it.
    pub const INTERNAL: u8 = 1;
    /// Usage or configuration error: fix the flags, job file or input and run again.
    pub const USAGE: u8 = 2;
    /// Authentication or permission denied (BigQuery, SFTP or a local target).
    pub const AUTH: u8 = 3;
    /// The source failed (BigQuery, a Parquet file).
    pub const SOURCE: u8 = 4;
    /// The target failed (SFTP server, local directory).
    pub const TARGET: u8 = 5;
    /// Interrupted; committed files are intact and `--resume` can finish the job.
    pub const RESUMABLE: u8 = 6;
}

/// A configuration problem found before any I/O: the job never started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{what}: {problem}")]
    Invalid { what: String, problem: String },
}

impl ConfigError {
    pub fn invalid(what: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid { what: what.into(), problem: problem.into() }
    }
}

/// Everything `bq2sftp::run` can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    /// The job was cancelled (signal, or another part of the job failed first).
    #[error("interrupted: {0}; files committed so far are intact")]
    Interrupted(String),
    /// A worker task died; this is a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The documented process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => exit::USAGE,
            Error::Read(e) if e.is_permission() => exit::AUTH,
            Error::Read(e) if e.is_resumable() => exit::RESUMABLE,
            Error::Read(e) if e.is_usage() => exit::USAGE,
            Error::Read(_) => exit::SOURCE,
            Error::Encode(e) if e.is_schema_problem() => exit::USAGE,
            Error::Encode(_) => exit::SOURCE,
            Error::Write(e) if e.is_permission() => exit::AUTH,
            Error::Write(e) if e.is_resumable() => exit::RESUMABLE,
            // Output from an earlier run is there: a decision for the operator (--overwrite,
            // another target), not a fault of the target.
            Error::Write(WriteError::Exists { .. }) => exit::USAGE,
            Error::Write(_) => exit::TARGET,
            Error::State(_) => exit::USAGE,
            Error::Secret(e) if e.is_usage() => exit::USAGE,
            Error::Secret(e) if e.is_transient() => exit::RESUMABLE,
            Error::Secret(_) => exit::AUTH,
            Error::Interrupted(_) => exit::RESUMABLE,
            Error::Internal(_) => exit::INTERNAL,
        }
    }
}
