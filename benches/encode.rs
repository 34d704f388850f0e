//! Encoder throughput on a 1M-row table of every flat BigQuery type (the synthetic table):
//! CSV, CSV + gzip, NDJSON and Parquet (zstd, snappy), one thread each. Throughput is rows/s;
//! the bytes each encoding produces are printed once so MB/s follows. The end-to-end, all-core
//! numbers and the comparison with pyarrow and pigz come from `scripts/bench.sh`.

use std::hint::black_box;

use arrow_array::RecordBatch;
use bq2sftp::encode::{self, Compression, FormatOptions, Part, parquet::Codec};
use bq2sftp::read::synthetic::{SyntheticOptions, SyntheticSource};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const ROWS: usize = 1_000_000;
const BATCH: usize = 16_384;

fn table() -> Vec<RecordBatch> {
    let src = SyntheticSource::new(SyntheticOptions { rows: ROWS as u64, flat: true, ..Default::default() });
    (0..ROWS).step_by(BATCH).map(|at| src.batch(at as u64, BATCH.min(ROWS - at))).collect()
}

/// Encodes the table as one file; with `compression`, each batch becomes one block as in the
/// pipeline. Returns the output size.
fn encode_all(batches: &[RecordBatch], format: &str, options: &FormatOptions, compression: Compression) -> usize {
    let f = encode::format(format).unwrap();
    let mut enc = (f.build)(&batches[0].schema(), options, Part::Whole).unwrap();
    let (mut raw, mut out) = (Vec::new(), 0usize);
    let mut block = Vec::new();
    for b in batches {
        enc.write(b).unwrap();
        enc.drain_into(&mut raw);
        block.clear();
        compression.compress_block(&raw, &mut block).unwrap();
        out += block.len();
        raw.clear();
    }
    enc.finish().unwrap();
    enc.drain_into(&mut raw);
    out + raw.len()
}

fn bench(c: &mut Criterion) {
    let batches = table();
    let parquet = |codec| FormatOptions {
        parquet: encode::parquet::ParquetOptions { codec, ..Default::default() },
        ..Default::default()
    };
    let cases: Vec<(&str, &str, FormatOptions, Compression)> = vec![
        ("csv", "csv", FormatOptions::default(), Compression::None),
        ("csv+gzip6", "csv", FormatOptions::default(), Compression::Gzip { level: 6 }),
        ("csv+zstd3", "csv", FormatOptions::default(), Compression::Zstd { level: 3 }),
        ("ndjson", "ndjson", FormatOptions::default(), Compression::None),
        ("parquet+zstd", "parquet", parquet(Codec::Zstd(3)), Compression::None),
        ("parquet+snappy", "parquet", parquet(Codec::Snappy), Compression::None),
    ];
    let mut group = c.benchmark_group("encode_1M_rows");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    for (name, format, options, compression) in &cases {
        let size = encode_all(&batches, format, options, *compression);
        eprintln!("{name}: {:.1} MB for {ROWS} rows", size as f64 / 1e6);
        group.bench_function(*name, |b| b.iter(|| black_box(encode_all(&batches, format, options, *compression))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
