//! `bq2sftp serve` over real HTTP on 127.0.0.1: OIDC tokens signed locally and checked against
//! a local JWKS server that answers as Google's does; every kind of bad token is refused and
//! starts nothing; a good token runs the job (async and `?wait=true`); 409, 400 and drain.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bq2sftp::serve::{self, ServeArgs};
use common::files_in;
use common::google::test_key;
use common::oidc::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn jobs_file(dir: &Path, out: &Path) -> std::path::PathBuf {
    let path = dir.join("jobs.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[jobs.nightly]
from = "synthetic://?rows=4000&streams=2&flat=true"
to = "dir://{out}"
format = "csv"
no_state = true
overwrite = true
overridable = ["prefix", "max_file_rows"]

[jobs.slow]
from = "synthetic://?rows=50000000&streams=2&flat=true"
to = "null:"
compression = "gzip"
no_state = true
"#,
            out = out.display()
        ),
    )
    .unwrap();
    path
}

fn args(jobs: &Path, jwks: &str) -> ServeArgs {
    ServeArgs {
        jobs: jobs.to_path_buf(),
        addr: "127.0.0.1:0".parse().unwrap(),
        audience: Some(AUDIENCE.to_string()),
        allowed_callers: vec![CALLER.to_string()],
        jwks_url: jwks.to_string(),
        max_concurrent_runs: 2,
        drain_timeout: 1,
        insecure_no_auth: false,
    }
}

async fn post(base: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get_json(base: &str, path: &str, token: &str) -> (u16, Value) {
    let resp = reqwest::Client::new().get(format!("{base}{path}")).bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_start_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let key = test_key(tmp.path());
    let other_dir = tmp.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = test_key(&other_dir);
    let jwks = start_jwks(&key).await;
    let server = serve::start(&args(&jobs_file(tmp.path(), &out), &jwks.url)).await.unwrap();
    let base = format!("http://{}", server.local_addr);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        c
    };
    let hs256 = jsonwebtoken::encode(
        &Header { kid: Some(KID.into()), ..Header::new(Algorithm::HS256) },
        &claims(),
        &EncodingKey::from_secret(key.public_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let wrong_aud = sign(&key, KID, &with(&|c| c["aud"] = json!("https://elsewhere.example")));
    let expired = sign(
        &key,
        KID,
        &with(&|c| {
            c["iat"] = json!(now() - 7200);
            c["exp"] = json!(now() - 3600);
        }),
    );
    let future = sign(&key, KID, &with(&|c| c["iat"] = json!(now() + 3600)));
    let wrong_iss = sign(&key, KID, &with(&|c| c["iss"] = json!("https://evil.example")));
    let bad_signature = sign(&other, KID, &claims());
    let unknown_kid = sign(&key, "kid-nobody-published", &claims());
    let intruder = sign(&key, KID, &with(&|c| c["email"] = json!("intruder@p.iam.gserviceaccount.com")));
    let unverified = sign(&key, KID, &with(&|c| c["email_verified"] = json!(false)));
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("no token", None, 401),
        ("garbage", Some("not-a-jwt".into()), 401),
        ("wrong audience", Some(wrong_aud), 401),
        ("expired", Some(expired), 401),
        ("issued in the future", Some(future), 401),
        ("wrong issuer", Some(wrong_iss), 401),
        ("bad signature", Some(bad_signature), 401),
        ("unknown kid", Some(unknown_kid), 401),
        ("alg none", Some(unsigned(&claims())), 401),
        ("HS256 with the public key", Some(hs256), 401),
        ("caller not allowed", Some(intruder), 403),
        ("email not verified", Some(unverified), 401),
    ];
    for (what, token, status) in cases {
        let (got, body) = post(&base, "/jobs/nightly/run", token.as_deref(), None).await;
        assert_eq!(got, status, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    }
    assert_eq!(files_in(&out), Vec::<String>::new(), "no bad token started a job");
    // The unknown kid made the key set be fetched again, but only once: forged kids cannot
    // make the server hammer the endpoint.
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_token_runs_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let key = test_key(tmp.path());
    let jwks = start_jwks(&key).await;
    let server = serve::start(&args(&jobs_file(tmp.path(), &out), &jwks.url)).await.unwrap();
    let base = format!("http://{}", server.local_addr);
    let token = sign(&key, KID, &claims());

    // Asynchronous: 202 with a run id, then poll.
    let (status, body) = post(&base, "/jobs/nightly/run", Some(&token), Some(json!({"prefix": "day1"}))).await;
    assert_eq!(status, 202, "{body}");
    let id = body["run_id"].as_str().unwrap().to_string();
    let view = loop {
        let (s, v) = get_json(&base, &format!("/runs/{id}"), &token).await;
        assert_eq!(s, 200);
        if v["status"] != "running" {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["rows"], 4000);
    assert_eq!(view["counters"]["rows_read"], 4000);
    assert_eq!(view["files"].as_array().unwrap().len(), 2);
    assert!(out.join("day1-000-00000.csv").exists() && out.join("_MANIFEST.json").exists());

    // Synchronous, with an allowed override.
    let (status, view) = post(
        &base,
        "/jobs/nightly/run?wait=true",
        Some(&token),
        Some(json!({"prefix": "day2", "max_file_rows": 1000})),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["files"].as_array().unwrap().len(), 4);

    // Overrides the job does not allow, unknown jobs and runs.
    let (status, body) =
        post(&base, "/jobs/nightly/run", Some(&token), Some(json!({"to": "dir:///tmp/elsewhere"}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("may not be set"), "{body}");
    assert_eq!(post(&base, "/jobs/nope/run", Some(&token), None).await.0, 404);
    assert_eq!(get_json(&base, "/runs/nope", &token).await.0, 404);

    // Health and metrics need no token.
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("bq2sftp_jobs_total"), "{metrics}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_answers_409_and_sigterm_drains_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let key = test_key(tmp.path());
    let jwks = start_jwks(&key).await;
    let server = serve::start(&args(&jobs_file(tmp.path(), &out), &jwks.url)).await.unwrap();
    let base = format!("http://{}", server.local_addr);
    let token = sign(&key, KID, &claims());
    let (status, body) = post(&base, "/jobs/slow/run", Some(&token), None).await;
    assert_eq!(status, 202, "{body}");
    let id = body["run_id"].as_str().unwrap().to_string();
    let (status, body) = post(&base, "/jobs/slow/run", Some(&token), None).await;
    assert_eq!(status, 409, "{body}");

    // Drain: the slow job outlives the 1 s drain timeout and is cancelled (resumable, exit 6).
    let base2 = base.clone();
    let token2 = token.clone();
    let watcher = tokio::spawn(async move {
        // While draining, new runs are refused.
        tokio::time::sleep(Duration::from_millis(300)).await;
        post(&base2, "/jobs/nightly/run", Some(&token2), None).await.0
    });
    let stats_before = get_json(&base, &format!("/runs/{id}"), &token).await.1;
    assert_eq!(stats_before["status"], "running");
    server.shutdown().await;
    assert_eq!(watcher.await.unwrap(), 503);
}

#[tokio::test]
async fn configuration_is_checked_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let jobs = jobs_file(tmp.path(), &out);
    let mut a = args(&jobs, "http://127.0.0.1:9/certs");
    a.audience = None;
    assert!(serve::start(&a).await.err().unwrap().to_string().contains("--audience"));
    let mut a = args(&jobs, "http://127.0.0.1:9/certs");
    a.allowed_callers.clear();
    assert!(serve::start(&a).await.err().unwrap().to_string().contains("--allowed-caller"));
    let mut a = args(&jobs, "http://127.0.0.1:9/certs");
    a.insecure_no_auth = true;
    a.addr = "0.0.0.0:0".parse().unwrap();
    assert!(serve::start(&a).await.err().unwrap().to_string().contains("loopback"));
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[jobs.x]\nfrom = \"synthetic://?rows=1\"\nto = \"null:\"\nformat = \"xml\"\n").unwrap();
    let err = serve::start(&args(&bad, "http://127.0.0.1:9/certs")).await.err().unwrap().to_string();
    assert!(err.contains("job 'x'") && err.contains("unknown format"), "{err}");
    std::fs::write(&bad, "[jobs.x]\nfrom = \"synthetic://?rows=1\"\nto = \"null:\"\noverridable = [\"colour\"]\n")
        .unwrap();
    let err = serve::start(&args(&bad, "http://127.0.0.1:9/certs")).await.err().unwrap().to_string();
    assert!(err.contains("'colour' is not an export flag"), "{err}");
}
