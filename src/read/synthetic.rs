//! `synthetic://`: a deterministic table with every Arrow type the BigQuery Storage Read API
//! emits, for demos, tests and benchmarks.
//!
//! Every value is a pure function of `(seed, row, column)`, so any row range can be produced
//! independently: streams are disjoint row ranges, and re-reading a stream from an offset yields
//! exactly the rows a first read would have. Edge values (INT64 min/max, NaN, ±inf, -0.0, dates
//! 0001-01-01 and 9999-12-31, NUMERIC and BIGNUMERIC extremes) and awkward strings (quotes,
//! commas, newlines, unicode) recur on fixed row cycles, so every batch holds some of them.
//!
//! Types and field metadata follow the Storage Read API's Arrow mapping ("Arrow schema details"
//! in docs.cloud.google.com/bigquery/docs/reference/storage; see
//! `../shared/reference/bigquery-storage-read-facts.md` §2): DATETIME is `Timestamp(µs)` tagged
//! `google:sqlType:datetime`, GEOGRAPHY and JSON are `Utf8` tagged with their sqlType.
//! Arrays are built straight from buffers (no per-value builders) so generation stays far
//! faster than any encoder downstream.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::types::Int64Type;
use arrow_array::{
    ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Decimal256Array, Float64Array, Int64Array,
    ListArray, RecordBatch, StringArray, StructArray, Time64MicrosecondArray, TimestampMicrosecondArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer, ScalarBuffer, i256};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use super::{BatchStream, ReadError, ReadPlan, Source, SourceDescription, StreamSpec};
use crate::error::ConfigError;

/// Rows per generated batch unless `batch_rows=` says otherwise.
pub const DEFAULT_BATCH_ROWS: usize = 8192;
pub const DEFAULT_SEED: u64 = 42;

/// The Arrow field-metadata key BigQuery uses to tag DATETIME, GEOGRAPHY and JSON columns.
pub const EXTENSION_NAME: &str = "ARROW:extension:name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticOptions {
    pub rows: u64,
    pub streams: usize,
    pub seed: u64,
    /// Leave out the nested (ARRAY, STRUCT) columns, e.g. for CSV.
    pub flat: bool,
    pub batch_rows: usize,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        SyntheticOptions { rows: 1000, streams: 1, seed: DEFAULT_SEED, flat: false, batch_rows: DEFAULT_BATCH_ROWS }
    }
}

impl SyntheticOptions {
    /// Parses what follows `synthetic://`: `?rows=N&streams=K&seed=S&flat=true&batch_rows=B`.
    pub fn from_url(rest: &str) -> Result<Self, ConfigError> {
        let query = rest.strip_prefix('?').unwrap_or(rest);
        let mut o = SyntheticOptions::default();
        let what = |k: &str| format!("--from synthetic://?{k}=");
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let bad = |expected: &str| ConfigError::invalid(what(&key), format!("'{value}' is not {expected}"));
            match key.as_ref() {
                "rows" => o.rows = parse_count(&value).ok_or_else(|| bad("a row count"))?,
                "streams" => o.streams = value.parse().map_err(|_| bad("a stream count"))?,
                "seed" => o.seed = value.parse().map_err(|_| bad("an integer seed"))?,
                "flat" => o.flat = value.parse().map_err(|_| bad("true or false"))?,
                "batch_rows" => o.batch_rows = value.parse().map_err(|_| bad("a row count"))?,
                other => {
                    return Err(ConfigError::invalid(
                        "--from synthetic://",
                        format!("unknown option '{other}'; known: rows, streams, seed, flat, batch_rows"),
                    ));
                }
            }
        }
        if o.streams == 0 || o.streams > 10_000 {
            return Err(ConfigError::invalid(what("streams"), "must be between 1 and 10000"));
        }
        if o.batch_rows == 0 {
            return Err(ConfigError::invalid(what("batch_rows"), "must be at least 1"));
        }
        Ok(o)
    }
}

/// Accepts `1000000`, `1_000_000`, `1e6`, `10M`, `2k`.
fn parse_count(s: &str) -> Option<u64> {
    let s = s.replace('_', "");
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    let (digits, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1_000),
        'm' | 'M' => (&s[..s.len() - 1], 1_000_000),
        'g' | 'G' | 'b' | 'B' => (&s[..s.len() - 1], 1_000_000_000),
        _ => {
            let f: f64 = s.parse().ok()?;
            return (f >= 0.0 && f.fract() == 0.0 && f < 1e19).then_some(f as u64);
        }
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

pub struct SyntheticSource {
    options: SyntheticOptions,
    schema: SchemaRef,
}

impl SyntheticSource {
    pub fn new(options: SyntheticOptions) -> Self {
        let schema = schema(options.flat);
        SyntheticSource { options, schema }
    }

    fn stream_range(&self, index: usize) -> (u64, u64) {
        let (rows, n) = (self.options.rows as u128, self.options.streams as u128);
        let at = |k: u128| (rows * k / n) as u64;
        (at(index as u128), at(index as u128 + 1))
    }

    /// Generates rows `start..start+len` as one batch.
    pub fn batch(&self, start: u64, len: usize) -> RecordBatch {
        generate(&self.schema, self.options.seed, start, len, self.options.flat)
    }
}

#[async_trait::async_trait]
impl Source for SyntheticSource {
    async fn plan(&self) -> Result<ReadPlan, ReadError> {
        let o = &self.options;
        // Like a BigQuery session over an empty table: no streams at all.
        let streams = if o.rows == 0 { 0 } else { o.streams };
        let streams = (0..streams)
            .map(|index| {
                let (start, end) = self.stream_range(index);
                StreamSpec { index, name: format!("rows {start}..{end}"), rows: Some(end - start) }
            })
            .collect();
        Ok(ReadPlan {
            schema: self.schema.clone(),
            streams,
            estimated_rows: Some(o.rows),
            description: SourceDescription {
                kind: "synthetic".into(),
                name: format!("synthetic rows={} streams={} seed={} flat={}", o.rows, o.streams, o.seed, o.flat),
                snapshot_time: None,
                expires_at: None,
            },
        })
    }

    fn read(self: Arc<Self>, _plan: &ReadPlan, stream: &StreamSpec, offset: u64) -> BatchStream {
        let (start, end) = self.stream_range(stream.index);
        let batch_rows = self.options.batch_rows as u64;
        super::blocking_stream(2, move |tx| {
            let mut at = start.saturating_add(offset);
            while at < end {
                let len = batch_rows.min(end - at) as usize;
                if tx.blocking_send(Ok(self.batch(at, len))).is_err() {
                    return; // the reader went away: stop generating
                }
                at += len as u64;
            }
        })
    }
}

fn tagged(field: Field, sql_type: &str) -> Field {
    let mut md = HashMap::from([(EXTENSION_NAME.to_string(), format!("google:sqlType:{sql_type}"))]);
    if sql_type == "geography" {
        md.insert("ARROW:extension:metadata".to_string(), r#"{"encoding": "WKT"}"#.to_string());
    }
    field.with_metadata(md)
}

/// The synthetic table's schema: one column per BigQuery type, plus ARRAY and STRUCT unless flat.
pub fn schema(flat: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new("id", DataType::Int64, false),
        Field::new("int64_col", DataType::Int64, true),
        Field::new("float64_col", DataType::Float64, true),
        Field::new("bool_col", DataType::Boolean, true),
        Field::new("string_col", DataType::Utf8, true),
        Field::new("bytes_col", DataType::Binary, true),
        Field::new("date_col", DataType::Date32, true),
        Field::new("time_col", DataType::Time64(TimeUnit::Microsecond), true),
        tagged(Field::new("datetime_col", DataType::Timestamp(TimeUnit::Microsecond, None), true), "datetime"),
        Field::new("timestamp_col", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new("numeric_col", DataType::Decimal128(38, 9), true),
        Field::new("bignumeric_col", DataType::Decimal256(76, 38), true),
        tagged(Field::new("geography_col", DataType::Utf8, true), "geography"),
        tagged(Field::new("json_col", DataType::Utf8, true), "json"),
    ];
    if !flat {
        fields.push(Field::new(
            "int64_list",
            DataType::List(Arc::new(Field::new("item", DataType::Int64, false))),
            false,
        ));
        fields.push(Field::new("record", DataType::Struct(record_fields()), true));
    }
    Arc::new(Schema::new(fields))
}

fn record_fields() -> Fields {
    Fields::from(vec![
        Field::new("a", DataType::Int64, true),
        Field::new("b", DataType::Utf8, true),
        Field::new("c", DataType::Date32, true),
    ])
}

/// Awkward strings on purpose: delimiters, quotes, newlines, unicode, HTML-ish text, a literal "NULL".
pub const STRINGS: &[&str] = &[
    "alpha",
    "Grüße, Jürgen",
    "日本語のテキスト",
    "emoji 🚀✨",
    "say \"hi\"",
    "a,b,c",
    "line1\nline2",
    "tab\tseparated",
    "crlf\r\nend",
    "",
    "  padded  ",
    "<b>profit&loss</b>",
    "back\\slash",
    "NULL",
    "O'Brien",
    "ünïcödé ñ",
];

const WKT: &[&str] = &[
    "POINT(-122.0838511 37.3860517)",
    "POINT(30 10)",
    "LINESTRING(30 10, 10 30, 40 40)",
    "POLYGON((30 10, 40 40, 20 40, 10 20, 30 10))",
];

const JSON: &[&str] = &[
    r#"{"a":1,"b":"text"}"#,
    r#"[1,2,3]"#,
    r#"{"nested":{"k":"v, with comma","q":"\"quoted\""},"n":null}"#,
    r#""just a string""#,
    r#"12.5"#,
    r#"{"html":"<tag>&"}"#,
];

/// 0001-01-01 and 9999-12-31 as days since the epoch: BigQuery's DATE range.
pub const DATE_MIN: i32 = -719_162;
pub const DATE_MAX: i32 = 2_932_896;
/// 0001-01-01 00:00:00 and 9999-12-31 23:59:59.999999 as µs since the epoch.
pub const MICROS_MIN: i64 = -62_135_596_800_000_000;
pub const MICROS_MAX: i64 = 253_402_300_799_999_999;
/// NUMERIC's largest value, 99999999999999999999999999999.999999999, unscaled.
pub const NUMERIC_MAX: i128 = 99_999_999_999_999_999_999_999_999_999_999_999_999;

#[inline]
fn mix(seed: u64, row: u64, column: u64) -> u64 {
    // splitmix64 over (seed, row, column): cheap, well distributed, and stateless, so any row
    // can be produced without generating the ones before it.
    let mut z = seed
        .wrapping_add(row.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(column.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Gen {
    seed: u64,
    start: u64,
    len: usize,
}

impl Gen {
    fn rows(&self) -> impl Iterator<Item = u64> + use<> {
        self.start..self.start + self.len as u64
    }

    /// Values and validity of one column from one hash per cell. About one value in sixteen
    /// is NULL (the hash's top four bits are zero); the pattern differs per column.
    fn column<T>(&self, column: u64, nullable: bool, f: impl Fn(u64, u64) -> T) -> (ScalarBuffer<T>, Option<NullBuffer>)
    where
        T: arrow_buffer::ArrowNativeType,
    {
        let mut values = Vec::with_capacity(self.len);
        let mut valid = Vec::with_capacity(if nullable { self.len } else { 0 });
        for r in self.rows() {
            let h = mix(self.seed, r, column);
            values.push(f(r, h));
            if nullable {
                valid.push(h >> 60 != 0);
            }
        }
        (ScalarBuffer::from(values), nullable.then(|| NullBuffer::from(valid)))
    }

    fn strings(&self, column: u64, nullable: bool, f: impl Fn(u64, u64, &mut String)) -> StringArray {
        let mut offsets = Vec::with_capacity(self.len + 1);
        let mut data = String::with_capacity(self.len * 16);
        let mut valid = Vec::with_capacity(self.len);
        offsets.push(0i32);
        for r in self.rows() {
            let h = mix(self.seed, r, column);
            f(r, h, &mut data);
            offsets.push(data.len() as i32);
            valid.push(h >> 60 != 0);
        }
        let nulls = nullable.then(|| NullBuffer::from(valid));
        StringArray::new(OffsetBuffer::new(ScalarBuffer::from(offsets)), data.into_bytes().into(), nulls)
    }
}

fn generate(schema: &SchemaRef, seed: u64, start: u64, len: usize, flat: bool) -> RecordBatch {
    let g = Gen { seed, start, len };
    let ten = i256::from_i128(10);
    let (pow30, pow37) = (ten.wrapping_pow(30), ten.wrapping_pow(37));
    let (ints, int_nulls) = g.column(1, true, |r, h| match r % 101 {
        0 => i64::MIN,
        1 => i64::MAX,
        2 => 0,
        3 => -1,
        _ => (h as i64) >> (h >> 58),
    });
    let (floats, float_nulls) = g.column(2, true, float_value);
    let (bools, bool_nulls) = g.column(3, true, |_, h| u8::from(h & 1 == 1));
    let (dates, date_nulls) = g.column(6, true, |r, h| match r % 89 {
        0 => DATE_MIN,
        1 => DATE_MAX,
        2 => 0,
        _ => -25_567 + (h % 73_049) as i32, // 1900-01-01 .. 2099-12-31
    });
    let (times, time_nulls) = g.column(7, true, |r, h| match r % 83 {
        0 => 0,
        1 => 86_399_999_999,
        2 => 43_200_100_000, // 12:00:00.1
        _ => (h % 86_400) as i64 * 1_000_000 + fraction(h),
    });
    let (datetimes, datetime_nulls) = g.column(8, true, micros_value);
    let (timestamps, timestamp_nulls) = g.column(9, true, micros_value);
    let (numerics, numeric_nulls) = g.column(10, true, |r, h| match r % 67 {
        0 => NUMERIC_MAX,
        1 => -NUMERIC_MAX,
        2 => 0,
        3 => 1_500_000_000, // 1.5
        4 => 1,             // 0.000000001
        _ => ((h as i64) >> (h >> 58)) as i128 * 1_000,
    });
    let (bignumerics, bignumeric_nulls) = g.column(11, true, |r, h| match r % 61 {
        0 => i256::MAX, // BIGNUMERIC's max, 5.78…E+38
        1 => i256::MIN,
        2 => i256::ZERO,
        3 => i256::from_i128(15) * pow37, // 1.5
        4 => i256::ONE,                   // 1E-38
        _ => i256::from_i128((h as i64 >> (h >> 58)) as i128) * pow30,
    });
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(g.rows().map(|r| r as i64))),
        Arc::new(Int64Array::new(ints, int_nulls)),
        Arc::new(Float64Array::new(floats, float_nulls)),
        Arc::new(BooleanArray::new(bools.iter().map(|b| *b == 1).collect(), bool_nulls)),
        Arc::new(g.strings(4, true, |r, h, out| {
            if h & 7 == 0 {
                out.push_str("user_");
                out.push_str(itoa::Buffer::new().format(r));
            } else {
                out.push_str(STRINGS[(h >> 8) as usize % STRINGS.len()]);
            }
        })),
        Arc::new(binary_column(&g, 5)),
        Arc::new(Date32Array::new(dates, date_nulls)),
        Arc::new(Time64MicrosecondArray::new(times, time_nulls)),
        Arc::new(TimestampMicrosecondArray::new(datetimes, datetime_nulls)),
        Arc::new(TimestampMicrosecondArray::new(timestamps, timestamp_nulls).with_timezone("UTC")),
        Arc::new(
            Decimal128Array::new(numerics, numeric_nulls)
                .with_precision_and_scale(38, 9)
                .expect("38,9 is a valid decimal type"),
        ),
        Arc::new(
            Decimal256Array::new(bignumerics, bignumeric_nulls)
                .with_precision_and_scale(76, 38)
                .expect("76,38 is a valid decimal type"),
        ),
        Arc::new(g.strings(12, true, |_, h, out| out.push_str(WKT[(h >> 8) as usize % WKT.len()]))),
        Arc::new(g.strings(13, true, |r, h, out| {
            if h & 3 == 0 {
                out.push_str(r#"{"row":"#);
                out.push_str(itoa::Buffer::new().format(r));
                out.push('}');
            } else {
                out.push_str(JSON[(h >> 8) as usize % JSON.len()]);
            }
        })),
    ];
    if !flat {
        columns.push(Arc::new(list_column(&g, 14)));
        columns.push(Arc::new(struct_column(&g, 15)));
    }
    RecordBatch::try_new(schema.clone(), columns).expect("generated columns match the synthetic schema")
}

fn float_value(row: u64, h: u64) -> f64 {
    match row % 97 {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        3 => -0.0,
        4 => 1e-7,
        5 => 1e20,
        6 => 0.1,
        7 => f64::MAX,
        8 => 5e-324,
        9 => 123_456_789_012_345_680_000.0,
        10 => 25.0,
        _ => {
            let unit = (h >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            // Mostly "money-like" values with few digits, sometimes full-precision doubles.
            if h & 1 == 0 { (unit * 1e6).round() / 100.0 } else { unit * 10f64.powi((h % 9) as i32) }
        }
    }
}

/// Sub-second part: none, milliseconds, or full microseconds.
fn fraction(h: u64) -> i64 {
    match (h >> 20) % 3 {
        0 => 0,
        1 => ((h >> 24) % 1000) as i64 * 1000,
        _ => ((h >> 24) % 1_000_000) as i64,
    }
}

fn micros_value(row: u64, h: u64) -> i64 {
    match row % 79 {
        0 => MICROS_MIN,
        1 => MICROS_MAX,
        2 => 0,
        // 2000-01-01 .. 2030-01-01
        _ => 946_684_800_000_000 + (h % 946_771_200) as i64 * 1_000_000 + fraction(h),
    }
}

fn binary_column(g: &Gen, column: u64) -> BinaryArray {
    let mut offsets = Vec::with_capacity(g.len + 1);
    let mut data: Vec<u8> = Vec::with_capacity(g.len * 8);
    let mut valid = Vec::with_capacity(g.len);
    offsets.push(0i32);
    for r in g.rows() {
        let h = mix(g.seed, r, column);
        let n = (h % 17) as usize;
        data.extend(h.to_le_bytes().iter().cycle().take(n));
        offsets.push(data.len() as i32);
        valid.push(h >> 60 != 0);
    }
    BinaryArray::new(OffsetBuffer::new(ScalarBuffer::from(offsets)), data.into(), Some(NullBuffer::from(valid)))
}

/// A REPEATED INT64: never NULL in BigQuery, possibly empty.
fn list_column(g: &Gen, column: u64) -> ListArray {
    let mut offsets = Vec::with_capacity(g.len + 1);
    let mut values = Vec::with_capacity(g.len * 2);
    offsets.push(0i32);
    for r in g.rows() {
        let h = mix(g.seed, r, column);
        for i in 0..(h % 4) {
            values.push((h >> (8 * i)) as i64 % 1000);
        }
        offsets.push(values.len() as i32);
    }
    let item = Arc::new(Field::new("item", DataType::Int64, false));
    ListArray::new(
        item,
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Arc::new(arrow_array::PrimitiveArray::<Int64Type>::from(values)),
        None,
    )
}

fn struct_column(g: &Gen, column: u64) -> StructArray {
    let (a, a_nulls) = g.column(column * 16 + 1, true, |r, _| r as i64 * 3);
    let b = g.strings(column * 16 + 2, true, |_, h, out| out.push_str(STRINGS[(h >> 8) as usize % STRINGS.len()]));
    let (c, c_nulls) = g.column(column * 16 + 3, true, |_, h| (h % 20_000) as i32);
    let (_, nulls) = g.column(column, true, |_, _| 0u8);
    let children: Vec<ArrayRef> =
        vec![Arc::new(Int64Array::new(a, a_nulls)), Arc::new(b), Arc::new(Date32Array::new(c, c_nulls))];
    StructArray::new(record_fields(), children, nulls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_options() {
        let o = SyntheticOptions::from_url("?rows=10M&streams=4&seed=7&flat=true").unwrap();
        assert_eq!((o.rows, o.streams, o.seed, o.flat), (10_000_000, 4, 7, true));
        assert_eq!(SyntheticOptions::from_url("?rows=1e6").unwrap().rows, 1_000_000);
        assert!(SyntheticOptions::from_url("?rows=lots").is_err());
        assert!(SyntheticOptions::from_url("?colour=red").is_err());
        assert!(SyntheticOptions::from_url("?streams=0").is_err());
    }

    #[test]
    fn streams_partition_the_rows() {
        let s = SyntheticSource::new(SyntheticOptions { rows: 1001, streams: 7, ..Default::default() });
        let mut next = 0;
        for i in 0..7 {
            let (a, b) = s.stream_range(i);
            assert_eq!(a, next);
            next = b;
        }
        assert_eq!(next, 1001);
    }

    #[test]
    fn generation_is_deterministic_and_position_independent() {
        let s = SyntheticSource::new(SyntheticOptions::default());
        let whole = s.batch(0, 300);
        let tail = s.batch(100, 200);
        assert_eq!(whole.slice(100, 200), tail);
        assert_eq!(whole.num_columns(), 16);
        assert_eq!(whole.schema(), schema(false));
    }

    #[test]
    fn edge_values_are_present() {
        let s = SyntheticSource::new(SyntheticOptions { flat: true, ..Default::default() });
        let b = s.batch(0, 1000);
        let ints = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        assert!(ints.iter().any(|v| v == Some(i64::MIN)) && ints.iter().any(|v| v == Some(i64::MAX)));
        let floats = b.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
        assert!(floats.iter().flatten().any(f64::is_nan));
        assert!(floats.iter().flatten().any(|f| f == f64::NEG_INFINITY));
        let dates = b.column(6).as_any().downcast_ref::<Date32Array>().unwrap();
        assert!(dates.iter().any(|d| d == Some(DATE_MIN)) && dates.iter().any(|d| d == Some(DATE_MAX)));
        assert!(b.column(4).null_count() > 0);
    }
}
