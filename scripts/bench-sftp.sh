#!/usr/bin/env bash
# Side-by-side SFTP upload benchmark (issue 4, items 9 and 10): the same CSV file uploaded to
# one local OpenSSH sshd by bq2sftp (`put` of the file, and `export` of the synthetic table
# that encodes to those bytes), OpenSSH `sftp -b` and paramiko `SFTPClient.put`, with the same
# cipher, at several round-trip times simulated by a delay proxy (examples/delay_proxy.rs).
#
# Everything runs on 127.0.0.1; paramiko is installed from PyPI into target/bench-venv-sftp.
# Knobs (environment):
#   BENCH_SIZE_MIB=1024          size of the CSV file
#   BENCH_RTTS="0 10 40"         round-trip times in ms (0: direct to sshd)
#   BENCH_CIPHERS="aes128-gcm@openssh.com chacha20-poly1305@openssh.com"
#   BENCH_TOOLS="bq2sftp-put bq2sftp-export sftp paramiko"
#   BENCH_REPEAT=1               runs per cell; the best is reported
#   BENCH_SFTP_CONNECTIONS=N     bq2sftp --sftp-connections (default: bq2sftp's own, 8)
#   BENCH_OUT=FILE               also write the result table there
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SIZE_MIB=${BENCH_SIZE_MIB:-1024}
RTTS=${BENCH_RTTS:-0 10 40}
CIPHERS=${BENCH_CIPHERS:-aes128-gcm@openssh.com chacha20-poly1305@openssh.com}
TOOLS=${BENCH_TOOLS:-bq2sftp-put bq2sftp-export sftp paramiko}
REPEAT=${BENCH_REPEAT:-1}
CONNS=${BENCH_SFTP_CONNECTIONS:-}

SSHD=$(command -v sshd || echo /usr/sbin/sshd)
for tool in "$SSHD" ssh-keygen sftp python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench-sftp: $tool is missing (apt-get install openssh-server openssh-client python3-venv)" >&2; exit 1; }
done

echo "bench-sftp: building (release)" >&2
cargo build --release --quiet --bin bq2sftp --example delay_proxy
BIN=$ROOT/target/release/bq2sftp
DELAY=$ROOT/target/release/examples/delay_proxy

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bq2sftp-bench.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do
    python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench-sftp: nothing listens on port $1" >&2; return 1
}

# --- the server: one sshd, every cipher under test (aes128-ctr for paramiko's fallback) ---
mkdir -p "$WORK/files"
chmod 755 "$WORK"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/user_key"
cp "$WORK/user_key.pub" "$WORK/authorized_keys"
PORT=$(free_port)
cat > "$WORK/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $WORK/host_key
PidFile $WORK/sshd.pid
AuthorizedKeysFile $WORK/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
PermitRootLogin yes
Subsystem sftp internal-sftp
MaxStartups 100
MaxSessions 64
Ciphers $(echo "$CIPHERS" | tr ' ' ','),aes128-ctr
EOF
if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd; fi
"$SSHD" -D -e -f "$WORK/sshd_config" 2>"$WORK/sshd.log" &
PIDS+=($!)
wait_port "$PORT"
USER_NAME=$(id -un)

declare -A PORTS
: > "$WORK/known_hosts"
for rtt in $RTTS; do
  if [ "$rtt" = 0 ]; then
    PORTS[$rtt]=$PORT
  else
    "$DELAY" --listen 127.0.0.1:0 --upstream "127.0.0.1:$PORT" --rtt-ms "$rtt" >"$WORK/delay-$rtt.out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do grep -qs listening "$WORK/delay-$rtt.out" && break; sleep 0.05; done
    PORTS[$rtt]=$(awk '/listening on/ {print $3}' "$WORK/delay-$rtt.out")
  fi
  echo "[127.0.0.1]:${PORTS[$rtt]} $(cut -d' ' -f1,2 "$WORK/host_key.pub")" >> "$WORK/known_hosts"
done

# --- the data: SIZE_MIB of CSV from the synthetic table (flat columns) ---
"$BIN" export --from 'synthetic://?rows=20000&flat=true' --to "dir://$WORK/probe" --format csv \
  --file-mode single --prefix probe --no-manifest --create-dirs >/dev/null 2>&1
PROBE_BYTES=$(stat -c %s "$WORK"/probe/*.csv)
ROWS=$(( SIZE_MIB * 1048576 * 20000 / PROBE_BYTES ))
"$BIN" export --from "synthetic://?rows=$ROWS&flat=true" --to "dir://$WORK/src" --format csv \
  --file-mode single --max-file-bytes 1TiB --prefix bench --no-manifest --create-dirs >/dev/null 2>&1
SRC=$(ls "$WORK"/src/*.csv)
BYTES=$(stat -c %s "$SRC")
rm -rf "$WORK/probe"
echo "bench-sftp: $ROWS rows of CSV, $BYTES bytes; sshd $("$SSHD" -V 2>&1 | head -1 || true)" >&2

HAVE_PARAMIKO=0
VENV=$ROOT/target/bench-venv-sftp
if [[ " $TOOLS " == *" paramiko "* ]]; then
  if { [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >/dev/null 2>&1; } &&
     "$VENV/bin/pip" install -q paramiko >/dev/null 2>&1; then
    HAVE_PARAMIKO=1
  else
    echo "bench-sftp: cannot install paramiko (python3-venv and PyPI access needed); skipping it" >&2
  fi
fi
cat > "$WORK/put.py" <<'EOF'
# paramiko SFTPClient.put, as the seed guide's uploader does it (plus host key checking).
import sys, paramiko
host, port, user, key, known_hosts, cipher, src, dst = sys.argv[1:9]
client = paramiko.SSHClient()
client.load_host_keys(known_hosts)
client.set_missing_host_key_policy(paramiko.RejectPolicy())
offered = paramiko.Transport._preferred_ciphers
disabled = [c for c in offered if c != cipher] if cipher in offered else []
client.connect(host, port=int(port), username=user, key_filename=key, look_for_keys=False,
               allow_agent=False, disabled_algorithms={"ciphers": disabled})
print(client.get_transport().local_cipher, file=sys.stderr)
sftp = client.open_sftp()
sftp.put(src, dst)
sftp.close()
client.close()
EOF
echo "put $SRC $WORK/files/sftp.csv" > "$WORK/batch"

# Runs one upload; prints its MB/s, or "-" when the tool is unavailable or failed.
run_once() {
  local tool=$1 rtt=$2 cipher=$3 port=${PORTS[$2]} out=$WORK/files/out.csv
  local url="sftp://$USER_NAME@127.0.0.1:$port$WORK/files"
  local common=(--identity "$WORK/user_key" --known-hosts "$WORK/known_hosts" --no-agent --ciphers "$cipher" --overwrite)
  if [ -n "$CONNS" ]; then common+=(--sftp-connections "$CONNS"); fi
  rm -f "$WORK"/files/*
  local start end
  start=$(date +%s.%N)
  case $tool in
    bq2sftp-put)
      "$BIN" put "$SRC" --to "$url" "${common[@]}" >"$WORK/run.log" 2>&1 || { echo -; return; }
      out=$WORK/files/$(basename "$SRC") ;;
    bq2sftp-export)
      "$BIN" export --from "synthetic://?rows=$ROWS&flat=true" --to "$url" --format csv --file-mode single \
        --max-file-bytes 1TiB --prefix bench --no-manifest "${common[@]}" >"$WORK/run.log" 2>&1 || { echo -; return; }
      out=$(ls "$WORK"/files/*.csv) ;;
    sftp)
      sftp -q -b "$WORK/batch" -i "$WORK/user_key" -o UserKnownHostsFile="$WORK/known_hosts" \
        -o StrictHostKeyChecking=yes -o Ciphers="$cipher" -P "$port" "$USER_NAME@127.0.0.1" >"$WORK/run.log" 2>&1 \
        || { echo -; return; }
      out=$WORK/files/sftp.csv ;;
    paramiko)
      [ "$HAVE_PARAMIKO" = 1 ] || { echo -; return; }
      "$VENV/bin/python" "$WORK/put.py" 127.0.0.1 "$port" "$USER_NAME" "$WORK/user_key" "$WORK/known_hosts" \
        "$cipher" "$SRC" "$WORK/files/paramiko.csv" >"$WORK/run.log" 2>&1 || { echo -; return; }
      out=$WORK/files/paramiko.csv ;;
  esac
  end=$(date +%s.%N)
  local got
  got=$(stat -c %s "$out" 2>/dev/null || echo 0)
  if [ "$got" != "$BYTES" ]; then echo "bench-sftp: $tool wrote $got of $BYTES bytes" >&2; echo -; return; fi
  python3 -c "print(f'{$BYTES / ($end - $start) / 1e6:.1f}')"
}

best() {
  local best=- v
  for _ in $(seq "$REPEAT"); do
    v=$(run_once "$@")
    if [ "$v" != - ] && { [ "$best" = - ] || python3 -c "import sys; sys.exit(0 if $v > $best else 1)"; }; then best=$v; fi
  done
  echo "$best"
}

ratio() { if [ "$1" = - ] || [ "$2" = - ]; then echo -; else python3 -c "print(f'{$1 / $2:.2f}x')"; fi; }

TABLE=$WORK/table
{
  echo "# bq2sftp SFTP upload benchmark: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $BYTES bytes of CSV, one sshd on 127.0.0.1"
  echo "# bq2sftp --sftp-connections ${CONNS:-default}; paramiko $( [ "$HAVE_PARAMIKO" = 1 ] && "$VENV/bin/python" -c 'import paramiko; print(paramiko.__version__)' || echo n/a) (no chacha20-poly1305: it uses aes128-ctr there)"
  printf "%-7s %-31s %12s %14s %9s %9s %12s %12s\n" rtt_ms cipher bq2sftp_put bq2sftp_export sftp paramiko put/sftp put/paramiko
} > "$TABLE"
cat "$TABLE" >&2
for rtt in $RTTS; do
  for cipher in $CIPHERS; do
    declare -A R=()
    for tool in bq2sftp-put bq2sftp-export sftp paramiko; do
      if [[ " $TOOLS " == *" $tool "* ]]; then R[$tool]=$(best "$tool" "$rtt" "$cipher"); else R[$tool]=-; fi
    done
    line=$(printf "%-7s %-31s %12s %14s %9s %9s %12s %12s" "$rtt" "$cipher" "${R[bq2sftp-put]}" "${R[bq2sftp-export]}" \
      "${R[sftp]}" "${R[paramiko]}" "$(ratio "${R[bq2sftp-put]}" "${R[sftp]}")" "$(ratio "${R[bq2sftp-put]}" "${R[paramiko]}")")
    echo "$line" | tee -a "$TABLE" >&2
  done
done
echo "# MB/s = 10^6 bytes per second, wall clock including connection setup; best of $REPEAT run(s)" | tee -a "$TABLE" >&2
if [ -n "${BENCH_OUT:-}" ]; then cp "$TABLE" "$BENCH_OUT"; fi
cat "$TABLE"
