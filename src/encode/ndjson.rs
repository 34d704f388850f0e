//! Newline-delimited JSON in the style of BigQuery's `NEWLINE_DELIMITED_JSON` export: one
//! object per row, keys in schema order, NULL values left out, values rendered by
//! [`super::json`] (INT64 as strings, TIMESTAMP as text, STRUCT as objects, ARRAY as arrays).

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use super::json::{self, JsonColumn};
use super::{EncodeError, Encoder, Format};

pub const FORMAT: Format = Format {
    name: "ndjson",
    extension: ".json",
    splittable: true,
    internal_compression: false,
    build: |schema, _options, _part| Ok(Box::new(Writer::try_new(schema.clone())?)),
};

pub struct Writer {
    schema: SchemaRef,
    /// Each column's `"name":` prefix, escaped once.
    keys: Vec<Vec<u8>>,
    out: Vec<u8>,
    row_hint: usize,
}

impl Writer {
    pub fn try_new(schema: SchemaRef) -> Result<Self, EncodeError> {
        let keys = schema
            .fields()
            .iter()
            .map(|f| {
                let mut k = Vec::new();
                json::write_str(&mut k, f.name().as_bytes());
                k.push(b':');
                k
            })
            .collect();
        Ok(Writer { schema, keys, out: Vec::new(), row_hint: 64 })
    }
}

impl Encoder for Writer {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), EncodeError> {
        let fields = self
            .keys
            .iter()
            .zip(self.schema.fields().iter().zip(batch.columns()))
            .map(|(key, (field, array))| Ok((key.clone(), JsonColumn::new("ndjson", field, array)?)))
            .collect::<Result<Vec<_>, EncodeError>>()?;
        let start = self.out.len();
        self.out.reserve(batch.num_rows() * self.row_hint);
        for row in 0..batch.num_rows() {
            json::write_object(&mut self.out, &fields, row);
            self.out.push(b'\n');
        }
        if batch.num_rows() > 0 {
            self.row_hint = (self.out.len() - start) / batch.num_rows() + 1;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), EncodeError> {
        Ok(())
    }

    fn drain_into(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
    }
}
