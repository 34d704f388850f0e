//! The SFTP sink against a real OpenSSH server (tests/common/sshd.rs): the sink conformance
//! suite, authentication, host key verification, faults injected by a TCP proxy between the
//! sink and sshd (tests/common/proxy.rs), big files, and the end-to-end export through the
//! binary.

mod common;

use std::path::Path;
use std::sync::Arc;

use bq2sftp::write::sftp::hostkey::HostKeyPolicy;
use bq2sftp::write::sftp::{Secret, SftpConfig, Verify};
use bq2sftp::write::{PutMode, Sink, TargetOptions, WriteError};
use bytes::Bytes;
use common::conformance::{self, payload, upload};
use common::proxy::{Fault, Proxy};
use common::sshd::{self, Sshd, SshdOptions};
use sha2::Digest;

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let sshd = Sshd::start();
            conformance::$name(sshd.sink(""), &sshd.root).await;
        }
    )*};
}

conformance_tests!(
    publishes_whole_file,
    invisible_until_complete,
    abort_leaves_nothing,
    overwrite_rules,
    empty_file,
    concurrent_uploads,
    check_passes,
);

fn sink(sshd: &Sshd, cfg: SftpConfig) -> Arc<dyn Sink> {
    sshd.sink_with(cfg, TargetOptions::default())
}

/// Uploads a small file and returns what the attempt said.
async fn try_upload(sink: Arc<dyn Sink>, name: &str) -> Result<u64, WriteError> {
    sink.check().await?;
    upload(sink.as_ref(), name, b"hello\n", &[6], PutMode::Create).await
}

fn no_partials(dir: &Path) {
    let left: Vec<_> = common::files_in(dir).into_iter().filter(|n| n.ends_with(".partial")).collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

// ---- authentication ----

#[tokio::test]
async fn password_authentication_and_a_wrong_password() {
    let Some(sshd) = Sshd::with_password_user(SshdOptions::default()) else { return };
    let mut cfg = sshd.config("");
    cfg.identity = None;
    cfg.password = Some(Secret::new(sshd::PASSWORD));
    try_upload(sink(&sshd, cfg.clone()), "pw.txt").await.unwrap();
    assert_eq!(std::fs::read(sshd.root.join("pw.txt")).unwrap(), b"hello\n");

    cfg.password = Some(Secret::new("not-the-password"));
    let err = try_upload(sink(&sshd, cfg), "nope.txt").await.unwrap_err();
    assert!(matches!(err, WriteError::Auth { .. }) && err.is_permission(), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("refused user 'bq2sftp-test'") && text.contains("password"), "{text}");
    assert!(!text.contains("not-the-password"), "the password never appears in errors");
}

#[tokio::test]
async fn keyboard_interactive_when_the_server_only_offers_that() {
    let Some(sshd) = Sshd::with_password_user(SshdOptions { keyboard_interactive: true, ..Default::default() }) else {
        return;
    };
    let mut cfg = sshd.config("");
    cfg.identity = None;
    cfg.password = Some(Secret::new(sshd::PASSWORD));
    try_upload(sink(&sshd, cfg), "kbd.txt").await.unwrap();
    assert!(sshd.log().contains("Accepted keyboard-interactive"), "{}", sshd.log());
}

#[tokio::test]
async fn key_types_rsa_ecdsa_and_an_encrypted_key() {
    let sshd = Sshd::start();
    let keys = tempfile::tempdir().unwrap();
    for (name, kind, passphrase) in [("rsa", "rsa", ""), ("ecdsa", "ecdsa", ""), ("enc", "ed25519", "correct horse")] {
        let key = sshd::keygen(keys.path(), name, kind, passphrase);
        sshd.authorize(&key);
        let mut cfg = sshd.config("");
        cfg.identity = Some(key);
        cfg.passphrase = (!passphrase.is_empty()).then(|| Secret::new(passphrase));
        try_upload(sink(&sshd, cfg), &format!("{name}.txt")).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // RSA signs with SHA-2 (OpenSSH 8.8+ refuses ssh-rsa/SHA-1 by default anyway).
    assert!(sshd.log().contains("Accepted publickey") && sshd.log().contains("RSA SHA256:"), "{}", sshd.log());

    let mut cfg = sshd.config("");
    cfg.identity = Some(keys.path().join("enc"));
    cfg.passphrase = Some(Secret::new("wrong"));
    let err =
        bq2sftp::write::sftp::SftpSink::new(cfg, TargetOptions::default()).err().expect("a wrong passphrase fails");
    assert!(err.is_permission() && err.to_string().contains("wrong passphrase"), "{err}");

    let stranger = sshd::keygen(keys.path(), "stranger", "ed25519", "");
    let mut cfg = sshd.config("");
    cfg.identity = Some(stranger);
    let err = try_upload(sink(&sshd, cfg), "x.txt").await.unwrap_err();
    assert!(matches!(err, WriteError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("publickey"), "{err}");
}

// ---- host keys ----

#[tokio::test]
async fn known_hosts_plain_hashed_and_host_port() {
    let sshd = Sshd::start();
    // Plain `[127.0.0.1]:PORT key` (the harness writes that form).
    let mut cfg = sshd.config("");
    cfg.host_keys = HostKeyPolicy::KnownHosts(sshd.known_hosts.clone());
    try_upload(sink(&sshd, cfg), "plain.txt").await.unwrap();

    // Hashed by ssh-keygen -H, and reached by name rather than address.
    let dir = tempfile::tempdir().unwrap();
    let hashed = dir.path().join("known_hosts");
    let line = std::fs::read_to_string(&sshd.known_hosts).unwrap();
    std::fs::write(&hashed, line.replace("[127.0.0.1]", "[localhost]")).unwrap();
    let out = std::process::Command::new("ssh-keygen").arg("-H").arg("-f").arg(&hashed).output().unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&hashed).unwrap();
    assert!(text.starts_with("|1|") && !text.contains("localhost"), "{text}");
    let mut cfg = sshd.config("");
    cfg.host = "localhost".into();
    cfg.host_keys = HostKeyPolicy::KnownHosts(hashed);
    try_upload(sink(&sshd, cfg), "hashed.txt").await.unwrap();
}

#[tokio::test]
async fn a_changed_host_key_is_refused_before_authenticating() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let other = sshd::keygen(dir.path(), "impostor", "ed25519", "");
    let other_pub = sshd::public_key(&other);
    let kh = dir.path().join("known_hosts");
    let mut parts = other_pub.split_whitespace();
    std::fs::write(&kh, format!("[127.0.0.1]:{} {} {}\n", sshd.port, parts.next().unwrap(), parts.next().unwrap()))
        .unwrap();
    let mut cfg = sshd.config("");
    cfg.host_keys = HostKeyPolicy::KnownHosts(kh);
    let err = try_upload(sink(&sshd, cfg), "mitm.txt").await.unwrap_err();
    assert!(matches!(err, WriteError::HostKey { .. }) && err.is_permission(), "{err:?}");
    let text = err.to_string();
    let expected =
        std::process::Command::new("ssh-keygen").arg("-lf").arg(other.with_extension("pub")).output().unwrap();
    let expected = String::from_utf8_lossy(&expected.stdout).split_whitespace().nth(1).unwrap().to_string();
    assert!(text.contains(&expected) && text.contains(&sshd.fingerprint) && text.contains("does not match"), "{text}");
    assert!(common::files_in(&sshd.root).is_empty(), "nothing was written");
    assert!(!sshd.log().contains("Accepted"), "no authentication happened: {}", sshd.log());
}

#[tokio::test]
async fn an_unknown_host_and_pinned_fingerprints() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("known_hosts");
    std::fs::write(&empty, "").unwrap();
    let mut cfg = sshd.config("");
    cfg.host_keys = HostKeyPolicy::KnownHosts(empty);
    let err = try_upload(sink(&sshd, cfg), "u.txt").await.unwrap_err();
    let text = err.to_string();
    assert!(err.is_permission() && text.contains("not in known_hosts") && text.contains(&sshd.fingerprint), "{text}");
    assert!(text.contains("ssh-keyscan"), "{text}");

    // The harness pins the real fingerprint by default; a wrong pin is refused.
    try_upload(sshd.sink(""), "pinned.txt").await.unwrap();
    let mut cfg = sshd.config("");
    cfg.host_keys = HostKeyPolicy::Fingerprints(vec!["SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".into()]);
    let err = try_upload(sink(&sshd, cfg), "wrongpin.txt").await.unwrap_err();
    assert!(err.to_string().contains("--host-key-fingerprint") && err.to_string().contains(&sshd.fingerprint), "{err}");
    assert_eq!(common::files_in(&sshd.root), ["pinned.txt"]);

    let mut cfg = sshd.config("");
    cfg.host_keys = HostKeyPolicy::AcceptAny;
    try_upload(sink(&sshd, cfg), "insecure.txt").await.unwrap();
}

// ---- algorithms and network failures ----

#[tokio::test]
async fn no_common_cipher_names_both_sides() {
    let sshd = Sshd::start_with(SshdOptions { extra: "Ciphers aes256-ctr\n".into(), ..Default::default() });
    let mut cfg = sshd.config("");
    cfg.ciphers = Some("aes128-gcm@openssh.com".into());
    let err = try_upload(sink(&sshd, cfg), "c.txt").await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WriteError::Negotiation { .. }), "{err:?}");
    assert!(
        text.contains("aes128-gcm@openssh.com") && text.contains("aes256-ctr") && text.contains("--ciphers"),
        "{text}"
    );
    let mut cfg = sshd.config("");
    cfg.ciphers = Some("+aes256-ctr".into());
    try_upload(sink(&sshd, cfg), "ctr.txt").await.unwrap();
}

#[tokio::test]
async fn a_closed_port_fails_after_bounded_retries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sshd = Sshd::start();
    let mut cfg = sshd.config_for_port("", port);
    cfg.retries = 2;
    let err = try_upload(sink(&sshd, cfg), "x").await.unwrap_err();
    assert!(matches!(err, WriteError::Connect { attempts: 3, .. }), "{err:?}");
    assert!(!err.is_permission() && !err.is_resumable());
    assert!(err.to_string().contains("Connection refused"), "{err}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // Accepts TCP connections and says nothing, like a firewall that swallows the handshake.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let sshd = Sshd::start();
    let mut cfg = sshd.config_for_port("", port);
    cfg.retries = 1;
    cfg.connect_timeout = std::time::Duration::from_millis(300);
    let err = try_upload(sink(&sshd, cfg), "x").await.unwrap_err();
    assert!(matches!(err, WriteError::Connect { attempts: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("--sftp-connect-timeout"), "{err}");
    holder.abort();
}

// ---- directories, overwrite, in place ----

#[tokio::test]
async fn missing_directory_is_refused_unless_create_dirs() {
    let sshd = Sshd::start();
    let err = sshd.sink("a/b/c").check().await.unwrap_err();
    assert!(matches!(err, WriteError::RemoteDirMissing { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("not found or not a directory") && text.contains("--create-dirs"), "{text}");

    std::fs::write(sshd.root.join("file"), b"x").unwrap();
    let err = sshd.sink("file").check().await.unwrap_err();
    assert!(matches!(err, WriteError::RemoteDirMissing { .. }), "{err:?}");

    let target = TargetOptions { create_dirs: true, ..Default::default() };
    let s = sshd.sink_with(sshd.config("a/b/c"), target);
    s.check().await.unwrap();
    upload(s.as_ref(), "deep.bin", &payload(1000, 1), &[300], PutMode::Create).await.unwrap();
    assert_eq!(std::fs::read(sshd.path("a/b/c/deep.bin")).unwrap(), payload(1000, 1));
    assert!(common::files_in(&sshd.path("a/b/c")) == ["deep.bin"], "the write probe is gone");
}

#[tokio::test]
async fn a_stale_partial_from_an_earlier_run_is_replaced() {
    let sshd = Sshd::start();
    std::fs::write(sshd.root.join("data.csv.partial"), vec![b'x'; 100_000]).unwrap();
    let data = payload(5000, 9);
    upload(sshd.sink("").as_ref(), "data.csv", &data, &[4096], PutMode::Create).await.unwrap();
    assert_eq!(std::fs::read(sshd.root.join("data.csv")).unwrap(), data);
    no_partials(&sshd.root);
}

#[tokio::test]
async fn the_partial_suffix_is_configurable() {
    let sshd = Sshd::start();
    let target = TargetOptions { partial_suffix: ".uploading".into(), ..Default::default() };
    let s = sshd.sink_with(sshd.config(""), target);
    let mut up = s.create("x.csv", PutMode::Create).await.unwrap();
    up.put_part(Bytes::from_static(b"a,b\n")).await.unwrap();
    assert_eq!(common::files_in(&sshd.root), ["x.csv.uploading"]);
    up.complete().await.unwrap();
    assert_eq!(common::files_in(&sshd.root), ["x.csv"]);
}

#[tokio::test]
async fn inplace_writes_the_final_name_and_still_refuses_to_clobber() {
    let sshd = Sshd::start();
    let mut cfg = sshd.config("");
    cfg.inplace = true;
    let s = sink(&sshd, cfg);
    let mut up = s.create("direct.bin", PutMode::Create).await.unwrap();
    up.put_part(Bytes::from(payload(100_000, 3))).await.unwrap();
    assert!(sshd.root.join("direct.bin").exists(), "in place: the final name exists during the upload");
    up.complete().await.unwrap();
    assert_eq!(common::files_in(&sshd.root), ["direct.bin"]);
    let refused = upload(s.as_ref(), "direct.bin", b"other", &[5], PutMode::Create).await;
    assert!(matches!(refused, Err(WriteError::Exists { .. })), "{refused:?}");
    assert_eq!(std::fs::read(sshd.root.join("direct.bin")).unwrap(), payload(100_000, 3));
    upload(s.as_ref(), "direct.bin", b"other", &[5], PutMode::Overwrite).await.unwrap();
    assert_eq!(std::fs::read(sshd.root.join("direct.bin")).unwrap(), b"other");
}

#[tokio::test]
async fn permission_denied_on_the_directory() {
    let Some(sshd) = Sshd::with_password_user(SshdOptions::default()) else { return };
    let locked = sshd.root.join("locked");
    std::fs::create_dir(&locked).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = sshd.config("locked");
    cfg.identity = None;
    cfg.password = Some(Secret::new(sshd::PASSWORD));
    let err = sink(&sshd, cfg).check().await.unwrap_err();
    assert!(err.is_permission(), "{err:?}");
    assert!(err.to_string().contains("permission denied") && err.to_string().contains("locked"), "{err}");
}

#[tokio::test]
async fn a_failed_write_keeps_the_file_and_says_why() {
    // /dev/full answers every write with ENOSPC, which OpenSSH reports as SSH_FX_FAILURE:
    // exactly what a full disk looks like. The unprivileged user cannot remove /dev/full.
    if !Path::new("/dev/full").exists() {
        return;
    }
    let Some(sshd) = Sshd::with_password_user(SshdOptions::default()) else { return };
    let mut cfg = SftpConfig::from_url(&format!("sftp://{}@127.0.0.1:{}/dev", sshd::PASSWORD_USER, sshd.port)).unwrap();
    cfg.use_agent = false;
    cfg.password = Some(Secret::new(sshd::PASSWORD));
    cfg.host_keys = HostKeyPolicy::Fingerprints(vec![sshd.fingerprint.clone()]);
    cfg.inplace = true;
    let s = sink(&sshd, cfg);
    let err = upload(s.as_ref(), "full", &payload(300_000, 4), &[100_000], PutMode::Overwrite).await.unwrap_err();
    assert!(matches!(err, WriteError::WriteFailed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("SSH_FX_FAILURE (4)") && text.contains("full disk"), "{text}");
    assert!(Path::new("/dev/full").exists());
}

// ---- integrity and throughput ----

#[tokio::test]
async fn sha256_verified_on_the_server() {
    let sshd = Sshd::start();
    let mut cfg = sshd.config("");
    cfg.verify = Verify::Sha256Remote;
    let data = payload(2_000_000, 12);
    upload(sink(&sshd, cfg).as_ref(), "hashed.bin", &data, &[333_333], PutMode::Create).await.unwrap();
    assert_eq!(std::fs::read(sshd.root.join("hashed.bin")).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_files_at_once_over_two_connections() {
    let sshd = Sshd::start();
    let mut cfg = sshd.config("");
    cfg.connections = 2;
    let s = sink(&sshd, cfg);
    s.check().await.unwrap();
    let tasks: Vec<_> = (0..48u64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let data = payload(20_000 + i as usize * 7_919, 500 + i);
                upload(s.as_ref(), &format!("f-{i:02}.bin"), &data, &[8_192, 65_536], PutMode::Create).await.unwrap();
                data
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let sent = t.await.unwrap();
        assert_eq!(std::fs::read(sshd.root.join(format!("f-{i:02}.bin"))).unwrap(), sent, "file {i}");
    }
    assert_eq!(common::files_in(&sshd.root).len(), 48);
}

/// One file of 512 MiB, streamed in 4 MiB parts over several channels; the server's copy
/// hashes like the bytes sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_gigabyte_streams_intact() {
    const PART: usize = 4 << 20;
    const PARTS: usize = 128;
    let sshd = Sshd::start();
    let s = sshd.sink("");
    s.check().await.unwrap();
    let base = payload(PART, 77);
    let mut hasher = sha2::Sha256::new();
    let mut up = s.create("big.bin", PutMode::Create).await.unwrap();
    for i in 0..PARTS {
        // Each part differs (its index stamped every 64 KiB) so misplaced data shows.
        let mut part = base.clone();
        for at in (0..PART).step_by(65_536) {
            part[at..at + 8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        hasher.update(&part);
        up.put_part(Bytes::from(part)).await.unwrap();
        if i == PARTS / 2 {
            // One large file, disjoint ranges over several channels: by now several
            // sftp-server processes on the server hold the partial file open.
            let writers = sshd::processes_with_open(&sshd.root.join("big.bin.partial"));
            assert!(writers >= 2, "the file is written over {writers} channel(s)");
        }
    }
    assert_eq!(up.complete().await.unwrap(), (PART * PARTS) as u64);
    let local = hex::encode(hasher.finalize());
    let remote = tokio::task::spawn_blocking({
        let path = sshd.root.join("big.bin");
        move || {
            use std::io::Read;
            let mut f = std::fs::File::open(path).unwrap();
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            hex::encode(h.finalize())
        }
    })
    .await
    .unwrap();
    assert_eq!(remote, local);
    assert_eq!(common::files_in(&sshd.root), ["big.bin"]);
}

/// Session keys are renewed every 8 MiB while writes are in flight: nothing is lost or
/// reordered across a key exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_survive_key_renewals() {
    let sshd = Sshd::start_with(SshdOptions { extra: "LogLevel DEBUG1\n".into(), ..Default::default() });
    let mut cfg = sshd.config("");
    cfg.rekey_limit = Some(8 << 20);
    cfg.connections = 1;
    let data = payload(40 << 20, 41);
    upload(sink(&sshd, cfg).as_ref(), "rekeyed.bin", &data, &[1 << 20], PutMode::Create).await.unwrap();
    assert!(std::fs::read(sshd.root.join("rekeyed.bin")).unwrap() == data);
    let kex = sshd.log().matches("SSH2_MSG_KEXINIT received").count();
    assert!(kex >= 4, "{kex} key exchanges: {}", sshd.log());
}

// ---- faults ----

/// The proxy resets the connection every 6 MiB it carries upstream; the upload resumes
/// each time from the server's copy and the result is byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_every_few_mib_still_yields_the_same_bytes() {
    let sshd = Sshd::start();
    let proxy = Proxy::start(sshd.port, Fault::CutEvery(6 << 20)).await;
    let mut cfg = sshd.config_for_port("", proxy.port);
    cfg.connections = 2;
    cfg.retries = 5;
    let s = sink(&sshd, cfg);
    s.check().await.unwrap();
    let data = payload(40 << 20, 21);
    upload(s.as_ref(), "cut.bin", &data, &[1 << 20, 3 << 20], PutMode::Create).await.unwrap();
    assert!(proxy.cuts() >= 5, "only {} cuts", proxy.cuts());
    assert!(std::fs::read(sshd.root.join("cut.bin")).unwrap() == data, "byte-identical after {} cuts", proxy.cuts());
    no_partials(&sshd.root);
    // Resumed, not restarted: far less than one full resend per cut went upstream.
    assert!(proxy.upstream_bytes() < 2 * data.len() as u64, "{} bytes sent for {}", proxy.upstream_bytes(), data.len());
}

/// The first connection goes silent mid-upload (packets dropped, socket open): the
/// keepalive timeout drops it and the upload resumes on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_times_out_and_resumes() {
    let sshd = Sshd::start();
    let proxy = Proxy::start(sshd.port, Fault::StallAfter { bytes: 3 << 20, connections: 1 }).await;
    let mut cfg = sshd.config_for_port("", proxy.port);
    cfg.connections = 1;
    cfg.keepalive = std::time::Duration::from_millis(500);
    cfg.keepalive_max = 2;
    let s = sink(&sshd, cfg);
    s.check().await.unwrap();
    let data = payload(12 << 20, 22);
    // A generous bound, so a broken timeout fails the test instead of hanging CI.
    let done = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        upload(s.as_ref(), "stall.bin", &data, &[1 << 20], PutMode::Create).await
    });
    done.await.expect("the stalled connection was never given up").unwrap();
    assert_eq!(proxy.stalls(), 1);
    assert!(std::fs::read(sshd.root.join("stall.bin")).unwrap() == data);
    no_partials(&sshd.root);
}

/// A connection that dies every time loses the upload with a resumable error, and the
/// partial file stays for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_keeps_dying_is_resumable_and_keeps_the_partial() {
    let mut sshd = Sshd::start();
    let s = sshd.sink("");
    s.check().await.unwrap();
    let mut up = s.create("doomed.bin", PutMode::Create).await.unwrap();
    up.put_part(Bytes::from(payload(1 << 20, 5))).await.unwrap();
    // Take the server away for good: every reconnect attempt is refused.
    sshd.stop();
    let mut result = Ok(());
    for _ in 0..64 {
        result = up.put_part(Bytes::from(payload(1 << 20, 6))).await;
        if result.is_err() {
            break;
        }
    }
    let err = match result {
        Err(e) => e,
        Ok(()) => up.complete().await.unwrap_err(),
    };
    assert!(err.is_resumable(), "{err:?}");
    assert!(err.to_string().contains("doomed.bin.partial"), "{err}");
    assert!(sshd.root.join("doomed.bin.partial").exists(), "the partial is kept for the next run");
    assert!(!sshd.root.join("doomed.bin").exists());
}

// ---- the binary ----

#[test]
fn export_synthetic_csv_gz_to_sftp_through_the_binary() {
    let sshd = Sshd::start();
    let url = sshd.url("out");
    let out = common::run(&[
        "export",
        "--from",
        "synthetic://?rows=50000&streams=3&flat=true",
        "--to",
        &url,
        "--format",
        "csv",
        "--compression",
        "gzip",
        "--create-dirs",
        "--known-hosts",
        sshd.known_hosts.to_str().unwrap(),
        "--identity",
        sshd.user_key.to_str().unwrap(),
        "--no-agent",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = sshd.path("out");
    let files = common::files_in(&dir);
    assert!(files.iter().any(|f| f == "_MANIFEST.json"), "{files:?}");
    no_partials(&dir);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("_MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["total_rows"], 50000);
    let mut rows = 0;
    for f in manifest["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(common::sha256_hex(&bytes), f["sha256"].as_str().unwrap(), "{name}");
        let mut reader = csv::Reader::from_reader(flate2::read::MultiGzDecoder::new(&bytes[..]));
        for record in reader.records() {
            record.unwrap();
            rows += 1;
        }
    }
    assert_eq!(rows, 50000);

    // A second run refuses to clobber (exit 2: the operator decides), a wrong host key is exit 3.
    let again = common::run(&[
        "export",
        "--from",
        "synthetic://?rows=10&flat=true",
        "--to",
        &url,
        "--known-hosts",
        sshd.known_hosts.to_str().unwrap(),
        "--identity",
        sshd.user_key.to_str().unwrap(),
        "--no-agent",
    ]);
    assert_eq!(again.status.code(), Some(2), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let pinned = common::run(&[
        "export",
        "--from",
        "synthetic://?rows=10&flat=true",
        "--to",
        &url,
        "--host-key-fingerprint",
        "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        "--identity",
        sshd.user_key.to_str().unwrap(),
        "--no-agent",
    ]);
    assert_eq!(pinned.status.code(), Some(3), "{}", String::from_utf8_lossy(&pinned.stderr));
}

/// The seed guide's deployment: everything from SFTP_HOST, SFTP_USERNAME, SFTP_PASSWORD and
/// SFTP_DIRECTORY, with `--to sftp:`.
#[test]
fn target_from_the_environment_like_the_cloud_run_deployment() {
    let Some(sshd) = Sshd::with_password_user(SshdOptions::default()) else { return };
    let out = std::process::Command::new(common::bin())
        .args(["export", "--from", "synthetic://?rows=1000&flat=true", "--to", "sftp:", "--format", "csv"])
        .args(["--host-key-fingerprint", &sshd.fingerprint, "--no-agent", "--no-state"])
        .env("BQ2SFTP_LOG", "warn")
        .current_dir(std::env::temp_dir())
        .env("SFTP_HOST", "127.0.0.1")
        .env("SFTP_PORT", sshd.port.to_string())
        .env("SFTP_USERNAME", sshd::PASSWORD_USER)
        .env("SFTP_PASSWORD", sshd::PASSWORD)
        .env("SFTP_DIRECTORY", sshd.root.to_str().unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(sshd::PASSWORD));
    let files = common::files_in(&sshd.root);
    assert!(files.contains(&"_MANIFEST.json".to_string()) && files.len() >= 2, "{files:?}");
    no_partials(&sshd.root);
}

/// deploy/gcp.sh's secrets: the key and the known_hosts lines themselves in variables.
#[test]
fn key_and_known_hosts_from_variables_like_deploy_gcp() {
    let sshd = Sshd::start();
    let local = tempfile::tempdir().unwrap();
    let a = local.path().join("a.csv");
    std::fs::write(&a, b"id\n1\n").unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["put", a.to_str().unwrap(), "--to", &sshd.url(""), "--no-agent"])
        .env("BQ2SFTP_LOG", "warn")
        .env("SFTP_PRIVATE_KEY", std::fs::read_to_string(&sshd.user_key).unwrap())
        .env("SFTP_KNOWN_HOSTS", std::fs::read_to_string(&sshd.known_hosts).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(sshd.root.join("a.csv")).unwrap(), b"id\n1\n");
}

/// Keys held by an ssh-agent (SSH_AUTH_SOCK), with no key file given.
#[test]
fn key_from_a_running_ssh_agent() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent runs (openssh-client)");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let added = std::process::Command::new("ssh-add").arg(&sshd.user_key).env("SSH_AUTH_SOCK", &sock).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let file = dir.path().join("agent.txt");
    std::fs::write(&file, b"via agent\n").unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["put", file.to_str().unwrap(), "--to", &sshd.url(""), "--host-key-fingerprint", &sshd.fingerprint])
        .env("BQ2SFTP_LOG", "warn")
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(sshd.root.join("agent.txt")).unwrap(), b"via agent\n");
}

#[test]
fn put_uploads_local_files() {
    let sshd = Sshd::start();
    let local = tempfile::tempdir().unwrap();
    let a = local.path().join("a.csv");
    std::fs::write(&a, payload(9 << 20, 31)).unwrap();
    let out = common::run(&[
        "put",
        a.to_str().unwrap(),
        "--to",
        &sshd.url(""),
        "--known-hosts",
        sshd.known_hosts.to_str().unwrap(),
        "--identity",
        sshd.user_key.to_str().unwrap(),
        "--no-agent",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(sshd.root.join("a.csv")).unwrap() == std::fs::read(&a).unwrap());
}
