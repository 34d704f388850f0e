//! `parquet:///path`: local Parquet files read as one table.
//!
//! The path is a file or a directory of `*.parquet` files (sorted by name, not recursive).
//! Streams are runs of consecutive row groups, so a stream maps onto byte ranges of the files
//! and streams can be decoded in parallel. Every file must have the same Arrow schema; the schema
//! comes from the file's embedded Arrow metadata when present, which keeps BigQuery's field
//! metadata (DATETIME/GEOGRAPHY/JSON tags) and the TIMESTAMP time zone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};

use super::{BatchStream, ReadError, ReadPlan, Source, SourceDescription, StreamSpec};
use crate::error::ConfigError;

pub const DEFAULT_BATCH_ROWS: usize = 8192;
/// Streams when `streams=` is not given (bounded by the number of row groups).
pub const DEFAULT_MAX_STREAMS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetSourceOptions {
    pub path: PathBuf,
    pub streams: usize,
    pub batch_rows: usize,
}

impl ParquetSourceOptions {
    /// Parses what follows `parquet://`: `/abs/path` or `rel/path`, optional `?streams=K&batch_rows=B`.
    pub fn from_url(rest: &str) -> Result<Self, ConfigError> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(ConfigError::invalid(
                "--from parquet://",
                "missing path; use parquet:///data/table.parquet or parquet:///data/dir",
            ));
        }
        let mut o = ParquetSourceOptions {
            path: PathBuf::from(path),
            streams: DEFAULT_MAX_STREAMS,
            batch_rows: DEFAULT_BATCH_ROWS,
        };
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let n: usize = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                ConfigError::invalid(
                    format!("--from parquet://…?{key}="),
                    format!("'{value}' is not a positive number"),
                )
            })?;
            match key.as_ref() {
                "streams" => o.streams = n,
                "batch_rows" => o.batch_rows = n,
                other => {
                    return Err(ConfigError::invalid(
                        "--from parquet://",
                        format!("unknown option '{other}'; known: streams, batch_rows"),
                    ));
                }
            }
        }
        Ok(o)
    }

    pub fn default_prefix(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "export".to_string())
    }
}

/// One row group of one file.
#[derive(Debug, Clone)]
struct Unit {
    file: usize,
    row_group: usize,
    rows: u64,
}

#[derive(Debug)]
struct Layout {
    files: Vec<(PathBuf, ArrowReaderMetadata)>,
    streams: Vec<Vec<Unit>>,
}

pub struct ParquetSource {
    options: ParquetSourceOptions,
    layout: OnceLock<Arc<Layout>>,
}

impl ParquetSource {
    pub fn new(options: ParquetSourceOptions) -> Self {
        ParquetSource { options, layout: OnceLock::new() }
    }
}

fn list_files(path: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let io = |source| ReadError::Io { path: path.display().to_string(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "parquet") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ReadError::NoParquetFiles { path: path.display().to_string() });
    }
    Ok(files)
}

fn load_layout(options: &ParquetSourceOptions) -> Result<Layout, ReadError> {
    let mut files: Vec<(PathBuf, ArrowReaderMetadata)> = Vec::new();
    let mut units = Vec::new();
    for (index, path) in list_files(&options.path)?.into_iter().enumerate() {
        let shown = path.display().to_string();
        let file = File::open(&path).map_err(|source| ReadError::Io { path: shown.clone(), source })?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|source| ReadError::CorruptParquet { path: shown.clone(), source })?;
        if let Some((first, first_meta)) = files.first()
            && first_meta.schema().fields() != meta.schema().fields()
        {
            return Err(ReadError::SchemaMismatch { path: shown, first: first.display().to_string() });
        }
        for (row_group, rg) in meta.metadata().row_groups().iter().enumerate() {
            if rg.num_rows() > 0 {
                units.push(Unit { file: index, row_group, rows: rg.num_rows() as u64 });
            }
        }
        files.push((path, meta));
    }
    // Contiguous runs of row groups, as even in row count as whole row groups allow.
    let n = units.len().min(options.streams).max(usize::from(!units.is_empty()));
    let total: u64 = units.iter().map(|u| u.rows).sum();
    let mut streams: Vec<Vec<Unit>> = vec![Vec::new(); n];
    let mut seen = 0u64;
    for unit in units {
        let slot = if total == 0 { 0 } else { ((seen as u128 * n as u128) / total as u128) as usize };
        seen += unit.rows;
        streams[slot.min(n - 1)].push(unit);
    }
    streams.retain(|s| !s.is_empty());
    Ok(Layout { files, streams })
}

#[async_trait::async_trait]
impl Source for ParquetSource {
    async fn plan(&self) -> Result<ReadPlan, ReadError> {
        let options = self.options.clone();
        let layout = match self.layout.get() {
            Some(l) => l.clone(),
            None => {
                let loaded = tokio::task::spawn_blocking(move || load_layout(&options)).await.map_err(|e| {
                    ReadError::Stream { source_name: "parquet".into(), stream: "plan".into(), message: e.to_string() }
                })??;
                self.layout.get_or_init(|| Arc::new(loaded)).clone()
            }
        };
        let schema = layout.files[0].1.schema().clone();
        let streams: Vec<StreamSpec> = layout
            .streams
            .iter()
            .enumerate()
            .map(|(index, units)| {
                let (first, last) = (&units[0], &units[units.len() - 1]);
                let name = format!(
                    "{} row group {} .. {} row group {}",
                    layout.files[first.file].0.display(),
                    first.row_group,
                    layout.files[last.file].0.display(),
                    last.row_group
                );
                StreamSpec { index, name, rows: Some(units.iter().map(|u| u.rows).sum()) }
            })
            .collect();
        let rows = streams.iter().filter_map(|s| s.rows).sum();
        Ok(ReadPlan {
            schema,
            streams,
            estimated_rows: Some(rows),
            description: SourceDescription {
                kind: "parquet".into(),
                name: self.options.path.display().to_string(),
                snapshot_time: None,
                expires_at: None,
            },
        })
    }

    fn read(self: Arc<Self>, _plan: &ReadPlan, stream: &StreamSpec, offset: u64) -> BatchStream {
        let index = stream.index;
        let batch_rows = self.options.batch_rows;
        super::blocking_stream(2, move |tx| {
            let Some(layout) = self.layout.get() else {
                let _ = tx.blocking_send(Err(ReadError::Stream {
                    source_name: "parquet".into(),
                    stream: index.to_string(),
                    message: "read before plan".into(),
                }));
                return;
            };
            let mut skip = offset;
            for unit in layout.streams.get(index).into_iter().flatten() {
                if skip >= unit.rows {
                    skip -= unit.rows;
                    continue;
                }
                let (path, meta) = &layout.files[unit.file];
                let shown = path.display().to_string();
                let reader =
                    File::open(path).map_err(|source| ReadError::Io { path: shown.clone(), source }).and_then(|file| {
                        ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta.clone())
                            .with_row_groups(vec![unit.row_group])
                            .with_batch_size(batch_rows)
                            .with_offset(skip as usize)
                            .build()
                            .map_err(|source| ReadError::CorruptParquet { path: shown.clone(), source })
                    });
                skip = 0;
                let reader = match reader {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                };
                for batch in reader {
                    let item = batch.map_err(|e| ReadError::CorruptParquet {
                        path: shown.clone(),
                        source: parquet::errors::ParquetError::ArrowError(e.to_string()),
                    });
                    let failed = item.is_err();
                    if tx.blocking_send(item).is_err() || failed {
                        return;
                    }
                }
            }
        })
    }
}
