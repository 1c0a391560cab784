//! Run state for one conversation or evaluation (llama2.c's `RunState`): the KV cache
//! sized for the owning layers of a `ShareMap`, the position, and the graph memory.

use crate::backend::ggml::{DeviceKind, GgmlBackend, GgmlError, GraphAllocator};
use crate::backend::graph::{
    self, ForwardOutput, ForwardRequest, GraphCache, Layout, Logits, Start,
};
use crate::gguf::GgmlType;
use crate::kv::{KvCache, KvError};
use crate::model::{Model, ModelError, PlacedWeights};
use crate::share::ShareMap;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the context is full: {needed} tokens needed but the context holds {n_ctx} (hint: raise -c/--ctx-size)")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary ({n_vocab} tokens)")]
    BadToken { id: u32, n_vocab: usize },
    #[error("nothing to evaluate: the token list is empty")]
    Empty,
    #[error("KV window: {0}")]
    Window(String),
}

#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub n_ctx: usize,
    /// Prompt tokens per graph during prefill (llama.cpp's `--batch-size`).
    pub n_batch: usize,
    pub n_threads: usize,
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    /// StreamingLLM-style eviction; when set, the cache holds exactly
    /// `sink + recent` cells whatever `n_ctx` says.
    pub window: Option<KvWindow>,
}

/// Keep the first `sink` tokens and the `recent` most recent ones in every owning
/// layer's slot (shared layers follow their sources). Older tokens are evicted as
/// new ones arrive, and the kept ones are re-positioned (keys re-rotated), so
/// memory is bounded and positions stay inside what the model was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvWindow {
    pub sink: usize,
    pub recent: usize,
}

impl KvWindow {
    pub fn cells(&self) -> usize {
        self.sink + self.recent
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: default_threads(),
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            window: None,
        }
    }
}

/// Physical cores are what ggml scales with; without a reliable count, use all
/// logical CPUs up to 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get().min(8))
}

// Fields drop in order: graphs and buffers go before the backend that made them.
pub struct Session<'m> {
    model: &'m Model,
    graphs: GraphCache,
    alloc: GraphAllocator,
    cache: KvCache,
    weights: PlacedWeights<'m>,
    n_past: usize,
    n_batch: usize,
    window: Option<KvWindow>,
    evicted: usize,
    backend: GgmlBackend,
}

impl<'m> Session<'m> {
    /// A session on ggml's CPU backend.
    pub fn new(
        model: &'m Model,
        map: &ShareMap,
        opts: &SessionOptions,
    ) -> Result<Self, SessionError> {
        Self::on_device(DeviceKind::Cpu, model, map, opts)
    }

    /// A session on a ggml backend device: the CPU reads the weights in place from
    /// the mapped file; a GPU device gets them copied into its memory (shared with
    /// other sessions of the model on that device), and holds the KV cache and graph
    /// memory in its own buffers.
    pub fn on_device(
        device: DeviceKind,
        model: &'m Model,
        map: &ShareMap,
        opts: &SessionOptions,
    ) -> Result<Self, SessionError> {
        let backend = GgmlBackend::on_device(device, opts.n_threads)?;
        let n_cells = match opts.window {
            Some(w) if w.recent == 0 => {
                return Err(SessionError::Window(
                    "the window must keep at least 1 recent token".into(),
                ))
            }
            Some(w) => w.cells(),
            None => opts.n_ctx,
        };
        let cache = KvCache::new(
            &model.config,
            map,
            n_cells,
            opts.type_k,
            opts.type_v,
            &backend,
        )?;
        let weights = model.weights_for(&backend)?;
        let alloc = GraphAllocator::new(&backend)?;
        Ok(Session {
            model,
            graphs: GraphCache::default(),
            alloc,
            cache,
            weights,
            n_past: 0,
            n_batch: opts.n_batch.max(1),
            window: opts.window,
            evicted: 0,
            backend,
        })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn map(&self) -> &ShareMap {
        self.cache.map()
    }

    /// Tokens currently in the cache.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx()
    }

    pub fn set_threads(&mut self, n: usize) {
        self.backend.set_threads(n);
    }

    /// The ggml backend this session runs on (`is_cpu`, `device_name`).
    pub fn backend(&self) -> &GgmlBackend {
        &self.backend
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.n_past = 0;
        self.evicted = 0;
    }

    /// Drops everything after the first `n` tokens (cells past `n_past` are masked
    /// out, so their stale contents are never read).
    pub fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }

    /// Appends `tokens` and returns logits: the last token's, or every token's.
    pub fn eval(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, SessionError> {
        Ok(self
            .eval_full(tokens, ForwardRequest::logits(logits))?
            .logits)
    }

    /// Appends `tokens` in prefill chunks of `n_batch`, gathering what `req` asks for.
    pub fn eval_full(
        &mut self,
        tokens: &[u32],
        req: ForwardRequest,
    ) -> Result<ForwardOutput, SessionError> {
        let Some(w) = self.window else {
            return self.eval_layout(tokens, Layout::Single, self.n_batch, Start::Tokens, req);
        };
        // With a window, evaluate in blocks of at most half the recent part, evicting
        // just enough before each block that it fits: every token then sees the sink
        // and at least half a window of recent context.
        let block = (w.recent / 2).clamp(1, self.n_batch);
        let mut out = ForwardOutput::default();
        let blocks: Vec<&[u32]> = tokens.chunks(block).collect();
        for (i, b) in blocks.iter().enumerate() {
            let overflow = (self.n_past + b.len()).saturating_sub(w.cells());
            if overflow > 0 {
                self.context_shift(w.sink, overflow)?;
                self.evicted += overflow;
            }
            let logits = match req.logits {
                Logits::Last if i + 1 < blocks.len() => Logits::None,
                other => other,
            };
            let r = self.eval_layout(
                b,
                Layout::Single,
                block,
                Start::Tokens,
                ForwardRequest { logits, ..req },
            )?;
            out.logits.extend_from_slice(&r.logits);
            out.logit_rows += r.logit_rows;
            if let Some(h) = r.hidden {
                out.hidden
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(&h);
            }
        }
        Ok(out)
    }

    /// Tokens evicted by the window so far.
    pub fn evicted(&self) -> usize {
        self.evicted
    }

    pub fn window(&self) -> Option<KvWindow> {
        self.window
    }

    /// Evaluates `tokens` as independent texts of `seq_len` tokens each, packed into
    /// one cache from row 0 (each attends only to itself, positions restart at 0).
    /// Replaces whatever the session held. Used by calibration and its tests.
    pub fn eval_packed(
        &mut self,
        tokens: &[u32],
        seq_len: usize,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, SessionError> {
        self.eval_packed_from(tokens, seq_len, None, req)
    }

    /// As `eval_packed`, but optionally starting at `(layer, residual stream)`: the
    /// layers below do not run and their cache slots keep what an earlier packed run
    /// of the same texts left there. The whole batch runs as one graph.
    pub fn eval_packed_from(
        &mut self,
        tokens: &[u32],
        seq_len: usize,
        start: Option<(usize, &[f32])>,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, SessionError> {
        if seq_len == 0 || !tokens.len().is_multiple_of(seq_len) {
            return Err(SessionError::Empty);
        }
        self.n_past = 0;
        let start = match start {
            None => Start::Tokens,
            Some((layer, input)) => {
                let n_embd = self.model.config.n_embd;
                if layer >= self.model.config.n_layers || input.len() != tokens.len() * n_embd {
                    return Err(SessionError::Empty);
                }
                Start::Layer { layer, input }
            }
        };
        // A mid-network start must see every token in one graph (its input is the
        // whole batch's residual stream).
        let chunk = match start {
            Start::Tokens => (self.n_batch / seq_len).max(1) * seq_len,
            Start::Layer { .. } => tokens.len(),
        };
        self.eval_layout(tokens, Layout::Packed { seq_len }, chunk, start, req)
    }

    fn eval_layout(
        &mut self,
        tokens: &[u32],
        layout: Layout,
        chunk_len: usize,
        start: Start<'_>,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::Empty);
        }
        let needed = self.n_past + tokens.len();
        if needed > self.n_ctx() {
            return Err(SessionError::ContextFull {
                needed,
                n_ctx: self.n_ctx(),
            });
        }
        let n_vocab = self.model.config.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(SessionError::BadToken { id, n_vocab });
        }
        let mut out = ForwardOutput::default();
        let chunks: Vec<&[u32]> = tokens.chunks(chunk_len).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let chunk_req = ForwardRequest {
                logits: match req.logits {
                    Logits::Last if !last => Logits::None,
                    other => other,
                },
                ..req
            };
            if self.window.is_some() {
                // Windows shift the cache between blocks; keep their graphs fresh.
                self.graphs = GraphCache::default();
            }
            let r = graph::forward(
                self.model,
                &self.weights,
                &self.cache,
                &self.backend,
                &mut self.alloc,
                &mut self.graphs,
                chunk,
                self.n_past,
                layout,
                start,
                chunk_req,
            )?;
            self.n_past += chunk.len();
            out.logits.extend_from_slice(&r.logits);
            out.logit_rows += r.logit_rows;
            if let Some(h) = r.hidden {
                out.hidden
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(&h);
            }
            merge_layer_inputs(&mut out.layer_inputs, r.layer_inputs);
        }
        Ok(out)
    }

    /// Frees room in a full context the way llama.cpp's context shift does: keeps the
    /// first `n_keep` tokens (the system prompt), drops the `n_discard` after them,
    /// moves the rest down and re-rotates their keys to their new positions. Works on
    /// every slot, so shared layers keep following their sources.
    pub fn context_shift(&mut self, n_keep: usize, n_discard: usize) -> Result<(), SessionError> {
        let n_keep = n_keep.min(self.n_past);
        let n_discard = n_discard.min(self.n_past - n_keep);
        if n_discard == 0 {
            return Ok(());
        }
        let moved = n_keep + n_discard..self.n_past;
        self.cache.move_rows(moved.clone(), n_keep);
        let new_rows = n_keep..n_keep + moved.len();
        graph::shift_keys(
            self.model,
            &self.weights,
            &self.cache,
            &self.backend,
            &mut self.alloc,
            new_rows,
            -(n_discard as i32),
        )?;
        // The shift graph took over the allocator's memory, so a kept graph's
        // tensors would point into freed buffers.
        self.graphs = GraphCache::default();
        self.n_past -= n_discard;
        Ok(())
    }

    /// Bytes of KV storage allocated for this session.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// Appends one chunk's per-layer residual streams to those of earlier chunks.
fn merge_layer_inputs(into: &mut Vec<(usize, Vec<f32>)>, chunk: Vec<(usize, Vec<f32>)>) {
    if into.is_empty() {
        *into = chunk;
        return;
    }
    for ((_, acc), (_, part)) in into.iter_mut().zip(chunk) {
        acc.extend_from_slice(&part);
    }
}
