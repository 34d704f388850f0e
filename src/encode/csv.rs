//! CSV exactly as BigQuery's CSV export writes it, so consumers of BigQuery exports take ours
//! unchanged.
//!
//! Layout rules:
//! - A header row of column names, on by default (extract jobs default `printHeader=true`:
//!   REST `JobConfigurationExtract`); `,` delimiter (`fieldDelimiter` default); `\n` line ends,
//!   including after the last row (java-bigquery `ITBigQueryTest.testExtractJob` splits the
//!   export on `\n`).
//! - RFC 4180 §2 quoting: a field is quoted only when it holds the delimiter, `"`, `\r` or
//!   `\n`, and a `"` inside is doubled. NULL is an empty, unquoted field; an empty string is
//!   written `""` so that it stays distinct from NULL (the export's spelling of an empty string
//!   is unconfirmed, see the reference notes). With a non-empty `--csv-null-marker`, a string
//!   equal to the marker is quoted for the same reason.
//! - Values render as [`super::text`] documents (BOOL `true`/`false`, FLOAT64 round-trip `%g`
//!   with `NaN`/`Infinity`/`-Infinity`, NUMERIC without padding zeros, DATE, TIME, DATETIME with
//!   `T`, TIMESTAMP with ` UTC`, BYTES base64). GEOGRAPHY (WKT) and JSON columns are text.
//! - ARRAY and STRUCT columns are refused, as BigQuery refuses them ("cannot export nested and
//!   repeated data in CSV", exporting-data docs), unless `--csv-nested json` asks for them as
//!   JSON text in BigQuery's JSON-export style ([`super::json`]).
//!
//! Rendering is row by row over columns prepared once per batch, so each cell costs one match
//! on a small enum and a few byte copies; nothing is allocated per value.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_buffer::{NullBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, SchemaRef, TimeUnit};

use super::json::{self, JsonColumn, WriteFn};
use super::{EncodeError, Encoder, Format, Part, text};

pub const FORMAT: Format = Format {
    name: "csv",
    extension: ".csv",
    splittable: true,
    internal_compression: false,
    build: |schema, options, part| {
        let builder = WriterBuilder::from_options(options.csv.clone());
        let builder = if part == Part::Body { builder.with_header(false) } else { builder };
        Ok(Box::new(builder.build(schema.clone())?))
    },
};

pub const DEFAULT_DELIMITER: u8 = b',';

/// What to do with ARRAY/STRUCT columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NestedMode {
    /// Refuse, as BigQuery's CSV export does.
    #[default]
    Error,
    /// Write them as JSON text (quoted as any field).
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    pub delimiter: u8,
    pub header: bool,
    pub null: String,
    pub quote_all: bool,
    pub nested: NestedMode,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: DEFAULT_DELIMITER,
            header: true,
            null: String::new(),
            quote_all: false,
            nested: NestedMode::Error,
        }
    }
}

/// Builds a CSV [`Writer`], in the style of `arrow_csv::WriterBuilder`.
#[derive(Debug, Clone, Default)]
pub struct WriterBuilder {
    options: CsvOptions,
}

impl WriterBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn from_options(options: CsvOptions) -> Self {
        WriterBuilder { options }
    }
    pub fn with_delimiter(mut self, delimiter: u8) -> Self {
        self.options.delimiter = delimiter;
        self
    }
    pub fn with_header(mut self, header: bool) -> Self {
        self.options.header = header;
        self
    }
    pub fn with_null(mut self, null: impl Into<String>) -> Self {
        self.options.null = null.into();
        self
    }
    pub fn with_quote_all(mut self, quote_all: bool) -> Self {
        self.options.quote_all = quote_all;
        self
    }
    pub fn with_nested(mut self, nested: NestedMode) -> Self {
        self.options.nested = nested;
        self
    }

    /// Checks the schema against the options (nested columns) and returns the writer.
    pub fn build(self, schema: SchemaRef) -> Result<Writer, EncodeError> {
        for field in schema.fields() {
            check_field(field, self.options.nested)?;
        }
        Ok(Writer { header_pending: self.options.header, options: self.options, schema, out: Vec::new(), row_hint: 64 })
    }
}

fn check_field(field: &Field, nested: NestedMode) -> Result<(), EncodeError> {
    let is_nested = matches!(
        field.data_type(),
        DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::Struct(_)
            | DataType::Map(..)
    );
    if is_nested && nested == NestedMode::Error {
        return Err(EncodeError::NestedColumn { column: field.name().clone(), data_type: field.data_type().clone() });
    }
    Ok(())
}

pub struct Writer {
    options: CsvOptions,
    schema: SchemaRef,
    header_pending: bool,
    out: Vec<u8>,
    /// Bytes per row seen so far, to size the output buffer once per batch.
    row_hint: usize,
}

impl Writer {
    fn write_header(&mut self) {
        let d = self.options.delimiter;
        for (i, field) in self.schema.fields().iter().enumerate() {
            if i > 0 {
                self.out.push(d);
            }
            write_text_field(&mut self.out, field.name().as_bytes(), &self.options);
        }
        self.out.push(b'\n');
    }

    /// The encoded bytes so far (what [`Encoder::drain_into`] would hand out).
    pub fn buffer(&self) -> &[u8] {
        &self.out
    }
}

impl Encoder for Writer {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), EncodeError> {
        if std::mem::take(&mut self.header_pending) {
            self.write_header();
        }
        let columns = batch
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(array, field)| Column::new(field, array, &self.options))
            .collect::<Result<Vec<_>, _>>()?;
        let start = self.out.len();
        self.out.reserve(batch.num_rows() * self.row_hint);
        let d = self.options.delimiter;
        let null = self.options.null.as_bytes();
        for row in 0..batch.num_rows() {
            for (i, col) in columns.iter().enumerate() {
                if i > 0 {
                    self.out.push(d);
                }
                if col.nulls.as_ref().is_some_and(|n| n.is_null(row)) {
                    self.out.extend_from_slice(null);
                } else {
                    col.write(row, &mut self.out, &self.options);
                }
            }
            self.out.push(b'\n');
        }
        if batch.num_rows() > 0 {
            self.row_hint = (self.out.len() - start) / batch.num_rows() + 1;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), EncodeError> {
        // An empty table still gets its header, as BigQuery writes one header-only file.
        if std::mem::take(&mut self.header_pending) {
            self.write_header();
        }
        Ok(())
    }

    fn drain_into(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.out);
        } else {
            out.append(&mut self.out);
        }
    }
}

/// One column prepared for a batch: its type dispatched once, its nulls at hand.
struct Column {
    nulls: Option<NullBuffer>,
    kind: Kind,
    /// The rendered text may need quotes (it may hold the delimiter, read back as NULL, or
    /// everything is quoted): check each value.
    check_quotes: bool,
}

enum Kind {
    Bool(arrow_array::BooleanArray),
    Int64(ScalarBuffer<i64>),
    Float64(ScalarBuffer<f64>),
    Utf8(arrow_array::StringArray),
    Binary(arrow_array::BinaryArray),
    Date32(ScalarBuffer<i32>),
    Time64Micros(ScalarBuffer<i64>),
    /// Microsecond DATETIME (`with_tz == false`) or TIMESTAMP.
    TimestampMicros {
        values: ScalarBuffer<i64>,
        with_tz: bool,
    },
    Decimal128 {
        values: ScalarBuffer<i128>,
        scale: i8,
    },
    Decimal256 {
        values: ScalarBuffer<arrow_buffer::i256>,
        scale: i8,
    },
    /// Other layouts and types: a prepared writer of the value's text.
    Text(WriteFn),
    /// Nested columns as JSON.
    Json(JsonColumn),
}

/// Can `text` produced for this type contain `delimiter`? Numbers, dates and base64 use
/// `[0-9A-Za-z+-./:= ]`; with an ordinary delimiter no per-value scan is needed.
fn delimiter_may_appear(delimiter: u8) -> bool {
    delimiter.is_ascii_alphanumeric() || b"+-./:= ".contains(&delimiter)
}

impl Column {
    fn new(field: &Field, array: &ArrayRef, options: &CsvOptions) -> Result<Self, EncodeError> {
        check_field(field, options.nested)?;
        let nulls = array.logical_nulls();
        let scalar_check = options.quote_all || delimiter_may_appear(options.delimiter);
        let (kind, check_quotes) = match array.data_type() {
            DataType::Boolean => (Kind::Bool(array.as_boolean().clone()), scalar_check),
            DataType::Int64 => (Kind::Int64(array.as_primitive::<Int64Type>().values().clone()), scalar_check),
            DataType::Float64 => (Kind::Float64(array.as_primitive::<Float64Type>().values().clone()), scalar_check),
            DataType::Utf8 => (Kind::Utf8(array.as_string::<i32>().clone()), false),
            // Empty BYTES render as empty text, which must not read back as NULL.
            DataType::Binary => (Kind::Binary(array.as_binary::<i32>().clone()), true),
            DataType::Date32 => (Kind::Date32(array.as_primitive::<Date32Type>().values().clone()), scalar_check),
            DataType::Time64(TimeUnit::Microsecond) => {
                (Kind::Time64Micros(array.as_primitive::<Time64MicrosecondType>().values().clone()), scalar_check)
            }
            DataType::Timestamp(TimeUnit::Microsecond, tz) => (
                Kind::TimestampMicros {
                    values: array.as_primitive::<TimestampMicrosecondType>().values().clone(),
                    with_tz: tz.is_some(),
                },
                scalar_check,
            ),
            DataType::Decimal128(_, scale) => (
                Kind::Decimal128 { values: array.as_primitive::<Decimal128Type>().values().clone(), scale: *scale },
                scalar_check,
            ),
            DataType::Decimal256(_, scale) => (
                Kind::Decimal256 { values: array.as_primitive::<Decimal256Type>().values().clone(), scale: *scale },
                scalar_check,
            ),
            DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::Struct(_)
            | DataType::Map(..) => (Kind::Json(JsonColumn::new("csv", field, array)?), true),
            _ => (Kind::Text(text_writer(field, array)?), true),
        };
        Ok(Column { nulls, kind, check_quotes })
    }

    #[inline]
    fn write(&self, row: usize, out: &mut Vec<u8>, options: &CsvOptions) {
        let start = out.len();
        match &self.kind {
            Kind::Utf8(a) => return write_text_field(out, a.value(row).as_bytes(), options),
            Kind::Bool(a) => out.extend_from_slice(if a.value(row) { b"true" } else { b"false" }),
            Kind::Int64(v) => out.extend_from_slice(itoa::Buffer::new().format(v[row]).as_bytes()),
            Kind::Float64(v) => write_float(out, v[row]),
            Kind::Binary(a) => text::write_base64(out, a.value(row)),
            Kind::Date32(v) => text::write_date(out, v[row] as i64),
            Kind::Time64Micros(v) => {
                let t = v[row];
                text::write_time_of_day(out, (t / 1_000_000) as u32, (t % 1_000_000) as u32, 6)
            }
            Kind::TimestampMicros { values, with_tz: true } => text::write_timestamp(out, values[row], 1_000_000, 6),
            Kind::TimestampMicros { values, with_tz: false } => {
                text::write_date_time(out, values[row], 1_000_000, 6, b'T')
            }
            Kind::Decimal128 { values, scale } => text::write_decimal128(out, values[row], *scale),
            Kind::Decimal256 { values, scale } => text::write_decimal256(out, values[row], *scale),
            Kind::Text(f) => f(row, out),
            Kind::Json(j) => j.write(row, out),
        }
        if self.check_quotes {
            let rendered = &out[start..];
            if options.quote_all || rendered == options.null.as_bytes() || needs_quotes(rendered, options.delimiter) {
                requote(out, start);
            }
        }
    }
}

/// Text for the types BigQuery never sends but Parquet sources may hold.
fn text_writer(field: &Field, array: &ArrayRef) -> Result<WriteFn, EncodeError> {
    macro_rules! prim {
        ($t:ty, |$v:ident, $out:ident| $body:expr) => {{
            let a = array.as_primitive::<$t>().clone();
            Box::new(move |i: usize, $out: &mut Vec<u8>| {
                let $v = a.value(i);
                $body
            }) as WriteFn
        }};
    }
    let int = |out: &mut Vec<u8>, v: i128| out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    Ok(match array.data_type() {
        DataType::Null => Box::new(|_, _| {}),
        DataType::Int8 => prim!(Int8Type, |v, out| int(out, v as i128)),
        DataType::Int16 => prim!(Int16Type, |v, out| int(out, v as i128)),
        DataType::Int32 => prim!(Int32Type, |v, out| int(out, v as i128)),
        DataType::UInt8 => prim!(UInt8Type, |v, out| int(out, v as i128)),
        DataType::UInt16 => prim!(UInt16Type, |v, out| int(out, v as i128)),
        DataType::UInt32 => prim!(UInt32Type, |v, out| int(out, v as i128)),
        DataType::UInt64 => prim!(UInt64Type, |v, out| int(out, v as i128)),
        DataType::Float32 => prim!(Float32Type, |v, out| write_float(out, v as f64)),
        DataType::Date64 => prim!(Date64Type, |v, out| text::write_date(out, v.div_euclid(86_400_000))),
        DataType::Time32(TimeUnit::Second) => {
            prim!(Time32SecondType, |v, out| text::write_time_of_day(out, v as u32, 0, 0))
        }
        DataType::Time32(_) => {
            prim!(Time32MillisecondType, |v, out| text::write_time_of_day(out, (v / 1000) as u32, (v % 1000) as u32, 3))
        }
        DataType::Time64(_) => prim!(Time64NanosecondType, |v, out| text::write_time_of_day(
            out,
            (v / 1_000_000_000) as u32,
            (v % 1_000_000_000) as u32,
            9
        )),
        DataType::Timestamp(unit, tz) => {
            let (per_sec, digits) = match unit {
                TimeUnit::Second => (1, 0),
                TimeUnit::Millisecond => (1_000, 3),
                TimeUnit::Microsecond => (1_000_000, 6),
                TimeUnit::Nanosecond => (1_000_000_000, 9),
            };
            let values = json::timestamp_values(array);
            if tz.is_some() {
                Box::new(move |i, out| text::write_timestamp(out, values[i], per_sec, digits))
            } else {
                Box::new(move |i, out| text::write_date_time(out, values[i], per_sec, digits, b'T'))
            }
        }
        DataType::LargeUtf8 | DataType::Utf8View => json::string_writer(array, |s, out| out.extend_from_slice(s)),
        DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            json::binary_writer(array, |b, out| text::write_base64(out, b))
        }
        other => {
            return Err(EncodeError::UnsupportedType {
                format: "csv",
                column: field.name().clone(),
                data_type: other.clone(),
            });
        }
    })
}

#[inline]
fn write_float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        text::write_f64(out, v)
    } else if v.is_nan() {
        out.extend_from_slice(b"NaN")
    } else if v > 0.0 {
        out.extend_from_slice(b"Infinity")
    } else {
        out.extend_from_slice(b"-Infinity")
    }
}

#[inline]
fn needs_quotes(field: &[u8], delimiter: u8) -> bool {
    field.iter().any(|&b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r')
}

/// Writes a text value, quoting when RFC 4180 needs it or it would read back as NULL.
#[inline]
fn write_text_field(out: &mut Vec<u8>, value: &[u8], options: &CsvOptions) {
    let reads_as_null = value == options.null.as_bytes();
    if options.quote_all || reads_as_null || needs_quotes(value, options.delimiter) {
        write_quoted(out, value);
    } else {
        out.extend_from_slice(value);
    }
}

fn write_quoted(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    for part in value.split_inclusive(|&b| b == b'"') {
        out.extend_from_slice(part);
        if part.last() == Some(&b'"') {
            out.push(b'"');
        }
    }
    out.push(b'"');
}

/// Quotes the field already written at `out[start..]`.
fn requote(out: &mut Vec<u8>, start: usize) {
    let field = out.split_off(start);
    write_quoted(out, &field);
}

/// Renders a whole batch to a string (tests and small tools).
pub fn to_string(batch: &RecordBatch, builder: WriterBuilder) -> Result<String, EncodeError> {
    let mut w = builder.build(batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    let mut out = Vec::new();
    w.drain_into(&mut out);
    Ok(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("csv::Writer").field("options", &self.options).finish_non_exhaustive()
    }
}
