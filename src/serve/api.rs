//! The OpenAI HTTP API's requests, answers and errors, as far as kvsharer speaks it:
//! `/v1/chat/completions`, `/v1/completions`, `/v1/models`. Requests are checked
//! here, before they reach a slot, so a bad one costs nothing but its 4xx.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::chat::{Message, Role};
use crate::sample::SamplingParams;

/// An error as OpenAI sends it: `{"error": {"message", "type", "code"}}` with a
/// 4xx/5xx status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (503 when the queue is full).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            retry_after: None,
        }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::status(500, "server_error", message)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code, "param": null}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

/// `stop`: one string or a list of up to 4.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of `/v1/completions`: a string or a list holding one string.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What both endpoints share: sampling, length, stops, streaming.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<StopSpec>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub n: Option<i64>,
    /// llama-server's extension: keep generating past end-of-text tokens
    /// (benchmarks that need a fixed length).
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ApiMessage {
    pub role: String,
    /// A string, or OpenAI's list of content parts (only `text` parts are read).
    pub content: Option<Value>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ApiMessage>,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptSpec,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A request's generation settings, checked.
#[derive(Clone, Debug)]
pub struct Generation {
    pub sampling: SamplingParams,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Tokens to generate at most; `None` = until the end of text or the slot's context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

/// Checks the fields both endpoints share. `default_max` is what a request without
/// `max_tokens` gets (OpenAI: 16 for completions, unlimited for chat).
pub fn check_common(
    c: &CommonFields,
    defaults: &SamplingParams,
    default_max: Option<usize>,
) -> Result<Generation, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(format!(
                "n = {n}: only one choice per request is supported"
            ))
            .with_code("invalid_value"));
        }
    }
    let max = match c.max_completion_tokens.or(c.max_tokens) {
        Some(m) if m < 0 => {
            return Err(
                ApiError::invalid(format!("max_tokens must be >= 0, got {m}"))
                    .with_code("invalid_value"),
            )
        }
        Some(m) => Some(m as usize),
        None => default_max,
    };
    let mut sampling = defaults.clone();
    if let Some(t) = c.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(
                ApiError::invalid(format!("temperature must be in [0, 2], got {t}"))
                    .with_code("invalid_value"),
            );
        }
        sampling.temperature = t;
    }
    if let Some(p) = c.top_p {
        sampling.top_p = p;
    }
    if let Some(k) = c.top_k {
        sampling.top_k = k.max(0) as usize;
    }
    if let Some(p) = c.min_p {
        sampling.min_p = p;
    }
    if let Some(r) = c.repeat_penalty {
        sampling.repeat_penalty = r;
    }
    if let Some(seed) = c.seed {
        sampling.seed = seed as u64;
    }
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()).with_code("invalid_value"))?;
    let penalty = |name: &str, v: Option<f32>| match v {
        Some(p) if !(-2.0..=2.0).contains(&p) => Err(ApiError::invalid(format!(
            "{name} must be in [-2, 2], got {p}"
        ))
        .with_code("invalid_value")),
        Some(p) => Ok(p),
        None => Ok(0.0),
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop takes at most 4 sequences").with_code("invalid_value"));
    }
    Ok(Generation {
        sampling,
        presence_penalty: penalty("presence_penalty", c.presence_penalty)?,
        frequency_penalty: penalty("frequency_penalty", c.frequency_penalty)?,
        max_tokens: max,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        ignore_eos: c.ignore_eos,
    })
}

/// The conversation of a chat request, as the chat template sees it.
pub fn chat_messages(messages: &[ApiMessage]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(
            ApiError::invalid("messages must hold at least one message").with_code("invalid_value")
        );
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::invalid(format!(
                    "messages[{i}].role '{other}' is not one of system, developer, user, assistant"
                ))
                    .with_code("invalid_value"))
                }
            };
            let content = match &m.content {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(format!(
                                    "messages[{i}].content: only text parts are supported"
                                )))
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}].content must be a string or a list of text parts"
                    )))
                }
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

/// The single prompt of a completions request.
pub fn completion_prompt(p: &PromptSpec) -> Result<String, ApiError> {
    match p {
        PromptSpec::One(s) => Ok(s.clone()),
        PromptSpec::Many(v) if v.len() == 1 => Ok(v[0].clone()),
        PromptSpec::Many(v) => Err(ApiError::invalid(format!(
            "prompt holds {} strings: only one prompt per request is supported",
            v.len()
        ))
        .with_code("invalid_value")),
    }
}

/// Why generation ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Which endpoint an answer is for: the two differ only in object names and
/// where the text goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }
    }

    pub fn id(self, n: u64) -> String {
        format!("{}-kvsharer-{n}", self.id_prefix())
    }

    /// The whole answer of a request that did not stream.
    pub fn answer(
        self,
        id: &str,
        created: i64,
        model: &str,
        text: &str,
        finish: FinishReason,
        usage: Usage,
    ) -> Value {
        let choice = match self {
            Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": finish}),
            Endpoint::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": id, "object": self.object(false), "created": created, "model": model,
            "choices": [choice], "usage": usage, "system_fingerprint": "kvsharer"})
    }

    /// One server-sent event of a streamed answer: text, the final reason, or (for
    /// the role opening a chat) neither.
    pub fn chunk(
        self,
        id: &str,
        created: i64,
        model: &str,
        text: Option<&str>,
        finish: Option<FinishReason>,
    ) -> Value {
        let choice = match self {
            Endpoint::Chat => {
                let delta = match (text, finish) {
                    (Some(t), _) => json!({"content": t}),
                    (None, None) => json!({"role": "assistant", "content": ""}),
                    (None, Some(_)) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => json!({"index": 0, "text": text.unwrap_or(""),
                "logprobs": null, "finish_reason": finish}),
        };
        json!({"id": id, "object": self.object(true), "created": created, "model": model,
            "choices": [choice], "system_fingerprint": "kvsharer"})
    }

    /// The usage event `stream_options.include_usage` asks for (no choices).
    pub fn usage_chunk(self, id: &str, created: i64, model: &str, usage: Usage) -> Value {
        json!({"id": id, "object": self.object(true), "created": created, "model": model,
            "choices": [], "usage": usage})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(v: Value) -> CommonFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn common_fields_are_checked() {
        let d = SamplingParams::default();
        let g = check_common(
            &common(json!({"temperature": 0, "max_tokens": 5, "stop": "x", "seed": 3})),
            &d,
            None,
        )
        .unwrap();
        assert_eq!(
            (
                g.sampling.temperature,
                g.max_tokens,
                g.stop,
                g.sampling.seed
            ),
            (0.0, Some(5), vec!["x".to_string()], 3)
        );
        for bad in [
            json!({"max_tokens": -1}),
            json!({"temperature": 3}),
            json!({"top_p": 0}),
            json!({"presence_penalty": 2.5}),
            json!({"n": 2}),
            json!({"stop": ["a", "b", "c", "d", "e"]}),
        ] {
            let e = check_common(&common(bad.clone()), &d, None).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
        assert_eq!(
            check_common(&common(json!({})), &d, Some(16))
                .unwrap()
                .max_tokens,
            Some(16)
        );
    }

    #[test]
    fn messages_need_known_roles_and_text() {
        let m = |v: Value| -> Vec<ApiMessage> { serde_json::from_value(v).unwrap() };
        assert!(chat_messages(&[]).is_err());
        assert!(chat_messages(&m(json!([{"role": "robot", "content": "x"}]))).is_err());
        let ok = chat_messages(&m(json!([{"role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])))
        .unwrap();
        assert_eq!(ok[0].content, "ab");
        assert!(chat_messages(&m(json!([{"role": "user", "content": 5}]))).is_err());
    }
}
