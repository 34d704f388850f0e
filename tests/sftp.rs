//! The SFTP sink against a real OpenSSH server (tests/common/sshd.rs): the sink conformance
//! suite, authentication, host key verification, faults injected by a TCP proxy, and the
//! end-to-end export through the binary.

mod common;

use std::sync::Arc;

use bq2sftp::write::{PutMode, Sink, TargetOptions, WriteError};
use common::conformance::{self, payload, upload};
use common::sshd::{Sshd, SshdOptions};

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let sshd = Sshd::start();
            conformance::$name(sshd.sink(""), &sshd.root).await;
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
