//! Tiny random Llama models as GGUF files, laid out and described exactly as
//! llama.cpp's converter writes a real one, so the runtime loads them through the
//! same code path as SmolLM2. The weights handed back are dequantized from the very
//! bytes written, so the reference computes with the same rounded numbers as ggml.

use std::path::Path;

use kvsharer::backend::ggml::{dequantize, quantize};
use kvsharer::gguf::{Array, GgmlType, GgufBuilder, Value};
use kvsharer::model::Arch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Shape and numerics of a tiny model.
#[derive(Clone, Debug, PartialEq)]
pub struct TinySpec {
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    /// Type of every matrix, token embedding included; norm vectors stay F32 as in
    /// every llama.cpp model.
    pub weight_type: GgmlType,
    pub seed: u64,
    /// No `output.weight`: logits use the token embedding, as SmolLM2 does.
    pub tied_output: bool,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// The variant written: `qwen2` adds Q/K/V biases, `qwen3` per-head Q/K norms;
    /// both use NEOX RoPE.
    pub arch: Arch,
    /// `tokenizer.*` metadata to write instead of the tiny byte-level vocabulary
    /// (a real vocabulary); `n_vocab` must equal its token count.
    pub tokenizer: Option<Vec<(String, Value)>>,
    /// `rope_freqs.weight` (Llama 3.1's per-dimension RoPE divisors, head_dim/2).
    pub rope_freqs: Option<Vec<f32>>,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            n_layers: 3,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_vocab: 96,
            n_ctx_train: 256,
            weight_type: GgmlType::F32,
            seed: 0x5eed_0001,
            tied_output: false,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            arch: Arch::Llama,
            tokenizer: None,
            rope_freqs: None,
        }
    }
}

impl TinySpec {
    /// A spec whose rows fit `ty`'s block size: the 32-element types keep the small
    /// default; k-quants, i-quants, ternary and other wide-block types get rows of
    /// 256 (n_embd 256, n_ff 512, head_dim 64 with 4 query / 2 KV heads).
    pub fn for_type(ty: GgmlType) -> Self {
        let base = TinySpec {
            weight_type: ty,
            ..TinySpec::default()
        };
        if ty.block_size() <= 32 {
            base
        } else {
            TinySpec {
                n_embd: 256,
                n_ff: 512,
                n_head: 4,
                n_head_kv: 2,
                ..base
            }
        }
    }

    /// Four layers of f16 weights with head_dim 64: the CPU decode kernel's size,
    /// and whole q4_0/q8_0 blocks per head, for KV plan and sequence tests.
    pub fn four_layers_head_dim_64() -> Self {
        TinySpec {
            n_layers: 4,
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 256,
            weight_type: GgmlType::F16,
            ..TinySpec::default()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Width of one layer's K (or V) for one position: all KV heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim()
    }

    /// Query heads per KV head (GQA group size).
    pub fn group_size(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    fn validate(&self) -> Result<(), String> {
        let fail = |what: &str| Err(format!("tiny model spec: {what}: {self:?}"));
        if self.n_layers == 0 || self.n_embd == 0 || self.n_head == 0 || self.n_head_kv == 0 {
            return fail("zero-sized dimension");
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return fail("n_embd is not a multiple of n_head");
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return fail("n_head is not a multiple of n_head_kv");
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail("head_dim is odd, RoPE rotates pairs");
        }
        if self.n_vocab < 4 {
            return fail("n_vocab < 4 leaves no room for ordinary tokens besides BOS/EOS");
        }
        Ok(())
    }
}

/// A row-major matrix: `rows` rows of `cols` values. A GGUF weight with ggml dims
/// `[in, out]` is `out` rows of `in` values, so `rows = out`, `cols = in`.
#[derive(Clone, Debug, PartialEq)]
pub struct RefMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl RefMatrix {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// `y = W x`, `y[o] = sum_i W[o][i] x[i]`, accumulated in f64 so the reference is
    /// more accurate than what it checks.
    pub fn matvec(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.cols, "matvec: input length vs matrix columns");
        (0..self.rows)
            .map(|r| {
                self.row(r)
                    .iter()
                    .zip(x)
                    .map(|(&w, &xi)| w as f64 * xi as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// ggml dims of this matrix as stored: `[cols, rows]`.
    pub fn ggml_dims(&self) -> [u64; 2] {
        [self.cols as u64, self.rows as u64]
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RefLayer {
    pub attn_norm: Vec<f32>,
    /// `[n_head*hd rows][n_embd]`
    pub wq: RefMatrix,
    /// `[n_head_kv*hd rows][n_embd]`
    pub wk: RefMatrix,
    pub wv: RefMatrix,
    /// `[n_embd rows][n_head*hd]`
    pub wo: RefMatrix,
    pub ffn_norm: Vec<f32>,
    /// `[n_ff rows][n_embd]`
    pub gate: RefMatrix,
    pub up: RefMatrix,
    /// `[n_embd rows][n_ff]`
    pub down: RefMatrix,
    /// Q, K, V biases (`qwen2`).
    pub biases: Option<[Vec<f32>; 3]>,
    /// Per-head Q and K RMS norm weights (`qwen3`).
    pub qk_norm: Option<[Vec<f32>; 2]>,
}

/// Every tensor of a tiny model as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct RefWeights {
    /// `[n_vocab rows][n_embd]`
    pub token_embd: RefMatrix,
    pub layers: Vec<RefLayer>,
    pub output_norm: Vec<f32>,
    /// `[n_vocab rows][n_embd]`; `None` when the output is tied to `token_embd`.
    pub output: Option<RefMatrix>,
}

impl RefWeights {
    /// The matrix that produces logits: `output`, or the token embedding when tied.
    pub fn output_matrix(&self) -> &RefMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}

/// Standard normal samples by Box-Muller (rand 0.9 ships no distributions).
struct Normal {
    rng: StdRng,
}

impl Normal {
    fn sample(&mut self) -> f32 {
        // 1 - [0,1) keeps u1 away from 0, where ln would be infinite.
        let u1 = 1.0 - self.rng.random::<f64>();
        let u2 = self.rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    fn matrix(&mut self, rows: usize, cols: usize, std: f32) -> RefMatrix {
        RefMatrix {
            rows,
            cols,
            data: (0..rows * cols).map(|_| self.sample() * std).collect(),
        }
    }

    /// RMSNorm gains near 1, so every channel matters but none dominates.
    /// Biases of the size real Qwen2 ones have relative to their projections.
    fn bias(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 0.2 * self.sample()).collect()
    }

    fn norm(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| 1.0 + 0.1 * (2.0 * self.rng.random::<f32>() - 1.0))
            .collect()
    }
}

const TOKEN_EMBD_STD: f32 = 0.3;

/// The random f32 weights of `spec`, before any quantization. Matrices are scaled
/// by `1/sqrt(fan_in)` so activations stay O(1) through the layers.
pub fn random_weights(spec: &TinySpec) -> RefWeights {
    let mut g = Normal {
        rng: StdRng::seed_from_u64(spec.seed),
    };
    let (e, hd, ff) = (spec.n_embd, spec.head_dim(), spec.n_ff);
    let fan = |n: usize| 1.0 / (n as f32).sqrt();
    // Rows are RMS-normed before use, so their scale only matters for tied logits:
    // 0.3 keeps those O(1..10) rather than a one-hot softmax.
    let token_embd = g.matrix(spec.n_vocab, e, TOKEN_EMBD_STD);
    let layers = (0..spec.n_layers)
        .map(|_| RefLayer {
            attn_norm: g.norm(e),
            wq: g.matrix(spec.n_head * hd, e, fan(e)),
            wk: g.matrix(spec.n_head_kv * hd, e, fan(e)),
            wv: g.matrix(spec.n_head_kv * hd, e, fan(e)),
            wo: g.matrix(e, spec.n_head * hd, fan(spec.n_head * hd)),
            ffn_norm: g.norm(e),
            gate: g.matrix(ff, e, fan(e)),
            up: g.matrix(ff, e, fan(e)),
            down: g.matrix(e, ff, fan(ff)),
            biases: spec.arch.qkv_bias().then(|| {
                let q = spec.n_head * hd;
                let kv = spec.n_head_kv * hd;
                [g.bias(q), g.bias(kv), g.bias(kv)]
            }),
            qk_norm: spec.arch.qk_norm().then(|| [g.norm(hd), g.norm(hd)]),
        })
        .collect();
    let output_norm = g.norm(e);
    let output = (!spec.tied_output).then(|| g.matrix(spec.n_vocab, e, fan(e)));
    RefWeights {
        token_embd,
        layers,
        output_norm,
        output,
    }
}

/// GPT-2's reversible byte -> printable char table: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100 upward in byte order (space -> 'Ġ').
pub fn byte_to_unicode(b: u8) -> char {
    let printable = |c: u8| matches!(c, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b)
    } else {
        let rank = (0..b).filter(|&c| !printable(c)).count() as u32;
        char::from_u32(256 + rank).expect("U+0100..U+0143 are valid chars")
    }
}

/// A tiny gpt2-style (byte-level BPE) vocabulary.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyVocab {
    pub tokens: Vec<String>,
    /// llama.cpp token types: 1 normal, 3 control.
    pub token_types: Vec<i32>,
    /// "left right" pairs; each merged token above 256 has exactly one merge.
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
}

/// Byte tokens first, then two-byte merged tokens, then `<|bos|>` and `<|eos|>` as
/// the last two ids (control tokens, as converters mark them). With at least 258
/// ids, ids 0..256 are the 256 bytes in byte order; with fewer, the byte tokens are
/// the first `n_vocab - 2` bytes starting at space in printable-first order.
pub fn tiny_vocab(n_vocab: usize) -> TinyVocab {
    assert!(n_vocab >= 4, "tiny_vocab: n_vocab {n_vocab} < 4");
    let n_plain = n_vocab - 2;
    let byte_order: Vec<u8> = if n_plain >= 256 {
        (0..=255).collect()
    } else {
        // Space, the printable ASCII, then everything else.
        let mut order: Vec<u8> = (0x20..=0x7E).collect();
        order.extend((0..=255u8).filter(|b| !(0x20..=0x7E).contains(b)));
        order.truncate(n_plain);
        order
    };
    let mut tokens: Vec<String> = byte_order
        .iter()
        .map(|&b| byte_to_unicode(b).to_string())
        .collect();
    let mut merges = Vec::new();
    if n_plain > 256 {
        // Pairs over letters and space first, so merged tokens look like text.
        let mut alphabet: Vec<u8> = (b'a'..=b'z').collect();
        alphabet.push(b' ');
        alphabet.extend((0..=255u8).filter(|b| !b.is_ascii_lowercase() && *b != b' '));
        let pairs = alphabet
            .iter()
            .flat_map(|&l| alphabet.iter().map(move |&r| (l, r)));
        for (l, r) in pairs.take(n_plain - 256) {
            let (l, r) = (byte_to_unicode(l), byte_to_unicode(r));
            tokens.push(format!("{l}{r}"));
            merges.push(format!("{l} {r}"));
        }
    }
    let mut token_types = vec![1; tokens.len()];
    tokens.push("<|bos|>".into());
    tokens.push("<|eos|>".into());
    token_types.extend([3, 3]);
    TinyVocab {
        tokens,
        token_types,
        merges,
        bos: (n_vocab - 2) as u32,
        eos: (n_vocab - 1) as u32,
    }
}

/// `general.file_type` (llama.cpp's `llama_ftype`) for a model whose matrices are
/// all `ty`; `None` for types no ftype describes.
pub fn llama_ftype(ty: GgmlType) -> Option<u32> {
    use GgmlType::*;
    Some(match ty {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q8_0 => 7,
        Q5_0 => 8,
        Q5_1 => 9,
        Q2_K => 10,
        Q3_K => 12,
        Q4_K => 15,
        Q5_K => 17,
        Q6_K => 18,
        IQ4_NL => 25,
        IQ4_XS => 30,
        BF16 => 32,
        TQ1_0 => 36,
        TQ2_0 => 37,
        MXFP4 => 38,
        NVFP4 => 39,
        Q1_0 => 40,
        Q2_0 => 41,
        _ => return None,
    })
}

/// Writes a random tiny model for `spec` to `path` and returns the weights exactly as
/// stored (dequantized). Panics with the reason if the type cannot be written.
pub fn write_tiny_model(spec: &TinySpec, path: &Path) -> RefWeights {
    try_write_tiny_model(spec, path)
        .unwrap_or_else(|e| panic!("write_tiny_model({}): {e}", path.display()))
}

/// As [`write_tiny_model`], reporting failure (e.g. a type ggml cannot quantize
/// without an importance matrix) instead of panicking.
pub fn try_write_tiny_model(spec: &TinySpec, path: &Path) -> Result<RefWeights, String> {
    write_weights(spec, &random_weights(spec), path)
}

/// A planted structure for sharing searches: random weights for `spec`, except that
/// the layers in `harmless` have a zero attention output projection, so sharing their
/// KV cache with any other layer changes nothing.
pub fn write_planted_model(spec: &TinySpec, harmless: &[usize], path: &Path) {
    let mut w = random_weights(spec);
    for &l in harmless {
        w.layers[l].wo.data.iter_mut().for_each(|x| *x = 0.0);
    }
    write_weights(spec, &w, path).unwrap();
}

/// Quantizes `weights` (f32, shaped for `spec`) to `spec.weight_type`, writes the
/// GGUF model to `path` and returns the weights dequantized from the written bytes.
pub fn write_weights(
    spec: &TinySpec,
    weights: &RefWeights,
    path: &Path,
) -> Result<RefWeights, String> {
    spec.validate()?;
    if weights.layers.len() != spec.n_layers {
        return Err(format!(
            "weights have {} layers, spec {}",
            weights.layers.len(),
            spec.n_layers
        ));
    }
    if weights.output.is_none() != spec.tied_output {
        return Err("weights' output matrix disagrees with spec.tied_output".into());
    }
    let ty = spec.weight_type;
    let mut gguf = GgufBuilder::new();
    write_metadata(spec, &mut gguf);

    let mut add_matrix = |name: &str, m: &RefMatrix, rows: usize, cols: usize| {
        if (m.rows, m.cols) != (rows, cols) {
            return Err(format!(
                "{name}: weights are {}x{}, spec wants {rows}x{cols}",
                m.rows, m.cols
            ));
        }
        let bytes = quantize(ty, &m.data, m.cols)
            .map_err(|e| format!("{name}: quantize to {}: {e}", ty.name()))?;
        let data = dequantize(ty, &bytes, m.data.len())
            .map_err(|e| format!("{name}: dequantize {}: {e}", ty.name()))?;
        gguf.add_tensor(name, &m.ggml_dims(), ty, bytes)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(RefMatrix { data, ..m.clone() })
    };
    let (e, q_dim, kv_dim, ff, vocab) = (
        spec.n_embd,
        spec.n_head * spec.head_dim(),
        spec.kv_dim(),
        spec.n_ff,
        spec.n_vocab,
    );

    let token_embd = add_matrix("token_embd.weight", &weights.token_embd, vocab, e)?;
    let mut layers = Vec::with_capacity(spec.n_layers);
    for (i, l) in weights.layers.iter().enumerate() {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        layers.push(RefLayer {
            attn_norm: l.attn_norm.clone(),
            wq: add_matrix(&n("attn_q"), &l.wq, q_dim, e)?,
            wk: add_matrix(&n("attn_k"), &l.wk, kv_dim, e)?,
            wv: add_matrix(&n("attn_v"), &l.wv, kv_dim, e)?,
            wo: add_matrix(&n("attn_output"), &l.wo, e, q_dim)?,
            ffn_norm: l.ffn_norm.clone(),
            gate: add_matrix(&n("ffn_gate"), &l.gate, ff, e)?,
            up: add_matrix(&n("ffn_up"), &l.up, ff, e)?,
            down: add_matrix(&n("ffn_down"), &l.down, e, ff)?,
            biases: l.biases.clone(),
            qk_norm: l.qk_norm.clone(),
        });
    }
    let output = match &weights.output {
        Some(m) => Some(add_matrix("output.weight", m, vocab, e)?),
        None => None,
    };

    // Vectors (norms, biases, RoPE factors) are f32, as llama.cpp's converter
    // writes 1-D tensors; a norm's length must be n_embd.
    let mut add_vector = |name: String, v: &[f32], len: Option<usize>| {
        if let Some(len) = len.filter(|&l| l != v.len()) {
            return Err(format!("{name}: {} values, expected {len}", v.len()));
        }
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        gguf.add_tensor(&name, &[v.len() as u64], GgmlType::F32, bytes)
            .map_err(|err| format!("{name}: {err}"))
    };
    for (i, l) in weights.layers.iter().enumerate() {
        add_vector(format!("blk.{i}.attn_norm.weight"), &l.attn_norm, Some(e))?;
        add_vector(format!("blk.{i}.ffn_norm.weight"), &l.ffn_norm, Some(e))?;
    }
    add_vector("output_norm.weight".into(), &weights.output_norm, Some(e))?;
    if let Some(f) = &spec.rope_freqs {
        add_vector("rope_freqs.weight".into(), f, None)?;
    }
    for (i, l) in weights.layers.iter().enumerate() {
        if let Some([bq, bk, bv]) = &l.biases {
            add_vector(format!("blk.{i}.attn_q.bias"), bq, None)?;
            add_vector(format!("blk.{i}.attn_k.bias"), bk, None)?;
            add_vector(format!("blk.{i}.attn_v.bias"), bv, None)?;
        }
        if let Some([qn, kn]) = &l.qk_norm {
            add_vector(format!("blk.{i}.attn_q_norm.weight"), qn, None)?;
            add_vector(format!("blk.{i}.attn_k_norm.weight"), kn, None)?;
        }
    }

    gguf.write_to(path)
        .map_err(|err| format!("writing {}: {err}", path.display()))?;
    Ok(RefWeights {
        token_embd,
        layers,
        output_norm: weights.output_norm.clone(),
        output,
    })
}

fn write_metadata(spec: &TinySpec, gguf: &mut GgufBuilder) {
    let u32_of = |n: usize| Value::U32(n as u32);
    let ty = spec.weight_type;
    let arch = spec.arch.name();
    gguf.set("general.architecture", Value::String(arch.into()));
    gguf.set(
        "general.name",
        Value::String(format!("kvsharer tiny {arch} {}", ty.name())),
    );
    if let Some(ftype) = llama_ftype(ty) {
        gguf.set("general.file_type", Value::U32(ftype));
    }
    gguf.set("general.quantization_version", Value::U32(2));
    gguf.set(&format!("{arch}.block_count"), u32_of(spec.n_layers));
    gguf.set(&format!("{arch}.context_length"), u32_of(spec.n_ctx_train));
    gguf.set(&format!("{arch}.embedding_length"), u32_of(spec.n_embd));
    gguf.set(&format!("{arch}.feed_forward_length"), u32_of(spec.n_ff));
    gguf.set(&format!("{arch}.attention.head_count"), u32_of(spec.n_head));
    gguf.set(
        &format!("{arch}.attention.head_count_kv"),
        u32_of(spec.n_head_kv),
    );
    gguf.set(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(spec.rms_eps),
    );
    gguf.set(
        &format!("{arch}.rope.freq_base"),
        Value::F32(spec.rope_base),
    );
    gguf.set(
        &format!("{arch}.rope.dimension_count"),
        u32_of(spec.head_dim()),
    );
    gguf.set(&format!("{arch}.vocab_size"), u32_of(spec.n_vocab));

    if let Some(keys) = &spec.tokenizer {
        for (k, v) in keys {
            gguf.set(k, v.clone());
        }
        return;
    }
    let vocab = tiny_vocab(spec.n_vocab);
    gguf.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    gguf.set("tokenizer.ggml.pre", Value::String("default".into()));
    gguf.set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(vocab.tokens)),
    );
    gguf.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vocab.token_types)),
    );
    gguf.set(
        "tokenizer.ggml.merges",
        Value::Array(Array::String(vocab.merges)),
    );
    gguf.set("tokenizer.ggml.bos_token_id", Value::U32(vocab.bos));
    gguf.set("tokenizer.ggml.eos_token_id", Value::U32(vocab.eos));
}
