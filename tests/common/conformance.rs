//! The conformance suite every sink passes: the same upload, publish, abort and overwrite
//! behaviour whether files land in a local directory or on an SFTP server (object_store's
//! `integration.rs` is the model). Each check takes the sink and the local directory where its
//! files become visible (the sshd test server serves a local temp dir, so SFTP is checked the
//! same way), and asserts what a consumer of that directory would see.

use std::path::Path;
use std::sync::Arc;

use bq2sftp::write::{PutMode, Sink, WriteError};
use bytes::Bytes;

use super::files_in;

/// Deterministic bytes of a given length (not compressible into nothing, not all zeros).
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Uploads `data` in parts of the given sizes (cycled) and completes.
pub async fn upload(
    sink: &dyn Sink,
    name: &str,
    data: &[u8],
    parts: &[usize],
    mode: PutMode,
) -> Result<u64, WriteError> {
    let mut up = sink.create(name, mode).await?;
    let mut at = 0;
    let mut sizes = parts.iter().cycle();
    while at < data.len() {
        let n = (*sizes.next().unwrap_or(&data.len())).clamp(1, data.len() - at);
        up.put_part(Bytes::copy_from_slice(&data[at..at + n])).await?;
        at += n;
    }
    up.complete().await
}

/// A completed upload is published whole under its name and nothing else remains.
pub async fn publishes_whole_file(sink: Arc<dyn Sink>, dir: &Path) {
    let data = payload(3 * 1024 * 1024 + 17, 1);
    let n = upload(sink.as_ref(), "whole.bin", &data, &[65_536, 1_000_000, 7], PutMode::Create).await.unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(std::fs::read(dir.join("whole.bin")).unwrap(), data);
    assert_eq!(files_in(dir), ["whole.bin"], "no partial left behind");
    assert!(sink.exists("whole.bin").await.unwrap());
    assert!(!sink.exists("missing.bin").await.unwrap());
}

/// Until `complete`, the final name does not exist: a consumer never sees a half file.
pub async fn invisible_until_complete(sink: Arc<dyn Sink>, dir: &Path) {
    let mut up = sink.create("later.bin", PutMode::Create).await.unwrap();
    up.put_part(Bytes::from(payload(100_000, 2))).await.unwrap();
    assert!(!dir.join("later.bin").exists());
    assert!(!sink.exists("later.bin").await.unwrap());
    up.complete().await.unwrap();
    assert!(dir.join("later.bin").exists());
}

/// `abort` leaves no trace, and a dropped upload (a cancelled job) leaves no final file.
pub async fn abort_leaves_nothing(sink: Arc<dyn Sink>, dir: &Path) {
    let mut up = sink.create("aborted.bin", PutMode::Create).await.unwrap();
    up.put_part(Bytes::from(payload(200_000, 3))).await.unwrap();
    up.abort().await.unwrap();
    let mut dropped = sink.create("dropped.bin", PutMode::Create).await.unwrap();
    dropped.put_part(Bytes::from(payload(1000, 4))).await.unwrap();
    drop(dropped);
    assert!(!dir.join("aborted.bin").exists() && !dir.join("dropped.bin").exists());
    let left: Vec<_> = files_in(dir).into_iter().filter(|n| n.starts_with("aborted")).collect();
    assert!(left.is_empty(), "abort left {left:?}");
}

/// An existing file is refused without overwrite (and kept intact), replaced with it.
pub async fn overwrite_rules(sink: Arc<dyn Sink>, dir: &Path) {
    let first = payload(5000, 5);
    let second = payload(7000, 6);
    upload(sink.as_ref(), "same.bin", &first, &[4096], PutMode::Create).await.unwrap();
    let refused = upload(sink.as_ref(), "same.bin", &second, &[4096], PutMode::Create).await;
    assert!(matches!(refused, Err(WriteError::Exists { .. })), "got {refused:?}");
    assert!(refused.unwrap_err().to_string().contains("--overwrite"));
    assert_eq!(std::fs::read(dir.join("same.bin")).unwrap(), first, "refusal kept the original");
    upload(sink.as_ref(), "same.bin", &second, &[4096], PutMode::Overwrite).await.unwrap();
    assert_eq!(std::fs::read(dir.join("same.bin")).unwrap(), second);
    assert!(files_in(dir).iter().all(|n| !n.ends_with(".partial")));
}

/// A file with no parts is an empty file (a header-less empty export).
pub async fn empty_file(sink: Arc<dyn Sink>, dir: &Path) {
    let n = sink.create("empty.csv", PutMode::Create).await.unwrap().complete().await.unwrap();
    assert_eq!(n, 0);
    assert_eq!(std::fs::metadata(dir.join("empty.csv")).unwrap().len(), 0);
}

/// Many uploads at once keep their bytes apart.
pub async fn concurrent_uploads(sink: Arc<dyn Sink>, dir: &Path) {
    let tasks: Vec<_> = (0..12u64)
        .map(|i| {
            let sink = sink.clone();
            tokio::spawn(async move {
                let data = payload(150_000 + i as usize * 10_007, 100 + i);
                upload(sink.as_ref(), &format!("c-{i:02}.bin"), &data, &[32_768, 50_001], PutMode::Create)
                    .await
                    .unwrap();
                data
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let data = t.await.unwrap();
        assert_eq!(std::fs::read(dir.join(format!("c-{i:02}.bin"))).unwrap(), data, "file {i}");
    }
}

/// `check` passes on a usable target.
pub async fn check_passes(sink: Arc<dyn Sink>, _dir: &Path) {
    sink.check().await.unwrap();
}
