#!/usr/bin/env bash
# Read-path benchmark: the BigQuery Storage Read API reader against the project's emulator on
# 127.0.0.1 (real gRPC, Arrow IPC with LZ4_FRAME buffer compression unless noted):
#
#   emulator -> null      1 stream, 4 streams, 4 streams without buffer compression
#   emulator -> csv.gz -> dir, 4 streams
#
# For each: best-of-REPS wall time, rows/s, MB/s of Arrow IPC received and decoded, the
# reader's CPU (user+sys) and peak RSS, the emulator's CPU, and the time spent in Arrow
# decoding (summed over threads). Called by scripts/bench.sh; runs on its own too:
#
#   READ_ROWS=2000000 REPS=3 scripts/bench-read.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
READ_ROWS=${READ_ROWS:-2000000}
REPS=${REPS:-3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bq2sftp-bench-read.XXXXXX")
EMU_PID=""
cleanup() {
  if [ -n "$EMU_PID" ]; then kill "$EMU_PID" 2>/dev/null || true; wait "$EMU_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --locked -q
BIN=$ROOT/target/release/bq2sftp

# The table: READ_ROWS synthetic rows of every flat BigQuery type, as bench.d.t.parquet.
mkdir -p "$WORK/tables"
"$BIN" export --from "synthetic://?rows=$READ_ROWS&flat=true" --to "dir://$WORK/tables" --format parquet \
  --file-mode single --prefix bench.d.t --name-template '{prefix}{ext}' --no-manifest >/dev/null 2>&1

"$BIN" emulator --tables "$WORK/tables" --port 0 2>"$WORK/emulator.log" &
EMU_PID=$!
HOST=""
for _ in $(seq 100); do
  HOST=$(sed -n 's/.*BIGQUERY_EMULATOR_HOST=\([0-9.:]*\).*/\1/p' "$WORK/emulator.log" | head -1)
  [ -n "$HOST" ] && break
  sleep 0.1
done
[ -n "$HOST" ] || { echo "bench-read: the emulator did not start" >&2; cat "$WORK/emulator.log" >&2; exit 1; }
export BIGQUERY_EMULATOR_HOST=$HOST
# Load the table into the emulator before timing anything (a dry run creates a session).
"$BIN" export --from bq://bench.d.t --to null: --dry-run >/dev/null

ticks() { awk '{print $14 + $15}' "/proc/$EMU_PID/stat"; }
HZ=$(getconf CLK_TCK)

echo
echo "## Read path: BigQuery emulator -> bq2sftp ($READ_ROWS rows, every flat type; best of $REPS; $(nproc) cores)"
echo
echo "| case | wall s | rows/s | Arrow IPC MB/s (wire) | reader CPU s | emulator CPU s | decode CPU s | peak RSS MiB |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"

run_case() {
  local name=$1
  shift
  local best="" line=""
  for _ in $(seq "$REPS"); do
    rm -rf "$WORK/out" && mkdir -p "$WORK/out"
    local t0 t1
    t0=$(ticks)
    /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" \
      env BQ2SFTP_LOG=bq2sftp=info NO_COLOR=1 "$BIN" export "$@" >/dev/null 2>"$WORK/log"
    t1=$(ticks)
    local wall user sys rss ipc decode_ms
    read -r wall user sys rss <"$WORK/time"
    ipc=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/log" | sed -n 's/.*bigquery read totals.*ipc_bytes=\([0-9]*\).*/\1/p' | tail -1)
    decode_ms=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/log" | sed -n 's/.*decode_ms=\([0-9]*\).*/\1/p' | tail -1)
    if [ -z "$best" ] || awk "BEGIN{exit !($wall < $best)}"; then
      best=$wall
      line=$(awk -v w="$wall" -v u="$user" -v s="$sys" -v r="$rss" -v i="${ipc:-0}" -v d="${decode_ms:-0}" \
        -v e="$((t1 - t0))" -v hz="$HZ" -v rows="$READ_ROWS" -v n="$name" \
        'BEGIN{printf "| %s | %.2f | %.0f | %.0f | %.2f | %.2f | %.2f | %.0f |", n, w, rows/w, i/1e6/w, u+s, e/hz, d/1000, r/1024}')
    fi
  done
  echo "$line"
}

BQ=(--from bq://bench.d.t)
# The floor: the same rows generated in-process, through the same CSV encoding (null: still encodes).
run_case "synthetic -> null, 4 streams (reference, no BigQuery)" --from "synthetic://?rows=$READ_ROWS&flat=true&streams=4" --to null:
run_case "emulator -> null, 1 stream" "${BQ[@]}" --to null: --max-streams 1
run_case "emulator -> null, 4 streams" "${BQ[@]}" --to null: --min-streams 4 --max-streams 4
run_case "emulator -> null, 4 streams, no buffer compression" "${BQ[@]}" --to null: --min-streams 4 --max-streams 4 --arrow-compression none
run_case "emulator -> csv.gz -> dir, 4 streams" "${BQ[@]}" --to "dir://$WORK/out" --format csv --compression gzip --min-streams 4 --max-streams 4
echo
echo "null: discards the files but still encodes CSV, so the synthetic row is the pipeline's floor. Arrow IPC MB/s"
echo "counts bytes received (LZ4-compressed unless noted); decode CPU is the time spent in arrow-ipc decoding summed"
echo "over streams. Reader and emulator share the machine's cores."
