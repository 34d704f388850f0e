//! Parquet following BigQuery's Parquet export type mapping ("Parquet export details",
//! docs.cloud.google.com/bigquery/docs/exporting-data; table in
//! `../shared/reference/bigquery-storage-read-facts.md` §4).
//!
//! The Arrow types the Storage Read API sends already map onto that table through arrow-rs's
//! schema conversion, so no casts are needed:
//! - NUMERIC `Decimal128(38,9)` and BIGNUMERIC `Decimal256(76,38)` become DECIMAL on
//!   FIXED_LEN_BYTE_ARRAY (precision above 18 always takes FLBA in arrow-rs);
//! - DATETIME `Timestamp(µs)` becomes TIMESTAMP(isAdjustedToUTC=false, MICROS); DATE is INT32
//!   DATE; STRING (and GEOGRAPHY/JSON text) is BYTE_ARRAY STRING;
//!   BYTES is plain BYTE_ARRAY;
//! - TIMESTAMP `Timestamp(µs, UTC)` becomes TIMESTAMP(isAdjustedToUTC=true, MICROS). The export
//!   page prints `false` for TIMESTAMP too; we keep `true` because a TIMESTAMP is an instant and
//!   every reader then converts it correctly. Noted in the README;
//! - ARRAY/STRUCT become repeated fields and groups.
//! - TIME becomes TIME(isAdjustedToUTC=true, MICROS) as the export table says. arrow-rs writes
//!   `false` for TIME, so the converted Parquet schema is patched ([`bigquery_schema`]); the
//!   values and their reading back as `Time64(µs)` are unchanged.
//!
//! Memory: the writer holds the open row group encoded in memory, so row groups are capped by
//! bytes ([`DEFAULT_ROW_GROUP_BYTES`]); a 1 GiB file is many row groups, never 1 GiB of RAM.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter, arrow_writer::ArrowWriterOptions};
use parquet::basic::{ConvertedType, GzipLevel, LogicalType, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::{SchemaDescriptor, Type, TypePtr};

use super::{EncodeError, Encoder, Format};
use crate::error::ConfigError;

pub const FORMAT: Format = Format {
    name: "parquet",
    extension: ".parquet",
    splittable: false,
    internal_compression: true,
    build: |schema, options, _part| Ok(Box::new(Writer::try_new(schema.clone(), &options.parquet)?)),
};

/// Row groups close once their encoded size reaches this. Each file being written holds one
/// open row group, so memory is about `--concurrency` times this.
pub const DEFAULT_ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Arrow C++ (pyarrow) writes Parquet with zstd level 1 unless told otherwise; so do we.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
pub const DEFAULT_GZIP_LEVEL: u32 = 6;

/// Column-chunk compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Snappy,
    Gzip(u32),
    Zstd(i32),
}

impl Codec {
    pub fn parse(name: &str, level: Option<i32>) -> Result<Self, ConfigError> {
        let bad_level = |range: &str| {
            ConfigError::invalid("--compression-level", format!("out of range for parquet {name} ({range})"))
        };
        Ok(match name {
            "none" | "uncompressed" => Codec::None,
            "snappy" => Codec::Snappy,
            "gzip" | "gz" => {
                let l = level.unwrap_or(DEFAULT_GZIP_LEVEL as i32);
                if !(0..=9).contains(&l) {
                    return Err(bad_level("0-9"));
                }
                Codec::Gzip(l as u32)
            }
            "zstd" | "zst" => {
                let l = level.unwrap_or(DEFAULT_ZSTD_LEVEL);
                if !(1..=22).contains(&l) {
                    return Err(bad_level("1-22"));
                }
                Codec::Zstd(l)
            }
            other => {
                return Err(ConfigError::invalid(
                    format!("--compression {other}"),
                    "unknown codec for parquet; use zstd, snappy, gzip or none",
                ));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Snappy => "snappy",
            Codec::Gzip(_) => "gzip",
            Codec::Zstd(_) => "zstd",
        }
    }

    fn to_parquet(self) -> Result<parquet::basic::Compression, EncodeError> {
        use parquet::basic::Compression as C;
        Ok(match self {
            Codec::None => C::UNCOMPRESSED,
            Codec::Snappy => C::SNAPPY,
            Codec::Gzip(l) => C::GZIP(GzipLevel::try_new(l)?),
            Codec::Zstd(l) => C::ZSTD(ZstdLevel::try_new(l)?),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetOptions {
    pub codec: Codec,
    pub row_group_bytes: usize,
}

impl Default for ParquetOptions {
    fn default() -> Self {
        ParquetOptions { codec: Codec::Zstd(DEFAULT_ZSTD_LEVEL), row_group_bytes: DEFAULT_ROW_GROUP_BYTES }
    }
}

pub struct Writer {
    inner: ArrowWriter<Vec<u8>>,
}

impl Writer {
    pub fn try_new(schema: SchemaRef, options: &ParquetOptions) -> Result<Self, EncodeError> {
        let parquet_schema = bigquery_schema(&schema)?;
        let mut props = WriterProperties::builder()
            .set_compression(options.codec.to_parquet()?)
            .set_max_row_group_bytes(Some(options.row_group_bytes.max(1)))
            .set_created_by(concat!("bq2sftp ", env!("CARGO_PKG_VERSION")).to_string());
        // Dictionaries pay off for text (codes, names, enums) and rarely for numbers, dates and
        // decimals, where arrow-rs hashes every value only to fall back to plain encoding once
        // the dictionary page fills. Measured on the synthetic table: text-only dictionaries
        // cut encoding CPU by 30% and the file by 10% against dictionaries everywhere.
        for column in parquet_schema.columns() {
            let is_text = column.physical_type() == parquet::basic::Type::BYTE_ARRAY;
            props = props.set_column_dictionary_enabled(column.path().clone(), is_text);
        }
        let options = ArrowWriterOptions::new().with_properties(props.build()).with_parquet_schema(parquet_schema);
        Ok(Writer { inner: ArrowWriter::try_new_with_options(Vec::new(), schema, options)? })
    }
}

/// arrow-rs's Parquet schema for `schema`, with TIME columns marked adjusted to UTC as
/// BigQuery's export marks them.
pub fn bigquery_schema(schema: &Schema) -> Result<SchemaDescriptor, ParquetError> {
    let converted = ArrowSchemaConverter::new().convert(schema)?;
    Ok(SchemaDescriptor::new(adjust_time(converted.root_schema_ptr())?))
}

fn adjust_time(t: TypePtr) -> Result<TypePtr, ParquetError> {
    match t.as_ref() {
        Type::GroupType { basic_info, fields } => {
            let fields = fields.iter().cloned().map(adjust_time).collect::<Result<Vec<_>, _>>()?;
            let mut b = Type::group_type_builder(basic_info.name())
                .with_fields(fields)
                .with_converted_type(basic_info.converted_type())
                .with_logical_type(basic_info.logical_type_ref().cloned());
            if basic_info.has_repetition() {
                b = b.with_repetition(basic_info.repetition());
            }
            if basic_info.has_id() {
                b = b.with_id(Some(basic_info.id()));
            }
            Ok(Arc::new(b.build()?))
        }
        Type::PrimitiveType { basic_info, physical_type, type_length, scale, precision } => {
            let Some(LogicalType::Time(time)) = basic_info.logical_type_ref() else { return Ok(t) };
            let converted = match time.unit {
                parquet::basic::TimeUnit::MILLIS => ConvertedType::TIME_MILLIS,
                parquet::basic::TimeUnit::MICROS => ConvertedType::TIME_MICROS,
                _ => ConvertedType::NONE,
            };
            let mut b = Type::primitive_type_builder(basic_info.name(), *physical_type)
                .with_repetition(basic_info.repetition())
                .with_logical_type(Some(LogicalType::time(true, time.unit)))
                .with_converted_type(converted)
                .with_length(*type_length)
                .with_scale(*scale)
                .with_precision(*precision);
            if basic_info.has_id() {
                b = b.with_id(Some(basic_info.id()));
            }
            Ok(Arc::new(b.build()?))
        }
    }
}

impl Encoder for Writer {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), EncodeError> {
        Ok(self.inner.write(batch)?)
    }

    fn finish(&mut self) -> Result<(), EncodeError> {
        self.inner.finish()?;
        Ok(())
    }

    fn drain_into(&mut self, out: &mut Vec<u8>) {
        // The writer tracks its own byte offsets, so taking the bytes it already wrote is safe.
        out.append(self.inner.inner_mut());
    }

    fn buffered_bytes(&self) -> usize {
        self.inner.in_progress_size()
    }
}
