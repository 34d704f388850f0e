//! One file's upload: pipelined writes at explicit offsets, striped over channels when large,
//! resumed in place when a connection drops, then checked and published atomically.
//!
//! A driver task owns the upload; [`SftpUpload`] (the pipeline's handle) only passes it
//! chunks through a queue of one. The driver keeps up to `--sftp-requests` writes in flight
//! (each `write_len` bytes, the server's limits@openssh.com maximum or 32 KiB), and takes the
//! next chunk only when there is room: that bounds memory at requests x write size per file,
//! as object_store's `WriteMultipart::wait_for_capacity` does, and lets slow servers push
//! back on the pipeline. Because the driver runs on its own, acknowledgements are collected
//! and new writes sent even while the pipeline is busy encoding.
//!
//! Every unacknowledged write keeps its bytes (a `Bytes` slice of the chunk, no copy). When
//! a connection drops (reset, EOF, keepalive timeout), the lane on it reconnects (bounded
//! backoff), reopens the partial file *without truncating it*, checks with fstat that the
//! server still holds at least every byte it acknowledged, and resends exactly the writes
//! that were not acknowledged. A resent write carries the same bytes to the same offset, so
//! a write that the old connection's server process still completes late is harmless. An
//! upload never restarts from zero.
//!
//! Large files (past [`STRIPE_AFTER`]) open further handles on other connections and spread
//! writes over them: one SSH channel moves at most its window (OpenSSH: 2 MiB) per round
//! trip, so a far-away server needs several channels to fill the path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use super::config::Verify;
use super::connect::Conn;
use super::pool::{PoolError, SlotUse, status_error};
use super::protocol::{Lost, Reply, Request, code, fxp, open};
use crate::write::{PutMode, Upload, WriteError};

/// A file opens handles on further connections once this much of it was sent: small files
/// (manifests, markers) stay on one channel and cost one OPEN/CLOSE.
pub const STRIPE_AFTER: u64 = 8 << 20;

enum Cmd {
    Data(Bytes),
    Finish(oneshot::Sender<Result<u64, WriteError>>),
    Abort(oneshot::Sender<Result<(), WriteError>>),
}

/// The pipeline's handle on an upload.
pub struct SftpUpload {
    tx: mpsc::Sender<Cmd>,
    error: Arc<Mutex<Option<WriteError>>>,
    shown: String,
}

impl SftpUpload {
    /// Opens `path` (creating or truncating it) and starts the driver. Fails fast on what the
    /// pipeline must hear about before streaming: an existing file, a missing directory,
    /// permission.
    pub async fn start(shared: Arc<Shared>, name: &str, mode: PutMode) -> Result<Self, WriteError> {
        let cfg = shared.cfg.clone();
        let final_path = cfg.remote_path(name);
        let path = if cfg.inplace {
            final_path.clone()
        } else {
            cfg.remote_path(&format!("{name}{}", shared.target.partial_suffix))
        };
        let slot = shared.pool.claim(&[]);
        if mode == PutMode::Create && !cfg.inplace {
            match shared
                .pool
                .run(slot.slot, "stat", |c| {
                    let p = final_path.clone();
                    async move { c.sftp.stat(&p).await }
                })
                .await
            {
                Ok(_) => return Err(WriteError::Exists { path: shared.shown(&final_path) }),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into_write("stat", shared.shown(&final_path))),
            }
        }
        // A stale partial from an earlier run is ours to replace (TRUNC). In place without
        // overwrite, EXCL makes the refusal atomic.
        let flags = match (cfg.inplace, mode) {
            (true, PutMode::Create) => open::WRITE | open::CREAT | open::EXCL,
            _ => open::WRITE | open::CREAT | open::TRUNC,
        };
        let opened = shared
            .pool
            .run(slot.slot, "open", |c| {
                let p = path.clone();
                async move {
                    let handle = c.sftp.open(&p, flags).await?;
                    Ok((c, handle))
                }
            })
            .await;
        let (conn, handle) = match opened {
            Ok(v) => v,
            Err(e) if e.is_not_found() => {
                return Err(WriteError::RemoteDirMissing { path: shared.shown(cfg.remote_dir()) });
            }
            // OpenSSH reports EEXIST as a plain failure: check what it was.
            Err(PoolError::Status(s)) if cfg.inplace && mode == PutMode::Create => {
                return Err(if shared.exists(&final_path).await.unwrap_or(false) {
                    WriteError::Exists { path: shared.shown(&final_path) }
                } else {
                    status_error("create", shared.shown(&path), s)
                });
            }
            Err(e) => return Err(e.into_write("create", shared.shown(&path))),
        };
        let write_len = conn.write_len;
        let (tx, rx) = mpsc::channel(1);
        let error = Arc::new(Mutex::new(None));
        let shown = shared.shown(&path);
        let driver = Driver {
            window: cfg.requests.max(1),
            max_lanes: shared.pool.slots(),
            hasher: (cfg.verify == Verify::Sha256Remote).then(Sha256::new),
            shared,
            name: name.to_string(),
            path,
            final_path,
            mode,
            lanes: vec![Lane { slot, conn, handle, generation: 0, inflight: 0, recoveries: 0 }],
            inflight: FuturesUnordered::new(),
            outstanding: BTreeMap::new(),
            sent: 0,
            staging: BytesMut::new(),
            write_len,
            error: error.clone(),
        };
        tokio::spawn(driver.run(rx));
        Ok(SftpUpload { tx, error, shown })
    }

    fn failure(&self) -> WriteError {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_else(|| WriteError::Other {
            target: self.shown.clone(),
            message: "the upload stopped after an earlier error".into(),
        })
    }
}

#[async_trait::async_trait]
impl Upload for SftpUpload {
    async fn put_part(&mut self, data: Bytes) -> Result<(), WriteError> {
        if data.is_empty() {
            return Ok(());
        }
        self.tx.send(Cmd::Data(data)).await.map_err(|_| self.failure())
    }

    async fn complete(self: Box<Self>) -> Result<u64, WriteError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Finish(tx)).await.is_err() {
            return Err(self.failure());
        }
        rx.await.unwrap_or_else(|_| Err(self.failure()))
    }

    async fn abort(self: Box<Self>) -> Result<(), WriteError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Abort(tx)).await.is_err() {
            // The driver already stopped on an error and cleaned up what it had to.
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }
}

/// One open handle on the file, on one connection.
struct Lane {
    slot: SlotUse,
    conn: Arc<Conn>,
    handle: Bytes,
    /// Bumped when the lane reconnects: acknowledgements from older generations are
    /// resent without another reconnect.
    generation: u64,
    inflight: usize,
    /// Reconnects since this lane's last acknowledged write: bounds a connection that dies
    /// every time (per lane, so an outage that drops every connection at once counts once).
    recoveries: u32,
}

/// A write's outcome.
struct Ack {
    lane: usize,
    generation: u64,
    offset: u64,
    data: Bytes,
    result: Result<Reply, Lost>,
}

struct Driver {
    shared: Arc<Shared>,
    name: String,
    /// Where the bytes go: `NAME.partial`, or `NAME` with `--inplace`.
    path: String,
    final_path: String,
    mode: PutMode,
    lanes: Vec<Lane>,
    max_lanes: usize,
    window: usize,
    inflight: FuturesUnordered<BoxFuture<'static, Ack>>,
    /// Offsets (and lengths) of writes not yet acknowledged.
    outstanding: BTreeMap<u64, usize>,
    /// Bytes handed to lanes so far: the offset of the next write.
    sent: u64,
    /// Bytes smaller than one write, waiting for the next chunk.
    staging: BytesMut,
    write_len: usize,
    hasher: Option<Sha256>,
    error: Arc<Mutex<Option<WriteError>>>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            tokio::select! {
                biased;
                Some(ack) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if let Err(e) = self.handle_ack(ack).await {
                        return self.fail(e).await;
                    }
                }
                cmd = rx.recv(), if self.inflight.len() < self.window => match cmd {
                    Some(Cmd::Data(data)) => {
                        if let Err(e) = self.push(data).await {
                            return self.fail(e).await;
                        }
                    }
                    Some(Cmd::Finish(reply)) => {
                        let result = self.finish().await;
                        if let Err(e) = &result {
                            self.cleanup_after(e).await;
                        }
                        let _ = reply.send(result);
                        return;
                    }
                    Some(Cmd::Abort(reply)) => {
                        let _ = reply.send(self.discard().await);
                        return;
                    }
                    // The upload was dropped (a cancelled job): leave no partial behind.
                    None => {
                        if let Err(e) = self.discard().await {
                            tracing::warn!(file = %self.name, "could not remove an abandoned partial upload: {e}");
                        }
                        return;
                    }
                },
            }
        }
    }

    fn shown(&self, path: &str) -> String {
        self.shared.shown(path)
    }

    /// Acknowledged bytes form a prefix up to here: the lowest unacknowledged offset.
    fn low_watermark(&self) -> u64 {
        self.outstanding.keys().next().copied().unwrap_or(self.sent)
    }

    async fn push(&mut self, mut data: Bytes) -> Result<(), WriteError> {
        if let Some(mut hasher) = self.hasher.take() {
            let chunk = data.clone();
            // SHA-256 runs at ~1-2 GB/s: milliseconds per chunk, too long for a runtime thread.
            hasher = tokio::task::spawn_blocking(move || {
                hasher.update(&chunk);
                hasher
            })
            .await
            .map_err(|e| WriteError::Other {
                target: self.shown(&self.path),
                message: format!("hash task failed: {e}"),
            })?;
            self.hasher = Some(hasher);
        }
        let len = self.write_len;
        if !self.staging.is_empty() {
            let take = (len - self.staging.len()).min(data.len());
            self.staging.extend_from_slice(&data.split_to(take));
            if self.staging.len() < len {
                return Ok(());
            }
            let piece = self.staging.split().freeze();
            self.write(piece).await?;
        }
        while data.len() >= len {
            let piece = data.split_to(len);
            self.write(piece).await?;
        }
        if !data.is_empty() {
            self.staging.reserve(len);
            self.staging.extend_from_slice(&data);
        }
        Ok(())
    }

    /// Waits for room in the window, then sends one write on the least busy lane.
    async fn write(&mut self, piece: Bytes) -> Result<(), WriteError> {
        while self.inflight.len() >= self.window {
            let Some(ack) = self.inflight.next().await else { break };
            self.handle_ack(ack).await?;
        }
        let lane = self.pick_lane().await;
        let offset = self.sent;
        self.sent += piece.len() as u64;
        self.outstanding.insert(offset, piece.len());
        self.send(lane, offset, piece);
        Ok(())
    }

    async fn pick_lane(&mut self) -> usize {
        let (best, busy) =
            self.lanes.iter().enumerate().map(|(i, l)| (i, l.inflight)).min_by_key(|(_, n)| *n).unwrap_or((0, 0));
        let per_lane = (self.window / self.max_lanes.max(1)).max(1);
        if busy >= per_lane && self.lanes.len() < self.max_lanes && self.sent >= STRIPE_AFTER {
            self.open_lanes().await;
            return self.lanes.len() - 1;
        }
        best
    }

    /// Opens the file on every other connection at once (one round trip in all). The file
    /// exists: no create, no truncate. A connection that cannot take it is left out.
    async fn open_lanes(&mut self) {
        let mut taken: Vec<usize> = self.lanes.iter().map(|l| l.slot.slot).collect();
        let mut claims = Vec::new();
        for _ in self.lanes.len()..self.max_lanes {
            let claim = self.shared.pool.claim(&taken);
            taken.push(claim.slot);
            claims.push(claim);
        }
        let opens = claims.into_iter().map(|slot| {
            let (shared, path) = (self.shared.clone(), self.path.clone());
            async move {
                let opened = shared
                    .pool
                    .run(slot.slot, "open", |c| {
                        let p = path.clone();
                        async move {
                            let h = c.sftp.open(&p, open::WRITE).await?;
                            Ok((c, h))
                        }
                    })
                    .await;
                (slot, opened)
            }
        });
        for (slot, opened) in futures::future::join_all(opens).await {
            match opened {
                Ok((conn, handle)) => {
                    self.write_len = self.write_len.min(conn.write_len);
                    self.lanes.push(Lane { slot, conn, handle, generation: 0, inflight: 0, recoveries: 0 });
                }
                Err(e) => {
                    let e = e.into_write("open", self.shown(&self.path));
                    tracing::warn!(file = %self.name, "sftp: cannot open the file on another connection: {e}");
                }
            }
        }
        tracing::debug!(file = %self.name, lanes = self.lanes.len(), "sftp: striping over connections");
        self.max_lanes = self.lanes.len();
    }

    /// Queues one write on a lane's connection. A failure to queue (the connection is gone)
    /// is an acknowledgement that says "lost", handled like any other.
    fn send(&mut self, lane: usize, offset: u64, data: Bytes) {
        let l = &mut self.lanes[lane];
        l.inflight += 1;
        let (conn, generation) = (l.conn.clone(), l.generation);
        let req = Request::new(fxp::WRITE).string(&l.handle).u64(offset).data(data.clone());
        let ack = match conn.sftp.send(req) {
            Ok(rx) => async move {
                let result = rx.await.map_err(|_| conn.sftp.lost());
                Ack { lane, generation, offset, data, result }
            }
            .boxed(),
            Err(lost) => futures::future::ready(Ack { lane, generation, offset, data, result: Err(lost) }).boxed(),
        };
        self.inflight.push(ack);
    }

    async fn handle_ack(&mut self, ack: Ack) -> Result<(), WriteError> {
        self.lanes[ack.lane].inflight -= 1;
        match ack.result {
            Ok(Reply::Status(s)) if s.code == code::OK => {
                self.outstanding.remove(&ack.offset);
                self.lanes[ack.lane].recoveries = 0;
                Ok(())
            }
            Ok(Reply::Status(s)) => Err(self.write_failed(ack.offset, s)),
            Ok(other) => Err(WriteError::Other {
                target: self.shown(&self.path),
                message: format!("the server answered a write with {other:?}"),
            }),
            Err(lost) => {
                if ack.generation == self.lanes[ack.lane].generation {
                    self.recover(ack.lane, &lost).await?;
                }
                self.send(ack.lane, ack.offset, ack.data);
                Ok(())
            }
        }
    }

    fn write_failed(&self, offset: u64, s: super::protocol::Status) -> WriteError {
        match s.code {
            // OpenSSH maps ENOSPC and EDQUOT to SSH_FX_FAILURE (sftp-server.c errno_to_portable);
            // later drafts have codes of their own.
            code::FAILURE | code::NO_SPACE_ON_FILESYSTEM | code::QUOTA_EXCEEDED => WriteError::WriteFailed {
                path: self.shown(&self.path),
                offset,
                status: s.to_string(),
                kept: self.low_watermark(),
            },
            _ => status_error("write", self.shown(&self.path), s),
        }
    }

    /// Reconnects a lane after its connection dropped and reopens the file where it is.
    async fn recover(&mut self, lane: usize, lost: &Lost) -> Result<(), WriteError> {
        let budget = self.shared.cfg.retries + 1;
        let mut why = lost.0.clone();
        loop {
            self.lanes[lane].recoveries += 1;
            if self.lanes[lane].recoveries > budget {
                return Err(self.connection_lost(budget, &why));
            }
            let low = self.low_watermark();
            crate::metrics::events::UploadRetry {
                sink: &self.shared.cfg.describe(),
                file: &self.name,
                error: &format!("connection lost ({why}); resuming from byte {low} on a new connection"),
            }
            .emit();
            let slot = self.lanes[lane].slot.slot;
            let conn = match self.shared.pool.get(slot).await {
                Ok(c) => c,
                Err(WriteError::Connect { attempts, message, .. }) => {
                    return Err(self.connection_lost(attempts, &message));
                }
                Err(e) => return Err(e),
            };
            // WRITE only: the partial must still be there, and must not be truncated.
            let reopened = async {
                let handle = conn.sftp.open(&self.path, open::WRITE).await?;
                let attrs = conn.sftp.fstat(&handle).await?;
                Ok::<_, super::protocol::CallError>((handle, attrs.size))
            }
            .await;
            match reopened {
                Ok((handle, size)) => {
                    if let Some(size) = size
                        && size < low
                    {
                        return Err(WriteError::Other {
                            target: self.shown(&self.path),
                            message: format!(
                                "after reconnecting, the partial file holds {size} bytes but the server had acknowledged {low}: something else changed it; not resuming"
                            ),
                        });
                    }
                    let unacked = self.inflight.len() + 1;
                    tracing::info!(
                        file = %self.name,
                        serial = conn.serial,
                        server_bytes = size.unwrap_or(0),
                        resend_from = low,
                        unacked,
                        "sftp: resumed on a new connection; resending unacknowledged writes"
                    );
                    let l = &mut self.lanes[lane];
                    l.conn = conn;
                    l.handle = handle;
                    l.generation += 1;
                    return Ok(());
                }
                Err(super::protocol::CallError::Lost(l)) => why = l.0,
                Err(super::protocol::CallError::Status(s)) if s.code == code::NO_SUCH_FILE => {
                    return Err(WriteError::Other {
                        target: self.shown(&self.path),
                        message: "the partial file disappeared from the server during the upload; cannot resume".into(),
                    });
                }
                Err(super::protocol::CallError::Status(s)) => {
                    return Err(status_error("reopen", self.shown(&self.path), s));
                }
                Err(e) => return Err(WriteError::Other { target: self.shown(&self.path), message: e.to_string() }),
            }
        }
    }

    fn connection_lost(&self, attempts: u32, why: &str) -> WriteError {
        WriteError::ConnectionLost {
            target: self.shared.cfg.describe(),
            path: self.shown(&self.path),
            offset: self.low_watermark(),
            attempts,
            message: why.to_string(),
        }
    }

    /// Sends what is left, waits for every acknowledgement, closes the handles, checks the
    /// result and publishes it. Returns the committed size.
    async fn finish(&mut self) -> Result<u64, WriteError> {
        if !self.staging.is_empty() {
            let piece = self.staging.split().freeze();
            self.write(piece).await?;
        }
        while let Some(ack) = self.inflight.next().await {
            self.handle_ack(ack).await?;
        }
        if self.shared.cfg.fsync {
            let lane = &self.lanes[0];
            if lane.conn.sftp.has_extension(super::protocol::ext::FSYNC) {
                lane.conn.sftp.fsync(&lane.handle).await.map_err(|e| self.call_error("fsync", e))?;
            } else {
                tracing::warn!("sftp: the server does not offer fsync@openssh.com; --sftp-fsync has no effect");
            }
        }
        self.close_handles(true).await?;
        let size = self.sent;
        let verify = self.shared.cfg.verify;
        if verify != Verify::None {
            let actual = self.shared.size_of(&self.path).await?;
            if actual != size {
                return Err(WriteError::SizeMismatch { path: self.shown(&self.path), expected: size, actual });
            }
        }
        if verify == Verify::Sha256Remote {
            let local = self.hasher.take().map(|h| hex::encode(h.finalize())).unwrap_or_default();
            self.shared.verify_sha256(&self.path, &local, size).await?;
        }
        if !self.shared.cfg.inplace {
            self.shared.publish(&self.path, &self.final_path, self.mode, size).await?;
        }
        tracing::debug!(file = %self.name, bytes = size, lanes = self.lanes.len(), "sftp: file committed");
        Ok(size)
    }

    fn call_error(&self, op: &'static str, e: super::protocol::CallError) -> WriteError {
        match e {
            super::protocol::CallError::Status(s) => status_error(op, self.shown(&self.path), s),
            other => WriteError::Other { target: self.shown(&self.path), message: format!("{op}: {other}") },
        }
    }

    /// Closes every handle. With `strict`, a close the server refuses is an error: some
    /// servers report deferred write failures (NFS, quotas) only there.
    async fn close_handles(&mut self, strict: bool) -> Result<(), WriteError> {
        let lanes = std::mem::take(&mut self.lanes);
        let closes = lanes.iter().map(|l| async move { (l.conn.sftp.close_handle(&l.handle).await, l.conn.serial) });
        for (result, serial) in futures::future::join_all(closes).await {
            match result {
                Ok(()) => {}
                Err(super::protocol::CallError::Status(s)) if strict => {
                    return Err(status_error("close", self.shown(&self.path), s));
                }
                // Every write was acknowledged; a server closes the handles of a dropped
                // connection itself.
                Err(e) => tracing::debug!(serial, "sftp: close failed: {e}"),
            }
        }
        Ok(())
    }

    /// Removes the file being written (abort, cancellation, or a failure that left it useless).
    /// One attempt: a job on its way out does not wait for a dead server to come back.
    async fn discard(&mut self) -> Result<(), WriteError> {
        self.inflight.clear();
        self.close_handles(false).await?;
        self.shared.remove(&self.path, true).await
    }

    /// What a failed upload leaves. A failed write (a full disk, a quota) and a connection
    /// that could not be restored keep the partial file, so a later `--resume` run (or the
    /// operator) can continue from it; any other failure removes it.
    async fn cleanup_after(&mut self, e: &WriteError) {
        let keep = matches!(e, WriteError::WriteFailed { .. } | WriteError::ConnectionLost { .. });
        if keep {
            self.inflight.clear();
            let _ = self.close_handles(false).await;
            tracing::warn!(file = %self.shown(&self.path), acknowledged = self.low_watermark(), "sftp: the partial file is kept");
        } else if let Err(cleanup) = self.discard().await {
            tracing::warn!("sftp: could not remove {}: {cleanup}", self.shown(&self.path));
        }
    }

    async fn fail(mut self, e: WriteError) {
        self.cleanup_after(&e).await;
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// Time to allow `sha256sum` on the server: generous, as it reads the whole file.
pub fn hash_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / (50 << 20))
}

/// Quotes a path for the POSIX shell that runs exec requests.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
