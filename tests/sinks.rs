//! Sink tests: the conformance suite against the local-directory sink, plus the directory
//! sink's own refusals (missing, not a directory, not writable).

mod common;

use std::sync::Arc;

use bq2sftp::write::dir::{DirOptions, DirSink};
use bq2sftp::write::{Sink, TargetOptions, WriteError};
use common::conformance;

fn dir_sink(path: &std::path::Path) -> Arc<dyn Sink> {
    Arc::new(DirSink::new(DirOptions { path: path.to_path_buf() }, TargetOptions::default()))
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let tmp = tempfile::tempdir().unwrap();
            conformance::$name(dir_sink(tmp.path()), tmp.path()).await;
        }
    )*};
}

conformance_tests!(
    publishes_whole_file,
    invisible_until_complete,
    abort_leaves_nothing,
    overwrite_rules,
    empty_file,
    concurrent_uploads,
    check_passes,
);

#[tokio::test]
async fn missing_directory_is_refused_unless_create_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("a/b");
    let err = dir_sink(&target).check().await.unwrap_err();
    assert!(matches!(err, WriteError::DirMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("--create-dirs"));
    let sink =
        DirSink::new(DirOptions { path: target.clone() }, TargetOptions { create_dirs: true, ..Default::default() });
    sink.check().await.unwrap();
    assert!(target.is_dir());
    assert!(common::files_in(&target).is_empty(), "the writability probe is removed");
}

#[tokio::test]
async fn a_file_is_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let err = dir_sink(&file).check().await.unwrap_err();
    assert!(matches!(err, WriteError::NotADirectory { .. }), "{err:?}");
}

#[tokio::test]
async fn unwritable_directory_is_a_permission_error() {
    // Root ignores mode bits, but not sysfs; others get a read-only directory.
    let tmp = tempfile::tempdir().unwrap();
    let target = if nix_is_root() {
        std::path::PathBuf::from("/sys")
    } else {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp.path().join("ro");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o500)).unwrap();
        d
    };
    let err = dir_sink(&target).check().await.unwrap_err();
    assert!(err.is_permission(), "{err:?}");
    assert!(err.to_string().contains("permission denied"), "{err}");
}

fn nix_is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}
