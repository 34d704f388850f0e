//! Google OIDC stand-ins for the `serve` tests: a JWKS endpoint that publishes a test key as
//! https://www.googleapis.com/oauth2/v3/certs does, and ID tokens signed locally with the
//! claims Cloud Scheduler puts in them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::routing::get;
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::google::TestKey;

pub const AUDIENCE: &str = "https://bq2sftp-test.a.run.app";
pub const CALLER: &str = "scheduler@p.iam.gserviceaccount.com";
pub const KID: &str = "test-kid-1";

pub struct Jwks {
    pub url: String,
    pub fetches: Arc<AtomicUsize>,
}

/// Serves `{"keys": [...]}` for `key` under `KID`, as https://www.googleapis.com/oauth2/v3/certs does.
pub async fn start_jwks(key: &TestKey) -> Jwks {
    let encoding = EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(KID.to_string());
    let set = JwkSet { keys: vec![jwk] };
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let app = axum::Router::new().route(
        "/oauth2/v3/certs",
        get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let set = serde_json::to_value(&set).unwrap();
            async move { Json(set) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Jwks { url: format!("http://{addr}/oauth2/v3/certs"), fetches }
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Claims as Cloud Scheduler's OIDC tokens carry them.
pub fn claims() -> Value {
    json!({
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "azp": "1234567890",
        "sub": "1234567890",
        "email": CALLER,
        "email_verified": true,
        "iat": now() - 10,
        "exp": now() + 3590,
    })
}

pub fn sign(key: &TestKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).unwrap()).unwrap()
}

pub fn unsigned(claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": KID})), b64(claims))
}
