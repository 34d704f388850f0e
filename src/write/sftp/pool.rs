//! The sink's SSH connections (`--sftp-connections`), opened lazily and replaced when they
//! die, plus the remote-path operations that must survive a dropped connection.
//!
//! Each slot holds at most one live connection. Uploads spread over the slots (the least
//! used first); a file large enough to need it opens handles on several slots at once, each
//! connection being its own SSH channel with its own flow-control window. When a connection
//! dies, the first user to notice replaces it under the slot's lock; the others find the new
//! one there.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::connect::{Conn, Dialer};
use super::protocol::{CallError, Status, code};
use crate::write::WriteError;

pub struct Pool {
    pub dialer: Dialer,
    slots: Vec<Slot>,
}

struct Slot {
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// Open upload handles on this slot, to spread new uploads.
    users: AtomicUsize,
    /// The server would not take this many connections: the slot is not used.
    disabled: AtomicBool,
}

/// A handle's claim on a slot, released when dropped.
pub struct SlotUse {
    pool: Arc<Pool>,
    pub slot: usize,
}

impl Drop for SlotUse {
    fn drop(&mut self) {
        if let Some(s) = self.pool.slots.get(self.slot) {
            s.users.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Pool {
    pub fn new(dialer: Dialer) -> Self {
        let n = dialer.cfg.connections.max(1);
        let slots = (0..n)
            .map(|_| Slot {
                conn: tokio::sync::Mutex::new(None),
                users: AtomicUsize::new(0),
                disabled: AtomicBool::new(false),
            })
            .collect();
        Pool { dialer, slots }
    }

    /// The least used slot not in `exclude` (any slot if all are excluded), claimed.
    pub fn claim(self: &Arc<Self>, exclude: &[usize]) -> SlotUse {
        let pick = |skip: bool| {
            (0..self.slots.len())
                .filter(|i| !self.slots[*i].disabled.load(Ordering::Relaxed))
                .filter(|i| !skip || !exclude.contains(i))
                .min_by_key(|i| self.slots[*i].users.load(Ordering::Relaxed))
        };
        let slot = pick(true).or_else(|| pick(false)).unwrap_or(0);
        self.slots[slot].users.fetch_add(1, Ordering::Relaxed);
        SlotUse { pool: self.clone(), slot }
    }

    /// Slots in use (all, unless the server refused some connections at warm-up).
    pub fn slots(&self) -> usize {
        self.slots.iter().filter(|s| !s.disabled.load(Ordering::Relaxed)).count().max(1)
    }

    /// Opens every slot's connection at once, so that uploads (and a large file striping
    /// over them) do not wait for handshakes, each several round trips to a far server.
    /// Slot 0 must connect; a server that refuses further connections (per-user limits are
    /// common on managed SFTP services) gets fewer, with a warning.
    pub async fn warm_up(&self) -> Result<(), WriteError> {
        self.get(0).await?;
        let extra = (1..self.slots.len()).map(|i| async move {
            let s = &self.slots[i];
            let mut current = s.conn.lock().await;
            if current.as_ref().is_some_and(|c| !c.is_dead()) {
                return None;
            }
            match self.dialer.connect_attempts(1).await {
                Ok(c) => {
                    *current = Some(c);
                    None
                }
                Err(e) => {
                    s.disabled.store(true, Ordering::Relaxed);
                    Some(e)
                }
            }
        });
        let failed: Vec<WriteError> = futures::future::join_all(extra).await.into_iter().flatten().collect();
        if let Some(e) = failed.first() {
            tracing::warn!(
                "sftp: only {} of {} connections could be opened ({e}); continuing with fewer",
                self.slots(),
                self.slots.len()
            );
        }
        Ok(())
    }

    /// A live connection for `slot`, connecting (with bounded retries) when there is none.
    pub async fn get(&self, slot: usize) -> Result<Arc<Conn>, WriteError> {
        self.get_with(slot, self.dialer.cfg.retries + 1).await
    }

    async fn get_with(&self, slot: usize, connect_attempts: u32) -> Result<Arc<Conn>, WriteError> {
        let Some(s) = self.slots.get(slot) else {
            return Err(WriteError::Other {
                target: self.dialer.target(),
                message: format!("no connection slot {slot}"),
            });
        };
        let mut current = s.conn.lock().await;
        if let Some(c) = current.as_ref()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        let replacing = current.take().is_some();
        let fresh = self.dialer.connect_attempts(connect_attempts).await?;
        if replacing {
            crate::metrics::events::Reconnected { sink: &self.dialer.target(), attempt: fresh.serial as u32 }.emit();
        }
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    /// Runs a metadata operation (stat, open, rename...) on `slot`, reconnecting and retrying
    /// when the connection drops under it, at most `--sftp-retries` times.
    pub async fn run<T, F, Fut>(&self, slot: usize, what: &str, op: F) -> Result<T, PoolError>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let attempts = self.dialer.cfg.retries + 1;
        self.run_with(slot, what, attempts, attempts, op).await
    }

    /// One try, one connection attempt: for cleanup on the way out (an aborted job must not
    /// wait through a full backoff schedule to remove a partial file from a dead server).
    pub async fn run_once<T, F, Fut>(&self, slot: usize, what: &str, op: F) -> Result<T, PoolError>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        self.run_with(slot, what, 1, 1, op).await
    }

    async fn run_with<T, F, Fut>(
        &self,
        slot: usize,
        what: &str,
        attempts: u32,
        connect_attempts: u32,
        op: F,
    ) -> Result<T, PoolError>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let mut last = String::new();
        for attempt in 1..=attempts {
            let conn = self.get_with(slot, connect_attempts).await.map_err(PoolError::Write)?;
            match op(conn).await {
                Ok(v) => return Ok(v),
                Err(CallError::Lost(l)) => {
                    tracing::warn!(attempt, "sftp: connection lost during {what}: {l}; reconnecting");
                    last = l.0;
                }
                Err(CallError::Status(s)) => return Err(PoolError::Status(s)),
                Err(CallError::Protocol(p)) => {
                    return Err(PoolError::Write(WriteError::Other {
                        target: self.dialer.target(),
                        message: format!("{what}: the server broke the SFTP protocol: {p}"),
                    }));
                }
            }
        }
        Err(PoolError::Write(WriteError::Connect {
            target: self.dialer.target(),
            attempts,
            message: format!("the connection kept dropping during {what}: {last}"),
        }))
    }
}

/// A failed pool operation: a status the caller interprets, or a finished error.
#[derive(Debug)]
pub enum PoolError {
    Status(Status),
    Write(WriteError),
}

impl PoolError {
    pub fn is_status(&self, c: u32) -> bool {
        matches!(self, PoolError::Status(s) if s.code == c)
    }

    /// A missing file: v3's NO_SUCH_FILE, or v5's NO_SUCH_PATH from newer servers.
    pub fn is_not_found(&self) -> bool {
        self.is_status(code::NO_SUCH_FILE) || self.is_status(code::NO_SUCH_PATH)
    }

    /// Turns a status into the error a user reads: permission problems become
    /// [`WriteError::PermissionDenied`] (exit code 3), anything else shows the status code.
    pub fn into_write(self, op: &'static str, path: impl Into<String>) -> WriteError {
        match self {
            PoolError::Write(e) => e,
            PoolError::Status(s) => status_error(op, path.into(), s),
        }
    }
}

pub fn status_error(op: &'static str, path: String, s: Status) -> WriteError {
    match s.code {
        code::PERMISSION_DENIED | code::WRITE_PROTECT => WriteError::PermissionDenied { op, path },
        _ => WriteError::Remote { op, path, code: s.code, status: s.to_string() },
    }
}
