//! Secret values and the references that name them: one type for every password, passphrase,
//! private key and token the tool handles, and the resolution of `env:`, `file:` and
//! `gcp-secret:` references.
//!
//! A [`Secret`] prints `***` through `Debug` and `Display`, so configuration structs can derive
//! `Debug` and land in logs and error reports without leaking; the plain text is reachable only
//! through [`Secret::expose`], which makes every use visible in review, and is wiped from memory
//! when the value is dropped.
//!
//! Any secret option takes either the value itself or a reference:
//!
//! - `env:NAME`: the environment variable `NAME`;
//! - `file:PATH`: the file's contents, less one trailing newline (files written by `echo` or an
//!   editor end with one; `echo -n`, as Secret Manager guides use, does not);
//! - `gcp-secret:projects/P/secrets/S[/versions/V]` (also `projects/P/locations/L/secrets/S…`):
//!   Secret Manager's `versions.access` REST method, version `latest` unless named. The reply's
//!   `payload.data` is base64 and is checked against `payload.dataCrc32c` (CRC32C, Castagnoli,
//!   as a decimal int64 string), as Google's client libraries recommend, before it is used.
//!   The request carries the job's Google credentials with the `cloud-platform` scope; the
//!   caller needs `roles/secretmanager.secretAccessor` on that secret.
//!
//! `env:` and `file:` resolve while the configuration is validated (no network); `gcp-secret:`
//! references stay as they are until [`SecretManager::resolve`] runs just before the first
//! connection, so that `--print-config` and validation never touch the network.
//! Reference: https://cloud.google.com/secret-manager/docs/reference/rest/v1/projects.secrets.versions/access

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use crate::error::ConfigError;
use crate::read::bigquery::args::is_loopback_url;
use crate::read::bigquery::auth::{AuthError, AuthOptions, SCOPE_CLOUD_PLATFORM, TokenProvider};
use crate::read::bigquery::retry::RetryPolicy;

pub const DEFAULT_SECRET_MANAGER_ENDPOINT: &str = "https://secretmanager.googleapis.com";
const GCP_PREFIX: &str = "gcp-secret:";

/// A string that must never be logged: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Reads a secret from a file, dropping one trailing newline.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        Ok(Secret(without_trailing_newline(std::fs::read_to_string(path)?)))
    }

    /// The plain value. Call only where it is handed to the library that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The Secret Manager version this value refers to, when it is a `gcp-secret:` reference
    /// still to be fetched.
    pub fn gcp_reference(&self) -> Option<&str> {
        self.0.strip_prefix(GCP_PREFIX)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

fn without_trailing_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

/// Whether an option value is a reference rather than a secret (so `--print-config` may show it).
pub fn is_reference(value: &str) -> bool {
    ["env:", "file:", GCP_PREFIX].iter().any(|p| value.starts_with(p))
}

/// Resolves `env:` and `file:` references of option `flag` now; a `gcp-secret:` reference is
/// checked for shape and kept for [`SecretManager::resolve`]; any other value is the secret.
pub fn resolve_local(flag: &str, given: &Secret) -> Result<Secret, ConfigError> {
    let value = given.expose();
    if let Some(path) = value.strip_prefix("file:") {
        Secret::from_file(Path::new(path))
            .map_err(|e| ConfigError::invalid(format!("{flag} file:{path}"), format!("cannot read it: {e}")))
    } else if let Some(name) = value.strip_prefix("env:") {
        std::env::var(name)
            .map(Secret::new)
            .map_err(|_| ConfigError::invalid(format!("{flag} env:{name}"), "the variable is not set"))
    } else if let Some(name) = given.gcp_reference() {
        version_name(name).map_err(|problem| ConfigError::invalid(format!("{flag} {GCP_PREFIX}{name}"), problem))?;
        Ok(given.clone())
    } else {
        Ok(given.clone())
    }
}

/// The full version resource name of a `gcp-secret:` reference (`…/versions/latest` when no
/// version is given).
fn version_name(reference: &str) -> Result<String, String> {
    let parts: Vec<&str> = reference.split('/').collect();
    let ok_part = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let shape = match parts.as_slice() {
        ["projects", p, "secrets", s] | ["projects", p, "locations", _, "secrets", s] => ok_part(p) && ok_part(s),
        ["projects", p, "secrets", s, "versions", v] | ["projects", p, "locations", _, "secrets", s, "versions", v] => {
            ok_part(p) && ok_part(s) && ok_part(v)
        }
        _ => false,
    };
    if !shape {
        return Err("not a Secret Manager name; use gcp-secret:projects/PROJECT/secrets/NAME[/versions/VERSION]".into());
    }
    Ok(if parts[parts.len() - 2] == "versions" {
        reference.to_string()
    } else {
        format!("{reference}/versions/latest")
    })
}

/// Where `gcp-secret:` references are fetched from, and with which credentials.
#[derive(Debug, Clone)]
pub struct SecretManagerOptions {
    /// REST root, overridable for tests and regional endpoints.
    pub endpoint: String,
    /// The job's Google credentials; the scope is always `cloud-platform`.
    pub auth: AuthOptions,
}

impl SecretManagerOptions {
    /// Checks `endpoint`: a URL, and https unless it is on this machine (the request carries
    /// an access token).
    pub fn new(endpoint: impl Into<String>, auth: AuthOptions) -> Result<Self, ConfigError> {
        let endpoint = endpoint.into();
        let what = || format!("--secret-manager-endpoint {endpoint}");
        let url = url::Url::parse(&endpoint).map_err(|_| ConfigError::invalid(what(), "not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback_url(&endpoint) => {}
            "http" => {
                return Err(ConfigError::invalid(what(), "would send credentials in clear text; use https://"));
            }
            _ => return Err(ConfigError::invalid(what(), "not an http(s) URL")),
        }
        Ok(SecretManagerOptions { endpoint, auth })
    }

    /// Application Default Credentials and `BQ2SFTP_SECRET_MANAGER_ENDPOINT` or Google's
    /// endpoint: for commands without Google flags (`bq2sftp put`).
    pub fn from_env() -> Result<Self, ConfigError> {
        let endpoint = std::env::var("BQ2SFTP_SECRET_MANAGER_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_SECRET_MANAGER_ENDPOINT.to_string());
        Self::new(endpoint, AuthOptions::default())
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    #[error("cannot get Google credentials to read secret {name}: {source}")]
    Auth {
        name: String,
        #[source]
        source: AuthError,
    },
    #[error(
        "permission denied reading secret {name}: {message}; grant the job's service account \
         roles/secretmanager.secretAccessor on that secret"
    )]
    PermissionDenied { name: String, message: String },
    #[error("secret {name} not found: {message}; check the project, the secret name and the version")]
    NotFound { name: String, message: String },
    #[error("secret {name} cannot be read: {message}")]
    Unusable { name: String, message: String },
    /// The payload failed its CRC32C check: damaged in transit, worth another run.
    #[error("secret {name} arrived corrupt: {message}; run again")]
    Corrupt { name: String, message: String },
    #[error("Secret Manager at {endpoint} failed for {name}: {message}")]
    Unavailable { name: String, endpoint: String, message: String },
}

impl SecretError {
    /// A wrong reference (not found, disabled, not text): fix the configuration (exit 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, SecretError::NotFound { .. } | SecretError::Unusable { .. })
    }

    /// Transient: a corrupted payload or Secret Manager unavailable past the retries; running
    /// again is the fix (exit 6). Credentials and permissions are exit 3.
    pub fn is_transient(&self) -> bool {
        matches!(self, SecretError::Corrupt { .. } | SecretError::Unavailable { .. })
    }
}

#[derive(Deserialize)]
struct AccessResponse {
    payload: Option<Payload>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    /// The secret, base64: wiped when dropped.
    #[serde(default, deserialize_with = "wiped")]
    data: Zeroizing<String>,
    /// int64 in JSON, hence a string.
    data_crc32c: Option<String>,
}

fn wiped<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

/// A Secret Manager client that fetches each version once per run.
pub struct SecretManager {
    endpoint: String,
    timeout: Duration,
    http: reqwest::Client,
    tokens: TokenProvider,
    retry: RetryPolicy,
    cache: tokio::sync::Mutex<HashMap<String, Secret>>,
}

impl fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretManager").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl SecretManager {
    pub fn new(options: &SecretManagerOptions) -> Self {
        let mut auth = options.auth.clone();
        auth.scopes = vec![SCOPE_CLOUD_PLATFORM.to_string()];
        let http = reqwest::Client::builder()
            .timeout(auth.http_timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        SecretManager {
            endpoint: options.endpoint.trim_end_matches('/').to_string(),
            timeout: auth.http_timeout,
            retry: auth.retry.clone(),
            tokens: TokenProvider::new(auth, http.clone()),
            http,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Returns `value` itself, or the secret it refers to when it is a `gcp-secret:` reference.
    pub async fn resolve(&self, value: &Secret) -> Result<Secret, SecretError> {
        match value.gcp_reference() {
            Some(reference) => self.access(reference).await,
            None => Ok(value.clone()),
        }
    }

    /// Fetches one version: `GET {endpoint}/v1/{name}:access`.
    pub async fn access(&self, reference: &str) -> Result<Secret, SecretError> {
        let name = version_name(reference)
            .map_err(|message| SecretError::Unusable { name: reference.to_string(), message })?;
        if let Some(hit) = self.cache.lock().await.get(&name) {
            return Ok(hit.clone());
        }
        let token =
            self.tokens.token().await.map_err(|source| SecretError::Auth { name: name.clone(), source })?.ok_or_else(
                || SecretError::Auth {
                    name: name.clone(),
                    source: AuthError::NoCredentials { tried: "credentials are disabled".into() },
                },
            )?;
        let url = format!("{}/v1/{name}:access", self.endpoint);
        let mut attempt = 0;
        let body = loop {
            attempt += 1;
            let request = self.http.get(&url).bearer_auth(token.expose()).timeout(self.timeout);
            let failure = match request.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.text().await {
                        // The body holds the secret (base64): wiped when dropped.
                        Ok(body) if status.is_success() => break Zeroizing::new(body),
                        Ok(body) => {
                            let message = google_error_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
                            match status.as_u16() {
                                401 | 403 => return Err(SecretError::PermissionDenied { name, message }),
                                404 => return Err(SecretError::NotFound { name, message }),
                                429 | 500..=599 => message,
                                // 400 FAILED_PRECONDITION: the version is disabled or destroyed.
                                _ => return Err(SecretError::Unusable { name, message }),
                            }
                        }
                        Err(e) => format!("reading the reply: {}", e.without_url()),
                    }
                }
                Err(e) => e.without_url().to_string(),
            };
            if attempt >= self.retry.max_attempts {
                return Err(SecretError::Unavailable {
                    name,
                    endpoint: self.endpoint.clone(),
                    message: format!("{failure} (after {attempt} attempts)"),
                });
            }
            tracing::debug!(secret = %name, attempt, "Secret Manager request failed, retrying: {failure}");
            tokio::time::sleep(self.retry.backoff(attempt)).await;
        };
        let secret = decode_payload(&body).map_err(|failure| match failure {
            PayloadError::Corrupt(message) => SecretError::Corrupt { name: name.clone(), message },
            PayloadError::Invalid(message) => SecretError::Unusable { name: name.clone(), message },
        })?;
        tracing::debug!(secret = %name, "secret fetched from Secret Manager");
        self.cache.lock().await.insert(name, secret.clone());
        Ok(secret)
    }
}

#[derive(Debug)]
enum PayloadError {
    Corrupt(String),
    Invalid(String),
}

/// The payload of an `:access` reply, checked against its CRC32C.
fn decode_payload(body: &str) -> Result<Secret, PayloadError> {
    let invalid = |m: &str| PayloadError::Invalid(m.to_string());
    let reply: AccessResponse = serde_json::from_str(body)
        .map_err(|e| PayloadError::Invalid(format!("Secret Manager sent an unexpected reply ({e})")))?;
    let payload = reply.payload.ok_or_else(|| invalid("the reply has no payload"))?;
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.data.as_bytes())
        .map_err(|_| invalid("the payload is not base64"))?;
    if let Some(expected) = &payload.data_crc32c {
        let expected: i64 = expected.parse().map_err(|_| invalid("dataCrc32c is not a number"))?;
        let actual = crc32c::crc32c(&bytes);
        if i64::from(actual) != expected {
            bytes.zeroize();
            return Err(PayloadError::Corrupt(format!("its CRC32C is {actual} where Secret Manager says {expected}")));
        }
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Secret::new(without_trailing_newline(text))),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(invalid("the payload is not UTF-8 text"))
        }
    }
}

/// `error.message` of a Google JSON error reply.
fn google_error_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("error")?.get("message")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?} {:?}", Some(&s)), "*** *** Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "pa ss\n\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), "pa ss\n");
        std::fs::write(&p, "x\r\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), "x");
    }

    #[test]
    fn references_resolve_or_wait() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "from-file\n").unwrap();
        let r = resolve_local("--x", &Secret::new(format!("file:{}", p.display()))).unwrap();
        assert_eq!(r.expose(), "from-file");
        let err = resolve_local("--x", &Secret::new("env:BQ2SFTP_SURELY_UNSET_VARIABLE")).unwrap_err();
        assert!(err.to_string().contains("env:BQ2SFTP_SURELY_UNSET_VARIABLE: the variable is not set"));
        let gcp = Secret::new("gcp-secret:projects/p/secrets/s");
        assert_eq!(resolve_local("--x", &gcp).unwrap(), gcp);
        assert!(resolve_local("--x", &Secret::new("gcp-secret:secrets/s")).is_err());
        assert_eq!(resolve_local("--x", &Secret::new("plain")).unwrap().expose(), "plain");
    }

    #[test]
    fn version_names() {
        assert_eq!(version_name("projects/p/secrets/s").unwrap(), "projects/p/secrets/s/versions/latest");
        assert_eq!(version_name("projects/p/secrets/s/versions/3").unwrap(), "projects/p/secrets/s/versions/3");
        assert_eq!(
            version_name("projects/p/locations/eu/secrets/s").unwrap(),
            "projects/p/locations/eu/secrets/s/versions/latest"
        );
        for bad in [
            "projects/p",
            "projects//secrets/s",
            "projects/p/secrets/s/versions",
            "p/secrets/s",
            "projects/p/secrets/s?x",
        ] {
            assert!(version_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn payload_is_checked_against_its_crc32c() {
        let data = b"s3cret-value\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        let crc = crc32c::crc32c(data);
        let good = format!(r#"{{"name":"n","payload":{{"data":"{b64}","dataCrc32c":"{crc}"}}}}"#);
        assert_eq!(decode_payload(&good).unwrap().expose(), "s3cret-value");
        let bad = format!(r#"{{"name":"n","payload":{{"data":"{b64}","dataCrc32c":"{}"}}}}"#, crc ^ 1);
        let err = decode_payload(&bad).unwrap_err();
        assert!(matches!(&err, PayloadError::Corrupt(m) if m.contains("CRC32C")), "{err:?}");
        assert!(!format!("{err:?}").contains("s3cret"));
        assert!(decode_payload(r#"{"name":"n"}"#).is_err());
        assert!(decode_payload(r#"{"payload":{"data":"!!"}}"#).is_err());
        let no_crc = format!(r#"{{"payload":{{"data":"{b64}"}}}}"#);
        assert_eq!(decode_payload(&no_crc).unwrap().expose(), "s3cret-value");
    }
}
