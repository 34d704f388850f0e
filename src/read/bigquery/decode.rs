//! Arrow IPC decoding of Storage Read API payloads.
//!
//! BigQuery frames each `bytes` field as ONE encapsulated IPC message (Arrow ≥ 0.15 format:
//! `0xFFFFFFFF`, int32 metadata length, flatbuffer `Message`, padding, body), not as an IPC
//! stream: `ReadSession.arrow_schema.serialized_schema` is a Schema message and each
//! `ArrowRecordBatch.serialized_record_batch` a RecordBatch message, with no end-of-stream
//! marker (research notes §2; Python's reader calls `pyarrow.ipc.read_record_batch(buf,
//! schema)` per response). So the schema is decoded once per session and every batch message
//! is decoded against it directly, which also works for streams whose ReadRows calls never
//! carry a schema (resumed calls, empty streams) and for a plan made by another process.
//!
//! Decoding is zero-copy over the received `Bytes` unless a buffer is misaligned or compressed
//! (LZ4_FRAME / ZSTD body compression, read from the message's `compression` field).

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::MessageHeader;
use arrow_schema::{ArrowError, Schema, SchemaRef};
use bytes::Bytes;

/// The IPC continuation marker that opens an encapsulated message since Arrow 0.15.
const CONTINUATION: [u8; 4] = [0xFF; 4];

/// Decodes a session's `serialized_schema` (one IPC Schema message).
pub fn decode_schema(serialized: &[u8]) -> Result<Schema, ArrowError> {
    arrow_ipc::convert::try_schema_from_ipc_buffer(serialized)
}

/// Splits an encapsulated message into (metadata flatbuffer, body) offsets.
fn frame(buf: &[u8]) -> Result<(usize, usize), ArrowError> {
    let (start, len) = match buf {
        [a, b, c, d, rest @ ..] if [*a, *b, *c, *d] == CONTINUATION => {
            let len = rest.get(..4).ok_or_else(|| ArrowError::IpcError("truncated IPC message".into()))?;
            (8, i32::from_le_bytes([len[0], len[1], len[2], len[3]]))
        }
        // Pre-0.15 framing: just the length.
        [a, b, c, d, ..] => (4, i32::from_le_bytes([*a, *b, *c, *d])),
        _ => return Err(ArrowError::IpcError("IPC message shorter than its header".into())),
    };
    let len = usize::try_from(len).map_err(|_| ArrowError::IpcError("negative IPC metadata length".into()))?;
    if buf.len() < start + len {
        return Err(ArrowError::IpcError(format!(
            "IPC message metadata needs {} bytes, the payload has {}",
            start + len,
            buf.len()
        )));
    }
    Ok((start, len))
}

/// Decodes RecordBatch messages of one session.
#[derive(Debug, Clone)]
pub struct BatchDecoder {
    schema: SchemaRef,
    dictionaries: Arc<HashMap<i64, arrow_array::ArrayRef>>,
}

impl BatchDecoder {
    pub fn new(schema: SchemaRef) -> Self {
        BatchDecoder { schema, dictionaries: Arc::default() }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Decodes one `serialized_record_batch`.
    pub fn decode(&self, message: Bytes) -> Result<RecordBatch, ArrowError> {
        let buf = Buffer::from(message);
        let (start, len) = frame(buf.as_slice())?;
        let meta = &buf.as_slice()[start..start + len];
        let msg = arrow_ipc::root_as_message(meta)
            .map_err(|e| ArrowError::IpcError(format!("not an Arrow IPC message: {e}")))?;
        if msg.header_type() != MessageHeader::RecordBatch {
            return Err(ArrowError::IpcError(format!(
                "expected an IPC RecordBatch message, got {:?}",
                msg.header_type()
            )));
        }
        let batch =
            msg.header_as_record_batch().ok_or_else(|| ArrowError::IpcError("empty RecordBatch header".into()))?;
        let body_len =
            usize::try_from(msg.bodyLength()).map_err(|_| ArrowError::IpcError("negative IPC body length".into()))?;
        let body_start = start + len;
        if buf.len() < body_start + body_len {
            return Err(ArrowError::IpcError(format!(
                "IPC body needs {body_len} bytes, the payload has {}",
                buf.len() - body_start
            )));
        }
        let body = buf.slice_with_length(body_start, body_len);
        arrow_ipc::reader::read_record_batch(
            &body,
            batch,
            self.schema.clone(),
            &self.dictionaries,
            None,
            &msg.version(),
        )
    }
}

/// Encodes a schema as one encapsulated IPC Schema message, as BigQuery serialises it.
pub fn encode_schema(schema: &Schema) -> Vec<u8> {
    let options = arrow_ipc::writer::IpcWriteOptions::default();
    let generator = arrow_ipc::writer::IpcDataGenerator::default();
    let mut tracker = arrow_ipc::writer::DictionaryTracker::new(false);
    let encoded = generator.schema_to_bytes_with_dictionary_tracker(schema, &mut tracker, &options);
    let mut out = Vec::with_capacity(encoded.ipc_message.len() + 8);
    // Writing to a Vec cannot fail.
    let _ = arrow_ipc::writer::write_message(&mut out, encoded, &options);
    out
}

/// Arrow IPC body compression codecs BigQuery offers (`ArrowSerializationOptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferCompression {
    None,
    Lz4Frame,
    Zstd,
}

/// Encodes a batch as one encapsulated IPC RecordBatch message with optional body compression.
pub struct BatchEncoder {
    options: arrow_ipc::writer::IpcWriteOptions,
    generator: arrow_ipc::writer::IpcDataGenerator,
    context: arrow_ipc::writer::IpcWriteContext,
}

impl BatchEncoder {
    pub fn new(compression: BufferCompression) -> Result<Self, ArrowError> {
        let codec = match compression {
            BufferCompression::None => None,
            BufferCompression::Lz4Frame => Some(arrow_ipc::CompressionType::LZ4_FRAME),
            BufferCompression::Zstd => Some(arrow_ipc::CompressionType::ZSTD),
        };
        let options = arrow_ipc::writer::IpcWriteOptions::default().try_with_compression(codec)?;
        Ok(BatchEncoder {
            options,
            generator: arrow_ipc::writer::IpcDataGenerator::default(),
            context: arrow_ipc::writer::IpcWriteContext::default(),
        })
    }

    pub fn encode(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        let mut tracker = arrow_ipc::writer::DictionaryTracker::new(false);
        let (dictionaries, encoded) = self.generator.encode(batch, &mut tracker, &self.options, &mut self.context)?;
        if !dictionaries.is_empty() {
            return Err(ArrowError::IpcError("dictionary-encoded columns cannot be sent as one message".into()));
        }
        let mut out = Vec::with_capacity(encoded.ipc_message.len() + encoded.arrow_data.len() + 16);
        arrow_ipc::writer::write_message(&mut out, encoded, &self.options)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::synthetic::{SyntheticOptions, SyntheticSource};

    #[test]
    fn round_trips_every_type_with_each_codec() {
        let src = SyntheticSource::new(SyntheticOptions { flat: false, ..Default::default() });
        let batch = src.batch(0, 2000);
        let schema_bytes = encode_schema(&batch.schema());
        assert_eq!(&schema_bytes[..4], &CONTINUATION, "Arrow ≥0.15 encapsulation");
        let schema = Arc::new(decode_schema(&schema_bytes).unwrap());
        assert_eq!(schema, batch.schema(), "field metadata survives");
        for codec in [BufferCompression::None, BufferCompression::Lz4Frame, BufferCompression::Zstd] {
            let bytes = BatchEncoder::new(codec).unwrap().encode(&batch).unwrap();
            let decoded = BatchDecoder::new(schema.clone()).decode(Bytes::from(bytes)).unwrap();
            assert_eq!(decoded, batch, "{codec:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let schema = SyntheticSource::new(SyntheticOptions::default()).batch(0, 1).schema();
        let d = BatchDecoder::new(schema.clone());
        for input in [&b""[..], &[0xFF; 4], &[0xFF, 0xFF, 0xFF, 0xFF, 100, 0, 0, 0, 1, 2], &[1, 2, 3, 4, 5, 6, 7, 8]] {
            assert!(d.decode(Bytes::copy_from_slice(input)).is_err());
        }
        // A schema message where a batch is expected.
        assert!(d.decode(Bytes::from(encode_schema(&schema))).is_err());
    }
}
