//! The HTTP side: axum routes for the OpenAI endpoints, `/health` and `/metrics`,
//! the bearer-key check, server-sent events for `stream: true`, and OpenAI-shaped
//! errors for everything that goes wrong (bad JSON, a body too large, an unknown
//! route or method, a full queue).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Endpoint, Generation};
use super::engine::{Event, Job};
use super::metrics::{Metrics, SlotFacts};
use crate::chat::{encode_rendered, ChatTemplate};
use crate::sample::SamplingParams;
use crate::tokenizer::Tokenizer;

/// What every handler reads.
pub struct AppState {
    pub jobs: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub facts: SlotFacts,
    pub tokenizer: &'static Tokenizer,
    pub template: ChatTemplate,
    /// The id `/v1/models` lists; requests may name it or leave `model` out.
    pub model_id: String,
    pub api_key: Option<String>,
    pub defaults: SamplingParams,
    pub created: i64,
    pub next_id: AtomicU64,
}

type Shared = Arc<AppState>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// The router: `/v1/*` behind the key (when one is set), `/health` and `/metrics`
/// open, bodies over `body_limit` bytes refused with 413.
pub fn router(state: Shared, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::status(404, "not_found_error", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::status(
                405,
                "invalid_request_error",
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn require_key(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            Metrics::add(&s.metrics.requests_failed, 1);
            return ApiError::status(
                401,
                "invalid_request_error",
                "invalid or missing API key (send Authorization: Bearer KEY)",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "slots": s.facts.slots,
        "slots_busy": s.metrics.active.load(Ordering::Relaxed),
        "queued": s.metrics.queued.load(Ordering::Relaxed),
    }))
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.facts),
    )
        .into_response()
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.model_id, "object": "model", "created": s.created, "owned_by": "kvsharer",
        "meta": {"n_ctx": s.facts.n_ctx, "slots": s.facts.slots,
                 "kv_cache_bytes": s.facts.kv_bytes},
    }]}))
}

async fn chat(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let prepared = parse::<ChatRequest>(&s, body).and_then(|req| {
        let gen = api::check_common(&req.common, &s.defaults, None)?;
        let messages = api::chat_messages(&req.messages)?;
        let text = s.template.render(&messages, true).map_err(|e| {
            ApiError::invalid(format!("the chat template refused the messages: {e}"))
        })?;
        let prompt = encode_rendered(s.tokenizer, &text)
            .map_err(|e| ApiError::invalid(format!("cannot tokenize the messages: {e}")))?;
        Ok((prompt, gen))
    });
    respond(s, Endpoint::Chat, prepared).await
}

async fn completions(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let prepared = parse::<CompletionRequest>(&s, body).and_then(|req| {
        // OpenAI's default for completions is 16 tokens.
        let gen = api::check_common(&req.common, &s.defaults, Some(16))?;
        let text = api::completion_prompt(&req.prompt)?;
        let mut prompt = s
            .tokenizer
            .encode(&text, true, false)
            .map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}")))?;
        if prompt.is_empty() {
            prompt.extend(s.tokenizer.bos());
        }
        Ok((prompt, gen))
    });
    respond(s, Endpoint::Completion, prepared).await
}

/// The body as a `T`, and the model it names checked.
fn parse<T: serde::de::DeserializeOwned + HasModel>(
    s: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    Metrics::add(&s.metrics.requests, 1);
    let body = body.map_err(|r| {
        ApiError::status(r.status().as_u16(), "invalid_request_error", r.body_text())
    })?;
    let req: T = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not a valid request: {e}")))?;
    match req.model() {
        Some(m) if !m.is_empty() && m != s.model_id && m != format!("{}.gguf", s.model_id) => {
            Err(ApiError::status(
                404,
                "invalid_request_error",
                format!(
                    "the model '{m}' does not exist (this server has '{}')",
                    s.model_id
                ),
            )
            .with_code("model_not_found"))
        }
        _ => Ok(req),
    }
}

trait HasModel {
    fn model(&self) -> Option<&str>;
}

impl HasModel for ChatRequest {
    fn model(&self) -> Option<&str> {
        self.common.model.as_deref()
    }
}

impl HasModel for CompletionRequest {
    fn model(&self) -> Option<&str> {
        self.common.model.as_deref()
    }
}

/// Queues the job and answers: one JSON body, or a stream of events.
async fn respond(
    s: Shared,
    endpoint: Endpoint,
    prepared: Result<(Vec<u32>, Generation), ApiError>,
) -> Response {
    let result = async {
        let (prompt, gen) = prepared?;
        if prompt.len() >= s.facts.n_ctx {
            return Err(ApiError::invalid(format!(
                "the prompt is {} tokens but a slot's context holds {} (leave room for the answer)",
                prompt.len(),
                s.facts.n_ctx
            ))
            .with_code("context_length_exceeded"));
        }
        let (tx, mut rx) = unbounded_channel();
        let stream = gen.stream;
        let include_usage = gen.include_usage;
        s.metrics.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = s.jobs.try_send(Job {
            prompt,
            gen,
            events: tx,
        }) {
            s.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                TrySendError::Full(_) => ApiError {
                    retry_after: Some(1),
                    ..ApiError::status(
                        503,
                        "server_error",
                        "every slot is busy and the queue is full; retry shortly",
                    )
                },
                TrySendError::Disconnected(_) => {
                    ApiError::status(503, "server_error", "the server is shutting down")
                }
            });
        }
        let id = endpoint.id(s.next_id.fetch_add(1, Ordering::Relaxed));
        let created = jiff::Timestamp::now().as_second();
        // The first event decides between an answer and an error status.
        let first = rx.recv().await;
        if let Some(Event::Failed(e)) = first {
            return Err(e);
        }
        if stream {
            let head = Head {
                endpoint,
                id,
                created,
                model: s.model_id.clone(),
                include_usage,
            };
            return Ok(sse(head, first, rx).into_response());
        }
        let mut text = String::new();
        let mut event = first;
        loop {
            match event {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done { finish, usage }) => {
                    let body = endpoint.answer(&id, created, &s.model_id, &text, finish, usage);
                    return Ok(Json(body).into_response());
                }
                Some(Event::Failed(e)) => return Err(e),
                None => return Err(ApiError::server("the engine stopped")),
            }
            event = rx.recv().await;
        }
    }
    .await;
    result.unwrap_or_else(|e| {
        Metrics::add(&s.metrics.requests_failed, 1);
        e.into_response()
    })
}

/// What every event of one streamed answer repeats.
struct Head {
    endpoint: Endpoint,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
}

impl Head {
    fn data(&self, v: Value) -> SseEvent {
        SseEvent::default().data(v.to_string())
    }

    /// The events one engine event becomes.
    fn events(&self, event: Event) -> Vec<SseEvent> {
        let (e, id, created, model) = (self.endpoint, &self.id, self.created, &self.model);
        match event {
            Event::Text(t) => vec![self.data(e.chunk(id, created, model, Some(&t), None))],
            Event::Done { finish, usage } => {
                let mut out = vec![self.data(e.chunk(id, created, model, None, Some(finish)))];
                if self.include_usage {
                    out.push(self.data(e.usage_chunk(id, created, model, usage)));
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
            Event::Failed(err) => vec![self.data(err.body())],
        }
    }
}

/// `stream: true`: server-sent events, ending in `data: [DONE]` (or an error event).
/// Dropping the stream (the client went away) closes the job's channel, which
/// frees its slot.
fn sse(
    head: Head,
    first: Option<Event>,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let head = Arc::new(head);
    let opening = match head.endpoint {
        Endpoint::Chat => {
            vec![head.data(
                head.endpoint
                    .chunk(&head.id, head.created, &head.model, None, None),
            )]
        }
        Endpoint::Completion => Vec::new(),
    };
    let rest = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    let events = stream::iter(first).chain(rest).flat_map({
        let head = head.clone();
        move |e| stream::iter(head.events(e))
    });
    Sse::new(stream::iter(opening).chain(events).map(Ok))
}
