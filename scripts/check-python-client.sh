#!/usr/bin/env bash
# Checks by hand that Google's official Python client (google-cloud-bigquery-storage + pyarrow)
# reads from bq2sftp's emulator exactly what the Parquet file holds, with each Arrow buffer
# codec, plus selected fields and a row restriction through its rows() reader. Not part of CI
# (it installs packages from PyPI into target/python-client-venv). Traffic stays on 127.0.0.1.
#
#   scripts/check-python-client.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/target/python-client-venv
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bq2sftp-pyclient.XXXXXX")
EMU_PID=""
cleanup() {
  if [ -n "$EMU_PID" ]; then kill "$EMU_PID" 2>/dev/null || true; wait "$EMU_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q google-cloud-bigquery-storage pyarrow
cargo build --release --locked -q
BIN=$ROOT/target/release/bq2sftp

mkdir -p "$WORK/tables"
"$BIN" export --from 'synthetic://?rows=20000' --to "dir://$WORK/tables" --format parquet --file-mode single \
  --prefix p.d.t --name-template '{prefix}{ext}' --no-manifest --no-state >/dev/null 2>&1
"$BIN" emulator --tables "$WORK/tables" --port 0 2>"$WORK/emulator.log" &
EMU_PID=$!
HOST=""
for _ in $(seq 100); do
  HOST=$(sed -n 's/.*BIGQUERY_EMULATOR_HOST=\([0-9.:]*\).*/\1/p' "$WORK/emulator.log" | head -1)
  [ -n "$HOST" ] && break
  sleep 0.1
done
[ -n "$HOST" ] || { cat "$WORK/emulator.log" >&2; exit 1; }

"$VENV/bin/pip" list 2>/dev/null | grep -E '^(google-cloud-bigquery-storage|grpcio|pyarrow) '
"$VENV/bin/python" - "$HOST" "$WORK/tables/p.d.t.parquet" <<'EOF'
import math, sys
import grpc, pyarrow as pa, pyarrow.parquet as pq
from google.cloud.bigquery_storage_v1 import BigQueryReadClient, types
from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

host, path = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(host, options=[("grpc.max_receive_message_length", 129 << 20)])
client = BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
want = pq.read_table(path).sort_by("id")
Codec = types.ArrowSerializationOptions.CompressionCodec
failed = False
for codec in ["COMPRESSION_UNSPECIFIED", "LZ4_FRAME", "ZSTD"]:
    session = client.create_read_session(request=types.CreateReadSessionRequest(
        parent="projects/p",
        read_session=types.ReadSession(
            table="projects/p/datasets/d/tables/t",
            data_format=types.DataFormat.ARROW,
            read_options=types.ReadSession.TableReadOptions(
                arrow_serialization_options=types.ArrowSerializationOptions(buffer_compression=getattr(Codec, codec))
            ),
        ),
        max_stream_count=4,
        preferred_min_stream_count=3,
    ))
    got = pa.concat_tables([client.read_rows(s.name).to_arrow(session) for s in session.streams]).sort_by("id")
    different = []
    for name in want.column_names:
        a, b = got.column(name), want.column(name)
        if a.equals(b):
            continue
        if pa.types.is_floating(b.type):  # NaN != NaN in equals()
            same = lambda x, y: x == y or (x is not None and y is not None and math.isnan(x) and math.isnan(y))
            if all(same(x, y) for x, y in zip(a.to_pylist(), b.to_pylist())):
                continue
        different.append(name)
    ok = got.num_rows == want.num_rows and not different and got.schema.equals(want.schema, check_metadata=True)
    failed |= not ok
    print(f"{codec}: {len(session.streams)} streams, {got.num_rows} rows, schema and field metadata equal: "
          f"{got.schema.equals(want.schema, check_metadata=True)}, differing columns: {different or 'none'}")
session = client.create_read_session(
    parent="projects/p",
    read_session=types.ReadSession(
        table="projects/p/datasets/d/tables/t",
        data_format=types.DataFormat.ARROW,
        read_options=types.ReadSession.TableReadOptions(selected_fields=["id", "record.b"], row_restriction="id < 10"),
    ),
    max_stream_count=1,
)
rows = list(client.read_rows(session.streams[0].name).rows(session))
print(f"selected_fields + row_restriction via rows(): {len(rows)} rows, fields {list(rows[0].keys())}")
failed |= len(rows) != 10
sys.exit(1 if failed else 0)
EOF
echo "check-python-client: OK"
