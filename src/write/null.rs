//! `null:`: a sink that keeps nothing and counts bytes, for benchmarks and dry runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{PutMode, Sink, Upload, WriteError};

#[derive(Debug, Default)]
pub struct NullSink {
    bytes: Arc<AtomicU64>,
}

impl NullSink {
    /// Bytes completed uploads have carried so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[async_trait::async_trait]
impl Sink for NullSink {
    fn describe(&self) -> String {
        "null:".to_string()
    }
    async fn check(&self) -> Result<(), WriteError> {
        Ok(())
    }
    async fn exists(&self, _name: &str) -> Result<bool, WriteError> {
        Ok(false)
    }
    async fn get(&self, _name: &str) -> Result<Option<Bytes>, WriteError> {
        Ok(None)
    }
    async fn create(&self, _name: &str, _mode: PutMode) -> Result<Box<dyn Upload>, WriteError> {
        Ok(Box::new(NullUpload { total: self.bytes.clone(), bytes: 0 }))
    }
}

struct NullUpload {
    total: Arc<AtomicU64>,
    bytes: u64,
}

#[async_trait::async_trait]
impl Upload for NullUpload {
    async fn put_part(&mut self, data: Bytes) -> Result<(), WriteError> {
        self.bytes += data.len() as u64;
        Ok(())
    }
    async fn complete(self: Box<Self>) -> Result<u64, WriteError> {
        self.total.fetch_add(self.bytes, Ordering::Relaxed);
        Ok(self.bytes)
    }
    async fn abort(self: Box<Self>) -> Result<(), WriteError> {
        Ok(())
    }
}
