//! The HTTP gateway: keys under `/v1/kv/{key}`, batches, cluster status, and the operations
//! endpoints (`/livez`, `/readyz`, `/metrics`) on the same listener.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/kv/{key}[?stale=true]` | 200 with the raw value, or `{key, value}` (`value_b64` for binary) with `Accept: application/json`; 404 if absent |
//! | `PUT /v1/kv/{key}` (body: the value) | 204; with `If-None-Match: *` only if absent, else 412 |
//! | `DELETE /v1/kv/{key}` | 200 `{deleted}` |
//! | `POST /v1/kv/{key}?cas` `{expect\|expect_b64\|expect_absent, value\|value_b64}` | 200 `{swapped: true}`, or 412 `{swapped: false, current}` |
//! | `POST /v1/kv/{key}?incr=N` | 200 `{value}` (atomic, like Redis `INCRBY`) |
//! | `POST /v1/batch/get` `{keys, stale}` | 200 `{values: [{key, value}]}` |
//! | `POST /v1/batch/put` `{pairs: [{key, value\|value_b64}]}` | 204 (one write per shard: not atomic across shards) |
//! | `GET /v1/status`, `/v1/nodes`, `/v1/shards/{id}` | the JSON of `ringctl -o json status`, `node list`, `shard show` |
//!
//! Keys are the percent-decoded path after `/v1/kv/`, so any bytes can be a key. Every request
//! but the operations endpoints needs `Authorization: Bearer TOKEN` or a TLS client certificate.
//! Errors are `{"error": {"code", "message", "retryable"}}` with a fitting status.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Accepted, Api, ApiError, ApiResult, Principal, Slotted};

/// Bytes a request body may have above the largest key plus value (JSON and base64 overhead).
pub const BODY_SLACK_BYTES: usize = 64 * 1024;

/// Where a connection comes from and the principal of its client certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certificate: Option<Principal>,
}

struct GatewayListener {
    rx: mpsc::Receiver<Accepted>,
    local: SocketAddr,
}

impl axum::serve::Listener for GatewayListener {
    type Io = Slotted;
    type Addr = Peer;

    async fn accept(&mut self) -> (Slotted, Peer) {
        match self.rx.recv().await {
            Some(a) => (a.stream, Peer { addr: a.peer, certificate: a.certificate }),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer { addr: self.local, certificate: None })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GatewayListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, GatewayListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// Serves the HTTP gateway on the connections `rx` hands over, with the operations routes `ops`.
pub async fn serve(api: Arc<Api>, rx: mpsc::Receiver<Accepted>, local: SocketAddr, ops: Router) {
    if let Err(e) = axum::serve(GatewayListener { rx, local }, router(api, ops).into_make_service_with_connect_info::<Peer>()).await {
        tracing::error!("HTTP gateway stopped: {e}");
    }
}

fn router(api: Arc<Api>, ops: Router) -> Router {
    let l = &api.node.config.limits;
    let body_max = 2 * (l.key_bytes_max + l.value_bytes_max) + BODY_SLACK_BYTES;
    Router::new()
        .route("/v1/kv/{*key}", get(get_key).put(put_key).delete(delete_key).post(post_key))
        .route("/v1/batch/get", post(batch_get))
        .route("/v1/batch/put", post(batch_put))
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/shards/{id}", get(shard))
        .fallback(|| async { error(ApiError::new("not_found", "no such route; see /v1/kv/{key}, /v1/status")) })
        .layer(axum::extract::DefaultBodyLimit::max(body_max))
        .with_state(api)
        .merge(ops)
}

/// The JSON error answer.
fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    metrics::counter!("ringkv_http_requests_total", "code" => status.as_str().to_string()).increment(1);
    (status, Json(json!({"error": {"code": e.code, "message": e.message, "retryable": e.retryable}}))).into_response()
}

fn ok(status: StatusCode, body: impl IntoResponse) -> Response {
    metrics::counter!("ringkv_http_requests_total", "code" => status.as_str().to_string()).increment(1);
    (status, body).into_response()
}

fn respond(r: ApiResult<Response>) -> Response {
    r.unwrap_or_else(error)
}

/// The caller: a bearer token, else the connection's client certificate.
fn principal(api: &Api, headers: &HeaderMap, peer: Option<&Peer>) -> ApiResult<Principal> {
    match headers.get(header::AUTHORIZATION) {
        Some(v) => {
            let token = v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).unwrap_or_default();
            api.authenticate_token(token).ok_or_else(|| ApiError::new("unauthorized", "the bearer token is not valid (unknown or revoked)"))
        }
        None => peer.and_then(|p| p.certificate.clone()).ok_or_else(ApiError::unauthorized),
    }
}

/// The authenticated caller of a request: a request without a valid token or certificate is
/// answered 401 before its handler runs.
struct Who(Principal);

impl axum::extract::FromRequestParts<Arc<Api>> for Who {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, api: &Arc<Api>) -> Result<Who, Response> {
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| &c.0);
        principal(api, &parts.headers, peer).map(Who).map_err(error)
    }
}

/// The key a `/v1/kv/...` request names (after authentication).
struct Key(Vec<u8>);

impl axum::extract::FromRequestParts<Arc<Api>> for Key {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &Arc<Api>) -> Result<Key, Response> {
        key_of(&parts.uri).map(Key).map_err(error)
    }
}

/// A request body, or why it could not be read (too large).
type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// The key a `/v1/kv/...` path names: the percent-decoded rest of the path.
fn key_of(uri: &Uri) -> ApiResult<Vec<u8>> {
    let raw = uri.path().strip_prefix("/v1/kv/").unwrap_or_default();
    let key: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    if key.is_empty() {
        return Err(ApiError::new("bad_request", "an empty key"));
    }
    Ok(key)
}

/// A key or value in JSON: a string if it is UTF-8, else base64 under `NAME_b64`.
fn put_bytes(obj: &mut serde_json::Map<String, Value>, name: &str, b: Option<&[u8]>) {
    match b {
        None => {
            obj.insert(name.into(), Value::Null);
        }
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => {
                obj.insert(name.into(), Value::String(s.into()));
            }
            Err(_) => {
                obj.insert(format!("{name}_b64"), Value::String(base64::engine::general_purpose::STANDARD.encode(b)));
            }
        },
    }
}

/// Reads `NAME` (a string) or `NAME_b64` (base64) from a JSON body.
fn take_bytes(body: &Value, name: &str) -> ApiResult<Option<Vec<u8>>> {
    if let Some(v) = body.get(name).filter(|v| !v.is_null()) {
        return v
            .as_str()
            .map(|s| Some(s.as_bytes().to_vec()))
            .ok_or_else(|| ApiError::new("bad_request", format!("`{name}` must be a string")));
    }
    match body.get(format!("{name}_b64")).filter(|v| !v.is_null()) {
        Some(v) => {
            let s = v.as_str().ok_or_else(|| ApiError::new("bad_request", format!("`{name}_b64` must be a string")))?;
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map(Some)
                .map_err(|e| ApiError::new("bad_request", format!("`{name}_b64` is not base64: {e}")))
        }
        None => Ok(None),
    }
}

fn json_body(body: Body) -> ApiResult<Value> {
    let b = body_bytes(body)?;
    serde_json::from_slice(&b).map_err(|e| ApiError::new("bad_request", format!("the body is not JSON: {e}")))
}

fn body_bytes(body: Body) -> ApiResult<Bytes> {
    body.map_err(|r| {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "bad_request" };
        ApiError::new(code, r.body_text())
    })
}

#[derive(Deserialize, Default)]
struct ReadQuery {
    #[serde(default)]
    stale: bool,
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"))
}

async fn get_key(
    State(api): State<Arc<Api>>,
    Who(who): Who,
    headers: HeaderMap,
    Key(key): Key,
    q: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    respond(
        async {
            let stale = q.map_err(|e| ApiError::new("bad_request", e.body_text()))?.stale;
            match api.get(&who, &key, stale).await? {
                None => Err(ApiError::new("not_found", "no such key")),
                Some(v) if wants_json(&headers) => {
                    let mut o = serde_json::Map::new();
                    put_bytes(&mut o, "key", Some(&key));
                    put_bytes(&mut o, "value", Some(&v));
                    Ok(ok(StatusCode::OK, Json(Value::Object(o))))
                }
                Some(v) => Ok(ok(StatusCode::OK, ([(header::CONTENT_TYPE, "application/octet-stream")], v))),
            }
        }
        .await,
    )
}

async fn put_key(State(api): State<Arc<Api>>, Who(who): Who, headers: HeaderMap, Key(key): Key, body: Body) -> Response {
    respond(
        async {
            let value = body_bytes(body)?;
            let create_only = headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == b"*");
            if create_only {
                let out = api.cas(&who, &key, None, &value).await?;
                if !out.swapped {
                    return Err(ApiError::new("precondition_failed", "the key exists (If-None-Match: *)"));
                }
            } else {
                api.put(&who, &key, &value).await?;
            }
            Ok(ok(StatusCode::NO_CONTENT, ()))
        }
        .await,
    )
}

async fn delete_key(State(api): State<Arc<Api>>, Who(who): Who, Key(key): Key) -> Response {
    respond(
        async {
            let n = api.key_op(&who, &key, ringkv_wire::KeyOp::DeleteCount).await?;
            Ok(ok(StatusCode::OK, Json(json!({"deleted": n > 0}))))
        }
        .await,
    )
}

#[derive(Deserialize, Default)]
struct PostQuery {
    cas: Option<String>,
    incr: Option<i64>,
}

async fn post_key(
    State(api): State<Arc<Api>>,
    Who(who): Who,
    Key(key): Key,
    q: Result<Query<PostQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Response {
    respond(
        async {
            let q = q.map_err(|e| ApiError::new("bad_request", e.body_text()))?.0;
            if let Some(delta) = q.incr {
                let n = api.key_op(&who, &key, ringkv_wire::KeyOp::Incr(delta)).await?;
                return Ok(ok(StatusCode::OK, Json(json!({"value": n}))));
            }
            if q.cas.is_none() {
                return Err(ApiError::new("bad_request", "POST /v1/kv/{key} takes ?cas (compare-and-swap) or ?incr=N"));
            }
            let body = json_body(body)?;
            let new = take_bytes(&body, "value")?.ok_or_else(|| ApiError::new("bad_request", "a compare-and-swap needs `value`"))?;
            let expect = take_bytes(&body, "expect")?;
            let absent = body.get("expect_absent").and_then(Value::as_bool).unwrap_or(false);
            if expect.is_some() == absent {
                return Err(ApiError::new("bad_request", "give exactly one of `expect` (or `expect_b64`) and `expect_absent: true`"));
            }
            let out = api.cas(&who, &key, expect.as_deref(), &new).await?;
            if out.swapped {
                return Ok(ok(StatusCode::OK, Json(json!({"swapped": true}))));
            }
            let mut o = serde_json::Map::new();
            o.insert("swapped".into(), Value::Bool(false));
            put_bytes(&mut o, "current", out.current.as_deref());
            o.insert(
                "error".into(),
                json!({"code": "precondition_failed", "message": "the current value is not the expected one", "retryable": false}),
            );
            Ok(ok(StatusCode::PRECONDITION_FAILED, Json(Value::Object(o))))
        }
        .await,
    )
}

/// Keys of a batch: strings (`keys`) or base64 (`keys_b64`).
fn batch_keys(body: &Value) -> ApiResult<Vec<Vec<u8>>> {
    let bad = || ApiError::new("bad_request", "`keys` must be a list of strings (or `keys_b64` of base64 strings)");
    if let Some(list) = body.get("keys") {
        return list.as_array().ok_or_else(bad)?.iter().map(|k| k.as_str().map(|s| s.as_bytes().to_vec()).ok_or_else(bad)).collect();
    }
    let list = body.get("keys_b64").and_then(Value::as_array).ok_or_else(bad)?;
    list.iter().map(|k| k.as_str().and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok()).ok_or_else(bad)).collect()
}

async fn batch_get(State(api): State<Arc<Api>>, Who(who): Who, body: Body) -> Response {
    respond(
        async {
            let body = json_body(body)?;
            let keys = batch_keys(&body)?;
            let stale = body.get("stale").and_then(Value::as_bool).unwrap_or(false);
            let values = api.batch_get(&who, &keys, stale).await?;
            let out: Vec<Value> = keys
                .iter()
                .zip(values)
                .map(|(k, v)| {
                    let mut o = serde_json::Map::new();
                    put_bytes(&mut o, "key", Some(k));
                    put_bytes(&mut o, "value", v.as_deref());
                    Value::Object(o)
                })
                .collect();
            Ok(ok(StatusCode::OK, Json(json!({"values": out}))))
        }
        .await,
    )
}

async fn batch_put(State(api): State<Arc<Api>>, Who(who): Who, body: Body) -> Response {
    respond(
        async {
            let body = json_body(body)?;
            let bad = || ApiError::new("bad_request", "`pairs` must be a list of {key, value} (or key_b64 / value_b64)");
            let pairs = body.get("pairs").and_then(Value::as_array).ok_or_else(bad)?;
            let mut out = Vec::with_capacity(pairs.len());
            for p in pairs {
                let k = take_bytes(p, "key")?.ok_or_else(bad)?;
                let v = take_bytes(p, "value")?.ok_or_else(bad)?;
                out.push((k, v));
            }
            if out.is_empty() {
                return Err(bad());
            }
            api.batch_put(&who, &out).await?;
            Ok(ok(StatusCode::NO_CONTENT, ()))
        }
        .await,
    )
}

async fn status(State(api): State<Arc<Api>>, Who(who): Who) -> Response {
    respond(async { Ok(ok(StatusCode::OK, Json(api.status(&who).await?))) }.await)
}

async fn nodes(State(api): State<Arc<Api>>, Who(who): Who) -> Response {
    respond(async { Ok(ok(StatusCode::OK, Json(api.status(&who).await?.nodes))) }.await)
}

async fn shard(State(api): State<Arc<Api>>, Who(who): Who, id: Result<Path<u64>, axum::extract::rejection::PathRejection>) -> Response {
    respond(
        async {
            let Path(id) = id.map_err(|e| ApiError::new("bad_request", format!("a shard id is a number: {e}")))?;
            Ok(ok(StatusCode::OK, Json(api.shard(&who, id).await?)))
        }
        .await,
    )
}
