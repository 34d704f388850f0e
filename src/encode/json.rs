//! JSON rendering of Arrow values in BigQuery's JSON-export style, for NDJSON rows and for
//! nested columns in CSV (`--csv-nested json`).
//!
//! Rules (evidence in `../shared/reference/bigquery-export-text.md`):
//! - INT64 is a JSON **string** (`"123"`): "INT64 … encoded as JSON strings" (BigQuery
//!   exporting-data docs), so 64-bit values survive JavaScript-style parsers.
//! - FLOAT64 is a JSON number in the same text as CSV ([`super::text::write_f64`]); NaN and
//!   ±Infinity, which JSON numbers cannot express, are the strings `"NaN"`, `"Infinity"`,
//!   `"-Infinity"`.
//! - NUMERIC/BIGNUMERIC are strings (`"1.5"`): apache/beam `BigQueryAvroUtils`, which says it
//!   matches the JSON export, converts them with `BigDecimal.toString()` into strings; a JSON
//!   number would lose digits in most parsers.
//! - DATE, TIME, DATETIME, TIMESTAMP, BYTES are strings with the CSV text.
//! - A JSON-typed column (`google:sqlType:json`) is embedded as JSON when its text is valid JSON.
//! - STRUCT is an object in schema order, ARRAY a JSON array; NULL fields are left out (the export
//!   omits NULLs: googleapis/nodejs-bigquery#1134, beam `bigquery_read_internal.py`).
//! - Strings escape `<`, `>`, `&` as `\u003c`, `\u003e`, `\u0026`, as the export does
//!   (exporting-data docs), besides JSON's mandatory escapes (RFC 8259 §7).

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, TimeUnit};

use super::{EncodeError, sql_type, text};

pub type WriteFn = Box<dyn Fn(usize, &mut Vec<u8>) + Send + Sync>;

/// Writes one column's values as JSON, dispatching on the type once, not per value.
pub struct JsonColumn {
    nulls: Option<NullBuffer>,
    write: WriteFn,
}

impl JsonColumn {
    pub fn new(format: &'static str, field: &Field, array: &ArrayRef) -> Result<Self, EncodeError> {
        Ok(JsonColumn { nulls: array.logical_nulls(), write: value_writer(format, field, array)? })
    }

    #[inline]
    pub fn is_null(&self, row: usize) -> bool {
        self.nulls.as_ref().is_some_and(|n| n.is_null(row))
    }

    /// Writes the value at `row` (the caller checks [`Self::is_null`] where NULL is omitted).
    #[inline]
    pub fn write(&self, row: usize, out: &mut Vec<u8>) {
        if self.is_null(row) {
            out.extend_from_slice(b"null");
        } else {
            (self.write)(row, out);
        }
    }
}

/// A JSON string literal with BigQuery's escapes.
pub fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            b'<' => b"\\u003c",
            b'>' => b"\\u003e",
            b'&' => b"\\u0026",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 15) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

fn quoted(out: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) {
    out.push(b'"');
    f(out);
    out.push(b'"');
}

fn write_float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        text::write_f64(out, v);
    } else if v.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if v > 0.0 {
        out.extend_from_slice(b"\"Infinity\"");
    } else {
        out.extend_from_slice(b"\"-Infinity\"");
    }
}

fn units(unit: &TimeUnit) -> (i64, usize) {
    match unit {
        TimeUnit::Second => (1, 0),
        TimeUnit::Millisecond => (1_000, 3),
        TimeUnit::Microsecond => (1_000_000, 6),
        TimeUnit::Nanosecond => (1_000_000_000, 9),
    }
}

macro_rules! prim {
    ($array:expr, $t:ty, |$v:ident, $out:ident| $body:expr) => {{
        let a = $array.as_primitive::<$t>().clone();
        Box::new(move |i: usize, $out: &mut Vec<u8>| {
            let $v = a.value(i);
            $body
        })
    }};
}

fn value_writer(format: &'static str, field: &Field, array: &ArrayRef) -> Result<WriteFn, EncodeError> {
    let int =
        |out: &mut Vec<u8>, v: i128| quoted(out, |o| o.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()));
    Ok(match array.data_type() {
        DataType::Null => Box::new(|_, out| out.extend_from_slice(b"null")),
        DataType::Boolean => {
            let a = array.as_boolean().clone();
            Box::new(move |i, out| out.extend_from_slice(if a.value(i) { b"true" } else { b"false" }))
        }
        DataType::Int8 => prim!(array, Int8Type, |v, out| int(out, v as i128)),
        DataType::Int16 => prim!(array, Int16Type, |v, out| int(out, v as i128)),
        DataType::Int32 => prim!(array, Int32Type, |v, out| int(out, v as i128)),
        DataType::Int64 => prim!(array, Int64Type, |v, out| int(out, v as i128)),
        DataType::UInt8 => prim!(array, UInt8Type, |v, out| int(out, v as i128)),
        DataType::UInt16 => prim!(array, UInt16Type, |v, out| int(out, v as i128)),
        DataType::UInt32 => prim!(array, UInt32Type, |v, out| int(out, v as i128)),
        DataType::UInt64 => prim!(array, UInt64Type, |v, out| int(out, v as i128)),
        DataType::Float32 => prim!(array, Float32Type, |v, out| write_float(out, v as f64)),
        DataType::Float64 => prim!(array, Float64Type, |v, out| write_float(out, v)),
        DataType::Decimal128(_, scale) => {
            let scale = *scale;
            prim!(array, Decimal128Type, |v, out| quoted(out, |o| text::write_decimal128(o, v, scale)))
        }
        DataType::Decimal256(_, scale) => {
            let scale = *scale;
            prim!(array, Decimal256Type, |v, out| quoted(out, |o| text::write_decimal256(o, v, scale)))
        }
        DataType::Date32 => prim!(array, Date32Type, |v, out| quoted(out, |o| text::write_date(o, v as i64))),
        DataType::Date64 => {
            prim!(array, Date64Type, |v, out| quoted(out, |o| text::write_date(o, v.div_euclid(86_400_000))))
        }
        DataType::Time32(TimeUnit::Second) => {
            prim!(array, Time32SecondType, |v, out| quoted(out, |o| text::write_time_of_day(o, v as u32, 0, 0)))
        }
        DataType::Time32(_) => prim!(array, Time32MillisecondType, |v, out| quoted(out, |o| text::write_time_of_day(
            o,
            (v / 1000) as u32,
            (v % 1000) as u32,
            3
        ))),
        DataType::Time64(TimeUnit::Nanosecond) => {
            prim!(array, Time64NanosecondType, |v, out| quoted(out, |o| text::write_time_of_day(
                o,
                (v / 1_000_000_000) as u32,
                (v % 1_000_000_000) as u32,
                9
            )))
        }
        DataType::Time64(_) => prim!(array, Time64MicrosecondType, |v, out| quoted(out, |o| text::write_time_of_day(
            o,
            (v / 1_000_000) as u32,
            (v % 1_000_000) as u32,
            6
        ))),
        DataType::Timestamp(unit, tz) => {
            let (per_sec, digits) = units(unit);
            let values = timestamp_values(array);
            if tz.is_some() {
                Box::new(move |i, out| quoted(out, |o| text::write_timestamp(o, values[i], per_sec, digits)))
            } else {
                Box::new(move |i, out| quoted(out, |o| text::write_date_time(o, values[i], per_sec, digits, b'T')))
            }
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            if sql_type(field) == Some("json") {
                string_writer(array, |s, out| {
                    if is_valid_json(s) {
                        out.extend_from_slice(s.trim_ascii());
                    } else {
                        write_str(out, s);
                    }
                })
            } else {
                string_writer(array, |s, out| write_str(out, s))
            }
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            binary_writer(array, |b, out| quoted(out, |o| text::write_base64(o, b)))
        }
        DataType::List(child) | DataType::LargeList(child) | DataType::FixedSizeList(child, _) => {
            let (offsets, values) = list_parts(array);
            let inner = JsonColumn::new(format, child, &values)?;
            Box::new(move |i, out| {
                out.push(b'[');
                let (start, end) = offsets(i);
                for j in start..end {
                    if j > start {
                        out.push(b',');
                    }
                    inner.write(j, out);
                }
                out.push(b']');
            })
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let children = fields
                .iter()
                .zip(s.columns())
                .map(|(f, c)| {
                    let mut key = Vec::new();
                    write_str(&mut key, f.name().as_bytes());
                    key.push(b':');
                    Ok((key, JsonColumn::new(format, f, c)?))
                })
                .collect::<Result<Vec<_>, EncodeError>>()?;
            Box::new(move |i, out| write_object(out, &children, i))
        }
        other => {
            return Err(EncodeError::UnsupportedType {
                format,
                column: field.name().clone(),
                data_type: other.clone(),
            });
        }
    })
}

/// `{"k":v,…}` leaving NULL values out. `fields` pairs each pre-rendered `"key":` with its column.
pub fn write_object(out: &mut Vec<u8>, fields: &[(Vec<u8>, JsonColumn)], row: usize) {
    out.push(b'{');
    let mut first = true;
    for (key, col) in fields {
        if col.is_null(row) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(key);
        col.write(row, out);
    }
    out.push(b'}');
}

fn is_valid_json(s: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(s).is_ok()
}

/// Timestamp values as i64 whatever the unit (all four units share the representation).
pub fn timestamp_values(array: &ArrayRef) -> arrow_buffer::ScalarBuffer<i64> {
    match array.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => array.as_primitive::<TimestampSecondType>().values().clone(),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            array.as_primitive::<TimestampMillisecondType>().values().clone()
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            array.as_primitive::<TimestampNanosecondType>().values().clone()
        }
        _ => array.as_primitive::<TimestampMicrosecondType>().values().clone(),
    }
}

/// A writer over the bytes of any string array layout: `f(value, out)` per row.
pub fn string_writer<F>(array: &ArrayRef, f: F) -> WriteFn
where
    F: Fn(&[u8], &mut Vec<u8>) + Send + Sync + 'static,
{
    match array.data_type() {
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>().clone();
            Box::new(move |i, out| f(a.value(i).as_bytes(), out))
        }
        DataType::Utf8View => {
            let a = array.as_string_view().clone();
            Box::new(move |i, out| f(a.value(i).as_bytes(), out))
        }
        _ => {
            let a = array.as_string::<i32>().clone();
            Box::new(move |i, out| f(a.value(i).as_bytes(), out))
        }
    }
}

/// A writer over the bytes of any binary array layout: `f(value, out)` per row.
pub fn binary_writer<F>(array: &ArrayRef, f: F) -> WriteFn
where
    F: Fn(&[u8], &mut Vec<u8>) + Send + Sync + 'static,
{
    match array.data_type() {
        DataType::LargeBinary => {
            let a = array.as_binary::<i64>().clone();
            Box::new(move |i, out| f(a.value(i), out))
        }
        DataType::BinaryView => {
            let a = array.as_binary_view().clone();
            Box::new(move |i, out| f(a.value(i), out))
        }
        DataType::FixedSizeBinary(_) => {
            let a = array.as_fixed_size_binary().clone();
            Box::new(move |i, out| f(a.value(i), out))
        }
        _ => {
            let a = array.as_binary::<i32>().clone();
            Box::new(move |i, out| f(a.value(i), out))
        }
    }
}

type OffsetsFn = Box<dyn Fn(usize) -> (usize, usize) + Send + Sync>;

fn list_parts(array: &ArrayRef) -> (OffsetsFn, ArrayRef) {
    match array.data_type() {
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            let o = l.offsets().clone();
            (Box::new(move |i| (o[i] as usize, o[i + 1] as usize)), l.values().clone())
        }
        DataType::FixedSizeList(_, n) => {
            let l = array.as_fixed_size_list().clone();
            let n = *n as usize;
            let values = l.values().clone();
            (Box::new(move |i| (l.value_offset_at(i), l.value_offset_at(i) + n)), values)
        }
        _ => {
            let l = array.as_list::<i32>();
            let o = l.offsets().clone();
            (Box::new(move |i| (o[i] as usize, o[i + 1] as usize)), l.values().clone())
        }
    }
}
