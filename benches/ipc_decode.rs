//! Arrow IPC decoding of Storage Read API responses, per buffer codec: how many bytes of
//! Arrow data one core turns into record batches per second. The read path must never be the
//! pipeline's bottleneck, so this should sit well above what one CSV or Parquet encoder thread
//! consumes (see benches/encode.rs).
//!
//! `cargo bench --bench ipc_decode`

use std::hint::black_box;
use std::sync::Arc;

use bq2sftp::read::bigquery::decode::{BatchDecoder, BatchEncoder, BufferCompression};
use bq2sftp::read::synthetic::{SyntheticOptions, SyntheticSource};
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn decode(c: &mut Criterion) {
    // One response of 8192 rows of every flat BigQuery type, as the emulator sends it.
    let source = SyntheticSource::new(SyntheticOptions { flat: true, ..Default::default() });
    let batch = source.batch(0, 8192);
    let raw = BatchEncoder::new(BufferCompression::None).unwrap().encode(&batch).unwrap().len() as u64;
    let mut group = c.benchmark_group("ipc_decode");
    // Throughput in uncompressed Arrow bytes, so the codecs compare on the same scale.
    group.throughput(Throughput::Bytes(raw));
    for (name, codec) in [
        ("none", BufferCompression::None),
        ("lz4_frame", BufferCompression::Lz4Frame),
        ("zstd", BufferCompression::Zstd),
    ] {
        let message = Bytes::from(BatchEncoder::new(codec).unwrap().encode(&batch).unwrap());
        let decoder = BatchDecoder::new(Arc::new(batch.schema().as_ref().clone()));
        group.bench_function(name, |b| b.iter(|| black_box(decoder.decode(message.clone()).unwrap())));
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
