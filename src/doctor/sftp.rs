//! The doctor's SFTP checks: one connection taken a step at a time, so the failing step
//! names itself. DNS and TCP are done here; the handshake, host key, authentication and SFTP
//! session come from the sink's own [`Dialer`] (the same algorithms, host key policy and
//! authentication order an export uses). Then the directory: stat, a probe file written,
//! renamed and removed (what publishing a file does), and the free space where the server
//! offers statvfs@openssh.com.
//!
//! One attempt per step, each bounded by `--sftp-connect-timeout`: the export's reconnect
//! budget would only delay the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Checklist, PROBE_CONTENT, Steps, probe_name};
use crate::error::exit;
use crate::progress::human_bytes;
use crate::write::sftp::SftpConfig;
use crate::write::sftp::connect::{Conn, Dialer};
use crate::write::sftp::hostkey::{self, HostKeyPolicy, Verdict};
use crate::write::sftp::protocol::{CallError, Request, code, ext, fxp, open};
use crate::write::{TargetOptions, WriteError};

const STEPS: &[&str] = &[
    "sftp: DNS",
    "sftp: TCP connect",
    "sftp: SSH handshake",
    "sftp: host key",
    "sftp: authentication",
    "sftp: SFTP session",
    "sftp: remote directory",
    "sftp: writable",
    "sftp: rename",
    "sftp: free space",
];

pub async fn check(cfg: &SftpConfig, target: &TargetOptions, list: &mut Checklist) {
    let mut steps = Steps::new(list, STEPS);
    let mut cfg = cfg.clone();
    // known_hosts lines given as text are read by russh from a file, as for the sink.
    let _lines = match &cfg.host_keys {
        HostKeyPolicy::KnownHostsLines(lines) => match hostkey::KnownHostsLines::materialize(lines) {
            Ok(file) => {
                cfg.host_keys = HostKeyPolicy::KnownHosts(file.path().to_path_buf());
                Some(file)
            }
            Err(e) => {
                return steps.fail(
                    format!("cannot write the known_hosts lines to a temporary file: {e}"),
                    "check TMPDIR",
                    exit::INTERNAL,
                );
            }
        },
        _ => None,
    };
    let policy = cfg.host_keys.clone();
    let timeout = cfg.connect_timeout;
    let (host, port, user) = (cfg.host.clone(), cfg.port(), cfg.user.clone());
    let dialer = match Dialer::new(Arc::new(cfg.clone())) {
        Ok(d) => d,
        Err(e) => {
            // The private key is read before any I/O; nothing later can run without it.
            let text = e.to_string();
            steps.list.fail("sftp: private key", text, "check the key file and its passphrase", exit::AUTH);
            return steps.skip_rest("needs sftp: private key");
        }
    };

    // DNS
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port))).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return steps.fail(
                    format!("cannot resolve {host}: {e}"),
                    "check the host name in --to (or SFTP_HOST) and this machine's DNS",
                    exit::TARGET,
                );
            }
            Err(_) => {
                return steps.fail(
                    format!("no DNS answer for {host} within {}s", timeout.as_secs_f64()),
                    "check this machine's DNS servers",
                    exit::TARGET,
                );
            }
        };
    if addrs.is_empty() {
        return steps.fail(format!("{host} resolves to no address"), "check the host name", exit::TARGET);
    }
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    steps.ok(format!("{host} resolves to {}", shown.join(", ")));

    // TCP
    let mut socket = None;
    let mut error = String::new();
    for addr in &addrs {
        let started = Instant::now();
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                steps.ok(format!("connected to {addr} in {} ms", started.elapsed().as_millis()));
                socket = Some(s);
                break;
            }
            Ok(Err(e)) => error = format!("cannot connect to {host}:{port} ({addr}): {e}"),
            Err(_) => error = format!("no answer from {addr} within {}s (--sftp-connect-timeout)", timeout.as_secs()),
        }
    }
    let Some(socket) = socket else {
        return steps.fail(
            error,
            "check the port (sftp://USER@HOST:PORT or SFTP_PORT), that the server runs, and the firewalls on the way \
             (partners often allow only listed source addresses)",
            exit::TARGET,
        );
    };

    // SSH handshake and host key
    let Ok((handshake, seen)) = tokio::time::timeout(timeout, dialer.handshake(socket)).await else {
        return steps.fail(
            format!("no SSH handshake within {}s (--sftp-connect-timeout)", timeout.as_secs()),
            "check that this port is an SSH server and nothing in between swallows the connection",
            exit::TARGET,
        );
    };
    let key = seen.host_key.clone();
    match (&seen.negotiated, &key, &handshake) {
        (Some(n), _, _) => steps.ok(n.to_string()),
        (None, Some((algorithm, _)), Err(WriteError::HostKey { .. })) => steps.ok(format!(
            "the server presented an {algorithm} host key (the key exchange stops there until the key is trusted)"
        )),
        (_, _, Err(e)) => {
            let fix = match e {
                WriteError::Negotiation { flag, .. } => format!("pass {flag} with an algorithm the server offers"),
                _ => "check that this port is an SSH server (`ssh -v -p PORT USER@HOST` shows the same)".to_string(),
            };
            let text = e.to_string();
            return steps.fail(text, fix, exit::TARGET);
        }
        (None, _, Ok(_)) => steps.ok("completed"),
    }
    let mut handshake = match handshake {
        Ok(h) => {
            let (algorithm, fingerprint) = key.unwrap_or_default();
            let against = match &policy {
                HostKeyPolicy::Fingerprints(_) => "matches --host-key-fingerprint".to_string(),
                HostKeyPolicy::KnownHosts(p) => format!("matches known_hosts file {}", p.display()),
                HostKeyPolicy::KnownHostsLines(_) => "matches the known_hosts lines given".to_string(),
                HostKeyPolicy::AcceptAny => "is NOT verified (--insecure-accept-any-host-key)".to_string(),
            };
            steps.ok(format!("{fingerprint} ({algorithm}) {against}"));
            h
        }
        Err(WriteError::HostKey { message, .. }) => {
            let fix = match &seen.verdict {
                Some(Verdict::Mismatch { got, known_hosts, .. }) => {
                    let source = match known_hosts {
                        Some(p) => format!("known_hosts file {}", p.display()),
                        None => "--host-key-fingerprint".to_string(),
                    };
                    format!(
                        "confirm the server's fingerprint {got} with its owner (not over this connection), then update \
                         {source}; if the key was not supposed to change, do not connect"
                    )
                }
                Some(Verdict::Unknown { got, known_hosts }) => {
                    let file = known_hosts.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                    format!(
                        "confirm {got} with the server's owner, then `ssh-keyscan -p {port} {host} >> {file}` or pass \
                         --host-key-fingerprint {got}"
                    )
                }
                _ => "fix or replace the known_hosts file (--known-hosts)".to_string(),
            };
            return steps.fail(message, fix, exit::AUTH);
        }
        Err(e) => {
            let text = e.to_string();
            return steps.fail(text, "see the message", exit::TARGET);
        }
    };

    // Authentication
    match tokio::time::timeout(timeout, dialer.login(&mut handshake)).await {
        Ok(Ok(method)) => steps.ok(format!("{method} accepted for user '{user}'")),
        Ok(Err(e)) => {
            let code = if e.is_permission() { exit::AUTH } else { exit::TARGET };
            let text = e.to_string();
            return steps.fail(
                text,
                format!(
                    "check the user name and the credentials: the key's public half must be in {user}'s \
                     authorized_keys on the server (`ssh-keygen -y -f KEY` prints it), or the password must be right"
                ),
                code,
            );
        }
        Err(_) => {
            return steps.fail(
                format!("no answer to authentication within {}s", timeout.as_secs()),
                "the server may be overloaded or waiting on PAM; try again or raise --sftp-connect-timeout",
                exit::TARGET,
            );
        }
    }

    // SFTP session
    let conn = match tokio::time::timeout(timeout, dialer.open_sftp(handshake)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let text = e.to_string();
            return steps.fail(
                text,
                "the account must be allowed the sftp subsystem (OpenSSH: `Subsystem sftp internal-sftp`); \
                 shell-only or SCP-only accounts cannot be used",
                exit::TARGET,
            );
        }
        Err(_) => {
            return steps.fail(
                format!("the SFTP subsystem did not start within {}s", timeout.as_secs()),
                "check the server's sftp subsystem",
                exit::TARGET,
            );
        }
    };
    let extensions: Vec<&str> = conn.sftp.extensions.iter().map(|(n, _)| n.as_str()).collect();
    steps.ok(format!(
        "SFTP version 3; server extensions: {}",
        if extensions.is_empty() { "none".to_string() } else { extensions.join(", ") }
    ));

    directory(&conn, &cfg, target, timeout, &mut steps).await;
    conn.kill("doctor finished");
}

/// `sftp://user@host/abs/dir` or `.../~/relative`, as the sink shows remote paths.
fn shown(cfg: &SftpConfig, path: &str) -> String {
    if path.starts_with('/') {
        format!("{}{path}", cfg.origin())
    } else if path == "." {
        format!("{}/~", cfg.origin())
    } else {
        format!("{}/~/{path}", cfg.origin())
    }
}

fn status_code(e: &CallError) -> Option<u32> {
    match e {
        CallError::Status(s) => Some(s.code),
        _ => None,
    }
}

fn is_permission(e: &CallError) -> bool {
    matches!(status_code(e), Some(code::PERMISSION_DENIED | code::WRITE_PROTECT))
}

/// Bounds one request: a server that stops answering fails the step instead of hanging.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::time::timeout(timeout, call).await.unwrap_or_else(|_| {
        Err(CallError::Protocol(format!("no reply within {}s (--sftp-connect-timeout)", timeout.as_secs())))
    })
}

async fn directory(conn: &Conn, cfg: &SftpConfig, target: &TargetOptions, timeout: Duration, steps: &mut Steps<'_>) {
    let sftp = &conn.sftp;
    let dir = cfg.remote_dir();
    let dir_shown = shown(cfg, dir);
    match bounded(timeout, sftp.stat(dir)).await {
        Ok(a) if a.is_dir() == Some(false) => {
            return steps.fail(
                format!("{dir_shown} is not a directory"),
                "correct the directory in --to (or SFTP_DIRECTORY)",
                exit::TARGET,
            );
        }
        Ok(_) => {
            let real = bounded(timeout, sftp.realpath(dir)).await.map(|r| format!(" ({r} on the server)"));
            steps.ok(format!("{dir_shown} exists{}", real.unwrap_or_default()));
        }
        Err(e) if matches!(status_code(&e), Some(code::NO_SUCH_FILE | code::NO_SUCH_PATH)) => {
            if target.create_dirs {
                steps.ok(format!("{dir_shown} does not exist; the export creates it (--create-dirs)"));
                return steps.skip_rest("the directory does not exist yet");
            }
            return steps.fail(
                format!("{dir_shown} not found ({e})"),
                "create it on the server, correct the path (absolute: sftp://HOST/dir; in the login directory: \
                 sftp://HOST/~/dir), or pass --create-dirs",
                exit::TARGET,
            );
        }
        Err(e) if is_permission(&e) => {
            return steps.fail(
                format!("permission denied: cannot open {dir_shown} ({e})"),
                format!("ask the server's owner to give '{}' access to the directory", cfg.user),
                exit::AUTH,
            );
        }
        Err(e) => {
            return steps.fail(format!("cannot open {dir_shown}: {e}"), "see the server's answer", exit::TARGET);
        }
    }

    // Writable: create, write, close; then rename it as a publish would, then remove it.
    let probe = cfg.remote_path(&probe_name());
    let written = bounded(timeout, async {
        let handle = sftp.open(&probe, open::WRITE | open::CREAT | open::EXCL).await?;
        let wrote = sftp
            .call_status(Request::new(fxp::WRITE).string(&handle).u64(0).data(Bytes::from_static(PROBE_CONTENT)))
            .await;
        let closed = sftp.close_handle(&handle).await;
        wrote.and(closed)
    })
    .await;
    if let Err(e) = written {
        // A file may have been created before the write failed.
        let _ = bounded(timeout, sftp.remove(&probe)).await;
        let (code, fix) = if is_permission(&e) {
            (
                exit::AUTH,
                format!(
                    "'{}' may not create files in {dir_shown}: ask the server's owner for write permission, or \
                     choose a directory it can write",
                    cfg.user
                ),
            )
        } else {
            (exit::TARGET, "the server could not write the file: check its disk space and quota".to_string())
        };
        return steps.fail(format!("cannot write {} ({e})", shown(cfg, &probe)), fix, code);
    }
    let renamed_to = format!("{probe}.renamed");
    let renamed = if cfg.inplace { None } else { Some(bounded(timeout, sftp.rename(&probe, &renamed_to)).await) };
    let left = if matches!(renamed, Some(Ok(()))) { &renamed_to } else { &probe };
    if let Err(e) = bounded(timeout, sftp.remove(left)).await {
        // A rename whose answer was lost may have happened after all: try the other name.
        let other = if left == &probe { &renamed_to } else { &probe };
        if renamed.is_some() && bounded(timeout, sftp.remove(other)).await.is_ok() {
            steps.ok(format!("wrote and removed {}", shown(cfg, other)));
        } else {
            return steps.fail(
                format!("wrote {} but cannot remove it ({e})", shown(cfg, left)),
                "remove the probe file by hand; the export needs to remove its partial files on failure",
                if is_permission(&e) { exit::AUTH } else { exit::TARGET },
            );
        }
    } else {
        let what = match &renamed {
            None => "wrote and removed",
            Some(Ok(())) => "wrote, renamed and removed",
            Some(Err(_)) => "wrote and removed (the rename failed, see below)",
        };
        steps.ok(format!("{what} {}", shown(cfg, &probe)));
    }

    let posix = sftp.has_extension(ext::POSIX_RENAME);
    match renamed {
        None => steps.skip("--inplace writes the final names directly, without a rename"),
        Some(Ok(())) if posix => {
            steps.ok("plain rename works; posix-rename@openssh.com offered (--overwrite replaces files atomically)")
        }
        Some(Ok(())) => steps.ok(
            "plain rename works; posix-rename@openssh.com not offered (--overwrite removes the old file, then renames)",
        ),
        Some(Err(e)) => {
            let code = if is_permission(&e) { exit::AUTH } else { exit::TARGET };
            return steps.fail(
                format!("the server refused to rename {} ({e})", shown(cfg, &probe)),
                "pass --inplace to write the final names directly (a reader may then see a file being written)",
                code,
            );
        }
    }

    if !sftp.has_extension(ext::STATVFS) {
        return steps.skip("the server does not offer statvfs@openssh.com");
    }
    match bounded(timeout, sftp.statvfs(dir)).await {
        Ok(vfs) if vfs.available_bytes() == 0 => steps.fail(
            format!("no space left on the server's file system ({} in all)", human_bytes(vfs.total_bytes())),
            "ask the server's owner to free space or raise the quota",
            exit::TARGET,
        ),
        Ok(vfs) => {
            steps.ok(format!("{} available of {}", human_bytes(vfs.available_bytes()), human_bytes(vfs.total_bytes())))
        }
        Err(e) => steps.skip(format!("statvfs@openssh.com failed: {e}")),
    }
}
