//! GPU run state: weights uploaded once in their GGUF formats, the KV cache of a
//! `KvPlan` (`kv.rs`), activation buffers for one batch, and the
//! whole forward pass recorded as a list of (pipeline, bind group) ops built once.
//! Each pass writes the `Step` uniform and the token ids, then records every op
//! into one command encoder.

use std::collections::HashMap;
#[cfg(feature = "test-support")]
use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::device::{AdapterPolicy, GpuContext};
use super::kernels::{
    activation_mode, bind, matvec_grid, read_back, read_back_all, rope_table, rope_table_at,
    rows_buffer, staging, storage, storage_with, store_groups, tiled_grid, uniform, AttnKernels,
    Kernels, MAX_HEAD_DIM, SPLIT_LEN,
};
use super::kv::{GpuKv, Slot};
use super::{GpuError, GPU_WEIGHT_TYPES};
use crate::gguf::GgmlType;
use crate::kvplan::{Half, KvPlan, ShareMap};
use crate::model::LayerRole::{
    AttnK, AttnKBias, AttnKNorm, AttnNorm, AttnOutputAdapted, AttnQAdapted, AttnQBias, AttnQNorm,
    AttnV, AttnVBias, FfnDown, FfnGate, FfnNorm, FfnUp,
};
use crate::model::{LayerRole, LayerWeights, Model};
use crate::runtime::chunks;
use crate::runtime::error::Capability;
use crate::runtime::error::RuntimeError;
use crate::runtime::options::{Capabilities, KvWindow, RunOptions};
use crate::runtime::request::{ForwardOutput, ForwardRequest, Logits, PackedBatch};
use crate::runtime::state::RunState;

#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub n_ctx: usize,
    /// Most tokens per forward pass; longer inputs run in chunks. Lowered when the
    /// logits of a full batch would not fit one storage binding.
    pub n_batch: usize,
    pub policy: AdapterPolicy,
    /// Imitate ggml's CPU numerics: round activations before each matmul as ggml
    /// does (8-bit blocks for quantized weights, f16 for f16 weights) and take its
    /// f16 attention path for batches under 64. Each matmul then computes ggml's
    /// formula (see the kernel tests), but whole-model logits get no closer to the
    /// CPU's: ggml's own results move as much with its batch size. Off (default):
    /// f32 activations, closer to exact arithmetic.
    pub ggml_activation_rounding: bool,
    /// StreamingLLM eviction: the cache holds `sink + recent` cells whatever
    /// `n_ctx` says (`RunOptions::window`).
    pub window: Option<KvWindow>,
    /// Sequences in the cache, `n_ctx` cells each (`RunOptions::n_seq`).
    pub n_seq: usize,
}

impl GpuOptions {
    /// The GPU options for what a caller asks of any run state.
    pub fn from_run(opts: &RunOptions, policy: AdapterPolicy) -> Self {
        GpuOptions {
            n_ctx: opts.n_ctx,
            n_batch: opts.n_batch,
            policy,
            window: opts.window,
            n_seq: opts.n_seq,
            ..Default::default()
        }
    }
}

/// What the WGSL forward pass can do: everything the CPU backend does (every
/// cache type and plan, windows, context shift, packed texts from a cached layer
/// input, several sequences stepped together).
pub const CAPABILITIES: Capabilities = Capabilities {
    backend: "wgpu",
    cache_types: crate::runtime::options::CACHE_TYPES,
    mixed_plans: true,
    window: true,
    context_shift: true,
    packed: true,
    sequences: true,
};

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            n_ctx: 4096,
            n_batch: 256,
            policy: AdapterPolicy::Any,
            ggml_activation_rounding: false,
            window: None,
            n_seq: 1,
        }
    }
}

/// Reports a device's GPU memory (see `GpuSession::memory_probe`).
pub struct GpuMemoryProbe(wgpu::Device);

impl GpuMemoryProbe {
    /// Bytes the device's allocator holds for everything run on it (weights, caches,
    /// activations, siblings' too), where the backend reports it (Vulkan, DX12);
    /// `None` elsewhere. Resources dropped since the last wait are freed first.
    pub fn allocated_bytes(&self) -> Option<u64> {
        let _ = self.0.poll(wgpu::PollType::wait_indefinitely());
        self.0
            .generate_allocator_report()
            .map(|r| r.total_allocated_bytes)
    }
}

/// A weight on the GPU: its file bytes, untouched.
struct GpuWeight {
    buf: wgpu::Buffer,
    ty: GgmlType,
    cols: u32,
    rows: u32,
    row_bytes: u32,
}

/// What a recorded op dispatches, given the pass's token count.
enum Grid {
    /// `matvec` when one row of activations is used, else `matmul_tiled`.
    Matmul {
        ty: GgmlType,
        rows: u32,
        last_only: bool,
    },
    /// (x workgroups, one y per token).
    PerToken(u32),
    /// Prefill attention, or split-K decode attention then its combine, with the
    /// kernels of the slots' types.
    Attention {
        n_head: u32,
        n_head_kv: u32,
        kernels: AttnKernels,
    },
    /// The last token's logits only: one workgroup.
    Single,
}

/// The weights a session binds, and where each planned tensor (by its index in the
/// model's `WeightPlan`) is among them. A sibling session starts from a clone: the
/// same GPU buffers.
#[derive(Clone, Default)]
struct WeightSet {
    list: Vec<Arc<GpuWeight>>,
    by_plan: HashMap<usize, usize>,
}

struct Op {
    grid: Grid,
    /// For `Grid::Matmul`: matvec's pipeline; otherwise the op's only one.
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
}

struct Activations {
    /// Residual stream [batch][n_embd].
    x: wgpu::Buffer,
    /// Normed input of the next matmul [batch][n_embd].
    xn: wgpu::Buffer,
    /// A matmul input rounded as ggml rounds it [batch][widest input].
    xq: wgpu::Buffer,
    /// Q8_1 block-sum corrections of xq [batch][widest input / 32].
    corr: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    attn: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    logits: wgpu::Buffer,
    tokens: wgpu::Buffer,
    argmax: wgpu::Buffer,
    /// RoPE (cos, sin) of this pass's positions [batch][head_dim / 2].
    rope: wgpu::Buffer,
    /// `ROWS` (common.wgsl): per token, (cache row, first row attended).
    rows: wgpu::Buffer,
    /// `ROWS` counting up from 0 ([t, 0] for token t): the context shift's stores
    /// (at the step's pos0 plus the token index).
    counting: wgpu::Buffer,
    /// Split-K attention partials: per head, per split, (max, sum, head_dim outputs).
    part: wgpu::Buffer,
}

pub struct GpuSession<'m> {
    model: &'m Model,
    /// Everything a recorded forward pass binds; lives as long as the session.
    parts: ForwardParts,
    plan: KvPlan,
    /// The plan's recorded forward pass.
    forward: Forward,
    staging: wgpu::Buffer,
    /// Read-back buffer for one batch of final hidden states.
    hidden_staging: wgpu::Buffer,
    /// `read_kv`'s f32 rows on the GPU and their staging buffer, kept between calls
    /// and grown when a call needs more (bytes each).
    kv_read: Mutex<Option<(wgpu::Buffer, wgpu::Buffer, u64)>>,
    /// Staging for every layer's input of one pass (`ForwardRequest::layer_inputs`),
    /// allocated on first use.
    capture: Option<wgpu::Buffer>,
    /// Tokens cached per sequence; sequence `s` owns cells `s * n_ctx ..`.
    past: Vec<usize>,
    /// Cache cells per sequence: the context size, or `sink + recent` with a window.
    n_ctx: usize,
    n_batch: usize,
    window: Option<KvWindow>,
    /// Tokens the window evicted so far.
    evicted: usize,
    rope_factors: Option<Vec<f32>>,
}

impl<'m> GpuSession<'m> {
    /// A session for `map` with f16 slots.
    pub fn new(model: &'m Model, map: &ShareMap, opts: &GpuOptions) -> Result<Self, GpuError> {
        Self::with_plan(
            model,
            &KvPlan::uniform(map, GgmlType::F16, GgmlType::F16),
            opts,
        )
    }

    /// A session whose cache is laid out for `plan` (sources and types of both halves).
    pub fn with_plan(model: &'m Model, plan: &KvPlan, opts: &GpuOptions) -> Result<Self, GpuError> {
        check_request(model, plan, opts)?;
        let ctx = GpuContext::new(opts.policy)?;
        Self::build(model, plan, opts, ctx, WeightSet::default(), None)
    }

    /// A session for `RunOptions` on an adapter `policy` accepts; options beyond
    /// `CAPABILITIES` are refused before any adapter is opened.
    pub fn open(
        model: &'m Model,
        map: &ShareMap,
        opts: &RunOptions,
        policy: AdapterPolicy,
    ) -> Result<Self, RuntimeError> {
        Self::open_plan(
            model,
            &KvPlan::uniform(map, opts.type_k, opts.type_v),
            opts,
            policy,
        )
    }

    /// `open` for a `KvPlan` (its types, not `opts.type_k/type_v`).
    pub fn open_plan(
        model: &'m Model,
        plan: &KvPlan,
        opts: &RunOptions,
        policy: AdapterPolicy,
    ) -> Result<Self, RuntimeError> {
        CAPABILITIES.check(opts)?;
        CAPABILITIES.check_plan(plan)?;
        Ok(Self::with_plan(
            model,
            plan,
            &GpuOptions::from_run(opts, policy),
        )?)
    }

    /// A second session over the same model on this session's device: it shares
    /// the device and queue, the compiled kernels and the uploaded weights, and
    /// has its own KV slots, activations and recorded forward pass for `map` and
    /// `opts`. K/V projections this session left out (layers it built as shared)
    /// are uploaded for the sibling only where `map` needs them. `opts.policy` is
    /// only checked: a sibling of a software adapter's session refuses
    /// `HardwareOnly`. Running either session leaves the other's state untouched.
    pub fn sibling_with(
        &self,
        map: &ShareMap,
        opts: &GpuOptions,
    ) -> Result<GpuSession<'m>, GpuError> {
        self.sibling_plan_with(&KvPlan::uniform(map, GgmlType::F16, GgmlType::F16), opts)
    }

    /// `sibling_with` for a `KvPlan`.
    pub fn sibling_plan_with(
        &self,
        plan: &KvPlan,
        opts: &GpuOptions,
    ) -> Result<GpuSession<'m>, GpuError> {
        check_request(self.model, plan, opts)?;
        if opts.policy == AdapterPolicy::HardwareOnly && self.parts.ctx.is_software() {
            return Err(GpuError::SoftwareOnly(self.parts.ctx.adapter_description()));
        }
        Self::build(
            self.model,
            plan,
            opts,
            self.parts.ctx.clone(),
            self.parts.weights.clone(),
            Some(self.parts.kernels.clone()),
        )
    }

    /// Uploads what `weights` lacks of `plan`'s forward pass, compiles the kernels
    /// (or those missing from `kernels`), allocates the run state and records the
    /// forward pass.
    fn build(
        model: &'m Model,
        plan: &KvPlan,
        opts: &GpuOptions,
        ctx: GpuContext,
        mut weights: WeightSet,
        kernels: Option<Kernels>,
    ) -> Result<Self, GpuError> {
        let c = &model.config;
        let limits = ctx.limits();
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let wp = &model.weights;
        let (token_embd, output_norm, output, layer_idx) =
            ctx.scoped("uploading weights", || {
                let mut up = |id| upload(&ctx, model, &mut weights, id, max_binding);
                let token_embd = up(wp.token_embd())?;
                let output_norm = up(wp.output_norm())?;
                // Tied embeddings: the plan's output is the embedding, uploaded once.
                let output = up(wp.output())?;
                if let Some(id) = wp.rope_freqs() {
                    up(id)?;
                }
                let layer_idx = place_layers(&ctx, model, plan, &mut weights, max_binding)?;
                Ok((token_embd, output_norm, output, layer_idx))
            })?;
        let types: Vec<GgmlType> = weights.list.iter().map(|w| w.ty).collect();
        let mut kernels = match kernels {
            Some(mut shared) => {
                shared.add_types(&ctx, &types)?;
                shared
            }
            None => Kernels::new(&ctx, &types)?,
        };
        kernels.add_cache_pairs(&ctx, &read_pairs(plan))?;

        let cells = opts.window.map_or(opts.n_ctx, |w| w.cells());
        let n_seq = opts.n_seq.max(1);
        // Batch: the logits of a whole batch must fit one binding.
        let n_vocab = c.n_vocab;
        let max_rows_by_logits = (max_binding / (n_vocab as u64 * 4)).max(1) as usize;
        let n_batch = opts.n_batch.clamp(1, max_rows_by_logits).min(cells * n_seq);
        let (e, q_dim, kv, ff) = (c.n_embd, c.n_head * c.head_dim, c.n_embd_kv(), c.n_ff);
        // A query attends within its own sequence: at most `cells` keys.
        let max_splits = cells.div_ceil(SPLIT_LEN as usize);

        let (act, cache) = ctx.scoped("allocating GPU buffers", || {
            let f32s = |label: &str, n: usize| storage(&ctx, label, (n * 4) as u64);
            let act = Activations {
                x: f32s("x", n_batch * e),
                xn: f32s("xn", n_batch * e),
                xq: f32s("xq", n_batch * e.max(q_dim).max(ff)),
                corr: f32s("corr", n_batch * e.max(q_dim).max(ff) / 32),
                q: f32s("q", n_batch * q_dim),
                k: f32s("k", n_batch * kv),
                v: f32s("v", n_batch * kv),
                attn: f32s("attn", n_batch * q_dim),
                gate: f32s("gate", n_batch * ff),
                up: f32s("up", n_batch * ff),
                logits: f32s("logits", n_batch * n_vocab),
                tokens: storage(&ctx, "tokens", (n_batch * 4) as u64),
                argmax: storage(&ctx, "argmax", 4),
                rope: f32s("rope table", n_batch * c.head_dim),
                rows: storage(&ctx, "rows", (n_batch * 8) as u64),
                counting: rows_buffer(&ctx, (0..n_batch as u32).map(|t| [t, 0])),
                part: f32s(
                    "attention partials",
                    c.n_head * max_splits * (c.head_dim + 2),
                ),
            };
            let cache = GpuKv::new(&ctx, plan, cells * n_seq, (kv, c.head_dim), max_binding)?;
            Ok((act, cache))
        })?;
        let step = uniform(&ctx, [0; 8]);
        let staging_buf = staging(&ctx, (n_batch * n_vocab * 4) as u64);
        let hidden_staging = staging(&ctx, (n_batch * e * 4) as u64);

        // The frequency factors enter the host-side RoPE table (see rope.wgsl).
        let rope_factors: Option<Vec<f32>> = wp.rope_freqs().map(|id| {
            model
                .weight_bytes(id)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        });

        let parts = ForwardParts {
            ctx,
            kernels,
            weights,
            act,
            step,
            kv: cache,
            layer_idx,
            token_embd,
            output_norm,
            output,
            max_splits,
            max_binding,
            n_embd_kv: kv,
            rounding: opts.ggml_activation_rounding,
        };
        let forward = parts.record(model, plan)?;
        Ok(GpuSession {
            model,
            parts,
            plan: plan.clone(),
            forward,
            staging: staging_buf,
            hidden_staging,
            kv_read: Mutex::new(None),
            capture: None,
            past: vec![0; n_seq],
            n_ctx: cells,
            n_batch,
            window: opts.window,
            evicted: 0,
            rope_factors,
        })
    }

    pub fn adapter_description(&self) -> String {
        self.parts.ctx.adapter_description()
    }

    pub fn is_software(&self) -> bool {
        self.parts.ctx.is_software()
    }

    /// Tokens per forward pass.
    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// KV slots allocated: one per owned half (a K and a V slot per owning layer
    /// of a whole-layer map).
    pub fn n_slots(&self) -> usize {
        self.parts.kv.n_slots()
    }

    /// Tokens the window evicted so far.
    pub fn evicted(&self) -> usize {
        self.evicted
    }

    /// A handle reporting the GPU memory this session's device holds, usable while
    /// the session runs.
    pub fn memory_probe(&self) -> GpuMemoryProbe {
        GpuMemoryProbe(self.parts.ctx.device.clone())
    }

    #[cfg(feature = "test-support")]
    /// Weight tensors on the GPU (a tied output counts once with the embedding).
    pub fn n_weight_buffers(&self) -> usize {
        self.parts.weights.list.len()
    }

    #[cfg(feature = "test-support")]
    /// How many of this session's weight buffers are also `other`'s: the same GPU
    /// memory, as between a session and its siblings (0 between independent ones).
    pub fn weight_buffers_shared_with(&self, other: &GpuSession<'_>) -> usize {
        let theirs: HashSet<*const GpuWeight> =
            other.parts.weights.list.iter().map(Arc::as_ptr).collect();
        self.parts
            .weights
            .list
            .iter()
            .filter(|w| theirs.contains(&Arc::as_ptr(w)))
            .count()
    }

    #[cfg(feature = "test-support")]
    /// True when both sessions run on one wgpu device (a session and its siblings).
    pub fn shares_device_with(&self, other: &GpuSession<'_>) -> bool {
        self.parts.ctx.same_device(&other.parts.ctx)
    }

    /// Lays the cache out for another plan over the same weights (uploading K/V
    /// projections a layer that owns a half now needs, reallocating the slots whose
    /// owner or type changed), records its forward pass and empties the context
    /// (the cells' meaning changes with the plan). The searches measure many plans
    /// on one session this way.
    fn apply_plan(&mut self, plan: &KvPlan) -> Result<(), GpuError> {
        check_request(self.model, plan, &self.options())?;
        let parts = &mut self.parts;
        parts.layer_idx = parts.ctx.scoped("uploading weights", || {
            place_layers(
                &parts.ctx,
                self.model,
                plan,
                &mut parts.weights,
                parts.max_binding,
            )
        })?;
        let types: Vec<GgmlType> = parts.weights.list.iter().map(|w| w.ty).collect();
        parts.kernels.add_types(&parts.ctx, &types)?;
        parts
            .kernels
            .add_cache_pairs(&parts.ctx, &read_pairs(plan))?;
        parts.ctx.scoped("allocating GPU buffers", || {
            parts.kv.relayout(&parts.ctx, plan, parts.max_binding)
        })?;
        self.forward = parts.record(self.model, plan)?;
        self.plan = plan.clone();
        self.past.fill(0);
        Ok(())
    }

    /// The options this session was built with, as far as `check_request` reads them.
    fn options(&self) -> GpuOptions {
        GpuOptions {
            n_ctx: self.n_ctx,
            n_batch: self.n_batch,
            window: self.window,
            n_seq: self.past.len(),
            ..Default::default()
        }
    }

    /// `eval`, also returning the final hidden states (after the output norm) of
    /// every token, `[tokens][n_embd]`.
    pub fn eval_with_hidden(
        &mut self,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        self.eval_reading(tokens, logits, true)
    }

    /// Runs `tokens` in batches at the end of sequence 0, reading back the logits
    /// asked for and, with `hidden`, every token's final hidden state.
    fn eval_reading(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        hidden: bool,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        self.check(tokens)?;
        let mut out = Vec::new();
        let mut states = Vec::new();
        for (chunk, want) in chunks::plan(tokens, self.n_batch, logits) {
            let rows = self.seq_rows(0, chunk.len());
            let got = self.pass(&Pass {
                hidden,
                ..Pass::new(chunk, &rows, want)
            })?;
            self.past[0] += chunk.len();
            out.extend(floats(&got.logits));
            states.extend(floats(&got.hidden));
        }
        Ok((out, states))
    }

    /// `ROWS` for `n` tokens appended to sequence `seq`.
    fn seq_rows(&self, seq: usize, n: usize) -> Vec<[u32; 2]> {
        let base = seq * self.n_ctx;
        let first = base + self.past[seq];
        (first..first + n)
            .map(|r| [r as u32, base as u32])
            .collect()
    }

    /// The keys (post-RoPE) and values that `layer` attends over, at cache cells
    /// `rows`, as f32 `[rows][n_embd_kv]` each: both slots dequantized on the GPU
    /// into one buffer and read back with one wait (the buffers are kept).
    fn read_kv_rows(
        &self,
        layer: usize,
        rows: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        let n_layers = self.model.config.n_layers;
        if layer >= n_layers {
            return Err(GpuError::BadInput(format!(
                "layer {layer} does not exist (the model has {n_layers})"
            )));
        }
        if rows.end > self.past[0] {
            return Err(GpuError::BadInput(format!(
                "cache cells up to {} asked for, but only {} are filled",
                rows.end, self.past[0]
            )));
        }
        let rows = rows.start.min(rows.end)..rows.end;
        let kv = self.model.config.n_embd_kv();
        let n = rows.len();
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let slot = |half: Half| {
            self.parts
                .kv
                .own(half, self.plan.source(half, layer))
                .ok_or_else(|| {
                    GpuError::BadInput(format!("layer {layer} has no KV slot in this session"))
                })
        };
        let (ks, vs) = (slot(Half::Keys)?, slot(Half::Values)?);
        let bytes = (2 * n * kv * 4) as u64;
        let ctx = &self.parts.ctx;
        let mut kept = self.kv_read.lock().unwrap_or_else(|e| e.into_inner());
        if kept.as_ref().is_none_or(|k| k.2 < bytes) {
            *kept = Some((storage(ctx, "kv read", bytes), staging(ctx, bytes), bytes));
        }
        let Some((out, staging_buf, _)) = kept.as_ref() else {
            unreachable!("allocated above")
        };
        let raw = ctx.scoped("reading a KV slot back", || {
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("kv read-back"),
                });
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for (i, s) in [ks, vs].into_iter().enumerate() {
                    self.parts
                        .load_rows(&mut pass, s, rows.clone(), out, (i * n * kv) as u32);
                }
            }
            read_back(ctx, encoder, out, bytes, staging_buf)
        })?;
        let mut k: Vec<f32> = raw.chunks_exact(4).map(le_f32).collect();
        let v = k.split_off(n * kv);
        Ok((k, v))
    }

    #[cfg(feature = "test-support")]
    /// Appends `tokens` and returns the id of the last token's largest logit,
    /// computed on the GPU (greedy decoding reads back 4 bytes, not the vocabulary).
    pub fn eval_argmax(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        self.check(tokens)?;
        let mut id = 0;
        for (chunk, want) in chunks::plan(tokens, self.n_batch, Logits::Last) {
            let rows = self.seq_rows(0, chunk.len());
            let last = want == Logits::Last;
            let got = self.pass(&Pass {
                argmax: last,
                ..Pass::new(chunk, &rows, want)
            })?;
            self.past[0] += chunk.len();
            if last {
                let b = &got.logits;
                id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(id)
    }

    /// `forward` without a window: `tokens` in passes of the batch size.
    fn forward_unwindowed(
        &mut self,
        tokens: &[u32],
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        let (logits, hidden) = self.eval_reading(tokens, req.logits, req.hidden)?;
        Ok(ForwardOutput {
            logit_rows: logits.len() / self.model.config.n_vocab.max(1),
            logits,
            hidden: req.hidden.then_some(hidden),
            layer_inputs: Vec::new(),
        })
    }

    fn check(&self, tokens: &[u32]) -> Result<(), RuntimeError> {
        chunks::check_tokens(tokens, self.past[0], self.n_ctx, self.model.config.n_vocab)
    }

    /// One forward pass of at most n_batch tokens, each at its own cache row
    /// (`Pass::rows`): the refills first, one submission each, then one command
    /// encoder for the pass, whose compute pass breaks only where a layer's input
    /// is copied out; then the logits (or the argmax), the hidden states and the
    /// layer inputs asked for, read back after one wait. Leaves `past` alone.
    fn pass(&mut self, p: &Pass<'_>) -> Result<PassOutput, GpuError> {
        let c = &self.model.config;
        let (n, e, n_layers) = (p.tokens.len(), c.n_embd, c.n_layers);
        let start_layer = p.start.map_or(0, |(layer, _)| layer);
        let layer_bytes = (n * e * 4) as u64;
        if p.layer_inputs && self.capture.is_none() {
            let bytes = (n_layers * self.n_batch * e * 4) as u64;
            self.capture = Some(staging(&self.parts.ctx, bytes));
        }
        let ctx = &self.parts.ctx;
        let act = &self.parts.act;
        let ops = &self.forward.layers;
        let n32 = n as u32;
        ctx.scoped("a forward pass", || {
            ctx.queue.write_buffer(
                &self.parts.step,
                0,
                bytemuck::cast_slice(&[n32, 0u32, 0u32, 0u32]),
            );
            ctx.queue
                .write_buffer(&act.tokens, 0, bytemuck::cast_slice(p.tokens));
            ctx.queue
                .write_buffer(&act.rows, 0, bytemuck::cast_slice(p.rows));
            let table = rope_table_at(
                p.rows.iter().map(|&[row, first]| i64::from(row - first)),
                c.head_dim,
                c.rope_freq_base,
                c.rope_freq_scale,
                self.rope_factors.as_deref(),
            );
            ctx.queue
                .write_buffer(&act.rope, 0, bytemuck::cast_slice(&table));
            // A queued write lands before the next submission: each refill writes
            // its input, then runs its layer up to the stores.
            for &(layer, input) in &p.refill {
                ctx.queue
                    .write_buffer(&act.x, 0, bytemuck::cast_slice(input));
                let mut encoder = self.encoder("refill");
                let at = &self.forward.layer_ops[layer];
                self.record_ops(&mut encoder, at.start..at.stored, p.rows, &[]);
                ctx.queue.submit([encoder.finish()]);
            }
            let first_op = match p.start {
                None => 0,
                Some((layer, input)) => {
                    ctx.queue
                        .write_buffer(&act.x, 0, bytemuck::cast_slice(input));
                    self.forward.layer_ops[layer].start
                }
            };
            let tail: Vec<&Op> = match p.logits {
                Logits::All => vec![&self.forward.logits_all],
                Logits::Last if p.argmax => {
                    vec![&self.forward.logits_last, &self.forward.argmax]
                }
                Logits::Last => vec![&self.forward.logits_last],
                Logits::None => vec![],
            };
            let mut encoder = self.encoder("forward");
            let mut from = first_op;
            let capture = self.capture.as_ref().filter(|_| p.layer_inputs);
            if let Some(capture) = capture {
                for (k, layer) in (start_layer..n_layers).enumerate() {
                    let at = self.forward.layer_ops[layer].start;
                    self.record_ops(&mut encoder, from..at, p.rows, &[]);
                    encoder.copy_buffer_to_buffer(
                        &act.x,
                        0,
                        capture,
                        k as u64 * layer_bytes,
                        layer_bytes,
                    );
                    from = at;
                }
            }
            self.record_ops(&mut encoder, from..ops.len(), p.rows, &tail);
            let (src, read) = if p.argmax {
                (&act.argmax, 4)
            } else {
                let rows = p.logits.rows(n);
                (&act.logits, (rows * c.n_vocab * 4) as u64)
            };
            // The body's last op leaves the output norm's result in `xn`.
            let captured = (n_layers - start_layer) as u64 * layer_bytes;
            let reads: Vec<(Option<&wgpu::Buffer>, u64, &wgpu::Buffer)> = [
                (read > 0).then_some((Some(src), read, &self.staging)),
                p.hidden
                    .then_some((Some(&act.xn), layer_bytes, &self.hidden_staging)),
                capture.map(|buf| (None, captured, buf)),
            ]
            .into_iter()
            .flatten()
            .collect();
            if reads.is_empty() {
                ctx.queue.submit([encoder.finish()]);
                return Ok(PassOutput::default());
            }
            let mut got = read_back_all(ctx, encoder, &reads)?.into_iter();
            let mut out = PassOutput::default();
            if read > 0 {
                out.logits = got.next().unwrap_or_default();
            }
            if p.hidden {
                out.hidden = got.next().unwrap_or_default();
            }
            if let Some(bytes) = got.next() {
                out.layer_inputs = bytes
                    .chunks_exact(layer_bytes as usize)
                    .zip(start_layer..)
                    .map(|(b, layer)| (layer, floats(b)))
                    .collect();
            }
            Ok(out)
        })
    }

    fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.parts
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Records the forward pass's ops `range`, then `tail`, as one compute pass
    /// (none when both are empty).
    fn record_ops(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        range: Range<usize>,
        rows: &[[u32; 2]],
        tail: &[&Op],
    ) {
        if range.is_empty() && tail.is_empty() {
            return;
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("forward"),
            timestamp_writes: None,
        });
        for op in self.forward.layers[range]
            .iter()
            .chain(tail.iter().copied())
        {
            self.record(&mut pass, op, rows);
        }
    }

    /// Dispatches `op` for a pass over tokens at `rows`.
    fn record(&self, pass: &mut wgpu::ComputePass<'_>, op: &Op, at: &[[u32; 2]]) {
        let n = at.len() as u32;
        match op.grid {
            Grid::Matmul {
                ty,
                rows,
                last_only,
            } => {
                if last_only || n == 1 {
                    let (x, y) = matvec_grid(rows);
                    pass.set_pipeline(&op.pipeline);
                    pass.set_bind_group(0, &op.group, &[]);
                    pass.dispatch_workgroups(x, y, 1);
                } else {
                    let (x, y) = tiled_grid(rows, n);
                    pass.set_pipeline(&self.parts.kernels.matmul_for(ty).tiled.pipeline);
                    pass.set_bind_group(0, &op.group, &[]);
                    pass.dispatch_workgroups(x, y, 1);
                }
            }
            Grid::PerToken(x) => {
                pass.set_pipeline(&op.pipeline);
                pass.set_bind_group(0, &op.group, &[]);
                pass.dispatch_workgroups(x, n, 1);
            }
            Grid::Attention {
                n_head,
                n_head_kv,
                ref kernels,
            } => {
                pass.set_bind_group(0, &op.group, &[]);
                // Keys the first token attends to (the only token when decoding).
                let keys = at.first().map_or(1, |&[row, first]| row - first + 1);
                // With ggml rounding, follow the path ggml's CPU flash attention takes
                // for this pass over f16 slots (it splits keys across threads once the
                // padded cache view reaches 512 cells, and goes tiled f32 from 64
                // queries).
                let padded = (keys as usize).next_multiple_of(256).min(self.n_ctx);
                let ggml_serial = self.parts.rounding && n < 64 && !(n == 1 && padded >= 512);
                if ggml_serial {
                    pass.set_pipeline(&kernels.f16_serial.pipeline);
                    pass.dispatch_workgroups(n_head, n, 1);
                } else if n == 1 {
                    let n_splits = keys.div_ceil(SPLIT_LEN);
                    let (split, x) = kernels.split_for(n_head, n_head_kv);
                    pass.set_pipeline(&split.pipeline);
                    pass.dispatch_workgroups(x, n_splits, 1);
                    pass.set_pipeline(&kernels.combine.pipeline);
                    pass.dispatch_workgroups(n_head, 1, 1);
                } else {
                    pass.set_pipeline(&op.pipeline);
                    pass.dispatch_workgroups(n_head, n, 1);
                }
            }
            Grid::Single => {
                pass.set_pipeline(&op.pipeline);
                pass.set_bind_group(0, &op.group, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
        }
    }
}

/// One forward pass of at most `n_batch` tokens (`GpuSession::pass`).
struct Pass<'a> {
    tokens: &'a [u32],
    /// Per token: (cache row, first row it attends to); its position is the
    /// difference (`ROWS` in common.wgsl).
    rows: &'a [[u32; 2]],
    logits: Logits,
    /// With `Logits::Last`: read back the last token's argmax (4 bytes) instead.
    argmax: bool,
    /// Read back every token's final hidden state.
    hidden: bool,
    /// Run from this layer, with this residual stream (`[tokens][n_embd]`)
    /// entering it, instead of from the token embeddings.
    start: Option<(usize, &'a [f32])>,
    /// Layers below `start` whose owned slots are stored again first, each from
    /// the residual stream entering it.
    refill: Vec<(usize, &'a [f32])>,
    /// Read back every layer's input from `start` on.
    layer_inputs: bool,
}

impl<'a> Pass<'a> {
    fn new(tokens: &'a [u32], rows: &'a [[u32; 2]], logits: Logits) -> Self {
        Pass {
            tokens,
            rows,
            logits,
            argmax: false,
            hidden: false,
            start: None,
            refill: Vec::new(),
            layer_inputs: false,
        }
    }
}

/// What `GpuSession::pass` read back.
#[derive(Default)]
struct PassOutput {
    /// `[rows][n_vocab]` f32 logits, or the argmax's 4 bytes.
    logits: Vec<u8>,
    /// `[tokens][n_embd]` f32 final hidden states.
    hidden: Vec<u8>,
    /// `(layer, [tokens][n_embd])` for every layer from the start on.
    layer_inputs: Vec<(usize, Vec<f32>)>,
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(le_f32).collect()
}

/// The checks `new`, `sibling` and `set_plan` make before touching the device.
fn check_request(model: &Model, plan: &KvPlan, opts: &GpuOptions) -> Result<(), GpuError> {
    let c = &model.config;
    if plan.n_layers() != c.n_layers {
        return Err(GpuError::MapMismatch {
            map: plan.n_layers(),
            model: c.n_layers,
        });
    }
    if opts.n_ctx == 0 {
        return Err(GpuError::BadInput("context size must be at least 1".into()));
    }
    if opts.n_seq == 0 || (opts.n_seq > 1 && opts.window.is_some()) {
        return Err(GpuError::BadInput(
            "a session holds at least one sequence, and only one with a window".into(),
        ));
    }
    if opts.window.is_some_and(|w| w.recent == 0) {
        return Err(GpuError::BadInput(
            "the window must keep at least 1 recent token".into(),
        ));
    }
    if c.head_dim > MAX_HEAD_DIM || !c.head_dim.is_multiple_of(4) {
        return Err(GpuError::BadInput(format!(
            "head dimension {} is not a multiple of 4 up to the {MAX_HEAD_DIM} the attention kernels handle",
            c.head_dim
        )));
    }
    for half in Half::BOTH {
        for l in 0..c.n_layers {
            let ty = plan.read_type(half, l);
            if !CAPABILITIES.cache_types.contains(&ty) {
                return Err(GpuError::UnsupportedCacheType(ty.name()));
            }
        }
    }
    Ok(())
}

/// Uploads planned tensor `id` (as the file stores it) unless `weights` holds it;
/// its index in `weights`.
fn upload(
    ctx: &GpuContext,
    model: &Model,
    weights: &mut WeightSet,
    id: usize,
    max_binding: u64,
) -> Result<usize, GpuError> {
    if let Some(&i) = weights.by_plan.get(&id) {
        return Ok(i);
    }
    // The plan checked names, shapes and types; here only what the wgpu kernels add.
    let info = model.weights.tensor(id);
    let (name, ty) = (info.name.as_str(), info.ty);
    let matmul = info.role.is_matmul();
    if matmul && !GPU_WEIGHT_TYPES.contains(&ty) {
        return Err(GpuError::UnsupportedType {
            tensor: name.to_string(),
            ty: ty.name(),
        });
    }
    let cols = info.dims.first().copied().unwrap_or(0) as usize;
    let rows = info.dims.iter().skip(1).product::<u64>() as usize;
    if matmul && !cols.is_multiple_of(32) {
        return Err(GpuError::UnsupportedShape {
            tensor: name.to_string(),
            cols,
        });
    }
    let bytes = model.weight_bytes(id);
    if bytes.len() as u64 + 8 > max_binding {
        return Err(GpuError::Limit {
            adapter: ctx.adapter_description(),
            limit: "max_storage_buffer_binding_size",
            needed: bytes.len() as u64 + 8,
            available: max_binding,
            what: format!("tensor {name}"),
        });
    }
    let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
    weights.list.push(Arc::new(GpuWeight {
        buf: storage_with(ctx, name, bytes),
        ty,
        cols: cols as u32,
        rows: rows as u32,
        row_bytes: row_bytes as u32,
    }));
    let i = weights.list.len() - 1;
    weights.by_plan.insert(id, i);
    Ok(i)
}

/// The half of the cache a tensor computes, for the K/V projections, their biases
/// and the key norm.
fn projection_half(role: LayerRole) -> Option<Half> {
    match role {
        AttnK | AttnKBias | AttnKNorm => Some(Half::Keys),
        AttnV | AttnVBias => Some(Half::Values),
        _ => None,
    }
}

/// Where each layer's tensors are in `weights`, uploading what `plan` needs: a
/// layer that shares a half never computes it, so that half's projections are not
/// even uploaded (`usize::MAX` there).
fn place_layers(
    ctx: &GpuContext,
    model: &Model,
    plan: &KvPlan,
    weights: &mut WeightSet,
    max_binding: u64,
) -> Result<Vec<LayerWeights>, GpuError> {
    let mut out = Vec::with_capacity(plan.n_layers());
    for (il, lw) in model.weights.layers().iter().enumerate() {
        // An adapted tensor only where the plan reads the source it was fitted for.
        let unused_adapter = |role: LayerRole| {
            [
                (Half::Keys, AttnQAdapted),
                (Half::Values, AttnOutputAdapted),
            ]
            .iter()
            .any(|&(half, a)| role == a && model.weights.adapted_role(il, half, plan) != a)
        };
        let mut placed = |role: LayerRole, id: usize| match projection_half(role) {
            Some(half) if !plan.owns(half, il) => Ok(usize::MAX),
            _ if unused_adapter(role) => Ok(usize::MAX),
            _ => upload(ctx, model, weights, id, max_binding),
        };
        let mut idx = LayerWeights::try_from_fn(|role| placed(role, lw[role]))?;
        for role in LayerRole::OPTIONAL {
            if let Some(id) = lw.get(role) {
                idx.set_optional(role, placed(role, id)?);
            }
        }
        out.push(idx);
    }
    Ok(out)
}

/// The (key type, value type) pairs `plan`'s layers read together.
fn read_pairs(plan: &KvPlan) -> Vec<(GgmlType, GgmlType)> {
    let mut pairs: Vec<(GgmlType, GgmlType)> = (0..plan.n_layers())
        .map(|l| {
            (
                plan.read_type(Half::Keys, l),
                plan.read_type(Half::Values, l),
            )
        })
        .collect();
    pairs.sort_by_key(|&(k, v)| (k as u32, v as u32));
    pairs.dedup();
    pairs
}

/// What a recorded forward pass binds, whatever the plan: the session's device,
/// kernels, weights (with where each layer's tensors are among them) and buffers.
struct ForwardParts {
    ctx: GpuContext,
    kernels: Kernels,
    /// Shared with sibling sessions (see `GpuSession::sibling`).
    weights: WeightSet,
    act: Activations,
    step: wgpu::Buffer,
    /// The K and V slots of the plan's owned halves.
    kv: GpuKv,
    /// Where each layer's tensors are in `weights` (`usize::MAX` for the
    /// projections of a half the layer shares: never uploaded).
    layer_idx: Vec<LayerWeights>,
    token_embd: usize,
    output_norm: usize,
    output: usize,
    max_splits: usize,
    max_binding: u64,
    n_embd_kv: usize,
    rounding: bool,
}

impl ForwardParts {
    /// Records `plan`'s forward pass over these parts.
    fn record(&self, model: &Model, plan: &KvPlan) -> Result<Forward, GpuError> {
        self.ctx.scoped("building the forward pass", || {
            build_forward(model, plan, self)
        })
    }

    /// RoPE in place on `t` (`[tokens][n_heads][head_dim]`) by the angles of the
    /// table in the `rope` activation.
    fn rope_op(&self, model: &Model, t: &wgpu::Buffer, n_heads: usize) -> Op {
        let c = &model.config;
        let neox = u32::from(c.arch.rope_neox());
        let p = uniform(
            &self.ctx,
            [n_heads as u32, c.head_dim as u32, neox, 0, 0, 0, 0, 0],
        );
        Op {
            grid: Grid::PerToken(((n_heads * c.head_dim / 2) as u32).div_ceil(64)),
            pipeline: self.kernels.rope.pipeline.clone(),
            group: bind(
                &self.ctx,
                &self.kernels.rope,
                &[(0, t), (1, &self.act.rope), (3, &p)],
            ),
        }
    }

    /// `kv_store`'s op writing the f32 rows of `src` into `slot` at rows `step`'s
    /// pos0 + `rows`' first elements, for `step`'s token count.
    fn store_op(
        &self,
        src: &wgpu::Buffer,
        slot: &Slot,
        (step, rows): (&wgpu::Buffer, &wgpu::Buffer),
        kv: usize,
    ) -> Op {
        let kernel = &self.kernels.kv_store[&slot.ty];
        let p = uniform(&self.ctx, [kv as u32, slot.row_bytes, 0, 0, 0, 0, 0, 0]);
        Op {
            grid: Grid::PerToken(store_groups(slot.ty, kv)),
            pipeline: kernel.pipeline.clone(),
            group: bind(
                &self.ctx,
                kernel,
                &[(0, src), (2, &slot.buf), (3, &p), (4, step), (7, rows)],
            ),
        }
    }

    /// Dequantizes `slot`'s rows `rows` into `out` as f32 from element `out_base`
    /// (dispatches in `pass`, in runs of at most 32768 rows, the dispatch limit's
    /// half).
    fn load_rows(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        slot: &Slot,
        rows: Range<usize>,
        out: &wgpu::Buffer,
        out_base: u32,
    ) {
        const RUN: usize = 32768;
        let kv = self.n_embd_kv;
        let kernel = &self.kernels.kv_load[&slot.ty];
        for start in rows.clone().step_by(RUN) {
            let n = RUN.min(rows.end - start);
            let step = uniform(&self.ctx, [n as u32, start as u32, 0, 0, 0, 0, 0, 0]);
            let base = out_base + ((start - rows.start) * kv) as u32;
            let p = uniform(&self.ctx, [kv as u32, slot.row_bytes, base, 0, 0, 0, 0, 0]);
            let group = bind(
                &self.ctx,
                kernel,
                &[(0, &slot.buf), (2, out), (3, &p), (4, &step)],
            );
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(((kv / 4) as u32).div_ceil(64), n as u32, 1);
        }
    }

    /// Moves cache rows `from` of every slot to start at row `to` (< from.start)
    /// and re-rotates the moved keys by `to - from.start` positions: the context
    /// shift. Rows go through f32 in runs of `n_batch` (the `k` activation holds
    /// one run): dequantized, keys rotated by the host's RoPE table for the delta,
    /// stored again. Runs go up from the lowest row, so no run overwrites a row a
    /// later one has yet to read; re-storing a dequantized q8_0 or q4_0 block
    /// gives back its bytes (its largest element fixes the same scale).
    fn shift_rows(
        &self,
        model: &Model,
        from: Range<usize>,
        to: usize,
        n_batch: usize,
        rope_factors: Option<&[f32]>,
    ) -> Result<(), GpuError> {
        let c = &model.config;
        let kv = c.n_embd_kv();
        let ctx = &self.ctx;
        let delta = to as i64 - from.start as i64;
        let one = rope_table(
            delta,
            1,
            c.head_dim,
            c.rope_freq_base,
            c.rope_freq_scale,
            rope_factors,
        );
        let table: Vec<f32> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * n_batch)
            .collect();
        let rope = self.rope_op(model, &self.act.k, c.n_head_kv);
        let per_token = |pass: &mut wgpu::ComputePass<'_>, op: &Op, n: usize| {
            let Grid::PerToken(x) = op.grid else {
                unreachable!("shift ops are per token")
            };
            pass.set_pipeline(&op.pipeline);
            pass.set_bind_group(0, &op.group, &[]);
            pass.dispatch_workgroups(x, n as u32, 1);
        };
        ctx.scoped("shifting the KV cache", || {
            ctx.queue
                .write_buffer(&self.act.rope, 0, bytemuck::cast_slice(&table));
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("context shift"),
                });
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for start in (0..from.len()).step_by(n_batch.max(1)) {
                    let n = n_batch.min(from.len() - start);
                    let row = from.start + start;
                    let dst = uniform(ctx, [n as u32, (to + start) as u32, 0, 0, 0, 0, 0, 0]);
                    for (half, slot) in self.kv.all() {
                        self.load_rows(&mut pass, slot, row..row + n, &self.act.k, 0);
                        if half == Half::Keys {
                            per_token(&mut pass, &rope, n);
                        }
                        let store =
                            self.store_op(&self.act.k, slot, (&dst, &self.act.counting), kv);
                        per_token(&mut pass, &store, n);
                    }
                }
            }
            ctx.queue.submit([encoder.finish()]);
            Ok(())
        })
    }
}

/// The recorded forward pass for one plan.
struct Forward {
    /// The embedding lookup, every layer's ops, then the output norm.
    layers: Vec<Op>,
    /// Where each layer's ops are in `layers`.
    layer_ops: Vec<LayerOps>,
    logits_all: Op,
    logits_last: Op,
    argmax: Op,
}

/// One layer's ops in `Forward::layers`: from `start`; its cache stores end
/// before `stored` (a refill runs `start..stored`).
struct LayerOps {
    start: usize,
    stored: usize,
}

/// Builds every op of `plan`'s forward pass; bind groups tie them to their buffers
/// until the plan changes. Every half a layer owns in `plan` must have its slot and
/// projections in `parts`.
fn build_forward(model: &Model, plan: &KvPlan, parts: &ForwardParts) -> Result<Forward, GpuError> {
    let ForwardParts {
        ctx,
        kernels,
        weights,
        layer_idx,
        act,
        step,
        kv: cache,
        ..
    } = parts;
    let weights = &weights.list;
    let (token_embd, output_norm, output) = (parts.token_embd, parts.output_norm, parts.output);
    let (max_splits, rounding) = (parts.max_splits, parts.rounding);
    let c = &model.config;
    let (e, kv, ff) = (c.n_embd, c.n_embd_kv(), c.n_ff);
    let n_vocab = c.n_vocab;
    // The slot each layer reads for `half`: its source's.
    let read = |half: Half, il: usize| -> Result<&Slot, GpuError> {
        let src = plan.source(half, il);
        cache.own(half, src).ok_or_else(|| {
            GpuError::BadInput(format!(
                "KV plan {plan}: layer {src} owns its {} slot, but this session has no such slot",
                half.letter()
            ))
        })
    };
    // `corr`: x is xq rounded in Q8_1 mode; add its block-sum corrections.
    let matmul = |wi: usize,
                  x: &wgpu::Buffer,
                  y: &wgpu::Buffer,
                  accumulate: bool,
                  last_only: bool,
                  corr: bool|
     -> Op {
        let w = &weights[wi];
        let kern = kernels.matmul_for(w.ty);
        let p = uniform(
            ctx,
            [
                w.cols,
                w.rows,
                w.row_bytes,
                accumulate as u32,
                last_only as u32,
                corr as u32,
                0,
                0,
            ],
        );
        let group = bind(
            ctx,
            &kern.matvec,
            &[
                (0, &w.buf),
                (1, x),
                (2, y),
                (3, &p),
                (4, step),
                (6, &act.corr),
            ],
        );
        Op {
            grid: Grid::Matmul {
                ty: w.ty,
                rows: w.rows,
                last_only,
            },
            pipeline: kern.matvec.pipeline.clone(),
            group,
        }
    };
    let norm = |wi: usize, x: &wgpu::Buffer, y: &wgpu::Buffer| -> Op {
        let p = uniform(ctx, [e as u32, c.rms_eps.to_bits(), 0, 0, 0, 0, 0, 0]);
        Op {
            grid: Grid::PerToken(1),
            pipeline: kernels.rms_norm.pipeline.clone(),
            group: bind(
                ctx,
                &kernels.rms_norm,
                &[(0, x), (1, &weights[wi].buf), (2, y), (3, &p)],
            ),
        }
    };
    let rope = |t: &wgpu::Buffer, n_heads: usize| parts.rope_op(model, t, n_heads);
    // qwen2's bias on a projection's output, in place ([tokens][n]).
    let add_bias = |t: &wgpu::Buffer, wi: usize, n: usize| -> Op {
        let p = uniform(ctx, [n as u32, 0, 0, 0, 0, 0, 0, 0]);
        Op {
            grid: Grid::PerToken((n as u32).div_ceil(64)),
            pipeline: kernels.add_bias.pipeline.clone(),
            group: bind(
                ctx,
                &kernels.add_bias,
                &[(0, t), (1, &weights[wi].buf), (3, &p)],
            ),
        }
    };
    // qwen3's RMS norm of each head, in place ([tokens][n_heads][head_dim]).
    let head_norm = |t: &wgpu::Buffer, wi: usize, n_heads: usize| -> Op {
        let p = uniform(
            ctx,
            [
                c.head_dim as u32,
                c.rms_eps.to_bits(),
                n_heads as u32,
                0,
                0,
                0,
                0,
                0,
            ],
        );
        Op {
            grid: Grid::PerToken(n_heads as u32),
            pipeline: kernels.head_norm.pipeline.clone(),
            group: bind(
                ctx,
                &kernels.head_norm,
                &[(0, t), (1, &weights[wi].buf), (3, &p)],
            ),
        }
    };
    // A projection's bias and per-head norm where the variant has them.
    let extras = |ops: &mut Vec<Op>,
                  lw: &LayerWeights,
                  [bias, norm]: [LayerRole; 2],
                  t: &wgpu::Buffer,
                  n_heads: usize| {
        if let Some(wi) = lw.get(bias) {
            ops.push(add_bias(t, wi, n_heads * c.head_dim));
        }
        if let Some(wi) = lw.get(norm) {
            ops.push(head_norm(t, wi, n_heads));
        }
    };
    let attn_p = |ks: &Slot, vs: &Slot| {
        uniform(
            ctx,
            [
                c.n_head as u32,
                c.n_head_kv as u32,
                c.head_dim as u32,
                SPLIT_LEN,
                (1.0 / (c.head_dim as f32).sqrt()).to_bits(),
                max_splits as u32,
                ks.row_bytes,
                vs.row_bytes,
            ],
        )
    };
    let swiglu_p = uniform(ctx, [ff as u32, 0, 0, 0, 0, 0, 0, 0]);

    let round_mode = |wi: usize| {
        if rounding {
            activation_mode(weights[wi].ty)
        } else {
            0
        }
    };
    // Before a matmul of `src` (tagged `tag`) through weight `wi`: a rounding
    // op into xq, unless xq already holds `src` rounded the same way (`held`;
    // ops that rewrite a source clear it). True when the matmul reads xq.
    let prep = |ops: &mut Vec<Op>,
                held: &mut Option<(&'static str, u32)>,
                tag: &'static str,
                src: &wgpu::Buffer,
                wi: usize|
     -> bool {
        let mode = round_mode(wi);
        if mode == 0 {
            return false;
        }
        if *held != Some((tag, mode)) {
            let k = weights[wi].cols;
            let p = uniform(ctx, [k, mode, 0, 0, 0, 0, 0, 0]);
            ops.push(Op {
                grid: Grid::PerToken(k.div_ceil(256)),
                pipeline: kernels.act_round.pipeline.clone(),
                group: bind(
                    ctx,
                    &kernels.act_round,
                    &[(0, src), (2, &act.xq), (3, &p), (5, &act.corr)],
                ),
            });
            *held = Some((tag, mode));
        }
        true
    };
    let feed = |ops: &mut Vec<Op>,
                held: &mut Option<(&'static str, u32)>,
                tag: &'static str,
                src: &wgpu::Buffer,
                wi: usize,
                y: &wgpu::Buffer,
                accumulate: bool| {
        let rounded = prep(ops, held, tag, src, wi);
        let input = if rounded { &act.xq } else { src };
        ops.push(matmul(
            wi,
            input,
            y,
            accumulate,
            false,
            rounded && round_mode(wi) == 4,
        ));
    };

    let mut ops = Vec::new();
    let mut layer_ops = Vec::with_capacity(layer_idx.len());
    let mut held: Option<(&'static str, u32)>;
    let emb = &weights[token_embd];
    let emb_p = uniform(ctx, [emb.cols, emb.rows, emb.row_bytes, 0, 0, 0, 0, 0]);
    let gr = &kernels.matmul_for(emb.ty).get_rows;
    ops.push(Op {
        grid: Grid::PerToken((e as u32 / 4).div_ceil(64)),
        pipeline: gr.pipeline.clone(),
        group: bind(
            ctx,
            gr,
            &[
                (0, &emb.buf),
                (2, &act.x),
                (3, &emb_p),
                (4, step),
                (5, &act.tokens),
            ],
        ),
    });
    for (il, lw) in layer_idx.iter().enumerate() {
        let (owns_k, owns_v) = (plan.owns(Half::Keys, il), plan.owns(Half::Values, il));
        let start = ops.len();
        ops.push(norm(lw[AttnNorm], &act.x, &act.xn));
        held = None;
        // Fitted adapters apply while the layer reads the source they fit.
        let adapted = |half: Half| {
            let role = model.weights.adapted_role(il, half, plan);
            lw.get(role).expect("the adapted role is placed")
        };
        feed(
            &mut ops,
            &mut held,
            "xn",
            &act.xn,
            adapted(Half::Keys),
            &act.q,
            false,
        );
        extras(&mut ops, lw, [AttnQBias, AttnQNorm], &act.q, c.n_head);
        if owns_k {
            feed(&mut ops, &mut held, "xn", &act.xn, lw[AttnK], &act.k, false);
            extras(&mut ops, lw, [AttnKBias, AttnKNorm], &act.k, c.n_head_kv);
        }
        if owns_v {
            feed(&mut ops, &mut held, "xn", &act.xn, lw[AttnV], &act.v, false);
            if let Some(wi) = lw.get(AttnVBias) {
                ops.push(add_bias(&act.v, wi, c.n_head_kv * c.head_dim));
            }
        }
        ops.push(rope(&act.q, c.n_head));
        if owns_k {
            ops.push(rope(&act.k, c.n_head_kv));
            ops.push(parts.store_op(&act.k, read(Half::Keys, il)?, (step, &act.rows), kv));
        }
        if owns_v {
            ops.push(parts.store_op(&act.v, read(Half::Values, il)?, (step, &act.rows), kv));
        }
        layer_ops.push(LayerOps {
            start,
            stored: ops.len(),
        });
        // A layer sharing a half binds its source's slot (read-only there): the
        // same buffer the source wrote this pass.
        let (ks, vs) = (read(Half::Keys, il)?, read(Half::Values, il)?);
        let attn = kernels.attention_for(ks.ty, vs.ty).clone();
        let group = bind(
            ctx,
            &attn.tiled,
            &[
                (0, &act.q),
                (1, &ks.buf),
                (2, &vs.buf),
                (3, &attn_p(ks, vs)),
                (4, step),
                (5, &act.attn),
                (6, &act.part),
                (7, &act.rows),
            ],
        );
        ops.push(Op {
            pipeline: attn.tiled.pipeline.clone(),
            grid: Grid::Attention {
                n_head: c.n_head as u32,
                n_head_kv: c.n_head_kv as u32,
                kernels: attn,
            },
            group,
        });
        // x += Wo · attn (the residual add is fused into the matmul).
        feed(
            &mut ops,
            &mut held,
            "attn",
            &act.attn,
            adapted(Half::Values),
            &act.x,
            true,
        );
        ops.push(norm(lw[FfnNorm], &act.x, &act.xn));
        held = None;
        feed(
            &mut ops,
            &mut held,
            "xn",
            &act.xn,
            lw[FfnGate],
            &act.gate,
            false,
        );
        feed(
            &mut ops, &mut held, "xn", &act.xn, lw[FfnUp], &act.up, false,
        );
        ops.push(Op {
            grid: Grid::PerToken((ff as u32).div_ceil(64)),
            pipeline: kernels.swiglu.pipeline.clone(),
            group: bind(
                ctx,
                &kernels.swiglu,
                &[(0, &act.gate), (1, &act.up), (3, &swiglu_p)],
            ),
        });
        feed(
            &mut ops,
            &mut held,
            "gate",
            &act.gate,
            lw[FfnDown],
            &act.x,
            true,
        );
    }
    ops.push(norm(output_norm, &act.x, &act.xn));
    held = None;
    // The logits matmul comes in two forms (every row, last row), both
    // reading the final norm, rounded by the body's last op if need be.
    let rounded = prep(&mut ops, &mut held, "xn", &act.xn, output);
    let out_src = if rounded { &act.xq } else { &act.xn };
    let corr = rounded && round_mode(output) == 4;
    let logits_all = matmul(output, out_src, &act.logits, false, false, corr);
    let logits_last = matmul(output, out_src, &act.logits, false, true, corr);
    let argmax_p = uniform(ctx, [n_vocab as u32, 0, 0, 0, 0, 0, 0, 0]);
    let argmax = Op {
        grid: Grid::Single,
        pipeline: kernels.argmax.pipeline.clone(),
        group: bind(
            ctx,
            &kernels.argmax,
            &[(0, &act.logits), (2, &act.argmax), (3, &argmax_p)],
        ),
    };
    Ok(Forward {
        layers: ops,
        layer_ops,
        logits_all,
        logits_last,
        argmax,
    })
}

fn le_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl<'m> RunState<'m> for GpuSession<'m> {
    fn model(&self) -> &'m Model {
        self.model
    }

    fn plan(&self) -> &KvPlan {
        &self.plan
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn describe(&self) -> String {
        format!("wgpu on {}", self.adapter_description())
    }

    fn on_gpu(&self) -> bool {
        true
    }

    fn n_past(&self) -> usize {
        self.past[0]
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn window(&self) -> Option<KvWindow> {
        self.window
    }

    fn reset(&mut self) {
        self.past.fill(0);
    }

    /// Later cells are never read.
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

    /// A single entry runs in passes of the batch size; several run as one pass
    /// in which every token attends over its own sequence's cells (its `ROWS`).
    fn forward_seqs(&mut self, batch: &[(usize, &[u32])]) -> Result<Vec<f32>, RuntimeError> {
        if self.window.is_some() {
            // Windows evict through `forward` (one sequence only, by capability).
            return match batch {
                [(0, tokens)] => self.eval(tokens, Logits::Last),
                _ => Err(CAPABILITIES.lacks(Capability::WindowedSequences)),
            };
        }
        let n_vocab = self.model.config.n_vocab;
        chunks::check_seqs(batch, &self.past, self.n_ctx, n_vocab)?;
        if let [(seq, tokens)] = *batch {
            let mut logits = Vec::new();
            for (chunk, want) in chunks::plan(tokens, self.n_batch, Logits::Last) {
                let rows = self.seq_rows(seq, chunk.len());
                logits = floats(&self.pass(&Pass::new(chunk, &rows, want))?.logits);
                self.past[seq] += chunk.len();
            }
            return Ok(logits);
        }
        let total: usize = batch.iter().map(|(_, t)| t.len()).sum();
        if total > self.n_batch {
            return Err(RuntimeError::InvalidRequest(format!(
                "a step of several sequences takes at most the batch size ({}) in tokens, got {total}",
                self.n_batch
            )));
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let rows: Vec<[u32; 2]> = batch
            .iter()
            .flat_map(|&(seq, t)| self.seq_rows(seq, t.len()))
            .collect();
        // Every row's logits come back; each entry keeps its last token's.
        let all = floats(&self.pass(&Pass::new(&tokens, &rows, Logits::All))?.logits);
        let mut logits = Vec::with_capacity(batch.len() * n_vocab);
        let mut end = 0;
        for &(seq, t) in batch {
            end += t.len();
            logits.extend_from_slice(&all[(end - 1) * n_vocab..end * n_vocab]);
            self.past[seq] += t.len();
        }
        Ok(logits)
    }

    /// Texts run in passes of whole texts, one after another in the cache (text
    /// `i` at cells `i * seq_len ..`, attending only to itself: its `ROWS` start
    /// there). With a start, each pass first stores the refilled layers' slots
    /// from their inputs, then runs from the start layer.
    fn forward_packed(
        &mut self,
        batch: PackedBatch<'_>,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        let c = &self.model.config;
        let (e, n_vocab) = (c.n_embd, c.n_vocab);
        batch.check(c.n_layers, e)?;
        let PackedBatch {
            tokens,
            seq_len,
            start,
            refill,
        } = batch;
        if self.window.is_some() {
            return Err(RuntimeError::InvalidRequest(
                "packed texts run without a KV window".into(),
            ));
        }
        if seq_len > self.n_batch {
            return Err(RuntimeError::InvalidRequest(format!(
                "a packed text of {seq_len} tokens does not fit one pass of {} tokens",
                self.n_batch
            )));
        }
        chunks::check_tokens(tokens, 0, self.n_ctx, n_vocab)?;
        self.past[0] = 0;
        let per = (self.n_batch / seq_len) * seq_len;
        let passes = chunks::plan(tokens, per, req.logits);
        let mut out = ForwardOutput::default();
        let mut row0 = 0;
        for (chunk, want) in passes {
            let n = chunk.len();
            let rows: Vec<[u32; 2]> = (row0..row0 + n)
                .map(|r| [r as u32, (r - r % seq_len) as u32])
                .collect();
            let span = row0 * e..(row0 + n) * e;
            let got = self.pass(&Pass {
                hidden: req.hidden,
                layer_inputs: req.layer_inputs,
                start: start.map(|(layer, x)| (layer, &x[span.clone()])),
                refill: match start {
                    Some(_) => refill.iter().map(|&(l, x)| (l, &x[span.clone()])).collect(),
                    None => Vec::new(),
                },
                ..Pass::new(chunk, &rows, want)
            })?;
            row0 += n;
            self.past[0] = row0;
            let logits = floats(&got.logits);
            out.append(ForwardOutput {
                logit_rows: logits.len() / n_vocab.max(1),
                logits,
                hidden: req.hidden.then(|| floats(&got.hidden)),
                layer_inputs: got.layer_inputs,
            });
        }
        Ok(out)
    }

    /// Logits and final hidden states; the WGSL pass keeps no per-layer inputs.
    /// With a window, old tokens are evicted as `chunks::windowed` says.
    fn forward(
        &mut self,
        tokens: &[u32],
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        let Some(w) = self.window else {
            return self.forward_unwindowed(tokens, req);
        };
        let (out, evicted) = chunks::windowed(self, w, self.n_batch, tokens, req, |s, b, r| {
            s.forward_unwindowed(b, r)
        })?;
        self.evicted += evicted;
        Ok(out)
    }

    /// On every slot, so layers sharing a half keep following their sources.
    fn context_shift(&mut self, n_keep: usize, n_discard: usize) -> Result<(), RuntimeError> {
        let n_past = self.past[0];
        let n_keep = n_keep.min(n_past);
        let n_discard = n_discard.min(n_past - n_keep);
        if n_discard == 0 {
            return Ok(());
        }
        self.parts.shift_rows(
            self.model,
            n_keep + n_discard..n_past,
            n_keep,
            self.n_batch,
            self.rope_factors.as_deref(),
        )?;
        self.past[0] -= n_discard;
        Ok(())
    }

    fn kv_bytes(&self) -> usize {
        self.parts.kv.bytes()
    }

    /// As the CPU counts them (`KvPlan`'s row sizes).
    fn kv_bytes_per_token(&self) -> (usize, usize) {
        let n = self.model.config.n_embd_kv();
        (
            self.parts.kv.bytes_per_token(),
            self.plan.unshared_bytes_per_token(n),
        )
    }

    fn read_kv(
        &self,
        layer: usize,
        rows: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        Ok(self.read_kv_rows(layer, rows)?)
    }

    fn set_plan(&mut self, plan: &KvPlan) -> Result<(), RuntimeError> {
        CAPABILITIES.check_plan(plan)?;
        Ok(self.apply_plan(plan)?)
    }

    fn sibling(
        &self,
        map: &ShareMap,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError> {
        self.sibling_plan(&KvPlan::uniform(map, opts.type_k, opts.type_v), opts)
    }

    fn sibling_plan(
        &self,
        plan: &KvPlan,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError> {
        CAPABILITIES.check(opts)?;
        CAPABILITIES.check_plan(plan)?;
        let policy = if self.is_software() {
            AdapterPolicy::Any
        } else {
            AdapterPolicy::HardwareOnly
        };
        Ok(Box::new(self.sibling_plan_with(
            plan,
            &GpuOptions::from_run(opts, policy),
        )?))
    }
}
