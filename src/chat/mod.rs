//! Chat templates: turning a conversation into the prompt text a model was trained on.
//!
//! The template is the model's own Jinja source (GGUF key `tokenizer.chat_template`),
//! evaluated with `minijinja` configured to behave like the Hugging Face
//! `apply_chat_template` environment: `trim_blocks` and `lstrip_blocks` on, loop
//! controls (`break`/`continue`), Python string methods through
//! `minijinja_contrib::pycompat`, and the globals templates expect
//! (`raise_exception`, `strftime_now`, `bos_token`, `eos_token`, `tools = none`).
//!
//! Templates are data from a downloaded file, so rendering is bounded: an
//! instruction budget (minijinja fuel) stops infinite or enormous loops, the VM
//! recursion limit stops runaway macro recursion, and the output is capped.
//! Not bounded: memory used by intermediate strings a template builds without
//! emitting them (e.g. doubling a string in a loop); fuel limits only the number
//! of such steps.

mod conversation;
pub mod engine;

pub use conversation::common_prefix_len;
pub use engine::{ChatEngine, PreparedTurn, TurnError};

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use jiff::fmt::strtime;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// Author of one message in a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One turn of a conversation, as templates see it (`message.role`, `message.content`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not compile{}: {message}", line_suffix(*line))]
    Syntax {
        line: Option<usize>,
        message: String,
    },
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    #[error("chat template exceeded its budget of {0} instructions (runaway loop?)")]
    OutOfFuel(u64),
    #[error("chat template output exceeded the {0}-byte limit")]
    OutputTooLarge(usize),
    #[error("chat template failed to render{}: {message}", line_suffix(*line))]
    Render {
        line: Option<usize>,
        message: String,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// ChatML, used when the GGUF carries no template; the CLI warns because the model
/// may have been trained on a different format.
const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one render may execute. Real templates spend on the order of tens of
/// instructions per message (SmolLM2: about 23), so this covers conversations far
/// longer than any context window while stopping a hostile loop in well under a
/// second or two.
const FUEL_PER_RENDER: u64 = 20_000_000;

/// Nesting depth for the VM (loops, ifs, macro calls); below minijinja's own safe
/// maximum so deep recursion errors out instead of overflowing a small thread stack.
const RECURSION_LIMIT: usize = 200;

/// Fixed allowance on top of the output cap's proportional part.
const OUTPUT_CAP_BASE: usize = 16 << 20;
/// Templates may repeat content (system prompt per turn, etc.), so allow a multiple.
const OUTPUT_CAP_PER_CONTENT_BYTE: usize = 4;

/// A compiled chat template plus the special-token strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("is_fallback", &self.is_fallback)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `template` (the GGUF's `tokenizer.chat_template`, if any). `None`
    /// selects the ChatML fallback, reported by [`ChatTemplate::is_fallback`].
    pub fn new(
        template: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL_PER_RENDER));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);

        let source = template.unwrap_or(CHATML_TEMPLATE).to_owned();
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|err| ChatError::Syntax {
                line: err.line(),
                message: describe(&err),
            })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            is_fallback: template.is_none(),
        })
    }

    /// True when the model had no template and ChatML is used instead.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    /// Renders the whole conversation; with `add_generation_prompt` the text ends with
    /// the template's opening of an assistant turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|err| render_error(&err))?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => Value::from(()),
        };
        let content_bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        let limit = OUTPUT_CAP_BASE
            .saturating_add(content_bytes.saturating_mul(OUTPUT_CAP_PER_CONTENT_BYTE));
        let mut out = CappedBuffer::new(limit);
        match template.render_captured_to(context, &mut out) {
            Ok(_) => {}
            Err(_) if out.exceeded => return Err(ChatError::OutputTooLarge(limit)),
            Err(err) => return Err(render_error(&err)),
        }
        String::from_utf8(out.bytes).map_err(|_| ChatError::Render {
            line: None,
            message: "output is not valid UTF-8".to_owned(),
        })
    }

    /// Text to append to an already-processed conversation so that it becomes `prior`
    /// followed by `new`: `render(prior ++ new)` minus its prefix `render(prior)`,
    /// where `prior` is rendered without a generation prompt (it normally ends with
    /// the assistant's finished reply).
    ///
    /// Returns `Ok(None)` when that prefix relation does not hold, which happens with
    /// templates that render earlier turns differently once more turns follow (e.g.
    /// dropping reasoning from past replies, or a system prompt that depends on the
    /// last message), or when `prior` alone cannot be rendered (some templates reject
    /// conversations of certain shapes). The caller must then re-render and re-process
    /// the whole conversation. Errors rendering the full conversation are returned.
    pub fn render_delta(
        &self,
        prior: &[Message],
        new: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Option<String>, ChatError> {
        let all: Vec<Message> = prior.iter().chain(new).cloned().collect();
        let full = self.render(&all, add_generation_prompt)?;
        let Ok(prefix) = self.render(prior, false) else {
            return Ok(None);
        };
        Ok(full.strip_prefix(prefix.as_str()).map(str::to_owned))
    }
}

/// The template a model file carries, or ChatML when it has none or it does not
/// compile; the second value says why ChatML was chosen (for a warning).
pub fn model_template(
    loaded: &crate::loader::LoadedModel,
) -> Result<(ChatTemplate, Option<String>), ChatError> {
    let tok = &loaded.tokenizer;
    let token_text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_owned();
    let (bos, eos) = (token_text(tok.bos()), token_text(tok.eos()));
    let why = match &loaded.chat_template {
        Some(source) => match ChatTemplate::new(Some(source), &bos, &eos) {
            Ok(t) => return Ok((t, None)),
            Err(e) => format!("the model's chat template is unusable ({e}); using ChatML instead"),
        },
        None => "the model file has no chat template; using ChatML, which it may not have been trained on".to_string(),
    };
    Ok((ChatTemplate::new(None, &bos, &eos)?, Some(why)))
}

/// Text rendered by a chat template to tokens: special-token text becomes those
/// tokens, and BOS is added when the model wants one and the template did not
/// write it. EOS is never appended: a chat prompt is not a finished document.
pub fn encode_rendered(
    tokenizer: &crate::tokenizer::Tokenizer,
    text: &str,
) -> Result<Vec<u32>, crate::tokenizer::TokenizerError> {
    let mut tokens = tokenizer.encode(text, false, true)?;
    if tokenizer.add_bos() {
        if let Some(bos) = tokenizer.bos() {
            if tokens.first() != Some(&bos) {
                tokens.insert(0, bos);
            }
        }
    }
    Ok(tokens)
}

/// Error text without minijinja's debug dump of the template source.
fn describe(err: &minijinja::Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

fn render_error(err: &minijinja::Error) -> ChatError {
    if let Some(raised) = find_raised(err) {
        return ChatError::Raised(raised.0.clone());
    }
    if err.kind() == ErrorKind::OutOfFuel {
        return ChatError::OutOfFuel(FUEL_PER_RENDER);
    }
    ChatError::Render {
        line: err.line(),
        message: describe(err),
    }
}

/// Walks the source chain: a `raise_exception` deep inside a macro or include is
/// wrapped by minijinja in further errors.
fn find_raised(err: &minijinja::Error) -> Option<&TemplateRaised> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<TemplateRaised>() {
            return Some(raised);
        }
        current = e.source();
    }
    None
}

/// Payload of an error raised by the template itself via `raise_exception(msg)`.
#[derive(Debug)]
struct TemplateRaised(String);

impl std::fmt::Display for TemplateRaised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateRaised {}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(TemplateRaised(message)),
    )
}

/// `strftime_now(fmt)`: the current date/time, in UTC (the runtime keeps no time-zone
/// database; templates use this for "Today's date" lines where the day is what matters).
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(&format, now).map_err(|directive| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported directive %{directive}"),
        )
    })
}

/// The `strftime` directives [`format_utc`] takes, with C/Python's meaning (the
/// calendar and the formatting are `jiff`'s).
const DIRECTIVES: &str = "YymdeHIMSpBbhAajwuFTRZznt%";

/// C/Python `strftime` of a UTC instant for the common directives ([`DIRECTIVES`]);
/// an unknown directive is returned as the error so the template author sees which
/// one. A lone `%` at the end is kept as it is. Instants beyond jiff's range (years
/// -9999 to 9999) are clamped to it.
fn format_utc(format: &str, unix_secs: i64) -> Result<String, char> {
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some(d) if DIRECTIVES.contains(d) => {}
                Some(d) => return Err(d),
                None => {}
            }
        }
    }
    let instant = Timestamp::from_second(unix_secs).unwrap_or(if unix_secs < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    });
    let time = instant.to_zoned_datetime(TimeZone::UTC);
    // Only a trailing lone `%` is left for jiff to refuse: format without it.
    let trailing = format.len() - format.trim_end_matches('%').len();
    let (body, lone) = if trailing % 2 == 1 {
        (&format[..format.len() - 1], "%")
    } else {
        (format, "")
    };
    let mut out = strtime::format(body, &time)
        .expect("jiff formats every directive in DIRECTIVES for a UTC time");
    out.push_str(lone);
    Ok(out)
}

/// Render sink that refuses to grow past `limit` bytes, so a template cannot emit
/// unbounded output within its instruction budget.
struct CappedBuffer {
    bytes: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl CappedBuffer {
    fn new(limit: usize) -> Self {
        CappedBuffer {
            bytes: Vec::new(),
            limit,
            exceeded: false,
        }
    }
}

impl io::Write for CappedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("chat template output limit reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct, copied verbatim from the
    /// GGUF metadata of the project's default model.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(Some(SMOLLM2_TEMPLATE), "<|im_start|>", "<|im_end|>").unwrap()
    }

    fn custom(template: &str) -> ChatTemplate {
        ChatTemplate::new(Some(template), "<s>", "</s>").unwrap()
    }

    fn three_turns() -> Vec<Message> {
        vec![
            Message::new(Role::System, "You are a terse assistant."),
            Message::new(Role::User, "What is 2+2?"),
            Message::new(Role::Assistant, "4."),
        ]
    }

    fn next_question() -> Vec<Message> {
        vec![Message::new(Role::User, "And 3+3?")]
    }

    #[test]
    fn smollm2_renders_system_prompt_history_and_generation_prompt() {
        let mut messages = three_turns();
        messages.extend(next_question());
        let text = smollm2().render(&messages, true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n4.<|im_end|>\n\
             <|im_start|>user\nAnd 3+3?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_inserts_default_system_prompt_when_none_given() {
        let messages = vec![Message::new(Role::User, "Hi")];
        let text = smollm2().render(&messages, true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_without_generation_prompt_ends_after_last_message() {
        let text = smollm2().render(&three_turns(), false).unwrap();
        assert!(
            text.ends_with("<|im_start|>assistant\n4.<|im_end|>\n"),
            "{text:?}"
        );
        assert_eq!(text.matches("<|im_start|>").count(), 3);
        assert!(!smollm2().is_fallback());
    }

    #[test]
    fn missing_template_falls_back_to_chatml() {
        let chat = ChatTemplate::new(None, "<s>", "</s>").unwrap();
        assert!(chat.is_fallback());
        let messages = vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hello"),
        ];
        assert_eq!(
            chat.render(&messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            chat.render(&messages, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        );
    }

    #[test]
    fn render_delta_is_the_new_turn_when_prior_render_is_a_prefix() {
        let chat = smollm2();
        let prior = three_turns();
        let new = next_question();
        let delta = chat.render_delta(&prior, &new, true).unwrap().unwrap();
        assert_eq!(
            delta,
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        );

        let all: Vec<Message> = prior.iter().chain(&new).cloned().collect();
        let full = chat.render(&all, true).unwrap();
        assert_eq!(chat.render(&prior, false).unwrap() + &delta, full);
    }

    #[test]
    fn render_delta_from_empty_history_includes_default_system_prompt() {
        let delta = smollm2()
            .render_delta(&[], &[Message::new(Role::User, "Hi")], true)
            .unwrap()
            .unwrap();
        assert!(
            delta.starts_with("<|im_start|>system\nYou are a helpful AI assistant"),
            "{delta:?}"
        );
        assert!(delta.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn render_delta_is_none_when_earlier_turns_render_differently() {
        // The last message is marked, so appending a turn rewrites earlier text.
        let chat = custom("{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}");
        let prior = vec![
            Message::new(Role::User, "a"),
            Message::new(Role::Assistant, "b"),
        ];
        let new = vec![Message::new(Role::User, "c")];
        assert_eq!(chat.render(&prior, false).unwrap(), "a[b]");
        assert_eq!(chat.render_delta(&prior, &new, false).unwrap(), None);
    }

    #[test]
    fn render_delta_is_none_when_prior_alone_is_rejected() {
        let chat = custom(
            "{% if messages[-1].role != 'user' %}{{ raise_exception('last message must be from the user') }}{% endif %}\
             {% for m in messages %}{{ m.content }};{% endfor %}",
        );
        let prior = vec![
            Message::new(Role::User, "a"),
            Message::new(Role::Assistant, "b"),
        ];
        let new = vec![Message::new(Role::User, "c")];
        assert_eq!(chat.render_delta(&prior, &new, false).unwrap(), None);
        // But the full conversation's own errors are reported.
        assert!(matches!(
            chat.render_delta(&new, &prior, false),
            Err(ChatError::Raised(_))
        ));
    }

    #[test]
    fn syntax_error_is_reported_with_its_line() {
        let err = ChatTemplate::new(
            Some("{% for m in messages %}\n{{ m.content }\n{% endfor %}"),
            "",
            "",
        )
        .unwrap_err();
        match &err {
            ChatError::Syntax { line, message } => {
                assert_eq!(*line, Some(2), "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        assert!(err.to_string().contains("line 2"), "{err}");

        let unclosed =
            ChatTemplate::new(Some("{% for m in messages %}{{ m.content }}"), "", "").unwrap_err();
        assert!(matches!(unclosed, ChatError::Syntax { .. }), "{unclosed:?}");
    }

    #[test]
    fn runaway_nested_loop_runs_out_of_fuel_quickly() {
        let chat = custom(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        let started = Instant::now();
        let err = chat.render(&three_turns(), true).unwrap_err();
        assert!(
            matches!(err, ChatError::OutOfFuel(FUEL_PER_RENDER)),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn huge_range_is_rejected() {
        let chat = custom("{% for i in range(1000000000000) %}x{% endfor %}");
        let err = chat.render(&three_turns(), true).unwrap_err();
        assert!(matches!(err, ChatError::Render { .. }), "{err:?}");
    }

    #[test]
    fn unbounded_output_is_cut_off() {
        let chat = custom(
            "{% set block = 'a' * 50000000 %}{% for i in range(1000) %}{{ block }}{% endfor %}",
        );
        let err = chat.render(&three_turns(), true).unwrap_err();
        let ChatError::OutputTooLarge(limit) = err else {
            panic!("expected output limit, got {err:?}");
        };
        assert!((OUTPUT_CAP_BASE..1 << 30).contains(&limit), "{limit}");
    }

    #[test]
    fn infinite_macro_recursion_is_an_error_not_a_stack_overflow() {
        let chat =
            custom("{% macro descend(n) %}{{ descend(n + 1) }}{% endmacro %}{{ descend(0) }}");
        // Run on a thread with a small stack so an unbounded recursion would crash.
        let result = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || chat.render(&[], false).map_err(|e| e.to_string()))
            .unwrap()
            .join()
            .unwrap();
        let err = result.unwrap_err();
        assert!(err.contains("recursion"), "{err}");
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let chat = custom(
            "{% macro check(m) %}{% if m.role == 'assistant' %}\
             {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
             {% endif %}{% endmacro %}\
             {% for m in messages %}{% if loop.first %}{{ check(m) }}{% endif %}{{ m.content }}{% endfor %}",
        );
        let ok = vec![Message::new(Role::User, "hi")];
        assert_eq!(chat.render(&ok, false).unwrap(), "hi");
        let bad = vec![Message::new(Role::Assistant, "hi")];
        let err = chat.render(&bad, false).unwrap_err();
        match &err {
            ChatError::Raised(msg) => {
                assert_eq!(
                    msg,
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                )
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        assert!(err.to_string().contains("must alternate"));
    }

    #[test]
    fn special_tokens_and_absent_tools_are_visible_to_templates() {
        let chat = custom(
            "{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m.content }}{{ eos_token }}{% endfor %}\
             {% if tools is defined and tools is none %}|no-tools{% endif %}\
             {% if add_generation_prompt %}|gen{% endif %}",
        );
        let messages = vec![
            Message::new(Role::User, "x"),
            Message::new(Role::Assistant, "y"),
        ];
        assert_eq!(
            chat.render(&messages, true).unwrap(),
            "<s>user=x</s>assistant=y</s>|no-tools|gen"
        );
        assert_eq!(
            chat.render(&messages, false).unwrap(),
            "<s>user=x</s>assistant=y</s>|no-tools"
        );
    }

    /// Whitespace control, Python string methods and `{% break %}` as Hugging Face's
    /// jinja2 environment handles them (expected output produced by jinja2 3.1 with
    /// trim_blocks, lstrip_blocks and the loopcontrols extension).
    #[test]
    fn behaves_like_transformers_jinja_environment() {
        let chat = custom(
            "{% for m in messages %}\n\
             \x20   {% if m.content.startswith('!') %}\n\
             CMD:{{ m.content[1:].strip().upper() }}\n\
             \x20   {% else %}\n\
             {{ m.role }}:{{ m.content.strip() }}\n\
             \x20   {% endif %}\n\
             \x20   {% if loop.index == 2 %}{% break %}{% endif %}\n\
             {% endfor %}\n\
             {% if tools is none %}no tools{% endif %}",
        );
        let messages = vec![
            Message::new(Role::User, "  hi  "),
            Message::new(Role::Assistant, "! run it "),
            Message::new(Role::User, "never"),
        ];
        assert_eq!(
            chat.render(&messages, false).unwrap(),
            "user:hi\nCMD:RUN IT\nno tools"
        );
    }

    #[test]
    fn long_conversation_fits_in_the_fuel_budget() {
        let messages: Vec<Message> = (0..20_000)
            .map(|i| {
                Message::new(
                    if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    },
                    format!("turn {i}"),
                )
            })
            .collect();
        let text = smollm2().render(&messages, true).unwrap();
        assert_eq!(text.matches("<|im_end|>").count(), 20_001);
        assert!(text.ends_with("<|im_start|>user\nturn 19998<|im_end|>\n<|im_start|>assistant\nturn 19999<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn strftime_now_gives_the_current_date() {
        let chat = custom("{{ strftime_now('%Y-%m-%d') }}");
        let text = chat.render(&[], false).unwrap();
        let parts: Vec<&str> = text.split('-').collect();
        assert_eq!(parts.len(), 3, "{text}");
        let year: i64 = parts[0].parse().unwrap();
        let month: u32 = parts[1].parse().unwrap();
        let day: u32 = parts[2].parse().unwrap();
        assert!(
            (2024..3000).contains(&year) && (1..=12).contains(&month) && (1..=31).contains(&day),
            "{text}"
        );

        let bad = custom("{{ strftime_now('%Q') }}")
            .render(&[], false)
            .unwrap_err();
        assert!(bad.to_string().contains("%Q"), "{bad}");
    }

    /// Expected strings from Python's `datetime.fromtimestamp(t, timezone.utc).strftime`.
    #[test]
    fn utc_formatting_matches_python_strftime() {
        let fmt = "%Y-%m-%d %H:%M:%S %a %A %b %B %j %w %u %I %p %y %e";
        let cases = [
            (
                0,
                "1970-01-01 00:00:00 Thu Thursday Jan January 001 4 4 12 AM 70  1",
            ),
            (
                951_782_400,
                "2000-02-29 00:00:00 Tue Tuesday Feb February 060 2 2 12 AM 00 29",
            ),
            (
                1_721_740_029,
                "2024-07-23 13:07:09 Tue Tuesday Jul July 205 2 2 01 PM 24 23",
            ),
            (
                4_107_542_399,
                "2100-02-28 23:59:59 Sun Sunday Feb February 059 0 7 11 PM 00 28",
            ),
            (
                1_709_164_800,
                "2024-02-29 00:00:00 Thu Thursday Feb February 060 4 4 12 AM 24 29",
            ),
        ];
        for (secs, expected) in cases {
            assert_eq!(format_utc(fmt, secs).unwrap(), expected, "t = {secs}");
        }
        assert_eq!(
            format_utc("%d %b %Y, 100%%", 0).unwrap(),
            "01 Jan 1970, 100%"
        );
        assert_eq!(format_utc("%k", 0), Err('k'));
    }

    /// The directives the test above leaves out, at fixed instants (expected strings
    /// from Python, as above); unknown directives and flags are refused, a trailing
    /// lone `%` is kept.
    #[test]
    fn utc_formatting_of_the_other_directives_matches_python_strftime() {
        let fmt = "%F %T %R %h %Z %z|%n|%t|%e %I %p %%";
        let cases = [
            (
                0,
                "1970-01-01 00:00:00 00:00 Jan UTC +0000|\n|\t| 1 12 AM %",
            ),
            (
                946_684_799,
                "1999-12-31 23:59:59 23:59 Dec UTC +0000|\n|\t|31 11 PM %",
            ),
            (
                1_234_567_890,
                "2009-02-13 23:31:30 23:31 Feb UTC +0000|\n|\t|13 11 PM %",
            ),
            (
                1_735_689_600,
                "2025-01-01 00:00:00 00:00 Jan UTC +0000|\n|\t| 1 12 AM %",
            ),
            (
                4_102_444_799,
                "2099-12-31 23:59:59 23:59 Dec UTC +0000|\n|\t|31 11 PM %",
            ),
            (
                -86_400,
                "1969-12-31 00:00:00 00:00 Dec UTC +0000|\n|\t|31 12 AM %",
            ),
        ];
        for (secs, expected) in cases {
            assert_eq!(format_utc(fmt, secs).unwrap(), expected, "t = {secs}");
        }
        // Out of range: clamped, not a panic.
        assert_eq!(format_utc("%Y", i64::MAX).unwrap(), "9999");
        assert_eq!(format_utc("%Y", i64::MIN).unwrap(), "-9999");
        assert_eq!(format_utc("%Y%", 0).unwrap(), "1970%");
        assert_eq!(format_utc("100%%%", 0).unwrap(), "100%%");
        assert_eq!(format_utc("", 0).unwrap(), "");
        assert_eq!(format_utc("%-d", 0), Err('-'));
        assert_eq!(format_utc("%s", 0), Err('s'));
        assert_eq!(format_utc("%P", 0), Err('P'));
    }

    #[test]
    fn roles_serialize_lowercase() {
        let json = serde_json::to_string(&Message::new(Role::Assistant, "ok")).unwrap();
        assert_eq!(json, r#"{"role":"assistant","content":"ok"}"#);
        let back: Message = serde_json::from_str(r#"{"role":"system","content":"s"}"#).unwrap();
        assert_eq!(back, Message::new(Role::System, "s"));
    }
}
