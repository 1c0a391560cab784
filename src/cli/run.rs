//! `kvsharer run`: generate a continuation of a prompt.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{describe_sharing, file_name, kv_accounting, open_state, ModelArgs, SamplingArgs};
use kvsharer::generate::{generate, GenerateOptions, StopReason};
use kvsharer::sample::Sampler;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompt text
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Tokens to generate; -1 = until end of text or a full context
    #[arg(
        short = 'n',
        long = "n-predict",
        default_value_t = 128,
        allow_negative_numbers = true
    )]
    pub n_predict: i64,
    /// Keep generating past end-of-text tokens
    #[arg(long = "ignore-eos")]
    pub ignore_eos: bool,
    /// Do not echo the prompt before the continuation
    #[arg(long = "no-display-prompt")]
    pub no_display_prompt: bool,
    /// Send the prompt as one user message through the model's chat template (as
    /// `chat` and `serve`'s /v1/chat/completions do) and print the reply
    #[arg(long = "chat")]
    pub chat: bool,
}

pub fn run(a: RunArgs) -> Result<()> {
    let prompt = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            let bytes = std::fs::read(f)
                .with_context(|| format!("cannot read prompt file {}", f.display()))?;
            match String::from_utf8(bytes) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "note: {} is not valid UTF-8 (first bad byte at {}); invalid bytes replaced with U+FFFD",
                        f.display(),
                        e.utf8_error().valid_up_to()
                    );
                    String::from_utf8_lossy(e.as_bytes()).into_owned()
                }
            }
        }
        (None, None) => String::new(),
    };
    let n_predict = match a.n_predict {
        n if n < 0 => None,
        n => Some(n as usize),
    };
    let params = a.sampling.params()?;
    let opts = a.model.run_options()?;
    let (path, loaded) = a.model.load()?;
    let plan = a.model.kv_plan(&loaded)?;
    let tok = &loaded.tokenizer;
    let mut prompt_ids = if a.chat {
        let template = super::chat::chat_template(&loaded)?;
        let user = kvsharer::chat::Message::new(kvsharer::chat::Role::User, prompt.as_str());
        let text = template.render(&[user], true)?;
        kvsharer::chat::encode_rendered(tok, &text)?
    } else {
        tok.encode(&prompt, true, false)?
    };
    if prompt_ids.is_empty() {
        match tok.bos() {
            Some(b) => prompt_ids.push(b),
            None => bail!("the prompt is empty and the model has no BOS token to start from (hint: pass -p TEXT)"),
        }
    }
    if opts.window.is_none() && prompt_ids.len() >= opts.n_ctx {
        bail!(
            "the prompt is {} tokens but the context holds {} (hint: raise -c/--ctx-size or shorten the prompt)",
            prompt_ids.len(),
            opts.n_ctx
        );
    }
    let mut session = open_state(a.model.backend, &loaded.model, &plan, &opts)?;
    let (per_token, unshared) = kv_accounting(session.as_ref());
    eprintln!(
        "kvsharer: {} | {} layers | ctx {} | {} threads | {}",
        file_name(&path),
        loaded.model.config.n_layers,
        opts.n_ctx,
        opts.n_threads,
        describe_sharing(&plan, session.kv_bytes(), unshared)
    );

    let mut out = std::io::stdout().lock();
    if !a.no_display_prompt && !a.chat {
        write!(out, "{prompt}")?;
        out.flush()?;
    }
    let mut sampler = Sampler::new(params);
    let mut history = Vec::new();
    let mut write_err = None;
    let stats = generate(
        session.as_mut(),
        tok,
        &mut sampler,
        &prompt_ids,
        &mut history,
        &GenerateOptions {
            n_predict,
            ignore_eos: a.ignore_eos,
        },
        |text| match write!(out, "{text}").and_then(|_| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_err = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    writeln!(out)?;
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    let why = match stats.stop {
        StopReason::EndOfGeneration => "end of text",
        StopReason::Length => "length limit",
        StopReason::ContextFull => "context full",
        StopReason::Cancelled => "stopped",
    };
    eprintln!(
        "\nprompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s ({why}) | KV cache {} bytes ({} bytes/token)",
        stats.prompt_tokens,
        stats.prompt_tps(),
        stats.generated_tokens,
        stats.generation_tps(),
        session.kv_bytes(),
        per_token,
    );
    Ok(())
}
