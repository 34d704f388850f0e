//! Verifying the Google-signed OIDC ID tokens that callers (Cloud Scheduler, another service)
//! send as `Authorization: Bearer`.
//!
//! The checks follow google-auth-library's `id_token.verify_oauth2_token` and the Cloud
//! Scheduler docs (`../shared/reference/bigquery-storage-read-facts.md` §5):
//! - the signature is RS256 by a key in Google's JWKS (`https://www.googleapis.com/oauth2/v3/certs`,
//!   overridable), found by the token's `kid`; the set is cached and fetched again when a
//!   token names a key we do not have (Google rotates keys), at most once per
//!   [`REFETCH_INTERVAL`] so a stream of forged `kid`s cannot make us hammer the endpoint;
//! - only RS256 is accepted: `alg: none`, and HS256 "signed" with the public key as a shared
//!   secret, fail before any signature check;
//! - `iss` is `accounts.google.com` or `https://accounts.google.com`; `aud` equals the configured
//!   audience (Scheduler sets it to the target URL unless told otherwise); `exp` and `iat`
//!   hold within [`LEEWAY`];
//! - the `email` claim (with `email_verified`) is one of the allowed service accounts.
//!
//! A missing or invalid token is 401; a valid token of a caller not on the list is 403.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

pub const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
pub const GOOGLE_ISSUERS: [&str; 2] = ["accounts.google.com", "https://accounts.google.com"];
/// Clock skew tolerated on `exp` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// How long a fetched key set is used before it is fetched again.
pub const JWKS_TTL: Duration = Duration::from_secs(3600);
/// The least time between two fetches caused by unknown `kid`s.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthFailure {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("caller {0} is not allowed to run jobs")]
    Forbidden(String),
    #[error("cannot fetch the signing keys: {0}")]
    Keys(String),
}

impl AuthFailure {
    /// 401 for a missing or bad token (and key-fetch trouble, which the caller may retry);
    /// 403 for a good token of the wrong caller.
    pub fn status(&self) -> u16 {
        match self {
            AuthFailure::Forbidden(_) => 403,
            AuthFailure::Keys(_) => 503,
            _ => 401,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    pub audience: String,
    pub allowed_callers: HashSet<String>,
    pub jwks_url: String,
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    iat: i64,
    email: Option<String>,
    email_verified: Option<bool>,
}

struct Keys {
    set: JwkSet,
    fetched: Instant,
}

pub struct Verifier {
    config: OidcConfig,
    http: reqwest::Client,
    keys: tokio::sync::Mutex<Option<Keys>>,
    last_refetch: Mutex<Option<Instant>>,
}

impl Verifier {
    pub fn new(config: OidcConfig) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
        Verifier { config, http, keys: tokio::sync::Mutex::new(None), last_refetch: Mutex::new(None) }
    }

    /// Checks an `Authorization` header value; returns the caller's email.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<String, AuthFailure> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthFailure::Missing)?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthFailure::Invalid(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthFailure::Invalid(format!("algorithm {:?} is not accepted, only RS256", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| AuthFailure::Invalid("no key id (kid)".into()))?;
        let key = self.key(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&self.config.audience]);
        validation.set_issuer(&GOOGLE_ISSUERS);
        validation.leeway = LEEWAY.as_secs();
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| AuthFailure::Invalid(e.to_string()))?;
        let now = chrono::Utc::now().timestamp();
        if data.claims.iat > now + LEEWAY.as_secs() as i64 {
            return Err(AuthFailure::Invalid("issued in the future (iat)".into()));
        }
        let email = data.claims.email.ok_or_else(|| AuthFailure::Invalid("no email claim".into()))?;
        if data.claims.email_verified == Some(false) {
            return Err(AuthFailure::Invalid(format!("email {email} is not verified")));
        }
        if !self.config.allowed_callers.contains(&email) {
            return Err(AuthFailure::Forbidden(email));
        }
        Ok(email)
    }

    /// The RSA key `kid`, from the cache or a fresh fetch.
    async fn key(&self, kid: &str) -> Result<DecodingKey, AuthFailure> {
        let mut keys = self.keys.lock().await;
        let stale = keys.as_ref().is_none_or(|k| k.fetched.elapsed() > JWKS_TTL);
        let unknown = keys.as_ref().is_some_and(|k| k.set.find(kid).is_none());
        if stale || (unknown && self.may_refetch()) {
            *keys = Some(Keys { set: self.fetch().await?, fetched: Instant::now() });
        }
        let jwk = keys
            .as_ref()
            .and_then(|k| k.set.find(kid))
            .ok_or_else(|| AuthFailure::Invalid(format!("unknown signing key {kid}")))?;
        DecodingKey::from_jwk(jwk).map_err(|e| AuthFailure::Invalid(format!("signing key {kid}: {e}")))
    }

    fn may_refetch(&self) -> bool {
        let mut last = self.last_refetch.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < REFETCH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    async fn fetch(&self) -> Result<JwkSet, AuthFailure> {
        let url = &self.config.jwks_url;
        let response = self.http.get(url).send().await.map_err(|e| AuthFailure::Keys(format!("{url}: {e}")))?;
        if !response.status().is_success() {
            return Err(AuthFailure::Keys(format!("{url}: HTTP {}", response.status())));
        }
        response.json::<JwkSet>().await.map_err(|e| AuthFailure::Keys(format!("{url}: {e}")))
    }
}
