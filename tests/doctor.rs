//! `bq2sftp doctor` through the binary, against the project's BigQuery emulator, a local
//! token endpoint and a real OpenSSH server on 127.0.0.1 (tests/common): a green setup passes
//! every check, and each deliberately broken setup fails on its own line with its fix, the
//! checks after it skipped, and the documented exit code.

mod common;

use std::path::Path;

use bq2sftp::read::synthetic::SyntheticOptions;
use common::google::{Expect, SCOPE_BIGQUERY, service_account_json, start_emulator, start_token_server, test_key};
use common::sshd::{self, Sshd, SshdOptions};

/// The outcome of one `bq2sftp doctor` run.
struct Doctor {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Doctor {
    /// The checklist line for `name` (`sftp: host key`), whatever its mark.
    fn line(&self, name: &str) -> &str {
        let found = self.stdout.lines().find(|l| l.get(7..).is_some_and(|rest| rest.starts_with(&format!("{name}:"))));
        found.unwrap_or_else(|| panic!("no line for {name} in:\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }

    fn assert_line(&self, name: &str, mark: &str, parts: &[&str]) {
        let line = self.line(name);
        assert!(line.starts_with(mark), "{name} should be {mark}: {line}\n{}", self.stdout);
        for p in parts {
            assert!(line.contains(p), "{name} should mention {p:?}: {line}\n{}", self.stdout);
        }
    }

    fn failures(&self) -> Vec<&str> {
        self.stdout.lines().filter(|l| l.starts_with("[FAIL]")).collect()
    }
}

/// Runs `bq2sftp doctor ARGS` in the temp directory with `env` added.
async fn doctor(args: &[&str], env: &[(&str, &str)]) -> Doctor {
    let mut full = vec!["doctor"];
    full.extend_from_slice(args);
    let out = common::run_clean(&full, env).await;
    Doctor {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A table dir with the flat table `p.d.t`.
fn tables() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::google::write_table(dir.path(), "p.d.t", SyntheticOptions { rows: 500, flat: true, ..Default::default() });
    dir
}

/// Key authentication and the pinned host key, as the harness sets up the server.
fn sftp_flags(sshd: &Sshd) -> Vec<String> {
    vec![
        "--identity".into(),
        sshd.user_key.display().to_string(),
        "--host-key-fingerprint".into(),
        sshd.fingerprint.clone(),
        "--no-agent".into(),
    ]
}

fn probes_left(dir: &Path) -> Vec<String> {
    common::files_in(dir).into_iter().filter(|n| n.starts_with(".bq2sftp-doctor")).collect()
}

#[tokio::test]
async fn a_green_setup_from_a_job_file_passes_every_check() {
    let dir = tables();
    let emu = start_emulator(dir.path(), |_| {}).await;
    let sshd = Sshd::start();
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("nightly.toml");
    let text = format!(
        "from = \"bq://p.d.t\"\nto = \"{}\"\nemulator = \"{}\"\nno_state = true\nformat = \"csv\"\n",
        sshd.url(""),
        emu.host_port()
    );
    std::fs::write(&job, text).unwrap();
    let mut args = vec![job.to_str().unwrap().to_string()];
    args.extend(sftp_flags(&sshd));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = doctor(&args, &[]).await;

    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    assert!(d.failures().is_empty(), "{}", d.stdout);
    d.assert_line("config", "[ ok ]", &["bq://p.d.t", &sshd.url("")]);
    d.assert_line("google", "[skip]", &["emulator", "no credentials"]);
    d.assert_line("bigquery: reachable", "[ ok ]", &[&emu.host_port()]);
    d.assert_line("bigquery: table exists", "[ ok ]", &["p.d.t", "column(s)"]);
    d.assert_line("bigquery: read session", "[ ok ]", &["1 stream(s)", "nothing was read"]);
    d.assert_line("sftp: DNS", "[ ok ]", &["127.0.0.1"]);
    d.assert_line("sftp: TCP connect", "[ ok ]", &[&format!("127.0.0.1:{}", sshd.port)]);
    d.assert_line("sftp: SSH handshake", "[ ok ]", &["kex ", "host key ssh-ed25519", "cipher ", "mac "]);
    d.assert_line("sftp: host key", "[ ok ]", &[&sshd.fingerprint, "matches --host-key-fingerprint"]);
    d.assert_line("sftp: authentication", "[ ok ]", &["publickey", &sshd.user, "accepted"]);
    d.assert_line("sftp: SFTP session", "[ ok ]", &["posix-rename@openssh.com", "statvfs@openssh.com"]);
    d.assert_line("sftp: remote directory", "[ ok ]", &["exists"]);
    d.assert_line("sftp: writable", "[ ok ]", &["wrote, renamed and removed", ".bq2sftp-doctor-"]);
    d.assert_line("sftp: rename", "[ ok ]", &["posix-rename@openssh.com offered"]);
    d.assert_line("sftp: free space", "[ ok ]", &["available of"]);
    assert!(d.stdout.trim_end().ends_with("ready to export"), "{}", d.stdout);
    assert!(probes_left(&sshd.root).is_empty(), "the probe file is removed");
    emu.shutdown().await;
}

#[tokio::test]
async fn service_account_credentials_delegation_and_a_refused_subject() {
    let dir = tables();
    let tmp = tempfile::tempdir().unwrap();
    let key = test_key(tmp.path());
    let email = "exporter@p.iam.gserviceaccount.com";
    let tokens = start_token_server(
        &key.public_pem,
        Expect { iss: email.into(), scope: SCOPE_BIGQUERY.into(), sub: Some("analyst@example.com".into()) },
        3600,
    )
    .await;
    let emu = start_emulator(dir.path(), |c| c.auth = tokens.acceptor()).await;
    let key_file = tmp.path().join("key.json");
    std::fs::write(&key_file, service_account_json(&key, email, &tokens.url)).unwrap();
    let endpoint = format!("http://{}", emu.host_port());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let to = format!("dir://{}", out.display());
    let run = |subject: &'static str| {
        let (key_file, endpoint, to) = (key_file.display().to_string(), endpoint.clone(), to.clone());
        async move {
            let args = [
                "--from",
                "bq://p.d.t",
                "--to",
                &to,
                "--credentials",
                &key_file,
                "--impersonate-subject",
                subject,
                "--storage-endpoint",
                &endpoint,
                "--bigquery-endpoint",
                &endpoint,
                "--no-state",
            ];
            doctor(&args, &[]).await
        }
    };

    let d = run("analyst@example.com").await;
    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("google: credentials", "[ ok ]", &["service-account key", email, "from --credentials", "key.json"]);
    d.assert_line(
        "google: scopes and delegation",
        "[ ok ]",
        &[SCOPE_BIGQUERY, "acting as analyst@example.com (domain-wide delegation)"],
    );
    d.assert_line("google: access token", "[ ok ]", &["obtained"]);
    d.assert_line("bigquery: read session", "[ ok ]", &["1 stream(s)"]);
    d.assert_line("dir: writable", "[ ok ]", &["wrote and removed"]);
    assert_eq!(tokens.issued_count(), 1, "one token served the whole check");
    for secret in [tokens.issued.lock().unwrap()[0].as_str(), "PRIVATE KEY"] {
        assert!(!d.stdout.contains(secret) && !d.stderr.contains(secret), "{secret} leaked");
    }

    // The token endpoint refuses a subject the key is not delegated for: the token step
    // fails with the delegation fix, and BigQuery is not asked.
    let d = run("intruder@example.com").await;
    assert_eq!(d.code, Some(3), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("google: credentials", "[ ok ]", &[email]);
    d.assert_line(
        "google: access token",
        "[FAIL]",
        &["invalid_grant", "fix: authorize the service account's client ID"],
    );
    d.assert_line("bigquery: reachable", "[skip]", &["needs Google credentials"]);
    d.assert_line("bigquery: read session", "[skip]", &["needs Google credentials"]);
    assert_eq!(d.failures().len(), 1, "{}", d.stdout);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_missing_bigquery_table_fails_with_its_name_and_skips_the_session() {
    let dir = tables();
    let emu = start_emulator(dir.path(), |_| {}).await;
    let out = tempfile::tempdir().unwrap();
    let to = format!("dir://{}", out.path().display());
    let d =
        doctor(&["--from", "bq://p.d.missing", "--to", &to, "--emulator", &emu.host_port(), "--no-state"], &[]).await;
    assert_eq!(d.code, Some(4), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("bigquery: reachable", "[ ok ]", &[]);
    d.assert_line(
        "bigquery: table exists",
        "[FAIL]",
        &["projects/p/datasets/d/tables/missing", "not found", "fix: check the project, dataset and table"],
    );
    d.assert_line("bigquery: read session", "[skip]", &["needs bigquery: table exists"]);
    // The target does not depend on the source: it is still checked.
    d.assert_line("dir: writable", "[ ok ]", &[]);
    assert_eq!(d.failures().len(), 1, "{}", d.stdout);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_wrong_key_fails_authentication_after_the_host_key_passed() {
    let sshd = Sshd::start();
    let keys = tempfile::tempdir().unwrap();
    let stranger = sshd::keygen(keys.path(), "stranger", "ed25519", "");
    let url = sshd.url("");
    let d = doctor(
        &[
            "--from",
            "synthetic://?rows=10",
            "--to",
            &url,
            "--identity",
            stranger.to_str().unwrap(),
            "--host-key-fingerprint",
            &sshd.fingerprint,
            "--no-agent",
            "--no-state",
        ],
        &[],
    )
    .await;
    assert_eq!(d.code, Some(3), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: host key", "[ ok ]", &[&sshd.fingerprint]);
    d.assert_line(
        "sftp: authentication",
        "[FAIL]",
        &[&format!("refused user '{}'", sshd.user), "publickey", "fix: check the user name and the credentials"],
    );
    d.assert_line("sftp: SFTP session", "[skip]", &["needs sftp: authentication"]);
    d.assert_line("sftp: writable", "[skip]", &["needs sftp: authentication"]);
    assert_eq!(d.failures().len(), 1, "{}", d.stdout);
}

#[tokio::test]
async fn a_wrong_host_key_pin_fails_before_any_credential_is_sent() {
    let sshd = Sshd::start();
    let url = sshd.url("");
    let pin = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
    let key = sshd.user_key.display().to_string();
    let args = ["--from", "synthetic://?rows=10", "--to", &url, "--identity", &key, "--no-agent", "--no-state"];
    let d = doctor(&args, &[("SFTP_HOST_KEY_FINGERPRINT", pin)]).await;
    assert_eq!(d.code, Some(3), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: SSH handshake", "[ ok ]", &["ssh-ed25519 host key"]);
    d.assert_line(
        "sftp: host key",
        "[FAIL]",
        &["does not match --host-key-fingerprint", pin, &sshd.fingerprint, "fix: confirm the server's fingerprint"],
    );
    d.assert_line("sftp: authentication", "[skip]", &["needs sftp: host key"]);
    assert!(!sshd.log().contains("Accepted"), "no authentication happened: {}", sshd.log());

    // An unknown host (empty known_hosts) says how to add it.
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("known_hosts");
    std::fs::write(&empty, "").unwrap();
    let d = doctor(&args, &[("SFTP_KNOWN_HOSTS", empty.to_str().unwrap())]).await;
    assert_eq!(d.code, Some(3), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: host key", "[FAIL]", &["not in known_hosts", &sshd.fingerprint, "ssh-keyscan -p"]);
}

#[tokio::test]
async fn a_missing_remote_directory_fails_unless_create_dirs() {
    let sshd = Sshd::start();
    let url = sshd.url("not/there");
    let mut args = vec!["--from".to_string(), "synthetic://?rows=10".into(), "--to".into(), url, "--no-state".into()];
    args.extend(sftp_flags(&sshd));
    let list: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = doctor(&list, &[]).await;
    assert_eq!(d.code, Some(5), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: authentication", "[ ok ]", &[]);
    d.assert_line("sftp: remote directory", "[FAIL]", &["not/there", "not found", "--create-dirs"]);
    d.assert_line("sftp: writable", "[skip]", &["needs sftp: remote directory"]);
    d.assert_line("sftp: free space", "[skip]", &["needs sftp: remote directory"]);

    let mut with = list.clone();
    with.push("--create-dirs");
    let d = doctor(&with, &[]).await;
    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: remote directory", "[ ok ]", &["does not exist; the export creates it (--create-dirs)"]);
    assert!(!sshd.path("not").exists(), "the doctor creates nothing");
}

#[tokio::test]
async fn a_directory_the_user_cannot_write_fails_the_probe() {
    // Root can write anywhere: the check logs in as the unprivileged password user, which
    // only root can create (scripts/test.sh and CI run as root).
    let Some(sshd) = Sshd::with_password_user(SshdOptions::default()) else { return };
    let locked = sshd.root.join("locked");
    std::fs::create_dir(&locked).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let url = sshd.url("locked");
    let args = [
        "--from",
        "synthetic://?rows=10",
        "--to",
        &url,
        "--host-key-fingerprint",
        &sshd.fingerprint,
        "--no-agent",
        "--no-state",
    ];
    let d = doctor(&args, &[("SFTP_PASSWORD", sshd::PASSWORD)]).await;
    assert_eq!(d.code, Some(3), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: authentication", "[ ok ]", &["password accepted for user 'bq2sftp-test'"]);
    d.assert_line("sftp: remote directory", "[ ok ]", &["locked"]);
    d.assert_line(
        "sftp: writable",
        "[FAIL]",
        &["cannot write", "SSH_FX_PERMISSION_DENIED", "fix: 'bq2sftp-test' may not create files"],
    );
    d.assert_line("sftp: rename", "[skip]", &["needs sftp: writable"]);
    assert!(!d.stdout.contains(sshd::PASSWORD) && !d.stderr.contains(sshd::PASSWORD), "the password never shows");
    assert!(probes_left(&locked).is_empty());
}

#[tokio::test]
async fn a_closed_port_fails_at_tcp_and_skips_the_handshake() {
    let port = common::free_port();
    let d = doctor(
        &[
            "--from",
            "synthetic://?rows=10",
            "--to",
            &format!("sftp://someone@127.0.0.1:{port}/in"),
            "--sftp-password",
            "irrelevant",
            "--insecure-accept-any-host-key",
            "--no-state",
        ],
        &[],
    )
    .await;
    assert_eq!(d.code, Some(5), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: DNS", "[ ok ]", &[]);
    d.assert_line("sftp: TCP connect", "[FAIL]", &["Connection refused", "fix: check the port"]);
    d.assert_line("sftp: SSH handshake", "[skip]", &["needs sftp: TCP connect"]);
    d.assert_line("sftp: authentication", "[skip]", &["needs sftp: TCP connect"]);
    assert!(!d.stdout.contains("irrelevant"));
}

#[tokio::test]
async fn query_mode_is_checked_with_a_dry_run() {
    let dir = tables();
    let emu = start_emulator(dir.path(), |_| {}).await;
    let out = tempfile::tempdir().unwrap();
    let to = format!("dir://{}", out.path().display());
    let host = emu.host_port();
    let run = |sql: &'static str| {
        let (to, host) = (to.clone(), host.clone());
        async move { doctor(&["--query", sql, "--project", "p", "--to", &to, "--emulator", &host, "--no-state"], &[]).await }
    };
    let d = run("SELECT * FROM p.d.t").await;
    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("bigquery: reachable", "[ ok ]", &["REST API"]);
    d.assert_line("bigquery: query (dry run)", "[ ok ]", &["the query is valid", "nothing was run or billed"]);
    d.assert_line("bigquery: read session", "[skip]", &["query mode"]);

    let d = run("SELECT * FROM p.d.missing").await;
    // A table the query names is missing: a source failure, as the export would exit.
    assert_eq!(d.code, Some(4), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("bigquery: query (dry run)", "[FAIL]", &["p:d.missing was not found", "fix: correct the SQL"]);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_server_that_refuses_renames_fails_the_rename_check_and_keeps_no_probe() {
    // internal-sftp -P denies requests by name: the probe is written, its rename refused, and
    // the probe must still be removed.
    let sshd = Sshd::start_with(SshdOptions {
        extra: "Subsystem sftp internal-sftp -P rename,posix-rename@openssh.com".into(),
        ..Default::default()
    });
    let mut args =
        vec!["--from".to_string(), "synthetic://?rows=10".into(), "--to".into(), sshd.url(""), "--no-state".into()];
    args.extend(sftp_flags(&sshd));
    let list: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = doctor(&list, &[]).await;
    assert_eq!(d.code, Some(3), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: writable", "[ ok ]", &["wrote and removed (the rename failed, see below)"]);
    d.assert_line("sftp: rename", "[FAIL]", &["refused to rename", "--inplace"]);
    assert!(probes_left(&sshd.root).is_empty(), "{:?}", common::files_in(&sshd.root));

    // With --inplace no rename is needed: everything passes.
    let mut inplace = list.clone();
    inplace.push("--inplace");
    let d = doctor(&inplace, &[]).await;
    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    d.assert_line("sftp: writable", "[ ok ]", &["wrote and removed sftp://", ".bq2sftp-doctor-"]);
    assert!(probes_left(&sshd.root).is_empty(), "{:?}", common::files_in(&sshd.root));
}
