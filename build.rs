//! Compiles the BigQuery Storage Read API protos in `proto/` into Rust (prost messages, tonic
//! client and server). `protox` parses the `.proto` files in Rust, so no system `protoc` is
//! needed; the well-known types (Timestamp, Duration, Any) map to `prost-types`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/google/cloud/bigquery/storage/v1/storage.proto",
        "proto/google/rpc/status.proto",
        "proto/google/rpc/error_details.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=proto/google/cloud/bigquery/storage/v1/stream.proto");
    println!("cargo:rerun-if-changed=proto/google/cloud/bigquery/storage/v1/arrow.proto");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Record batches arrive as `Bytes` slices of the HTTP/2 buffer: no copy before decoding.
        .bytes(".google.cloud.bigquery.storage.v1.ArrowRecordBatch")
        .bytes(".google.cloud.bigquery.storage.v1.ArrowSchema")
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
