//! The deployment script's dry run: every command it would run, checked for least privilege
//! and consistency; every shell script in scripts/ and deploy/ passes bash -n and shellcheck
//! (scripts/test.sh installs shellcheck).

use std::process::Command;

fn dry_run(mode: &str) -> String {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gcp.sh"))
        .args(["--dry-run", "--project", "acme-data", "--region", "europe-west1"])
        .args(["--image", "europe-docker.pkg.dev/acme-data/tools/bq2sftp:1.0", "--dataset", "sales"])
        .args(["--from", "bq://acme-data.sales.orders", "--to", "sftp://partner@sftp.example.com/incoming"])
        .args(["--sftp-password-file", "/dev/null", "--known-hosts-file", "/dev/null", "--schedule", "0 3 * * *"])
        .args(["--mode", mode])
        .env("PATH", "/usr/bin:/bin") // no gcloud needed: nothing runs
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn commands(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn the_dry_run_prints_a_least_privilege_deployment() {
    for mode in ["job", "service"] {
        let text = dry_run(mode);
        let cmds = commands(&text);
        assert!(cmds.iter().all(|c| c.starts_with("gcloud ") || c.starts_with("bq ")), "{text}");
        // No broad roles anywhere.
        for broad in [
            "roles/owner",
            "roles/editor",
            "roles/bigquery.admin",
            "roles/bigquery.dataViewer --condition",
            "roles/secretmanager.admin",
        ] {
            assert!(!text.contains(broad), "{mode}: {broad}");
        }
        // Project-level grants: exactly the two BigQuery roles that exist only at project level.
        let project_grants: Vec<_> =
            cmds.iter().filter(|c| c.starts_with("gcloud projects add-iam-policy-binding")).collect();
        assert_eq!(project_grants.len(), 2, "{text}");
        assert!(project_grants.iter().any(|c| c.contains("--role=roles/bigquery.readSessionUser")));
        assert!(project_grants.iter().any(|c| c.contains("--role=roles/bigquery.jobUser")));
        // Data access on the one dataset only.
        assert!(cmds.iter().any(|c| c.starts_with("bq add-iam-policy-binding")
            && c.contains("roles/bigquery.dataViewer")
            && c.ends_with("acme-data:sales")));
        // Every secret is created and bound to the runner alone, one by one.
        let created: Vec<_> = cmds.iter().filter(|c| c.starts_with("gcloud secrets create")).collect();
        let bound: Vec<_> = cmds.iter().filter(|c| c.starts_with("gcloud secrets add-iam-policy-binding")).collect();
        assert_eq!(created.len(), bound.len(), "{text}");
        assert!(
            bound
                .iter()
                .all(|c| c.contains("--role=roles/secretmanager.secretAccessor") && c.contains("bq2sftp-runner@"))
        );
        // The workload runs as the dedicated runner, never the default compute account.
        let deploy = cmds.iter().find(|c| c.starts_with("gcloud run")).unwrap();
        assert!(deploy.contains("--service-account=bq2sftp-runner@acme-data.iam.gserviceaccount.com"), "{deploy}");
        // Only the invoker may start it, and the scheduler uses the invoker.
        assert!(cmds.iter().any(|c| c.contains("add-iam-policy-binding bq2sftp ")
            && c.contains("roles/run.invoker")
            && c.contains("bq2sftp-invoker@")));
        let schedule = cmds.iter().find(|c| c.starts_with("gcloud scheduler jobs create http")).unwrap();
        if mode == "service" {
            // The OIDC audience is the service URL the service itself checks.
            let audience = schedule.split("--oidc-token-audience=").nth(1).unwrap();
            assert!(schedule.contains(&format!("--uri={audience}/jobs/bq2sftp/run")), "{schedule}");
            assert!(text.contains(&format!("BQ2SFTP_SERVE_AUDIENCE={audience}")), "{text}");
            assert!(deploy.contains("--no-allow-unauthenticated"));
        } else {
            assert!(schedule.contains("--oauth-service-account-email=bq2sftp-invoker@"), "{schedule}");
            assert!(deploy.contains("--resume"), "retries resume: {deploy}");
        }
    }
}

#[test]
fn missing_parameters_are_refused() {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gcp.sh"))
        .args(["--dry-run", "--project", "p"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--region") && err.contains("--image"), "{err}");
}

/// Every shell script of the repository: `scripts/*.sh` and `deploy/*.sh` found by listing the
/// directories (a new script cannot be forgotten here), and CI's entry point.
fn scripts() -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut found = vec![".ci/run".to_string()];
    for dir in ["scripts", "deploy"] {
        let entries = std::fs::read_dir(format!("{root}/{dir}")).unwrap_or_else(|e| panic!("{dir}/: {e}"));
        for entry in entries {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".sh") {
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn the_scripts_pass_bash_n_and_shellcheck() {
    let scripts = scripts();
    // The listing works: the scripts the README and BENCHMARKS.md name are all in it.
    for named in
        ["deploy/gcp.sh", "scripts/test.sh", "scripts/bench.sh", "scripts/bench-sftp.sh", "scripts/bench-read.sh"]
    {
        assert!(scripts.iter().any(|s| s == named), "{named} is not checked: {scripts:?}");
    }
    for script in &scripts {
        let path = format!("{}/{script}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash").args(["-n", &path]).output().unwrap();
        assert!(out.status.success(), "bash -n {script}: {}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new("shellcheck")
            .arg(&path)
            .output()
            .expect("shellcheck is installed (scripts/test.sh installs it)");
        assert!(out.status.success(), "shellcheck {script}:\n{}", String::from_utf8_lossy(&out.stdout));
    }
}
