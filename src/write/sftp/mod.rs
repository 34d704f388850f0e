//! `sftp://USER@HOST[:PORT]/DIR`: the SFTP sink, the one partners' servers see.
//!
//! Built for the nightly 200 GB transfer that today's paramiko uploaders cannot be trusted
//! with: the host key is checked before any credential is sent ([`hostkey`]); each file
//! streams with many writes in flight over one or several SSH connections ([`upload`],
//! [`pool`]); a dropped connection is resumed where the server left off, never from zero;
//! a file is written as `NAME.partial`, its size (optionally its SHA-256) checked on the
//! server, and only then renamed to `NAME`, so the partner never picks up half a file.
//!
//! Publishing: without `--overwrite` the plain SFTP rename is used, which OpenSSH implements
//! as link()+unlink() and so refuses atomically when `NAME` exists. With `--overwrite`,
//! posix-rename@openssh.com replaces `NAME` atomically; a server without it gets remove then
//! rename, and between the two a reader finds no `NAME` at all (never a partial one).
//!
//! The SSH layer is russh; the SFTP protocol is spoken by [`protocol`] (see there for why
//! not russh-sftp's session).

pub mod args;
pub mod config;
pub mod connect;
pub mod hostkey;
pub mod pool;
pub mod protocol;
pub mod upload;

use std::sync::Arc;

pub use crate::secret::Secret;
pub use config::{SftpConfig, Verify};

use super::{PutMode, Sink, TargetOptions, Upload, WriteError};
use connect::Dialer;
use pool::{Pool, PoolError};
use protocol::{CallError, code, open};

/// State shared by the sink and its uploads.
pub struct Shared {
    pub cfg: Arc<SftpConfig>,
    pub target: TargetOptions,
    pub pool: Arc<Pool>,
    /// `sftp://user@host[:port]`, prefixed to paths in messages.
    origin: String,
    /// known_hosts lines given as text live in this file while the sink does.
    _known_hosts: Option<hostkey::KnownHostsLines>,
}

pub struct SftpSink {
    shared: Arc<Shared>,
}

impl SftpSink {
    /// Validates the configuration and loads the private key. Connects lazily: `check`
    /// opens the first connection.
    pub fn new(cfg: SftpConfig, target: TargetOptions) -> Result<Self, WriteError> {
        cfg.validate().map_err(|e| WriteError::Other { target: cfg.describe(), message: e.to_string() })?;
        if cfg.host_keys == hostkey::HostKeyPolicy::AcceptAny {
            tracing::warn!(
                target = %cfg.describe(),
                "--insecure-accept-any-host-key: the server's identity is NOT verified; anyone on the network path can read and alter this transfer. Pin its key with --host-key-fingerprint or --known-hosts"
            );
        }
        let origin = cfg.origin();
        let mut cfg = cfg;
        let known_hosts = match &cfg.host_keys {
            hostkey::HostKeyPolicy::KnownHostsLines(lines) => {
                let file = hostkey::KnownHostsLines::materialize(lines).map_err(|e| WriteError::Other {
                    target: cfg.describe(),
                    message: format!("cannot write the known_hosts lines to a temporary file: {e}"),
                })?;
                cfg.host_keys = hostkey::HostKeyPolicy::KnownHosts(file.path().to_path_buf());
                Some(file)
            }
            _ => None,
        };
        let cfg = Arc::new(cfg);
        let pool = Arc::new(Pool::new(Dialer::new(cfg.clone())?));
        Ok(SftpSink { shared: Arc::new(Shared { cfg, target, pool, origin, _known_hosts: known_hosts }) })
    }
}

impl Shared {
    /// A remote path as a user reads it: `sftp://user@host/abs/path` or `.../~/relative`.
    pub fn shown(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{path}", self.origin)
        } else if path == "." {
            format!("{}/~", self.origin)
        } else {
            format!("{}/~/{path}", self.origin)
        }
    }

    async fn stat(&self, path: &str) -> Result<protocol::Attrs, PoolError> {
        self.pool
            .run(0, "stat", |c| {
                let p = path.to_string();
                async move { c.sftp.stat(&p).await }
            })
            .await
    }

    pub async fn exists(&self, path: &str) -> Result<bool, WriteError> {
        match self.stat(path).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e.into_write("stat", self.shown(path))),
        }
    }

    pub async fn size_of(&self, path: &str) -> Result<u64, WriteError> {
        let attrs = self.stat(path).await.map_err(|e| e.into_write("stat", self.shown(path)))?;
        attrs.size.ok_or_else(|| WriteError::Other {
            target: self.shown(path),
            message: "the server did not report the file size; use --verify none with this server".into(),
        })
    }

    pub async fn remove_if_present(&self, path: &str) -> Result<(), WriteError> {
        self.remove(path, false).await
    }

    /// Removes `path` if it exists; `quick` makes one attempt only (cleanup on the way out).
    pub async fn remove(&self, path: &str, quick: bool) -> Result<(), WriteError> {
        let op = |c: Arc<connect::Conn>| {
            let p = path.to_string();
            async move { c.sftp.remove(&p).await }
        };
        let removed =
            if quick { self.pool.run_once(0, "remove", op).await } else { self.pool.run(0, "remove", op).await };
        match removed {
            Err(e) if !e.is_not_found() => Err(e.into_write("remove", self.shown(path))),
            _ => Ok(()),
        }
    }

    /// Renames the finished partial to its final name (see the module docs for the rules).
    pub async fn publish(&self, partial: &str, final_path: &str, mode: PutMode, size: u64) -> Result<(), WriteError> {
        let posix = self.pool.get(0).await?.sftp.has_extension(protocol::ext::POSIX_RENAME);
        let renamed = self
            .pool
            .run(0, "rename", |c| {
                let (from, to) = (partial.to_string(), final_path.to_string());
                async move {
                    match (mode, posix) {
                        (PutMode::Overwrite, true) => c.sftp.posix_rename(&from, &to).await,
                        (PutMode::Overwrite, false) => {
                            match c.sftp.remove(&to).await {
                                Err(CallError::Status(s)) if s.code != code::NO_SUCH_FILE => {
                                    return Err(CallError::Status(s));
                                }
                                Err(CallError::Lost(l)) => return Err(CallError::Lost(l)),
                                _ => {}
                            }
                            c.sftp.rename(&from, &to).await
                        }
                        (PutMode::Create, _) => c.sftp.rename(&from, &to).await,
                    }
                }
            })
            .await;
        let Err(e) = renamed else { return Ok(()) };
        // Was it done after all? A rename whose reply was lost with the connection, retried,
        // fails because the partial is gone: the file is in place.
        let partial_gone = matches!(self.exists(partial).await, Ok(false));
        let final_size = self.stat(final_path).await.ok().and_then(|a| a.size);
        if partial_gone && final_size == Some(size) {
            return Ok(());
        }
        if mode == PutMode::Create && final_size.is_some() {
            // OpenSSH answers SSH_FX_FAILURE, ProFTPD 11 (FILE_ALREADY_EXISTS): either way the
            // name is taken. The partial is ours to remove.
            let _ = self.remove_if_present(partial).await;
            return Err(WriteError::Exists { path: self.shown(final_path) });
        }
        Err(e.into_write("rename", format!("{} to {}", self.shown(partial), self.shown(final_path))))
    }

    /// Runs `sha256sum` on the server and compares it with the digest of the bytes sent.
    pub async fn verify_sha256(&self, path: &str, local: &str, size: u64) -> Result<(), WriteError> {
        let unavailable = |why: String| WriteError::Other {
            target: self.shown(path),
            message: format!("--verify sha256-remote: {why}; use --verify size with this server"),
        };
        let conn = self.pool.get(0).await?;
        let command = format!("sha256sum {}", upload::shell_quote(path));
        let ran = tokio::time::timeout(upload::hash_timeout(size), conn.exec(&command)).await;
        let (status, out, err) = match ran {
            Err(_) => return Err(unavailable("sha256sum did not finish in time".into())),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(v)) => v,
        };
        if status != Some(0) {
            return Err(unavailable(format!("`{command}` failed (exit status {status:?}): {err}")));
        }
        let remote = String::from_utf8_lossy(&out).split_whitespace().next().unwrap_or("").to_ascii_lowercase();
        if remote.len() != 64 || !remote.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unavailable(format!("unexpected output from sha256sum: {:?}", String::from_utf8_lossy(&out))));
        }
        if remote != local {
            let _ = self.remove_if_present(path).await;
            return Err(WriteError::DigestMismatch { path: self.shown(path), local: local.to_string(), remote });
        }
        tracing::debug!(file = %self.shown(path), sha256 = %remote, "sftp: sha256 verified on the server");
        Ok(())
    }

    /// `mkdir -p` over SFTP.
    async fn create_dirs(&self, dir: &str) -> Result<(), WriteError> {
        let mut prefix = if dir.starts_with('/') { String::from("/") } else { String::new() };
        for part in dir.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if !prefix.is_empty() && !prefix.ends_with('/') {
                prefix.push('/');
            }
            prefix.push_str(part);
            match self.stat(&prefix).await {
                Ok(a) if a.is_dir() == Some(false) => {
                    return Err(WriteError::RemoteDirMissing { path: self.shown(&prefix) });
                }
                Ok(_) => continue,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into_write("stat", self.shown(&prefix))),
            }
            let made = self
                .pool
                .run(0, "mkdir", |c| {
                    let p = prefix.clone();
                    async move { c.sftp.mkdir(&p).await }
                })
                .await;
            if let Err(e) = made {
                // Another uploader may have made it meanwhile.
                if !matches!(self.stat(&prefix).await, Ok(a) if a.is_dir() != Some(false)) {
                    return Err(e.into_write("create directory", self.shown(&prefix)));
                }
            }
            tracing::info!(dir = %self.shown(&prefix), "sftp: created directory");
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for SftpSink {
    fn describe(&self) -> String {
        self.shared.cfg.describe()
    }

    async fn check(&self) -> Result<(), WriteError> {
        let s = &self.shared;
        s.pool.warm_up().await?;
        let dir = s.cfg.remote_dir().to_string();
        match s.stat(&dir).await {
            Ok(a) if a.is_dir() == Some(false) => return Err(WriteError::RemoteDirMissing { path: s.shown(&dir) }),
            Ok(_) => {}
            Err(e) if e.is_not_found() && s.target.create_dirs => s.create_dirs(&dir).await?,
            Err(e) if e.is_not_found() => return Err(WriteError::RemoteDirMissing { path: s.shown(&dir) }),
            Err(e) => return Err(e.into_write("open directory", s.shown(&dir))),
        }
        // Permissions on the server are not ours to read reliably (ACLs, chroots): try it.
        let probe = s.cfg.remote_path(&format!(".bq2sftp-probe-{}", std::process::id()));
        let made = s
            .pool
            .run(0, "open", |c| {
                let p = probe.clone();
                async move {
                    let h = c.sftp.open(&p, open::WRITE | open::CREAT | open::TRUNC).await?;
                    c.sftp.close_handle(&h).await
                }
            })
            .await;
        made.map_err(|e| e.into_write("write into directory", s.shown(&dir)))?;
        s.remove_if_present(&probe).await
    }

    async fn exists(&self, name: &str) -> Result<bool, WriteError> {
        self.shared.exists(&self.shared.cfg.remote_path(name)).await
    }

    async fn create(&self, name: &str, mode: PutMode) -> Result<Box<dyn Upload>, WriteError> {
        Ok(Box::new(upload::SftpUpload::start(self.shared.clone(), name, mode).await?))
    }

    async fn get(&self, name: &str) -> Result<Option<bytes::Bytes>, WriteError> {
        let path = self.shared.cfg.remote_path(name);
        let shown = self.shared.shown(&path);
        let read = self
            .shared
            .pool
            .run(0, "read", |c| {
                let p = path.clone();
                async move {
                    let handle = c.sftp.open(&p, open::READ).await?;
                    let mut data = bytes::BytesMut::new();
                    let result = async {
                        // Only small files are read back (manifests): refuse anything huge.
                        while data.len() < MAX_GET_BYTES {
                            match c.sftp.read(&handle, data.len() as u64, 32 * 1024).await? {
                                Some(chunk) if !chunk.is_empty() => data.extend_from_slice(&chunk),
                                _ => break,
                            }
                        }
                        Ok(())
                    }
                    .await;
                    let _ = c.sftp.close_handle(&handle).await;
                    result.map(|()| data.freeze())
                }
            })
            .await;
        match read {
            Ok(data) if data.len() >= MAX_GET_BYTES => Err(WriteError::Other {
                target: shown,
                message: format!("larger than {MAX_GET_BYTES} bytes; only manifests are read back"),
            }),
            Ok(data) => Ok(Some(data)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into_write("read", shown)),
        }
    }
}

/// The most [`Sink::get`] reads back.
const MAX_GET_BYTES: usize = 64 * 1024 * 1024;
