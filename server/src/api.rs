//! The HTTP API: routes, authentication, request parsing and the response shapes of OpenAI's
//! chat and text completions.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_engine::chat::{tokenize_chat, ChatError, ChatMessage, ChatTemplate};
use airlock_engine::context_shift::{trim_history, TrimError, Trimmed};
use airlock_engine::generate::{GenerateParams, Generation, StopReason};
use airlock_engine::load::LoadedModel;
use airlock_engine::sampling::{Sampler, SamplerConfig, SamplingError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::metrics::HttpCounts;
use crate::scheduler::{Event, Job, Penalties, Stats, TokenLogprob};
use crate::ServerConfig;

pub struct AppState {
    pub(crate) loaded: Arc<LoadedModel>,
    template: Option<ChatTemplate>,
    queue: SyncSender<Job>,
    keys: Vec<Vec<u8>>,
    pub(crate) model_name: String,
    defaults: SamplerConfig,
    fingerprint: String,
    started: u64,
    counter: AtomicU64,
    pub draining: AtomicBool,
    /// Completion requests from arrival until their response is sent (a stream: until its
    /// body ends or its client leaves); draining waits for this to reach 0.
    pub(crate) in_flight: AtomicUsize,
    pub(crate) stats: Arc<Stats>,
    pub(crate) http: HttpCounts,
    pub(crate) n_slots: usize,
    /// Origins that get CORS headers (`--cors-origin`; "*" = any).
    cors: Vec<String>,
    /// Bound to loopback: requests must name a loopback host or one of `allow_hosts`.
    check_host: bool,
    allow_hosts: Vec<String>,
    timeout: Option<Duration>,
    max_tokens: Option<usize>,
    log_prompts: bool,
    page: crate::page::Page,
}

impl AppState {
    pub fn new(
        loaded: Arc<LoadedModel>,
        template: Option<ChatTemplate>,
        queue: SyncSender<Job>,
        cfg: &ServerConfig,
        fingerprint: String,
        stats: Arc<Stats>,
        loopback: bool,
    ) -> Self {
        AppState {
            loaded,
            template,
            queue,
            keys: cfg.api_keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            model_name: cfg.model_name.clone(),
            defaults: cfg.defaults,
            fingerprint,
            started: unix_now(),
            counter: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            stats,
            http: HttpCounts::default(),
            n_slots: cfg.parallel,
            cors: cfg.cors_origins.clone(),
            check_host: loopback,
            allow_hosts: cfg.allow_hosts.clone(),
            timeout: cfg.timeout,
            max_tokens: cfg.max_tokens,
            log_prompts: cfg.log_prompts,
            page: crate::page::Page::new(),
        }
    }
}

type AppStateRef = Arc<AppState>;

/// Counts one completion request in [`AppState::in_flight`] while it lives.
struct InFlight(AppStateRef);

impl InFlight {
    fn new(st: &AppStateRef) -> Self {
        st.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(st.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Most stop strings a request may give, and the longest one in bytes.
const MAX_STOP: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// Most alternatives `top_logprobs` / completions' `logprobs` may ask for.
const MAX_TOP_LOGPROBS: u64 = 20;

pub fn router(state: AppStateRef, max_body: usize) -> Router {
    // Layers run outermost last-added first: count the request, check its Host, answer CORS
    // preflights (which carry no key), then check the key.
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize_route))
        .route("/detokenize", post(detokenize_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .layer(middleware::from_fn_with_state(state.clone(), host_check))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// What answers while the model loads: 503 everywhere (`/health` says "loading"), so a load
/// balancer or a client sees the server is coming rather than a hanging connection.
pub fn loading_router() -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async {
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"status": "loading"})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("loading"),
                "the model is still loading; retry shortly".into(),
            )
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        msg: String,
    ) -> Self {
        ApiError {
            status,
            message: msg,
            kind,
            code,
        }
    }

    fn bad(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            msg.into(),
        )
    }

    fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("unsupported_parameter"),
            msg.into(),
        )
    }

    fn internal(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            msg.into(),
        )
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        format!(
            "no route {} {}: the API has GET /health, GET /metrics, GET /v1/models, \
             POST /v1/chat/completions, POST /v1/completions, POST /tokenize, POST /detokenize \
             and the chat page at GET /",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        Some("method_not_allowed"),
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Counts every response by route and status for /metrics (routes by their pattern, so the
/// series stay few whatever paths clients send).
async fn count(State(st): State<AppStateRef>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| match p.as_str() {
            "/" => "/",
            "/health" => "/health",
            "/metrics" => "/metrics",
            "/v1/models" => "/v1/models",
            "/v1/chat/completions" => "/v1/chat/completions",
            "/v1/completions" => "/v1/completions",
            "/tokenize" => "/tokenize",
            "/detokenize" => "/detokenize",
            _ => "other",
        });
    let resp = next.run(req).await;
    st.http.add(route, resp.status().as_u16());
    resp
}

/// Is `host` (a Host header: name or address, maybe a port) a loopback name, or one allowed
/// with --allow-host? Names compare without their port and case.
pub(crate) fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(name) || a.eq_ignore_ascii_case(host))
}

/// On a loopback bind, a request whose Host is not a loopback name is refused: a web page
/// whose name an attacker re-points at 127.0.0.1 (DNS rebinding) must not reach the model
/// from an analyst's browser. A request without Host (HTTP/1.0) cannot come from a browser.
async fn host_check(State(st): State<AppStateRef>, req: Request, next: Next) -> Response {
    if st.check_host {
        let host = req
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{fffd}"))
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if let Some(host) = host {
            if !host_allowed(host, &st.allow_hosts) {
                eprintln!("refused a request for Host {host:?} (not loopback; see --allow-host)");
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "invalid_request_error",
                    Some("host_not_allowed"),
                    format!(
                        "Host {host:?} is not allowed: this server listens on loopback and \
                         answers only requests for localhost or a loopback address (a proxy \
                         should send `Host: 127.0.0.1`, or start the server with --allow-host \
                         NAME)"
                    ),
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// CORS only for the origins given with --cors-origin: a preflight from one of them is
/// answered here (it carries no key), and its other responses get the allow-origin header.
/// Without the flag no CORS header is ever sent, so browsers keep other sites' pages out.
async fn cors(State(st): State<AppStateRef>, req: Request, next: Next) -> Response {
    if st.cors.is_empty() {
        return next.run(req).await;
    }
    let allowed = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| st.cors.iter().any(|c| c == "*" || c == o))
        .map(|o| {
            if st.cors.iter().any(|c| c == o) {
                o.to_string()
            } else {
                "*".to_string()
            }
        });
    let Some(origin) = allowed.and_then(|o| HeaderValue::from_str(&o).ok()) else {
        return next.run(req).await;
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    resp
}

/// Every route but /health and the chat page needs a key when keys are set (the page holds
/// no data: it asks for the key and sends it with each call). Keys are compared in constant
/// time (each candidate against each key; a length difference shows only as a mismatch).
async fn auth(State(st): State<AppStateRef>, req: Request, next: Next) -> Response {
    if st.keys.is_empty() || req.uri().path() == "/health" || req.uri().path() == "/" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .map(|v| v.strip_prefix(b"Bearer ").unwrap_or(b""));
    let unauthorized = |msg: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            msg.to_string(),
        )
        .into_response()
    };
    match given {
        None => unauthorized(
            "missing API key: send the header `Authorization: Bearer KEY` with a key this server \
             was started with",
        ),
        Some(k) => {
            let mut ok = subtle::Choice::from(0);
            for key in &st.keys {
                ok |= key.as_slice().ct_eq(k);
            }
            if bool::from(ok) {
                next.run(req).await
            } else {
                unauthorized("invalid API key")
            }
        }
    }
}

async fn health(State(st): State<AppStateRef>) -> Response {
    if crate::is_draining(&st.draining) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

async fn models(State(st): State<AppStateRef>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_name,
            "object": "model",
            "created": st.started,
            "owned_by": "airlock",
            "meta": {"n_ctx": st.loaded.n_ctx, "n_vocab": st.loaded.model.config.vocab_size},
        }],
    }))
}

/// The chat page: one static document built into the binary, with a Content-Security-Policy
/// that lets it load nothing from anywhere else.
async fn page(State(st): State<AppStateRef>) -> Response {
    st.page.response()
}

async fn metrics(State(st): State<AppStateRef>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        crate::metrics::render(&st),
    )
        .into_response()
}

/// llama-server's POST /tokenize: `content`, `add_special` (BOS; default false),
/// `parse_special` (control-token texts become their ids; default true), `with_pieces`.
async fn tokenize_route(
    State(st): State<AppStateRef>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let m = parse_body(body)?;
    let content = match field(&m, "content") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::bad("`content` must be a string")),
        None => return Err(ApiError::bad("`content` is required")),
    };
    let add_special = opt_bool(&m, "add_special")?.unwrap_or(false);
    let parse_special = opt_bool(&m, "parse_special")?.unwrap_or(true);
    let with_pieces = opt_bool(&m, "with_pieces")?.unwrap_or(false);
    let st2 = st.clone();
    let ids = tokio::task::spawn_blocking(move || {
        let tok = &st2.loaded.tokenizer;
        tok.encode(
            &content,
            add_special && tok.add_bos_default(),
            parse_special,
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
    .map_err(|e| ApiError::bad(format!("`content` cannot be tokenized: {e}")))?;
    let tok = &st.loaded.tokenizer;
    let tokens: Vec<Value> = if with_pieces {
        ids.iter()
            .map(|&id| {
                let bytes = tok.token_piece(id).unwrap_or(&[]);
                // As llama-server: the piece as a string when it is valid UTF-8, else its bytes.
                let piece = match std::str::from_utf8(bytes) {
                    Ok(s) => json!(s),
                    Err(_) => json!(bytes),
                };
                json!({"id": id, "piece": piece})
            })
            .collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(Json(json!({ "tokens": tokens })))
}

/// llama-server's POST /detokenize: `tokens` (ids) in, `content` out (control tokens
/// rendered as their text, as llama-server does).
async fn detokenize_route(
    State(st): State<AppStateRef>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let m = parse_body(body)?;
    let list = match field(&m, "tokens") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad("`tokens` must be an array of token ids")),
        None => return Err(ApiError::bad("`tokens` is required")),
    };
    let n_vocab = st.loaded.tokenizer.vocab_size();
    let mut ids = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        match v.as_u64() {
            Some(id) if id < n_vocab as u64 => ids.push(id as u32),
            _ => {
                return Err(ApiError::bad(format!(
                    "`tokens[{i}]` = {v} is not a token id (0 to {})",
                    n_vocab - 1
                )))
            }
        }
    }
    let content = st
        .loaded
        .tokenizer
        .decode(&ids, true)
        .map_err(|e| ApiError::bad(format!("`tokens`: {e}")))?;
    Ok(Json(json!({ "content": content })))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(
    State(st): State<AppStateRef>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    complete(st, body, Kind::Chat).await
}

async fn completions(
    State(st): State<AppStateRef>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    complete(st, body, Kind::Text).await
}

/// A validated request, ready to tokenize.
struct Parsed {
    input: Input,
    sampler: SamplerConfig,
    params: GenerateParams,
    stream: bool,
    include_usage: bool,
    /// Alternatives per token when log-probabilities are asked for.
    logprobs: Option<usize>,
    penalties: Penalties,
    cache_prompt: bool,
}

enum Input {
    Messages(Vec<ChatMessage>),
    Prompt(String),
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                "the request body is larger than this server accepts (--max-body)".into(),
            )
        } else {
            ApiError::bad(format!("cannot read the request body: {}", rej.body_text()))
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad("the request body must be a JSON object")),
    }
}

/// A field that is absent or null reads as None.
fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).filter(|v| !v.is_null())
}

fn opt_f32(m: &Map<String, Value>, name: &str) -> Result<Option<f32>, ApiError> {
    match field(m, name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| ApiError::bad(format!("`{name}` must be a number"))),
    }
}

fn opt_u64(m: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match field(m, name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("`{name}` must be a non-negative integer"))),
    }
}

fn opt_bool(m: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(m, name) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("`{name}` must be true or false"))),
    }
}

fn parse_request(m: &Map<String, Value>, kind: Kind, st: &AppState) -> Result<Parsed, ApiError> {
    // Refused rather than silently ignored: each would change what the client gets.
    if let Some(n) = field(m, "n") {
        if n.as_u64() != Some(1) {
            return Err(ApiError::unsupported(format!(
                "`n` = {n} is not supported: airlock returns one choice per request (send n = 1 \
                 or leave it out, and send several requests for several answers)"
            )));
        }
    }
    if field(m, "tools").is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::unsupported(
            "`tools` is not supported: airlock does not do tool calling",
        ));
    }
    if let Some(rf) = field(m, "response_format") {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::unsupported(
                "`response_format` is not supported: airlock has no JSON mode or schema-constrained \
                 output (only {\"type\": \"text\"} is accepted)",
            ));
        }
    }
    // Chat: `logprobs` true/false and `top_logprobs` alternatives; completions: `logprobs`
    // is the number of alternatives.
    let top_range = |name: &str, n: u64| -> Result<usize, ApiError> {
        if n > MAX_TOP_LOGPROBS {
            return Err(ApiError::bad(format!(
                "`{name}` = {n} is too large (at most {MAX_TOP_LOGPROBS})"
            )));
        }
        Ok(n as usize)
    };
    let logprobs = match kind {
        Kind::Chat => {
            let on = opt_bool(m, "logprobs")?.unwrap_or(false);
            let top = opt_u64(m, "top_logprobs")?;
            match (on, top) {
                (false, None | Some(0)) => None,
                (false, Some(_)) => {
                    return Err(ApiError::bad("`top_logprobs` needs `logprobs`: true"))
                }
                (true, top) => Some(top_range("top_logprobs", top.unwrap_or(0))?),
            }
        }
        Kind::Text => match opt_u64(m, "logprobs")? {
            None => None,
            Some(n) => Some(top_range("logprobs", n)?),
        },
    };
    let mut penalties = Penalties::default();
    for (name, slot) in [
        ("presence_penalty", &mut penalties.presence),
        ("frequency_penalty", &mut penalties.frequency),
    ] {
        if let Some(x) = opt_f32(m, name)? {
            if !(-2.0..=2.0).contains(&x) {
                return Err(ApiError::bad(format!(
                    "`{name}` = {x} is out of range: expected a number from -2 to 2"
                )));
            }
            *slot = x;
        }
    }
    let cache_prompt = opt_bool(m, "cache_prompt")?.unwrap_or(true);
    if kind == Kind::Text && opt_bool(m, "echo")? == Some(true) {
        return Err(ApiError::unsupported("`echo` is not supported"));
    }

    let input =
        match kind {
            Kind::Chat => Input::Messages(parse_messages(m)?),
            Kind::Text => match field(m, "prompt") {
                Some(Value::String(s)) => Input::Prompt(s.clone()),
                Some(_) => return Err(ApiError::bad(
                    "`prompt` must be a string (arrays of prompts or token ids are not supported)",
                )),
                None => return Err(ApiError::bad("`prompt` is required")),
            },
        };

    let mut sampler = st.defaults;
    if let Some(t) = opt_f32(m, "temperature")? {
        sampler.temperature = t;
    }
    if let Some(p) = opt_f32(m, "top_p")? {
        sampler.top_p = p;
    }
    if let Some(k) = opt_u64(m, "top_k")? {
        sampler.top_k = k as usize;
    }
    if let Some(p) = opt_f32(m, "min_p")? {
        sampler.min_p = p;
    }
    if let Some(p) = opt_f32(m, "repeat_penalty")? {
        sampler.repeat_penalty = p;
    }
    if let Some(n) = opt_u64(m, "repeat_last_n")? {
        sampler.repeat_last_n = n as usize;
    }
    if let Some(seed) = field(m, "seed") {
        // OpenAI's seed is any integer; a negative one is taken as its two's complement.
        let s = seed
            .as_u64()
            .or_else(|| seed.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::bad("`seed` must be an integer"))?;
        sampler.seed = Some(s);
    }
    let (mt_name, max_tokens) = match opt_u64(m, "max_completion_tokens")? {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", opt_u64(m, "max_tokens")?),
    };
    let max_tokens = match (max_tokens, st.max_tokens) {
        (Some(n), Some(cap)) if n > cap as u64 => {
            return Err(ApiError::bad(format!(
                "`{mt_name}` = {n} is more than this server allows ({cap}, its --max-tokens)"
            )))
        }
        (Some(n), _) => Some(n.min(usize::MAX as u64) as usize),
        (None, cap) => cap,
    };
    let stop = match field(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("`stop` must be a string or a list of strings"))?,
        Some(_) => {
            return Err(ApiError::bad(
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    // Each generated token is checked against every stop string's prefixes: bound that work.
    if stop.len() > MAX_STOP || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad(format!(
            "`stop` may hold at most {MAX_STOP} strings of at most {MAX_STOP_BYTES} bytes each"
        )));
    }
    let stream = opt_bool(m, "stream")?.unwrap_or(false);
    let include_usage = match field(m, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|_| ApiError::bad("`stream_options.include_usage` must be true or false"))?
            .unwrap_or(false),
        Some(_) => return Err(ApiError::bad("`stream_options` must be an object")),
    };
    let params = GenerateParams {
        max_tokens,
        batch: 0,
        stop,
        ignore_eos: opt_bool(m, "ignore_eos")?.unwrap_or(false),
        render_special: false,
    };
    Ok(Parsed {
        input,
        sampler,
        params,
        stream,
        include_usage,
        logprobs,
        penalties,
        cache_prompt,
    })
}

fn parse_messages(m: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = match field(m, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::bad("`messages` must not be empty")),
        Some(_) => return Err(ApiError::bad("`messages` must be an array")),
        None => return Err(ApiError::bad("`messages` is required")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let obj = msg
            .as_object()
            .ok_or_else(|| ApiError::bad(format!("`messages[{i}]` must be an object")))?;
        let role = match field(obj, "role") {
            Some(Value::String(r)) => r.clone(),
            _ => {
                return Err(ApiError::bad(format!(
                    "`messages[{i}].role` must be a string"
                )))
            }
        };
        let content = match field(obj, "content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let ty = part.get("type").and_then(Value::as_str);
                    match (ty, part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (Some("text"), None) => {
                            return Err(ApiError::bad(format!(
                                "`messages[{i}].content[{j}].text` must be a string"
                            )))
                        }
                        (Some(other), _) => {
                            return Err(ApiError::unsupported(format!(
                                "`messages[{i}].content[{j}].type` {other:?} is not supported: \
                                 only text parts are"
                            )))
                        }
                        (None, _) => {
                            return Err(ApiError::bad(format!(
                                "`messages[{i}].content[{j}]` must be an object with a `type`"
                            )))
                        }
                    }
                }
                text
            }
            _ => {
                return Err(ApiError::bad(format!(
                    "`messages[{i}].content` must be a string or an array of text parts"
                )))
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

/// What a context shift dropped from a chat request's conversation.
#[derive(Clone, Copy, Debug)]
struct Shift {
    messages: usize,
    turns: usize,
}

impl Shift {
    fn header(self) -> String {
        format!("dropped {} messages", self.messages)
    }
}

fn context_length_exceeded(message: String) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("context_length_exceeded"),
        message,
    )
}

/// Renders messages with the chat template and tokenizes them (special tokens are parsed only
/// in the template's framing).
fn chat_ids(st: &AppState, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    let tok = &st.loaded.tokenizer;
    let template = st.template.as_ref().ok_or_else(|| {
        ApiError::bad(
            "this model's chat template cannot be used; use /v1/completions, or restart \
             the server with --chat-template llama3|chatml",
        )
    })?;
    let segments = template
        .render_segments(messages, true)
        .map_err(|e| match e {
            ChatError::Raised(msg) => {
                ApiError::bad(format!("`messages` refused by the chat template: {msg}"))
            }
            // The template compiled and rendered a sample conversation when the model
            // loaded, so a render that fails now, or that these messages push past a
            // limit, is the request's doing: a 400 naming it, not a server fault.
            ChatError::OutputTooLarge(_)
            | ChatError::Render(_)
            | ChatError::MemoryExceeded { .. }
            | ChatError::TimeExceeded { .. }
            | ChatError::ContentTransformed => ApiError::bad(format!("`messages`: {e}")),
            // The render process failing to start, or a template that no longer
            // compiles: this server's fault.
            e => ApiError::internal(format!("chat template: {e}")),
        })?;
    tokenize_chat(tok, &segments, tok.add_bos_default())
        .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))
}

/// Tokenizes a request's input (the chat template for messages; special tokens are parsed
/// only in the template's framing, and in a raw prompt as `airlock run` does).
///
/// A conversation that leaves no room in a slot's context for a reply is shifted as `airlock
/// chat` shifts one (the engine's [`trim_history`]): the oldest turns after the system prompt
/// are dropped until it takes at most half the context, or the newest turn alone with the
/// system prompt when that needs more; the answer says what was dropped. A raw prompt is never
/// cut.
fn tokenize(st: &AppState, input: &Input) -> Result<(Vec<u32>, Option<Shift>), ApiError> {
    let tok = &st.loaded.tokenizer;
    let n_ctx = st.loaded.n_ctx;
    let (ids, shift) = match input {
        Input::Messages(messages) => {
            let ids = chat_ids(st, messages)?;
            if ids.len() < n_ctx {
                (ids, None)
            } else {
                let count = |m: &[ChatMessage]| chat_ids(st, m).map(|ids| ids.len());
                let trimmed: Trimmed = trim_history(messages, n_ctx / 2, n_ctx - 1, count)
                    .map_err(|e| match e {
                        TrimError::Count(e) => e,
                        TrimError::TooLong { tokens, .. } => context_length_exceeded(format!(
                            "the system prompt and the last turn alone take {tokens} tokens, \
                             too many for a slot's context of {n_ctx} tokens (the server's -c) \
                             with room for a reply, even with the older messages left out"
                        )),
                    })?;
                if trimmed.dropped_messages() == 0 {
                    // Nothing older to drop (a single turn that needs the whole context).
                    return Err(context_length_exceeded(format!(
                        "the messages take {} tokens, too many for a slot's context of {n_ctx} \
                         tokens (the server's -c) with room for a reply",
                        ids.len()
                    )));
                }
                let shift = Shift {
                    messages: trimmed.dropped_messages(),
                    turns: trimmed.dropped_turns,
                };
                (chat_ids(st, &trimmed.kept(messages))?, Some(shift))
            }
        }
        Input::Prompt(p) => (
            tok.encode(p, tok.add_bos_default(), true)
                .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))?,
            None,
        ),
    };
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    if ids.len() > n_ctx {
        return Err(context_length_exceeded(format!(
            "the prompt is {} tokens, more than the {n_ctx} tokens of a slot's context \
             (the server's -c)",
            ids.len()
        )));
    }
    Ok((ids, shift))
}

fn sampling_error(e: SamplingError) -> ApiError {
    match e {
        SamplingError::BadParam {
            name,
            value,
            expected,
        } => ApiError::bad(format!(
            "`{name}` = {value} is invalid: expected {expected}"
        )),
        SamplingError::RepeatWindowTooLarge(_) => ApiError::bad(format!("`repeat_last_n`: {e}")),
        e => ApiError::bad(e.to_string()),
    }
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

fn usage(prompt: usize, cached: usize, completion: usize, shift: Option<Shift>) -> Value {
    let mut u = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    });
    if let Some(s) = shift {
        u["context_shift"] = json!({"dropped_messages": s.messages, "dropped_turns": s.turns});
    }
    u
}

fn queue_timeout(st: &AppState, id: &str) -> ApiError {
    eprintln!("{id}: timed out waiting for a slot (--timeout)");
    st.stats.timed_out.fetch_add(1, Ordering::Relaxed);
    let timeout = st.timeout;
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("timeout"),
        format!(
            "the server is busy: no slot came free within this server's request time limit \
             ({} s, --timeout); retry later",
            timeout.map_or(0.0, |t| t.as_secs_f64())
        ),
    )
}

/// A completion refused because the server is stopping (a load balancer retries elsewhere).
fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("shutting_down"),
        "the server is shutting down: it finishes the requests in flight and takes no new ones"
            .into(),
    )
}

async fn complete(
    st: AppStateRef,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    // Counted before the draining check, so a drain that sees 0 in flight cannot miss a request
    // that got past it.
    let in_flight = InFlight::new(&st);
    if crate::is_draining(&st.draining) {
        return Err(shutting_down());
    }
    // The request's time limit counts from its arrival: queueing, prompt and generation.
    let deadline = st.timeout.map(|t| Instant::now() + t);
    let m = parse_body(body)?;
    let parsed = parse_request(&m, kind, &st)?;
    drop(m);
    let sampler = Sampler::new(parsed.sampler).map_err(sampling_error)?;
    let log_input = st.log_prompts.then(|| match &parsed.input {
        Input::Prompt(p) => format!("{p:?}"),
        Input::Messages(ms) => Value::Array(
            ms.iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect(),
        )
        .to_string(),
    });
    let (prompt, shift) = {
        let st = st.clone();
        let input = parsed.input;
        tokio::task::spawn_blocking(move || tokenize(&st, &input))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??
    };

    let n = st.counter.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{:x}{n:06x}", st.started),
        Kind::Text => format!("cmpl-{:x}{n:06x}", st.started),
    };
    let (tx, mut rx) = unbounded_channel();
    let generation = Generation::new(sampler, &parsed.params, &prompt);
    let prompt_len = prompt.len();
    let job = Job {
        id: id.clone(),
        prompt,
        generation,
        events: tx,
        cache_prompt: parsed.cache_prompt,
        logprobs: parsed.logprobs,
        max_tokens: parsed.params.max_tokens,
        penalties: parsed.penalties,
        deadline,
        log_text: st.log_prompts,
    };
    st.stats.queued.fetch_add(1, Ordering::Relaxed);
    match st.queue.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            st.stats.queued.fetch_sub(1, Ordering::Relaxed);
            eprintln!("{id}: refused, the queue is full");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("queue_full"),
                "the server is busy: every slot is generating and the queue is full; retry later"
                    .into(),
            ));
        }
        Err(TrySendError::Disconnected(_)) => {
            st.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(shutting_down());
        }
    }
    eprintln!(
        "{id}: {} queued, {prompt_len} prompt tokens, max_tokens {}, stream {}",
        match kind {
            Kind::Chat => "chat",
            Kind::Text => "completion",
        },
        parsed
            .params
            .max_tokens
            .map_or("none".to_string(), |n| n.to_string()),
        parsed.stream
    );
    if let Some(s) = shift {
        eprintln!(
            "{id}: context shift: dropped the oldest {} messages ({} turns) after the system \
             prompt to fit the slot's context",
            s.messages, s.turns
        );
    }
    if let Some(text) = log_input {
        eprintln!("{id}: prompt: {text}");
    }
    // Wait for a slot, at most until the deadline; giving up drops the receiver, so the
    // scheduler skips the request.
    let first = match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), rx.recv()).await {
            Ok(ev) => ev,
            Err(_) => return Err(queue_timeout(&st, &id)),
        },
        None => rx.recv().await,
    };
    match first {
        Some(Event::Started { .. }) => {}
        Some(Event::Error(e)) => return Err(ApiError::internal(e)),
        Some(_) => return Err(ApiError::internal("the scheduler skipped the start")),
        None if deadline.is_some_and(|d| Instant::now() >= d) => {
            return Err(queue_timeout(&st, &id))
        }
        None => return Err(shutting_down()),
    }
    let head = Head {
        id,
        created: unix_now(),
        model: st.model_name.clone(),
        fingerprint: st.fingerprint.clone(),
        kind,
        logprobs: parsed.logprobs.is_some(),
        shift,
        st: st.clone(),
    };
    let mut response = if parsed.stream {
        stream_response(head, rx, parsed.include_usage, in_flight)
    } else {
        let r = collect_response(head, rx).await;
        drop(in_flight);
        r?
    };
    if let Some(s) = shift {
        if let Ok(v) = HeaderValue::from_str(&s.header()) {
            response.headers_mut().insert("x-airlock-context-shift", v);
        }
    }
    Ok(response)
}

/// The fields every response and chunk of one request share.
struct Head {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    kind: Kind,
    /// Log-probabilities were asked for (`logprobs` is then an object, else null).
    logprobs: bool,
    /// What a context shift dropped from the conversation (reported in `usage`).
    shift: Option<Shift>,
    st: AppStateRef,
}

impl Head {
    fn object(&self, choices: Value, chunk: bool) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        })
    }

    /// The `logprobs` of a choice for these tokens: OpenAI's chat shape (`content`: token,
    /// logprob, bytes, top_logprobs) or its completions shape (tokens, token_logprobs,
    /// top_logprobs, text_offset, counted from `offset` bytes into the text).
    fn logprobs(&self, lps: &[TokenLogprob], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let tok = &self.st.loaded.tokenizer;
        let piece = |id: u32| tok.token_piece(id).unwrap_or(&[]);
        let text = |id: u32| String::from_utf8_lossy(piece(id)).into_owned();
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = lps
                    .iter()
                    .map(|lp| {
                        let top: Vec<Value> = lp
                            .top
                            .iter()
                            .map(|&(id, l)| {
                                json!({"token": text(id), "logprob": l, "bytes": piece(id)})
                            })
                            .collect();
                        json!({
                            "token": text(lp.token),
                            "logprob": lp.logprob,
                            "bytes": piece(lp.token),
                            "top_logprobs": top,
                        })
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Text => {
                let mut at = offset;
                let mut offsets = Vec::with_capacity(lps.len());
                for lp in lps {
                    offsets.push(at);
                    at += text(lp.token).len();
                }
                json!({
                    "tokens": lps.iter().map(|lp| text(lp.token)).collect::<Vec<_>>(),
                    "token_logprobs": lps.iter().map(|lp| lp.logprob).collect::<Vec<_>>(),
                    "top_logprobs": lps
                        .iter()
                        .map(|lp| {
                            lp.top
                                .iter()
                                .map(|&(id, l)| (text(id), json!(l)))
                                .collect::<Map<String, Value>>()
                        })
                        .collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// A streamed chunk carrying `text` (and the finish reason on the last).
    fn chunk(
        &self,
        text: Option<&str>,
        finish: Option<&str>,
        lps: &[TokenLogprob],
        offset: usize,
    ) -> Value {
        let logprobs = if lps.is_empty() {
            Value::Null
        } else {
            self.logprobs(lps, offset)
        };
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.object(json!([choice]), true)
    }
}

async fn collect_response(
    head: Head,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Text { text: t, logprobs }) => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Some(Event::Done {
                text: last,
                reason,
                timed_out: _,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                logprobs,
            }) => {
                text.push_str(&last);
                lps.extend(logprobs);
                let logprobs = head.logprobs(&lps, 0);
                let choice = match head.kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(reason),
                    }),
                    Kind::Text => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(reason),
                    }),
                };
                let mut body = head.object(json!([choice]), false);
                body["usage"] = usage(prompt_tokens, cached_tokens, completion_tokens, head.shift);
                return Ok(Json(body).into_response());
            }
            Some(Event::Error(e)) => return Err(ApiError::internal(e)),
            Some(Event::Started { .. }) => {}
            None => return Err(ApiError::internal("the scheduler stopped")),
        }
    }
}

/// Server-sent events: a role chunk (chat), one chunk per piece of text, a chunk with the
/// finish reason, a usage chunk if asked for, then `[DONE]`. Dropping the stream (the client
/// left) drops the receiver, which frees the request's slot.
fn stream_response(
    head: Head,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
    in_flight: InFlight,
) -> Response {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut first = Vec::new();
    if head.kind == Kind::Chat {
        let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
        first.push(data(head.object(json!([choice]), true)));
    }
    let head = Arc::new(head);
    // (receiver, bytes of text sent so far: completions' text_offset)
    let events = futures_util::stream::unfold(Some((rx, 0usize)), move |state| {
        // The closure owns the guard, so the request counts until the body is dropped (sent
        // to its end, or its client left).
        let _counted = &in_flight;
        let head = head.clone();
        async move {
            let (mut rx, sent) = state?;
            let out = match rx.recv().await {
                Some(Event::Text { text, logprobs }) => {
                    let chunk = data(head.chunk(Some(&text), None, &logprobs, sent));
                    return Some((vec![chunk], Some((rx, sent + text.len()))));
                }
                Some(Event::Started { .. }) => return Some((Vec::new(), Some((rx, sent)))),
                Some(Event::Done {
                    text,
                    reason,
                    timed_out: _,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    logprobs,
                }) => {
                    let mut out = Vec::new();
                    if !text.is_empty() || !logprobs.is_empty() {
                        out.push(data(head.chunk(Some(&text), None, &logprobs, sent)));
                    }
                    out.push(data(head.chunk(None, Some(finish_reason(reason)), &[], 0)));
                    if include_usage {
                        let mut u = head.object(json!([]), true);
                        u["usage"] =
                            usage(prompt_tokens, cached_tokens, completion_tokens, head.shift);
                        out.push(data(u));
                    }
                    out
                }
                Some(Event::Error(e)) => vec![data(ApiError::internal(e).body())],
                None => vec![data(ApiError::internal("the scheduler stopped").body())],
            };
            let mut out = out;
            out.push(SseEvent::default().data("[DONE]"));
            Some((out, None))
        }
    })
    .flat_map(futures_util::stream::iter);
    let all = futures_util::stream::iter(first)
        .chain(events)
        .map(Ok::<_, Infallible>);
    Sse::new(all).into_response()
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_loopback_hosts_and_allowed_names_pass() {
        let none: Vec<String> = Vec::new();
        for h in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(host_allowed(h, &none), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "",
            "airlock",
        ] {
            assert!(!host_allowed(h, &none), "{h}");
        }
        let allowed = vec!["airlock.internal".to_string()];
        assert!(host_allowed("Airlock.Internal:443", &allowed));
        assert!(!host_allowed("other.internal", &allowed));
    }
}
