//! `kvsharer chat`: an interactive conversation in the terminal, rendered with the
//! model's own chat template, keeping the KV cache between turns.

mod input;

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use rustyline::error::ReadlineError;
use rustyline::history::DefaultHistory;
use rustyline::{Config, Editor, EventHandler, KeyEvent};

use kvsharer::chat::ChatTemplate;
use kvsharer::generate::StopReason;
use kvsharer::loader::LoadedModel;
use kvsharer::sample::{Sampler, SamplingParams};

use super::{
    describe_sharing, file_name, human_bytes, kv_accounting, open_state, ModelArgs, SamplingArgs,
};
use input::{parse_input, ChatHelper, ClearLineOnInterrupt, Input, SlashCommand};
use kvsharer::chat::{ChatEngine, TurnError};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System prompt [default: none; the model's template may add its own]
    #[arg(long = "system", value_name = "TEXT")]
    pub system: Option<String>,
    /// Tokens per reply at most; -1 = until the end of the turn or a full context
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
}

/// Set by SIGINT while a reply streams; the streaming callback stops the reply.
static STOP_REPLY: AtomicBool = AtomicBool::new(false);

const PROMPT: &str = "> ";

pub fn run(a: ChatArgs) -> Result<()> {
    let n_predict = usize::try_from(a.n_predict).ok();
    let params = a.sampling.params()?;
    let opts = a.model.run_options()?;
    if opts.window.is_some() {
        anyhow::bail!(
            "--kv-window is for run/perplexity/bench; chat manages its context by dropping the oldest turns (hint: use -c to bound memory)"
        );
    }
    let (path, loaded) = a.model.load()?;
    let plan = a.model.kv_plan(&loaded)?;
    let template = chat_template(&loaded)?;
    let session = open_state(a.model.backend, &loaded.model, &plan, &opts)?;
    eprintln!(
        "kvsharer chat: {} | {} layers | backend {} | ctx {} | {}",
        file_name(&path),
        loaded.model.config.n_layers,
        session.describe(),
        opts.n_ctx,
        describe_sharing(&plan, session.kv_bytes(), kv_accounting(session.as_ref()).1)
    );
    let settings = Settings {
        model: path,
        params: params.clone(),
        n_predict,
        system_flag: a.system.clone(),
        template_is_fallback: template.is_fallback(),
    };
    let mut engine = ChatEngine::new(
        session,
        &loaded.tokenizer,
        template,
        Sampler::new(params),
        n_predict,
        a.system,
    )?;
    // Raw mode turns Ctrl-C at the prompt into a key; between prompts it is SIGINT.
    ctrlc::set_handler(|| STOP_REPLY.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;

    let mut editor = new_editor()?;
    let history = history_path();
    if let Some(p) = &history {
        match editor.load_history(p) {
            Ok(()) => {}
            Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("note: could not read chat history {}: {e}", p.display()),
        }
    }
    eprintln!("Type /help for commands; Ctrl-D or /quit leaves.");
    let mut history_warned = false;
    loop {
        let raw = match editor.readline(PROMPT) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("cannot read the terminal"),
        };
        if !raw.trim().is_empty() {
            let _ = editor.add_history_entry(raw.as_str());
            if let Some(p) = &history {
                if let Err(e) = save_history(&mut editor, p) {
                    if !history_warned {
                        eprintln!("note: could not save chat history to {}: {e}", p.display());
                        history_warned = true;
                    }
                }
            }
        }
        let input = match parse_input(&input::join_continued_lines(&raw)) {
            Ok(input) => input,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        match input {
            Input::Empty => {}
            Input::Message(text) => chat_turn(&mut engine, &text)?,
            Input::Command(SlashCommand::Quit) => break,
            Input::Command(command) => run_command(&mut engine, &settings, command),
        }
    }
    Ok(())
}

/// The model's template, or ChatML (with a warning) when it has none or it is broken.
pub(crate) fn chat_template(loaded: &LoadedModel) -> Result<ChatTemplate> {
    let (template, warning) = kvsharer::chat::model_template(loaded)?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    Ok(template)
}

fn new_editor() -> Result<Editor<ChatHelper, DefaultHistory>> {
    let config = Config::builder()
        .max_history_size(1000)?
        .auto_add_history(false)
        .build();
    let mut editor = Editor::with_config(config).context("cannot set up line editing")?;
    editor.set_helper(Some(ChatHelper));
    editor.bind_sequence(
        KeyEvent::ctrl('C'),
        EventHandler::Conditional(Box::new(ClearLineOnInterrupt)),
    );
    Ok(editor)
}

/// `KVSHARER_DATA_DIR` (tests, portable setups) or the platform's data directory.
fn history_path() -> Option<PathBuf> {
    let dir = match std::env::var_os("KVSHARER_DATA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => directories::ProjectDirs::from("", "", "kvsharer")?
            .data_dir()
            .to_path_buf(),
    };
    Some(dir.join("chat_history.txt"))
}

fn save_history(editor: &mut Editor<ChatHelper, DefaultHistory>, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    editor.save_history(path)?;
    Ok(())
}

/// One exchange: the user's text in, the reply streamed out. Problems with this
/// turn are reported and the chat goes on; only a broken stdout ends it.
fn chat_turn(engine: &mut ChatEngine<'_>, text: &str) -> Result<()> {
    let turn = match engine.prepare(text) {
        Ok(turn) => turn,
        Err(e) => {
            match e {
                TurnError::TooLong { .. } => {
                    eprintln!("error: {e} (hint: shorten the message or raise -c/--ctx-size)")
                }
                _ => eprintln!("error: {e}"),
            }
            return Ok(());
        }
    };
    if turn.dropped_turns > 0 {
        eprintln!(
            "[context full: dropped the oldest {} turn(s), {} messages, to make room; the system prompt is kept]",
            turn.dropped_turns, turn.dropped_messages
        );
    }
    STOP_REPLY.store(false, Ordering::SeqCst);
    let mut out = std::io::stdout().lock();
    let mut write_error = None;
    let result = engine.reply(turn, |text| {
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            write_error = Some(e);
            return ControlFlow::Break(());
        }
        if STOP_REPLY.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    if let Some(e) = write_error {
        return Err(e).context("cannot write the reply to stdout");
    }
    writeln!(out)?;
    out.flush()?;
    drop(out);
    match result {
        Ok(stats) => match stats.stop {
            StopReason::EndOfGeneration => {}
            StopReason::Cancelled => eprintln!("[reply stopped]"),
            StopReason::Length => eprintln!("[reply cut at -n {} tokens]", stats.generated_tokens),
            StopReason::ContextFull => eprintln!(
                "[context full: reply stopped after {} tokens; the oldest turns will be dropped next turn]",
                stats.generated_tokens
            ),
        },
        Err(e) => eprintln!("error: {e} (the message was withdrawn; the conversation goes on)"),
    }
    Ok(())
}

/// What `/save` records besides the messages.
struct Settings {
    model: PathBuf,
    params: SamplingParams,
    n_predict: Option<usize>,
    system_flag: Option<String>,
    template_is_fallback: bool,
}

fn run_command(engine: &mut ChatEngine<'_>, settings: &Settings, command: SlashCommand) {
    match command {
        SlashCommand::Help => println!("{}", input::HELP),
        SlashCommand::Reset => match engine.reset() {
            Ok(()) => eprintln!(
                "[conversation cleared; {} tokens in context]",
                engine.session().n_past()
            ),
            Err(e) => eprintln!("error: {e}"),
        },
        SlashCommand::ShowSystem => match engine.system() {
            Some(text) => println!("system prompt: {text}"),
            None => println!("no system prompt (the model's template may add its own)"),
        },
        SlashCommand::SetSystem(text) => match engine.set_system(&text) {
            Ok(()) => eprintln!(
                "[system prompt set; {} tokens in context]",
                engine.session().n_past()
            ),
            Err(e) => eprintln!("error: {e}"),
        },
        SlashCommand::Stats => print_stats(engine),
        SlashCommand::Save(path) => match save_transcript(engine, settings, &path) {
            Ok(()) => eprintln!(
                "[saved {} messages to {}]",
                engine.messages().len(),
                path.display()
            ),
            Err(e) => eprintln!("error: cannot save to {}: {e:#}", path.display()),
        },
        SlashCommand::Quit => {}
    }
}

fn print_stats(engine: &ChatEngine<'_>) {
    let session = engine.session();
    let plan = session.plan();
    println!(
        "context: {} of {} tokens, {} messages",
        session.n_past(),
        session.n_ctx(),
        engine.messages().len()
    );
    match engine.last_reply() {
        Some(s) => println!(
            "last reply: prompt {} tokens at {:.1} tok/s, generation {} tokens at {:.1} tok/s ({})",
            s.prompt_tokens,
            s.prompt_tps(),
            s.generated_tokens,
            s.generation_tps(),
            match s.stop {
                StopReason::EndOfGeneration => "end of turn",
                StopReason::Length => "length limit",
                StopReason::ContextFull => "context full",
                StopReason::Cancelled => "stopped",
            }
        ),
        None => println!("last reply: none yet"),
    }
    let allocated = session.kv_bytes();
    let unshared = kv_accounting(session).1;
    let saved = unshared.saturating_sub(allocated);
    println!(
        "KV cache: {} allocated ({allocated} bytes) for {} of {} K/V slots; sharing saves {} ({saved} bytes, {:.1}%)",
        human_bytes(allocated),
        2 * plan.n_layers() - plan.shared_halves(),
        2 * plan.n_layers(),
        human_bytes(saved),
        if unshared == 0 { 0.0 } else { 100.0 * saved as f64 / unshared as f64 }
    );
    match plan.as_map() {
        Some(map) => println!("sharing map: {map}"),
        None => println!("KV plan: {plan}"),
    }
}

fn save_transcript(engine: &ChatEngine<'_>, settings: &Settings, path: &Path) -> Result<()> {
    let session = engine.session();
    let p = &settings.params;
    let transcript = serde_json::json!({
        "messages": engine.messages(),
        "settings": {
            "model": settings.model.display().to_string(),
            "chat_template": if settings.template_is_fallback { "chatml (fallback)" } else { "model" },
            "system_flag": settings.system_flag,
            "ctx_size": session.n_ctx(),
            "n_predict": settings.n_predict,
            "temperature": as_decimal(p.temperature),
            "top_k": p.top_k,
            "top_p": as_decimal(p.top_p),
            "min_p": as_decimal(p.min_p),
            "repeat_penalty": as_decimal(p.repeat_penalty),
            "repeat_last_n": p.repeat_last_n,
            "seed": p.seed,
            "kv_plan": super::plan_json(session.plan(), session.model().config.n_embd_kv()),
            "kv_bytes": session.kv_bytes(),
        },
    });
    let mut text = serde_json::to_string_pretty(&transcript)?;
    text.push('\n');
    std::fs::write(path, text)?;
    Ok(())
}

/// The f64 a person would read for an f32 flag value (0.95, not 0.949999988079071).
fn as_decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}
