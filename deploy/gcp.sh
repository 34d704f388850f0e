#!/usr/bin/env bash
# Deploys bq2sftp on Google Cloud with least privilege and every parameter explicit.
#
# The seed guide's lessons, applied: one dedicated service account that can only read the one
# dataset, create read sessions and query jobs in the billing project, and read the named SFTP
# secrets; a second one for the scheduler that can only invoke this job or service; nothing
# granted at the project level beyond the two BigQuery roles that exist only there; every
# `gcloud` flag spelled out, so re-running the script never silently drops a parameter.
#
#   deploy/gcp.sh --project P --region R --image IMAGE --dataset D \
#       --from bq://P.D.TABLE --to 'sftp://user@sftp.example.com/incoming' \
#       --sftp-password-file ./password.txt --known-hosts-file ./known_hosts \
#       --schedule '0 3 * * *' [--mode job|service] [--dry-run]
#
# --dry-run prints every command instead of running it. Requires gcloud and bq (Cloud SDK).
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'TXT'
Options:
  --project ID              project that runs the job and holds the secrets (required)
  --billing-project ID      project billed for BigQuery reads and queries (default: --project)
  --region REGION           Cloud Run and Cloud Scheduler region (required)
  --image IMAGE             container image built from this repo's Dockerfile (required)
  --dataset [PROJECT:]DS    the only dataset the job may read (required)
  --from URL / --to URL     the export, as for `bq2sftp export` (required)
  --name NAME               job/service name (default: bq2sftp)
  --mode job|service        Cloud Run Job started by Scheduler (default), or a service running
                            `bq2sftp serve` that Scheduler calls with an OIDC token
  --schedule CRON           Cloud Scheduler schedule (required), --time-zone TZ (default UTC)
  --sftp-password-file F    SFTP password (stored as secret NAME-sftp-password)
  --sftp-key-file F         SFTP private key (stored as secret NAME-sftp-key)
  --known-hosts-file F      the server's known_hosts line(s) (stored as secret NAME-known-hosts)
  --format F, --compression C   output (default csv, gzip)
  --tasks N                 shards of one export (Cloud Run Job tasks; default 1)
  --dry-run                 print the commands, run nothing
TXT
}

project="" billing="" region="" image="" dataset="" from="" to="" name="bq2sftp" mode="job"
schedule="" tz="UTC" password_file="" key_file="" known_hosts_file="" format="csv" compression="gzip"
tasks=1 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --project) project=$2; shift 2 ;;
    --billing-project) billing=$2; shift 2 ;;
    --region) region=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --dataset) dataset=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --to) to=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --schedule) schedule=$2; shift 2 ;;
    --time-zone) tz=$2; shift 2 ;;
    --sftp-password-file) password_file=$2; shift 2 ;;
    --sftp-key-file) key_file=$2; shift 2 ;;
    --known-hosts-file) known_hosts_file=$2; shift 2 ;;
    --format) format=$2; shift 2 ;;
    --compression) compression=$2; shift 2 ;;
    --tasks) tasks=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy/gcp.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

missing=()
for v in project region image dataset from to schedule; do
  [ -n "${!v}" ] || missing+=("--$v")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deploy/gcp.sh: missing ${missing[*]} (see --help)" >&2
  exit 2
fi
case "$mode" in job|service) ;; *) echo "deploy/gcp.sh: --mode must be job or service" >&2; exit 2 ;; esac
if [ -z "$password_file" ] && [ -z "$key_file" ]; then
  echo "deploy/gcp.sh: give --sftp-password-file or --sftp-key-file" >&2
  exit 2
fi
if [ -z "$known_hosts_file" ]; then
  echo "deploy/gcp.sh: give --known-hosts-file: host keys are verified (ssh-keyscan HOST > known_hosts, then check it)" >&2
  exit 2
fi
billing=${billing:-$project}
case "$dataset" in *:*) dataset_ref=$dataset ;; *) dataset_ref="$project:$dataset" ;; esac

runner_sa="$name-runner"
runner_email="$runner_sa@$project.iam.gserviceaccount.com"
invoker_sa="$name-invoker"
invoker_email="$invoker_sa@$project.iam.gserviceaccount.com"

# Prints the command in a form that can be pasted back into a shell, then runs it (or not).
run() {
  printf '%q ' "$@" | sed 's/ $//'
  echo
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

echo "# 1. APIs"
run gcloud services enable bigquery.googleapis.com bigquerystorage.googleapis.com run.googleapis.com \
  cloudscheduler.googleapis.com secretmanager.googleapis.com --project="$project"

echo "# 2. Service accounts: one runs the export, one may only start it"
run gcloud iam service-accounts create "$runner_sa" --project="$project" \
  --display-name="bq2sftp export runner ($name)"
run gcloud iam service-accounts create "$invoker_sa" --project="$project" \
  --display-name="bq2sftp scheduler invoker ($name)"

echo "# 3. BigQuery: read sessions and query jobs in the billing project, data on the one dataset"
run gcloud projects add-iam-policy-binding "$billing" --member="serviceAccount:$runner_email" \
  --role=roles/bigquery.readSessionUser --condition=None
run gcloud projects add-iam-policy-binding "$billing" --member="serviceAccount:$runner_email" \
  --role=roles/bigquery.jobUser --condition=None
run bq add-iam-policy-binding --member="serviceAccount:$runner_email" \
  --role=roles/bigquery.dataViewer "$dataset_ref"

echo "# 4. SFTP secrets, readable by the runner only, one binding per secret"
secret_env=()
add_secret() { # SECRET-NAME FILE ENV-NAME
  run gcloud secrets create "$1" --project="$project" --replication-policy=automatic --data-file="$2"
  run gcloud secrets add-iam-policy-binding "$1" --project="$project" \
    --member="serviceAccount:$runner_email" --role=roles/secretmanager.secretAccessor
  secret_env+=("$3=$1:latest")
}
if [ -n "$password_file" ]; then add_secret "$name-sftp-password" "$password_file" SFTP_PASSWORD; fi
if [ -n "$key_file" ]; then add_secret "$name-sftp-key" "$key_file" SFTP_PRIVATE_KEY; fi
add_secret "$name-known-hosts" "$known_hosts_file" SFTP_KNOWN_HOSTS
secrets=$(IFS=,; echo "${secret_env[*]}")

export_args="export,--from=$from,--to=$to,--format=$format,--compression=$compression,--resume,--log-format=json"

if [ "$mode" = job ]; then
  echo "# 5. Cloud Run Job (retries resume where the last attempt stopped)"
  run gcloud run jobs deploy "$name" --project="$project" --region="$region" --image="$image" \
    --service-account="$runner_email" --set-secrets="$secrets" \
    --args="$export_args" --tasks="$tasks" --max-retries=3 --task-timeout=6h \
    --cpu=2 --memory=1Gi
  run gcloud run jobs add-iam-policy-binding "$name" --project="$project" --region="$region" \
    --member="serviceAccount:$invoker_email" --role=roles/run.invoker

  echo "# 6. Cloud Scheduler: starts the job with an OAuth token of the invoker"
  run gcloud scheduler jobs create http "$name-schedule" --project="$project" --location="$region" \
    --schedule="$schedule" --time-zone="$tz" --http-method=POST \
    --uri="https://run.googleapis.com/v2/projects/$project/locations/$region/jobs/$name:run" \
    --oauth-service-account-email="$invoker_email" \
    --oauth-token-scope=https://www.googleapis.com/auth/cloud-platform
else
  echo "# 5. The jobs file 'bq2sftp serve' runs (no secrets in it), mounted from Secret Manager"
  jobs_file=$(mktemp)
  trap 'rm -f "$jobs_file"' EXIT
  cat >"$jobs_file" <<TOML
[jobs.$name]
from = "$from"
to = "$to"
format = "$format"
compression = "$compression"
resume = true
TOML
  run gcloud secrets create "$name-jobs" --project="$project" --replication-policy=automatic --data-file="$jobs_file"
  run gcloud secrets add-iam-policy-binding "$name-jobs" --project="$project" \
    --member="serviceAccount:$runner_email" --role=roles/secretmanager.secretAccessor
  secrets="$secrets,/etc/bq2sftp/jobs.toml=$name-jobs:latest"

  echo "# 6. Cloud Run service running 'bq2sftp serve'; only the invoker may call it"
  run gcloud run deploy "$name" --project="$project" --region="$region" --image="$image" \
    --service-account="$runner_email" --set-secrets="$secrets" --no-allow-unauthenticated \
    --args="serve,--addr=0.0.0.0:8080,--jobs=/etc/bq2sftp/jobs.toml" \
    --set-env-vars="BQ2SFTP_SERVE_ALLOWED_CALLERS=$invoker_email" \
    --cpu=2 --memory=1Gi --timeout=3600 --max-instances=1 --concurrency=4
  run gcloud run services add-iam-policy-binding "$name" --project="$project" --region="$region" \
    --member="serviceAccount:$invoker_email" --role=roles/run.invoker
  url="https://$name-PROJECT_NUMBER.$region.run.app"
  if [ "$dry_run" = 0 ]; then
    url=$(gcloud run services describe "$name" --project="$project" --region="$region" --format='value(status.url)')
  fi
  echo "# The service checks the token's audience against its own URL: set it explicitly."
  run gcloud run services update "$name" --project="$project" --region="$region" \
    --update-env-vars="BQ2SFTP_SERVE_AUDIENCE=$url"

  echo "# 7. Cloud Scheduler: calls the service with an OIDC token whose audience is the service URL"
  run gcloud scheduler jobs create http "$name-schedule" --project="$project" --location="$region" \
    --schedule="$schedule" --time-zone="$tz" --http-method=POST \
    --uri="$url/jobs/$name/run" \
    --oidc-service-account-email="$invoker_email" --oidc-token-audience="$url"
fi
echo "# done: the runner can read $dataset_ref and its secrets, nothing else"
