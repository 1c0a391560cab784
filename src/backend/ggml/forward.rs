//! The Llama forward pass as a ggml graph, with KV sharing: a layer whose plan says
//! it reads an earlier layer's keys (values) computes no keys (values) of its own
//! (no projection, no key RoPE, no cache write) and attends over that layer's slot.
//!
//! Mirrors llama.cpp's `llm_build_llama` op for op (so logits match it closely):
//! RMSNorm -> Q/K/V -> RoPE (NORM) -> cache write -> flash attention (f16 cache,
//! f32 accumulation) -> Wo -> residual -> RMSNorm -> SwiGLU FFN -> residual.

use super::ffi::{GgmlBackend, GgmlError, GraphAllocator, GraphCtx, RopeParams, Tensor};
use super::weights::PlacedWeights;
use crate::backend::ggml::decode_attention;
use crate::backend::ggml::kv::KvCache;
use crate::gguf::GgmlType;
use crate::kvplan::Half;
use crate::model::{LayerRole, LayerWeights, Model};
use crate::runtime::request::{ForwardOutput, ForwardRequest, Logits};

/// Where a forward pass starts: at the token embeddings, or at layer `layer` with
/// a given residual stream (`[n_tokens][n_embd]`, as captured by `layer_inputs`).
/// Layers before `layer` do not run and their cache slots are left as they are,
/// which lets a search re-evaluate only the layers a candidate map changes.
/// `refill` lists layers below `layer` whose slots the run reads, each with its own
/// residual input: their keys and values are computed again from it (a projection,
/// not a whole layer), so a candidate that reads an early layer's slot still starts
/// at the layer it changes.
#[derive(Clone, Copy, Debug)]
pub enum Start<'a> {
    Tokens,
    Layer {
        layer: usize,
        input: &'a [f32],
        refill: &'a [(usize, &'a [f32])],
    },
}

/// How cache rows map to sequences. One conversation is one sequence whose row `r`
/// holds position `r`. Calibration packs many equal-length texts into one cache so a
/// single graph evaluates them all: row `r` is position `r % len` of text `r / len`,
/// and a token only attends to rows of its own text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Single,
    Packed { seq_len: usize },
}

impl Layout {
    fn position(self, row: usize) -> usize {
        match self {
            Layout::Single => row,
            Layout::Packed { seq_len } => row % seq_len,
        }
    }

    fn first_visible_row(self, row: usize) -> usize {
        match self {
            Layout::Single => 0,
            Layout::Packed { seq_len } => row - row % seq_len,
        }
    }
}

/// The tokens of a batch that belong to one sequence: the sequence's cells start at
/// cache row `base`, and these `n` tokens go to its cells `row0..row0 + n`. A
/// conversation is one span at base 0; serve's decode step is one span per slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub base: usize,
    pub row0: usize,
    pub n: usize,
}

/// Mask rows are padded to this many cache cells, as llama.cpp does for flash
/// attention, so graphs of neighbouring lengths share allocations.
const KV_PAD: usize = 256;
const MAX_NODES: usize = 16384;
const NEG_INF_F16: u16 = 0xFC00;

/// What decides a graph's topology; graphs with equal shapes differ only in their
/// inputs' values (tokens, positions, cache rows, mask), so one can be reused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphShape {
    /// `(base, n)` of every span (a view's offset is part of the graph).
    spans: Vec<(usize, usize)>,
    n_kv: usize,
    first_layer: usize,
    /// Layers below `first_layer` whose K/V are recomputed (bit `l` for layer `l`).
    refill: u128,
    logits: Logits,
    hidden: bool,
    layer_inputs: bool,
    /// The graph runs on ggml's CPU backend, so CPU-only custom ops
    /// (`ggml_map_custom*`) may replace standard ones; on a GPU device every op must
    /// be one the device implements.
    on_cpu: bool,
}

impl GraphShape {
    fn n_tokens(&self) -> usize {
        self.spans.iter().map(|&(_, n)| n).sum()
    }

    fn all_rows(&self) -> bool {
        self.logits == Logits::All || self.hidden || self.layer_inputs
    }
}

/// The last graph built, kept so that decoding (one token at a time, the same
/// shape for up to `KV_PAD` steps) does not rebuild it for every token, as
/// llama.cpp's graph reuse does. Its tensors live in the `GraphAllocator`'s buffer:
/// the owner must drop the cache whenever that allocator serves another graph.
#[derive(Default)]
pub struct GraphCache {
    last: Option<(GraphShape, GraphCtx)>,
}

/// Runs `tokens` (the spans' tokens, span after span) through the model, writing
/// the owning layers' K/V into `cache`. Every sequence has `cells` cells. With
/// `Logits::Last`, each span's last token gets a row of logits. The caller
/// guarantees `row0 + n <= cells` for every span, that several spans only come
/// with `Layout::Single` and no `start` or captures, and every token id
/// `< n_vocab` (the session checks them).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    model: &Model,
    weights: &PlacedWeights<'_>,
    cache: &KvCache,
    backend: &GgmlBackend,
    alloc: &mut GraphAllocator,
    graphs: &mut GraphCache,
    tokens: &[u32],
    spans: &[Span],
    cells: usize,
    layout: Layout,
    start: Start<'_>,
    req: ForwardRequest,
) -> Result<ForwardOutput, GgmlError> {
    let n = tokens.len();
    debug_assert_eq!(n, spans.iter().map(|s| s.n).sum::<usize>());
    let end = spans.iter().map(|s| s.row0 + s.n).max().unwrap_or(0);
    let shape = GraphShape {
        spans: spans.iter().map(|s| (s.base, s.n)).collect(),
        n_kv: end.next_multiple_of(KV_PAD).min(cells),
        first_layer: match start {
            Start::Tokens => 0,
            Start::Layer { layer, .. } => layer,
        },
        refill: match start {
            Start::Tokens => 0,
            Start::Layer { refill, .. } => refill.iter().fold(0, |m, (l, _)| m | 1u128 << l),
        },
        logits: req.logits,
        hidden: req.hidden,
        layer_inputs: req.layer_inputs,
        on_cpu: backend.is_cpu(),
    };
    if graphs.last.as_ref().is_none_or(|(s, _)| *s != shape) {
        let g = build(model, weights, cache, &shape)?;
        backend.check_supported(&g.graph())?;
        graphs.last = Some((shape.clone(), g));
    }
    let g = &graphs.last.as_ref().expect("just built").1;
    let graph = g.graph();
    alloc.allocate(&graph)?;

    let input = |name: &str| g.get(name);
    write_inputs(
        spans,
        layout,
        shape.n_kv,
        [input("inp_pos"), input("inp_kv_rows"), input("inp_kq_mask")],
    );
    if let Some(ids) = input("inp_tokens") {
        ids.write(&tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
    }
    if let Some(last) = input("inp_out_ids") {
        let ends = spans.iter().scan(0, |end, s| {
            *end += s.n;
            Some(*end as i32 - 1)
        });
        last.write(&ends.collect::<Vec<_>>());
    }
    if let (Some(t), Start::Layer { input: x, .. }) = (input("inp_hidden"), start) {
        t.write(x);
    }
    if let Start::Layer { refill, .. } = start {
        for (l, x) in refill {
            if let Some(t) = input(&format!("inp_refill_{l}")) {
                t.write(x);
            }
        }
    }
    backend.compute(&graph)?;

    let mut out = ForwardOutput::default();
    if let Some(t) = g.get("result_logits") {
        let all = t.read_f32();
        let rows = t.ne()[1] as usize;
        if req.logits == Logits::Last && shape.all_rows() && rows > 1 {
            out.logits = all[(rows - 1) * model.config.n_vocab..].to_vec();
            out.logit_rows = 1;
        } else {
            out.logits = all;
            out.logit_rows = rows;
        }
    }
    if req.hidden {
        out.hidden = g.get("result_hidden").map(|t| t.read_f32());
    }
    if req.layer_inputs {
        for il in shape.first_layer..model.config.n_layers {
            if let Some(t) = g.get(&format!("layer_input_{il}")) {
                out.layer_inputs.push((il, t.read_f32()));
            }
        }
    }
    Ok(out)
}

/// Builds the forward graph for one shape. Inputs and results are found again by
/// name when the graph runs (`inp_*`, `result_*`, `layer_input_N`).
fn build(
    model: &Model,
    weights: &PlacedWeights<'_>,
    cache: &KvCache,
    shape: &GraphShape,
) -> Result<GraphCtx, GgmlError> {
    let c = &model.config;
    let w = &model.weights;
    let n = shape.n_tokens() as i64;
    let (hd, n_head, n_head_kv) = (c.head_dim as i64, c.n_head as i64, c.n_head_kv as i64);
    let rope = rope_params(model);

    let g = GraphCtx::new(MAX_NODES)?;
    let inp_pos = g.input(GgmlType::I32, &[n], "inp_pos");
    let inp_rows = g.input(GgmlType::I64, &[n], "inp_kv_rows");
    let inp_mask = g.input(GgmlType::F16, &[shape.n_kv as i64, n], "inp_kq_mask");
    // Only each span's last row leaves the final layer unless every row is wanted.
    let n_spans = shape.spans.len();
    let inp_last =
        (!shape.all_rows()).then(|| g.input(GgmlType::I32, &[n_spans as i64], "inp_out_ids"));
    let rope_freqs = w.rope_freqs().map(|i| weights.get(i));
    let kq_scale = 1.0 / (c.head_dim as f32).sqrt();
    // How each layer attends, decided per layer since each may read slots of other
    // types (see `AttentionPath`, `KvCache::reads_in_place`).
    let in_place = cache.reads_in_place();
    let attention_path = |il: usize| {
        let (type_k, type_v) = (cache.type_k(il), cache.type_v(il));
        let decode = shape.spans.iter().all(|&(_, len)| len == 1)
            && shape.on_cpu
            && !in_place
            && decode_attention::supports(type_k, type_v, c.head_dim, c.n_head, c.n_head_kv);
        if decode {
            AttentionPath::DecodeKernel
        } else {
            AttentionPath::Flash {
                dequantize: shape.on_cpu && !in_place,
            }
        }
    };

    // A layer's keys and values from its normed input, into the halves it owns.
    let write_layer_kv = |il: usize, lw: &LayerWeights, cur: Tensor<'_>| {
        write_kv(
            &g,
            cache,
            il,
            cur,
            |role| lw.get(role).map(|i| weights.get(i)),
            [inp_pos, inp_rows],
            c.rms_eps,
            rope_freqs,
            &rope,
            [hd, n_head_kv, n],
        )
    };
    // Slots of layers below the start that later layers read: written again from
    // those layers' inputs, before anything reads them.
    for (il, lw) in w.layers().iter().enumerate().take(shape.first_layer) {
        if shape.refill & (1u128 << il) == 0 {
            continue;
        }
        let lt = |role: LayerRole| weights.get(lw[role]);
        let x = g.input(
            GgmlType::F32,
            &[c.n_embd as i64, n],
            &format!("inp_refill_{il}"),
        );
        let cur = g.mul(g.rms_norm(x, c.rms_eps), lt(LayerRole::AttnNorm));
        write_layer_kv(il, lw, cur);
    }

    // The graph's first input: token ids, or a residual stream to start from.
    let mut x = if shape.first_layer == 0 {
        let ids = g.input(GgmlType::I32, &[n], "inp_tokens");
        g.get_rows(weights.get(w.token_embd()), ids)
    } else {
        g.input(GgmlType::F32, &[c.n_embd as i64, n], "inp_hidden")
    };
    for (il, lw) in w.layers().iter().enumerate().skip(shape.first_layer) {
        if shape.layer_inputs {
            let captured = g.cont(x);
            g.name(captured, &format!("layer_input_{il}"));
            g.mark_output(captured);
            g.expand(captured);
        }
        // This layer's weight in `role`.
        let lt = |role: LayerRole| weights.get(lw[role]);
        let residual = x;
        let cur = g.mul(g.rms_norm(x, c.rms_eps), lt(LayerRole::AttnNorm));

        let has = |role: LayerRole| lw.get(role).map(|i| weights.get(i));
        // Fitted adapters (`search::adapter`) apply while the layer reads the
        // source they were fitted for.
        let adapted = |half: Half| w.adapted_role(il, half, cache.plan());
        let q_roles = [
            adapted(Half::Keys),
            LayerRole::AttnQBias,
            LayerRole::AttnQNorm,
        ];
        let q = project_heads(&g, has, q_roles, cur, [hd, n_head, n], c.rms_eps);
        let q = g.rope(q, inp_pos, rope_freqs, &rope);
        let (k_slot, v_slot) = (cache.k(il), cache.v(il));
        // Cache writes go into the graph before the attention that reads the slot.
        write_layer_kv(il, lw, cur);
        // Each span attends over its own sequence's cells.
        let path = attention_path(il);
        let span_attention = |q, mask, base| {
            let dims = [c.n_head_kv, c.head_dim, shape.n_kv];
            span_attention(&g, q, [k_slot, v_slot], mask, base, dims, kq_scale, path)
        };
        let cur = match shape.spans.as_slice() {
            [(base, _)] => span_attention(q, inp_mask, *base),
            spans => {
                let mut out: Option<Tensor<'_>> = None;
                let mut t0 = 0;
                for &(base, len) in spans {
                    let q_s = g.view_3d(
                        q,
                        [hd, n_head, len as i64],
                        q.nb()[1],
                        q.nb()[2],
                        t0 * q.nb()[2],
                    );
                    let m = inp_mask.nb()[1];
                    let mask_s = g.view_2d(inp_mask, shape.n_kv as i64, len as i64, m, t0 * m);
                    let a = span_attention(q_s, mask_s, base);
                    out = Some(match out {
                        None => a,
                        Some(prev) => g.concat(prev, a, 2),
                    });
                    t0 += len;
                }
                out.expect("a batch has at least one span")
            }
        };
        let output = has(adapted(Half::Values)).expect("the adapted role is present");
        let mut cur = g.mul_mat(output, g.reshape_2d(cur, hd * n_head, n));
        let mut residual = residual;
        if let (true, Some(last)) = (il + 1 == w.layers().len(), inp_last) {
            cur = g.get_rows(cur, last);
            residual = g.get_rows(residual, last);
        }
        let ffn_inp = g.add(cur, residual);

        let cur = g.mul(g.rms_norm(ffn_inp, c.rms_eps), lt(LayerRole::FfnNorm));
        let up = g.mul_mat(lt(LayerRole::FfnUp), cur);
        let gate = g.mul_mat(lt(LayerRole::FfnGate), cur);
        let cur = g.mul_mat(lt(LayerRole::FfnDown), g.swiglu(gate, up));
        x = g.add(cur, ffn_inp);
    }
    let hidden = g.mul(g.rms_norm(x, c.rms_eps), weights.get(w.output_norm()));
    g.name(hidden, "result_hidden");
    g.mark_output(hidden);
    g.expand(hidden);
    if shape.logits != Logits::None {
        let t = g.mul_mat(weights.get(w.output()), hidden);
        g.name(t, "result_logits");
        g.mark_output(t);
        g.expand(t);
    }
    Ok(g)
}

/// Layer `il`'s keys and values from its normed input `cur`, written into the
/// halves it owns (RoPE on the keys).
#[allow(clippy::too_many_arguments)]
fn write_kv<'a>(
    g: &'a GraphCtx,
    cache: &'a KvCache,
    il: usize,
    cur: Tensor<'a>,
    has: impl Fn(LayerRole) -> Option<Tensor<'a>> + Copy,
    [pos, rows]: [Tensor<'a>; 2],
    eps: f32,
    rope_freqs: Option<Tensor<'a>>,
    rope: &RopeParams,
    [hd, n_head_kv, n]: [i64; 3],
) {
    if cache.plan().owns(Half::Keys, il) {
        let k_roles = [LayerRole::AttnK, LayerRole::AttnKBias, LayerRole::AttnKNorm];
        let k = project_heads(g, has, k_roles, cur, [hd, n_head_kv, n], eps);
        let k = g.rope(k, pos, rope_freqs, rope);
        g.expand(g.set_rows(cache.k(il), g.reshape_2d(k, hd * n_head_kv, n), rows));
    }
    if cache.plan().owns(Half::Values, il) {
        let v = g.mul_mat(has(LayerRole::AttnV).expect("a required role"), cur);
        let v = match has(LayerRole::AttnVBias) {
            Some(b) => g.add(v, b),
            None => v,
        };
        g.expand(g.set_rows(cache.v(il), v, rows));
    }
}

/// Queries or keys as `[hd, heads, n]` from the normed input: the projection
/// `[proj, bias, norm]`, plus its bias where the variant has one (qwen2), then the
/// per-head RMS norm where it has one (qwen3), as llama.cpp builds them.
fn project_heads<'a>(
    g: &'a GraphCtx,
    has: impl Fn(LayerRole) -> Option<Tensor<'a>>,
    [proj, bias, norm]: [LayerRole; 3],
    cur: Tensor<'a>,
    [hd, heads, n]: [i64; 3],
    eps: f32,
) -> Tensor<'a> {
    let mut t = g.mul_mat(has(proj).expect("a required role"), cur);
    if let Some(b) = has(bias) {
        t = g.add(t, b);
    }
    let t = g.reshape_3d(t, hd, heads, n);
    match has(norm) {
        Some(w) => g.mul(g.rms_norm(t, eps), w),
        None => t,
    }
}

/// How a layer's queries attend over its cache in one graph.
#[derive(Clone, Copy)]
enum AttentionPath {
    /// kvsharer's grouped decode kernel: one new token per span over a quantized
    /// cache on the CPU (see `backend::ggml::decode_attention` for why; a custom op
    /// runs only on ggml's CPU backend).
    DecodeKernel,
    /// ggml's flash attention. With `dequantize`, the span reads its cells
    /// dequantized to f32 first: ggml's CPU flash attention tiles many queries only
    /// over f16/f32 caches of one type, and otherwise dequantizes every value row once
    /// per query (a 4096-token prompt over a q4_0 cache took 86 s to evaluate that
    /// way). Dequantizing each cell once per graph costs one pass over the cells; the
    /// kernel (tiled from 64 queries, `GGML_FA_TILE_Q`) then reads the same cell
    /// values in f32, with f32 queries as the decode kernel and the wgpu backend have
    /// them, where ggml's quantized dot products round the queries to q8_0 first.
    Flash { dequantize: bool },
}

/// Attention of one span's queries over its sequence's cells from row `base` on.
#[allow(clippy::too_many_arguments)]
fn span_attention<'a>(
    g: &'a GraphCtx,
    q: Tensor<'a>,
    [k_slot, v_slot]: [Tensor<'a>; 2],
    mask: Tensor<'a>,
    base: usize,
    dims: [usize; 3],
    scale: f32,
    path: AttentionPath,
) -> Tensor<'a> {
    match path {
        AttentionPath::DecodeKernel => {
            let n_kv = dims[2] as i64;
            let cells = |slot: Tensor<'a>| {
                let row = slot_row_bytes(slot);
                g.view_2d(slot, slot.ne()[0], n_kv, row, base * row)
            };
            g.decode_attention(q, cells(k_slot), cells(v_slot), mask, scale)
        }
        AttentionPath::Flash { dequantize } => {
            attention(g, q, [k_slot, v_slot], mask, base, dims, scale, dequantize)
        }
    }
}

/// Flash attention of `q` ([hd, n_head, n]) over the `n_kv` cells of a slot from
/// row `base` on; with `dequantize`, over those cells converted to f32.
#[allow(clippy::too_many_arguments)]
fn attention<'a>(
    g: &'a GraphCtx,
    q: Tensor<'a>,
    [k_slot, v_slot]: [Tensor<'a>; 2],
    mask: Tensor<'a>,
    base: usize,
    [n_head_kv, head_dim, n_kv]: [usize; 3],
    scale: f32,
    dequantize: bool,
) -> Tensor<'a> {
    let kv_view = |slot: Tensor<'a>, ty_row: usize, ty_head: usize| {
        let view = g.view_3d(
            slot,
            [head_dim as i64, n_head_kv as i64, n_kv as i64],
            ty_head,
            ty_row,
            base * ty_row,
        );
        let cells = g.permute(view, [0, 2, 1, 3]);
        if dequantize {
            g.cast(cells, GgmlType::F32)
        } else {
            cells
        }
    };
    let k_row = slot_row_bytes(k_slot);
    let v_row = slot_row_bytes(v_slot);
    let k = kv_view(k_slot, k_row, k_row / n_head_kv);
    let v = kv_view(v_slot, v_row, v_row / n_head_kv);
    let q = g.permute(q, [0, 2, 1, 3]);
    g.flash_attn(q, k, v, mask, scale)
}

fn slot_row_bytes(slot: Tensor<'_>) -> usize {
    slot.nb()[1]
}

/// Positions, cache rows and the mask of every token: a span's mask rows are
/// relative to its sequence's first cell.
fn write_inputs(spans: &[Span], layout: Layout, n_kv: usize, inputs: [Option<Tensor<'_>>; 3]) {
    // A graph that writes no slot (a restart above every owning layer) has no
    // cache-row input; one always has positions and a mask.
    let [inp_pos, inp_rows, inp_mask] = inputs;
    let n: usize = spans.iter().map(|s| s.n).sum();
    let mut pos = Vec::with_capacity(n);
    let mut rows = Vec::with_capacity(n);
    let mut mask = vec![NEG_INF_F16; n_kv * n];
    let token_rows = spans
        .iter()
        .flat_map(|s| (s.row0..s.row0 + s.n).map(move |row| (s.base, row)));
    for (t, (base, row)) in token_rows.enumerate() {
        pos.push(layout.position(row) as i32);
        rows.push((base + row) as i64);
        for j in layout.first_visible_row(row)..=row.min(n_kv - 1) {
            mask[t * n_kv + j] = 0;
        }
    }
    if let Some(t) = inp_pos {
        t.write(&pos);
    }
    if let Some(t) = inp_rows {
        t.write(&rows);
    }
    if let Some(t) = inp_mask {
        t.write(&mask);
    }
}

fn rope_params(model: &Model) -> RopeParams {
    let c = &model.config;
    RopeParams {
        n_dims: c.rope_dim as i32,
        // LLAMA_ROPE_TYPE_NEOX (2): pairs (i, i + n_dims/2); NORM (0): adjacent pairs.
        mode: if c.arch.rope_neox() { 2 } else { 0 },
        n_ctx_orig: c.n_ctx_train as i32,
        freq_base: c.rope_freq_base,
        freq_scale: c.rope_freq_scale,
        ext_factor: 0.0,
        attn_factor: 1.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
    }
}

/// Re-rotates the cached keys of rows `rows` of every slot by `delta` positions
/// (rotations compose: RoPE(p) then RoPE(delta) is RoPE(p + delta)), as llama.cpp's
/// context shift does after it moves cache cells.
pub fn shift_keys(
    model: &Model,
    weights: &PlacedWeights<'_>,
    cache: &KvCache,
    backend: &GgmlBackend,
    alloc: &mut GraphAllocator,
    rows: std::ops::Range<usize>,
    delta: i32,
) -> Result<(), GgmlError> {
    if rows.is_empty() || delta == 0 {
        return Ok(());
    }
    let c = &model.config;
    let m = rows.len();
    let g = GraphCtx::new(MAX_NODES)?;
    let pos = g.input(GgmlType::I32, &[m as i64], "shift_pos");
    let rope = rope_params(model);
    let freq_factors = model.weights.rope_freqs().map(|i| weights.get(i));
    for layer in (0..c.n_layers).filter(|&l| cache.plan().owns(Half::Keys, l)) {
        let slot = cache.k(layer);
        let row = slot.nb()[1];
        let view = g.view_3d(
            slot,
            [c.head_dim as i64, c.n_head_kv as i64, m as i64],
            row / c.n_head_kv,
            row,
            rows.start * row,
        );
        let as_float = if matches!(cache.type_k(layer), GgmlType::F16 | GgmlType::F32) {
            view
        } else {
            g.cast(view, GgmlType::F32)
        };
        let rotated = g.rope(as_float, pos, freq_factors, &rope);
        g.expand(g.cpy(rotated, view));
    }
    let graph = g.graph();
    backend.check_supported(&graph)?;
    alloc.allocate(&graph)?;
    pos.write(&vec![delta; m]);
    backend.compute(&graph)
}
