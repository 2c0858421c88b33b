//! The HTTP API: routes, authentication, request parsing and the response shapes of OpenAI's
//! chat and text completions.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use airlock_engine::chat::{tokenize_chat, ChatError, ChatMessage, ChatTemplate};
use airlock_engine::generate::{GenerateParams, Generation, StopReason};
use airlock_engine::load::LoadedModel;
use airlock_engine::sampling::{Sampler, SamplerConfig, SamplingError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::scheduler::{Event, Job};
use crate::ServerConfig;

pub struct AppState {
    loaded: Arc<LoadedModel>,
    template: Option<ChatTemplate>,
    queue: SyncSender<Job>,
    keys: Vec<Vec<u8>>,
    model_name: String,
    defaults: SamplerConfig,
    fingerprint: String,
    started: u64,
    counter: AtomicU64,
    pub draining: AtomicBool,
}

impl AppState {
    pub fn new(
        loaded: Arc<LoadedModel>,
        template: Option<ChatTemplate>,
        queue: SyncSender<Job>,
        cfg: &ServerConfig,
        fingerprint: String,
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
        }
    }
}

type AppStateRef = Arc<AppState>;

/// Most stop strings a request may give, and the longest one in bytes.
const MAX_STOP: usize = 16;
const MAX_STOP_BYTES: usize = 256;

pub fn router(state: AppStateRef, max_body: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
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
            "no route {} {}: the API has GET /health, GET /v1/models, POST /v1/chat/completions \
             and POST /v1/completions",
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

/// Every route but /health needs a key when keys are set. Keys are compared in constant time
/// (each candidate against each key; a length difference shows only as a mismatch).
async fn auth(State(st): State<AppStateRef>, req: Request, next: Next) -> Response {
    if st.keys.is_empty() || req.uri().path() == "/health" {
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
    let logprobs_wanted = match field(m, "logprobs") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) if kind == Kind::Text => true,
        Some(_) => return Err(ApiError::bad("`logprobs` must be true or false")),
    };
    if logprobs_wanted {
        return Err(ApiError::unsupported("`logprobs` is not supported yet"));
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        if opt_f32(m, name)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::unsupported(format!(
                "`{name}` is not supported yet (use `repeat_penalty`)"
            )));
        }
    }
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
    let max_tokens = match opt_u64(m, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => opt_u64(m, "max_tokens")?,
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
        max_tokens: max_tokens.map(|n| n as usize),
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

/// Tokenizes a request's input (the chat template for messages; special tokens are parsed
/// only in the template's framing, and in a raw prompt as `airlock run` does).
fn tokenize(st: &AppState, input: &Input) -> Result<Vec<u32>, ApiError> {
    let tok = &st.loaded.tokenizer;
    let ids = match input {
        Input::Messages(messages) => {
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
                    ChatError::OutputTooLarge(_) | ChatError::Render(_) => {
                        ApiError::bad(format!("`messages`: {e}"))
                    }
                    e => ApiError::internal(format!("chat template: {e}")),
                })?;
            tokenize_chat(tok, &segments, tok.add_bos_default())
                .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))?
        }
        Input::Prompt(p) => tok
            .encode(p, tok.add_bos_default(), true)
            .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))?,
    };
    let n_ctx = st.loaded.n_ctx;
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    if ids.len() > n_ctx {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            format!(
                "the prompt is {} tokens, more than the {n_ctx} tokens of a slot's context \
                 (the server's -c)",
                ids.len()
            ),
        ));
    }
    Ok(ids)
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

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn complete(
    st: AppStateRef,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let m = parse_body(body)?;
    let parsed = parse_request(&m, kind, &st)?;
    drop(m);
    let sampler = Sampler::new(parsed.sampler).map_err(sampling_error)?;
    let prompt = {
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
    let (tx, rx) = unbounded_channel();
    let generation = Generation::new(sampler, &parsed.params, &prompt);
    let prompt_len = prompt.len();
    let job = Job {
        id: id.clone(),
        prompt,
        generation,
        events: tx,
    };
    match st.queue.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
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
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("shutting_down"),
                "the server is shutting down".into(),
            ))
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
    let head = Head {
        id,
        created: unix_now(),
        model: st.model_name.clone(),
        fingerprint: st.fingerprint.clone(),
        kind,
    };
    if parsed.stream {
        Ok(stream_response(head, rx, parsed.include_usage))
    } else {
        collect_response(head, rx).await
    }
}

/// The fields every response and chunk of one request share.
struct Head {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    kind: Kind,
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

    /// A streamed chunk carrying `text` (and the finish reason on the last).
    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
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
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done {
                text: last,
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                text.push_str(&last);
                let choice = match head.kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish_reason(reason),
                    }),
                    Kind::Text => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": null,
                        "finish_reason": finish_reason(reason),
                    }),
                };
                let mut body = head.object(json!([choice]), false);
                body["usage"] = usage(prompt_tokens, completion_tokens);
                return Ok(Json(body).into_response());
            }
            Some(Event::Error(e)) => return Err(ApiError::internal(e)),
            None => return Err(ApiError::internal("the scheduler stopped")),
        }
    }
}

/// Server-sent events: a role chunk (chat), one chunk per piece of text, a chunk with the
/// finish reason, a usage chunk if asked for, then `[DONE]`. Dropping the stream (the client
/// left) drops the receiver, which frees the request's slot.
fn stream_response(head: Head, rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut first = Vec::new();
    if head.kind == Kind::Chat {
        let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
        first.push(data(head.object(json!([choice]), true)));
    }
    let head = Arc::new(head);
    let events = futures_util::stream::unfold(Some(rx), move |state| {
        let head = head.clone();
        async move {
            let mut rx = state?;
            let out = match rx.recv().await {
                Some(Event::Text(t)) => {
                    return Some((vec![data(head.chunk(Some(&t), None))], Some(rx)));
                }
                Some(Event::Done {
                    text,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let mut out = Vec::new();
                    if !text.is_empty() {
                        out.push(data(head.chunk(Some(&text), None)));
                    }
                    out.push(data(head.chunk(None, Some(finish_reason(reason)))));
                    if include_usage {
                        let mut u = head.object(json!([]), true);
                        u["usage"] = usage(prompt_tokens, completion_tokens);
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
