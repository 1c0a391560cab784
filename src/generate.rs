//! The token loop: prefill a prompt, then sample one token at a time, streaming text
//! through a callback, until an end-of-generation token, the length limit, the end of
//! the context, or the callback asks to stop.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::runtime::{Logits, RunState, RuntimeError};
use crate::sample::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `n_predict` tokens were generated.
    Length,
    /// The context is full.
    ContextFull,
    /// The caller's callback asked to stop (Ctrl-C in chat).
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generation_time: Duration,
    pub stop: StopReason,
    /// Every token sampled, in order (the end-of-generation token excluded).
    pub tokens: Vec<u32>,
}

impl GenerationStats {
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_time)
    }

    /// Tokens per second after the first sampled token (whose logits came from prefill).
    pub fn generation_tps(&self) -> f64 {
        rate(
            self.generated_tokens.saturating_sub(1),
            self.generation_time,
        )
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Tokens to generate at most; `None` = until end of generation or a full context.
    pub n_predict: Option<usize>,
    /// Keep going past end-of-generation tokens (benchmarks, llama.cpp's `--ignore-eos`).
    pub ignore_eos: bool,
}

/// Appends `prompt` to the session (after what it already holds) and generates.
/// `history` is the token history the repetition penalty looks at; it is extended
/// with the prompt and every sampled token. `on_text` receives complete UTF-8 text.
pub fn generate<'m>(
    session: &mut dyn RunState<'m>,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &[u32],
    history: &mut Vec<u32>,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<GenerationStats, RuntimeError> {
    let t0 = Instant::now();
    let mut logits = session.eval(prompt, Logits::Last)?;
    let prompt_time = t0.elapsed();
    history.extend_from_slice(prompt);

    let t1 = Instant::now();
    let mut decoder = StreamDecoder::new();
    let mut tokens = Vec::new();
    let limit = opts.n_predict.unwrap_or(usize::MAX);
    let stop = loop {
        if tokens.len() >= limit {
            break StopReason::Length;
        }
        let next = sampler.sample(&logits, history);
        if tokenizer.is_eog(next) && !opts.ignore_eos {
            break StopReason::EndOfGeneration;
        }
        tokens.push(next);
        history.push(next);
        let text = decoder.push(tokenizer, next);
        if !text.is_empty() && on_text(&text).is_break() {
            break StopReason::Cancelled;
        }
        if tokens.len() >= limit {
            break StopReason::Length;
        }
        if !session.evicts() && session.n_past() >= session.n_ctx() {
            break StopReason::ContextFull;
        }
        logits = session.eval(&[next], Logits::Last)?;
    };
    let rest = decoder.flush();
    if !rest.is_empty() {
        let _ = on_text(&rest);
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_time,
        generated_tokens: tokens.len(),
        generation_time: t1.elapsed(),
        stop,
        tokens,
    })
}
