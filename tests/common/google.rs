//! Local stand-ins for Google's services in the BigQuery tests, all on 127.0.0.1:
//!
//! - the project's own BigQuery emulator (in-process) over a generated Parquet table;
//! - an OAuth token endpoint that VERIFIES the service-account JWT it is sent (RS256 signature
//!   with the test key's public key, `iss`, `scope`, `aud`, `sub`, `exp`) before issuing a token;
//! - a metadata server that insists on `Metadata-Flavor: Google`;
//! - a TCP proxy that cuts connections after N bytes, for real transport faults.
//!
//! Nothing here reaches a non-loopback address.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use bq2sftp::emulator::{self, EmulatorConfig, EmulatorHandle};
use bq2sftp::read::bigquery::TableRef;
use bq2sftp::read::synthetic::SyntheticOptions;
use serde_json::json;

pub const SCOPE_BIGQUERY: &str = "https://www.googleapis.com/auth/bigquery";

/// Writes the synthetic table `name` (e.g. `p.d.t`) as Parquet into `dir`.
pub fn write_table(dir: &Path, name: &str, options: SyntheticOptions) -> PathBuf {
    let table = TableRef::parse(name).expect("a table name");
    emulator::write_synthetic_table(dir, &table, options).expect("the table is written")
}

/// Starts the emulator over `dir` with `config` tweaks.
pub async fn start_emulator(dir: &Path, tweak: impl FnOnce(&mut EmulatorConfig)) -> EmulatorHandle {
    let mut config = EmulatorConfig { tables: Some(dir.to_path_buf()), ..Default::default() };
    tweak(&mut config);
    emulator::start(config).await.expect("the emulator starts")
}

/// An RSA key pair made by ssh-keygen (PKCS#8 private key, SPKI public key), as PEM.
pub struct TestKey {
    pub private_pem: String,
    pub public_pem: String,
}

pub fn test_key(dir: &Path) -> TestKey {
    let path = dir.join("sa-key");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-m", "PKCS8", "-N", "", "-f"])
        .arg(&path)
        .output()
        .expect("ssh-keygen runs (openssh-client; scripts/test.sh installs it)");
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let public = std::process::Command::new("ssh-keygen")
        .args(["-e", "-m", "PKCS8", "-f"])
        .arg(path.with_extension("pub"))
        .output()
        .expect("ssh-keygen -e runs");
    assert!(public.status.success());
    TestKey {
        private_pem: std::fs::read_to_string(&path).unwrap(),
        public_pem: String::from_utf8(public.stdout).unwrap(),
    }
}

/// A service-account key file in Google's format, pointing at a local token endpoint.
pub fn service_account_json(key: &TestKey, email: &str, token_uri: &str) -> String {
    json!({
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "test-key-1",
        "private_key": key.private_pem,
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": token_uri,
    })
    .to_string()
}

/// What the token endpoint requires of a JWT.
#[derive(Clone)]
pub struct Expect {
    pub iss: String,
    pub scope: String,
    pub sub: Option<String>,
}

pub struct TokenServer {
    pub url: String,
    /// Tokens issued, in order.
    pub issued: Arc<Mutex<Vec<String>>>,
    /// JWTs refused (bad signature or claims).
    pub refused: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    pub fn issued_count(&self) -> usize {
        self.issued.lock().unwrap().len()
    }

    /// A check for the emulator: accepts exactly the tokens this server issued.
    pub fn acceptor(&self) -> emulator::AuthCheck {
        let issued = self.issued.clone();
        emulator::AuthCheck::Accept(Arc::new(move |t| issued.lock().unwrap().iter().any(|i| i == t)))
    }
}

#[derive(Clone)]
struct TokenState {
    public_pem: String,
    aud: String,
    expect: Expect,
    expires_in: u64,
    issued: Arc<Mutex<Vec<String>>>,
    refused: Arc<AtomicUsize>,
    counter: Arc<AtomicU64>,
}

#[derive(serde::Deserialize, Debug)]
struct Claims {
    iss: String,
    scope: String,
    aud: String,
    iat: u64,
    exp: u64,
    sub: Option<String>,
}

async fn token(State(s): State<TokenState>, Form(form): Form<std::collections::HashMap<String, String>>) -> Response {
    let refuse = |why: String| {
        s.refused.fetch_add(1, Ordering::Relaxed);
        (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant", "error_description": why}))).into_response()
    };
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return refuse(format!("unexpected grant_type {:?}", form.get("grant_type")));
    }
    let Some(assertion) = form.get("assertion") else { return refuse("no assertion".into()) };
    let header = match jsonwebtoken::decode_header(assertion) {
        Ok(h) => h,
        Err(e) => return refuse(format!("bad JWT header: {e}")),
    };
    if header.alg != jsonwebtoken::Algorithm::RS256 || header.kid.as_deref() != Some("test-key-1") {
        return refuse(format!("unexpected header {header:?}"));
    }
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(s.public_pem.as_bytes()).expect("the public key parses");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[s.aud.as_str()]);
    validation.set_issuer(&[s.expect.iss.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = match jsonwebtoken::decode::<Claims>(assertion, &key, &validation) {
        Ok(d) => d.claims,
        Err(e) => return refuse(format!("Invalid JWT Signature or claims: {e}")),
    };
    if claims.scope != s.expect.scope {
        return refuse(format!("scope {:?}, expected {:?}", claims.scope, s.expect.scope));
    }
    if claims.sub != s.expect.sub {
        return refuse(format!("sub {:?}, expected {:?}", claims.sub, s.expect.sub));
    }
    if claims.exp != claims.iat + 3600 || claims.aud != s.aud {
        return refuse("exp must be iat + 3600".into());
    }
    let n = s.counter.fetch_add(1, Ordering::Relaxed);
    let token = format!("ya29.test-{n}");
    s.issued.lock().unwrap().push(token.clone());
    Json(json!({"access_token": token, "expires_in": s.expires_in, "token_type": "Bearer"})).into_response()
}

/// Starts a token endpoint at `http://127.0.0.1:P/token` issuing tokens valid `expires_in` s.
pub async fn start_token_server(public_pem: &str, expect: Expect, expires_in: u64) -> TokenServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let issued = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicUsize::new(0));
    let state = TokenState {
        public_pem: public_pem.to_string(),
        aud: url.clone(),
        expect,
        expires_in,
        issued: issued.clone(),
        refused: refused.clone(),
        counter: Arc::default(),
    };
    let app = Router::new().route("/token", post(token)).with_state(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    TokenServer { url, issued, refused, _task: task }
}

pub struct MetadataServer {
    /// `127.0.0.1:P`, the value for GCE_METADATA_HOST.
    pub host: String,
    pub issued: Arc<Mutex<Vec<String>>>,
    /// Requests without `Metadata-Flavor: Google`.
    pub refused: Arc<AtomicUsize>,
    /// The scopes each token request asked for.
    pub scopes: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl MetadataServer {
    pub fn acceptor(&self) -> emulator::AuthCheck {
        let issued = self.issued.clone();
        emulator::AuthCheck::Accept(Arc::new(move |t| issued.lock().unwrap().iter().any(|i| i == t)))
    }
}

#[derive(Clone)]
struct MetaState {
    issued: Arc<Mutex<Vec<String>>>,
    refused: Arc<AtomicUsize>,
    scopes: Arc<Mutex<Vec<String>>>,
}

fn flavored(headers: &HeaderMap, refused: &AtomicUsize) -> bool {
    let ok = headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) == Some("Google");
    if !ok {
        refused.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

/// A metadata server answering like GCE's for the default service account.
pub async fn start_metadata_server() -> MetadataServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let state = MetaState { issued: Arc::default(), refused: Arc::default(), scopes: Arc::default() };
    let (issued, refused, scopes) = (state.issued.clone(), state.refused.clone(), state.scopes.clone());
    let app = Router::new()
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/token",
            get(
                |State(s): State<MetaState>,
                 headers: HeaderMap,
                 axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>| async move {
                    if !flavored(&headers, &s.refused) {
                        return (StatusCode::FORBIDDEN, "Missing Metadata-Flavor:Google header").into_response();
                    }
                    s.scopes.lock().unwrap().push(q.get("scopes").cloned().unwrap_or_default());
                    let token = format!("ya29.metadata-{}", s.issued.lock().unwrap().len());
                    s.issued.lock().unwrap().push(token.clone());
                    Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})).into_response()
                },
            ),
        )
        .route(
            "/computeMetadata/v1/project/project-id",
            get(|State(s): State<MetaState>, headers: HeaderMap| async move {
                if !flavored(&headers, &s.refused) {
                    return (StatusCode::FORBIDDEN, "Missing Metadata-Flavor:Google header").into_response();
                }
                "p".into_response()
            }),
        )
        .with_state(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    MetadataServer { host, issued, refused, scopes, _task: task }
}

/// A TCP proxy to `upstream` that cuts each of its first `cuts` connections after forwarding
/// `after_bytes` bytes from the server: a transport failure in the middle of a response.
pub struct CuttingProxy {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn start_cutting_proxy(upstream: SocketAddr, after_bytes: usize, cuts: usize) -> CuttingProxy {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicUsize::new(0));
    let cut2 = cut.clone();
    let task = tokio::spawn(async move {
        let connections = AtomicUsize::new(0);
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
            let limit = if connections.fetch_add(1, Ordering::Relaxed) < cuts { Some(after_bytes) } else { None };
            let cut = cut2.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut sent = 0usize;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let n = match limit {
                        Some(l) if sent + n >= l => {
                            let _ = cw.write_all(&buf[..l - sent]).await;
                            cut.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                up.abort();
            });
        }
    });
    CuttingProxy { addr, cut, _task: task }
}

/// Distinct tokens the emulator accepted.
pub fn tokens_seen(emulator: &EmulatorHandle) -> HashSet<String> {
    emulator.stats().tokens_seen.lock().unwrap().clone()
}

pub struct IamServer {
    /// `http://127.0.0.1:P`, for --iam-endpoint.
    pub url: String,
    pub issued: Arc<Mutex<Vec<String>>>,
    /// Requests refused (wrong caller token, account or scopes).
    pub refused: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl IamServer {
    pub fn acceptor(&self) -> emulator::AuthCheck {
        let issued = self.issued.clone();
        emulator::AuthCheck::Accept(Arc::new(move |t| issued.lock().unwrap().iter().any(|i| i == t)))
    }
}

/// IAM Credentials `generateAccessToken` for `account`: answers only callers holding a token
/// from `caller_tokens` and asking for `scopes`.
pub async fn start_iam_server(account: &str, caller_tokens: Arc<Mutex<Vec<String>>>, scopes: Vec<String>) -> IamServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let issued: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused: Arc<AtomicUsize> = Arc::default();
    let (issued2, refused2, account) = (issued.clone(), refused.clone(), account.to_string());
    let app = Router::new().route(
        "/v1/projects/-/serviceAccounts/{name}",
        post(move |axum::extract::Path(name): axum::extract::Path<String>, headers: HeaderMap, Json(body): Json<serde_json::Value>| {
            let (issued, refused, callers) = (issued2.clone(), refused2.clone(), caller_tokens.clone());
            let (account, scopes) = (account.clone(), scopes.clone());
            async move {
                let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "));
                let caller_ok = bearer.is_some_and(|t| callers.lock().unwrap().iter().any(|c| c == t));
                let asked: Vec<String> = body["scope"].as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default();
                if !caller_ok || name != format!("{account}:generateAccessToken") || asked != scopes {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return (StatusCode::FORBIDDEN, Json(json!({"error": {"code": 403, "message": "Permission 'iam.serviceAccounts.getAccessToken' denied", "status": "PERMISSION_DENIED"}}))).into_response();
                }
                let token = format!("ya29.impersonated-{}", issued.lock().unwrap().len());
                issued.lock().unwrap().push(token.clone());
                let expire = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
                Json(json!({"accessToken": token, "expireTime": expire})).into_response()
            }
        }),
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    IamServer { url, issued, refused, _task: task }
}
