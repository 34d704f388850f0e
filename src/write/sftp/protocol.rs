//! The SFTP client protocol (version 3, draft-ietf-secsh-filexfer-02, as OpenSSH speaks it)
//! over one SSH channel: packet encoding, the request/reply demultiplexer, and the few
//! OpenSSH extensions an uploader needs.
//!
//! Why our own codec rather than russh-sftp's `RawSftpSession`: an uploader lives on three
//! things that session does not give us. (1) Status codes outside v3's 0..=8 (ProFTPD answers
//! a rename onto an existing file with 11, a v5 code): russh-sftp's `StatusCode` enum cannot
//! decode them, and a decode error ends its read loop, losing every request in flight. Here a
//! status is a number, shown as such. (2) Zero-copy writes: a WRITE is sent as a small header
//! plus the caller's `Bytes` (russh-sftp copies each write into a `Vec` and again into the
//! packet). (3) Knowing when the channel is gone: every request in flight fails at once with
//! [`Lost`], which the uploader turns into a reconnect and a resend, instead of each request
//! waiting out its own timeout.
//!
//! Shape: one reader task per channel parses replies and completes the matching request by id
//! (draft-02 section 3: replies may come in any order); one writer task per channel sends
//! requests from a queue, whole, in order. A caller that gives up (an aborted upload drops
//! its futures) only stops waiting: it can never leave half a packet on the channel, which
//! would desynchronise the stream for every other file sharing the connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Packet types (draft-02 section 3).
pub mod fxp {
    pub const INIT: u8 = 1;
    pub const VERSION: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const READ: u8 = 5;
    pub const WRITE: u8 = 6;
    pub const FSTAT: u8 = 8;
    pub const REMOVE: u8 = 13;
    pub const MKDIR: u8 = 14;
    pub const REALPATH: u8 = 16;
    pub const STAT: u8 = 17;
    pub const RENAME: u8 = 18;
    pub const STATUS: u8 = 101;
    pub const HANDLE: u8 = 102;
    pub const DATA: u8 = 103;
    pub const NAME: u8 = 104;
    pub const ATTRS: u8 = 105;
    pub const EXTENDED: u8 = 200;
    pub const EXTENDED_REPLY: u8 = 201;
}

/// `pflags` of SSH_FXP_OPEN (draft-02 section 6.3).
pub mod open {
    pub const READ: u32 = 0x01;
    pub const WRITE: u32 = 0x02;
    pub const CREAT: u32 = 0x08;
    pub const TRUNC: u32 = 0x10;
    pub const EXCL: u32 = 0x20;
}

/// Extension names, from OpenSSH's PROTOCOL file ("sftp: Extension request ...").
pub mod ext {
    /// `string oldpath, string newpath`: rename(2), replacing the target atomically.
    pub const POSIX_RENAME: &str = "posix-rename@openssh.com";
    /// No arguments; replies `uint64 max-packet-length, max-read-length, max-write-length,
    /// max-open-handles`. OpenSSH answers 261120 for writes and drops the connection on a
    /// packet above 256 KiB, so the advertised write length is a hard ceiling.
    pub const LIMITS: &str = "limits@openssh.com";
    /// `string handle`: fsync(2) on the open file.
    pub const FSYNC: &str = "fsync@openssh.com";
    /// `string path`; replies statvfs(3) of the file system holding it as eleven uint64
    /// (see [`super::StatVfs`]). `bq2sftp doctor` shows the free space with it.
    pub const STATVFS: &str = "statvfs@openssh.com";
}

/// Status codes (draft-02 section 7 defines 0..=8; later drafts, which some servers answer
/// with even in a v3 session, define more: draft-ietf-secsh-filexfer-13 section 9.1).
pub mod code {
    pub const OK: u32 = 0;
    pub const EOF: u32 = 1;
    pub const NO_SUCH_FILE: u32 = 2;
    pub const PERMISSION_DENIED: u32 = 3;
    pub const FAILURE: u32 = 4;
    pub const OP_UNSUPPORTED: u32 = 8;
    pub const NO_SUCH_PATH: u32 = 10;
    pub const FILE_ALREADY_EXISTS: u32 = 11;
    pub const WRITE_PROTECT: u32 = 12;
    pub const NO_SPACE_ON_FILESYSTEM: u32 = 14;
    pub const QUOTA_EXCEEDED: u32 = 15;
    pub const NOT_A_DIRECTORY: u32 = 19;

    const NAMES: [&str; 32] = [
        "SSH_FX_OK",
        "SSH_FX_EOF",
        "SSH_FX_NO_SUCH_FILE",
        "SSH_FX_PERMISSION_DENIED",
        "SSH_FX_FAILURE",
        "SSH_FX_BAD_MESSAGE",
        "SSH_FX_NO_CONNECTION",
        "SSH_FX_CONNECTION_LOST",
        "SSH_FX_OP_UNSUPPORTED",
        "SSH_FX_INVALID_HANDLE",
        "SSH_FX_NO_SUCH_PATH",
        "SSH_FX_FILE_ALREADY_EXISTS",
        "SSH_FX_WRITE_PROTECT",
        "SSH_FX_NO_MEDIA",
        "SSH_FX_NO_SPACE_ON_FILESYSTEM",
        "SSH_FX_QUOTA_EXCEEDED",
        "SSH_FX_UNKNOWN_PRINCIPAL",
        "SSH_FX_LOCK_CONFLICT",
        "SSH_FX_DIR_NOT_EMPTY",
        "SSH_FX_NOT_A_DIRECTORY",
        "SSH_FX_INVALID_FILENAME",
        "SSH_FX_LINK_LOOP",
        "SSH_FX_CANNOT_DELETE",
        "SSH_FX_INVALID_PARAMETER",
        "SSH_FX_FILE_IS_A_DIRECTORY",
        "SSH_FX_BYTE_RANGE_LOCK_CONFLICT",
        "SSH_FX_BYTE_RANGE_LOCK_REFUSED",
        "SSH_FX_DELETE_PENDING",
        "SSH_FX_FILE_CORRUPT",
        "SSH_FX_OWNER_INVALID",
        "SSH_FX_GROUP_INVALID",
        "SSH_FX_NO_MATCHING_BYTE_RANGE_LOCK",
    ];

    /// `SSH_FX_FAILURE (4)`; codes v3 does not define say so, unknown ones show the number.
    pub fn describe(code: u32) -> String {
        match NAMES.get(code as usize) {
            Some(name) if code <= 8 => format!("{name} ({code})"),
            Some(name) => format!("{name} ({code}, a status code SFTP v3 does not define)"),
            None => format!("unknown status code {code}"),
        }
    }
}

/// An SSH_FXP_STATUS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u32,
    pub message: String,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let described = code::describe(self.code);
        if self.message.is_empty() { f.write_str(&described) } else { write!(f, "{described}: {}", self.message) }
    }
}

/// The file attributes we read (draft-02 section 5); the rest are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    pub size: Option<u64>,
    pub permissions: Option<u32>,
}

impl Attrs {
    /// `Some(true)` for a directory, `None` when the server did not send the mode.
    pub fn is_dir(&self) -> Option<bool> {
        // S_IFMT / S_IFDIR from POSIX; servers send the full st_mode.
        self.permissions.map(|p| p & 0o170000 == 0o040000)
    }
}

/// A reply, decoded.
#[derive(Debug)]
pub enum Reply {
    Status(Status),
    Handle(Bytes),
    Attrs(Attrs),
    /// SSH_FXP_NAME: the file names (long names and attributes are not needed).
    Name(Vec<String>),
    Data(Bytes),
    Extended(Bytes),
}

/// The channel is gone (connection reset, EOF, keepalive timeout): nothing in flight will be
/// answered. The text says why, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost(pub String);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a request can fail with besides a status: the connection, or a reply we cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    Lost(Lost),
    Status(Status),
    /// The server answered with something the protocol does not allow here.
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Lost(l) => write!(f, "connection lost: {l}"),
            CallError::Status(s) => write!(f, "{s}"),
            CallError::Protocol(p) => write!(f, "protocol error: {p}"),
        }
    }
}

impl From<Lost> for CallError {
    fn from(l: Lost) -> Self {
        CallError::Lost(l)
    }
}

/// A request being built: `uint32 length, byte type, uint32 id, ...` (draft-02 section 3).
/// The id and length are filled in when it is sent. A WRITE carries its data as a separate
/// `Bytes` so the payload is never copied.
pub struct Request {
    buf: BytesMut,
    payload: Option<Bytes>,
}

impl Request {
    pub fn new(kind: u8) -> Self {
        let mut buf = BytesMut::with_capacity(128);
        buf.put_u32(0);
        buf.put_u8(kind);
        buf.put_u32(0);
        Request { buf, payload: None }
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.buf.put_u32(v);
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.buf.put_u64(v);
        self
    }

    pub fn string(mut self, s: impl AsRef<[u8]>) -> Self {
        let s = s.as_ref();
        self.buf.put_u32(s.len() as u32);
        self.buf.put_slice(s);
        self
    }

    /// Empty attributes (flags 0): the server applies its defaults (0666/0777 & umask).
    pub fn no_attrs(self) -> Self {
        self.u32(0)
    }

    /// The final string field, carried without a copy. Must be the last field.
    pub fn data(mut self, payload: Bytes) -> Self {
        self.buf.put_u32(payload.len() as u32);
        self.payload = Some(payload);
        self
    }

    fn seal(mut self, id: u32) -> (Bytes, Option<Bytes>) {
        let total = self.buf.len() - 4 + self.payload.as_ref().map_or(0, Bytes::len);
        self.buf[0..4].copy_from_slice(&(total as u32).to_be_bytes());
        self.buf[5..9].copy_from_slice(&id.to_be_bytes());
        (self.buf.freeze(), self.payload)
    }

    /// Bytes on the wire (for checking against the server's max packet length).
    pub fn wire_len(&self) -> usize {
        self.buf.len() + self.payload.as_ref().map_or(0, Bytes::len)
    }
}

/// limits@openssh.com, zero meaning "no limit" (OpenSSH PROTOCOL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_packet: u64,
    pub max_read: u64,
    pub max_write: u64,
    pub max_handles: u64,
}

/// statvfs@openssh.com's reply (OpenSSH PROTOCOL, "statvfs@openssh.com and
/// fstatvfs@openssh.com"): the fields of statvfs(3), each a uint64, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatVfs {
    pub bsize: u64,
    pub frsize: u64,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub favail: u64,
    pub fsid: u64,
    pub flag: u64,
    pub namemax: u64,
}

impl StatVfs {
    /// `f_flag` bit for a read-only file system (OpenSSH's SSH2_FXE_STATVFS_ST_RDONLY).
    pub const READ_ONLY: u64 = 0x1;

    /// statvfs(3) counts blocks in units of `f_frsize`; some servers leave it 0, so `f_bsize`
    /// stands in (as `df` does).
    fn unit(&self) -> u64 {
        if self.frsize != 0 { self.frsize } else { self.bsize }
    }

    /// Bytes an unprivileged user may still write (`f_bavail`, not `f_bfree`, which
    /// includes the blocks reserved for root).
    pub fn available_bytes(&self) -> u64 {
        self.bavail.saturating_mul(self.unit())
    }

    pub fn total_bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.unit())
    }

    fn parse(mut data: Bytes) -> Result<Self, String> {
        if data.len() < 11 * 8 {
            return Err(format!("a statvfs reply of {} bytes (88 expected)", data.len()));
        }
        let mut next = || data.get_u64();
        Ok(StatVfs {
            bsize: next(),
            frsize: next(),
            blocks: next(),
            bfree: next(),
            bavail: next(),
            files: next(),
            ffree: next(),
            favail: next(),
            fsid: next(),
            flag: next(),
            namemax: next(),
        })
    }
}

/// Replies larger than this are refused: an uploader only gets small replies, and a bogus
/// length must not make us allocate gigabytes.
const MAX_REPLY: usize = 1 << 20;

type Waiters = HashMap<u32, oneshot::Sender<Reply>>;

/// State shared by the senders and the reader task.
struct Shared {
    /// `None` once the channel is gone: later requests fail at once.
    waiters: Mutex<Option<Waiters>>,
    closed: CancellationToken,
    why: Mutex<String>,
    /// When a reply last arrived, or the first request after an idle spell was sent.
    last_progress: Mutex<Instant>,
}

impl Shared {
    fn register(&self, id: u32, tx: oneshot::Sender<Reply>) -> Result<(), Lost> {
        let mut guard = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let Some(waiters) = guard.as_mut() else { return Err(self.lost()) };
        if waiters.is_empty() {
            *self.last_progress.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        waiters.insert(id, tx);
        Ok(())
    }

    fn complete(&self, id: u32, reply: Reply) {
        *self.last_progress.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let tx = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|w| w.remove(&id));
        match tx {
            // The requester may have given up (cancelled upload): nothing to do.
            Some(tx) => drop(tx.send(reply)),
            None => tracing::debug!(id, "sftp: reply to a request nobody waits for"),
        }
    }

    fn unregister(&self, id: u32) {
        if let Some(w) = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            w.remove(&id);
        }
    }

    /// Marks the channel gone; every waiter sees its sender dropped.
    fn close(&self, why: &str) {
        {
            let mut reason = self.why.lock().unwrap_or_else(|p| p.into_inner());
            if reason.is_empty() {
                *reason = why.to_string();
            }
        }
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.closed.cancel();
    }

    fn lost(&self) -> Lost {
        let why = self.why.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Lost(if why.is_empty() { "the SFTP channel closed".into() } else { why })
    }
}

/// One SFTP session on one SSH channel. Requests may be issued concurrently from many tasks.
pub struct Session {
    /// Whole requests (header, payload) for the writer task. Unbounded: what is in flight is
    /// bounded by each upload's window of requests, not here.
    queue: mpsc::UnboundedSender<(Bytes, Option<Bytes>)>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
    /// Extensions from SSH_FXP_VERSION (OpenSSH PROTOCOL: name and version string pairs).
    pub extensions: Vec<(String, String)>,
    pub limits: Option<Limits>,
}

impl Session {
    /// Starts the `sftp` subsystem on `channel` and exchanges INIT/VERSION, then asks for
    /// limits@openssh.com when offered. Fails with a readable reason.
    pub async fn start(channel: russh::Channel<Msg>) -> Result<Session, String> {
        let (mut rx, tx) = channel.split();
        tx.request_subsystem(true, "sftp").await.map_err(|e| format!("cannot request the sftp subsystem: {e}"))?;
        loop {
            match rx.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    return Err("the server refused the sftp subsystem (is `Subsystem sftp` configured?)".into());
                }
                Some(ChannelMsg::WindowAdjusted { .. }) => {}
                Some(ChannelMsg::Close) | Some(ChannelMsg::Eof) | None => {
                    return Err("the server closed the channel instead of starting sftp".into());
                }
                Some(_) => {}
            }
        }
        // INIT has no request id: uint32 length, byte 1, uint32 version (draft-02 section 4).
        let mut init = BytesMut::with_capacity(9);
        init.put_u32(5);
        init.put_u8(fxp::INIT);
        init.put_u32(3);
        tx.data_bytes(init.freeze()).await.map_err(|e| format!("cannot send SSH_FXP_INIT: {e}"))?;

        let mut buf = BytesMut::new();
        let version = loop {
            if let Some(packet) = take_packet(&mut buf)? {
                break packet;
            }
            match rx.wait().await {
                Some(ChannelMsg::Data { data }) => buf.extend_from_slice(&data),
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    tracing::debug!("sftp server stderr: {}", String::from_utf8_lossy(&data).trim_end());
                }
                Some(ChannelMsg::Close) | Some(ChannelMsg::Eof) | None => {
                    return Err("the sftp subsystem ended before answering SSH_FXP_INIT".into());
                }
                Some(_) => {}
            }
        };
        let (version, extensions) = parse_version(version)?;
        if version < 3 {
            return Err(format!("the server speaks SFTP version {version}; version 3 is needed"));
        }

        let shared = Arc::new(Shared {
            waiters: Mutex::new(Some(HashMap::new())),
            closed: CancellationToken::new(),
            why: Mutex::new(String::new()),
            last_progress: Mutex::new(Instant::now()),
        });
        tokio::spawn(read_loop(rx, shared.clone(), buf));
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(tx, requests, shared.clone()));
        let mut session = Session { queue, shared, next_id: AtomicU32::new(1), extensions, limits: None };
        if session.has_extension(ext::LIMITS) {
            match session.call(Request::new(fxp::EXTENDED).string(ext::LIMITS)).await {
                Ok(Reply::Extended(mut data)) if data.len() >= 32 => {
                    session.limits = Some(Limits {
                        max_packet: data.get_u64(),
                        max_read: data.get_u64(),
                        max_write: data.get_u64(),
                        max_handles: data.get_u64(),
                    });
                }
                Ok(other) => tracing::debug!("sftp: unusable limits@openssh.com reply: {other:?}"),
                Err(e) => return Err(format!("limits@openssh.com failed: {e}")),
            }
        }
        Ok(session)
    }

    pub fn has_extension(&self, name: &str) -> bool {
        self.extensions.iter().any(|(n, _)| n == name)
    }

    /// Queues a request; the receiver completes with its reply, or fails when the channel
    /// is gone.
    pub fn send(&self, req: Request) -> Result<oneshot::Receiver<Reply>, Lost> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.register(id, tx)?;
        if self.queue.send(req.seal(id)).is_err() {
            self.shared.unregister(id);
            return Err(self.shared.lost());
        }
        Ok(rx)
    }

    /// What a receiver from [`Session::send`] yields once the channel is gone.
    pub fn lost(&self) -> Lost {
        self.shared.lost()
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&self, req: Request) -> Result<Reply, CallError> {
        let rx = self.send(req)?;
        rx.await.map_err(|_| CallError::Lost(self.shared.lost()))
    }

    /// A request answered by a status: `Ok` for SSH_FX_OK, the status otherwise.
    pub async fn call_status(&self, req: Request) -> Result<(), CallError> {
        match self.call(req).await? {
            Reply::Status(s) if s.code == code::OK => Ok(()),
            Reply::Status(s) => Err(CallError::Status(s)),
            other => Err(CallError::Protocol(format!("expected a status, got {}", reply_kind(&other)))),
        }
    }

    pub async fn stat(&self, path: &str) -> Result<Attrs, CallError> {
        match self.call(Request::new(fxp::STAT).string(path)).await? {
            Reply::Attrs(a) => Ok(a),
            Reply::Status(s) => Err(CallError::Status(s)),
            other => Err(CallError::Protocol(format!("expected attributes, got {}", reply_kind(&other)))),
        }
    }

    pub async fn fstat(&self, handle: &Bytes) -> Result<Attrs, CallError> {
        match self.call(Request::new(fxp::FSTAT).string(handle)).await? {
            Reply::Attrs(a) => Ok(a),
            Reply::Status(s) => Err(CallError::Status(s)),
            other => Err(CallError::Protocol(format!("expected attributes, got {}", reply_kind(&other)))),
        }
    }

    pub async fn open(&self, path: &str, pflags: u32) -> Result<Bytes, CallError> {
        match self.call(Request::new(fxp::OPEN).string(path).u32(pflags).no_attrs()).await? {
            Reply::Handle(h) => Ok(h),
            Reply::Status(s) => Err(CallError::Status(s)),
            other => Err(CallError::Protocol(format!("expected a handle, got {}", reply_kind(&other)))),
        }
    }

    /// SSH_FXP_READ: up to `len` bytes at `offset`; `None` at the end of the file.
    pub async fn read(&self, handle: &Bytes, offset: u64, len: u32) -> Result<Option<Bytes>, CallError> {
        match self.call(Request::new(fxp::READ).string(handle).u64(offset).u32(len)).await? {
            Reply::Data(d) => Ok(Some(d)),
            Reply::Status(s) if s.code == code::EOF => Ok(None),
            Reply::Status(s) => Err(CallError::Status(s)),
            other => Err(CallError::Protocol(format!("expected data, got {}", reply_kind(&other)))),
        }
    }

    pub async fn close_handle(&self, handle: &Bytes) -> Result<(), CallError> {
        self.call_status(Request::new(fxp::CLOSE).string(handle)).await
    }

    pub async fn remove(&self, path: &str) -> Result<(), CallError> {
        self.call_status(Request::new(fxp::REMOVE).string(path)).await
    }

    pub async fn mkdir(&self, path: &str) -> Result<(), CallError> {
        self.call_status(Request::new(fxp::MKDIR).string(path).no_attrs()).await
    }

    /// Plain SSH_FXP_RENAME. OpenSSH implements it as link()+unlink() for regular files, so it
    /// fails when `to` exists: an atomic no-clobber publish.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), CallError> {
        self.call_status(Request::new(fxp::RENAME).string(from).string(to)).await
    }

    /// posix-rename@openssh.com: rename(2), atomically replacing `to`.
    pub async fn posix_rename(&self, from: &str, to: &str) -> Result<(), CallError> {
        self.call_status(Request::new(fxp::EXTENDED).string(ext::POSIX_RENAME).string(from).string(to)).await
    }

    pub async fn fsync(&self, handle: &Bytes) -> Result<(), CallError> {
        self.call_status(Request::new(fxp::EXTENDED).string(ext::FSYNC).string(handle)).await
    }

    /// statvfs@openssh.com on `path`; only servers that list the extension answer it.
    pub async fn statvfs(&self, path: &str) -> Result<StatVfs, CallError> {
        match self.call(Request::new(fxp::EXTENDED).string(ext::STATVFS).string(path)).await? {
            Reply::Extended(data) => StatVfs::parse(data).map_err(CallError::Protocol),
            Reply::Status(s) => Err(CallError::Status(s)),
            other => Err(CallError::Protocol(format!("expected an extended reply, got {}", reply_kind(&other)))),
        }
    }

    pub async fn realpath(&self, path: &str) -> Result<String, CallError> {
        match self.call(Request::new(fxp::REALPATH).string(path)).await? {
            Reply::Name(mut names) if !names.is_empty() => Ok(names.swap_remove(0)),
            Reply::Status(s) => Err(CallError::Status(s)),
            other => Err(CallError::Protocol(format!("expected a name, got {}", reply_kind(&other)))),
        }
    }

    /// Requests waiting for a reply, and since when nothing has moved. The connection's
    /// watchdog uses this to detect a stalled server (OpenSSH `ServerAliveCountMax` logic).
    pub fn stalled_for(&self) -> Option<Duration> {
        let busy =
            self.shared.waiters.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|w| !w.is_empty());
        busy.then(|| self.shared.last_progress.lock().unwrap_or_else(|p| p.into_inner()).elapsed())
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Fails every request in flight and refuses new ones.
    pub fn close(&self, why: &str) {
        self.shared.close(why);
    }

    /// Resolves when the channel is gone.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.close("the SFTP session was closed");
    }
}

fn reply_kind(r: &Reply) -> &'static str {
    match r {
        Reply::Status(_) => "a status",
        Reply::Handle(_) => "a handle",
        Reply::Attrs(_) => "attributes",
        Reply::Name(_) => "a name",
        Reply::Data(_) => "data",
        Reply::Extended(_) => "an extended reply",
    }
}

/// Sends queued requests, each whole, until the channel or the session goes away.
async fn write_loop(
    tx: ChannelWriteHalf<Msg>,
    mut requests: mpsc::UnboundedReceiver<(Bytes, Option<Bytes>)>,
    shared: Arc<Shared>,
) {
    loop {
        let next = tokio::select! {
            _ = shared.closed.cancelled() => return,
            next = requests.recv() => next,
        };
        let Some((head, payload)) = next else { return };
        // A dead connection never opens the window again: do not wait on it forever.
        let sent = tokio::select! {
            _ = shared.closed.cancelled() => return,
            r = async {
                tx.data_bytes(head).await?;
                if let Some(p) = payload {
                    tx.data_bytes(p).await?;
                }
                Ok::<(), russh::Error>(())
            } => r,
        };
        if let Err(e) = sent {
            shared.close(&format!("cannot send to the server: {e}"));
            return;
        }
    }
}

async fn read_loop(mut rx: ChannelReadHalf, shared: Arc<Shared>, mut buf: BytesMut) {
    let why = loop {
        loop {
            match take_packet(&mut buf) {
                Ok(Some(packet)) => match parse_reply(packet) {
                    Ok((id, reply)) => shared.complete(id, reply),
                    Err(e) => {
                        shared.close(&format!("unreadable reply from the server: {e}"));
                        return;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    shared.close(&e);
                    return;
                }
            }
        }
        let msg = tokio::select! {
            _ = shared.closed.cancelled() => return,
            msg = rx.wait() => msg,
        };
        match msg {
            Some(ChannelMsg::Data { data }) => buf.extend_from_slice(&data),
            Some(ChannelMsg::ExtendedData { data, .. }) => {
                tracing::debug!("sftp server stderr: {}", String::from_utf8_lossy(&data).trim_end());
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                tracing::debug!(exit_status, "sftp server exited");
            }
            Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) => break "the server closed the SFTP channel",
            None => break "the connection to the server was lost",
            Some(_) => {}
        }
    };
    shared.close(why);
}

/// Takes one whole packet (type byte onwards) off the front of `buf`.
fn take_packet(buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_REPLY {
        return Err(format!("the server sent an SFTP packet of {len} bytes; not an SFTP server?"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// A cursor over a reply that fails instead of panicking on short input.
struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), String> {
        if self.0.remaining() < n { Err("truncated packet".into()) } else { Ok(()) }
    }
    fn u8(&mut self) -> Result<u8, String> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, String> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn string(&mut self) -> Result<String, String> {
        Ok(String::from_utf8_lossy(&self.bytes()?).into_owned())
    }
    fn attrs(&mut self) -> Result<Attrs, String> {
        // draft-02 section 5: flags, then each present field in a fixed order.
        let flags = self.u32()?;
        let mut a = Attrs::default();
        if flags & 0x1 != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & 0x2 != 0 {
            self.u32()?;
            self.u32()?;
        }
        if flags & 0x4 != 0 {
            a.permissions = Some(self.u32()?);
        }
        if flags & 0x8 != 0 {
            self.u32()?;
            self.u32()?;
        }
        if flags & 0x8000_0000 != 0 {
            for _ in 0..self.u32()? {
                self.bytes()?;
                self.bytes()?;
            }
        }
        Ok(a)
    }
}

fn parse_version(packet: Bytes) -> Result<(u32, Vec<(String, String)>), String> {
    let mut r = Reader(packet);
    let kind = r.u8()?;
    if kind != fxp::VERSION {
        return Err(format!("expected SSH_FXP_VERSION, got packet type {kind}"));
    }
    let version = r.u32()?;
    let mut extensions = Vec::new();
    while r.0.has_remaining() {
        extensions.push((r.string()?, r.string()?));
    }
    Ok((version, extensions))
}

fn parse_reply(packet: Bytes) -> Result<(u32, Reply), String> {
    let mut r = Reader(packet);
    let kind = r.u8()?;
    let id = r.u32()?;
    let reply = match kind {
        fxp::STATUS => {
            let code = r.u32()?;
            // Some v3 servers omit the message and language tag.
            let message = if r.0.has_remaining() { r.string()? } else { String::new() };
            Reply::Status(Status { code, message })
        }
        fxp::HANDLE => Reply::Handle(r.bytes()?),
        fxp::DATA => Reply::Data(r.bytes()?),
        fxp::ATTRS => Reply::Attrs(r.attrs()?),
        fxp::NAME => {
            let count = r.u32()?;
            let mut names = Vec::new();
            for _ in 0..count {
                names.push(r.string()?);
                r.bytes()?;
                r.attrs()?;
            }
            Reply::Name(names)
        }
        fxp::EXTENDED_REPLY => Reply::Extended(r.0.split_off(0)),
        other => return Err(format!("unexpected packet type {other}")),
    };
    Ok((id, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_request_layout() {
        let (head, payload) =
            Request::new(fxp::WRITE).string(b"h1").u64(0x0102_0304_0506_0708).data(Bytes::from_static(b"abc")).seal(7);
        let payload = payload.unwrap();
        // length counts everything after itself, payload included.
        let len = u32::from_be_bytes(head[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, head.len() - 4 + payload.len());
        assert_eq!(head[4], fxp::WRITE);
        assert_eq!(&head[5..9], &7u32.to_be_bytes());
        assert_eq!(&head[9..15], b"\0\0\0\x02h1");
        assert_eq!(&head[15..23], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&head[23..27], &3u32.to_be_bytes());
        assert_eq!(&payload[..], b"abc");
    }

    fn status_packet(id: u32, code: u32, msg: &str) -> Bytes {
        let (head, _) = Request::new(fxp::STATUS).u32(code).string(msg).string("").seal(id);
        head.slice(4..)
    }

    #[test]
    fn unknown_status_codes_are_kept_with_their_number() {
        let (id, reply) = parse_reply(status_packet(9, 11, "File exists")).unwrap();
        assert_eq!(id, 9);
        let Reply::Status(s) = reply else { panic!("not a status") };
        assert_eq!(s.code, 11);
        assert_eq!(
            s.to_string(),
            "SSH_FX_FILE_ALREADY_EXISTS (11, a status code SFTP v3 does not define): File exists"
        );
        assert_eq!(code::describe(4), "SSH_FX_FAILURE (4)");
        assert_eq!(code::describe(4242), "unknown status code 4242");
    }

    #[test]
    fn short_status_and_truncated_packets() {
        let mut p = BytesMut::new();
        p.put_u8(fxp::STATUS);
        p.put_u32(1);
        p.put_u32(0);
        let (_, reply) = parse_reply(p.freeze()).unwrap();
        assert!(matches!(reply, Reply::Status(Status { code: 0, .. })));
        assert!(parse_reply(Bytes::from_static(&[fxp::HANDLE, 0, 0, 0, 1, 0, 0, 0, 9, b'x'])).is_err());
    }

    #[test]
    fn packets_are_reassembled_from_pieces() {
        let whole = status_packet(3, 0, "ok");
        let mut framed = BytesMut::new();
        framed.put_u32(whole.len() as u32);
        framed.put_slice(&whole);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&framed[..6]);
        assert_eq!(take_packet(&mut buf).unwrap(), None);
        buf.extend_from_slice(&framed[6..]);
        assert_eq!(take_packet(&mut buf).unwrap().unwrap(), whole);
        assert!(buf.is_empty());
        let mut bogus = BytesMut::from(&b"SSH-2.0-x\r\n"[..]);
        assert!(take_packet(&mut bogus).is_err());
    }

    #[test]
    fn statvfs_reply_fields_in_order() {
        let mut p = BytesMut::new();
        for v in [4096u64, 1024, 1000, 600, 500, 64, 32, 30, 7, StatVfs::READ_ONLY, 255] {
            p.put_u64(v);
        }
        let s = StatVfs::parse(p.freeze()).unwrap();
        assert_eq!((s.bsize, s.frsize, s.blocks, s.bavail, s.namemax), (4096, 1024, 1000, 500, 255));
        assert_eq!((s.available_bytes(), s.total_bytes()), (500 * 1024, 1000 * 1024));
        assert_eq!(s.flag & StatVfs::READ_ONLY, 1);
        let no_frsize = StatVfs { bsize: 512, bavail: 2, ..Default::default() };
        assert_eq!(no_frsize.available_bytes(), 1024);
        assert!(StatVfs::parse(Bytes::from_static(&[0; 80])).is_err());
    }

    #[test]
    fn attributes_and_version() {
        let mut p = BytesMut::new();
        p.put_u8(fxp::ATTRS);
        p.put_u32(5);
        p.put_u32(0x1 | 0x4 | 0x8);
        p.put_u64(1234);
        p.put_u32(0o040755);
        p.put_u32(1);
        p.put_u32(2);
        let (_, reply) = parse_reply(p.freeze()).unwrap();
        let Reply::Attrs(a) = reply else { panic!("not attrs") };
        assert_eq!((a.size, a.is_dir()), (Some(1234), Some(true)));

        let mut v = BytesMut::new();
        v.put_u8(fxp::VERSION);
        v.put_u32(3);
        for s in ["posix-rename@openssh.com", "1", "limits@openssh.com", "1"] {
            v.put_u32(s.len() as u32);
            v.put_slice(s.as_bytes());
        }
        let (version, ext) = parse_version(v.freeze()).unwrap();
        assert_eq!(version, 3);
        assert_eq!(ext[1], ("limits@openssh.com".to_string(), "1".to_string()));
    }
}
