//! Formats: turning record batches into file bytes.
//!
//! An [`Encoder`] answers `write(&RecordBatch)` and `finish()`, like arrow-rs writers, and
//! hands out the bytes it produced through [`Encoder::drain_into`] so the pipeline can stream
//! them to a sink without holding a whole file. A format is one file in this folder plus one
//! entry in [`FORMATS`]; the pipeline only sees the table.
//!
//! Row formats (CSV, NDJSON) are *splittable*: the bytes of a batch do not depend on the
//! batches before it, so the pipeline encodes batches on several threads and concatenates the
//! results in order ([`Part::Body`]). Parquet is not: one encoder owns one file.

pub mod compress;
pub mod csv;
pub mod json;
pub mod ndjson;
pub mod parquet;
pub mod text;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, SchemaRef};

pub use compress::Compression;

use crate::error::ConfigError;

pub trait Encoder: Send {
    /// Encodes one batch.
    fn write(&mut self, batch: &RecordBatch) -> Result<(), EncodeError>;
    /// Ends the file: writes what a file needs after its last row (Parquet's footer) or before
    /// its first row when there were none (a CSV header of an empty table).
    fn finish(&mut self) -> Result<(), EncodeError>;
    /// Appends the bytes produced so far to `out` and forgets them.
    fn drain_into(&mut self, out: &mut Vec<u8>);
    /// Encoded bytes still held inside the encoder (Parquet's open row group), for file rolling.
    fn buffered_bytes(&self) -> usize {
        0
    }
}

/// What an encoder instance produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A complete file: preamble (CSV header), rows, trailer (Parquet footer).
    Whole,
    /// Only the rows of each batch, for splittable formats encoded in parallel.
    Body,
}

/// Options for every format, each read by the format it concerns.
#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    pub csv: csv::CsvOptions,
    pub parquet: parquet::ParquetOptions,
}

/// Makes an encoder for a schema.
pub type BuildFn = fn(&SchemaRef, &FormatOptions, Part) -> Result<Box<dyn Encoder>, EncodeError>;

/// One row of the format table.
pub struct Format {
    pub name: &'static str,
    /// File extension, including the dot, before any compression suffix.
    pub extension: &'static str,
    /// Bytes of one batch are independent of the others (see the module docs).
    pub splittable: bool,
    /// The format compresses internally (Parquet codecs) instead of as a whole file.
    pub internal_compression: bool,
    pub build: BuildFn,
}

impl std::fmt::Debug for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every format bq2sftp can write.
pub static FORMATS: &[Format] = &[csv::FORMAT, parquet::FORMAT, ndjson::FORMAT];

/// Looks a format up by name (`csv`, `parquet`, `ndjson`; `json` and `jsonl` mean ndjson).
pub fn format(name: &str) -> Result<&'static Format, ConfigError> {
    let name = match name.to_ascii_lowercase().as_str() {
        "json" | "jsonl" | "newline_delimited_json" => "ndjson".to_string(),
        other => other.to_string(),
    };
    FORMATS.iter().find(|f| f.name == name).ok_or_else(|| {
        let known: Vec<_> = FORMATS.iter().map(|f| f.name).collect();
        ConfigError::invalid(format!("--format {name}"), format!("unknown format; use one of: {}", known.join(", ")))
    })
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error(
        "csv: column '{column}' is nested ({data_type}) and CSV cannot hold nested data; pass --csv-nested json to write it as JSON text, leave the column out, or use --format parquet or ndjson"
    )]
    NestedColumn { column: String, data_type: DataType },
    #[error("{format}: column '{column}' has type {data_type}, which this format cannot write")]
    UnsupportedType { format: &'static str, column: String, data_type: DataType },
    #[error("parquet: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("{codec} compression failed: {message}")]
    Compression { codec: &'static str, message: String },
}

impl EncodeError {
    /// The data's shape does not fit the chosen format: a usage problem, not a runtime fault.
    pub fn is_schema_problem(&self) -> bool {
        matches!(self, EncodeError::NestedColumn { .. } | EncodeError::UnsupportedType { .. })
    }
}

/// The value of the `ARROW:extension:name` metadata BigQuery puts on a field, if any.
pub fn sql_type(field: &arrow_schema::Field) -> Option<&str> {
    field.metadata().get("ARROW:extension:name").and_then(|v| v.strip_prefix("google:sqlType:"))
}
