//! Scale-out: `plan` once against the emulator, 4 shard processes (one killed mid-export and
//! re-run with `--resume`), `finalize` refusing while a shard is missing, then every row of the
//! table exactly once.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bq2sftp::emulator::Faults;
use bq2sftp::read::synthetic::SyntheticOptions;
use common::google::{start_emulator, write_table};
use common::*;

const ROWS: u64 = 240_000;

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_shards_one_killed_and_resumed_write_every_row_once() {
    let tables = tempfile::tempdir().unwrap();
    write_table(
        tables.path(),
        "p.d.t",
        SyntheticOptions { rows: ROWS, flat: true, batch_rows: 4000, ..Default::default() },
    );
    // Slow responses keep the killed shard busy long enough to be killed mid-stream.
    let emu = start_emulator(tables.path(), |c| {
        c.response_rows = 2000;
        c.faults = Faults { slow: Some(Duration::from_millis(15)), ..Default::default() };
    })
    .await;
    let host = emu.host_port();
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("out");
    std::fs::create_dir(&out).unwrap();

    let plan_out = ok(common::emulator_command(home.path(), &host)
        .args(["plan", "--from", "bq://p.d.t", "--to", &format!("dir://{}", out.display())])
        .args([
            "--format",
            "csv",
            "--compression",
            "gzip",
            "--max-file-rows",
            "10000",
            "--min-streams",
            "8",
            "--success-marker",
            // The binary's global flags may follow the subcommand; they belong to this
            // process's logger, not to the plan the shards run.
            "-v",
            "--log-format",
            "text",
        ])
        .output()
        .unwrap());
    let plan_path = home.path().join("plan.json");
    std::fs::write(&plan_path, &plan_out.stdout).unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan_out.stdout).unwrap();
    assert_eq!(plan["streams"].as_array().unwrap().len(), 8, "{plan}");
    assert_eq!(plan["export"]["format"], "csv");
    assert!(plan["export"].get("log-format").is_none() && plan["export"].get("verbose").is_none(), "{plan}");
    let plan_arg = plan_path.to_str().unwrap();
    let state = |i: usize| home.path().join(format!("state-{i}.json"));

    // Shard 3 (streams 3 and 7), with its index from Kubernetes' variable: killed once it has
    // committed a file.
    let mut killed = common::emulator_command(home.path(), &host)
        .args(["export", "--plan", plan_arg, "--shard-count", "4", "--state-file", state(3).to_str().unwrap()])
        .env("JOB_COMPLETION_INDEX", "3")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !files_in(&out).iter().any(|n| n.starts_with("t-003-") || n.starts_with("t-007-")) {
        assert!(killed.try_wait().unwrap().is_none(), "shard 3 finished before it could be killed");
        assert!(Instant::now() < deadline, "shard 3 committed nothing in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.kill().unwrap();
    killed.wait().unwrap();

    // The others run to the end, in parallel, as Cloud Run tasks would (index and count from env).
    let others: Vec<_> = (0..3)
        .map(|i| {
            common::emulator_command(home.path(), &host)
                .args(["export", "--plan", plan_arg, "--state-file", state(i).to_str().unwrap()])
                .env("CLOUD_RUN_TASK_INDEX", i.to_string())
                .env("CLOUD_RUN_TASK_COUNT", "4")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in others {
        ok(child.wait_with_output().unwrap());
    }

    // Shard 3 is missing: finalize refuses, names it, and writes nothing.
    let refused = common::emulator_command(home.path(), &host)
        .args(["finalize", "--plan", plan_arg, "--shard-count", "4"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(6), "{err}");
    assert!(err.contains("3/4") && err.contains("have not finished"), "{err}");
    assert!(!out.join("_MANIFEST.json").exists() && !out.join("_SUCCESS").exists());

    // A wrong target directory is a target failure (5), not "shards still running" (6), which
    // a scheduler would retry forever.
    let wrong = format!("dir://{}", out.join("no-such-dir").display());
    let refused = common::emulator_command(home.path(), &host)
        .args(["finalize", "--plan", plan_arg, "--shard-count", "4", "--to", &wrong])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(5), "{err}");
    assert!(err.contains("no-such-dir") && err.contains("does not exist"), "{err}");

    ok(common::emulator_command(home.path(), &host)
        .args(["export", "--plan", plan_arg, "--shard", "3/4", "--resume", "--state-file", state(3).to_str().unwrap()])
        .output()
        .unwrap());
    ok(common::emulator_command(home.path(), &host)
        .args(["finalize", "--plan", plan_arg, "--shard-count", "4"])
        .output()
        .unwrap());
    assert!(out.join("_SUCCESS").exists());

    let m = manifest(&out);
    assert_eq!(m.total_rows, ROWS);
    assert_eq!(m.streams, (0..8).collect::<Vec<_>>());
    let mut ids = Vec::new();
    for f in &m.files {
        let bytes = std::fs::read(out.join(&f.name)).unwrap();
        assert_eq!(sha256_hex(&bytes), f.sha256, "{}", f.name);
        let records = csv_records(&decompressed(&out.join(&f.name)));
        assert_eq!(records.len() as u64, f.rows, "{}", f.name);
        ids.extend(records.iter().map(|r| r[0].parse::<u64>().unwrap()));
    }
    ids.sort_unstable();
    assert_eq!(ids.len() as u64, ROWS);
    assert!(ids.iter().copied().eq(0..ROWS), "every row exactly once");
    assert!(!files_in(&out).iter().any(|n| n.ends_with(".partial")));
}
