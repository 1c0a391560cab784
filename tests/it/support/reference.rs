//! A plain f32 Llama forward pass (llama2.c style, no ggml) with layer-wise KV
//! sharing: the oracle the ggml runtime is checked against.
//!
//! It runs layer by layer over the whole sequence; with causal attention that is the
//! same computation as token by token, and it makes "the source layer has already
//! filled its cache for these positions" true by construction.

use half::f16;
use kvsharer::backend::ggml::{dequantize, quantize_as_cache};
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::{Half, KvPlan, ShareMap};

use super::tiny_model::{RefWeights, TinySpec};

/// Everything one reference run computes.
#[derive(Clone, Debug, PartialEq)]
pub struct RefOutput {
    /// `[pos][n_vocab]`
    pub logits: Vec<Vec<f32>>,
    /// Final hidden state after the output RMSNorm, `[pos][n_embd]`.
    pub hidden: Vec<Vec<f32>>,
    /// Post-RoPE keys each layer attended over, `[layer][pos][n_head_kv*hd]`; a shared
    /// layer's entry is its source's cache (after f16 rounding when that is on).
    pub k: Vec<Vec<Vec<f32>>>,
    /// Values, laid out as `k`.
    pub v: Vec<Vec<Vec<f32>>>,
    /// Attention output before `Wo`, heads concatenated, `[layer][pos][n_head*hd]`.
    pub attn: Vec<Vec<Vec<f32>>>,
}

/// Which roundings of the ggml runtime to imitate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefPrecision {
    /// K and V are rounded to f16 when cached, as the runtime's F16 cache stores them.
    pub kv_cache_f16: bool,
    /// Q and the softmax probabilities are rounded to f16 before they meet the f16
    /// cache: ggml's `mul_mat` converts its f32 operand to the F16 operand's type.
    pub attn_inputs_f16: bool,
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w` (mean in f64, as ggml accumulates it).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), w.len(), "rms_norm: input vs weight length");
    let mean_sq = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (mean_sq + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &g)| (v as f64 * scale) as f32 * g)
        .collect()
}

/// llama.cpp's NORM RoPE (`rope_type` 0, what LLM_ARCH_LLAMA uses), in place on a
/// vector of whole heads: within each head, the adjacent pair `(x[2i], x[2i+1])` is
/// rotated by `pos * base^(-2i/head_dim)`. (NEOX mode would pair `i` with
/// `i + head_dim/2` instead.)
pub fn rope_norm(x: &mut [f32], head_dim: usize, pos: usize, base: f32) {
    assert!(
        head_dim.is_multiple_of(2) && x.len().is_multiple_of(head_dim),
        "rope_norm: bad shape"
    );
    for head in x.chunks_exact_mut(head_dim) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
            let (sin, cos) = theta.sin_cos();
            let (x0, x1) = (pair[0] as f64, pair[1] as f64);
            pair[0] = (x0 * cos - x1 * sin) as f32;
            pair[1] = (x0 * sin + x1 * cos) as f32;
        }
    }
}

/// llama.cpp's NEOX RoPE (`rope_type` 2, Qwen2/Qwen3): within each head, `x[i]`
/// is rotated with `x[i + head_dim/2]` by `pos * base^(-2i/head_dim)`.
pub fn rope_neox(x: &mut [f32], head_dim: usize, pos: usize, base: f32) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
            let (sin, cos) = theta.sin_cos();
            let (x0, x1) = (head[i] as f64, head[i + half] as f64);
            head[i] = (x0 * cos - x1 * sin) as f32;
            head[i + half] = (x0 * sin + x1 * cos) as f32;
        }
    }
}

/// Queries or keys of one position as the variant computes them: projection, bias
/// (qwen2), per-head RMS norm (qwen3), RoPE of the variant's type.
fn project_heads(
    spec: &TinySpec,
    w: &super::tiny_model::RefMatrix,
    bias: Option<&Vec<f32>>,
    norm: Option<&Vec<f32>>,
    xn: &[f32],
    pos: usize,
) -> Vec<f32> {
    let hd = spec.head_dim();
    let mut t = w.matvec(xn);
    if let Some(b) = bias {
        t.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    if let Some(n) = norm {
        t = t
            .chunks_exact(hd)
            .flat_map(|head| rms_norm(head, n, spec.rms_eps))
            .collect();
    }
    if spec.arch.rope_neox() {
        rope_neox(&mut t, hd, pos, spec.rope_base);
    } else {
        rope_norm(&mut t, hd, pos, spec.rope_base);
    }
    t
}

/// GQA: query head `h` reads KV head `h / (n_head / n_head_kv)`, consecutive query
/// heads sharing one KV head (ggml's `mul_mat` broadcast over dim 2).
pub fn kv_head_for(h: usize, n_head: usize, n_head_kv: usize) -> usize {
    h / (n_head / n_head_kv)
}

/// One head's causal attention at the last of `keys.len()` positions:
/// `softmax(scale * q.k_j) . v_j` over every given position.
pub fn attend_head(
    q: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
    scale: f32,
    probs_f16: bool,
) -> Vec<f32> {
    assert_eq!(keys.len(), values.len(), "attend_head: keys vs values");
    assert!(!keys.is_empty(), "attend_head: no positions to attend over");
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| {
            let dot: f64 = q.iter().zip(*k).map(|(&a, &b)| a as f64 * b as f64).sum();
            dot * scale as f64
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    let mut out = vec![0f64; q.len()];
    for (e, v) in exps.iter().zip(values) {
        let mut p = (e / total) as f32;
        if probs_f16 {
            p = round_f16(p);
        }
        for (o, &vi) in out.iter_mut().zip(*v) {
            *o += p as f64 * vi as f64;
        }
    }
    out.into_iter().map(|o| o as f32).collect()
}

/// Logits for every position, f32 cache.
pub fn reference_forward(
    w: &RefWeights,
    spec: &TinySpec,
    map: &ShareMap,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    reference_forward_full(w, spec, map, tokens).logits
}

/// Logits for every position with K and V rounded to f16 when cached, as the ggml
/// runtime's F16 cache holds them.
pub fn reference_forward_f16_cache(
    w: &RefWeights,
    spec: &TinySpec,
    map: &ShareMap,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    let precision = RefPrecision {
        kv_cache_f16: true,
        attn_inputs_f16: false,
    };
    reference_forward_with(w, spec, map, tokens, precision).logits
}

/// Logits, final hidden states and per-layer K/V, f32 cache.
pub fn reference_forward_full(
    w: &RefWeights,
    spec: &TinySpec,
    map: &ShareMap,
    tokens: &[u32],
) -> RefOutput {
    reference_forward_with(w, spec, map, tokens, RefPrecision::default())
}

/// The reference forward pass. A layer `l` with `map.source(l) != l` computes only
/// its queries and attends over layer `map.source(l)`'s cached K/V; its own `wk`/`wv`
/// are never read.
pub fn reference_forward_with(
    w: &RefWeights,
    spec: &TinySpec,
    map: &ShareMap,
    tokens: &[u32],
    precision: RefPrecision,
) -> RefOutput {
    reference_forward_split(w, spec, map, map, tokens, precision)
}

/// `x` (rows of `row` elements) as a KV cache slot of `ty` holds it: f16-rounded
/// for f16, through the quantizer ggml's CPU backend stores cache rows with and
/// ggml's dequantizer for the block types.
pub fn as_cached(ty: GgmlType, x: &[f32], row: usize) -> Vec<f32> {
    assert!(x.len().is_multiple_of(row));
    match ty {
        GgmlType::F32 => x.to_vec(),
        GgmlType::F16 => x.iter().map(|&v| round_f16(v)).collect(),
        _ => dequantize(ty, &quantize_as_cache(ty, x).unwrap(), x.len()).unwrap(),
    }
}

/// The reference forward pass under a KV plan: its sources, and every cached K or
/// V row as the owner's slot type stores it (`as_cached`); f32 arithmetic
/// otherwise.
pub fn reference_forward_plan(
    w: &RefWeights,
    spec: &TinySpec,
    plan: &KvPlan,
    tokens: &[u32],
) -> RefOutput {
    reference_forward_rounded(
        w,
        spec,
        plan.sources(Half::Keys),
        plan.sources(Half::Values),
        tokens,
        RefPrecision::default(),
        &|half, layer, row| *row = as_cached(plan.types(half)[layer], row, row.len()),
    )
}

/// The reference forward pass with keys and values shared apart (a KV plan's
/// sources): layer `l` reads keys from `k_map.source(l)` and values from
/// `v_map.source(l)`, computing (and caching) only the halves it owns.
pub fn reference_forward_split(
    w: &RefWeights,
    spec: &TinySpec,
    k_map: &ShareMap,
    v_map: &ShareMap,
    tokens: &[u32],
    precision: RefPrecision,
) -> RefOutput {
    let f16_cache = |_: Half, _: usize, row: &mut Vec<f32>| {
        if precision.kv_cache_f16 {
            row.iter_mut().for_each(|x| *x = round_f16(*x));
        }
    };
    reference_forward_rounded(w, spec, k_map, v_map, tokens, precision, &f16_cache)
}

/// `reference_forward_split` with `cache` rounding each cached row (half, owning
/// layer, row) as its slot stores it.
fn reference_forward_rounded(
    w: &RefWeights,
    spec: &TinySpec,
    k_map: &ShareMap,
    v_map: &ShareMap,
    tokens: &[u32],
    precision: RefPrecision,
    cache: &dyn Fn(Half, usize, &mut Vec<f32>),
) -> RefOutput {
    for map in [k_map, v_map] {
        assert_eq!(
            map.n_layers(),
            spec.n_layers,
            "reference: share map vs spec layers"
        );
    }
    assert_eq!(
        w.layers.len(),
        spec.n_layers,
        "reference: weights vs spec layers"
    );
    let hd = spec.head_dim();
    let scale = 1.0 / (hd as f32).sqrt();
    let maybe_f16 = |on: bool, v: &mut [f32]| {
        if on {
            v.iter_mut().for_each(|x| *x = round_f16(*x));
        }
    };

    let mut x: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| {
            assert!(
                (t as usize) < spec.n_vocab,
                "reference: token {t} out of vocab"
            );
            w.token_embd.row(t as usize).to_vec()
        })
        .collect();
    let mut k_cache: Vec<Vec<Vec<f32>>> = Vec::with_capacity(spec.n_layers);
    let mut v_cache: Vec<Vec<Vec<f32>>> = Vec::with_capacity(spec.n_layers);
    let mut attn_all = Vec::with_capacity(spec.n_layers);

    for (l, layer) in w.layers.iter().enumerate() {
        let normed: Vec<Vec<f32>> = x
            .iter()
            .map(|xi| rms_norm(xi, &layer.attn_norm, spec.rms_eps))
            .collect();
        let (k_source, v_source) = (k_map.source(l), v_map.source(l));
        assert!(
            k_source <= l && v_source <= l,
            "reference: layer {l} reads a later layer"
        );
        if k_source == l {
            let ks = normed
                .iter()
                .enumerate()
                .map(|(pos, xn)| {
                    let bias = layer.biases.as_ref().map(|b| &b[1]);
                    let norm = layer.qk_norm.as_ref().map(|n| &n[1]);
                    let mut k = project_heads(spec, &layer.wk, bias, norm, xn, pos);
                    cache(Half::Keys, l, &mut k);
                    k
                })
                .collect();
            k_cache.push(ks);
        } else {
            k_cache.push(k_cache[k_source].clone());
        }
        if v_source == l {
            let vs = normed
                .iter()
                .map(|xn| {
                    let mut v = layer.wv.matvec(xn);
                    if let Some([_, _, bv]) = &layer.biases {
                        v.iter_mut().zip(bv).for_each(|(a, b)| *a += b);
                    }
                    cache(Half::Values, l, &mut v);
                    v
                })
                .collect();
            v_cache.push(vs);
        } else {
            v_cache.push(v_cache[v_source].clone());
        }

        let mut attn_layer = Vec::with_capacity(x.len());
        for (pos, xn) in normed.iter().enumerate() {
            let bias = layer.biases.as_ref().map(|b| &b[0]);
            let norm = layer.qk_norm.as_ref().map(|n| &n[0]);
            let mut q = project_heads(spec, &layer.wq, bias, norm, xn, pos);
            maybe_f16(precision.attn_inputs_f16, &mut q);
            let mut attn = Vec::with_capacity(spec.n_head * hd);
            for h in 0..spec.n_head {
                let kvh = kv_head_for(h, spec.n_head, spec.n_head_kv);
                let span = kvh * hd..(kvh + 1) * hd;
                let keys: Vec<&[f32]> = k_cache[l][..=pos]
                    .iter()
                    .map(|k| &k[span.clone()])
                    .collect();
                let values: Vec<&[f32]> = v_cache[l][..=pos]
                    .iter()
                    .map(|v| &v[span.clone()])
                    .collect();
                attn.extend(attend_head(
                    &q[h * hd..(h + 1) * hd],
                    &keys,
                    &values,
                    scale,
                    precision.attn_inputs_f16,
                ));
            }
            let out = layer.wo.matvec(&attn);
            x[pos].iter_mut().zip(&out).for_each(|(a, b)| *a += b);
            attn_layer.push(attn);

            let xn = rms_norm(&x[pos], &layer.ffn_norm, spec.rms_eps);
            let gate = layer.gate.matvec(&xn);
            let up = layer.up.matvec(&xn);
            let act: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
            let down = layer.down.matvec(&act);
            x[pos].iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        attn_all.push(attn_layer);
    }

    let hidden: Vec<Vec<f32>> = x
        .iter()
        .map(|xi| rms_norm(xi, &w.output_norm, spec.rms_eps))
        .collect();
    let logits = hidden.iter().map(|h| w.output_matrix().matvec(h)).collect();
    RefOutput {
        logits,
        hidden,
        k: k_cache,
        v: v_cache,
        attn: attn_all,
    }
}
