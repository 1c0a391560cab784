//! GPU run state: weights uploaded once in their GGUF formats, a KV slot pair per
//! owning layer of the sharing map, activation buffers for one batch, and the
//! whole forward pass recorded as a list of (pipeline, bind group) ops built once.
//! Each pass writes the `Step` uniform and the token ids, then records every op
//! into one command encoder.

use std::collections::HashMap;
#[cfg(feature = "test-support")]
use std::collections::HashSet;
use std::sync::Arc;

use super::device::{AdapterPolicy, GpuContext};
use super::kernels::{
    activation_mode, bind, matvec_grid, read_back, rope_table, staging, storage, storage_with,
    tiled_grid, uniform, Kernels, MAX_HEAD_DIM, SPLIT_LEN,
};
use super::{GpuError, GPU_WEIGHT_TYPES};
use crate::gguf::GgmlType;
use crate::kvplan::{Half, KvPlan, ShareMap};
use crate::model::LayerRole::{
    AttnK, AttnKBias, AttnKNorm, AttnNorm, AttnOutput, AttnQ, AttnQBias, AttnQNorm, AttnV,
    AttnVBias, FfnDown, FfnGate, FfnNorm, FfnUp,
};
use crate::model::{LayerRole, LayerWeights, Model};
use crate::runtime::chunks;
use crate::runtime::error::{Capability, RuntimeError};
use crate::runtime::options::{Capabilities, RunOptions};
use crate::runtime::request::{ForwardOutput, ForwardRequest, Logits};
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
}

impl GpuOptions {
    /// The GPU options for what a caller asks of any run state.
    pub fn from_run(opts: &RunOptions, policy: AdapterPolicy) -> Self {
        GpuOptions {
            n_ctx: opts.n_ctx,
            n_batch: opts.n_batch,
            policy,
            ..Default::default()
        }
    }
}

/// What the WGSL forward pass can do: a plain f16 cache, no window, no context
/// shift, one text per pass.
pub const CAPABILITIES: Capabilities = Capabilities {
    backend: "wgpu",
    cache_types: &[GgmlType::F16],
    mixed_plans: false,
    window: false,
    context_shift: false,
    packed: false,
    sequences: false,
};

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            n_ctx: 4096,
            n_batch: 256,
            policy: AdapterPolicy::Any,
            ggml_activation_rounding: false,
        }
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
    /// Prefill attention, or split-K decode attention then its combine.
    Attention { n_head: u32 },
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
    /// Split-K attention partials: per head, per split, (max, sum, head_dim outputs).
    part: wgpu::Buffer,
}

pub struct GpuSession<'m> {
    model: &'m Model,
    /// Everything a recorded forward pass binds; lives as long as the session.
    parts: ForwardParts,
    /// Always one whole-layer map with f16 slots (`CAPABILITIES`).
    plan: KvPlan,
    /// The plan's recorded forward pass.
    forward: Forward,
    staging: wgpu::Buffer,
    /// Read-back buffer for one batch of final hidden states.
    hidden_staging: wgpu::Buffer,
    n_past: usize,
    n_ctx: usize,
    n_batch: usize,
    kv_bytes: usize,
    rope_factors: Option<Vec<f32>>,
}

impl<'m> GpuSession<'m> {
    pub fn new(model: &'m Model, map: &ShareMap, opts: &GpuOptions) -> Result<Self, GpuError> {
        check_request(model, map, opts)?;
        let ctx = GpuContext::new(opts.policy)?;
        Self::build(model, map, opts, ctx, WeightSet::default(), None)
    }

    /// A session for `RunOptions` on an adapter `policy` accepts; options beyond
    /// `CAPABILITIES` are refused before any adapter is opened.
    pub fn open(
        model: &'m Model,
        map: &ShareMap,
        opts: &RunOptions,
        policy: AdapterPolicy,
    ) -> Result<Self, RuntimeError> {
        CAPABILITIES.check(opts)?;
        Ok(Self::new(model, map, &GpuOptions::from_run(opts, policy))?)
    }

    /// `open` for a `KvPlan`: refused by capability unless it is one whole-layer
    /// map with f16 slots.
    pub fn open_plan(
        model: &'m Model,
        plan: &KvPlan,
        opts: &RunOptions,
        policy: AdapterPolicy,
    ) -> Result<Self, RuntimeError> {
        CAPABILITIES.check_plan(plan)?;
        let (Some(map), Some((type_k, type_v))) = (plan.as_map(), plan.uniform_types()) else {
            return Err(CAPABILITIES.lacks(Capability::MixedPlan));
        };
        let opts = RunOptions {
            type_k,
            type_v,
            ..opts.clone()
        };
        Self::open(model, map, &opts, policy)
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
        check_request(self.model, map, opts)?;
        if opts.policy == AdapterPolicy::HardwareOnly && self.parts.ctx.is_software() {
            return Err(GpuError::SoftwareOnly(self.parts.ctx.adapter_description()));
        }
        Self::build(
            self.model,
            map,
            opts,
            self.parts.ctx.clone(),
            self.parts.weights.clone(),
            Some(self.parts.kernels.clone()),
        )
    }

    /// Uploads what `weights` lacks of `map`'s forward pass, compiles the kernels
    /// (or those missing from `kernels`), allocates the run state and records the
    /// forward pass.
    fn build(
        model: &'m Model,
        map: &ShareMap,
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
        let adapter = ctx.adapter_description();
        let need = |limit: &'static str, needed: u64, available: u64, what: String| {
            if needed > available {
                Err(GpuError::Limit {
                    adapter: adapter.clone(),
                    limit,
                    needed,
                    available,
                    what,
                })
            } else {
                Ok(())
            }
        };

        // Weights: every tensor of the model's plan the forward reads, as the file
        // stores it (the plan checked names, shapes and types; here only what the
        // wgpu kernels add).
        let plan = &model.weights;
        let mut upload = |id: usize| -> Result<usize, GpuError> {
            if let Some(&i) = weights.by_plan.get(&id) {
                return Ok(i);
            }
            let info = plan.tensor(id);
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
            need(
                "max_storage_buffer_binding_size",
                bytes.len() as u64 + 8,
                max_binding,
                format!("tensor {name}"),
            )?;
            let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
            weights.list.push(Arc::new(GpuWeight {
                buf: storage_with(&ctx, name, bytes),
                ty,
                cols: cols as u32,
                rows: rows as u32,
                row_bytes: row_bytes as u32,
            }));
            let i = weights.list.len() - 1;
            weights.by_plan.insert(id, i);
            Ok(i)
        };
        let (token_embd, output_norm, output, layer_idx) =
            ctx.scoped("uploading weights", || {
                let token_embd = upload(plan.token_embd())?;
                let output_norm = upload(plan.output_norm())?;
                // Tied embeddings: the plan's output is the embedding, uploaded once.
                let output = upload(plan.output())?;
                if let Some(id) = plan.rope_freqs() {
                    upload(id)?;
                }
                let mut layer_idx = Vec::with_capacity(c.n_layers);
                for (il, lw) in plan.layers().iter().enumerate() {
                    let owns = map.owns_slot(il);
                    // A shared layer never computes keys or values: its K/V
                    // projections (and their biases, the key norm) are not even
                    // uploaded.
                    let mut placed = |role: LayerRole, id: usize| {
                        if owns || !role.is_kv_projection() {
                            upload(id)
                        } else {
                            Ok(usize::MAX)
                        }
                    };
                    let mut idx = LayerWeights::try_from_fn(|role| placed(role, lw[role]))?;
                    for role in LayerRole::OPTIONAL {
                        if let Some(id) = lw.get(role) {
                            idx.set_optional(role, placed(role, id)?);
                        }
                    }
                    layer_idx.push(idx);
                }
                Ok((token_embd, output_norm, output, layer_idx))
            })?;
        let types: Vec<GgmlType> = weights.list.iter().map(|w| w.ty).collect();
        let kernels = match kernels {
            Some(mut shared) => {
                shared.add_types(&ctx, &types)?;
                shared
            }
            None => Kernels::new(&ctx, &types)?,
        };

        // Batch: the logits of a whole batch must fit one binding.
        let n_vocab = c.n_vocab;
        let max_rows_by_logits = (max_binding / (n_vocab as u64 * 4)).max(1) as usize;
        let n_batch = opts.n_batch.clamp(1, max_rows_by_logits).min(opts.n_ctx);
        let (e, q_dim, kv, ff) = (c.n_embd, c.n_head * c.head_dim, c.n_embd_kv(), c.n_ff);
        let slot_bytes = (opts.n_ctx * kv * 2) as u64;
        need(
            "max_storage_buffer_binding_size",
            slot_bytes,
            max_binding,
            format!("a KV cache slot of {} cells", opts.n_ctx),
        )?;
        let max_splits = opts.n_ctx.div_ceil(SPLIT_LEN as usize);

        let setup = ctx.scoped("allocating GPU buffers", || {
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
                part: f32s(
                    "attention partials",
                    c.n_head * max_splits * (c.head_dim + 2),
                ),
            };
            let slots: Vec<(wgpu::Buffer, wgpu::Buffer)> = (0..c.n_layers)
                .filter(|&l| map.owns_slot(l))
                .map(|l| {
                    (
                        storage(&ctx, &format!("cache_k_l{l}"), slot_bytes),
                        storage(&ctx, &format!("cache_v_l{l}"), slot_bytes),
                    )
                })
                .collect();
            Ok((act, slots))
        })?;
        let (act, slots) = setup;
        let step = uniform(&ctx, [0; 8]);
        let staging_buf = staging(&ctx, (n_batch * n_vocab * 4) as u64);
        let hidden_staging = staging(&ctx, (n_batch * e * 4) as u64);

        // The frequency factors enter the host-side RoPE table (see rope.wgsl).
        let rope_factors: Option<Vec<f32>> = plan.rope_freqs().map(|id| {
            model
                .weight_bytes(id)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        });

        let own_slot: Vec<Option<usize>> = {
            let slot_of = map.slot_of_layers();
            (0..c.n_layers)
                .map(|l| map.owns_slot(l).then(|| slot_of[l]))
                .collect()
        };
        let kv_bytes = 2 * slots.len() * slot_bytes as usize;
        let parts = ForwardParts {
            ctx,
            kernels,
            weights,
            act,
            step,
            slots,
            layer_idx,
            own_slot,
            token_embd,
            output_norm,
            output,
            max_splits,
            rounding: opts.ggml_activation_rounding,
        };
        let forward = parts.record(model, map)?;
        Ok(GpuSession {
            model,
            parts,
            plan: KvPlan::uniform(map, GgmlType::F16, GgmlType::F16),
            forward,
            staging: staging_buf,
            hidden_staging,
            n_past: 0,
            n_ctx: opts.n_ctx,
            n_batch,
            kv_bytes,
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

    /// KV slots allocated: one per owning layer.
    pub fn n_slots(&self) -> usize {
        self.parts.slots.len()
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

    /// Records the forward pass of another sharing map over the same weights and
    /// slots, and empties the context (the cells' meaning changes with the map).
    /// Every layer that owns its cache in `map` must have owned it in the map the
    /// session was built with (its slot and K/V weights exist only then): a session
    /// built with the identity map takes any map. Used by the sharing search, which
    /// measures many maps; KV memory stays what the first map allocated.
    fn record_map(&mut self, map: &ShareMap) -> Result<(), GpuError> {
        if map.n_layers() != self.model.config.n_layers {
            return Err(GpuError::MapMismatch {
                map: map.n_layers(),
                model: self.model.config.n_layers,
            });
        }
        self.forward = self.parts.record(self.model, map)?;
        self.plan = KvPlan::uniform(map, GgmlType::F16, GgmlType::F16);
        self.n_past = 0;
        Ok(())
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

    /// Runs `tokens` in batches, reading back the logits asked for and, with
    /// `hidden`, every token's final hidden state.
    fn eval_reading(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        hidden: bool,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        self.check(tokens)?;
        let (n_vocab, n_embd) = (self.model.config.n_vocab, self.model.config.n_embd);
        let mut out = Vec::new();
        let mut states = Vec::new();
        for (chunk, want) in chunks::plan(tokens, self.n_batch, logits) {
            let rows = want.rows(chunk.len());
            let bytes = self.pass(chunk, want, false, (rows * n_vocab * 4) as u64)?;
            out.extend(bytes.chunks_exact(4).map(le_f32));
            if !hidden {
                continue;
            }
            // The body's last op leaves the output norm's result in `xn`.
            let ctx = &self.parts.ctx;
            let encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("hidden read-back"),
                });
            let h = ctx.scoped("reading the hidden states back", || {
                read_back(
                    ctx,
                    encoder,
                    &self.parts.act.xn,
                    (chunk.len() * n_embd * 4) as u64,
                    &self.hidden_staging,
                )
            })?;
            states.extend(h.chunks_exact(4).map(le_f32));
        }
        Ok((out, states))
    }

    /// The keys (post-RoPE) and values that `layer` attends over, at cache cells
    /// `0..rows`, as f32 `[rows][n_embd_kv]` each (the cache holds f16).
    fn read_kv_rows(&self, layer: usize, rows: usize) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        let n_layers = self.model.config.n_layers;
        if layer >= n_layers {
            return Err(GpuError::BadInput(format!(
                "layer {layer} does not exist (the model has {n_layers})"
            )));
        }
        if rows > self.n_past {
            return Err(GpuError::BadInput(format!(
                "{rows} cache cells asked for, but only {} are filled",
                self.n_past
            )));
        }
        let slot = self
            .parts
            .own_slot
            .get(self.plan.sources(Half::Keys).source(layer))
            .copied()
            .flatten()
            .ok_or_else(|| {
                GpuError::BadInput(format!("layer {layer} has no KV slot in this session"))
            })?;
        let bytes = (rows * self.model.config.n_embd_kv() * 2) as u64;
        let ctx = &self.parts.ctx;
        let staging_buf = staging(ctx, bytes);
        let (kc, vc) = &self.parts.slots[slot];
        let read = |buf: &wgpu::Buffer| -> Result<Vec<f32>, GpuError> {
            if bytes == 0 {
                return Ok(Vec::new());
            }
            let encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("kv read-back"),
                });
            let raw = ctx.scoped("reading a KV slot back", || {
                read_back(ctx, encoder, buf, bytes, &staging_buf)
            })?;
            Ok(raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect())
        };
        let k = read(kc)?;
        let v = read(vc)?;
        Ok((k, v))
    }

    #[cfg(feature = "test-support")]
    /// Appends `tokens` and returns the id of the last token's largest logit,
    /// computed on the GPU (greedy decoding reads back 4 bytes, not the vocabulary).
    pub fn eval_argmax(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        self.check(tokens)?;
        let mut id = 0;
        for (chunk, want) in chunks::plan(tokens, self.n_batch, Logits::Last) {
            let last = want == Logits::Last;
            let bytes = self.pass(chunk, want, last, if last { 4 } else { 0 })?;
            if last {
                id = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
        Ok(id)
    }

    fn check(&self, tokens: &[u32]) -> Result<(), RuntimeError> {
        chunks::check_tokens(tokens, self.n_past, self.n_ctx, self.model.config.n_vocab)
    }

    /// One forward pass of at most n_batch tokens at position n_past: one command
    /// encoder, one compute pass, then `read` bytes of logits (or of the argmax)
    /// copied back.
    fn pass(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        argmax: bool,
        read: u64,
    ) -> Result<Vec<u8>, GpuError> {
        let n = tokens.len() as u32;
        let pos0 = self.n_past as u32;
        let ctx = &self.parts.ctx;
        let out = ctx.scoped("a forward pass", || {
            ctx.queue.write_buffer(
                &self.parts.step,
                0,
                bytemuck::cast_slice(&[n, pos0, 0u32, 0u32]),
            );
            ctx.queue
                .write_buffer(&self.parts.act.tokens, 0, bytemuck::cast_slice(tokens));
            let c = &self.model.config;
            let table = rope_table(
                pos0 as usize,
                tokens.len(),
                c.head_dim,
                c.rope_freq_base,
                c.rope_freq_scale,
                self.rope_factors.as_deref(),
            );
            ctx.queue
                .write_buffer(&self.parts.act.rope, 0, bytemuck::cast_slice(&table));
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("forward"),
                });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("forward"),
                    timestamp_writes: None,
                });
                let tail: Vec<&Op> = match logits {
                    Logits::All => vec![&self.forward.logits_all],
                    Logits::Last if argmax => vec![&self.forward.logits_last, &self.forward.argmax],
                    Logits::Last => vec![&self.forward.logits_last],
                    Logits::None => vec![],
                };
                for op in self.forward.layers.iter().chain(tail) {
                    self.record(&mut pass, op, n);
                }
            }
            if read == 0 {
                ctx.queue.submit([encoder.finish()]);
                return Ok(Vec::new());
            }
            let src = if argmax {
                &self.parts.act.argmax
            } else {
                &self.parts.act.logits
            };
            read_back(ctx, encoder, src, read, &self.staging)
        })?;
        self.n_past += tokens.len();
        Ok(out)
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>, op: &Op, n: u32) {
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
            Grid::Attention { n_head } => {
                pass.set_bind_group(0, &op.group, &[]);
                // With ggml rounding, follow the path ggml's CPU flash attention takes
                // for this pass (it splits keys across threads once the padded cache
                // view reaches 512 cells, and goes tiled f32 from 64 queries).
                let padded = (self.n_past + 1).next_multiple_of(256).min(self.n_ctx);
                if n == 1 && (!self.parts.rounding || padded >= 512) {
                    let n_splits = (self.n_past as u32 + 1).div_ceil(SPLIT_LEN);
                    pass.set_pipeline(&self.parts.kernels.attn_split.pipeline);
                    pass.dispatch_workgroups(n_head, n_splits, 1);
                    pass.set_pipeline(&self.parts.kernels.attn_combine.pipeline);
                    pass.dispatch_workgroups(n_head, 1, 1);
                } else if self.parts.rounding && n < 64 {
                    pass.set_pipeline(&self.parts.kernels.attn_f16_serial.pipeline);
                    pass.dispatch_workgroups(n_head, n, 1);
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

/// The checks `new` and `sibling` make before touching the device.
fn check_request(model: &Model, map: &ShareMap, opts: &GpuOptions) -> Result<(), GpuError> {
    let c = &model.config;
    if map.n_layers() != c.n_layers {
        return Err(GpuError::MapMismatch {
            map: map.n_layers(),
            model: c.n_layers,
        });
    }
    if opts.n_ctx == 0 {
        return Err(GpuError::BadInput("context size must be at least 1".into()));
    }
    if c.head_dim > MAX_HEAD_DIM {
        return Err(GpuError::BadInput(format!(
            "head dimension {} is above the {MAX_HEAD_DIM} the attention kernels handle",
            c.head_dim
        )));
    }
    Ok(())
}

/// What a recorded forward pass binds, whatever the map: the session's device,
/// kernels, weights (with where each layer's tensors are among them) and buffers.
struct ForwardParts {
    ctx: GpuContext,
    kernels: Kernels,
    /// Shared with sibling sessions (see `GpuSession::sibling`).
    weights: WeightSet,
    act: Activations,
    step: wgpu::Buffer,
    /// (K, V) of each owning layer, in layer order.
    slots: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    /// Where each layer's tensors are in `weights` (`usize::MAX` for the K/V
    /// projections of a layer built as shared: never uploaded).
    layer_idx: Vec<LayerWeights>,
    /// Slot index of every layer's own slot (`None`: the session has no slot and no
    /// K/V weights for it).
    own_slot: Vec<Option<usize>>,
    token_embd: usize,
    output_norm: usize,
    output: usize,
    max_splits: usize,
    rounding: bool,
}

impl ForwardParts {
    /// Records `map`'s forward pass over these parts.
    fn record(&self, model: &Model, map: &ShareMap) -> Result<Forward, GpuError> {
        self.ctx.scoped("building the forward pass", || {
            build_forward(model, map, self)
        })
    }
}

/// The recorded forward pass for one sharing map.
struct Forward {
    layers: Vec<Op>,
    logits_all: Op,
    logits_last: Op,
    argmax: Op,
}

/// Builds every op of `map`'s forward pass; bind groups tie them to their buffers
/// until the map changes. Every layer that owns its cache in `map` must have a slot
/// and K/V weights in `parts`.
fn build_forward(model: &Model, map: &ShareMap, parts: &ForwardParts) -> Result<Forward, GpuError> {
    let ForwardParts {
        ctx,
        kernels,
        weights,
        layer_idx,
        act,
        step,
        slots,
        own_slot,
        ..
    } = parts;
    let weights = &weights.list;
    let (token_embd, output_norm, output) = (parts.token_embd, parts.output_norm, parts.output);
    let (max_splits, rounding) = (parts.max_splits, parts.rounding);
    let c = &model.config;
    let (e, kv, ff) = (c.n_embd, c.n_embd_kv(), c.n_ff);
    let n_vocab = c.n_vocab;
    let mut slot_of = Vec::with_capacity(c.n_layers);
    for il in 0..c.n_layers {
        let src = map.source(il);
        match own_slot.get(src).copied().flatten() {
            Some(s) => slot_of.push(s),
            None => {
                return Err(GpuError::BadInput(format!(
                    "sharing map {map}: layer {src} owns its cache, but this session was built without a KV slot and K/V weights for it"
                )))
            }
        }
    }
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
    let rope = |t: &wgpu::Buffer, n_heads: usize| -> Op {
        let neox = u32::from(c.arch.rope_neox());
        let p = uniform(
            ctx,
            [n_heads as u32, c.head_dim as u32, neox, 0, 0, 0, 0, 0],
        );
        Op {
            grid: Grid::PerToken(((n_heads * c.head_dim / 2) as u32).div_ceil(64)),
            pipeline: kernels.rope.pipeline.clone(),
            group: bind(ctx, &kernels.rope, &[(0, t), (1, &act.rope), (3, &p)]),
        }
    };
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
    let attn_p = uniform(
        ctx,
        [
            c.n_head as u32,
            c.n_head_kv as u32,
            c.head_dim as u32,
            SPLIT_LEN,
            (1.0 / (c.head_dim as f32).sqrt()).to_bits(),
            max_splits as u32,
            0,
            0,
        ],
    );
    let store_p = uniform(ctx, [kv as u32, 0, 0, 0, 0, 0, 0, 0]);
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
        let (kc, vc) = &slots[slot_of[il]];
        ops.push(norm(lw[AttnNorm], &act.x, &act.xn));
        held = None;
        feed(&mut ops, &mut held, "xn", &act.xn, lw[AttnQ], &act.q, false);
        extras(&mut ops, lw, [AttnQBias, AttnQNorm], &act.q, c.n_head);
        if map.owns_slot(il) {
            feed(&mut ops, &mut held, "xn", &act.xn, lw[AttnK], &act.k, false);
            feed(&mut ops, &mut held, "xn", &act.xn, lw[AttnV], &act.v, false);
            extras(&mut ops, lw, [AttnKBias, AttnKNorm], &act.k, c.n_head_kv);
            if let Some(wi) = lw.get(AttnVBias) {
                ops.push(add_bias(&act.v, wi, c.n_head_kv * c.head_dim));
            }
        }
        ops.push(rope(&act.q, c.n_head));
        if map.owns_slot(il) {
            ops.push(rope(&act.k, c.n_head_kv));
            ops.push(Op {
                grid: Grid::PerToken(((kv / 2) as u32).div_ceil(64)),
                pipeline: kernels.kv_store.pipeline.clone(),
                group: bind(
                    ctx,
                    &kernels.kv_store,
                    &[
                        (0, &act.k),
                        (1, &act.v),
                        (2, kc),
                        (3, &store_p),
                        (4, step),
                        (5, vc),
                    ],
                ),
            });
        }
        // A shared layer's attention binds its source's slot (read-only
        // there): the same buffers the source wrote this pass.
        ops.push(Op {
            grid: Grid::Attention {
                n_head: c.n_head as u32,
            },
            pipeline: kernels.attn_tiled.pipeline.clone(),
            group: bind(
                ctx,
                &kernels.attn_tiled,
                &[
                    (0, &act.q),
                    (1, kc),
                    (2, vc),
                    (3, &attn_p),
                    (4, step),
                    (5, &act.attn),
                    (6, &act.part),
                ],
            ),
        });
        // x += Wo · attn (the residual add is fused into the matmul).
        feed(
            &mut ops,
            &mut held,
            "attn",
            &act.attn,
            lw[AttnOutput],
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
        self.n_past
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Later cells are never read.
    fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }

    /// Logits and final hidden states; the WGSL pass keeps no per-layer inputs.
    fn forward(
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

    fn kv_bytes(&self) -> usize {
        self.kv_bytes
    }

    /// The f16 slots of the owning layers (`KvPlan::bytes_per_token`, as the CPU
    /// counts them).
    fn kv_bytes_per_token(&self) -> (usize, usize) {
        let n = self.model.config.n_embd_kv();
        (
            self.plan.bytes_per_token(n),
            self.plan.f16_bytes_per_token(n),
        )
    }

    fn read_kv(
        &self,
        layer: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        let width = self.model.config.n_embd_kv();
        let (mut k, mut v) = self.read_kv_rows(layer, rows.end)?;
        let skip = rows.start.min(rows.end) * width;
        k.drain(..skip);
        v.drain(..skip);
        Ok((k, v))
    }

    fn set_plan(&mut self, plan: &KvPlan) -> Result<(), RuntimeError> {
        CAPABILITIES.check_plan(plan)?;
        let Some(map) = plan.as_map() else {
            return Err(CAPABILITIES.lacks(Capability::MixedPlan));
        };
        Ok(self.record_map(map)?)
    }

    fn sibling(
        &self,
        map: &ShareMap,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError> {
        CAPABILITIES.check(opts)?;
        let policy = if self.is_software() {
            AdapterPolicy::Any
        } else {
            AdapterPolicy::HardwareOnly
        };
        Ok(Box::new(
            self.sibling_with(map, &GpuOptions::from_run(opts, policy))?,
        ))
    }
}
