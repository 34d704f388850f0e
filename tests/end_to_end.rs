//! The whole product against real servers on 127.0.0.1: the project's BigQuery emulator as the
//! source and a real OpenSSH sshd (tests/common/sshd.rs) as the partner's server.
//!
//! - issue 6's done-when: `bq2sftp serve` triggered with a locally signed OIDC token exports a
//!   table to the sshd, and a bad token is refused and starts nothing;
//! - issue 4 item 5: an export killed with SIGKILL mid-run (held back by a throttling TCP proxy
//!   so it is still running when killed) and re-run with `--resume`: every row exactly once,
//!   committed files left untouched;
//! - scale-out over SFTP: `plan`, two `export --plan --shard I/2`, `finalize` refusing while a
//!   shard is missing, then writing the combined manifest and `_SUCCESS` on the server.
//!
//! Every check compares contents: the rows on the server against the `parquet://` source
//! reading the very file the emulator serves (or the synthetic table), and the manifests'
//! SHA-256 against the files' bytes.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bq2sftp::read::synthetic::SyntheticOptions;
use bq2sftp::serve::{self, ServeArgs};
use common::google::{start_emulator, test_key, write_table};
use common::oidc::{AUDIENCE, CALLER, KID, claims, sign, start_jwks};
use common::sshd::Sshd;
use common::*;
use serde_json::{Value, json};

/// Rows of a CSV export, each as its fields, sorted: a multiset to compare exports by.
type Rows = Vec<Vec<String>>;

/// The data rows of every file the manifest in `dir` lists, after checking the manifest
/// against the files (sizes, SHA-256, nothing unlisted) and each file's row count.
fn rows_on_server(dir: &Path) -> (bq2sftp::manifest::Manifest, Rows) {
    let m = assert_manifest_matches(dir);
    let mut rows = Rows::new();
    for f in &m.files {
        let records = csv_records(&decompressed(&dir.join(&f.name)));
        assert_eq!(records.len() as u64, f.rows, "{}: the manifest's row count", f.name);
        rows.extend(records.iter().map(|r| r.iter().map(str::to_string).collect::<Vec<_>>()));
    }
    rows.sort();
    (m, rows)
}

/// The rows of `from` exported in-process as plain CSV to a temp dir: the expected contents.
async fn expected_rows(from: &str) -> Rows {
    let out = tempfile::tempdir().unwrap();
    let to = format!("dir://{}", out.path().display());
    bq2sftp::run(&job(&["--from", from, "--to", &to, "--format", "csv"])).await.expect("the reference export runs");
    let mut rows = Rows::new();
    for name in files_in(out.path()).iter().filter(|n| n.ends_with(".csv")) {
        let records = csv_records(&std::fs::read(out.path().join(name)).unwrap());
        rows.extend(records.iter().map(|r| r.iter().map(str::to_string).collect::<Vec<_>>()));
    }
    rows.sort();
    rows
}

/// Asserts two sorted row sets are equal without printing thousands of rows on failure.
fn assert_same_rows(got: &Rows, want: &Rows, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: first difference at sorted row {i}:\n got  {:?}\n want {:?}", got[i], want[i]);
    }
    // A sorted multiset with a unique id column: any duplicate would show as an equal neighbour.
    assert!(got.windows(2).all(|w| w[0][0] != w[1][0]), "{what}: a row id appears twice");
}

fn no_partials(dir: &Path) {
    let left: Vec<_> = files_in(dir).into_iter().filter(|n| n.ends_with(".partial")).collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

/// The flags that authenticate to `sshd` with its key and pin its host key.
fn sftp_flags(sshd: &Sshd) -> Vec<String> {
    vec![
        "--identity".into(),
        sshd.user_key.display().to_string(),
        "--known-hosts".into(),
        sshd.known_hosts.display().to_string(),
        "--no-agent".into(),
    ]
}

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    out
}

// ---- issue 6: serve -> emulator -> real sshd ----

const SERVE_ROWS: u64 = 30_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_a_bigquery_table_to_a_real_sshd_and_refuses_a_bad_token() {
    let tables = tempfile::tempdir().unwrap();
    let table = write_table(
        tables.path(),
        "p.d.orders",
        SyntheticOptions { rows: SERVE_ROWS, flat: true, batch_rows: 3000, ..Default::default() },
    );
    let emu = start_emulator(tables.path(), |_| {}).await;
    let sshd = Sshd::start();
    let remote = sshd.path("incoming");

    let home = tempfile::tempdir().unwrap();
    let key = test_key(home.path());
    let jwks = start_jwks(&key).await;
    let jobs = home.path().join("jobs.toml");
    std::fs::write(
        &jobs,
        format!(
            r#"
[jobs.orders]
from = "bq://p.d.orders"
emulator = "{emulator}"
min_streams = 3
to = "{url}"
identity = "{key}"
known_hosts = "{known_hosts}"
no_agent = true
create_dirs = true
format = "csv"
compression = "gzip"
max_file_rows = 4000
success_marker = true
no_state = true
"#,
            emulator = emu.host_port(),
            url = sshd.url("incoming"),
            key = sshd.user_key.display(),
            known_hosts = sshd.known_hosts.display(),
        ),
    )
    .unwrap();
    let server = serve::start(&ServeArgs {
        jobs,
        addr: "127.0.0.1:0".parse().unwrap(),
        audience: Some(AUDIENCE.to_string()),
        allowed_callers: vec![CALLER.to_string()],
        jwks_url: jwks.url.clone(),
        max_concurrent_runs: 1,
        drain_timeout: 5,
        insecure_no_auth: false,
    })
    .await
    .expect("serve starts");
    let base = format!("http://{}", server.local_addr);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let run = |token: String| {
        let http = http.clone();
        let url = format!("{base}/jobs/orders/run?wait=true");
        async move {
            let resp = http.post(url).bearer_auth(token).send().await.expect("serve answers");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // Bad tokens: refused, and nothing reaches the SFTP server.
    let mut wrong_aud = claims();
    wrong_aud["aud"] = json!("https://someone-else.a.run.app");
    let (status, body) = run(sign(&key, KID, &wrong_aud)).await;
    assert_eq!(status, 401, "wrong audience: {body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    let mut intruder = claims();
    intruder["email"] = json!("intruder@p.iam.gserviceaccount.com");
    let (status, body) = run(sign(&key, KID, &intruder)).await;
    assert_eq!(status, 403, "caller not allowed: {body}");
    assert_eq!(files_in(&sshd.root), Vec::<String>::new(), "a refused call wrote nothing");
    assert!(!sshd.log().contains("Accepted publickey"), "a refused call never logged in:\n{}", sshd.log());

    // The good token: the run finishes and says what it wrote.
    let (status, view) = run(sign(&key, KID, &claims())).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["rows"], SERVE_ROWS, "{view}");
    let id = view["run_id"].as_str().expect("a run id").to_string();
    let again = http.get(format!("{base}/runs/{id}")).bearer_auth(sign(&key, KID, &claims())).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["status"], "succeeded", "{again}");
    assert_eq!(again["counters"]["rows_read"], SERVE_ROWS, "{again}");
    server.shutdown().await;

    // On the server: the manifest matches the files, the rows are the table's, once each.
    no_partials(&remote);
    assert!(remote.join("_SUCCESS").exists(), "{:?}", files_in(&remote));
    let (m, rows) = rows_on_server(&remote);
    assert_eq!(m.total_rows, SERVE_ROWS);
    assert!(m.files.len() >= 8, "3 streams, files of at most 4000 rows: {} files", m.files.len());
    assert!(m.files.iter().all(|f| f.name.ends_with(".csv.gz") && f.rows <= 4000), "{:?}", m.files);
    let served: Vec<&str> = view["files"].as_array().unwrap().iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(served, m.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), "GET /runs lists the files");
    let want = expected_rows(&format!("parquet://{}", table.display())).await;
    assert_same_rows(&rows, &want, "serve -> sftp");
}

// ---- issue 4 item 5: kill -9 mid-run, then --resume ----

/// A TCP relay to `upstream` whose client -> server direction is held to `rate` bytes/s over
/// all connections together while `throttled` is set, so an export through it runs for
/// seconds: long enough to be killed mid-run. The server -> client direction (SFTP status
/// replies, acks) is not slowed.
struct Throttle {
    port: u16,
    throttled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Throttle {
    async fn start(upstream: u16, rate: u64) -> Throttle {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let throttled = Arc::new(AtomicBool::new(true));
        let flag = throttled.clone();
        // Nanoseconds since `epoch` at which the shared budget is free again (a token bucket
        // with no burst): each chunk books its transmission time and waits for its slot.
        let epoch = tokio::time::Instant::now();
        let booked = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                let (flag, booked) = (flag.clone(), booked.clone());
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if flag.load(Ordering::Relaxed) {
                            let cost = n as u64 * 1_000_000_000 / rate;
                            let now = epoch.elapsed().as_nanos() as u64;
                            let start = booked
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.max(now) + cost))
                                .unwrap_or(now)
                                .max(now);
                            tokio::time::sleep_until(epoch + Duration::from_nanos(start + cost)).await;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                    let _ = down.await;
                });
            }
        });
        Throttle { port, throttled, task }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const RESUME_ROWS: u64 = 120_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_export_killed_mid_run_resumes_with_every_row_once() {
    let sshd = Sshd::start();
    // About 25 MB of CSV at 6 MB/s: a run of about 4 s, killed after its first file.
    let throttle = Throttle::start(sshd.port, 6_000_000).await;
    let remote = sshd.path("out");
    std::fs::create_dir(&remote).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&remote, std::fs::Permissions::from_mode(0o777)).unwrap();
    let url = format!("sftp://{}@127.0.0.1:{}{}", sshd.user, throttle.port, remote.display());
    let home = tempfile::tempdir().unwrap();
    let state = home.path().join("state.json");
    let textfile = home.path().join("metrics.prom");
    let from = format!("synthetic://?rows={RESUME_ROWS}&streams=2&flat=true");
    let mut args: Vec<String> =
        ["export", "--from", &from, "--to", &url, "--format", "csv"].into_iter().map(String::from).collect();
    args.extend(["--max-file-rows", "10000", "--success-marker", "--state-file"].map(String::from));
    args.push(state.display().to_string());
    args.extend(["--metrics-textfile".to_string(), textfile.display().to_string()]);
    // Reached through the relay's port, which known_hosts does not name: pin the key instead.
    args.extend(["--identity", &sshd.user_key.display().to_string(), "--no-agent"].map(String::from));
    args.extend(["--host-key-fingerprint".to_string(), sshd.fingerprint.clone()]);

    let log = home.path().join("first.log");
    let mut first = common::clean_command(home.path())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Wait for a committed data file (not a partial, not the manifest), then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files_in(&remote).iter().any(|n| n.ends_with(".csv")) {
        if let Some(status) = first.try_wait().unwrap() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("the export ended ({status}) before it could be killed:\n{log}");
        }
        assert!(Instant::now() < deadline, "no file committed within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap(); // SIGKILL: no cleanup, no state flush beyond what was already written
    first.wait().unwrap();
    let after_kill = files_in(&remote);
    assert!(!after_kill.contains(&"_MANIFEST.json".to_string()), "killed before the end: {after_kill:?}");

    // What the state file says is committed must stay exactly as it is: same inode, same mtime.
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).expect("the state file exists")).unwrap();
    let committed: Vec<String> = saved["lanes"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|lane| lane["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().to_string()))
        .collect();
    assert!(!committed.is_empty(), "the state records the committed file(s); on the server: {after_kill:?}");
    assert!(committed.len() < (RESUME_ROWS / 10_000) as usize, "the run was killed mid-way: {committed:?}");
    let identity = |name: &str| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(remote.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        (md.ino(), md.mtime(), md.mtime_nsec(), md.len())
    };
    let before: Vec<_> = committed.iter().map(|n| identity(n)).collect();

    // The second run, unthrottled, through the same URL (the state names its target).
    throttle.throttled.store(false, Ordering::Relaxed);
    let mut resumed = args.clone();
    resumed.push("--resume".into());
    let out = common::clean_command(home.path()).args(&resumed).stdout(Stdio::null()).output().unwrap();
    ok(out);

    let after: Vec<_> = committed.iter().map(|n| identity(n)).collect();
    assert_eq!(before, after, "committed files were not uploaded again: {committed:?}");
    let metrics = std::fs::read_to_string(&textfile).expect("metrics textfile");
    assert_eq!(
        sample(&metrics, "bq2sftp_resumed_files_total", &[]),
        Some(committed.len() as f64),
        "the resumed run counts the files it kept:\n{metrics}"
    );
    no_partials(&remote);
    assert!(remote.join("_SUCCESS").exists(), "{:?}", files_in(&remote));
    assert!(!state.exists(), "a finished job removes its state file");
    let (m, rows) = rows_on_server(&remote);
    assert_eq!(m.total_rows, RESUME_ROWS);
    assert!(committed.iter().all(|c| m.files.iter().any(|f| &f.name == c)), "kept files are in the manifest");
    assert_same_rows(&rows, &expected_rows(&from).await, "killed and resumed");
}

// ---- scale-out: plan, two shards and finalize over SFTP ----

const SHARD_ROWS: u64 = 24_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_over_sftp_waits_for_every_shard_then_writes_the_manifest() {
    let tables = tempfile::tempdir().unwrap();
    let table = write_table(
        tables.path(),
        "p.d.t",
        SyntheticOptions { rows: SHARD_ROWS, flat: true, batch_rows: 2000, ..Default::default() },
    );
    let emu = start_emulator(tables.path(), |_| {}).await;
    let host = emu.host_port();
    let sshd = Sshd::start();
    let url = sshd.url("shards");
    let remote = sshd.path("shards");
    let home = tempfile::tempdir().unwrap();
    let sftp = sftp_flags(&sshd);

    let plan_out = ok(common::emulator_command(home.path(), &host)
        .args(["plan", "--from", "bq://p.d.t", "--to", &url, "--format", "csv", "--compression", "zstd"])
        .args(["--max-file-rows", "5000", "--min-streams", "4", "--success-marker", "--create-dirs"])
        .args(&sftp)
        .output()
        .unwrap());
    let plan_path = home.path().join("plan.json");
    std::fs::write(&plan_path, &plan_out.stdout).unwrap();
    let plan: Value = serde_json::from_slice(&plan_out.stdout).unwrap();
    assert_eq!(plan["streams"].as_array().unwrap().len(), 4, "{plan}");
    assert_eq!(plan["export"]["to"], url.as_str(), "{plan}");
    let plan_arg = plan_path.to_str().unwrap();
    let shard = |i: usize| {
        let state = home.path().join(format!("state-{i}.json"));
        common::emulator_command(home.path(), &host)
            .args(["export", "--plan", plan_arg, "--shard", &format!("{i}/2"), "--state-file"])
            .arg(state)
            .output()
            .unwrap()
    };
    let finalize = || {
        common::emulator_command(home.path(), &host)
            .args(["finalize", "--plan", plan_arg, "--shard-count", "2", "--to", &url])
            .args(&sftp)
            .output()
            .unwrap()
    };

    // One shard after the other, as an Indexed Job with parallelism 1 runs them: shard 1 must
    // not take shard 0's committed files for an earlier run's output (it once refused, exit 2).
    ok(shard(0));
    let names = files_in(&remote);
    assert!(names.contains(&"_MANIFEST.shard-0-of-2.json".to_string()), "{names:?}");

    // Shard 1 has not run: finalize refuses (exit 6: run it, then finalize again), names it,
    // and writes nothing on the server.
    let refused = finalize();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(6), "{err}");
    assert!(err.contains("1/2") && err.contains("have not finished"), "{err}");
    assert_eq!(files_in(&remote), names, "a refused finalize changes nothing");

    ok(shard(1));
    let done = ok(finalize());
    assert!(String::from_utf8_lossy(&done.stderr).contains("finalized: 2 shards, 4 streams"));
    assert!(remote.join("_SUCCESS").exists(), "{:?}", files_in(&remote));
    no_partials(&remote);
    let (m, rows) = rows_on_server(&remote);
    assert_eq!(m.total_rows, SHARD_ROWS);
    assert_eq!(m.streams, vec![0, 1, 2, 3]);
    assert_eq!(m.shard, None, "the combined manifest belongs to no shard");
    assert!(m.files.iter().all(|f| f.name.ends_with(".csv.zst")), "{:?}", m.files);
    let want = expected_rows(&format!("parquet://{}", table.display())).await;
    assert_same_rows(&rows, &want, "two shards, finalized over sftp");

    // Finalizing twice would clobber the published manifest: refused (exit 2), nothing changed.
    let manifest_before = std::fs::read(remote.join("_MANIFEST.json")).unwrap();
    let twice = finalize();
    assert_eq!(twice.status.code(), Some(2), "{}", String::from_utf8_lossy(&twice.stderr));
    assert_eq!(std::fs::read(remote.join("_MANIFEST.json")).unwrap(), manifest_before);
}
