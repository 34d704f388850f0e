//! `dir:///path`: a local directory, published the way a careful uploader publishes.
//!
//! Each file is written to `NAME.partial`, fsynced, then linked to `NAME` (which fails if
//! `NAME` exists, so nothing is clobbered unless `--overwrite`) or renamed over it when
//! overwriting; the directory is fsynced so the new name survives a crash. A reader of the
//! directory sees either no file or the whole file. File I/O runs on tokio's blocking pool.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{PutMode, Sink, TargetOptions, Upload, WriteError};
use crate::error::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirOptions {
    pub path: PathBuf,
}

impl DirOptions {
    /// Takes what follows `dir://`: an absolute (`/data/out`) or relative (`out`) path.
    pub fn new(rest: &str) -> Result<Self, ConfigError> {
        if rest.is_empty() {
            return Err(ConfigError::invalid(
                "--to dir://",
                "missing path; use dir:///absolute/path or dir://relative/path",
            ));
        }
        Ok(DirOptions { path: PathBuf::from(rest) })
    }
}

pub struct DirSink {
    root: PathBuf,
    target: TargetOptions,
}

impl DirSink {
    pub fn new(options: DirOptions, target: TargetOptions) -> Self {
        DirSink { root: options.path, target }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WriteError> + Send + 'static,
) -> Result<T, WriteError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WriteError::Other { target: "dir".into(), message: format!("file worker failed: {e}") })?
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

#[async_trait::async_trait]
impl Sink for DirSink {
    fn describe(&self) -> String {
        format!("dir://{}", self.root.display())
    }

    async fn check(&self) -> Result<(), WriteError> {
        let root = self.root.clone();
        let create = self.target.create_dirs;
        blocking(move || {
            match std::fs::metadata(&root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(WriteError::NotADirectory { path: shown(&root) }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !create {
                        return Err(WriteError::DirMissing { path: shown(&root) });
                    }
                    std::fs::create_dir_all(&root).map_err(|e| WriteError::io("create directory", shown(&root), e))?;
                }
                Err(e) => return Err(WriteError::io("open directory", shown(&root), e)),
            }
            // Permission bits do not tell the whole story (read-only mounts, ACLs): try it.
            let probe = root.join(format!(".bq2sftp-probe-{}", std::process::id()));
            File::create(&probe).map_err(|e| WriteError::io("write into directory", shown(&root), e))?;
            let _ = std::fs::remove_file(&probe);
            Ok(())
        })
        .await
    }

    async fn exists(&self, name: &str) -> Result<bool, WriteError> {
        let path = self.path(name);
        blocking(move || match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(WriteError::io("stat", shown(&path), e)),
        })
        .await
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, WriteError> {
        let path = self.path(name);
        blocking(move || match std::fs::read(&path) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(WriteError::io("read", shown(&path), e)),
        })
        .await
    }

    async fn create(&self, name: &str, mode: PutMode) -> Result<Box<dyn Upload>, WriteError> {
        let final_path = self.path(name);
        let partial = self.path(&format!("{name}{}", self.target.partial_suffix));
        let (fp, pp) = (final_path.clone(), partial.clone());
        let file = blocking(move || {
            if mode == PutMode::Create && fp.exists() {
                return Err(WriteError::Exists { path: shown(&fp) });
            }
            // A stale partial from an earlier crashed run is ours to replace.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&pp)
                .map_err(|e| WriteError::io("create", shown(&pp), e))
        })
        .await?;
        Ok(Box::new(DirUpload { file: Some(file), partial, final_path, mode, bytes: 0, done: false }))
    }
}

struct DirUpload {
    file: Option<File>,
    partial: PathBuf,
    final_path: PathBuf,
    mode: PutMode,
    bytes: u64,
    /// Completed or aborted: nothing left for `Drop` to clean up.
    done: bool,
}

#[async_trait::async_trait]
impl Upload for DirUpload {
    async fn put_part(&mut self, data: Bytes) -> Result<(), WriteError> {
        let Some(mut file) = self.file.take() else {
            return Err(WriteError::Other {
                target: shown(&self.partial),
                message: "write after a failed write".into(),
            });
        };
        let path = self.partial.clone();
        let len = data.len() as u64;
        let file = blocking(move || {
            file.write_all(&data).map_err(|e| WriteError::io("write", shown(&path), e))?;
            Ok(file)
        })
        .await?;
        self.file = Some(file);
        self.bytes += len;
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> Result<u64, WriteError> {
        let file = self.file.take();
        let (partial, final_path, mode, expected) =
            (self.partial.clone(), self.final_path.clone(), self.mode, self.bytes);
        blocking(move || {
            let file = file.ok_or_else(|| WriteError::Other {
                target: shown(&partial),
                message: "complete after a failed write".into(),
            })?;
            file.sync_all().map_err(|e| WriteError::io("fsync", shown(&partial), e))?;
            let actual = file.metadata().map_err(|e| WriteError::io("stat", shown(&partial), e))?.len();
            drop(file);
            if actual != expected {
                return Err(WriteError::SizeMismatch { path: shown(&partial), expected, actual });
            }
            publish(&partial, &final_path, mode)?;
            if let Some(dir) = final_path.parent() {
                // Make the rename durable; not every filesystem lets a directory be fsynced.
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        })
        .await?;
        self.done = true;
        Ok(expected)
    }

    async fn abort(mut self: Box<Self>) -> Result<(), WriteError> {
        self.file.take();
        let partial = self.partial.clone();
        self.done = true;
        blocking(move || remove_if_present(&partial)).await
    }
}

impl Drop for DirUpload {
    fn drop(&mut self) {
        // Dropped mid-upload (the job was cancelled): leave no partial behind.
        if !self.done {
            self.file.take();
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn remove_if_present(path: &Path) -> Result<(), WriteError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(WriteError::io("remove", shown(path), e)),
        _ => Ok(()),
    }
}

/// Moves the partial into place. Without overwrite, `link` + `unlink` refuses atomically when
/// the name exists (rename would silently replace it).
fn publish(partial: &Path, final_path: &Path, mode: PutMode) -> Result<(), WriteError> {
    if mode == PutMode::Overwrite {
        return std::fs::rename(partial, final_path).map_err(|e| WriteError::io("rename", shown(partial), e));
    }
    match std::fs::hard_link(partial, final_path) {
        Ok(()) => remove_if_present(partial),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(partial);
            Err(WriteError::Exists { path: shown(final_path) })
        }
        // Filesystems without hard links: check, then rename (a small window, documented).
        Err(_) if !final_path.exists() => {
            std::fs::rename(partial, final_path).map_err(|e| WriteError::io("rename", shown(partial), e))
        }
        Err(_) => {
            let _ = std::fs::remove_file(partial);
            Err(WriteError::Exists { path: shown(final_path) })
        }
    }
}
