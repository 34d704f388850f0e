//! Google OAuth2 access tokens for the BigQuery APIs, without gcloud.
//!
//! A small module on `jsonwebtoken` + `reqwest` rather than a provider crate, so that every
//! endpoint (token URI, metadata host, IAM credentials) is injectable and nothing probes a
//! non-loopback address in tests. The flows follow Google's auth library
//! (googleapis/google-auth-library-python, `_default.py`, `service_account.py`,
//! `compute_engine/_metadata.py`, `impersonated_credentials.py`; research notes §5):
//!
//! - **Application Default Credentials**, in Google's order: `GOOGLE_APPLICATION_CREDENTIALS`,
//!   the gcloud well-known file (`$CLOUDSDK_CONFIG/application_default_credentials.json`, else
//!   `~/.config/gcloud/…`), then the metadata server (`GCE_METADATA_HOST` overrides
//!   `metadata.google.internal`).
//! - **Service-account key** (a file, or base64 JSON in an environment variable such as the
//!   seed guide's `SERVICE_ACCOUNT_KEY`): an RS256 JWT with `iss`=client email, `scope`,
//!   `aud`=token URI, `iat`, `exp`=iat+3600 and, for domain-wide delegation, `sub`=the user,
//!   exchanged at the token URI (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`).
//! - **gcloud user credentials** (`authorized_user`): the refresh-token grant.
//! - **Metadata server**: `GET /computeMetadata/v1/instance/service-accounts/default/token`
//!   with `Metadata-Flavor: Google`.
//! - **Service-account impersonation**: IAM Credentials `generateAccessToken` with the source
//!   credentials' token.
//!
//! Tokens are cached and refreshed [`DEFAULT_REFRESH_MARGIN`] before they expire (Google's
//! libraries use 3 min 45 s, `_helpers.REFRESH_THRESHOLD`); one refresh runs at a time.
//! Secrets (private keys, refresh tokens, access tokens) live in [`Secret`], whose `Debug` and
//! `Display` print `***`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;

use super::retry::RetryPolicy;

pub const SCOPE_BIGQUERY: &str = "https://www.googleapis.com/auth/bigquery";
pub const SCOPE_DRIVE_READONLY: &str = "https://www.googleapis.com/auth/drive.readonly";
pub const SCOPE_CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
pub const DEFAULT_IAM_CREDENTIALS_ENDPOINT: &str = "https://iamcredentials.googleapis.com";
/// Refresh this long before a token expires (google-auth `_helpers.REFRESH_THRESHOLD`).
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(225);
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

pub use crate::secret::Secret;

/// Where credentials come from. Configuration only: nothing is read until a token is needed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CredentialsSource {
    /// Application Default Credentials, in Google's order.
    #[default]
    ApplicationDefault,
    /// A key file (service account or gcloud `authorized_user`).
    File(PathBuf),
    /// An environment variable holding the key JSON, base64-encoded (or plain JSON).
    Base64Env(String),
    /// The GCE/Cloud Run/GKE metadata server only.
    MetadataServer,
    /// No credentials at all: only for an emulator (`BIGQUERY_EMULATOR_HOST`).
    None,
}

#[derive(Debug, Clone)]
pub struct AuthOptions {
    pub source: CredentialsSource,
    pub scopes: Vec<String>,
    /// Domain-wide delegation: the Workspace user the service account acts as (JWT `sub`).
    pub subject: Option<String>,
    /// Service account to impersonate through IAM Credentials `generateAccessToken`.
    pub impersonate_service_account: Option<String>,
    /// Overrides the key file's `token_uri`.
    pub token_uri: Option<String>,
    /// Overrides `GCE_METADATA_HOST` and the default metadata host (`host[:port]`).
    pub metadata_host: Option<String>,
    pub iam_endpoint: String,
    pub refresh_margin: Duration,
    pub http_timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            source: CredentialsSource::ApplicationDefault,
            scopes: vec![SCOPE_BIGQUERY.to_string()],
            subject: None,
            impersonate_service_account: None,
            token_uri: None,
            metadata_host: None,
            iam_endpoint: DEFAULT_IAM_CREDENTIALS_ENDPOINT.to_string(),
            refresh_margin: DEFAULT_REFRESH_MARGIN,
            http_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error(
        "no Google credentials found ({tried}); set GOOGLE_APPLICATION_CREDENTIALS or pass --credentials KEY.json, \
         --credentials-base64-env VAR, or run where a metadata server is available"
    )]
    NoCredentials { tried: String },
    #[error("cannot read credentials from {source_name}: {message}")]
    BadCredentials { source_name: String, message: String },
    #[error("token request to {url} failed: {message}{hint}")]
    TokenEndpoint { url: String, message: String, hint: String },
    #[error("{what} is not supported: {hint}")]
    Unsupported { what: String, hint: String },
}

/// An access token and when it stops being valid.
#[derive(Clone)]
struct Cached {
    token: Secret,
    expires_at: Instant,
}

/// Parsed credentials, ready to mint tokens.
#[derive(Debug, Clone)]
enum Credentials {
    ServiceAccount(ServiceAccountKey),
    AuthorizedUser { client_id: String, client_secret: Secret, refresh_token: Secret, token_uri: String },
    Metadata { base: String },
}

#[derive(Debug, Clone)]
struct ServiceAccountKey {
    client_email: String,
    private_key: Secret,
    private_key_id: Option<String>,
    token_uri: String,
    project_id: Option<String>,
}

#[derive(Deserialize)]
struct KeyJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    private_key: Option<String>,
    private_key_id: Option<String>,
    token_uri: Option<String>,
    project_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

/// Which credentials were found and where, for `bq2sftp doctor`. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsInfo {
    /// `service-account key`, `gcloud user credentials`, `metadata server`.
    pub kind: &'static str,
    /// Where they came from: a flag, a variable, a file, the metadata server.
    pub origin: String,
    /// The service account's e-mail, when the credentials say.
    pub account: Option<String>,
}

/// Looks up environment variables; injectable so tests never touch the process environment.
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

pub fn process_env() -> EnvLookup {
    Arc::new(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// Mints and caches access tokens. Cheap to share (`Arc`); `token()` is safe to call from many
/// streams at once: one refresh runs while the others wait for its result.
pub struct TokenProvider {
    options: AuthOptions,
    env: EnvLookup,
    http: reqwest::Client,
    credentials: tokio::sync::OnceCell<Credentials>,
    cache: tokio::sync::Mutex<Option<Cached>>,
    /// Tokens fetched so far (for logs and tests).
    fetched: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider").field("source", &self.options.source).finish_non_exhaustive()
    }
}

impl TokenProvider {
    pub fn new(options: AuthOptions, http: reqwest::Client) -> Self {
        Self::with_env(options, http, process_env())
    }

    pub fn with_env(options: AuthOptions, http: reqwest::Client, env: EnvLookup) -> Self {
        TokenProvider {
            options,
            env,
            http,
            credentials: tokio::sync::OnceCell::new(),
            cache: tokio::sync::Mutex::new(None),
            fetched: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether requests carry credentials at all (false only for an emulator).
    pub fn enabled(&self) -> bool {
        self.options.source != CredentialsSource::None
    }

    pub fn tokens_fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A valid access token, or `None` when running without credentials (emulator).
    pub async fn token(&self) -> Result<Option<Secret>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && c.expires_at > Instant::now() + self.options.refresh_margin
        {
            return Ok(Some(c.token.clone()));
        }
        let fresh = self.fetch().await?;
        self.fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = fresh.token.clone();
        *cache = Some(fresh);
        Ok(Some(token))
    }

    /// Forgets the cached token (after the server said UNAUTHENTICATED), so the next call
    /// fetches a new one.
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    /// The project the credentials belong to, when they say: `GOOGLE_CLOUD_PROJECT`,
    /// `GCLOUD_PROJECT`, the key file's `project_id`, or the metadata server's project.
    pub async fn project_id(&self) -> Option<String> {
        if let Some(p) = (self.env)("GOOGLE_CLOUD_PROJECT").or_else(|| (self.env)("GCLOUD_PROJECT")) {
            return Some(p);
        }
        if !self.enabled() {
            return None;
        }
        match self.credentials().await.ok()? {
            Credentials::ServiceAccount(k) => k.project_id.clone(),
            Credentials::Metadata { base } => {
                let url = format!("{base}/computeMetadata/v1/project/project-id");
                let resp = self.http.get(&url).header("Metadata-Flavor", "Google").send().await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                resp.text().await.ok().filter(|s| !s.is_empty())
            }
            Credentials::AuthorizedUser { .. } => None,
        }
    }

    pub fn options(&self) -> &AuthOptions {
        &self.options
    }

    /// Finds the credentials (as the first token request would) and says what and where
    /// they are. Reads files and variables only; no network.
    pub async fn describe(&self) -> Result<CredentialsInfo, AuthError> {
        let origin = match &self.options.source {
            CredentialsSource::File(p) => format!("--credentials {}", p.display()),
            CredentialsSource::Base64Env(var) => format!("environment variable {var} (--credentials-base64-env)"),
            CredentialsSource::MetadataServer => {
                format!("the metadata server at {} (--metadata-credentials)", self.metadata_base())
            }
            CredentialsSource::None => "none (emulator)".to_string(),
            CredentialsSource::ApplicationDefault => match (self.env)("GOOGLE_APPLICATION_CREDENTIALS") {
                Some(p) => format!("GOOGLE_APPLICATION_CREDENTIALS={p} (Application Default Credentials)"),
                None => match self.well_known_file().filter(|p| p.is_file()) {
                    Some(p) => format!("gcloud's {} (Application Default Credentials)", p.display()),
                    None => format!(
                        "the metadata server at {} (Application Default Credentials: no GOOGLE_APPLICATION_CREDENTIALS, no gcloud credentials file)",
                        self.metadata_base()
                    ),
                },
            },
        };
        let (kind, account) = match self.credentials().await? {
            Credentials::ServiceAccount(k) => ("service-account key", Some(k.client_email.clone())),
            Credentials::AuthorizedUser { .. } => ("gcloud user credentials (authorized_user)", None),
            Credentials::Metadata { .. } => ("metadata server", None),
        };
        Ok(CredentialsInfo { kind, origin, account })
    }

    /// gcloud's `application_default_credentials.json` (whether or not it exists).
    fn well_known_file(&self) -> Option<PathBuf> {
        match (self.env)("CLOUDSDK_CONFIG") {
            Some(dir) => Some(PathBuf::from(dir)),
            None => (self.env)("HOME").map(|h| PathBuf::from(h).join(".config/gcloud")),
        }
        .map(|d| d.join("application_default_credentials.json"))
    }

    async fn credentials(&self) -> Result<&Credentials, AuthError> {
        self.credentials.get_or_try_init(|| async { self.resolve() }).await
    }

    fn metadata_base(&self) -> String {
        let host = self
            .options
            .metadata_host
            .clone()
            .or_else(|| (self.env)("GCE_METADATA_HOST"))
            .unwrap_or_else(|| DEFAULT_METADATA_HOST.to_string());
        if host.starts_with("http://") || host.starts_with("https://") {
            host.trim_end_matches('/').to_string()
        } else {
            format!("http://{host}")
        }
    }

    /// Finds the credentials, in ADC order unless a source was named.
    fn resolve(&self) -> Result<Credentials, AuthError> {
        match &self.options.source {
            CredentialsSource::File(path) => parse_key_file(path, &self.options),
            CredentialsSource::Base64Env(var) => {
                let shown = format!("environment variable {var}");
                let raw = (self.env)(var).ok_or_else(|| AuthError::BadCredentials {
                    source_name: shown.clone(),
                    message: "it is not set or empty".into(),
                })?;
                let json = decode_key_env(&raw)
                    .map_err(|message| AuthError::BadCredentials { source_name: shown.clone(), message })?;
                parse_key(&json, &shown, &self.options)
            }
            CredentialsSource::MetadataServer => Ok(Credentials::Metadata { base: self.metadata_base() }),
            CredentialsSource::None => Err(AuthError::NoCredentials { tried: "credentials are disabled".into() }),
            CredentialsSource::ApplicationDefault => {
                if let Some(path) = (self.env)("GOOGLE_APPLICATION_CREDENTIALS") {
                    return parse_key_file(&PathBuf::from(path), &self.options);
                }
                if let Some(path) = &self.well_known_file()
                    && path.is_file()
                {
                    return parse_key_file(path, &self.options);
                }
                // Google's libraries ping the metadata server here; we go straight to it and
                // report a failed token request as "no credentials" (see `fetch`).
                Ok(Credentials::Metadata { base: self.metadata_base() })
            }
        }
    }

    async fn fetch(&self) -> Result<Cached, AuthError> {
        let creds = self.credentials().await?;
        if let Some(target) = &self.options.impersonate_service_account {
            let source = self.fetch_with(creds, &[SCOPE_CLOUD_PLATFORM.to_string()]).await?;
            return self.impersonate(target, &source.token).await;
        }
        self.fetch_with(creds, &self.options.scopes).await
    }

    async fn fetch_with(&self, creds: &Credentials, scopes: &[String]) -> Result<Cached, AuthError> {
        if self.options.subject.is_some() && !matches!(creds, Credentials::ServiceAccount(_)) {
            return Err(AuthError::Unsupported {
                what: "domain-wide delegation (--impersonate-subject) with these credentials".into(),
                hint: "it needs a service-account key (--credentials KEY.json or --credentials-base64-env VAR)".into(),
            });
        }
        match creds {
            Credentials::ServiceAccount(key) => {
                let token_uri = self.options.token_uri.clone().unwrap_or_else(|| key.token_uri.clone());
                let assertion = sign_jwt(key, scopes, &token_uri, self.options.subject.as_deref())?;
                let form = [("grant_type", JWT_BEARER_GRANT), ("assertion", assertion.expose())];
                let hint = if self.options.subject.is_some() {
                    format!(
                        "; for domain-wide delegation, the Workspace admin must authorize the service account's client ID for the scopes {}",
                        scopes.join(",")
                    )
                } else {
                    "; check that the key is not deleted or disabled and that the clock is right".into()
                };
                self.token_request(&token_uri, |c| c.post(&token_uri).form(&form), &hint).await
            }
            Credentials::AuthorizedUser { client_id, client_secret, refresh_token, token_uri } => {
                let token_uri = self.options.token_uri.clone().unwrap_or_else(|| token_uri.clone());
                let form = [
                    ("grant_type", "refresh_token"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", client_secret.expose()),
                    ("refresh_token", refresh_token.expose()),
                ];
                let hint = "; run `gcloud auth application-default login` again";
                self.token_request(&token_uri, |c| c.post(&token_uri).form(&form), hint).await
            }
            Credentials::Metadata { base } => {
                let url = format!("{base}/computeMetadata/v1/instance/service-accounts/default/token");
                let joined = scopes.join(",");
                let result = self
                    .token_request(
                        &url,
                        |c| c.get(&url).header("Metadata-Flavor", "Google").query(&[("scopes", joined.as_str())]),
                        "",
                    )
                    .await;
                match result {
                    Err(AuthError::TokenEndpoint { message, .. })
                        if self.options.source == CredentialsSource::ApplicationDefault =>
                    {
                        Err(AuthError::NoCredentials {
                            tried: format!(
                                "GOOGLE_APPLICATION_CREDENTIALS is not set, no gcloud application_default_credentials.json, \
                                 metadata server {base}: {message}"
                            ),
                        })
                    }
                    other => other,
                }
            }
        }
    }

    /// One token request with bounded retries on 5xx, 429 and transport errors.
    async fn token_request(
        &self,
        url: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        hint: &str,
    ) -> Result<Cached, AuthError> {
        let policy = &self.options.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = Instant::now();
            let failure = match build(&self.http).timeout(self.options.http_timeout).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        return parse_token_response(&body, sent).map_err(|message| AuthError::TokenEndpoint {
                            url: url.to_string(),
                            message,
                            hint: String::new(),
                        });
                    }
                    let message = describe_oauth_error(status.as_u16(), &body);
                    if !(status.is_server_error() || status.as_u16() == 429) {
                        return Err(AuthError::TokenEndpoint { url: url.to_string(), message, hint: hint.to_string() });
                    }
                    message
                }
                Err(e) => without_url(&e),
            };
            if attempt >= policy.max_attempts {
                return Err(AuthError::TokenEndpoint {
                    url: url.to_string(),
                    message: format!("{failure} (after {attempt} attempts)"),
                    hint: String::new(),
                });
            }
            tracing::debug!(url, attempt, "token request failed, retrying: {failure}");
            tokio::time::sleep(policy.backoff(attempt)).await;
        }
    }

    async fn impersonate(&self, target: &str, source: &Secret) -> Result<Cached, AuthError> {
        let base = self.options.iam_endpoint.trim_end_matches('/');
        let url = format!("{base}/v1/projects/-/serviceAccounts/{target}:generateAccessToken");
        let body = serde_json::json!({ "scope": self.options.scopes, "lifetime": "3600s" });
        let sent = Instant::now();
        let resp = self
            .http
            .post(&url)
            .bearer_auth(source.expose())
            .json(&body)
            .timeout(self.options.http_timeout)
            .send()
            .await
            .map_err(|e| AuthError::TokenEndpoint {
                url: url.clone(),
                message: without_url(&e),
                hint: String::new(),
            })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(AuthError::TokenEndpoint {
                url,
                message: describe_oauth_error(status.as_u16(), &text),
                hint: format!("; the caller needs roles/iam.serviceAccountTokenCreator on {target}"),
            });
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Generated {
            access_token: String,
            expire_time: Option<String>,
        }
        let g: Generated = serde_json::from_str(&text).map_err(|e| AuthError::TokenEndpoint {
            url: url.clone(),
            message: format!("unexpected response: {e}"),
            hint: String::new(),
        })?;
        let lifetime = g
            .expire_time
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| (t.timestamp() - chrono::Utc::now().timestamp()).max(0) as u64)
            .unwrap_or(3600);
        Ok(Cached { token: Secret::new(g.access_token), expires_at: sent + Duration::from_secs(lifetime) })
    }
}

/// reqwest errors print the URL, which is fine, but never a body; keep the chain short.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn parse_token_response(body: &str, sent: Instant) -> Result<Cached, String> {
    #[derive(Deserialize)]
    struct TokenResponse {
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let r: TokenResponse =
        serde_json::from_str(body).map_err(|e| format!("the response is not a token response ({e})"))?;
    let token = r.access_token.filter(|t| !t.is_empty()).ok_or("the response has no access_token")?;
    // Measured from when the request was sent, so a slow answer cannot extend the lifetime.
    Ok(Cached { token: Secret::new(token), expires_at: sent + Duration::from_secs(r.expires_in.unwrap_or(3600)) })
}

/// `{"error": "invalid_grant", "error_description": "..."}` (RFC 6749 §5.2) or a Google
/// API error body, shortened to what a person needs.
fn describe_oauth_error(status: u16, body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let error = match &v["error"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o.get("message").and_then(|m| m.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    };
    let description = v["error_description"].as_str().unwrap_or_default();
    match (error.is_empty(), description.is_empty()) {
        (true, _) => format!("HTTP {status}"),
        (false, true) => format!("HTTP {status}: {error}"),
        (false, false) => format!("HTTP {status}: {error}: {description}"),
    }
}

fn decode_key_env(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.starts_with('{') {
        return Ok(trimmed.to_string());
    }
    let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&compact))
        .map_err(|_| "it is neither JSON nor base64-encoded JSON".to_string())?;
    String::from_utf8(bytes).map_err(|_| "its base64 content is not UTF-8 JSON".to_string())
}

fn parse_key_file(path: &std::path::Path, options: &AuthOptions) -> Result<Credentials, AuthError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuthError::BadCredentials { source_name: shown.clone(), message: e.to_string() })?;
    parse_key(&text, &shown, options)
}

fn parse_key(text: &str, shown: &str, options: &AuthOptions) -> Result<Credentials, AuthError> {
    let bad = |message: String| AuthError::BadCredentials { source_name: shown.to_string(), message };
    // Never echo the JSON parser's context: it could quote key material.
    let k: KeyJson = serde_json::from_str(text).map_err(|e| bad(format!("not a JSON key file (line {})", e.line())))?;
    let token_uri = options.token_uri.clone().or(k.token_uri).unwrap_or_else(|| DEFAULT_TOKEN_URI.to_string());
    match k.kind.as_deref() {
        Some("service_account") => {
            let client_email = k.client_email.ok_or_else(|| bad("service_account key without client_email".into()))?;
            let private_key = k.private_key.ok_or_else(|| bad("service_account key without private_key".into()))?;
            Ok(Credentials::ServiceAccount(ServiceAccountKey {
                client_email,
                private_key: Secret::new(private_key),
                private_key_id: k.private_key_id,
                token_uri,
                project_id: k.project_id,
            }))
        }
        Some("authorized_user") => Ok(Credentials::AuthorizedUser {
            client_id: k.client_id.ok_or_else(|| bad("authorized_user without client_id".into()))?,
            client_secret: Secret::new(
                k.client_secret.ok_or_else(|| bad("authorized_user without client_secret".into()))?,
            ),
            refresh_token: Secret::new(
                k.refresh_token.ok_or_else(|| bad("authorized_user without refresh_token".into()))?,
            ),
            token_uri,
        }),
        Some(other) => Err(AuthError::Unsupported {
            what: format!("credentials of type '{other}' in {shown}"),
            hint: "use a service-account key, gcloud application-default credentials, the metadata server, \
                   or --impersonate-service-account"
                .into(),
        }),
        None => Err(bad("the JSON has no \"type\" field; is this a Google credentials file?".into())),
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: String,
    aud: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
}

fn sign_jwt(key: &ServiceAccountKey, scopes: &[String], aud: &str, subject: Option<&str>) -> Result<Secret, AuthError> {
    let bad = |message: String| AuthError::BadCredentials { source_name: key.client_email.clone(), message };
    let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.expose().as_bytes())
        .map_err(|e| bad(format!("the private_key is not a PEM RSA key ({})", e.kind_name())))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = key.private_key_id.clone();
    let claims =
        Claims { iss: &key.client_email, scope: scopes.join(" "), aud, iat: now, exp: now + 3600, sub: subject };
    jsonwebtoken::encode(&header, &claims, &encoding)
        .map(Secret::new)
        .map_err(|e| bad(format!("cannot sign the token request ({})", e.kind_name())))
}

trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for jsonwebtoken::errors::Error {
    /// The error kind without any key bytes.
    fn kind_name(&self) -> String {
        format!("{:?}", self.kind()).split('(').next().unwrap_or("error").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> EnvLookup {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Arc::new(move |k| map.get(k).cloned())
    }

    fn provider(options: AuthOptions, e: EnvLookup) -> TokenProvider {
        TokenProvider::with_env(options, reqwest::Client::new(), e)
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("ya29.very-secret");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
    }

    #[test]
    fn adc_order_env_then_gcloud_file_then_metadata() {
        let tmp = std::env::temp_dir().join(format!("bq2sftp-adc-{}", std::process::id()));
        let gcloud = tmp.join("gcloud");
        std::fs::create_dir_all(&gcloud).unwrap();
        let user = r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#;
        std::fs::write(gcloud.join("application_default_credentials.json"), user).unwrap();
        let sa = tmp.join("sa.json");
        std::fs::write(&sa, r#"{"type":"service_account","client_email":"a@b","private_key":"k"}"#).unwrap();
        let sa_path = sa.to_str().unwrap();
        let cfg = gcloud.to_str().unwrap();

        let p = provider(
            AuthOptions::default(),
            env(&[("GOOGLE_APPLICATION_CREDENTIALS", sa_path), ("CLOUDSDK_CONFIG", cfg)]),
        );
        assert!(matches!(p.resolve().unwrap(), Credentials::ServiceAccount(_)));
        let p = provider(AuthOptions::default(), env(&[("CLOUDSDK_CONFIG", cfg)]));
        assert!(matches!(p.resolve().unwrap(), Credentials::AuthorizedUser { .. }));
        let p =
            provider(AuthOptions::default(), env(&[("HOME", "/nonexistent"), ("GCE_METADATA_HOST", "127.0.0.1:9")]));
        match p.resolve().unwrap() {
            Credentials::Metadata { base } => assert_eq!(base, "http://127.0.0.1:9"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn key_from_base64_env() {
        let json = r#"{"type":"service_account","client_email":"x@y.iam.gserviceaccount.com","private_key":"k","project_id":"p"}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        let opts =
            AuthOptions { source: CredentialsSource::Base64Env("SERVICE_ACCOUNT_KEY".into()), ..Default::default() };
        let p = provider(opts.clone(), env(&[("SERVICE_ACCOUNT_KEY", &b64)]));
        match p.resolve().unwrap() {
            Credentials::ServiceAccount(k) => {
                assert_eq!(k.client_email, "x@y.iam.gserviceaccount.com");
                assert_eq!(k.token_uri, DEFAULT_TOKEN_URI);
            }
            other => panic!("{other:?}"),
        }
        let p = provider(opts.clone(), env(&[("SERVICE_ACCOUNT_KEY", "%%%")]));
        let err = p.resolve().unwrap_err().to_string();
        assert!(err.contains("SERVICE_ACCOUNT_KEY") && err.contains("base64"), "{err}");
        let p = provider(opts, env(&[]));
        assert!(p.resolve().unwrap_err().to_string().contains("not set"));
    }

    #[test]
    fn key_errors_do_not_quote_the_key() {
        let text =
            r#"{"type":"service_account","client_email":"a@b","private_key":"-----BEGIN PRIVATE KEY-----SECRETBYTES"#;
        let err = parse_key(text, "key.json", &AuthOptions::default()).unwrap_err().to_string();
        assert!(!err.contains("SECRETBYTES"), "{err}");
        let key = ServiceAccountKey {
            client_email: "a@b".into(),
            private_key: Secret::new("-----BEGIN PRIVATE KEY-----\nSECRETBYTES\n-----END PRIVATE KEY-----\n"),
            private_key_id: None,
            token_uri: DEFAULT_TOKEN_URI.into(),
            project_id: None,
        };
        let err = sign_jwt(&key, &[SCOPE_BIGQUERY.into()], DEFAULT_TOKEN_URI, None).unwrap_err().to_string();
        assert!(!err.contains("SECRETBYTES"), "{err}");
        assert!(format!("{key:?}").contains("***"));
    }

    #[test]
    fn unsupported_credential_types_are_named() {
        let err = parse_key(r#"{"type":"external_account"}"#, "k.json", &AuthOptions::default()).unwrap_err();
        assert!(err.to_string().contains("external_account"), "{err}");
    }

    #[test]
    fn oauth_errors_are_summarised() {
        let body = r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
        assert_eq!(describe_oauth_error(400, body), "HTTP 400: invalid_grant: Invalid JWT Signature.");
        assert_eq!(describe_oauth_error(502, "<html>"), "HTTP 502");
    }
}
