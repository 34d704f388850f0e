//! Targets: where encoded files go.
//!
//! [`Sink`] and [`Upload`] are shaped like object_store's `ObjectStore::put_multipart` and
//! `MultipartUpload`: `create(name)` starts an upload, `put_part` streams chunks in order,
//! `complete` publishes the file atomically under its final name, `abort` removes every trace.
//! A consumer polling the target never sees a half file: uploads go to `NAME.partial` and are
//! renamed into place once their size is verified.
//!
//! Registry: [`SinkConfig::parse`] maps a `--to` URL to a config; `build()` makes the sink.

pub mod dir;
pub mod null;
pub mod sftp;

use std::sync::Arc;

use bytes::Bytes;

use crate::error::ConfigError;

/// What to do when the final name already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Refuse (the default: never clobber a file someone may be reading).
    Create,
    /// Replace it atomically.
    Overwrite,
}

#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Where files go, for logs and the manifest. Never includes secrets.
    fn describe(&self) -> String;

    /// Checks the target before any row is read: reachable, a directory, writable.
    async fn check(&self) -> Result<(), WriteError>;

    /// Whether a committed file of this name exists.
    async fn exists(&self, name: &str) -> Result<bool, WriteError>;

    /// Starts uploading `name`. Nothing is visible under `name` until [`Upload::complete`].
    async fn create(&self, name: &str, mode: PutMode) -> Result<Box<dyn Upload>, WriteError>;

    /// Reads a small committed file back (a shard's manifest), or `None` when it does not exist.
    async fn get(&self, name: &str) -> Result<Option<Bytes>, WriteError> {
        let _ = name;
        Err(WriteError::Other { target: self.describe(), message: "this target cannot read files back".into() })
    }
}

#[async_trait::async_trait]
pub trait Upload: Send {
    /// Appends the next chunk. Returns once the chunk is accepted (it may still be in flight).
    async fn put_part(&mut self, data: Bytes) -> Result<(), WriteError>;

    /// Makes every chunk durable, checks the size and publishes the file under its name.
    /// Returns the committed size in bytes.
    async fn complete(self: Box<Self>) -> Result<u64, WriteError>;

    /// Removes the partial file.
    async fn abort(self: Box<Self>) -> Result<(), WriteError>;
}

/// A `--to` URL, parsed but not yet connected.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SinkConfig {
    Dir(dir::DirOptions),
    Null,
    Sftp(Box<sftp::SftpConfig>),
}

impl SinkConfig {
    /// Parses `dir:///abs/path`, `dir://relative/path`, `null:`, `sftp://user@host[:port]/dir`
    /// (`sftp:` alone takes everything from flags and the environment).
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        if url == "null:" || url == "null://" || url == "null" {
            return Ok(SinkConfig::Null);
        }
        if url == "sftp:" || url.starts_with("sftp://") {
            return Ok(SinkConfig::Sftp(Box::new(sftp::SftpConfig::from_url(url)?)));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(ConfigError::invalid(
                format!("--to {url}"),
                "not a target URL; use dir:///path, sftp://user@host/dir or null:",
            ));
        };
        match scheme {
            "dir" | "file" => Ok(SinkConfig::Dir(dir::DirOptions::new(rest)?)),
            other => Err(ConfigError::invalid(
                format!("--to {url}"),
                format!("unknown target scheme '{other}://'; supported: dir://, sftp://, null:"),
            )),
        }
    }

    /// This target with its `gcp-secret:` references replaced by the secrets they name
    /// (fetched from Secret Manager once each); other targets hold no secrets.
    pub async fn with_secrets(
        &self,
        options: &crate::secret::SecretManagerOptions,
    ) -> Result<SinkConfig, crate::secret::SecretError> {
        let SinkConfig::Sftp(cfg) = self else { return Ok(self.clone()) };
        if cfg.gcp_references().is_empty() {
            return Ok(self.clone());
        }
        let manager = crate::secret::SecretManager::new(options);
        let mut cfg = cfg.clone();
        for slot in cfg.secrets_mut() {
            if let Some(value) = slot.as_ref() {
                *slot = Some(manager.resolve(value).await?);
            }
        }
        Ok(SinkConfig::Sftp(cfg))
    }

    pub fn build(&self, options: &TargetOptions) -> Result<Arc<dyn Sink>, WriteError> {
        Ok(match self {
            SinkConfig::Dir(o) => Arc::new(dir::DirSink::new(o.clone(), options.clone())),
            SinkConfig::Null => Arc::new(null::NullSink::default()),
            SinkConfig::Sftp(c) => Arc::new(sftp::SftpSink::new((**c).clone(), options.clone())?),
        })
    }
}

/// Behaviour every sink honours, set by flags rather than by the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOptions {
    /// Create the target directory (and parents) when missing.
    pub create_dirs: bool,
    /// Suffix of in-progress uploads.
    pub partial_suffix: String,
}

pub const DEFAULT_PARTIAL_SUFFIX: &str = ".partial";

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions { create_dirs: false, partial_suffix: DEFAULT_PARTIAL_SUFFIX.to_string() }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("target directory {path} does not exist; create it or pass --create-dirs")]
    DirMissing { path: String },
    #[error("target {path} is not a directory")]
    NotADirectory { path: String },
    #[error("permission denied: cannot {op} {path}; check the directory's owner and mode")]
    PermissionDenied { op: &'static str, path: String },
    #[error("cannot {op} {path}: {source}")]
    Io { op: &'static str, path: String, source: std::io::Error },
    #[error(
        "{path} already exists; pass --overwrite to replace it, or write elsewhere (another directory or --prefix)"
    )]
    Exists { path: String },
    #[error("{path}: uploaded {actual} bytes but {expected} were sent; the file was not published")]
    SizeMismatch { path: String, expected: u64, actual: u64 },
    #[error("{target}: {message}")]
    Other { target: String, message: String },
    #[error("remote directory {path} not found or not a directory; create it, correct the path, or pass --create-dirs")]
    RemoteDirMissing { path: String },
    /// The server's host key is unknown or does not match: refused before authenticating.
    #[error("sftp: {target}: {message}")]
    HostKey { target: String, message: String },
    #[error("sftp: authentication failed on {target}: {message}")]
    Auth { target: String, message: String },
    #[error("sftp: cannot connect to {target} ({attempts} attempt(s)): {message}")]
    Connect { target: String, attempts: u32, message: String },
    #[error(
        "sftp: {target}: no {kind} algorithm in common; we offer {ours}; the server offers {theirs}. Pass {flag} with one the server offers"
    )]
    Negotiation { target: String, kind: &'static str, ours: String, theirs: String, flag: &'static str },
    /// The connection dropped and could not be restored within the retry budget. The partial
    /// file is kept: a later run can resume.
    #[error(
        "sftp: connection to {target} lost while writing {path} (acknowledged up to byte {offset}) and not restored after {attempts} attempt(s): {message}; committed files are intact, run again to finish"
    )]
    ConnectionLost { target: String, path: String, offset: u64, attempts: u32, message: String },
    /// An SFTP status the operation cannot live with; the code is shown as a number too.
    #[error("cannot {op} {path}: the server answered {status}")]
    Remote { op: &'static str, path: String, code: u32, status: String },
    #[error(
        "cannot write {path} at offset {offset}: the server answered {status}; OpenSSH reports a full disk or exhausted quota this way. The partial file is kept ({kept} bytes acknowledged)"
    )]
    WriteFailed { path: String, offset: u64, status: String, kept: u64 },
    #[error("{path}: sha256 on the server is {remote} but the bytes sent hash to {local}; the file was not published")]
    DigestMismatch { path: String, local: String, remote: String },
}

impl WriteError {
    pub fn is_permission(&self) -> bool {
        match self {
            WriteError::PermissionDenied { .. } | WriteError::HostKey { .. } | WriteError::Auth { .. } => true,
            WriteError::Io { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            _ => false,
        }
    }

    /// A transient failure a later run can finish: the connection was lost past the retry
    /// budget (committed files are intact, the partial file is kept).
    pub fn is_resumable(&self) -> bool {
        matches!(self, WriteError::ConnectionLost { .. })
    }

    /// An I/O error, turned into [`WriteError::PermissionDenied`] when that is what it was.
    pub fn io(op: &'static str, path: impl Into<String>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            WriteError::PermissionDenied { op, path }
        } else {
            WriteError::Io { op, path, source }
        }
    }
}
