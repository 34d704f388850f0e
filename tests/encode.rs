//! Encoder tests: every BigQuery type and edge value against hand-written expected text (CSV,
//! NDJSON), round trips (CSV parsed back with a CSV reader, Parquet read back with the parquet
//! crate), and BigQuery's Parquet physical/logical type mapping.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::*;
use arrow_buffer::i256;
use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use bq2sftp::encode::csv::{NestedMode, WriterBuilder};
use bq2sftp::encode::{self, EncodeError, FormatOptions, Part};
use bq2sftp::read::synthetic::{self, SyntheticOptions, SyntheticSource};

fn tag(f: Field, t: &str) -> Field {
    f.with_metadata(HashMap::from([("ARROW:extension:name".to_string(), format!("google:sqlType:{t}"))]))
}

/// Five rows that between them hold every BigQuery type's awkward values.
fn edge_batch() -> RecordBatch {
    let us = |s: &str| {
        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap().and_utc().timestamp_micros()
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("int64", DataType::Int64, true),
        Field::new("float64", DataType::Float64, true),
        Field::new("bool", DataType::Boolean, true),
        Field::new("string", DataType::Utf8, true),
        Field::new("bytes", DataType::Binary, true),
        Field::new("date", DataType::Date32, true),
        Field::new("time", DataType::Time64(TimeUnit::Microsecond), true),
        tag(Field::new("datetime", DataType::Timestamp(TimeUnit::Microsecond, None), true), "datetime"),
        Field::new("timestamp", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new("numeric", DataType::Decimal128(38, 9), true),
        Field::new("bignumeric", DataType::Decimal256(76, 38), true),
        tag(Field::new("geography", DataType::Utf8, true), "geography"),
        tag(Field::new("json", DataType::Utf8, true), "json"),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![Some(i64::MIN), Some(i64::MAX), None, Some(0), Some(-42)])),
        Arc::new(Float64Array::from(vec![
            Some(f64::NAN),
            Some(f64::INFINITY),
            None,
            Some(f64::NEG_INFINITY),
            Some(-0.0),
        ])),
        Arc::new(BooleanArray::from(vec![Some(true), Some(false), None, Some(true), Some(false)])),
        Arc::new(StringArray::from(vec![Some("say \"hi\""), Some("a,b\nc"), None, Some(""), Some("Grüße <&> 日本")])),
        Arc::new(BinaryArray::from(vec![
            Some(&[0xABu8, 0xAC][..]),
            Some(&b""[..]),
            None,
            Some(&b"hello"[..]),
            Some(&[0u8][..]),
        ])),
        Arc::new(Date32Array::from(vec![Some(-719_162), Some(2_932_896), None, Some(0), Some(17_896)])),
        Arc::new(Time64MicrosecondArray::from(vec![
            Some(0),
            Some(86_399_999_999),
            None,
            Some(43_200_100_000),
            Some(1_230),
        ])),
        Arc::new(TimestampMicrosecondArray::from(vec![
            Some(us("0001-01-01 00:00:00")),
            Some(us("9999-12-31 23:59:59.999999")),
            None,
            Some(us("2018-12-31 12:44:31")),
            Some(us("1969-12-31 23:59:59.5")),
        ])),
        Arc::new(
            TimestampMicrosecondArray::from(vec![
                Some(0),
                Some(us("2015-05-20 21:34:02.1")),
                None,
                Some(us("2018-12-31 12:44:31.744957")),
                Some(us("9999-12-31 23:59:59.999999")),
            ])
            .with_timezone("UTC"),
        ),
        Arc::new(
            Decimal128Array::from(vec![
                Some(synthetic::NUMERIC_MAX),
                Some(-1_500_000_000),
                None,
                Some(0),
                Some(10_000_000_000),
            ])
            .with_precision_and_scale(38, 9)
            .unwrap(),
        ),
        Arc::new(
            Decimal256Array::from(vec![
                Some(i256::from_i128(15) * i256::from_i128(10).wrapping_pow(37)),
                Some(i256::ONE),
                None,
                Some(i256::MIN),
                Some(i256::from_i128(-7) * i256::from_i128(10).wrapping_pow(38)),
            ])
            .with_precision_and_scale(76, 38)
            .unwrap(),
        ),
        Arc::new(StringArray::from(vec![
            Some("POINT(30 10)"),
            Some("LINESTRING(30 10, 10 30)"),
            None,
            Some("POINT(-122.0838511 37.3860517)"),
            Some("POINT(0 0)"),
        ])),
        Arc::new(StringArray::from(vec![Some(r#"{"a":1}"#), Some("[1,2]"), None, Some("12.5"), Some("not json")])),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

const EDGE_CSV: &str = "\
int64,float64,bool,string,bytes,date,time,datetime,timestamp,numeric,bignumeric,geography,json
-9223372036854775808,NaN,true,\"say \"\"hi\"\"\",q6w=,0001-01-01,00:00:00,0001-01-01T00:00:00,1970-01-01 00:00:00 UTC,99999999999999999999999999999.999999999,1.5,POINT(30 10),\"{\"\"a\"\":1}\"
9223372036854775807,Infinity,false,\"a,b
c\",\"\",9999-12-31,23:59:59.999999,9999-12-31T23:59:59.999999,2015-05-20 21:34:02.1 UTC,-1.5,0.00000000000000000000000000000000000001,\"LINESTRING(30 10, 10 30)\",\"[1,2]\"
,,,,,,,,,,,,
0,-Infinity,true,\"\",aGVsbG8=,1970-01-01,12:00:00.1,2018-12-31T12:44:31,2018-12-31 12:44:31.744957 UTC,0,-578960446186580977117854925043439539266.34992332820282019728792003956564819968,POINT(-122.0838511 37.3860517),12.5
-42,-0,false,Grüße <&> 日本,AA==,2018-12-31,00:00:00.00123,1969-12-31T23:59:59.5,9999-12-31 23:59:59.999999 UTC,10,-7,POINT(0 0),not json
";

#[test]
fn csv_renders_every_type_as_bigquery_does() {
    assert_eq!(encode::csv::to_string(&edge_batch(), WriterBuilder::new()).unwrap(), EDGE_CSV);
}

#[test]
fn csv_floats_use_round_trip_text() {
    let schema = Arc::new(Schema::new(vec![Field::new("f", DataType::Float64, false)]));
    let values = vec![0.1, 1e-7, 1e20, 25.0, 123_456_789_012_345_680_000.0, 0.1 + 0.2, 1e15, 123_456.789];
    let batch = RecordBatch::try_new(schema, vec![Arc::new(Float64Array::from(values))]).unwrap();
    let text = encode::csv::to_string(&batch, WriterBuilder::new().with_header(false)).unwrap();
    assert_eq!(text, "0.1\n1e-07\n1e+20\n25\n1.2345678901234568e+20\n0.30000000000000004\n1e+15\n123456.789\n");
}

#[test]
fn csv_options_delimiter_null_marker_quote_all_no_header() {
    let batch = edge_batch().project(&[0, 2, 3]).unwrap();
    let text =
        encode::csv::to_string(&batch, WriterBuilder::new().with_delimiter(b'|').with_null("\\N").with_header(false))
            .unwrap();
    assert_eq!(
        text,
        "-9223372036854775808|true|\"say \"\"hi\"\"\"\n9223372036854775807|false|\"a,b\nc\"\n\\N|\\N|\\N\n0|true|\n-42|false|Grüße <&> 日本\n"
    );
    let text = encode::csv::to_string(&batch.slice(0, 1), WriterBuilder::new().with_quote_all(true)).unwrap();
    assert_eq!(text, "\"int64\",\"bool\",\"string\"\n\"-9223372036854775808\",\"true\",\"say \"\"hi\"\"\"\n");
    // A delimiter that appears inside rendered values (space, in TIMESTAMP) quotes them.
    let ts = edge_batch().project(&[8]).unwrap().slice(1, 1);
    let text = encode::csv::to_string(&ts, WriterBuilder::new().with_delimiter(b' ').with_header(false)).unwrap();
    assert_eq!(text, "\"2015-05-20 21:34:02.1 UTC\"\n");
    // A string equal to the NULL marker stays distinguishable from NULL.
    let s = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)])),
        vec![Arc::new(StringArray::from(vec![Some("NULL"), None]))],
    )
    .unwrap();
    let text = encode::csv::to_string(&s, WriterBuilder::new().with_null("NULL").with_header(false)).unwrap();
    assert_eq!(text, "\"NULL\"\nNULL\n");
}

fn nested_batch() -> RecordBatch {
    let mut list =
        ListBuilder::new(Int64Builder::new()).with_field(Arc::new(Field::new("item", DataType::Int64, false)));
    list.values().append_value(1);
    list.values().append_value(-2);
    list.append(true);
    list.append(true); // empty array
    let list = list.finish();
    let fields = Fields::from(vec![
        Field::new("a", DataType::Int64, true),
        Field::new("b", DataType::Utf8, true),
        Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
    ]);
    let record = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(Int64Array::from(vec![Some(7), None])),
            Arc::new(StringArray::from(vec![Some("x\"y"), Some("z")])),
            Arc::new(TimestampMicrosecondArray::from(vec![Some(1_500_000), None]).with_timezone("UTC")),
        ],
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("tags", list.data_type().clone(), false),
        Field::new("record", DataType::Struct(fields), true),
    ]));
    RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2])), Arc::new(list), Arc::new(record)])
        .unwrap()
}

#[test]
fn csv_refuses_nested_columns_by_name_unless_asked_for_json() {
    let err = encode::csv::to_string(&nested_batch(), WriterBuilder::new()).unwrap_err();
    assert!(matches!(&err, EncodeError::NestedColumn { column, .. } if column == "tags"), "{err:?}");
    assert!(err.is_schema_problem());
    assert!(err.to_string().contains("--csv-nested json"), "{err}");
    let text = encode::csv::to_string(&nested_batch(), WriterBuilder::new().with_nested(NestedMode::Json)).unwrap();
    assert_eq!(
        text,
        "id,tags,record\n1,\"[\"\"1\"\",\"\"-2\"\"]\",\"{\"\"a\"\":\"\"7\"\",\"\"b\"\":\"\"x\\\"\"y\"\",\"\"t\"\":\"\"1970-01-01 00:00:01.5 UTC\"\"}\"\n2,[],\"{\"\"b\"\":\"\"z\"\"}\"\n"
    );
}

fn ndjson(batch: &RecordBatch) -> String {
    let mut enc =
        (encode::format("ndjson").unwrap().build)(&batch.schema(), &FormatOptions::default(), Part::Whole).unwrap();
    enc.write(batch).unwrap();
    enc.finish().unwrap();
    let mut out = Vec::new();
    enc.drain_into(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn ndjson_follows_bigquery_json_export() {
    let expected = [
        r#"{"int64":"-9223372036854775808","float64":"NaN","bool":true,"string":"say \"hi\"","bytes":"q6w=","date":"0001-01-01","time":"00:00:00","datetime":"0001-01-01T00:00:00","timestamp":"1970-01-01 00:00:00 UTC","numeric":"99999999999999999999999999999.999999999","bignumeric":"1.5","geography":"POINT(30 10)","json":{"a":1}}"#,
        r#"{"int64":"9223372036854775807","float64":"Infinity","bool":false,"string":"a,b\nc","bytes":"","date":"9999-12-31","time":"23:59:59.999999","datetime":"9999-12-31T23:59:59.999999","timestamp":"2015-05-20 21:34:02.1 UTC","numeric":"-1.5","bignumeric":"0.00000000000000000000000000000000000001","geography":"LINESTRING(30 10, 10 30)","json":[1,2]}"#,
        r#"{}"#,
        r#"{"int64":"0","float64":"-Infinity","bool":true,"string":"","bytes":"aGVsbG8=","date":"1970-01-01","time":"12:00:00.1","datetime":"2018-12-31T12:44:31","timestamp":"2018-12-31 12:44:31.744957 UTC","numeric":"0","bignumeric":"-578960446186580977117854925043439539266.34992332820282019728792003956564819968","geography":"POINT(-122.0838511 37.3860517)","json":12.5}"#,
        r#"{"int64":"-42","float64":-0,"bool":false,"string":"Grüße \u003c\u0026\u003e 日本","bytes":"AA==","date":"2018-12-31","time":"00:00:00.00123","datetime":"1969-12-31T23:59:59.5","timestamp":"9999-12-31 23:59:59.999999 UTC","numeric":"10","bignumeric":"-7","geography":"POINT(0 0)","json":"not json"}"#,
    ];
    assert_eq!(ndjson(&edge_batch()), expected.join("\n") + "\n");
    assert_eq!(
        ndjson(&nested_batch()),
        "{\"id\":\"1\",\"tags\":[\"1\",\"-2\"],\"record\":{\"a\":\"7\",\"b\":\"x\\\"y\",\"t\":\"1970-01-01 00:00:01.5 UTC\"}}\n{\"id\":\"2\",\"tags\":[],\"record\":{\"b\":\"z\"}}\n"
    );
    // Every line is valid JSON.
    for line in ndjson(&edge_batch()).lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
}

fn synthetic_rows(rows: usize, flat: bool) -> RecordBatch {
    SyntheticSource::new(SyntheticOptions { flat, ..Default::default() }).batch(0, rows)
}

/// CSV parsed back with a CSV reader gives back the values: ints, floats (bit for bit), strings
/// (through quoting), bools, bytes (base64), dates and times, decimals.
#[test]
fn csv_round_trips_through_a_csv_reader() {
    use base64::Engine;
    let batch = synthetic_rows(5000, true);
    let text = encode::csv::to_string(&batch, WriterBuilder::new()).unwrap();
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let headers: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(headers, names);
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), batch.num_rows());
    let col = |name: &str| batch.column(batch.schema().index_of(name).unwrap()).clone();
    let (ints, floats, bools) = (col("int64_col"), col("float64_col"), col("bool_col"));
    let (strings, bytes, dates) = (col("string_col"), col("bytes_col"), col("date_col"));
    let (numerics, timestamps) = (col("numeric_col"), col("timestamp_col"));
    let field =
        |r: &csv::StringRecord, name: &str| r.get(headers.iter().position(|h| h == name).unwrap()).unwrap().to_string();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(field(r, "id"), i.to_string());
        let f = field(r, "int64_col");
        if ints.is_null(i) {
            assert_eq!(f, "");
        } else {
            assert_eq!(f.parse::<i64>().unwrap(), ints.as_primitive::<Int64Type>().value(i));
        }
        let f = field(r, "float64_col");
        if !floats.is_null(i) {
            let v = floats.as_primitive::<Float64Type>().value(i);
            let back = match f.as_str() {
                "NaN" => f64::NAN,
                "Infinity" => f64::INFINITY,
                "-Infinity" => f64::NEG_INFINITY,
                s => s.parse::<f64>().unwrap(),
            };
            assert!(v.to_bits() == back.to_bits() || (v.is_nan() && back.is_nan()), "row {i}: {v} vs {f}");
        }
        if !bools.is_null(i) {
            assert_eq!(field(r, "bool_col"), bools.as_boolean().value(i).to_string());
        }
        let f = field(r, "string_col");
        if strings.is_null(i) {
            assert_eq!(f, "");
        } else {
            assert_eq!(f, strings.as_string::<i32>().value(i), "row {i}");
        }
        if !bytes.is_null(i) {
            let back = base64::engine::general_purpose::STANDARD.decode(field(r, "bytes_col")).unwrap();
            assert_eq!(back, bytes.as_binary::<i32>().value(i));
        }
        if !dates.is_null(i) {
            let d = chrono::NaiveDate::parse_from_str(&field(r, "date_col"), "%Y-%m-%d").unwrap();
            let days = (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days();
            assert_eq!(days, dates.as_primitive::<Date32Type>().value(i) as i64);
        }
        if !timestamps.is_null(i) {
            let f = field(r, "timestamp_col");
            let t =
                chrono::NaiveDateTime::parse_from_str(f.strip_suffix(" UTC").unwrap(), "%Y-%m-%d %H:%M:%S%.f").unwrap();
            assert_eq!(t.and_utc().timestamp_micros(), timestamps.as_primitive::<TimestampMicrosecondType>().value(i));
        }
        if !numerics.is_null(i) {
            let f = field(r, "numeric_col");
            let (int, frac) = f.split_once('.').unwrap_or((&f, ""));
            assert!(frac.len() <= 9 && !frac.ends_with('0'), "{f}");
            let scaled: i128 = format!("{int}{frac:0<9}").parse().unwrap();
            assert_eq!(scaled, numerics.as_primitive::<Decimal128Type>().value(i));
        }
    }
}

fn parquet_bytes(batch: &RecordBatch) -> Vec<u8> {
    let mut enc =
        (encode::format("parquet").unwrap().build)(&batch.schema(), &FormatOptions::default(), Part::Whole).unwrap();
    let mut out = Vec::new();
    for chunk in [
        batch.slice(0, batch.num_rows() / 2),
        batch.slice(batch.num_rows() / 2, batch.num_rows() - batch.num_rows() / 2),
    ] {
        enc.write(&chunk).unwrap();
        enc.drain_into(&mut out);
    }
    enc.finish().unwrap();
    enc.drain_into(&mut out);
    out
}

#[test]
fn parquet_round_trips_every_type_including_nested() {
    let batch = synthetic_rows(3000, false);
    let bytes = bytes::Bytes::from(parquet_bytes(&batch));
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
    let back: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    let back = arrow_select::concat::concat_batches(&back[0].schema(), &back).unwrap();
    assert_eq!(back.schema(), batch.schema(), "schema incl. field metadata survives");
    assert_eq!(back, batch);
}

#[test]
fn parquet_uses_bigquery_export_type_mapping() {
    use parquet::basic::{LogicalType, TimeUnit as PTime, Type as Physical};
    let batch = synthetic_rows(10, false);
    let bytes = bytes::Bytes::from(parquet_bytes(&batch));
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
    let schema = builder.parquet_schema();
    let column = |name: &str| schema.columns().iter().find(|c| c.path().string() == name).unwrap().clone();
    let numeric = column("numeric_col");
    assert_eq!(numeric.physical_type(), Physical::FIXED_LEN_BYTE_ARRAY);
    assert_eq!(numeric.logical_type_ref(), Some(&LogicalType::decimal(9, 38)));
    let big = column("bignumeric_col");
    assert_eq!(big.physical_type(), Physical::FIXED_LEN_BYTE_ARRAY);
    assert_eq!(big.logical_type_ref(), Some(&LogicalType::decimal(38, 76)));
    let micros = PTime::MICROS;
    assert_eq!(column("datetime_col").logical_type_ref(), Some(&LogicalType::timestamp(false, micros)));
    assert_eq!(column("time_col").physical_type(), Physical::INT64);
    assert_eq!(column("time_col").logical_type_ref(), Some(&LogicalType::time(true, micros)));
    assert_eq!(column("date_col").logical_type_ref(), Some(&LogicalType::Date));
    assert_eq!(column("string_col").logical_type_ref(), Some(&LogicalType::String));
    assert_eq!(column("bytes_col").logical_type_ref(), None);
    assert_eq!(column("int64_list.list.item").physical_type(), Physical::INT64);
    assert_eq!(column("record.b").logical_type_ref(), Some(&LogicalType::String));
}
