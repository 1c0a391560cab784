//! The conversation state behind `chat` (and any front-end): messages, the tokens they render to, and a
//! session whose KV cache holds exactly those tokens between turns, so each turn only
//! evaluates what is new.

use std::ops::ControlFlow;

use super::{ChatError, ChatTemplate, Message, Role};
use crate::generate::{generate, GenerateOptions, GenerationStats};
use crate::runtime::Logits;
use crate::sample::Sampler;
use crate::tokenizer::{Tokenizer, TokenizerError};

use super::conversation::{fit_to_budget, plan_cache_sync, CachePlan};
use crate::runtime::{RunState, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Template(#[from] ChatError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(
        "the message does not fit: with only the system prompt kept the conversation is {tokens} tokens \
         and the context holds {n_ctx}"
    )]
    TooLong { tokens: usize, n_ctx: usize },
}

/// A user message accepted into the conversation, waiting for its reply.
#[derive(Debug)]
pub struct PreparedTurn {
    /// Tokens of the conversation up to and including the assistant-turn opening.
    target: Vec<u32>,
    pub dropped_turns: usize,
    pub dropped_messages: usize,
}

pub struct ChatEngine<'m> {
    session: Box<dyn RunState<'m> + 'm>,
    tokenizer: &'m Tokenizer,
    template: ChatTemplate,
    sampler: Sampler,
    n_predict: Option<usize>,
    messages: Vec<Message>,
    /// Tokens of `messages` rendered without a generation prompt, as the conversation
    /// was built (generated replies keep the tokens the model chose). `None` when
    /// unknown after an error: the next turn renders the whole conversation.
    conversation_tokens: Option<Vec<u32>>,
    /// What the KV cache holds, token for token (`len() == session.n_past()`).
    cached: Vec<u32>,
    last_reply: Option<GenerationStats>,
}

impl<'m> ChatEngine<'m> {
    pub fn new(
        session: Box<dyn RunState<'m> + 'm>,
        tokenizer: &'m Tokenizer,
        template: ChatTemplate,
        sampler: Sampler,
        n_predict: Option<usize>,
        system: Option<String>,
    ) -> Result<Self, TurnError> {
        let mut engine = ChatEngine {
            session,
            tokenizer,
            template,
            sampler,
            n_predict,
            messages: system
                .into_iter()
                .map(|s| Message::new(Role::System, s))
                .collect(),
            conversation_tokens: None,
            cached: Vec::new(),
            last_reply: None,
        };
        engine.conversation_changed()?;
        Ok(engine)
    }

    pub fn session(&self) -> &dyn RunState<'m> {
        self.session.as_ref()
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn last_reply(&self) -> Option<&GenerationStats> {
        self.last_reply.as_ref()
    }

    pub fn system(&self) -> Option<&str> {
        self.messages
            .first()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.as_str())
    }

    /// Forgets every message except the system prompt; the cache keeps the system
    /// prompt's tokens.
    pub fn reset(&mut self) -> Result<(), TurnError> {
        self.messages.retain(|m| m.role == Role::System);
        self.conversation_changed()
    }

    /// Replaces the system prompt; earlier turns stay and are re-evaluated after it.
    pub fn set_system(&mut self, text: &str) -> Result<(), TurnError> {
        let start = self
            .messages
            .iter()
            .take_while(|m| m.role == Role::System)
            .count();
        self.messages
            .splice(..start, [Message::new(Role::System, text)]);
        self.conversation_changed()
    }

    /// Adds the user's message, dropping the oldest turns when the conversation would
    /// leave too little room for a reply.
    pub fn prepare(&mut self, text: &str) -> Result<PreparedTurn, TurnError> {
        let message = Message::new(Role::User, text);
        let mut candidate = self.messages.clone();
        candidate.push(message.clone());
        let incremental = match &self.conversation_tokens {
            Some(tokens) => self
                .template
                .render_delta(&self.messages, std::slice::from_ref(&message), true)?
                .map(|delta| -> Result<Vec<u32>, TurnError> {
                    let mut all = tokens.clone();
                    all.extend(self.tokenizer.encode(&delta, false, true)?);
                    Ok(all)
                })
                .transpose()?,
            None => None,
        };
        let first = match incremental {
            Some(tokens) => tokens,
            None => self.tokens_of(&candidate, true)?,
        };
        let n_ctx = self.session.n_ctx();
        let budget = n_ctx.saturating_sub(self.reply_reserve());
        let fitted = fit_to_budget(&mut candidate, first, budget, |m| self.tokens_of(m, true))?;
        // At least one generated token must fit after the prompt.
        if fitted.tokens.len() >= n_ctx {
            return Err(TurnError::TooLong {
                tokens: fitted.tokens.len(),
                n_ctx,
            });
        }
        self.messages = candidate;
        Ok(PreparedTurn {
            target: fitted.tokens,
            dropped_turns: fitted.dropped_turns,
            dropped_messages: fitted.dropped_messages,
        })
    }

    /// Generates the reply to a prepared turn, streaming its text to `on_text`, then
    /// evaluates whatever the template closes an assistant message with, so the cache
    /// ends up holding the rendered conversation. On error the user message is
    /// withdrawn and the cache is rebuilt on the next turn.
    pub fn reply(
        &mut self,
        turn: PreparedTurn,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, TurnError> {
        let result = self.reply_inner(turn, on_text);
        if result.is_err() {
            self.recover();
        }
        result
    }

    fn reply_inner(
        &mut self,
        turn: PreparedTurn,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, TurnError> {
        let target = turn.target;
        // `generate` needs at least one token to evaluate for the first logits.
        self.sync_cache_to(&target, true)?;
        let prompt = target[self.cached.len()..].to_vec();
        let mut history = self.cached.clone();
        let mut reply = String::new();
        let tokenizer = self.tokenizer;
        let opts = GenerateOptions {
            n_predict: self.n_predict,
            ignore_eos: false,
        };
        let stats = generate(
            self.session.as_mut(),
            tokenizer,
            &mut self.sampler,
            &prompt,
            &mut history,
            &opts,
            |text| {
                reply.push_str(text);
                on_text(text)
            },
        )?;
        // The last sampled token is evaluated only if generation went on past it.
        let evaluated = (self.session.n_past() - target.len()).min(stats.tokens.len());
        self.cached.clone_from(&target);
        self.cached.extend_from_slice(&stats.tokens[..evaluated]);

        let before = self.template.render(&self.messages, true)?;
        self.messages
            .push(Message::new(Role::Assistant, reply.as_str()));
        let after = self.template.render(&self.messages, false)?;
        let closing = after
            .strip_prefix(before.as_str())
            .and_then(|rest| rest.strip_prefix(reply.as_str()));
        let tokens = match closing {
            Some(closing) => {
                let mut tokens = target;
                tokens.extend_from_slice(&stats.tokens);
                tokens.extend(self.tokenizer.encode(closing, false, true)?);
                tokens
            }
            // The template rewrote the reply (trimmed it, say): use its rendering.
            None => self.encode_rendered(&after)?,
        };
        self.conversation_tokens = Some(tokens);
        self.settle_cache()?;
        self.last_reply = Some(stats.clone());
        Ok(stats)
    }

    /// Room kept free for a reply when deciding whether turns must be dropped.
    fn reply_reserve(&self) -> usize {
        let n_ctx = self.session.n_ctx();
        self.n_predict.unwrap_or(n_ctx / 4).min(n_ctx / 2).max(1)
    }

    /// Text rendered by the template to tokens: special-token text becomes those
    /// tokens, and BOS is added when the model wants one and the template did not
    /// write it. EOS is never appended: a chat prompt is not a finished document.
    fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, TurnError> {
        Ok(super::encode_rendered(self.tokenizer, text)?)
    }

    fn tokens_of(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TurnError> {
        let text = self.template.render(messages, add_generation_prompt)?;
        self.encode_rendered(&text)
    }

    /// After an edit that is not a reply: re-render, and bring the cache in line.
    fn conversation_changed(&mut self) -> Result<(), TurnError> {
        let result = self
            .tokens_of(&self.messages, false)
            .map(|tokens| self.conversation_tokens = Some(tokens))
            .and_then(|()| self.settle_cache());
        if result.is_err() {
            self.recover();
        }
        result
    }

    /// Makes the cache hold exactly the conversation's tokens, when they fit (when they
    /// do not, the next turn drops old turns first).
    fn settle_cache(&mut self) -> Result<(), TurnError> {
        let Some(tokens) = self.conversation_tokens.clone() else {
            return Ok(());
        };
        if tokens.len() > self.session.n_ctx() {
            return Ok(());
        }
        self.sync_cache_to(&tokens, false)?;
        let rest = &tokens[self.cached.len()..];
        if !rest.is_empty() {
            self.session.eval(rest, Logits::None)?;
            self.cached.extend_from_slice(rest);
        }
        Ok(())
    }

    /// Reduces the cache to the longest prefix of `target` it can provide. With
    /// `leave_one`, at least one token of `target` is left to evaluate.
    fn sync_cache_to(&mut self, target: &[u32], leave_one: bool) -> Result<(), RuntimeError> {
        let plan = plan_cache_sync(&self.cached, target);
        let mut keep = plan.cached_after();
        if plan.discard > 0 {
            keep = self.discard_cached(plan)?;
        }
        if leave_one && keep == target.len() {
            keep = keep.saturating_sub(1);
        }
        self.session.truncate(keep);
        self.cached.truncate(keep);
        Ok(())
    }

    /// Removes cached tokens `[keep, keep + discard)` so the `retain` tokens after them
    /// follow the kept prefix; the cache then holds `keep + retain` tokens.
    ///
    /// Uses llama.cpp's context shift: the retained cells move down and their keys
    /// are re-rotated to their new positions, so nothing is re-evaluated. A backend
    /// that cannot shift keeps only the first `keep` tokens, and the retained ones are
    /// evaluated again. Returns how many cached tokens are left.
    fn discard_cached(&mut self, plan: CachePlan) -> Result<usize, RuntimeError> {
        let start = plan.keep + plan.discard;
        self.session.truncate(start + plan.retain);
        self.cached.truncate(start + plan.retain);
        if self.session.capabilities().context_shift {
            self.session.context_shift(plan.keep, plan.discard)?;
            self.cached.drain(plan.keep..start);
        } else {
            self.session.truncate(plan.keep);
            self.cached.truncate(plan.keep);
        }
        Ok(self.cached.len())
    }

    /// After a failure: withdraw an unanswered user message and forget the cache,
    /// whose contents may be partly written.
    fn recover(&mut self) {
        if self.messages.last().is_some_and(|m| m.role == Role::User) {
            self.messages.pop();
        }
        self.session.reset();
        self.cached.clear();
        self.conversation_tokens = self.tokens_of(&self.messages, false).ok();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::backend::ggml::Session;
    use crate::kvplan::ShareMap;
    use crate::loader::{self, LoadedModel};
    use crate::runtime::RunOptions;
    use crate::sample::SamplingParams;

    use super::*;

    fn load_model() -> LoadedModel {
        let path = match std::env::var_os("KVSHARER_TEST_MODEL") {
            Some(p) => PathBuf::from(p),
            None => crate::fetch::default_model_path()
                .expect("default model (or set KVSHARER_TEST_MODEL)"),
        };
        loader::load(&path).expect("model loads")
    }

    fn options() -> RunOptions {
        RunOptions {
            n_ctx: 256,
            n_batch: 64,
            n_threads: 2,
            ..RunOptions::default()
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Dropping a turn from the middle of the cache by context shift keeps the cache
    /// bookkeeping exact (the cache holds exactly the kept conversation's tokens) and
    /// moves the model towards a fresh evaluation of the kept conversation.
    #[test]
    fn dropping_a_middle_turn_by_context_shift() {
        let loaded = load_model();
        let tok = &loaded.tokenizer;
        let map = ShareMap::identity(loaded.model.config.n_layers);
        let enc = |t: &str| tok.encode(t, false, true).unwrap();
        let turn = |user: &str, reply: &str| {
            enc(&format!(
                "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
            ))
        };
        let system = enc("<|im_start|>system\nYou are terse.<|im_end|>\n");
        let dropped = turn(
            "Hello there, who are you?",
            "I am an assistant. How can I help?",
        );
        let kept = turn("Name a colour.", "Blue.");
        let new = enc("<|im_start|>user\nAnd a fruit?<|im_end|>\n<|im_start|>assistant\n");

        let template = ChatTemplate::new(None, "", "").unwrap();
        let session = Box::new(Session::new(&loaded.model, &map, &options()).unwrap());
        let sampler = Sampler::new(SamplingParams::default());
        let mut engine = ChatEngine::new(session, tok, template, sampler, None, None).unwrap();
        let before = [system.as_slice(), &dropped, &kept].concat();
        engine.session.eval(&before, Logits::None).unwrap();
        engine.cached.clone_from(&before);

        let target = [system.as_slice(), &kept, &new].concat();
        let plan = plan_cache_sync(&engine.cached, &target);
        assert!(plan.discard > 0, "{plan:?}");
        engine.sync_cache_to(&target, true).unwrap();
        assert_eq!(engine.session.n_past(), engine.cached.len());
        assert_eq!(engine.cached, target[..engine.cached.len()]);
        assert!(
            engine.cached.len() >= system.len() + kept.len(),
            "the kept turn was reused"
        );
        let shifted = engine
            .session
            .eval(&target[engine.cached.len()..], Logits::Last)
            .unwrap();

        // A context shift moves the kept cells and re-rotates their keys; layers above
        // the first still carry traces of the dropped turn (as in llama.cpp), so the
        // result lies between a fresh evaluation and not dropping anything at all.
        let mut fresh = Session::new(&loaded.model, &map, &options()).unwrap();
        let expected = fresh.eval(&target, Logits::Last).unwrap();
        let diff = max_abs_diff(&shifted, &expected);
        assert!(shifted.iter().all(|x| x.is_finite()));

        let mut stale = Session::new(&loaded.model, &map, &options()).unwrap();
        let with_dropped = stale
            .eval(&[before.as_slice(), &new].concat(), Logits::Last)
            .unwrap();
        let stale_diff = max_abs_diff(&with_dropped, &expected);
        assert!(
            stale_diff > 0.5,
            "the dropped turn should matter: {stale_diff}"
        );
        assert!(
            diff < stale_diff,
            "shifted {diff} should be closer to a fresh evaluation than keeping the turn ({stale_diff})"
        );
    }
}
