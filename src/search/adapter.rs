//! Fitted adapters for shared cache halves (KVSHARER.md, "Fitted value adapters").
//!
//! Where layer `i` reads layer `j`'s values, attention gives query head `h` of KV
//! group `g` the average `A_h V_j,g` instead of `A_h V_i,g`. A linear map `B` turns
//! that into `A_h V_j,g B`, and `B` folds into the columns of layer `i`'s
//! `attn_output` that head `h` feeds: no run-time cost. `B` is fitted in closed form
//! (ridge least squares over calibration captures of the unshared model), either to
//! the attention output, one map per query head (`A_h V_i,g ~ A_h V_j,g B_h`, with
//! the unshared model's `A_h`), or to the cached rows, one per group
//! (`V_i,g ~ V_j,g B_g`).
//!
//! Keys pass through RoPE, so only maps that commute with every rotation fold: a
//! complex scale `c` per (group, frequency pair), `k_i ~ c k_j`. Then
//! `q . (c k_j) = (conj(c) q) . k_j`, and `conj(c)` folds into the rows of layer
//! `i`'s `attn_q` (and its bias) that the group's query heads come from. It does not
//! fold through a per-head query norm (`qwen3`), which such models refuse.

use crate::backend::ggml::dequantize;
use crate::gguf::{Array, GgmlType, NewTensor, Value};
use crate::kvplan::{Half, KvPlan, ShareMap};
use crate::model::{adapter_key, LayerRole, Model, Role};
use crate::runtime::{self, BackendChoice, ForwardRequest, Logits, RunOptions, RuntimeError};
use crate::search::calibration::{Corpus, MIN_TOKENS_PER_SAMPLE};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Why adapters cannot be fitted.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("key adapters do not fold through {0}'s per-head query norm; fit value adapters only")]
    QueryNorm(&'static str),
    #[error("key adapters need RoPE over the whole head (rotary dims {rope_dim}, head dim {head_dim}); fit value adapters only")]
    PartialRope { rope_dim: usize, head_dim: usize },
    #[error("reading {name}: {reason}")]
    Weight { name: String, reason: String },
    #[error("the calibration text has no line of at least {0} tokens to fit adapters on")]
    NoText(usize),
    #[error("an adapter for layer {} reading layer {}: the source must be an earlier layer of the model", .0.layer, .0.source)]
    Pair(AdapterPair),
    #[error("writing the adapted model: {0}")]
    Io(String),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The corpus's texts tokenized (BOS as the model says), each cut to `max_tokens`;
/// texts shorter than `MIN_TOKENS_PER_SAMPLE` are left out.
pub fn tokenize_texts(
    tokenizer: &Tokenizer,
    corpus: &Corpus,
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>, AdapterError> {
    let mut texts = Vec::new();
    for text in &corpus.texts {
        let mut toks = tokenizer.encode(text, true, false)?;
        toks.truncate(max_tokens);
        if toks.len() >= MIN_TOKENS_PER_SAMPLE {
            texts.push(toks);
        }
    }
    if texts.is_empty() {
        return Err(AdapterError::NoText(MIN_TOKENS_PER_SAMPLE));
    }
    Ok(texts)
}

/// What the value maps are fitted to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueFit {
    /// The cache rows: `V_i ~ V_j B`.
    Rows,
    /// What attention makes of them: for every query head `h`, its own map with
    /// `A_h V_i ~ (A_h V_j) B_h`, under the unshared model's attention weights `A_h`.
    Attention,
}

/// Which halves get adapters, how values are fitted, and the ridge (relative to
/// the mean diagonal of the Gram matrix) of the value fit.
#[derive(Clone, Copy, Debug)]
pub struct AdapterOptions {
    pub keys: bool,
    pub values: bool,
    pub fit: ValueFit,
    pub ridge: f64,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        AdapterOptions {
            keys: true,
            values: true,
            fit: ValueFit::Attention,
            ridge: 1e-3,
        }
    }
}

/// Adapted tensors for a model of `n_layers` layers, each with the share it fits.
#[derive(Clone, Debug, Default)]
pub struct Adapters {
    pub n_layers: usize,
    pub fitted: Vec<(AdapterPair, NewTensor)>,
}

impl Adapters {
    pub fn is_empty(&self) -> bool {
        self.fitted.is_empty()
    }

    /// How many adapted tensors per half (keys, values).
    pub fn counts(&self) -> (usize, usize) {
        let count = |half| self.fitted.iter().filter(|(p, _)| p.half == half).count();
        (count(Half::Keys), count(Half::Values))
    }

    /// The adapters of `pairs` (those fitted here).
    pub fn subset(&self, pairs: &[AdapterPair]) -> Adapters {
        Adapters {
            n_layers: self.n_layers,
            fitted: self
                .fitted
                .iter()
                .filter(|(p, _)| pairs.contains(p))
                .cloned()
                .collect(),
        }
    }

    pub fn tensors(&self) -> Vec<NewTensor> {
        self.fitted.iter().map(|(_, t)| t.clone()).collect()
    }

    /// The GGUF keys naming each adapted tensor's source: per half with adapters,
    /// an array with an entry per layer (a layer's own index where it has none).
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for half in Half::BOTH {
            let mut sources: Vec<u32> = (0..self.n_layers as u32).collect();
            let mut any = false;
            for (p, _) in self.fitted.iter().filter(|(p, _)| p.half == half) {
                sources[p.layer] = p.source as u32;
                any = true;
            }
            if any {
                out.push((
                    adapter_key(half).to_string(),
                    Value::Array(Array::U32(sources)),
                ));
            }
        }
        out
    }
}

/// One layer's fit: the source it reads `half` from and the sums so far.
enum LayerFit {
    Keys(KeySums),
    Values(ValueSums),
}

/// What the attention fit needs of a layer to recompute its queries: its input
/// norm, query projection (f32, `[n_head * head_dim][n_embd]`), bias and norm.
struct QueryWeights {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    bias: Option<Vec<f32>>,
    norm: Option<Vec<f32>>,
}

/// One adapter to fit: `layer` reads `half` from `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdapterPair {
    pub half: Half,
    pub layer: usize,
    pub source: usize,
}

/// The adapters `opts` asks for on `plan`: one per half it shares.
pub fn pairs_of(plan: &KvPlan, opts: &AdapterOptions) -> Vec<AdapterPair> {
    let mut out = Vec::new();
    for layer in 0..plan.n_layers() {
        for (half, wanted) in [(Half::Keys, opts.keys), (Half::Values, opts.values)] {
            if wanted && !plan.owns(half, layer) {
                out.push(AdapterPair {
                    half,
                    layer,
                    source: plan.source(half, layer),
                });
            }
        }
    }
    out
}

/// The adapters the planner measures (`opts`' halves): every layer but the first
/// reading its neighbour below. Adapters help most there: on the default model a
/// fitted map cut single-share KLD 2-5 times from the layer below, and made
/// shares from layer 0 at depth worse.
pub fn neighbour_pairs(n_layers: usize, opts: &AdapterOptions) -> Vec<AdapterPair> {
    let mut out = Vec::new();
    for layer in 1..n_layers {
        for (half, wanted) in [(Half::Keys, opts.keys), (Half::Values, opts.values)] {
            if wanted {
                out.push(AdapterPair {
                    half,
                    layer,
                    source: layer - 1,
                });
            }
        }
    }
    out
}

/// A copy of `model` with `adapters` added, written to a temporary file in `dir`
/// (removed when the returned model is dropped) and loaded.
pub struct AdaptedModel {
    pub model: Model,
    _file: tempfile::TempPath,
}

pub fn adapted_model(
    model: &Model,
    adapters: &Adapters,
    dir: &std::path::Path,
) -> Result<AdaptedModel, AdapterError> {
    let file = tempfile::Builder::new()
        .prefix("kvsharer-adapted-")
        .suffix(".gguf")
        .tempfile_in(dir)
        .map_err(|e| AdapterError::Io(e.to_string()))?
        .into_temp_path();
    crate::gguf::write_with_tensors(
        model.file(),
        &adapters.metadata(),
        &["kvsharer.adapter."],
        &|name| name.ends_with(".kvsharer.weight"),
        &adapters.tensors(),
        &file,
    )
    .map_err(|e| AdapterError::Io(e.to_string()))?;
    let model = Model::load(&file).map_err(|e| AdapterError::Io(e.to_string()))?;
    Ok(AdaptedModel { model, _file: file })
}

/// Fits the adapter of every pair, running `texts` through the unshared model on
/// the CPU, and folds each into a copy of the layer's `attn_q` / `attn_output`,
/// stored in f32. `progress` gets the texts done. Returns the adapters and the
/// number of calibration rows they were fitted on.
pub fn fit(
    model: &Model,
    pairs: &[AdapterPair],
    texts: &[Vec<u32>],
    threads: usize,
    opts: &AdapterOptions,
    mut progress: impl FnMut(usize),
) -> Result<(Adapters, usize), AdapterError> {
    let c = &model.config;
    let keys = pairs.iter().any(|p| p.half == Half::Keys);
    if keys && c.arch.qk_norm() {
        return Err(AdapterError::QueryNorm(c.arch.name()));
    }
    if keys && c.rope_dim != c.head_dim {
        return Err(AdapterError::PartialRope {
            rope_dim: c.rope_dim,
            head_dim: c.head_dim,
        });
    }
    let heads = Heads::of(model);
    let kv_dim = c.n_embd_kv();
    // (layer, half, source) of every adapter to fit.
    let mut jobs: Vec<(usize, Half, usize, LayerFit)> = Vec::new();
    for p in pairs {
        if p.source >= p.layer || p.layer >= c.n_layers {
            return Err(AdapterError::Pair(*p));
        }
        let sums = match p.half {
            Half::Keys => LayerFit::Keys(KeySums::new(&heads)),
            // The attention fit has one target per query head, so one map each;
            // the rows of a group are the same for all its heads.
            Half::Values => LayerFit::Values(ValueSums::new(
                &heads,
                match opts.fit {
                    ValueFit::Attention => heads.n_head,
                    ValueFit::Rows => heads.n_head_kv,
                },
            )),
        };
        jobs.push((p.layer, p.half, p.source, sums));
    }
    let attention = opts.fit == ValueFit::Attention;
    let query_weights = |il: usize| -> Result<QueryWeights, AdapterError> {
        let lw = &model.weights.layers()[il];
        let read = |role: LayerRole| -> Result<Option<Vec<f32>>, AdapterError> {
            let Some(id) = lw.get(role) else {
                return Ok(None);
            };
            let t = model.weights.tensor(id);
            let n = t.dims.iter().product::<u64>() as usize;
            dequantize(t.ty, model.weight_bytes(id), n)
                .map(Some)
                .map_err(|e| AdapterError::Weight {
                    name: t.name.clone(),
                    reason: e.to_string(),
                })
        };
        Ok(QueryWeights {
            attn_norm: read(LayerRole::AttnNorm)?.unwrap_or_default(),
            wq: read(LayerRole::AttnQ)?.unwrap_or_default(),
            bias: read(LayerRole::AttnQBias)?,
            norm: read(LayerRole::AttnQNorm)?,
        })
    };
    let mut queries: Vec<Option<QueryWeights>> = (0..c.n_layers).map(|_| None).collect();
    if attention {
        for (il, half, _, _) in &jobs {
            if *half == Half::Values && queries[*il].is_none() {
                queries[*il] = Some(query_weights(*il)?);
            }
        }
    }
    let rope = RopeTable::new(model)?;

    let longest = texts.iter().map(Vec::len).max().unwrap_or(1);
    let run_opts = RunOptions {
        n_ctx: longest,
        n_batch: longest,
        n_threads: threads,
        ..RunOptions::default()
    };
    let identity = ShareMap::identity(c.n_layers);
    let mut opened = runtime::open(BackendChoice::Cpu, model, &identity, &run_opts)?;
    let state = opened.state.as_mut();
    let mut n_rows = 0;
    for (done, text) in texts.iter().enumerate() {
        progress(done);
        state.reset();
        let req = ForwardRequest {
            layer_inputs: attention,
            ..ForwardRequest::logits(Logits::None)
        };
        let out = state.forward(text, req)?;
        let t = text.len();
        let mut kv: Vec<Option<(Vec<f32>, Vec<f32>)>> = (0..c.n_layers).map(|_| None).collect();
        for (il, _, src, _) in &jobs {
            for l in [*il, *src] {
                if kv[l].is_none() {
                    kv[l] = Some(state.read_kv(l, 0..t)?);
                }
            }
        }
        let kv = &kv;
        let inputs = &out.layer_inputs;
        let (queries, rope, heads) = (&queries, &rope, &heads);
        // The layers' sums are independent: split them over the threads.
        let per_thread = jobs.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|scope| {
            for chunk in jobs.chunks_mut(per_thread) {
                scope.spawn(move || {
                    for (il, _, src, sums) in chunk.iter_mut() {
                        let (own, from) = (
                            kv[*il].as_ref().expect("read"),
                            kv[*src].as_ref().expect("read"),
                        );
                        match sums {
                            LayerFit::Keys(k) => {
                                for (x, y) in
                                    from.0.chunks_exact(kv_dim).zip(own.0.chunks_exact(kv_dim))
                                {
                                    k.add(heads, x, y);
                                }
                            }
                            LayerFit::Values(v) => match &queries[*il] {
                                Some(qw) => {
                                    let x = &inputs
                                        .iter()
                                        .find(|(l, _)| l == il)
                                        .expect("every layer's input is captured")
                                        .1;
                                    let q = project_queries(model, qw, x, t, rope);
                                    attention_sums(heads, &q, &own.0, &from.1, &own.1, t, v);
                                }
                                None => {
                                    let hd = heads.head_dim;
                                    for (x, y) in
                                        from.1.chunks_exact(kv_dim).zip(own.1.chunks_exact(kv_dim))
                                    {
                                        for g in 0..heads.n_head_kv {
                                            v.add(g, &x[g * hd..][..hd], &y[g * hd..][..hd]);
                                        }
                                    }
                                }
                            },
                        }
                    }
                });
            }
        });
        n_rows += t;
    }
    progress(texts.len());

    let mut out = Adapters {
        n_layers: c.n_layers,
        fitted: Vec::new(),
    };
    for half in [Half::Keys, Half::Values] {
        for (il, _, src, sums) in jobs.iter().filter(|j| j.1 == half) {
            let (role, adapted) = match half {
                Half::Keys => (LayerRole::AttnQ, LayerRole::AttnQAdapted),
                Half::Values => (LayerRole::AttnOutput, LayerRole::AttnOutputAdapted),
            };
            let id = model.weights.layers()[*il][role];
            let t = model.weights.tensor(id);
            let n = t.dims.iter().product::<u64>() as usize;
            let w =
                dequantize(t.ty, model.weight_bytes(id), n).map_err(|e| AdapterError::Weight {
                    name: t.name.clone(),
                    reason: e.to_string(),
                })?;
            let folded = match sums {
                LayerFit::Keys(k) => fold_query(&w, &heads, &k.solve()),
                LayerFit::Values(v) => fold_output(&w, &heads, &v.solve(opts.ridge)),
            };
            let pair = AdapterPair {
                half,
                layer: *il,
                source: *src,
            };
            let tensor = NewTensor {
                name: Role::Layer(*il, adapted).tensor_name(),
                dims: t.dims.clone(),
                ty: GgmlType::F32,
                data: folded.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            out.fitted.push((pair, tensor));
        }
    }
    Ok((out, n_rows))
}

/// RoPE angles per (position, pair) as ggml computes them without YaRN:
/// `pos * freq_scale * base^(-2p / rope_dim) / factor[p]`.
struct RopeTable {
    inv_freq: Vec<f64>,
    freq_scale: f64,
}

impl RopeTable {
    fn new(model: &Model) -> Result<Self, AdapterError> {
        let c = &model.config;
        let half = c.rope_dim / 2;
        let factors = match model.weights.rope_freqs() {
            Some(id) => {
                let t = model.weights.tensor(id);
                dequantize(t.ty, model.weight_bytes(id), half).map_err(|e| {
                    AdapterError::Weight {
                        name: t.name.clone(),
                        reason: e.to_string(),
                    }
                })?
            }
            None => vec![1.0; half],
        };
        let inv_freq = (0..half)
            .map(|p| {
                (c.rope_freq_base as f64).powf(-2.0 * p as f64 / c.rope_dim as f64)
                    / factors[p] as f64
            })
            .collect();
        Ok(RopeTable {
            inv_freq,
            freq_scale: c.rope_freq_scale as f64,
        })
    }
}

/// Layer queries from its input `x` (`[t][n_embd]`): norm, projection, bias, per-head
/// norm, RoPE at positions `0..t`, as `[t][n_head * head_dim]`.
fn project_queries(
    model: &Model,
    qw: &QueryWeights,
    x: &[f32],
    t: usize,
    rope: &RopeTable,
) -> Vec<f32> {
    let c = &model.config;
    let (e, hd) = (c.n_embd, c.head_dim);
    let qd = c.n_head * hd;
    let neox = c.arch.rope_neox();
    let mut q = vec![0f32; t * qd];
    let mut xn = vec![0f32; e];
    for pos in 0..t {
        let row = &x[pos * e..][..e];
        let ms = row.iter().map(|v| (v * v) as f64).sum::<f64>() / e as f64;
        let scale = 1.0 / (ms + c.rms_eps as f64).sqrt();
        for (i, v) in xn.iter_mut().enumerate() {
            *v = (row[i] as f64 * scale) as f32 * qw.attn_norm[i];
        }
        let out = &mut q[pos * qd..][..qd];
        for (o, w) in out.iter_mut().zip(qw.wq.chunks_exact(e)) {
            *o = w.iter().zip(&xn).map(|(a, b)| a * b).sum();
        }
        if let Some(b) = &qw.bias {
            out.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
        for head in out.chunks_exact_mut(hd) {
            if let Some(nw) = &qw.norm {
                let ms = head.iter().map(|v| (v * v) as f64).sum::<f64>() / hd as f64;
                let scale = 1.0 / (ms + c.rms_eps as f64).sqrt();
                head.iter_mut()
                    .zip(nw)
                    .for_each(|(v, w)| *v = (*v as f64 * scale) as f32 * w);
            }
            for (p, inv) in rope.inv_freq.iter().enumerate() {
                let theta = pos as f64 * rope.freq_scale * inv;
                let (sin, cos) = theta.sin_cos();
                let (d0, d1) = if neox {
                    (p, p + c.rope_dim / 2)
                } else {
                    (2 * p, 2 * p + 1)
                };
                let (a, b) = (head[d0] as f64, head[d1] as f64);
                head[d0] = (a * cos - b * sin) as f32;
                head[d1] = (a * sin + b * cos) as f32;
            }
        }
    }
    q
}

/// Adds one text's attention-weighted row pairs to `sums`: for every query head
/// and position, (`A V_src`, `A V_own`) with the causal softmax of `q . k_own`.
fn attention_sums(
    heads: &Heads,
    q: &[f32],
    k_own: &[f32],
    v_src: &[f32],
    v_own: &[f32],
    t: usize,
    sums: &mut ValueSums,
) {
    let hd = heads.head_dim;
    let kv_dim = heads.n_head_kv * hd;
    let qd = heads.n_head * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; t];
    let (mut u, mut o) = (vec![0f32; hd], vec![0f32; hd]);
    for h in 0..heads.n_head {
        let g = heads.group_of(h);
        for pos in 0..t {
            let qh = &q[pos * qd + h * hd..][..hd];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores[..=pos].iter_mut().enumerate() {
                let k = &k_own[j * kv_dim + g * hd..][..hd];
                *s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(*s);
            }
            let mut total = 0f32;
            for s in &mut scores[..=pos] {
                *s = (*s - max).exp();
                total += *s;
            }
            u.fill(0.0);
            o.fill(0.0);
            for (j, s) in scores[..=pos].iter().enumerate() {
                let p = s / total;
                let (vs, vo) = (
                    &v_src[j * kv_dim + g * hd..][..hd],
                    &v_own[j * kv_dim + g * hd..][..hd],
                );
                for d in 0..hd {
                    u[d] += p * vs[d];
                    o[d] += p * vo[d];
                }
            }
            sums.add(h, &u, &o);
        }
    }
}

/// The shape of attention the adapters fold into.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// RoPE pairs `(p, p + head_dim/2)` rather than `(2p, 2p + 1)`.
    pub neox: bool,
}

impl Heads {
    pub fn of(model: &Model) -> Self {
        let c = &model.config;
        Heads {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            neox: c.arch.rope_neox(),
        }
    }

    /// The KV group query head `h` reads (ggml's broadcast: consecutive heads).
    fn group_of(&self, h: usize) -> usize {
        h / (self.n_head / self.n_head_kv)
    }

    /// The two dimensions of frequency pair `p` within a head.
    fn pair(&self, p: usize) -> (usize, usize) {
        if self.neox {
            (p, p + self.head_dim / 2)
        } else {
            (2 * p, 2 * p + 1)
        }
    }
}

/// Least-squares sums for one layer's value map, per group: `X'X` and `X'Y` over
/// row pairs (`dst ~ src B`).
#[derive(Clone, Debug)]
struct ValueSums {
    hd: usize,
    gram: Vec<Vec<f64>>,
    cross: Vec<Vec<f64>>,
}

impl ValueSums {
    /// Sums for `n_maps` maps: one per KV group or one per query head.
    fn new(heads: &Heads, n_maps: usize) -> Self {
        let hd = heads.head_dim;
        ValueSums {
            hd,
            gram: vec![vec![0.0; hd * hd]; n_maps],
            cross: vec![vec![0.0; hd * hd]; n_maps],
        }
    }

    /// One row pair of map `g`.
    fn add(&mut self, g: usize, x: &[f32], y: &[f32]) {
        let hd = self.hd;
        let (gram, cross) = (&mut self.gram[g], &mut self.cross[g]);
        for a in 0..hd {
            let xa = x[a] as f64;
            for b in 0..hd {
                gram[a * hd + b] += xa * x[b] as f64;
                cross[a * hd + b] += xa * y[b] as f64;
            }
        }
    }

    /// `B_g` for every group; `ridge` is relative to the mean diagonal of `X'X`.
    fn solve(&self, ridge: f64) -> Vec<Vec<f64>> {
        let hd = self.hd;
        self.gram
            .iter()
            .zip(&self.cross)
            .map(|(gram, cross)| {
                let mut gram = gram.clone();
                let mean_diag = (0..hd).map(|a| gram[a * hd + a]).sum::<f64>() / hd as f64;
                for a in 0..hd {
                    gram[a * hd + a] += ridge * mean_diag.max(f64::MIN_POSITIVE);
                }
                solve_spd(&gram, cross, hd)
            })
            .collect()
    }
}

/// `B_g` for every group, row-major `[head_dim][head_dim]`: the ridge least-squares
/// map from `src`'s rows of group `g` to `dst`'s (`dst ~ src B`). `ridge` is relative
/// to the mean diagonal of `src`'s Gram matrix.
pub fn fit_values(
    src: &[f32],
    dst: &[f32],
    kv_dim: usize,
    heads: &Heads,
    ridge: f64,
) -> Vec<Vec<f64>> {
    let hd = heads.head_dim;
    let mut sums = ValueSums::new(heads, heads.n_head_kv);
    for (x, y) in src.chunks_exact(kv_dim).zip(dst.chunks_exact(kv_dim)) {
        for g in 0..heads.n_head_kv {
            sums.add(g, &x[g * hd..][..hd], &y[g * hd..][..hd]);
        }
    }
    sums.solve(ridge)
}

/// Least-squares sums of the complex key scales: per group, per pair,
/// `(re, im)` of `sum conj(a) b` and `sum |a|^2`.
#[derive(Clone, Debug)]
struct KeySums {
    sums: Vec<Vec<(f64, f64, f64)>>,
}

impl KeySums {
    fn new(heads: &Heads) -> Self {
        KeySums {
            sums: vec![vec![(0.0, 0.0, 0.0); heads.head_dim / 2]; heads.n_head_kv],
        }
    }

    /// One pair of cache rows (`kv_dim` each): `dst ~ c src`.
    fn add(&mut self, heads: &Heads, src: &[f32], dst: &[f32]) {
        let hd = heads.head_dim;
        for (g, pairs) in self.sums.iter_mut().enumerate() {
            for (p, (num_re, num_im, den)) in pairs.iter_mut().enumerate() {
                let (d0, d1) = heads.pair(p);
                let (ar, ai) = (src[g * hd + d0] as f64, src[g * hd + d1] as f64);
                let (br, bi) = (dst[g * hd + d0] as f64, dst[g * hd + d1] as f64);
                *num_re += ar * br + ai * bi;
                *num_im += ar * bi - ai * br;
                *den += ar * ar + ai * ai;
            }
        }
    }

    fn solve(&self) -> Vec<Vec<(f64, f64)>> {
        self.sums
            .iter()
            .map(|pairs| {
                pairs
                    .iter()
                    .map(|&(re, im, den)| {
                        if den > 0.0 {
                            (re / den, im / den)
                        } else {
                            (1.0, 0.0)
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// The complex scale `c` per (group, frequency pair), `[g][p] = (re, im)`, with
/// `dst ~ c src` in least squares.
pub fn fit_keys(src: &[f32], dst: &[f32], kv_dim: usize, heads: &Heads) -> Vec<Vec<(f64, f64)>> {
    let mut sums = KeySums::new(heads);
    for (x, y) in src.chunks_exact(kv_dim).zip(dst.chunks_exact(kv_dim)) {
        sums.add(heads, x, y);
    }
    sums.solve()
}

/// Folds the value maps into `attn_output` (ggml order: `n_embd` rows of
/// `n_head * head_dim`): `W'[r][h, a] = sum_b B[a][b] W[r][h, b]`, with `B` query
/// head `h`'s own map where `maps` has one per query head, else its group's.
pub fn fold_output(w: &[f32], heads: &Heads, maps: &[Vec<f64>]) -> Vec<f32> {
    let hd = heads.head_dim;
    let row_len = heads.n_head * hd;
    let mut out = vec![0f32; w.len()];
    for (row, new) in w.chunks_exact(row_len).zip(out.chunks_exact_mut(row_len)) {
        for h in 0..heads.n_head {
            let b = if maps.len() == heads.n_head {
                &maps[h]
            } else {
                &maps[heads.group_of(h)]
            };
            let old = &row[h * hd..][..hd];
            for a in 0..hd {
                let s: f64 = (0..hd).map(|j| b[a * hd + j] * old[j] as f64).sum();
                new[h * hd + a] = s as f32;
            }
        }
    }
    out
}

/// Folds the key scales into `attn_q`'s rows (ggml order: `n_head * head_dim` rows
/// of `n_embd`) or its bias (rows of length 1): each query pair becomes
/// `conj(c) q`.
pub fn fold_query(w: &[f32], heads: &Heads, scales: &[Vec<(f64, f64)>]) -> Vec<f32> {
    let hd = heads.head_dim;
    let row_len = w.len() / (heads.n_head * hd);
    let mut out = w.to_vec();
    for h in 0..heads.n_head {
        for (p, &(cr, ci)) in scales[heads.group_of(h)].iter().enumerate() {
            let (d0, d1) = heads.pair(p);
            let (r0, r1) = ((h * hd + d0) * row_len, (h * hd + d1) * row_len);
            for e in 0..row_len {
                let (x, y) = (w[r0 + e] as f64, w[r1 + e] as f64);
                out[r0 + e] = (cr * x + ci * y) as f32;
                out[r1 + e] = (cr * y - ci * x) as f32;
            }
        }
    }
    out
}

/// Solves `A X = B` for symmetric positive definite `A` (`n x n`) and `B` (`n x n`),
/// by Cholesky, all row-major.
fn solve_spd(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = a[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            l[i * n + j] = if i == j {
                s.max(f64::MIN_POSITIVE).sqrt()
            } else {
                s / l[j * n + j]
            };
        }
    }
    let mut x = b.to_vec();
    for col in 0..n {
        for i in 0..n {
            let s: f64 = (0..i).map(|k| l[i * n + k] * x[k * n + col]).sum();
            x[i * n + col] = (x[i * n + col] - s) / l[i * n + i];
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k * n + col]).sum();
            x[i * n + col] = (x[i * n + col] - s) / l[i * n + i];
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads() -> Heads {
        Heads {
            n_head: 4,
            n_head_kv: 2,
            head_dim: 4,
            neox: false,
        }
    }

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn value_fit_recovers_a_planted_map_and_folds_like_applying_it() {
        let h = heads();
        let kv_dim = h.n_head_kv * h.head_dim;
        let src = noise(200 * kv_dim, 1);
        let planted: Vec<Vec<f64>> = (0..2)
            .map(|g| noise(16, 10 + g).iter().map(|&x| x as f64).collect())
            .collect();
        let mut dst = vec![0f32; src.len()];
        for r in 0..200 {
            for g in 0..2 {
                for b in 0..4 {
                    dst[r * kv_dim + g * 4 + b] = (0..4)
                        .map(|a| src[r * kv_dim + g * 4 + a] as f64 * planted[g][a * 4 + b])
                        .sum::<f64>() as f32;
                }
            }
        }
        let fit = fit_values(&src, &dst, kv_dim, &h, 0.0);
        for (f, p) in fit.iter().zip(&planted) {
            for (x, y) in f.iter().zip(p) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
        // attn_output applied to (o B) equals the folded one applied to o, with a
        // map per group (the rows fit) and a map per query head (the attention fit).
        let per_head: Vec<Vec<f64>> = (0..4)
            .map(|hh| noise(16, 20 + hh).iter().map(|&x| x as f64).collect())
            .collect();
        let w = noise(3 * 16, 7);
        let o = noise(16, 8);
        for (maps, map_of) in [
            (&fit, (|hh| hh / 2) as fn(usize) -> usize),
            (&per_head, |hh| hh),
        ] {
            let folded = fold_output(&w, &h, maps);
            for r in 0..3 {
                let mut mapped = [0f64; 16];
                for hh in 0..4 {
                    for b in 0..4 {
                        mapped[hh * 4 + b] = (0..4)
                            .map(|a| o[hh * 4 + a] as f64 * maps[map_of(hh)][a * 4 + b])
                            .sum();
                    }
                }
                let plain: f64 = (0..16).map(|c| w[r * 16 + c] as f64 * mapped[c]).sum();
                let fold: f64 = (0..16)
                    .map(|c| folded[r * 16 + c] as f64 * o[c] as f64)
                    .sum();
                assert!((plain - fold).abs() < 1e-4, "{plain} vs {fold}");
            }
        }
    }

    #[test]
    fn key_scales_recover_a_planted_rotation_and_fold_into_the_scores() {
        for neox in [false, true] {
            let h = Heads { neox, ..heads() };
            let kv_dim = h.n_head_kv * h.head_dim;
            let src = noise(100 * kv_dim, 3);
            let c = [(0.8f64, 0.3f64), (1.2, -0.5)];
            let mut dst = src.clone();
            for r in 0..100 {
                for g in 0..2 {
                    for (p, &(cr, ci)) in c.iter().enumerate() {
                        let (d0, d1) = h.pair(p);
                        let (x, y) = (
                            src[r * kv_dim + g * 4 + d0] as f64,
                            src[r * kv_dim + g * 4 + d1] as f64,
                        );
                        dst[r * kv_dim + g * 4 + d0] = (cr * x - ci * y) as f32;
                        dst[r * kv_dim + g * 4 + d1] = (cr * y + ci * x) as f32;
                    }
                }
            }
            let fit = fit_keys(&src, &dst, kv_dim, &h);
            for group in &fit {
                for (got, want) in group.iter().zip(&c) {
                    assert!((got.0 - want.0).abs() < 1e-5);
                    assert!((got.1 - want.1).abs() < 1e-5);
                }
            }
            // q_folded . k_src == q . k_dst for head 0 (group 0), row 0, with
            // q = W x: fold a weight matrix of 16 rows of length 3.
            let w = noise(16 * 3, 9);
            let x = noise(3, 11);
            let folded = fold_query(&w, &h, &fit);
            let q = |m: &[f32], d: usize| -> f64 {
                (0..3).map(|e| m[d * 3 + e] as f64 * x[e] as f64).sum()
            };
            let plain: f64 = (0..4).map(|d| q(&w, d) * dst[d] as f64).sum();
            let fold: f64 = (0..4).map(|d| q(&folded, d) * src[d] as f64).sum();
            assert!((plain - fold).abs() < 1e-5, "{plain} vs {fold}");
        }
    }
}
