//! The emulator's tables: `PROJECT.DATASET.TABLE.parquet` files, turned into BigQuery tables.
//!
//! Each column becomes the BigQuery type a Parquet load would give it, and is then sent with
//! the Storage Read API's Arrow mapping ("Arrow schema details" in the Storage API doc;
//! research notes §2): integers -> INT64 (`Int64`), floats -> FLOAT64, strings -> STRING
//! (`Utf8`), binaries -> BYTES (`Binary`), dates -> DATE (`Date32`), times -> TIME
//! (`Time64(µs)`), timestamps adjusted to UTC -> TIMESTAMP (`Timestamp(µs, "UTC")`), local
//! timestamps -> DATETIME (`Timestamp(µs)` tagged `google:sqlType:datetime`), decimals ->
//! NUMERIC (`Decimal128(38, 9)`) or, when they do not fit, BIGNUMERIC (`Decimal256(76, 38)`),
//! lists -> REPEATED, structs -> RECORD. A non-nullable field is REQUIRED. Strings whose stored
//! field metadata says `ARROW:extension:name=google:sqlType:geography` (or `...:json`, or the
//! canonical `arrow.json`) are GEOGRAPHY / JSON, tagged as BigQuery tags them. Other field
//! metadata (Parquet field ids and the like) is dropped: BigQuery does not send it.
//!
//! A table is loaded once and kept in memory (re-read when the file changes), so ReadRows is
//! only slicing, IPC encoding and compression: the emulator should not be what a benchmark of
//! the reader measures. Query results live here too, as in-memory tables.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arrow_array::RecordBatchReader;
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{
    Array, ArrayRef, BinaryArray, Date32Array, Decimal128Array, Decimal256Array, Float64Array, Int64Array, ListArray,
    RecordBatch, StringArray, StructArray, Time64MicrosecondArray, TimestampMicrosecondArray,
};
use arrow_buffer::i256;
use arrow_schema::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use serde_json::{Value, json};

use crate::read::bigquery::TableRef;

const EXT_NAME: &str = "ARROW:extension:name";
const EXT_META: &str = "ARROW:extension:metadata";

/// A table as the emulator serves it.
#[derive(Debug)]
pub struct Table {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: u64,
}

impl Table {
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
        Table { schema, batches, rows }
    }

    /// Logical bytes of the given columns, BigQuery-style estimate (what a scan would bill).
    pub fn bytes(&self, schema: &Schema) -> u64 {
        let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
        self.batches
            .iter()
            .map(|b| {
                b.schema()
                    .fields()
                    .iter()
                    .zip(b.columns())
                    .filter(|(f, _)| names.contains(&f.name()))
                    .map(|(_, c)| c.get_buffer_memory_size() as u64)
                    .sum::<u64>()
            })
            .sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("Not found: Table {0}")]
    NotFound(String),
    #[error("table {table}: {message}")]
    Load { table: String, message: String },
}

/// A loaded file: its modification time and length when read, and the table.
type Loaded = (SystemTime, u64, Arc<Table>);

/// Tables by name: files in a directory plus in-memory query results.
pub struct Catalog {
    dir: Option<PathBuf>,
    files: Mutex<HashMap<PathBuf, Loaded>>,
    results: Mutex<HashMap<String, Arc<Table>>>,
}

impl Catalog {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Catalog { dir, files: Mutex::default(), results: Mutex::default() }
    }

    /// Registers an in-memory table (query results; tests).
    pub fn put(&self, name: &TableRef, table: Table) {
        self.results.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), Arc::new(table));
    }

    /// Looks a table up; loads (or reloads) its file. Blocking: call from a blocking thread.
    pub fn get(&self, name: &TableRef) -> Result<Arc<Table>, CatalogError> {
        if let Some(t) = self.results.lock().unwrap_or_else(|p| p.into_inner()).get(&name.to_string()) {
            return Ok(t.clone());
        }
        let shown = format!("{}:{}.{}", name.project, name.dataset, name.table);
        let dir = self.dir.as_ref().ok_or_else(|| CatalogError::NotFound(shown.clone()))?;
        let path = dir.join(format!("{name}.parquet"));
        let meta = std::fs::metadata(&path).map_err(|_| CatalogError::NotFound(shown.clone()))?;
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        if let Some((m, l, t)) = self.files.lock().unwrap_or_else(|p| p.into_inner()).get(&path)
            && (*m, *l) == stamp
        {
            return Ok(t.clone());
        }
        let table = Arc::new(load_parquet(&path).map_err(|message| CatalogError::Load { table: shown, message })?);
        self.files.lock().unwrap_or_else(|p| p.into_inner()).insert(path, (stamp.0, stamp.1, table.clone()));
        Ok(table)
    }
}

fn load_parquet(path: &std::path::Path) -> Result<Table, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| format!("{} is not readable Parquet: {e}", path.display()))?
        .with_batch_size(8192)
        .build()
        .map_err(|e| e.to_string())?;
    let source_schema = reader.schema();
    let fields: Vec<Field> = source_schema.fields().iter().map(|f| bigquery_field(f)).collect::<Result<_, _>>()?;
    let schema = Arc::new(Schema::new(fields));
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("{}: {e}", path.display()))?;
        let columns =
            batch.columns().iter().zip(schema.fields()).map(|(c, f)| convert(c, f)).collect::<Result<Vec<_>, _>>()?;
        batches.push(RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?);
    }
    Ok(Table::new(schema, batches))
}

fn tag(field: Field, sql_type: &str) -> Field {
    let mut md = HashMap::from([(EXT_NAME.to_string(), format!("google:sqlType:{sql_type}"))]);
    if sql_type == "geography" {
        md.insert(EXT_META.to_string(), r#"{"encoding": "WKT"}"#.to_string());
    }
    field.with_metadata(md)
}

/// The BigQuery column a Parquet load makes of `f`, in the Storage API's Arrow form.
pub fn bigquery_field(f: &Field) -> Result<Field, String> {
    let name = f.name();
    let unsupported = || format!("column {name}: Arrow type {} has no BigQuery equivalent", f.data_type());
    let ext = f.metadata().get(EXT_NAME).map(String::as_str).unwrap_or_default();
    let plain = |t: DataType| Field::new(name, t, f.is_nullable());
    Ok(match f.data_type() {
        DataType::Boolean => plain(DataType::Boolean),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => plain(DataType::Int64),
        DataType::Float16 | DataType::Float32 | DataType::Float64 => plain(DataType::Float64),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let field = plain(DataType::Utf8);
            if ext.ends_with("sqlType:geography") || ext == "geoarrow.wkt" {
                tag(field, "geography")
            } else if ext.ends_with("sqlType:json") || ext == "arrow.json" {
                tag(field, "json")
            } else {
                field
            }
        }
        DataType::Dictionary(_, v) if matches!(v.as_ref(), DataType::Utf8 | DataType::LargeUtf8) => {
            plain(DataType::Utf8)
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            plain(DataType::Binary)
        }
        DataType::Date32 | DataType::Date64 => plain(DataType::Date32),
        DataType::Time32(_) | DataType::Time64(_) => plain(DataType::Time64(TimeUnit::Microsecond)),
        DataType::Timestamp(_, None) => tag(plain(DataType::Timestamp(TimeUnit::Microsecond, None)), "datetime"),
        DataType::Timestamp(_, Some(_)) => plain(DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))),
        DataType::Decimal32(p, s) | DataType::Decimal64(p, s) => decimal_field(name, *p, *s, f.is_nullable())?,
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => decimal_field(name, *p, *s, f.is_nullable())?,
        DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
            let item = bigquery_field(item)?;
            if matches!(item.data_type(), DataType::List(_)) {
                return Err(format!("column {name}: BigQuery has no arrays of arrays"));
            }
            // REPEATED: never NULL (a NULL list loads as an empty array).
            Field::new(name, DataType::List(Arc::new(item)), false)
        }
        DataType::Struct(children) => {
            let children: Vec<Field> = children.iter().map(|c| bigquery_field(c)).collect::<Result<_, _>>()?;
            plain(DataType::Struct(Fields::from(children)))
        }
        _ => return Err(unsupported()),
    })
}

fn decimal_field(name: &str, p: u8, s: i8, nullable: bool) -> Result<Field, String> {
    // BigQuery's Parquet load: DECIMAL(p, s) is NUMERIC when it fits (s ≤ 9, p - s ≤ 29),
    // else BIGNUMERIC (s ≤ 38, p - s ≤ 38).
    let (p, s) = (p as i32, s as i32);
    if s < 0 {
        return Err(format!("column {name}: negative decimal scale {s}"));
    }
    if s <= 9 && p - s <= 29 {
        Ok(Field::new(name, DataType::Decimal128(38, 9), nullable))
    } else if s <= 38 && p - s <= 38 {
        Ok(Field::new(name, DataType::Decimal256(76, 38), nullable))
    } else {
        Err(format!("column {name}: DECIMAL({p}, {s}) does not fit BIGNUMERIC"))
    }
}

fn scale_of(t: &DataType) -> i32 {
    match t {
        DataType::Decimal32(_, s)
        | DataType::Decimal64(_, s)
        | DataType::Decimal128(_, s)
        | DataType::Decimal256(_, s) => *s as i32,
        _ => 0,
    }
}

/// Converts `array` to the BigQuery type of `to` (as made by [`bigquery_field`]).
pub fn convert(array: &ArrayRef, to: &Field) -> Result<ArrayRef, String> {
    let from = array.data_type();
    // Already BigQuery-shaped (field metadata included); lists still need NULLs made empty.
    if from == to.data_type() && !(matches!(from, DataType::List(_)) && array.null_count() > 0) {
        return Ok(array.clone());
    }
    let name = to.name();
    let nulls = array.logical_nulls();
    Ok(match to.data_type() {
        DataType::Int64 => {
            let values: Vec<Option<i64>> = match from {
                DataType::Int8 => array.as_primitive::<Int8Type>().iter().map(|v| v.map(i64::from)).collect(),
                DataType::Int16 => array.as_primitive::<Int16Type>().iter().map(|v| v.map(i64::from)).collect(),
                DataType::Int32 => array.as_primitive::<Int32Type>().iter().map(|v| v.map(i64::from)).collect(),
                DataType::UInt8 => array.as_primitive::<UInt8Type>().iter().map(|v| v.map(i64::from)).collect(),
                DataType::UInt16 => array.as_primitive::<UInt16Type>().iter().map(|v| v.map(i64::from)).collect(),
                DataType::UInt32 => array.as_primitive::<UInt32Type>().iter().map(|v| v.map(i64::from)).collect(),
                DataType::UInt64 => array
                    .as_primitive::<UInt64Type>()
                    .iter()
                    .map(|v| {
                        v.map(|x| i64::try_from(x).map_err(|_| format!("column {name}: {x} exceeds INT64"))).transpose()
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(format!("column {name}: cannot convert {from} to INT64")),
            };
            Arc::new(Int64Array::from(values))
        }
        DataType::Float64 => {
            let values: Vec<Option<f64>> = match from {
                DataType::Float16 => array.as_primitive::<Float16Type>().iter().map(|v| v.map(f64::from)).collect(),
                DataType::Float32 => array.as_primitive::<Float32Type>().iter().map(|v| v.map(f64::from)).collect(),
                _ => return Err(format!("column {name}: cannot convert {from} to FLOAT64")),
            };
            Arc::new(Float64Array::from(values))
        }
        DataType::Utf8 => match from {
            DataType::LargeUtf8 => Arc::new(array.as_string::<i64>().iter().collect::<StringArray>()),
            DataType::Utf8View => Arc::new(array.as_string_view().iter().collect::<StringArray>()),
            DataType::Dictionary(..) => {
                let dict = array.as_any_dictionary();
                let taken =
                    arrow_select::take::take(dict.values().as_ref(), dict.keys(), None).map_err(|e| e.to_string())?;
                convert(&taken, to)?
            }
            _ => return Err(format!("column {name}: cannot convert {from} to STRING")),
        },
        DataType::Binary => match from {
            DataType::LargeBinary => Arc::new(array.as_binary::<i64>().iter().collect::<BinaryArray>()),
            DataType::BinaryView => Arc::new(array.as_binary_view().iter().collect::<BinaryArray>()),
            DataType::FixedSizeBinary(_) => Arc::new(array.as_fixed_size_binary().iter().collect::<BinaryArray>()),
            _ => return Err(format!("column {name}: cannot convert {from} to BYTES")),
        },
        DataType::Date32 => match from {
            DataType::Date64 => Arc::new(
                array
                    .as_primitive::<Date64Type>()
                    .iter()
                    .map(|v| v.map(|ms| ms.div_euclid(86_400_000) as i32))
                    .collect::<Date32Array>(),
            ),
            _ => return Err(format!("column {name}: cannot convert {from} to DATE")),
        },
        DataType::Time64(_) => {
            let values: Vec<Option<i64>> = match from {
                DataType::Time32(TimeUnit::Second) => {
                    array.as_primitive::<Time32SecondType>().iter().map(|v| v.map(|x| x as i64 * 1_000_000)).collect()
                }
                DataType::Time32(_) => {
                    array.as_primitive::<Time32MillisecondType>().iter().map(|v| v.map(|x| x as i64 * 1000)).collect()
                }
                DataType::Time64(TimeUnit::Nanosecond) => {
                    array.as_primitive::<Time64NanosecondType>().iter().map(|v| v.map(|x| x / 1000)).collect()
                }
                _ => return Err(format!("column {name}: cannot convert {from} to TIME")),
            };
            Arc::new(Time64MicrosecondArray::from(values))
        }
        DataType::Timestamp(_, tz) => {
            let values: Vec<Option<i64>> = match from {
                DataType::Timestamp(TimeUnit::Second, _) => {
                    array.as_primitive::<TimestampSecondType>().iter().map(|v| v.map(|x| x * 1_000_000)).collect()
                }
                DataType::Timestamp(TimeUnit::Millisecond, _) => {
                    array.as_primitive::<TimestampMillisecondType>().iter().map(|v| v.map(|x| x * 1000)).collect()
                }
                DataType::Timestamp(TimeUnit::Microsecond, _) => {
                    array.as_primitive::<TimestampMicrosecondType>().iter().collect()
                }
                DataType::Timestamp(TimeUnit::Nanosecond, _) => array
                    .as_primitive::<TimestampNanosecondType>()
                    .iter()
                    .map(|v| v.map(|x| x.div_euclid(1000)))
                    .collect(),
                _ => return Err(format!("column {name}: cannot convert {from} to a timestamp")),
            };
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone_opt(tz.clone()))
        }
        DataType::Decimal128(_, 9) => {
            let factor = 10i128.pow((9 - scale_of(from)) as u32);
            let values: Vec<Option<i128>> = match from {
                DataType::Decimal32(..) => {
                    array.as_primitive::<Decimal32Type>().iter().map(|v| v.map(|x| x as i128 * factor)).collect()
                }
                DataType::Decimal64(..) => {
                    array.as_primitive::<Decimal64Type>().iter().map(|v| v.map(|x| x as i128 * factor)).collect()
                }
                DataType::Decimal128(..) => {
                    array.as_primitive::<Decimal128Type>().iter().map(|v| v.map(|x| x * factor)).collect()
                }
                _ => return Err(format!("column {name}: cannot convert {from} to NUMERIC")),
            };
            Arc::new(Decimal128Array::from(values).with_precision_and_scale(38, 9).map_err(|e| e.to_string())?)
        }
        DataType::Decimal256(_, 38) => {
            let factor = i256::from_i128(10).wrapping_pow((38 - scale_of(from)) as u32);
            let up = |x: i256| x.wrapping_mul(factor);
            let values: Vec<Option<i256>> = match from {
                DataType::Decimal32(..) => array
                    .as_primitive::<Decimal32Type>()
                    .iter()
                    .map(|v| v.map(|x| up(i256::from_i128(x as i128))))
                    .collect(),
                DataType::Decimal64(..) => array
                    .as_primitive::<Decimal64Type>()
                    .iter()
                    .map(|v| v.map(|x| up(i256::from_i128(x as i128))))
                    .collect(),
                DataType::Decimal128(..) => {
                    array.as_primitive::<Decimal128Type>().iter().map(|v| v.map(|x| up(i256::from_i128(x)))).collect()
                }
                DataType::Decimal256(..) => array.as_primitive::<Decimal256Type>().iter().map(|v| v.map(up)).collect(),
                _ => return Err(format!("column {name}: cannot convert {from} to BIGNUMERIC")),
            };
            Arc::new(Decimal256Array::from(values).with_precision_and_scale(76, 38).map_err(|e| e.to_string())?)
        }
        DataType::List(item) => convert_list(array, item, name)?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let columns =
                s.columns().iter().zip(fields.iter()).map(|(c, f)| convert(c, f)).collect::<Result<Vec<_>, _>>()?;
            Arc::new(StructArray::try_new(fields.clone(), columns, nulls).map_err(|e| e.to_string())?)
        }
        other => return Err(format!("column {name}: cannot convert {from} to {other}")),
    })
}

fn convert_list(array: &ArrayRef, item: &FieldRef, name: &str) -> Result<ArrayRef, String> {
    let (offsets, values): (Vec<i32>, ArrayRef) = match array.data_type() {
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            (list_offsets(l.value_offsets().iter().map(|o| *o as i64), l.nulls(), name)?, l.values().clone())
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            (list_offsets(l.value_offsets().iter().copied(), l.nulls(), name)?, l.values().clone())
        }
        DataType::FixedSizeList(_, n) => {
            let l = array.as_fixed_size_list();
            let n = *n as i64;
            (list_offsets((0..=l.len() as i64).map(|i| i * n), l.nulls(), name)?, l.values().clone())
        }
        other => return Err(format!("column {name}: cannot convert {other} to ARRAY")),
    };
    let values = convert(&values, item)?;
    let list = ListArray::try_new(item.clone(), arrow_buffer::OffsetBuffer::new(offsets.into()), values, None)
        .map_err(|e| format!("column {name}: {e}"))?;
    Ok(Arc::new(list))
}

/// Offsets with NULL lists made empty (BigQuery loads a NULL array as `[]`). The values of a
/// NULL list are skipped by rebasing only when they are empty; a NULL list hiding values is
/// refused rather than silently re-shaped.
fn list_offsets(
    offsets: impl Iterator<Item = i64>,
    nulls: Option<&arrow_buffer::NullBuffer>,
    name: &str,
) -> Result<Vec<i32>, String> {
    let offsets: Vec<i64> = offsets.collect();
    if let Some(n) = nulls {
        for i in 0..offsets.len().saturating_sub(1) {
            if n.is_null(i) && offsets[i + 1] != offsets[i] {
                return Err(format!("column {name}: a NULL list holds values; BigQuery would load it as empty"));
            }
        }
    }
    offsets.into_iter().map(|o| i32::try_from(o).map_err(|_| format!("column {name}: list too long"))).collect()
}

// ---------------------------------------------------------------------------------------------
// selected_fields

/// Which part of a field to keep.
#[derive(Debug, Clone, PartialEq)]
enum Keep {
    All,
    /// Only these children (struct fields, or the struct inside a list), by index.
    Children(Vec<(usize, Keep)>),
}

/// A `selected_fields` projection, checked against a schema.
#[derive(Debug, Clone)]
pub struct Projection {
    keep: Vec<(usize, Keep)>,
    schema: SchemaRef,
}

fn insert(keep: &mut Vec<(usize, Keep)>, fields: &Fields, path: &[&str], full: &str) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or_else(|| format!("empty field name in selected_fields: {full:?}"))?;
    let (i, field) = fields
        .iter()
        .enumerate()
        .find(|(_, f)| f.name() == first)
        .ok_or_else(|| format!("Field {full} does not exist in the table schema"))?;
    let children = match field.data_type() {
        DataType::Struct(c) => Some(c.clone()),
        DataType::List(item) => match item.data_type() {
            DataType::Struct(c) => Some(c.clone()),
            _ => None,
        },
        _ => None,
    };
    let slot = match keep.iter().position(|(j, _)| *j == i) {
        Some(p) => p,
        None => {
            keep.push((i, Keep::Children(Vec::new())));
            keep.len() - 1
        }
    };
    if rest.is_empty() {
        keep[slot].1 = Keep::All;
        return Ok(());
    }
    let Some(children) = children else {
        return Err(format!("Field {full}: {first} is not a RECORD"));
    };
    match &mut keep[slot].1 {
        Keep::All => Ok(()),
        Keep::Children(inner) => insert(inner, &children, rest, full),
    }
}

fn sort(keep: &mut [(usize, Keep)]) {
    keep.sort_by_key(|(i, _)| *i);
    for (_, k) in keep.iter_mut() {
        if let Keep::Children(c) = k {
            sort(c);
        }
    }
}

fn project_field(field: &Field, keep: &Keep) -> Field {
    match keep {
        Keep::All => field.clone(),
        Keep::Children(children) => match field.data_type() {
            DataType::Struct(fields) => {
                let kept: Vec<Field> = children.iter().map(|(i, k)| project_field(&fields[*i], k)).collect();
                field.clone().with_data_type(DataType::Struct(Fields::from(kept)))
            }
            DataType::List(item) => {
                let item = project_field(item, keep);
                field.clone().with_data_type(DataType::List(Arc::new(item)))
            }
            _ => field.clone(),
        },
    }
}

fn project_array(array: &ArrayRef, field: &Field, keep: &Keep) -> ArrayRef {
    match keep {
        Keep::All => array.clone(),
        Keep::Children(children) => match field.data_type() {
            DataType::Struct(fields) => {
                let s = array.as_struct();
                let kept: Vec<Field> = children.iter().map(|(i, k)| project_field(&fields[*i], k)).collect();
                let columns: Vec<ArrayRef> =
                    children.iter().map(|(i, k)| project_array(s.column(*i), &fields[*i], k)).collect();
                Arc::new(StructArray::new(Fields::from(kept), columns, s.nulls().cloned()))
            }
            DataType::List(item) => {
                let l = array.as_list::<i32>();
                let values = project_array(l.values(), item, keep);
                let item = Arc::new(project_field(item, keep));
                Arc::new(ListArray::new(item, l.offsets().clone(), values, l.nulls().cloned()))
            }
            _ => array.clone(),
        },
    }
}

impl Projection {
    /// Checks `selected` (`a`, `rec.b`) against `schema`. Output order is the table's, as in
    /// BigQuery ("The output field order is unrelated to the order of fields in selected_fields").
    pub fn new(schema: &SchemaRef, selected: &[String]) -> Result<Projection, String> {
        let mut keep = Vec::new();
        if selected.is_empty() {
            keep = (0..schema.fields().len()).map(|i| (i, Keep::All)).collect();
        }
        for name in selected {
            let path: Vec<&str> = name.split('.').map(str::trim).collect();
            insert(&mut keep, schema.fields(), &path, name)?;
        }
        sort(&mut keep);
        let fields: Vec<Field> = keep.iter().map(|(i, k)| project_field(&schema.fields()[*i], k)).collect();
        Ok(Projection { keep, schema: Arc::new(Schema::new(fields)) })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn apply(&self, batch: &RecordBatch) -> RecordBatch {
        let source = batch.schema();
        let columns: Vec<ArrayRef> =
            self.keep.iter().map(|(i, k)| project_array(batch.column(*i), source.field(*i), k)).collect();
        RecordBatch::try_new(self.schema.clone(), columns)
            .unwrap_or_else(|_| RecordBatch::new_empty(self.schema.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// REST schema (tables.get, query results)

/// `{"name", "type", "mode", "fields"}` as BigQuery's REST API describes a field.
pub fn rest_field(f: &Field) -> Value {
    let ext = f.metadata().get(EXT_NAME).map(String::as_str).unwrap_or_default();
    let (inner, mode) = match f.data_type() {
        DataType::List(item) => (item.as_ref().clone(), "REPEATED"),
        _ => (f.clone(), if f.is_nullable() { "NULLABLE" } else { "REQUIRED" }),
    };
    let ty = match inner.data_type() {
        DataType::Boolean => "BOOLEAN",
        DataType::Int64 => "INTEGER",
        DataType::Float64 => "FLOAT",
        DataType::Utf8
            if ext.ends_with("geography")
                || inner.metadata().get(EXT_NAME).is_some_and(|e| e.ends_with("geography")) =>
        {
            "GEOGRAPHY"
        }
        DataType::Utf8
            if ext.ends_with("json") || inner.metadata().get(EXT_NAME).is_some_and(|e| e.ends_with("json")) =>
        {
            "JSON"
        }
        DataType::Utf8 => "STRING",
        DataType::Binary => "BYTES",
        DataType::Date32 => "DATE",
        DataType::Time64(_) => "TIME",
        DataType::Timestamp(_, None) => "DATETIME",
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP",
        DataType::Decimal128(..) => "NUMERIC",
        DataType::Decimal256(..) => "BIGNUMERIC",
        DataType::Struct(_) => "RECORD",
        _ => "STRING",
    };
    let mut v = json!({ "name": f.name(), "type": ty, "mode": mode });
    if let DataType::Struct(children) = inner.data_type() {
        v["fields"] = Value::Array(children.iter().map(|c| rest_field(c)).collect());
    }
    v
}

pub fn rest_schema(schema: &Schema) -> Value {
    json!({ "fields": schema.fields().iter().map(|f| rest_field(f)).collect::<Vec<_>>() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::synthetic::{SyntheticOptions, SyntheticSource, schema};

    #[test]
    fn synthetic_schema_is_already_bigquery_shaped() {
        let s = schema(false);
        for f in s.fields() {
            assert_eq!(&bigquery_field(f).unwrap(), f.as_ref(), "{}", f.name());
        }
        let batch = SyntheticSource::new(SyntheticOptions::default()).batch(0, 100);
        for (c, f) in batch.columns().iter().zip(s.fields()) {
            assert_eq!(&convert(c, f).unwrap(), c);
        }
    }

    #[test]
    fn parquet_types_map_to_bigquery_types() {
        let cases = [
            (DataType::Int32, DataType::Int64),
            (DataType::UInt16, DataType::Int64),
            (DataType::Float32, DataType::Float64),
            (DataType::LargeUtf8, DataType::Utf8),
            (DataType::Date64, DataType::Date32),
            (DataType::Time32(TimeUnit::Millisecond), DataType::Time64(TimeUnit::Microsecond)),
            (
                DataType::Timestamp(TimeUnit::Nanosecond, Some("+02:00".into())),
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ),
            (DataType::Decimal128(10, 2), DataType::Decimal128(38, 9)),
            (DataType::Decimal128(38, 20), DataType::Decimal256(76, 38)),
        ];
        for (from, to) in cases {
            assert_eq!(bigquery_field(&Field::new("c", from.clone(), true)).unwrap().data_type(), &to, "{from}");
        }
        let dt = bigquery_field(&Field::new("c", DataType::Timestamp(TimeUnit::Millisecond, None), false)).unwrap();
        assert_eq!(dt.metadata()[EXT_NAME], "google:sqlType:datetime");
        assert!(!dt.is_nullable());
        assert!(bigquery_field(&Field::new("c", DataType::Duration(TimeUnit::Second), true)).is_err());

        let ints: ArrayRef = Arc::new(arrow_array::Int32Array::from(vec![Some(1), None, Some(-3)]));
        let out = convert(&ints, &Field::new("c", DataType::Int64, true)).unwrap();
        assert_eq!(out.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), [Some(1), None, Some(-3)]);
        let dec: ArrayRef = Arc::new(Decimal128Array::from(vec![Some(150)]).with_precision_and_scale(10, 2).unwrap());
        let out = convert(&dec, &Field::new("c", DataType::Decimal128(38, 9), true)).unwrap();
        assert_eq!(out.as_primitive::<Decimal128Type>().value(0), 1_500_000_000);
    }

    #[test]
    fn projections_keep_table_order_and_nested_paths() {
        let s = schema(false);
        let p = Projection::new(&s, &["record.b".into(), "id".into(), "string_col".into()]).unwrap();
        let names: Vec<&str> = p.schema().fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "string_col", "record"]);
        match p.schema().field(2).data_type() {
            DataType::Struct(c) => assert_eq!(c.len(), 1),
            other => panic!("{other}"),
        }
        let batch = SyntheticSource::new(SyntheticOptions::default()).batch(0, 10);
        let out = p.apply(&batch);
        assert_eq!(out.num_columns(), 3);
        assert_eq!(out.num_rows(), 10);
        assert!(Projection::new(&s, &["nope".into()]).unwrap_err().contains("nope"));
        assert!(Projection::new(&s, &["id.x".into()]).is_err());
        let all = Projection::new(&s, &[]).unwrap();
        assert_eq!(all.schema(), &s);
    }

    #[test]
    fn rest_schema_uses_legacy_type_names() {
        let v = rest_schema(&schema(false));
        let fields = v["fields"].as_array().unwrap();
        assert_eq!(fields[0], json!({"name": "id", "type": "INTEGER", "mode": "REQUIRED"}));
        let find = |n: &str| fields.iter().find(|f| f["name"] == n).unwrap().clone();
        assert_eq!(find("geography_col")["type"], "GEOGRAPHY");
        assert_eq!(find("datetime_col")["type"], "DATETIME");
        assert_eq!(find("int64_list")["mode"], "REPEATED");
        assert_eq!(find("record")["fields"].as_array().unwrap().len(), 3);
    }
}
