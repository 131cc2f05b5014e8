//! The node_api HTTP surface (node-api.md Part B §1, §2, §4, §6): the response envelope, body
//! parsing with a size cap, instance authentication (verified mTLS client certificate *and*
//! instance JWT), and the `enroll`, `enroll/refresh` and `status/heartbeat` handlers. Transport
//! (TLS, connections) lives in `server.rs`; this module only sees requests carrying a
//! [`PeerInfo`] extension.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt as _;
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;

use crate::ca::{self, Ca};
use crate::jwt::{Claims, JwtError, JwtKey};
use crate::store::{self, Instance, IssuedCertificate, Outcome, Store};

pub const API_PREFIX: &str = "/api/v1/system/node_api";
/// Request bodies above this are refused with 413 (node-api.md Part A 10: bodies are capped).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// An oversized body is still read (and discarded) up to this size so the client receives the
/// 413 instead of a connection reset while it is still sending; beyond it we just hang up.
const MAX_DRAIN_BYTES: usize = 16 * 1024 * 1024;
const BOOTSTRAP_HEADER: &str = "x-bootstrap-token";
const INSTANCE_TOKEN_HEADER: &str = "x-instance-token";

/// Tunables from the command line.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub next_poll_seconds: u64,
    pub cert_ttl_secs: u64,
    pub jwt_ttl_secs: u64,
    /// Accept event severities in the upstream server's words (low/medium/high/critical).
    pub upstream_severities: bool,
}

/// Shared by every request.
#[derive(Debug)]
pub struct AppState {
    pub store: Store,
    pub ca: Ca,
    pub jwt: JwtKey,
    pub config: ApiConfig,
    /// Fleet events per instance (`events.rs`).
    pub events: crate::events::EventLog,
    /// State directory (module bundles live under it).
    pub state_dir: std::path::PathBuf,
}

/// Facts about the connection a request arrived on, inserted by the server per connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// End-entity certificate the client presented; rustls already verified it chains to our CA.
    pub client_cert: Option<CertificateDer<'static>>,
    pub remote: SocketAddr,
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/enroll", post(enroll))
        .route("/enroll/refresh", post(refresh))
        .route("/status/heartbeat", post(heartbeat))
        .route("/status/tasks", get(crate::tasks::list))
        .route("/status/tasks/{id}", get(crate::tasks::show))
        .route(
            "/status/tasks/{id}/acknowledge",
            post(crate::tasks::acknowledge),
        )
        .route("/status/tasks/{id}/complete", post(crate::tasks::complete))
        .route("/status/tasks/{id}/fail", post(crate::tasks::fail))
        .route("/fleet/events", post(crate::events::post_events))
        .route("/modules", get(crate::modules::list))
        .route("/modules/{id}", get(crate::modules::show))
        .route("/modules/{id}/download", get(crate::modules::download))
        .route(
            "/files/modules/{id}/cosign-bundle",
            get(crate::modules::cosign_bundle),
        );
    Router::new()
        .nest(API_PREFIX, api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Envelope and errors

/// An error response: `{"success":false,"error":..,"code":..}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }
    fn param_missing(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "PARAMETER_MISSING",
            format!("param is missing or the value is empty: {name}"),
        )
    }
    fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            message,
        )
    }
    fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = format!("{e:#}"), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "Internal server error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"success": false, "error": self.message, "code": self.code});
        (self.status, Json(body)).into_response()
    }
}

pub(crate) fn success(data: impl Serialize) -> Response {
    Json(json!({"success": true, "data": data})).into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("Route not found: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("Method {method} not allowed for {}", uri.path()),
    )
}

/// Run blocking store work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::from(anyhow::anyhow!("blocking task failed: {e}")))?
}

/// Current time at whole seconds: X.509, JWT and the API all work in seconds.
fn now() -> OffsetDateTime {
    let n = OffsetDateTime::now_utc();
    n.replace_nanosecond(0).unwrap_or(n)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

// ---------------------------------------------------------------------------------------------
// Body extraction

/// JSON body with the envelope's error codes: 413 above [`MAX_BODY_BYTES`], 400 for anything
/// that is not JSON of the expected shape. An empty body is treated as `{}`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_DRAIN_BYTES as u64) {
            return Err(ApiError::too_large());
        }
        let bytes = read_capped(req.into_body()).await?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse_body(text).map(JsonBody)
    }
}

/// Parse a request body. Syntax errors and type errors get distinct messages, and a type error
/// names the offending top-level field (serde_json's own message only has a position).
fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
    let whole_error = match T::deserialize(&value) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    // Every field of our request types is optional, so a one-field object fails only if that
    // field itself is bad.
    if let serde_json::Value::Object(map) = &value {
        for (key, field) in map {
            let single =
                serde_json::Value::Object(std::iter::once((key.clone(), field.clone())).collect());
            if let Err(e) = T::deserialize(&single) {
                return Err(ApiError::bad_request(format!(
                    "Invalid value for parameter {key}: {e}"
                )));
            }
        }
    }
    Err(ApiError::bad_request(format!(
        "Invalid request body: {whole_error}"
    )))
}

async fn read_capped(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("Could not read body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if total > MAX_DRAIN_BYTES {
            break;
        }
        if total <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(ApiError::too_large());
    }
    Ok(Bytes::from(buf))
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.trim().is_empty())
}

// ---------------------------------------------------------------------------------------------
// Instance authentication

/// An authenticated instance: the verified client certificate's CN matched an enrolled instance
/// and the bearer JWT is valid for that same instance.
#[derive(Debug, Clone)]
pub struct InstanceAuth {
    pub instance_id: String,
    /// Serial (hex) of the client certificate this request was made with.
    pub serial: String,
}

impl FromRequestParts<Arc<AppState>> for InstanceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let cert = parts
            .extensions
            .get::<PeerInfo>()
            .and_then(|p| p.client_cert.clone());
        let token = instance_token(&parts.headers);
        let (cert, token) = match (cert, token) {
            (Some(c), Some(t)) => (c, t),
            (None, None) => {
                return Err(ApiError::unauthorized(
                    "Instance token or mTLS client certificate required",
                ));
            }
            (None, Some(_)) => {
                return Err(ApiError::unauthorized("mTLS client certificate required"));
            }
            (Some(_), None) => {
                return Err(ApiError::unauthorized(
                    "Instance token required (Authorization: Bearer)",
                ));
            }
        };
        let (cn, serial) = ca::cn_and_serial(&cert).map_err(|e| {
            ApiError::unauthorized(format!("Invalid mTLS client certificate: {e:#}"))
        })?;
        let claims = state
            .jwt
            .verify(&token, now().unix_timestamp())
            .map_err(|e| match e {
                JwtError::TokenType => ApiError::unauthorized("Invalid token type"),
                e => ApiError::unauthorized(format!("Invalid instance token: {e}")),
            })?;
        if claims.sub != cn {
            return Err(ApiError::unauthorized(
                "Instance token subject does not match the mTLS client certificate",
            ));
        }
        let store = state.store.clone();
        let seen = serial.clone();
        let instance_id = blocking(move || {
            store.transact(|s| {
                let Some(instance) = s
                    .instances
                    .values_mut()
                    .find(|i| i.instance_id == cn || i.mtls_subject == cn)
                else {
                    return Err(ApiError::unauthorized(
                        "Instance not found for mTLS subject",
                    ));
                };
                if matches!(instance.status.as_str(), "terminated" | "error") {
                    return Err(ApiError::unauthorized("Instance is not active"));
                }
                let outcome = if instance.note_serial_seen(&seen) {
                    Outcome::Changed
                } else {
                    Outcome::Unchanged
                };
                Ok((instance.instance_id.clone(), outcome))
            })
        })
        .await?;
        Ok(Self {
            instance_id,
            serial,
        })
    }
}

/// `X-Instance-Token`, else `Authorization: Bearer` (upstream order).
fn instance_token(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers
        .get(INSTANCE_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some(t.to_owned());
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = auth.trim().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Handlers

#[derive(Debug, Deserialize)]
struct EnrollRequest {
    #[serde(default)]
    bootstrap_token: Option<String>,
    #[serde(default)]
    csr_pem: Option<String>,
    #[serde(default)]
    agent_version: Option<String>,
    #[serde(default)]
    dmi_uuid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RefreshRequest {
    #[serde(default)]
    csr_pem: Option<String>,
    #[serde(default)]
    agent_version: Option<String>,
}

/// The `data` of `enroll` and `enroll/refresh`.
#[derive(Debug, Serialize)]
struct Credentials {
    cert_pem: String,
    ca_chain_pem: String,
    instance_id: String,
    mtls_subject: String,
    not_after: String,
    certificate_id: String,
    instance_token: String,
}

/// Issue a certificate + JWT for `instance` and record the certificate on it.
fn issue_credentials(
    state: &AppState,
    instance: &mut Instance,
    csr_pem: &str,
    now: OffsetDateTime,
) -> Result<Credentials, ApiError> {
    let ttl =
        time::Duration::seconds(i64::try_from(state.config.cert_ttl_secs).unwrap_or(i64::MAX));
    let leaf = state
        .ca
        .issue_client_cert(csr_pem, &instance.mtls_subject, ttl, now)
        .map_err(|e| ApiError::validation(format!("CSR/CA failure: {e}")))?;
    let certificate_id = uuid::Uuid::new_v4().to_string();
    instance.certificates_issued.push(IssuedCertificate {
        certificate_id: certificate_id.clone(),
        serial: leaf.serial_hex,
        issued_at: now,
        not_after: leaf.not_after,
    });
    let claims = Claims::instance(
        &instance.instance_id,
        now.unix_timestamp(),
        state.config.jwt_ttl_secs,
    );
    Ok(Credentials {
        cert_pem: leaf.cert_pem,
        ca_chain_pem: state.ca.cert_pem().to_owned(),
        instance_id: instance.instance_id.clone(),
        mtls_subject: instance.mtls_subject.clone(),
        not_after: rfc3339(leaf.not_after),
        certificate_id,
        instance_token: state.jwt.sign(&claims),
    })
}

async fn enroll(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<PeerInfo>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<EnrollRequest>,
) -> Result<Response, ApiError> {
    let header_token = headers
        .get(BOOTSTRAP_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned());
    let Some(token) = non_empty(req.bootstrap_token).or(non_empty(header_token)) else {
        return Err(ApiError::unauthorized(
            "Bootstrap token required (body :bootstrap_token or header X-Bootstrap-Token)",
        ));
    };
    let Some(csr_pem) = non_empty(req.csr_pem) else {
        return Err(ApiError::param_missing("csr_pem"));
    };
    let remote_ip = peer.map(|Extension(p)| p.remote.ip().to_string());
    let agent_version = non_empty(req.agent_version);
    let dmi_uuid = non_empty(req.dmi_uuid);

    let st = state.clone();
    let creds = blocking(move || {
        st.store.transact(|s| {
            let now = now();
            let Some(tok) = s.token_mut(&token) else {
                return Err(ApiError::validation("invalid or expired bootstrap token"));
            };
            if tok.consumed_at.is_some() {
                return Err(ApiError::validation("token already consumed"));
            }
            if tok.expires_at <= now {
                return Err(ApiError::validation("invalid or expired bootstrap token"));
            }
            // Consumption and issuance are one store transaction: a CSR failure returns Err
            // and nothing is written (the token stays usable), and a success can never leave
            // the token unconsumed.
            tok.consumed_at = Some(now);
            tok.consumed_from_ip = remote_ip;
            let instance_id = tok.instance_uuid.clone();
            let instance = s
                .instances
                .entry(instance_id.clone())
                .or_insert_with(|| Instance::new(&instance_id, now));
            if agent_version.is_some() {
                instance.agent_version = agent_version;
            }
            if dmi_uuid.is_some() {
                instance.dmi_uuid = dmi_uuid;
            }
            let creds = issue_credentials(&st, instance, &csr_pem, now)?;
            tracing::info!(instance_id = %creds.instance_id, "enrolled");
            Ok((creds, Outcome::Changed))
        })
    })
    .await?;
    Ok(success(creds))
}

async fn refresh(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    JsonBody(req): JsonBody<RefreshRequest>,
) -> Result<Response, ApiError> {
    let Some(csr_pem) = non_empty(req.csr_pem) else {
        return Err(ApiError::param_missing("csr_pem"));
    };
    let agent_version = non_empty(req.agent_version);
    let st = state.clone();
    let creds = blocking(move || {
        st.store.transact(|s| {
            let now = now();
            let Some(instance) = s.instances.get_mut(&auth.instance_id) else {
                return Err(ApiError::unauthorized("Instance not found"));
            };
            if agent_version.is_some() {
                instance.agent_version = agent_version;
            }
            let creds = issue_credentials(&st, instance, &csr_pem, now)?;
            tracing::info!(instance_id = %creds.instance_id, "credentials refreshed");
            Ok((creds, Outcome::Changed))
        })
    })
    .await?;
    Ok(success(creds))
}

#[derive(Debug, Deserialize)]
struct HeartbeatRequest {
    #[serde(default)]
    boot_id: Option<String>,
    #[serde(default)]
    agent_version: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    uptime_seconds: Option<u64>,
    #[serde(default)]
    module_digests: Option<BTreeMap<String, String>>,
    #[serde(default)]
    mount_state: Option<String>,
    #[serde(default)]
    load_average: Option<String>,
    #[serde(default)]
    memory_free_kb: Option<u64>,
    #[serde(default)]
    sdwan_state: Option<Vec<serde_json::Value>>,
}

async fn heartbeat(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    JsonBody(req): JsonBody<HeartbeatRequest>,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let server_time = blocking(move || {
        st.store.transact(|s| {
            let now = now();
            let Some(i) = s.instances.get_mut(&auth.instance_id) else {
                return Err(ApiError::unauthorized("Instance not found"));
            };
            // Upstream stores "unknown" for blank ids/versions; keep that so the admin view
            // shows that the agent sent nothing rather than a stale value.
            i.boot_id = Some(non_empty(req.boot_id).unwrap_or_else(|| "unknown".into()));
            i.agent_version =
                Some(non_empty(req.agent_version).unwrap_or_else(|| "unknown".into()));
            if let Some(a) = non_empty(req.architecture) {
                i.architecture = Some(a);
            }
            i.uptime_seconds = req.uptime_seconds;
            i.module_digests = req.module_digests.unwrap_or_default();
            i.mount_state = req.mount_state;
            i.load_average = req.load_average;
            i.memory_free_kb = req.memory_free_kb;
            i.sdwan_state = req.sdwan_state;
            i.last_heartbeat_at = Some(now);
            i.last_heartbeat_serial = Some(auth.serial.clone());
            i.heartbeat_count += 1;
            if i.status == store::STATUS_PENDING {
                i.status = store::STATUS_RUNNING.to_owned();
            }
            Ok((now, Outcome::Changed))
        })
    })
    .await?;
    Ok(success(json!({
        "acknowledged": true,
        "server_time": rfc3339(server_time),
        "next_poll_seconds": state.config.next_poll_seconds,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)] // fields exist to be type-checked by serde
    struct Sample {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        count: Option<u64>,
    }

    #[test]
    fn body_errors_are_specific() {
        let cases: &[(&str, &str)] = &[
            ("{not json", "Invalid JSON body: "),
            (
                r#"{"name": "a", "count": "many"}"#,
                "Invalid value for parameter count: ",
            ),
            (r#"{"name": 5}"#, "Invalid value for parameter name: "),
            ("[1, 2]", "Invalid request body: "),
        ];
        for (body, want) in cases {
            let err = parse_body::<Sample>(body.as_bytes()).expect_err(body);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.code, "BAD_REQUEST");
            assert!(err.message.starts_with(want), "{body}: {}", err.message);
        }
        let ok: Sample = parse_body(br#"{"name":"a","unknown":[1]}"#).expect("ok");
        assert_eq!(ok.name.as_deref(), Some("a"));
    }

    #[test]
    fn bearer_parsing() {
        /// (request headers, expected token)
        type Case = (
            &'static [(&'static str, &'static str)],
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (&[("authorization", "Bearer abc")], Some("abc")),
            (&[("authorization", "bearer  abc ")], Some("abc")),
            (&[("authorization", "Basic abc")], None),
            (&[("authorization", "Bearer ")], None),
            (
                &[("x-instance-token", "xyz"), ("authorization", "Bearer abc")],
                Some("xyz"),
            ),
            (&[], None),
        ];
        for (headers, want) in cases {
            let mut map = HeaderMap::new();
            for (k, v) in headers.iter() {
                map.insert(*k, HeaderValue::from_static(v));
            }
            assert_eq!(instance_token(&map).as_deref(), *want, "{headers:?}");
        }
    }
}
