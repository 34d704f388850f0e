//! Secrets end to end: `gcp-secret:` references fetched from a local Secret Manager with the
//! job's Google credentials (a service-account JWT verified by a local token endpoint), and the
//! promise that no secret value ever shows: a whole export from the BigQuery emulator to a real
//! sshd at trace level, with an SFTP password, a key passphrase and OAuth tokens in play, is
//! searched for every one of them in stdout, stderr, the metrics, the manifest and the state file.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use bq2sftp::read::synthetic::SyntheticOptions;
use common::google::{Expect, service_account_json, start_emulator, start_token_server, test_key, write_table};
use common::secretmanager::{self, Stored};
use common::sshd::{self, Sshd, SshdOptions};

const SCOPE_CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const EMAIL: &str = "exporter@p.iam.gserviceaccount.com";
const PASSPHRASE: &str = "passphrase-9c41-of-the-encrypted-key";
const ROWS: u64 = 3000;

/// Google's pieces: a key file for `EMAIL` whose JWTs a local token endpoint verifies.
struct Google {
    _dir: tempfile::TempDir,
    key_file: String,
    private_pem: String,
    tokens: common::google::TokenServer,
}

async fn google() -> Google {
    let dir = tempfile::tempdir().unwrap();
    let key = test_key(dir.path());
    let expect = Expect { iss: EMAIL.into(), scope: SCOPE_CLOUD_PLATFORM.into(), sub: None };
    let tokens = start_token_server(&key.public_pem, expect, 3600).await;
    let key_file = dir.path().join("key.json");
    std::fs::write(&key_file, service_account_json(&key, EMAIL, &tokens.url)).unwrap();
    Google { key_file: key_file.to_string_lossy().into_owned(), private_pem: key.private_pem, _dir: dir, tokens }
}

fn version(secret: &str, v: &str) -> String {
    format!("projects/p/secrets/{secret}/versions/{v}")
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every file under `dir`, as (path, bytes).
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The flags of the traced export from the emulator at `endpoint` into `sub` on the server.
fn traced_args(g: &Google, sshd: &Sshd, sm: &str, key: &Path, endpoint: &str, sub: &str, work: &Path) -> Vec<String> {
    let dir = sshd.path(sub);
    std::fs::create_dir(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let state = work.join(format!("{sub}-state.json"));
    let metrics = work.join(format!("{sub}.prom"));
    [
        "export",
        "--from",
        "bq://p.d.flat",
        "--to",
        &sshd.url(sub),
        "--format",
        "csv",
        "--max-file-rows",
        "500",
        "--storage-endpoint",
        endpoint,
        "--bigquery-endpoint",
        endpoint,
        "--read-retries",
        "2",
        "--credentials",
        &g.key_file,
        "--scope",
        SCOPE_CLOUD_PLATFORM,
        "--secret-manager-endpoint",
        sm,
        "--sftp-password",
        "gcp-secret:projects/p/secrets/sftp-password",
        "--identity",
        &key.display().to_string(),
        "--identity-passphrase",
        "env:KEY_PASSPHRASE_REF",
        "--host-key-fingerprint",
        &sshd.fingerprint,
        "--no-agent",
        "--state-file",
        &state.display().to_string(),
        "--metrics-textfile",
        &metrics.display().to_string(),
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_export_with_secrets_from_secret_manager_leaks_none_of_them() {
    let Some(sshd) = Sshd::with_password_user(SshdOptions::default()) else { return };
    let tables = tempfile::tempdir().unwrap();
    write_table(
        tables.path(),
        "p.d.flat",
        SyntheticOptions { rows: ROWS, batch_rows: 500, flat: true, ..Default::default() },
    );
    let g = google().await;
    let emu = start_emulator(tables.path(), |c| {
        c.auth = g.tokens.acceptor();
        c.response_rows = 500;
    })
    .await;
    // A second emulator whose read sessions expire after 2500 rows: that run fails after
    // committing a file and keeps its state file, which must not hold a secret either.
    let expiring = start_emulator(tables.path(), |c| {
        c.auth = g.tokens.acceptor();
        c.response_rows = 500;
        c.faults.expire_after = Some(5);
    })
    .await;
    let issued = g.tokens.issued.clone();
    let sm = secretmanager::start(
        HashMap::from([
            (version("sftp-password", "latest"), Stored::Value(sshd::PASSWORD.to_string())),
            (version("key-passphrase", "2"), Stored::Value(format!("{PASSPHRASE}\n"))),
        ]),
        move |t| issued.lock().unwrap().iter().any(|i| i == t),
    )
    .await;

    // An encrypted key the server does not know: its passphrase is used to decrypt it, the key
    // is offered and refused, and the password (from Secret Manager) logs in.
    let keys = tempfile::tempdir().unwrap();
    let key = sshd::keygen(keys.path(), "enc", "ed25519", PASSPHRASE);
    let work = tempfile::tempdir().unwrap();
    // The passphrase reference itself comes from the environment, as a mounted variable would.
    let passphrase_ref = ("KEY_PASSPHRASE_REF", "gcp-secret:projects/p/secrets/key-passphrase/versions/2");
    let env = [("BQ2SFTP_LOG", "trace"), passphrase_ref];

    let endpoint = format!("http://{}", emu.host_port());
    let args = traced_args(&g, &sshd, &sm.endpoint, &key, &endpoint, "out", work.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::run_clean(&args, &env).await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(0), "{}", &output[output.len().saturating_sub(4000)..]);

    let cut_endpoint = format!("http://{}", expiring.host_port());
    let cut_args = traced_args(&g, &sshd, &sm.endpoint, &key, &cut_endpoint, "cut", work.path());
    let cut_args: Vec<&str> = cut_args.iter().map(String::as_str).collect();
    let cut = common::run_clean(&cut_args, &env).await;
    let cut_output = text(&cut);
    assert_eq!(cut.status.code(), Some(6), "{}", &cut_output[cut_output.len().saturating_sub(4000)..]);
    assert!(cut_output.contains("expired"), "{}", &cut_output[cut_output.len().saturating_sub(2000)..]);

    // The job really used every secret.
    assert!(sshd.log().contains("Accepted password for bq2sftp-test"), "{}", sshd.log());
    assert_eq!(
        *sm.accessed.lock().unwrap(),
        [
            version("sftp-password", "latest"),
            version("key-passphrase", "2"),
            version("sftp-password", "latest"),
            version("key-passphrase", "2")
        ],
        "each version fetched once per run, with a token the endpoint issued"
    );
    assert_eq!(g.tokens.refused.load(Ordering::Relaxed), 0);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sshd.path("out").join("_MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(m["total_rows"].as_u64(), Some(ROWS));
    assert!(output.contains("\"severity\":\"DEBUG\""), "trace logs were on");

    // And none of them shows anywhere.
    let mut secrets: Vec<String> = vec![sshd::PASSWORD.into(), PASSPHRASE.into()];
    secrets.extend(g.tokens.issued.lock().unwrap().iter().cloned());
    assert!(!g.tokens.issued.lock().unwrap().is_empty());
    // A line from the middle of the service-account private key.
    secrets.push(g.private_pem.lines().nth(5).unwrap().to_string());
    // The secrets as Secret Manager sends them (base64, with and without a trailing newline).
    use base64::Engine;
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    secrets.extend([b64(sshd::PASSWORD), b64(&format!("{PASSPHRASE}\n")), b64(PASSPHRASE)]);
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("stdout".into(), out.stdout.clone()),
        ("stderr".into(), out.stderr.clone()),
        ("stdout of the cut run".into(), cut.stdout.clone()),
        ("stderr of the cut run".into(), cut.stderr.clone()),
    ];
    for name in ["out.prom", "cut.prom", "cut-state.json"] {
        places.push((name.into(), std::fs::read(work.path().join(name)).expect("metrics and the kept state file")));
    }
    places.extend(files_under(&sshd.path("out")));
    places.extend(files_under(&sshd.path("cut")));
    assert!(places.iter().any(|(p, _)| p.ends_with("out/_MANIFEST.json")));
    let names: Vec<&String> = places.iter().map(|(p, _)| p).collect();
    assert!(
        names.iter().any(|p| p.contains("/cut/") && p.ends_with(".csv")),
        "the cut run committed a file: {names:?}"
    );
    for (place, bytes) in &places {
        for secret in &secrets {
            assert!(!contains(bytes, secret), "a secret ({} chars) appears in {place}", secret.len());
        }
    }

    // --print-config shows where each secret comes from, never a value.
    let mut shown = args.to_vec();
    shown.push("--print-config");
    let printed = common::run_clean(&shown, &[passphrase_ref]).await;
    assert_eq!(printed.status.code(), Some(0), "{}", text(&printed));
    let printed = text(&printed);
    assert!(printed.contains("sftp-password = \"gcp-secret:projects/p/secrets/sftp-password\""), "{printed}");
    assert!(printed.contains("identity-passphrase = \"env:KEY_PASSPHRASE_REF\""), "{printed}");
    assert!(printed.contains("secret-manager-endpoint = \"http://127.0.0.1:"), "not a secret: {printed}");
    let at = shown.iter().position(|a| *a == "--sftp-password").unwrap();
    shown.drain(at..at + 2);
    let printed = common::run_clean(&shown, &[passphrase_ref, ("SFTP_PASSWORD", "a-literal-password-b71")]).await;
    let printed = text(&printed);
    assert!(printed.contains("sftp-password = \"***\"  # environment"), "{printed}");
    assert!(!printed.contains("a-literal-password-b71"));
}

/// Runs a synthetic export whose SFTP password is `reference`; the target is never reached
/// because resolving the secret fails first.
async fn export_with_password(g: &Google, sm: &str, reference: &str) -> std::process::Output {
    let args = [
        "export",
        "--from",
        "synthetic://?rows=10",
        "--to",
        "sftp://someone@127.0.0.1:9/out",
        "--credentials",
        &g.key_file,
        "--secret-manager-endpoint",
        sm,
        "--sftp-password",
        reference,
        "--insecure-accept-any-host-key",
        "--no-state",
        "--sftp-retries",
        "1",
        "--read-retries",
        "3",
        "--retry-initial-backoff",
        "10ms",
    ];
    common::run_clean(&args, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_manager_failures_are_clear_and_never_show_the_value() {
    let g = google().await;
    let issued = g.tokens.issued.clone();
    let sm = secretmanager::start(
        HashMap::from([
            (version("corrupt", "latest"), Stored::Corrupt("corrupt-value-5e2a".into())),
            (version("forbidden", "latest"), Stored::Forbidden),
            (version("fine", "latest"), Stored::Value("fine-value-0b3c".into())),
            (version("down", "latest"), Stored::Unavailable),
        ]),
        move |t| issued.lock().unwrap().iter().any(|i| i == t),
    )
    .await;

    let out = export_with_password(&g, &sm.endpoint, "gcp-secret:projects/p/secrets/corrupt").await;
    let err = text(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("projects/p/secrets/corrupt/versions/latest") && err.contains("arrived corrupt: its CRC32C"),
        "{err}"
    );
    assert!(!err.contains("corrupt-value-5e2a"), "{err}");

    let out = export_with_password(&g, &sm.endpoint, "gcp-secret:projects/p/secrets/forbidden").await;
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("permission denied") && err.contains("roles/secretmanager.secretAccessor"), "{err}");

    let out = export_with_password(&g, &sm.endpoint, "gcp-secret:projects/p/secrets/missing/versions/7").await;
    let err = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("secret projects/p/secrets/missing/versions/7 not found"), "{err}");

    // An outage is retried --read-retries times, then "run again" (6).
    let out = export_with_password(&g, &sm.endpoint, "gcp-secret:projects/p/secrets/down").await;
    let err = text(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("Secret Manager at") && err.contains("after 3 attempts"), "{err}");
    let tries = sm.accessed.lock().unwrap().iter().filter(|n| n.contains("/down/")).count();
    assert_eq!(tries, 3);

    // Tokens never travel in clear text to another machine, also from `put`.
    let file = tempfile::NamedTempFile::new().unwrap();
    let out = common::run_clean(
        &[
            "put",
            "--to",
            "sftp://someone@127.0.0.1:9/out",
            "--insecure-accept-any-host-key",
            "--sftp-password",
            "gcp-secret:projects/p/secrets/fine",
            file.path().to_str().unwrap(),
        ],
        &[("BQ2SFTP_SECRET_MANAGER_ENDPOINT", "http://secrets.example.com")],
    )
    .await;
    let err = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("would send credentials in clear text"), "{err}");

    // A malformed reference is refused before any request.
    let before = sm.accessed.lock().unwrap().len();
    let out = export_with_password(&g, &sm.endpoint, "gcp-secret:my-password").await;
    let err = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a Secret Manager name"), "{err}");
    assert_eq!(sm.accessed.lock().unwrap().len(), before);

    // Without Google credentials the fix is named.
    let out = common::run_clean(
        &[
            "export",
            "--from",
            "synthetic://?rows=10",
            "--to",
            "sftp://someone@127.0.0.1:9/out",
            "--secret-manager-endpoint",
            &sm.endpoint,
            "--sftp-password",
            "gcp-secret:projects/p/secrets/forbidden",
            "--insecure-accept-any-host-key",
            "--no-state",
        ],
        &[],
    )
    .await;
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("cannot get Google credentials") && err.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{err}");

    // doctor reads the references too, and says which one fails and how to fix it.
    let doctor = |reference: &'static str| {
        let key_file = g.key_file.clone();
        let endpoint = sm.endpoint.clone();
        async move {
            let args = [
                "doctor",
                "--from",
                "synthetic://?rows=10",
                "--to",
                "sftp://someone@127.0.0.1:9/out",
                "--credentials",
                &key_file,
                "--secret-manager-endpoint",
                &endpoint,
                "--sftp-password",
                reference,
                "--insecure-accept-any-host-key",
            ];
            common::run_clean(&args, &[]).await
        }
    };
    let out = doctor("gcp-secret:projects/p/secrets/forbidden").await;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(
        report.contains("[FAIL] secrets: permission denied reading secret projects/p/secrets/forbidden"),
        "{report}"
    );
    assert!(report.contains("[skip] target"), "{report}");
    let out = doctor("gcp-secret:projects/p/secrets/fine").await;
    let report = text(&out);
    assert!(report.contains("[ ok ] secrets: read from Secret Manager: projects/p/secrets/fine"), "{report}");
    assert!(!report.contains("fine-value-0b3c"), "{report}");
    // Port 9 is closed: the SFTP checks run with the secret and fail at TCP.
    assert_eq!(out.status.code(), Some(5), "{report}");
}
