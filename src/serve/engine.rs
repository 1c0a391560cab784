//! The engine: one thread that owns the run state and its slots (one sequence of
//! the cache each) and steps every active slot together, llama-server's continuous
//! batching: each step decodes one token for every generating slot and, in the
//! room left in the batch, evaluates the next chunk of one waiting prompt. The HTTP
//! side hands it jobs through a bounded queue and reads each job's events from a
//! channel; a job whose channel is closed (its client went away) loses its slot at
//! the next step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, FinishReason, Generation, Usage};
use super::metrics::Metrics;
use super::stop::StopText;
use crate::chat::common_prefix_len;
use crate::runtime::RunState;
use crate::sample::{apply_presence_frequency, Sampler};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What a job's client hears, in order: text pieces, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done { finish: FinishReason, usage: Usage },
    Failed(ApiError),
}

/// One request for the engine: its prompt tokens and generation settings.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub gen: Generation,
    pub events: UnboundedSender<Event>,
}

/// How long an idle engine waits for a job before it looks at the shutdown flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

pub struct Engine<'m> {
    state: Box<dyn RunState<'m> + 'm>,
    tokenizer: &'m Tokenizer,
    slots: Vec<Slot>,
    metrics: Arc<Metrics>,
    n_batch: usize,
    /// The slot whose prompt was evaluated last, so prompts take turns.
    last_prefill: usize,
    admitted: u64,
}

/// One slot: the tokens its sequence of the cache holds, and the job it serves.
#[derive(Default)]
struct Slot {
    cached: Vec<u32>,
    active: Option<Active>,
    /// When the slot last took a job (admission count), for least-recently-used.
    last_used: u64,
}

struct Active {
    job: Job,
    /// Prompt tokens still to evaluate.
    pending: Vec<u32>,
    /// The last sampled token, to evaluate in the next step.
    next: Option<u32>,
    prompt_tokens: usize,
    sampler: Sampler,
    /// Prompt and generated tokens (the repetition penalty's window).
    history: Vec<u32>,
    generated: Vec<u32>,
    decoder: StreamDecoder,
    stop: StopText,
}

impl<'m> Engine<'m> {
    /// An engine over `state`, whose sequences become the slots.
    pub fn new(
        state: Box<dyn RunState<'m> + 'm>,
        tokenizer: &'m Tokenizer,
        n_batch: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slots = (0..state.n_seq()).map(|_| Slot::default()).collect();
        Engine {
            state,
            tokenizer,
            slots,
            metrics,
            n_batch: n_batch.max(1),
            last_prefill: 0,
            admitted: 0,
        }
    }

    /// Serves jobs until `shutdown` is set or every sender is gone; on shutdown,
    /// active and queued jobs get an error event.
    pub fn run(mut self, jobs: Receiver<Job>, shutdown: &AtomicBool) {
        loop {
            if shutdown.load(Ordering::SeqCst) {
                let gone = ApiError::status(503, "server_error", "the server is shutting down");
                for slot in 0..self.slots.len() {
                    if self.slots[slot].active.is_some() {
                        self.fail(slot, gone.clone());
                    }
                }
                while let Ok(job) = jobs.try_recv() {
                    self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                    let _ = job.events.send(Event::Failed(gone.clone()));
                }
                return;
            }
            self.drop_cancelled();
            // Fill free slots from the queue; wait only when nothing is running.
            while self.slots.iter().any(|s| s.active.is_none()) {
                let job = if self.slots.iter().any(|s| s.active.is_some()) {
                    match jobs.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                } else {
                    match jobs.recv_timeout(IDLE_POLL) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                };
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                self.admit(job);
            }
            if self.slots.iter().any(|s| s.active.is_some()) {
                self.step();
            }
        }
    }

    /// Frees the slots of jobs whose client went away.
    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot
                .active
                .as_ref()
                .is_some_and(|a| a.job.events.is_closed())
            {
                slot.active = None;
                self.metrics.active.fetch_sub(1, Ordering::Relaxed);
                Metrics::add(&self.metrics.requests_cancelled, 1);
            }
        }
    }

    /// Puts a job into the free slot whose cache shares the longest prefix with its
    /// prompt, so the next turn of a conversation evaluates only its new tokens;
    /// among equals, the least recently used (an unrelated prompt does not evict a
    /// conversation while an older or empty slot is free).
    fn admit(&mut self, job: Job) {
        if job.events.is_closed() {
            Metrics::add(&self.metrics.requests_cancelled, 1);
            return;
        }
        let n_ctx = self.state.n_ctx();
        if job.prompt.is_empty() || job.prompt.len() >= n_ctx {
            let _ = job.events.send(Event::Failed(
                ApiError::invalid(format!(
                    "the prompt is {} tokens but a slot's context holds {n_ctx}",
                    job.prompt.len()
                ))
                .with_code("context_length_exceeded"),
            ));
            return;
        }
        let (slot, shared) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .map(|(i, s)| (i, common_prefix_len(&s.cached, &job.prompt)))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(self.slots[i].last_used)))
            .expect("admit is called with a free slot");
        self.admitted += 1;
        self.slots[slot].last_used = self.admitted;
        // At least one prompt token is evaluated: its logits give the first token.
        let keep = shared.min(job.prompt.len() - 1);
        self.state.truncate_seq(slot, keep);
        self.slots[slot].cached.truncate(keep);
        Metrics::add(&self.metrics.prompt_tokens, job.prompt.len());
        Metrics::add(&self.metrics.prompt_tokens_cached, keep);
        if job.gen.max_tokens == Some(0) {
            let usage = Usage::new(job.prompt.len(), 0);
            let _ = job.events.send(Event::Done {
                finish: FinishReason::Length,
                usage,
            });
            return;
        }
        let active = Active {
            pending: job.prompt[keep..].to_vec(),
            next: None,
            prompt_tokens: job.prompt.len(),
            sampler: Sampler::new(job.gen.sampling.clone()),
            history: job.prompt.clone(),
            generated: Vec::new(),
            decoder: StreamDecoder::new(),
            stop: StopText::new(job.gen.stop.clone()),
            job,
        };
        self.slots[slot].active = Some(active);
        Metrics::add(&self.metrics.active, 1);
    }

    /// One forward pass: a token for every generating slot, plus a chunk of one
    /// waiting prompt in the room left.
    fn step(&mut self) {
        let decoding: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.active(i).is_some_and(|a| a.next.is_some()))
            .collect();
        let room = self.n_batch.saturating_sub(decoding.len()).max(1);
        let n = self.slots.len();
        let prefill = (1..=n)
            .map(|k| (self.last_prefill + k) % n)
            .find(|&i| self.active(i).is_some_and(|a| !a.pending.is_empty()));
        let mut entries: Vec<(usize, Vec<u32>)> = decoding
            .iter()
            .map(|&i| {
                (
                    i,
                    vec![self.active(i).and_then(|a| a.next).expect("decoding")],
                )
            })
            .collect();
        if let Some(i) = prefill {
            self.last_prefill = i;
            let pending = &self.active(i).expect("prefilling").pending;
            entries.push((i, pending[..pending.len().min(room)].to_vec()));
        }
        if entries.is_empty() {
            return;
        }
        let batch: Vec<(usize, &[u32])> = entries.iter().map(|(s, t)| (*s, t.as_slice())).collect();
        let t0 = Instant::now();
        let result = self.state.forward_seqs(&batch);
        let took = t0.elapsed();
        Metrics::add(&self.metrics.busy_micros, took.as_micros() as usize);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for (slot, _) in &entries {
                    // The sequence may hold part of the pass: start it afresh.
                    self.state.truncate_seq(*slot, 0);
                    self.slots[*slot].cached.clear();
                    self.fail(
                        *slot,
                        ApiError::server(format!("the forward pass failed: {e}")),
                    );
                }
                return;
            }
        };
        let n_vocab = self.state.model().config.n_vocab;
        let mut sampled = 0;
        for (row, (slot, tokens)) in entries.iter().enumerate() {
            let s = &mut self.slots[*slot];
            s.cached.extend_from_slice(tokens);
            let a = s.active.as_mut().expect("stepped slots are active");
            if a.next.take().is_none() {
                a.pending.drain(..tokens.len());
                if !a.pending.is_empty() {
                    continue;
                }
            }
            let logits = &logits[row * n_vocab..(row + 1) * n_vocab];
            self.sample(*slot, logits);
            sampled += 1;
        }
        let tps = sampled as f64 / took.as_secs_f64().max(1e-9);
        self.metrics
            .step_tps_milli
            .store((tps * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Samples slot `slot`'s next token from `logits`, sends its text, and ends the
    /// job where it is done.
    fn sample(&mut self, slot: usize, logits: &[f32]) {
        let n_ctx = self.state.n_ctx();
        let cached = self.slots[slot].cached.len();
        let tokenizer = self.tokenizer;
        let a = self.slots[slot]
            .active
            .as_mut()
            .expect("sampling an active slot");
        let (presence, frequency) = (a.job.gen.presence_penalty, a.job.gen.frequency_penalty);
        // The vocabulary's logits are copied only when a penalty changes them.
        let token = if presence == 0.0 && frequency == 0.0 {
            a.sampler.sample(logits, &a.history)
        } else {
            let mut row = logits.to_vec();
            apply_presence_frequency(&mut row, &a.generated, presence, frequency);
            a.sampler.sample(&row, &a.history)
        };
        if tokenizer.is_eog(token) && !a.job.gen.ignore_eos {
            return self.finish(slot, FinishReason::Stop, true);
        }
        Metrics::add(&self.metrics.generated_tokens, 1);
        a.generated.push(token);
        a.history.push(token);
        let piece = a.decoder.push(tokenizer, token);
        let (text, stopped) = a.stop.push(&piece);
        if !text.is_empty() {
            let _ = a.job.events.send(Event::Text(text));
        }
        if stopped {
            return self.finish(slot, FinishReason::Stop, false);
        }
        if a.job.gen.max_tokens.is_some_and(|m| a.generated.len() >= m) || cached >= n_ctx {
            return self.finish(slot, FinishReason::Length, true);
        }
        a.next = Some(token);
    }

    /// Sends what is held back (unless a stop sequence ended the text) and the
    /// final event, and frees the slot.
    fn finish(&mut self, slot: usize, finish: FinishReason, flush: bool) {
        let Some(mut a) = self.slots[slot].active.take() else {
            return;
        };
        self.metrics.active.fetch_sub(1, Ordering::Relaxed);
        let mut rest = String::new();
        if flush {
            let (text, stopped) = a.stop.push(&a.decoder.flush());
            rest.push_str(&text);
            if !stopped {
                rest.push_str(&a.stop.flush());
            }
        }
        if !rest.is_empty() {
            let _ = a.job.events.send(Event::Text(rest));
        }
        let usage = Usage::new(a.prompt_tokens, a.generated.len());
        let _ = a.job.events.send(Event::Done { finish, usage });
    }

    fn fail(&mut self, slot: usize, error: ApiError) {
        if let Some(a) = self.slots[slot].active.take() {
            self.metrics.active.fetch_sub(1, Ordering::Relaxed);
            Metrics::add(&self.metrics.requests_failed, 1);
            let _ = a.job.events.send(Event::Failed(error));
        }
    }

    fn active(&self, slot: usize) -> Option<&Active> {
        self.slots[slot].active.as_ref()
    }
}
