//! `kvsharer chat` driven through a pseudo-terminal, as a person would use it, on the
//! default model with greedy sampling. Numbers printed by `/stats` are checked against
//! what the library computes independently from the saved transcript: the tokens of
//! the rendered conversation, and the prompt tokens a turn should cost when the cache
//! is kept.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use expectrl::process::unix::WaitStatus;
use expectrl::session::OsSession as Session;
use expectrl::{Captures, Eof, Expect, Needle};

use kvsharer::chat::{ChatTemplate, Message, Role};
use kvsharer::loader::{self, LoadedModel};

use crate::support;

/// How long any one wait for the chat's output may take.
const TIMEOUT: Duration = Duration::from_secs(300);

/// `session.expect(needle)` without expectrl's busy loop, which re-reads the pty
/// without pausing and so takes a whole core from the chat it waits on (measured:
/// the test process at 100% CPU beside the chat, a 128-token reply taking minutes):
/// looks at what has arrived every 5 ms, for up to `TIMEOUT`.
fn wait_for<N: Needle>(session: &mut Session, needle: N) -> Result<Captures, expectrl::Error> {
    let start = Instant::now();
    loop {
        let found = session.check(&needle)?;
        if !found.is_empty() {
            return Ok(found);
        }
        if start.elapsed() > TIMEOUT {
            return Err(expectrl::Error::ExpectTimeout);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// rustyline clears the line and draws the prompt with this sequence.
const PROMPT: &str = "\x1b[K> ";
/// rustyline turns bracketed paste off once a line is accepted: the reply follows.
const LINE_ACCEPTED: &str = "\x1b[?2004l\r\n";

struct Chat {
    session: Session,
    _data_dir: tempfile::TempDir,
    data_path: PathBuf,
}

impl Chat {
    fn start(args: &[&str]) -> Chat {
        let data_dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvsharer"));
        cmd.arg("chat")
            .arg("-m")
            .arg(support::default_model_path())
            // One thread: chats run beside other tests, and ggml's threads spin at
            // their barriers, which collapses when cores are oversubscribed.
            .args(["--temp", "0", "-t", "1"])
            .args(args)
            .env("KVSHARER_DATA_DIR", data_dir.path());
        let mut session = Session::spawn(cmd).expect("spawn kvsharer chat in a pty");
        wait_for(&mut session, PROMPT).expect("the first prompt appears");
        let data_path = data_dir.path().to_path_buf();
        Chat {
            session,
            _data_dir: data_dir,
            data_path,
        }
    }

    /// Sends `raw` (which ends with Enter) and returns everything printed from the
    /// moment the input was accepted until the next prompt, escape sequences removed.
    /// Redraws of the prompt while editing (continuation lines, pastes, Ctrl-C) come
    /// before the acceptance and are skipped.
    fn submit(&mut self, raw: &str) -> String {
        self.session.send(raw).unwrap();
        wait_for(&mut self.session, LINE_ACCEPTED).expect("the input is accepted");
        self.until_prompt().trim().to_owned()
    }

    fn until_prompt(&mut self) -> String {
        let found = wait_for(&mut self.session, PROMPT).expect("the prompt comes back");
        strip_escapes(&String::from_utf8_lossy(found.before()))
    }

    /// Sends one line; returns what it printed (for a message: the reply).
    fn line(&mut self, text: &str) -> String {
        self.submit(&format!("{text}\r"))
    }

    fn ask(&mut self, text: &str) -> String {
        self.line(text)
    }

    fn stats(&mut self) -> Stats {
        let out = self.line("/stats");
        Stats::parse(&out)
    }

    fn save(&mut self) -> (serde_json::Value, Vec<Message>) {
        let file = self.data_path.join("transcript.json");
        let out = self.line(&format!("/save {}", file.display()));
        assert!(out.contains("[saved "), "{out}");
        let text = std::fs::read_to_string(&file).expect("/save wrote the file");
        let json: serde_json::Value = serde_json::from_str(&text).expect("/save writes valid JSON");
        let messages: Vec<Message> = serde_json::from_value(json["messages"].clone())
            .expect("messages are role/content objects");
        (json, messages)
    }

    fn exit_status(&mut self) -> WaitStatus {
        wait_for(&mut self.session, Eof).expect("the process closes the terminal");
        self.session.get_process().wait().unwrap()
    }
}

fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

#[derive(Debug)]
struct Stats {
    context: usize,
    n_ctx: usize,
    messages: usize,
    prompt_tokens: Option<usize>,
    generated_tokens: Option<usize>,
    stop: Option<String>,
    kv_bytes: usize,
    saved_bytes: usize,
    map: String,
}

/// The number after `key` in `text` (e.g. `key = "context: "`).
fn number_after(text: &str, key: &str) -> usize {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {text:?}"))
        + key.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {text:?}"))
}

impl Stats {
    fn parse(out: &str) -> Stats {
        let context_line = out
            .lines()
            .find(|l| l.starts_with("context: "))
            .expect("context line");
        let reply_line = out
            .lines()
            .find(|l| l.starts_with("last reply: "))
            .expect("last reply line");
        let kv_line = out
            .lines()
            .find(|l| l.starts_with("KV cache: "))
            .expect("KV line");
        let map_line = out
            .lines()
            .find(|l| l.starts_with("sharing map: "))
            .expect("map line");
        let replied = !reply_line.contains("none yet");
        Stats {
            context: number_after(context_line, "context: "),
            n_ctx: number_after(context_line, " of "),
            messages: number_after(context_line, "tokens, "),
            prompt_tokens: replied.then(|| number_after(reply_line, "prompt ")),
            generated_tokens: replied.then(|| number_after(reply_line, "generation ")),
            stop: replied.then(|| {
                let open = reply_line.rfind('(').unwrap();
                reply_line[open + 1..reply_line.len() - 1].to_owned()
            }),
            kv_bytes: number_after(kv_line, "allocated ("),
            saved_bytes: number_after(kv_line, "saves "),
            map: map_line["sharing map: ".len()..].trim().to_owned(),
        }
    }
}

/// The library's view of the conversation: template and tokenizer from the model.
struct Reference {
    loaded: LoadedModel,
    template: ChatTemplate,
}

impl Reference {
    fn load() -> Reference {
        let loaded = loader::load(&support::default_model_path()).expect("model loads");
        let tok = &loaded.tokenizer;
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_owned();
        let template = ChatTemplate::new(
            loaded.chat_template.as_deref(),
            &text(tok.bos()),
            &text(tok.eos()),
        )
        .expect("the model's template compiles");
        Reference { loaded, template }
    }

    /// Tokens of the rendered conversation: special tokens parsed, BOS once at the
    /// start when the model asks for it.
    fn tokens(&self, messages: &[Message], add_generation_prompt: bool) -> usize {
        let text = self
            .template
            .render(messages, add_generation_prompt)
            .unwrap();
        let tok = &self.loaded.tokenizer;
        let ids = tok.encode(&text, false, true).unwrap();
        let needs_bos = tok.add_bos() && tok.bos().is_some() && ids.first() != tok.bos().as_ref();
        ids.len() + usize::from(needs_bos)
    }

    /// KV bytes for an unshared f16 cache of `n_ctx` cells.
    fn kv_bytes_f16(&self, n_ctx: usize) -> usize {
        let c = &self.loaded.model.config;
        c.n_layers * n_ctx * 2 * c.n_head_kv * c.head_dim * 2
    }
}

#[test]
fn second_answer_uses_the_first_and_the_cache_is_kept() {
    let reference = Reference::load();
    let mut chat = Chat::start(&["-n", "24", "-c", "1024"]);

    let before = chat.stats();
    assert_eq!(before.context, 0);
    assert_eq!(before.messages, 0);
    assert_eq!(before.n_ctx, 1024);
    assert!(before.prompt_tokens.is_none());
    assert_eq!(
        before.kv_bytes,
        reference.kv_bytes_f16(1024),
        "unshared f16 cache for 1024 cells"
    );
    assert_eq!(before.saved_bytes, 0);
    assert!(before.map.starts_with("identity"), "{}", before.map);

    let first = chat.ask("My name is Zorblax. Please remember my name.");
    assert!(!first.is_empty());
    let s1 = chat.stats();
    let (_, m1) = chat.save();
    assert_eq!(m1.len(), 2);
    assert_eq!(
        m1[0],
        Message::new(Role::User, "My name is Zorblax. Please remember my name.")
    );
    assert_eq!(m1[1].role, Role::Assistant);
    assert!(
        first.contains(m1[1].content.trim()),
        "printed {first:?}, saved {:?}",
        m1[1].content
    );
    assert_eq!(s1.messages, 2);
    assert_eq!(s1.prompt_tokens, Some(reference.tokens(&m1[..1], true)));
    assert_eq!(
        s1.context,
        reference.tokens(&m1, false),
        "the cache holds the rendered conversation"
    );

    let second = chat.ask("What is my name?");
    assert!(
        second.contains("Zorblax"),
        "the second answer should recall the name: {second:?}"
    );
    let s2 = chat.stats();
    let (json, m2) = chat.save();
    assert_eq!(m2.len(), 4);
    assert_eq!(m2[..2], m1[..]);
    assert_eq!(m2[2], Message::new(Role::User, "What is my name?"));
    // Only the new turn was evaluated: everything before it came from the cache.
    let with_question = reference.tokens(&m2[..3], true);
    assert_eq!(s2.prompt_tokens, Some(with_question - s1.context));
    assert!(s2.prompt_tokens.unwrap() < 30, "{s2:?}");
    assert_eq!(s2.context, reference.tokens(&m2, false));
    assert!(s2.context > s1.context + s2.generated_tokens.unwrap());
    assert_eq!(json["settings"]["ctx_size"], 1024);
    assert_eq!(json["settings"]["n_predict"], 24);
    assert_eq!(json["settings"]["temperature"], 0.0);

    chat.session.send("\x04").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));
}

#[test]
fn ctrl_c_stops_a_reply_and_the_session_still_answers() {
    let reference = Reference::load();
    let mut chat = Chat::start(&["-n", "400", "-c", "1024"]);
    chat.session
        .send("Write a very long story about a dragon who learns to fly.\r")
        .unwrap();
    wait_for(&mut chat.session, LINE_ACCEPTED).unwrap();
    wait_for(&mut chat.session, expectrl::Regex("[A-Za-z]{3}")).expect("the reply starts");
    chat.session.send("\x03").unwrap();
    let out = chat.until_prompt();
    assert!(out.contains("[reply stopped]"), "{out:?}");
    let s1 = chat.stats();
    assert_eq!(s1.stop.as_deref(), Some("stopped"));
    assert!(s1.generated_tokens.unwrap() < 400, "{s1:?}");

    let answer = chat.ask("What is the capital of France?");
    assert!(answer.chars().any(char::is_alphabetic), "{answer:?}");
    let s2 = chat.stats();
    let (_, messages) = chat.save();
    assert_eq!(
        messages.len(),
        4,
        "the stopped reply stays in the conversation"
    );
    assert_eq!(s2.messages, 4);
    assert_ne!(s2.stop.as_deref(), Some("stopped"));
    assert_eq!(s2.context, reference.tokens(&messages, false));
    assert_eq!(
        s2.prompt_tokens,
        Some(reference.tokens(&messages[..3], true) - s1.context)
    );

    chat.session.send("/quit\r").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));
}

#[test]
fn a_small_context_survives_many_turns_by_dropping_old_ones() {
    let reference = Reference::load();
    let system = "You are a helpful assistant. Answer in one short sentence.";
    let mut chat = Chat::start(&["-n", "24", "-c", "256", "--system", system]);
    let questions = [
        "What is the capital of France?",
        "Name a large animal that lives in the ocean.",
        "What color is the sky on a clear day?",
        "How many legs does a spider have?",
        "What do bees make?",
        "Which planet is known as the red planet?",
        "What is frozen water called?",
        "What is the opposite of hot?",
        "Name a fruit that is yellow.",
        "What do cows drink?",
    ];
    let mut notices = 0;
    for q in questions {
        let out = chat.ask(q);
        notices += out.matches("[context full: dropped").count();
        let s = chat.stats();
        assert!(s.context <= 256, "{s:?}");
    }
    assert!(
        notices >= 1,
        "ten turns of about 40 tokens overflow 256 cells"
    );
    let s = chat.stats();
    let (_, messages) = chat.save();
    assert_eq!(
        messages[0],
        Message::new(Role::System, system),
        "the system prompt is kept"
    );
    assert!(messages.len() < 1 + 2 * questions.len());
    assert_eq!(messages.last().unwrap().role, Role::Assistant);
    assert_eq!(
        messages[messages.len() - 2],
        Message::new(Role::User, questions[9])
    );
    assert_eq!(s.messages, messages.len());
    assert_eq!(
        s.context,
        reference.tokens(&messages, false),
        "cache matches the kept conversation"
    );

    chat.session.send("\x04").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));
}

#[test]
fn a_reply_that_fills_the_context_stops_with_a_notice() {
    let reference = Reference::load();
    let mut chat = Chat::start(&["-n", "-1", "-c", "128"]);
    let out = chat.ask("Write a very long story about a dragon who learns to fly.");
    assert!(out.contains("[context full: reply stopped"), "{out:?}");
    let s1 = chat.stats();
    assert_eq!(s1.stop.as_deref(), Some("context full"));
    assert_eq!(s1.context, 128);

    // This model answers "Say hi." briefly, so the reply ends its turn.
    let out = chat.ask("Say hi.");
    assert!(
        out.contains("[context full: dropped the oldest 1 turn(s)"),
        "{out:?}"
    );
    let s2 = chat.stats();
    assert_eq!(s2.stop.as_deref(), Some("end of turn"));
    let (_, messages) = chat.save();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0], Message::new(Role::User, "Say hi."));
    assert_eq!(s2.context, reference.tokens(&messages, false));

    chat.session.send("\x04").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));
}

#[test]
fn continued_and_pasted_lines_make_one_message_and_history_is_saved() {
    let mut chat = Chat::start(&["-n", "4"]);
    chat.submit("line one \\\rline two\r");
    chat.submit("\x1b[200~pasted a\npasted b\x1b[201~\r");
    let (_, messages) = chat.save();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0], Message::new(Role::User, "line one \nline two"));
    assert_eq!(messages[2], Message::new(Role::User, "pasted a\npasted b"));

    let help = chat.line("/help");
    assert!(
        help.contains("/stats") && help.contains("/save FILE"),
        "{help}"
    );
    let unknown = chat.line("/frobnicate");
    assert!(unknown.contains("unknown command /frobnicate"), "{unknown}");
    chat.session.send("\x04").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));
    let history = std::fs::read_to_string(chat.data_path.join("chat_history.txt"))
        .expect("history file written");
    assert!(
        history.contains("line two") && history.contains("pasted b") && history.contains("/help"),
        "{history}"
    );
}

#[test]
fn ctrl_d_and_ctrl_c_at_an_empty_prompt_exit_cleanly() {
    let mut chat = Chat::start(&[]);
    chat.session.send("\x04").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));

    let mut chat = Chat::start(&[]);
    // Ctrl-C with text typed clears the line and keeps the chat.
    chat.session.send("half a thought").unwrap();
    chat.session.send("\x03").unwrap();
    let s = chat.stats();
    assert_eq!(s.messages, 0);
    chat.session.send("\x03").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));
}

#[test]
fn system_prompt_and_reset_keep_the_cache_consistent() {
    let reference = Reference::load();
    let mut chat = Chat::start(&["-n", "8", "--system", "You are a pirate."]);
    let s0 = chat.stats();
    let system = [Message::new(Role::System, "You are a pirate.")];
    assert_eq!(
        s0.context,
        reference.tokens(&system, false),
        "the system prompt is evaluated up front"
    );
    chat.ask("Hello!");
    let out = chat.line("/system");
    assert!(out.contains("You are a pirate."), "{out}");
    let out = chat.line("/system You are a cat.");
    assert!(out.contains("[system prompt set"), "{out}");
    let s1 = chat.stats();
    let (_, messages) = chat.save();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0], Message::new(Role::System, "You are a cat."));
    assert_eq!(s1.context, reference.tokens(&messages, false));
    chat.line("/reset");
    let s2 = chat.stats();
    assert_eq!(s2.messages, 1);
    assert_eq!(s2.context, reference.tokens(&messages[..1], false));
    chat.ask("Who are you?");
    let s3 = chat.stats();
    let (_, messages) = chat.save();
    assert_eq!(messages.len(), 3);
    assert_eq!(
        s3.prompt_tokens,
        Some(reference.tokens(&messages[..2], true) - s2.context)
    );
    chat.session.send("/quit\r").unwrap();
    assert!(matches!(chat.exit_status(), WaitStatus::Exited(_, 0)));
}
