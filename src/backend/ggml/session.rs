//! The ggml run state for one conversation or evaluation (llama2.c's `RunState`):
//! the KV cache sized for the owned slots of a `KvPlan`, the position, and the
//! graph memory.

use std::ops::Range;

use super::ffi::{DeviceKind, GgmlBackend, GgmlError, GraphAllocator};
use super::forward::{self, GraphCache, Layout, Span, Start};
use super::kv::{KvCache, KvError, KvPart};
use super::weights::{self, PlacedWeights};
use crate::gguf::GgmlType;
use crate::kvplan::{KvPlan, ShareMap};
use crate::model::Model;
use crate::runtime::chunks;
use crate::runtime::error::{Capability, RuntimeError};
use crate::runtime::options::{Capabilities, KvWindow, RunOptions};
use crate::runtime::request::{ForwardOutput, ForwardRequest, Logits, PackedBatch};
use crate::runtime::state::RunState;

/// Why a ggml session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("KV window: {0}")]
    Window(String),
}

impl From<GgmlError> for RuntimeError {
    fn from(e: GgmlError) -> Self {
        RuntimeError::backend(e)
    }
}

impl From<KvError> for RuntimeError {
    fn from(e: KvError) -> Self {
        RuntimeError::backend(e)
    }
}

impl From<SessionError> for RuntimeError {
    fn from(e: SessionError) -> Self {
        RuntimeError::backend(e)
    }
}

/// Every type of `runtime::options::CACHE_TYPES`: ggml stores and reads them all.
const GGML_CACHE_TYPES: &[GgmlType] = crate::runtime::options::CACHE_TYPES;

// Fields drop in order: graphs and buffers go before the backend that made them.
pub struct Session<'m> {
    model: &'m Model,
    graphs: GraphCache,
    alloc: GraphAllocator,
    cache: KvCache,
    weights: PlacedWeights<'m>,
    /// Tokens cached in each sequence (`RunOptions::n_seq`); sequence `s` owns
    /// cache rows `s * cells..(s + 1) * cells`.
    past: Vec<usize>,
    /// Cells per sequence.
    cells: usize,
    n_batch: usize,
    window: Option<KvWindow>,
    evicted: usize,
    /// What the session was opened with (a sibling or a new map reuses it).
    opts: RunOptions,
    backend: GgmlBackend,
}

impl<'m> Session<'m> {
    /// A session on ggml's CPU backend.
    pub fn new(model: &'m Model, map: &ShareMap, opts: &RunOptions) -> Result<Self, SessionError> {
        Self::on_device(DeviceKind::Cpu, model, map, opts)
    }

    /// A session on `device` whose cache follows `map`, every slot of
    /// `opts.type_k`/`opts.type_v`.
    pub fn on_device(
        device: DeviceKind,
        model: &'m Model,
        map: &ShareMap,
        opts: &RunOptions,
    ) -> Result<Self, SessionError> {
        let plan = KvPlan::uniform(map, opts.type_k, opts.type_v);
        Self::with_plan(device, model, &plan, opts)
    }

    /// A session on a ggml backend device: the CPU reads the weights in place from
    /// the mapped file; a GPU device gets them copied into its memory (shared with
    /// other sessions of the model on that device), and holds the KV cache (laid out
    /// by `plan`; `opts`' cache types are not used) and graph memory in its own
    /// buffers.
    pub fn with_plan(
        device: DeviceKind,
        model: &'m Model,
        plan: &KvPlan,
        opts: &RunOptions,
    ) -> Result<Self, SessionError> {
        let backend = GgmlBackend::on_device(device, opts.n_threads)?;
        let (cache, cells) = Self::cache_for(model, plan, opts, &backend)?;
        let weights = weights::place(model, &backend)?;
        let alloc = GraphAllocator::new(&backend)?;
        Ok(Session {
            model,
            graphs: GraphCache::default(),
            alloc,
            cache,
            weights,
            past: vec![0; opts.n_seq.max(1)],
            cells,
            n_batch: opts.n_batch.max(1),
            window: opts.window,
            evicted: 0,
            opts: opts.clone(),
            backend,
        })
    }

    /// The cache for `opts.n_seq` sequences of the returned cell count each.
    fn cache_for(
        model: &Model,
        plan: &KvPlan,
        opts: &RunOptions,
        backend: &GgmlBackend,
    ) -> Result<(KvCache, usize), SessionError> {
        let n_cells = match opts.window {
            Some(w) if w.recent == 0 => {
                return Err(SessionError::Window(
                    "the window must keep at least 1 recent token".into(),
                ))
            }
            Some(w) => w.cells(),
            None => opts.n_ctx,
        };
        let n_seq = opts.n_seq.max(1);
        Ok((
            KvCache::new(
                &model.config,
                plan,
                n_cells * n_seq,
                opts.exact_attention,
                backend,
            )?,
            n_cells,
        ))
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn set_threads(&mut self, n: usize) {
        self.backend.set_threads(n);
    }

    /// The ggml backend this session runs on (`is_cpu`, `device_name`).
    pub fn backend(&self) -> &GgmlBackend {
        &self.backend
    }

    /// Tokens evicted by the window so far.
    pub fn evicted(&self) -> usize {
        self.evicted
    }

    /// Evaluates `tokens` as independent texts of `seq_len` tokens each, packed into
    /// one cache from row 0 (each attends only to itself, positions restart at 0).
    /// Replaces whatever the session held.
    pub fn eval_packed(
        &mut self,
        tokens: &[u32],
        seq_len: usize,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        self.forward_packed(
            PackedBatch {
                tokens,
                seq_len,
                start: None,
                refill: &[],
            },
            req,
        )
    }

    /// Runs `tokens` in passes of `chunk_len` from sequence `seq`'s current position.
    fn eval_layout(
        &mut self,
        seq: usize,
        tokens: &[u32],
        layout: Layout,
        chunk_len: usize,
        start: Start<'_>,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        chunks::check_tokens(
            tokens,
            self.past[seq],
            self.cells,
            self.model.config.n_vocab,
        )?;
        let mut out = ForwardOutput::default();
        for (chunk, logits) in chunks::plan(tokens, chunk_len, req.logits) {
            if self.window.is_some() {
                // Windows shift the cache between blocks; keep their graphs fresh.
                self.graphs = GraphCache::default();
            }
            let span = Span {
                base: seq * self.cells,
                row0: self.past[seq],
                n: chunk.len(),
            };
            let r = self.run(
                chunk,
                &[span],
                layout,
                start,
                ForwardRequest { logits, ..req },
            )?;
            self.past[seq] += chunk.len();
            out.append(r);
        }
        Ok(out)
    }

    /// One forward pass of `tokens` laid out by `spans`.
    fn run(
        &mut self,
        tokens: &[u32],
        spans: &[Span],
        layout: Layout,
        start: Start<'_>,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        Ok(forward::forward(
            self.model,
            &self.weights,
            &self.cache,
            &self.backend,
            &mut self.alloc,
            &mut self.graphs,
            tokens,
            spans,
            self.cells,
            layout,
            start,
            req,
        )?)
    }

    /// Refuses a batch of sequences that name one twice or one that does not
    /// exist, or whose tokens do not fit.
    fn check_seqs(&self, batch: &[(usize, &[u32])]) -> Result<(), RuntimeError> {
        chunks::check_seqs(batch, &self.past, self.cells, self.model.config.n_vocab)
    }
}

impl<'m> RunState<'m> for Session<'m> {
    fn model(&self) -> &'m Model {
        self.model
    }

    fn plan(&self) -> &KvPlan {
        self.cache.plan()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: self.backend.kind().name(),
            cache_types: GGML_CACHE_TYPES,
            mixed_plans: true,
            window: true,
            context_shift: true,
            packed: true,
            sequences: true,
        }
    }

    fn describe(&self) -> String {
        if self.backend.is_cpu() {
            format!("cpu (ggml) | {} threads", self.backend.threads())
        } else {
            format!(
                "{} (ggml) on {}",
                self.backend.kind(),
                self.backend.device_name()
            )
        }
    }

    fn on_gpu(&self) -> bool {
        !self.backend.is_cpu()
    }

    fn n_past(&self) -> usize {
        self.past[0]
    }

    fn n_ctx(&self) -> usize {
        self.cells
    }

    fn window(&self) -> Option<KvWindow> {
        self.window
    }

    fn reset(&mut self) {
        self.past.fill(0);
        self.evicted = 0;
    }

    /// Cells past `n_past` are masked out, so their stale contents are never read.
    fn truncate(&mut self, n: usize) {
        self.truncate_seq(0, n);
    }

    fn n_seq(&self) -> usize {
        self.past.len()
    }

    fn seq_past(&self, seq: usize) -> usize {
        self.past.get(seq).copied().unwrap_or(0)
    }

    fn truncate_seq(&mut self, seq: usize, n: usize) {
        if let Some(p) = self.past.get_mut(seq) {
            *p = (*p).min(n);
        }
    }

    /// A single entry runs in passes of the batch size; several run as one graph
    /// in which every span attends over its own sequence's cells.
    fn forward_seqs(&mut self, batch: &[(usize, &[u32])]) -> Result<Vec<f32>, RuntimeError> {
        if self.window.is_some() {
            // Windows evict through `forward` (one sequence only, by capability).
            return match batch {
                [(0, tokens)] => self.eval(tokens, Logits::Last),
                _ => Err(self.capabilities().lacks(Capability::WindowedSequences)),
            };
        }
        self.check_seqs(batch)?;
        let cells = self.cells;
        if let [(seq, tokens)] = *batch {
            let req = ForwardRequest::logits(Logits::Last);
            let out = self.eval_layout(
                seq,
                tokens,
                Layout::Single,
                self.n_batch,
                Start::Tokens,
                req,
            )?;
            return Ok(out.logits);
        }
        let total: usize = batch.iter().map(|(_, t)| t.len()).sum();
        if total > self.n_batch {
            return Err(RuntimeError::InvalidRequest(format!(
                "a step of several sequences takes at most the batch size ({}) in tokens, got {total}",
                self.n_batch
            )));
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let spans: Vec<Span> = batch
            .iter()
            .map(|&(seq, t)| Span {
                base: seq * cells,
                row0: self.past[seq],
                n: t.len(),
            })
            .collect();
        let r = self.run(
            &tokens,
            &spans,
            Layout::Single,
            Start::Tokens,
            ForwardRequest::logits(Logits::Last),
        )?;
        for &(seq, t) in batch {
            self.past[seq] += t.len();
        }
        Ok(r.logits)
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        let Some(w) = self.window else {
            return self.eval_layout(0, tokens, Layout::Single, self.n_batch, Start::Tokens, req);
        };
        let (out, evicted) = chunks::windowed(self, w, self.n_batch, tokens, req, |s, b, r| {
            s.eval_layout(0, b, Layout::Single, b.len(), Start::Tokens, r)
        })?;
        self.evicted += evicted;
        Ok(out)
    }

    /// Frees room in a full context the way llama.cpp's context shift does. Works
    /// on every slot, so shared layers keep following their sources.
    fn context_shift(&mut self, n_keep: usize, n_discard: usize) -> Result<(), RuntimeError> {
        let n_past = self.past[0];
        let n_keep = n_keep.min(n_past);
        let n_discard = n_discard.min(n_past - n_keep);
        if n_discard == 0 {
            return Ok(());
        }
        let moved = n_keep + n_discard..n_past;
        self.cache.move_rows(moved.clone(), n_keep);
        let new_rows = n_keep..n_keep + moved.len();
        forward::shift_keys(
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
        self.past[0] -= n_discard;
        Ok(())
    }

    fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }

    fn kv_bytes_per_token(&self) -> (usize, usize) {
        (
            self.cache.bytes_per_token(),
            self.cache.bytes_per_token_unshared(),
        )
    }

    fn read_kv(
        &self,
        layer: usize,
        rows: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        if layer >= self.model.config.n_layers {
            return Err(RuntimeError::InvalidRequest(format!(
                "layer {layer} does not exist (the model has {})",
                self.model.config.n_layers
            )));
        }
        Ok((
            self.cache
                .read_rows_f32(layer, KvPart::Keys, rows.clone())?,
            self.cache.read_rows_f32(layer, KvPart::Values, rows)?,
        ))
    }

    fn set_plan(&mut self, plan: &KvPlan) -> Result<(), RuntimeError> {
        self.capabilities().check_plan(plan)?;
        if plan != self.cache.plan() {
            // The cache holds slots for the owning layers only: lay it out anew.
            (self.cache, self.cells) =
                Self::cache_for(self.model, plan, &self.opts, &self.backend)?;
            self.graphs = GraphCache::default();
        }
        self.reset();
        Ok(())
    }

    /// The whole batch runs in passes of whole texts; a mid-network start runs as
    /// one graph (its input is the whole batch's residual stream).
    fn forward_packed(
        &mut self,
        batch: PackedBatch<'_>,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        batch.check(self.model.config.n_layers, self.model.config.n_embd)?;
        let PackedBatch {
            tokens,
            seq_len,
            start,
            refill,
        } = batch;
        self.past[0] = 0;
        let start = match start {
            None => Start::Tokens,
            Some((layer, input)) => Start::Layer {
                layer,
                input,
                refill,
            },
        };
        let chunk = match start {
            Start::Tokens => (self.n_batch / seq_len).max(1) * seq_len,
            Start::Layer { .. } => tokens.len(),
        };
        self.eval_layout(0, tokens, Layout::Packed { seq_len }, chunk, start, req)
    }

    fn sibling(
        &self,
        map: &ShareMap,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError> {
        self.capabilities().check(opts)?;
        Ok(Box::new(Session::on_device(
            self.backend.kind(),
            self.model,
            map,
            opts,
        )?))
    }

    fn sibling_plan(
        &self,
        plan: &KvPlan,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError> {
        self.capabilities().check(opts)?;
        self.capabilities().check_plan(plan)?;
        Ok(Box::new(Session::with_plan(
            self.backend.kind(),
            self.model,
            plan,
            opts,
        )?))
    }
}
