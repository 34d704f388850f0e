//! Which BigQuery failures are worth another attempt, and how long to wait first.
//!
//! The rules are those of Google's clients (research notes §1, "Default retry policy" and
//! "Resume logic"):
//!
//! - CreateReadSession / SplitReadStream: retry `UNAVAILABLE` and `DEADLINE_EXCEEDED`, backoff
//!   from 0.1 s ×1.3 up to 60 s (`bigquerystorage_grpc_service_config.json`).
//! - ReadRows, mid-stream: resume at the row offset on `UNAVAILABLE`; `UNKNOWN` (a transport
//!   failure with "No status received", python-bigquery-storage#262); `INTERNAL` whose message
//!   names `RST_STREAM`, "Received Rst Stream", "unexpected EOS" or "Stream removed"
//!   (google-cloud-python#9994, java-bigquerystorage `Errors.isRetryableInternalStatus`, the
//!   Storage API doc); `DEADLINE_EXCEEDED`; `ABORTED`/`CANCELLED` coming from the server (Go's
//!   `retryReadRows`); and `RESOURCE_EXHAUSTED` only when it carries a `google.rpc.RetryInfo`,
//!   after exactly that delay (python-bigquery-storage PR #366).
//! - `FAILED_PRECONDITION` "session expired" is not retried: sessions live 6 hours and a new
//!   one is needed (spark-bigquery-connector#1316). Go's client retries every
//!   FAILED_PRECONDITION; we do not, because looping on an expired session only hides it.
//!
//! Unlike Python's reader, attempts are bounded: [`RetryPolicy::max_attempts`] consecutive
//! failures without a row of progress end the read with the last error.

use std::time::Duration;

use prost::Message;
use tonic::{Code, Status};

use super::proto::{RETRY_INFO_TYPE_URL, rpc};

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in a row without progress before giving up (the first attempt counts).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(60),
            multiplier: 1.3,
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `failed + 1`, after `failed` failures: exponential, capped, with
    /// up to 20% jitter downwards so that many streams failing together do not retry in step.
    pub fn backoff(&self, failed: u32) -> Duration {
        let exp = self.multiplier.max(1.0).powi(failed.saturating_sub(1).min(64) as i32);
        let base = self.initial_backoff.as_secs_f64() * exp;
        let capped = base.min(self.max_backoff.as_secs_f64());
        Duration::from_secs_f64(capped * (1.0 - 0.2 * jitter()))
    }
}

/// A number in [0, 1) that differs between calls, without a random-number crate.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What to do about a failed call.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Try again; after the server's delay when it gave one (RetryInfo), else after backoff.
    Retry {
        server_delay: Option<Duration>,
    },
    /// The read session expired: a new export (a new session) is needed.
    SessionExpired,
    /// The token was refused: fetch a new one and try once more.
    Reauthenticate,
    Fatal,
}

/// The `google.rpc.RetryInfo` delay in a status's `grpc-status-details-bin`, if any.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    let details = rpc::Status::decode(status.details()).ok()?;
    details.details.iter().find(|d| d.type_url == RETRY_INFO_TYPE_URL).and_then(|any| {
        let info = rpc::RetryInfo::decode(any.value.as_slice()).ok()?;
        let d = info.retry_delay?;
        (d.seconds >= 0 && d.nanos >= 0).then(|| Duration::new(d.seconds as u64, d.nanos as u32))
    })
}

/// Whether a FAILED_PRECONDITION says the session expired ("... session expired at ...",
/// spark-bigquery-connector#1316; the Storage API doc's "Stream expired").
pub fn is_session_expired(status: &Status) -> bool {
    let m = status.message().to_ascii_lowercase();
    status.code() == Code::FailedPrecondition && (m.contains("session expired") || m.contains("stream expired"))
}

fn internal_is_transient(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["rst_stream", "rst stream", "unexpected eos", "stream removed", "h2 protocol error", "connection reset"]
        .iter()
        .any(|needle| m.contains(needle))
}

/// For a ReadRows call (opening it or mid-stream).
pub fn classify_read(status: &Status) -> Disposition {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => {
            Disposition::Retry { server_delay: None }
        }
        Code::Internal if internal_is_transient(status.message()) => Disposition::Retry { server_delay: None },
        Code::ResourceExhausted => match retry_delay(status) {
            Some(d) => Disposition::Retry { server_delay: Some(d) },
            None => Disposition::Fatal,
        },
        Code::FailedPrecondition if is_session_expired(status) => Disposition::SessionExpired,
        Code::Unauthenticated => Disposition::Reauthenticate,
        _ => Disposition::Fatal,
    }
}

/// For CreateReadSession and SplitReadStream (unary calls).
pub fn classify_unary(status: &Status) -> Disposition {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded => Disposition::Retry { server_delay: None },
        Code::ResourceExhausted => match retry_delay(status) {
            Some(d) => Disposition::Retry { server_delay: Some(d) },
            None => Disposition::Fatal,
        },
        Code::Unauthenticated => Disposition::Reauthenticate,
        _ => Disposition::Fatal,
    }
}

/// A RESOURCE_EXHAUSTED status carrying RetryInfo, as BigQuery sends it (and the emulator).
pub fn status_with_retry_info(code: Code, message: impl Into<String>, delay: Duration) -> Status {
    let message = message.into();
    let info = rpc::RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    let details = rpc::Status {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any { type_url: RETRY_INFO_TYPE_URL.to_string(), value: info.encode_to_vec() }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_attempts: 5,
        };
        assert!(p.backoff(1) <= Duration::from_millis(100) && p.backoff(1) >= Duration::from_millis(80));
        assert!(p.backoff(3) >= Duration::from_millis(320) && p.backoff(3) <= Duration::from_millis(400));
        assert!(p.backoff(30) <= Duration::from_secs(1));
    }

    #[test]
    fn read_errors_are_classified_like_googles_clients() {
        let retry = Disposition::Retry { server_delay: None };
        assert_eq!(classify_read(&Status::unavailable("x")), retry);
        assert_eq!(classify_read(&Status::unknown("No status received")), retry);
        assert_eq!(classify_read(&Status::internal("Received RST_STREAM with error code 2")), retry);
        assert_eq!(classify_read(&Status::internal("Received unexpected EOS on DATA frame from server")), retry);
        assert_eq!(classify_read(&Status::internal("division by zero")), Disposition::Fatal);
        assert_eq!(classify_read(&Status::resource_exhausted("quota")), Disposition::Fatal);
        assert_eq!(classify_read(&Status::invalid_argument("bad")), Disposition::Fatal);
        assert_eq!(classify_read(&Status::permission_denied("no")), Disposition::Fatal);
        assert_eq!(classify_read(&Status::unauthenticated("no")), Disposition::Reauthenticate);
        let expired = Status::failed_precondition(
            "there was an error operating on 'projects/p/locations/us/sessions/s/streams/x': session expired at 2024-11-23T09:59:13+00:00",
        );
        assert_eq!(classify_read(&expired), Disposition::SessionExpired);
        assert_eq!(
            classify_read(&Status::failed_precondition("offset 100 has not been allocated yet")),
            Disposition::Fatal
        );
    }

    #[test]
    fn retry_info_delay_is_honoured() {
        let s = status_with_retry_info(Code::ResourceExhausted, "slow down", Duration::from_millis(1500));
        assert_eq!(retry_delay(&s), Some(Duration::from_millis(1500)));
        assert_eq!(classify_read(&s), Disposition::Retry { server_delay: Some(Duration::from_millis(1500)) });
        assert_eq!(classify_unary(&s), Disposition::Retry { server_delay: Some(Duration::from_millis(1500)) });
        assert_eq!(classify_unary(&Status::internal("RST_STREAM")), Disposition::Fatal);
    }
}
