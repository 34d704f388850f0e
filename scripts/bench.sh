#!/usr/bin/env bash
# Side-by-side benchmarks: bq2sftp against the anchors the issues name, in ONE run on this
# machine, reported as ratios (the machines are shared and noisy; absolute numbers alone mean
# little). Results go into BENCHMARKS.md together with this command.
#
#   scripts/bench.sh [encode|read|sftp|all]      (default: all)
#   ROWS=1000000 REPS=3 BIG_ROWS="10000000 50000000" scripts/bench.sh encode
#
# encode: synthetic -> null and synthetic -> dir for csv, csv+gzip, parquet; pyarrow's
#         write_csv / write_table on the same rows; gzip -6 and pigz -p 2 -6 on the same CSV bytes;
#         peak RSS at BIG_ROWS.
# read:   scripts/bench-read.sh (BigQuery emulator -> null / csv.gz), when present.
# sftp:   scripts/bench-sftp.sh (uploads against a local sshd, delay proxy), when present.
#
# Installs its anchors when missing: pigz (apt), pyarrow (pip, into target/bench-venv).
# Sends traffic only to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHAT=${1:-all}
ROWS=${ROWS:-1000000}
REPS=${REPS:-3}
BIG_ROWS=${BIG_ROWS:-"10000000 50000000"}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bq2sftp-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

echo "# bq2sftp benchmarks: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m)"
echo "# command: scripts/bench.sh $WHAT (ROWS=$ROWS REPS=$REPS)"
cargo build --release --locked -q
BIN=$ROOT/target/release/bq2sftp

# best-of-REPS wall time and the peak RSS of a command: prints "SECONDS RSS_KIB"
measure() {
  local best="" rss=0 s kb
  for _ in $(seq "$REPS"); do
    if ! /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >/dev/null 2>"$WORK/stderr"; then
      echo "command failed: $*" >&2
      cat "$WORK/stderr" >&2
      exit 1
    fi
    read -r s kb <"$WORK/time"
    if [ -z "$best" ] || awk "BEGIN{exit !($s < $best)}"; then best=$s; fi
    if [ "$kb" -gt "$rss" ]; then rss=$kb; fi
  done
  echo "$best $rss"
}

# row NAME SECONDS ROWS DATA_BYTES RSS_KIB
row() {
  awk -v n="$1" -v s="$2" -v r="$3" -v b="$4" -v m="$5" 'BEGIN {
    s = (s < 0.001) ? 0.001 : s;
    printf "| %-44s | %7.2f | %12.0f | %8.1f | %8s |\n", n, s, r / s, b / s / 1e6, (m > 0 ? sprintf("%.0f MiB", m / 1024) : "-")
  }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", (b > 0 ? a / b : 0) }'; }

encode_bench() {
  command -v pigz >/dev/null || { as_root apt-get install -y -qq pigz >/dev/null; }
  local venv=$ROOT/target/bench-venv
  if ! "$venv/bin/python" -c "import pyarrow" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q pyarrow
  fi
  local syn="synthetic://?rows=$ROWS&streams=4&flat=true"

  # The same rows as one CSV file (the bytes gzip/pigz get) and one Parquet file (pyarrow's input).
  mkdir -p "$WORK/ref"
  "$BIN" export --from "$syn" --to "dir://$WORK/ref" --file-mode single --name-template 'ref{ext}' --no-manifest 2>/dev/null
  "$BIN" export --from "$syn" --to "dir://$WORK/ref" --format parquet --compression none --file-mode single \
    --name-template 'ref{ext}' --no-manifest 2>/dev/null
  local csv_bytes
  csv_bytes=$(stat -c %s "$WORK/ref/ref.csv")
  echo
  echo "## Encoding: $ROWS rows of every flat BigQuery type ($(awk -v b="$csv_bytes" 'BEGIN{printf "%.0f", b/1e6}') MB as CSV)"
  echo
  echo "| run | seconds | rows/s | MB/s (CSV bytes) | peak RSS |"
  echo "|---|---:|---:|---:|---:|"

  local t
  declare -A secs
  for case in "csv:csv:none" "csv+gzip:csv:gzip" "parquet+zstd:parquet:zstd"; do
    IFS=: read -r name format codec <<<"$case"
    t=$(measure "$BIN" export --from "$syn" --to null: --format "$format" --compression "$codec")
    secs["null $name"]=${t% *}
    row "bq2sftp synthetic -> null, $name" "${t% *}" "$ROWS" "$csv_bytes" "${t#* }"
  done
  for case in "csv:csv:none" "csv+gzip:csv:gzip" "parquet+zstd:parquet:zstd"; do
    IFS=: read -r name format codec <<<"$case"
    mkdir -p "$WORK/out"
    t=$(measure "$BIN" export --from "$syn" --to "dir://$WORK/out" --format "$format" --compression "$codec" --overwrite)
    secs["dir $name"]=${t% *}
    row "bq2sftp synthetic -> dir, $name" "${t% *}" "$ROWS" "$csv_bytes" "${t#* }"
    if [ "$name" = "csv+gzip" ]; then
      gz_bytes=$(python3 -c "import json,sys; print(json.load(open('$WORK/out/_MANIFEST.json'))['total_bytes'])")
    fi
    rm -rf "$WORK/out"
  done

  # pyarrow: the table is loaded first (not timed); BYTES become base64 strings beforehand
  # because write_csv refuses raw binary, which makes its job easier than ours.
  "$venv/bin/python" - "$WORK" "$REPS" >"$WORK/pyarrow.txt" <<'PY'
import base64, sys, time
import pyarrow as pa, pyarrow.csv as pc, pyarrow.parquet as pq
work, reps = sys.argv[1], int(sys.argv[2])
table = pq.read_table(f"{work}/ref/ref.parquet")
b64 = pa.array([None if v is None else base64.b64encode(v).decode() for v in table.column("bytes_col").to_pylist()])
csv_table = table.set_column(table.schema.get_field_index("bytes_col"), "bytes_col", b64)
def best(f):
    times = []
    for _ in range(reps):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return min(times)
print("csv", best(lambda: pc.write_csv(csv_table, f"{work}/py.csv")))
print("parquet", best(lambda: pq.write_table(table, f"{work}/py.parquet", compression="zstd")))
PY
  local py_csv py_pq
  py_csv=$(awk '$1=="csv"{print $2}' "$WORK/pyarrow.txt")
  py_pq=$(awk '$1=="parquet"{print $2}' "$WORK/pyarrow.txt")
  row "pyarrow write_csv (table in memory)" "$py_csv" "$ROWS" "$csv_bytes" 0
  row "pyarrow write_table zstd (table in memory)" "$py_pq" "$ROWS" "$csv_bytes" 0

  t=$(measure sh -c "gzip -6 -c '$WORK/ref/ref.csv' >'$WORK/ref.csv.gz'")
  local gzip_s=${t% *} gzip_bytes
  gzip_bytes=$(stat -c %s "$WORK/ref.csv.gz")
  row "gzip -6 (same CSV bytes)" "$gzip_s" "$ROWS" "$csv_bytes" "${t#* }"
  t=$(measure sh -c "pigz -p 2 -6 -c '$WORK/ref/ref.csv' >'$WORK/ref.csv.pigz.gz'")
  local pigz_s=${t% *} pigz_bytes
  pigz_bytes=$(stat -c %s "$WORK/ref.csv.pigz.gz")
  row "pigz -p 2 -6 (same CSV bytes)" "$pigz_s" "$ROWS" "$csv_bytes" "${t#* }"

  echo
  echo "Ratios (higher is better for bq2sftp):"
  echo "- CSV rows/s, bq2sftp synthetic -> null vs pyarrow write_csv: $(ratio "$py_csv" "${secs["null csv"]}") (target >= 2x)"
  echo "- Parquet zstd rows/s, bq2sftp -> null vs pyarrow write_table: $(ratio "$py_pq" "${secs["null parquet+zstd"]}") (target >= 1x)"
  echo "- csv+gzip MB/s, bq2sftp -> null vs pigz -p 2 -6: $(ratio "$pigz_s" "${secs["null csv+gzip"]}") (target >= 1.5x); vs gzip -6: $(ratio "$gzip_s" "${secs["null csv+gzip"]}")"
  echo "- gzip size, bq2sftp vs pigz -6: $(ratio "$gz_bytes" "$pigz_bytes") (target within 2%); vs gzip -6: $(ratio "$gz_bytes" "$gzip_bytes")"

  echo
  echo "## Peak memory, synthetic -> null, csv+gzip, 4 streams"
  echo
  echo "| rows | seconds | rows/s | MB/s | peak RSS |"
  echo "|---|---:|---:|---:|---:|"
  local n
  for n in $BIG_ROWS; do
    t=$(REPS=1 measure "$BIN" export --from "synthetic://?rows=$n&streams=4&flat=true" --to null: --compression gzip)
    row "$n" "${t% *}" "$n" "$(awk -v b="$csv_bytes" -v n="$n" -v r="$ROWS" 'BEGIN{printf "%.0f", b*n/r}')" "${t#* }"
  done
}

case "$WHAT" in
  encode) encode_bench ;;
  read) [ -x scripts/bench-read.sh ] && scripts/bench-read.sh ;;
  sftp) [ -x scripts/bench-sftp.sh ] && scripts/bench-sftp.sh ;;
  all)
    encode_bench
    if [ -x scripts/bench-read.sh ]; then scripts/bench-read.sh; fi
    if [ -x scripts/bench-sftp.sh ]; then scripts/bench-sftp.sh; fi
    ;;
  *) echo "usage: scripts/bench.sh [encode|read|sftp|all]" >&2; exit 2 ;;
esac
