//! Attention of one new token over a quantized KV cache (decoding), on the CPU.
//!
//! Why not ggml's flash attention here: for a q8_0/q4_0 cache, ggml's CPU kernel
//! walks the cache one key at a time for every query head, dequantizing each value
//! row once per head and rescaling its running sum at every key; unlike its f16
//! path it has no split over the cache, so 9 query heads are shared by 2 threads
//! unevenly. At depth 4096 that attention is about two thirds of a decode step on
//! the default model. Here the query heads of one GQA group are handled together:
//! every cached key and value row is dequantized once per group (into an f32
//! scratch, with SIMD: `avx2.rs`), scores of a block of cells are computed eight
//! keys at a time and folded into an online softmax, and the cache is split into
//! chunks so every thread gets the same amount of work. Where the CPU lacks
//! AVX2/FMA/F16C, or the shape is unusual, [`supports`] says no and the graph keeps
//! ggml's kernel. An all-f16 cache also keeps ggml's kernel, which has a split path
//! of its own and keeps logits bit-identical to llama.cpp's; f16 slots in a plan
//! that mixes types come here, read in f32 as every other slot is.
//!
//! ggml custom ops have no barrier, so the work is two ops: [`partials`] computes,
//! for one (KV head, cache chunk), each query head's largest score, sum of
//! exponentials and unnormalized sum of weighted values; [`reduce`] merges the
//! chunks of one query head. `backend::ggml` wires both into the graph.

use crate::gguf::GgmlType;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Query heads per KV head the kernel handles (Llama-family models use up to 8).
pub const MAX_GROUP: usize = 8;

/// The f16 bit pattern of -inf, as the graph writes masked cells.
const NEG_INF_F16: u16 = 0xFC00;

/// Cache types this kernel reads. (An all-f16 cache keeps ggml's kernel: the
/// graph asks for this one over f16 cells only in plans that mix types.)
pub const DECODE_CACHE_TYPES: [GgmlType; 7] = [
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q5_1,
    GgmlType::Q5_0,
    GgmlType::Q4_1,
    GgmlType::IQ4_NL,
    GgmlType::Q4_0,
];

/// Chunks the cache is split into per KV head: enough for 8 threads to share 3 KV
/// heads evenly, few enough that the merge costs nothing.
pub const CACHE_CHUNKS: usize = 8;

/// Floats per query head in the partials tensor: max score, sum, then `head_dim` values.
pub fn partial_len(head_dim: usize) -> usize {
    head_dim + 2
}

/// One cache slot as stored: row `t` (cache cell `t`) holds every KV head's vector;
/// KV head `h` starts `h * head_bytes` into it.
pub struct CacheRows<'a> {
    pub data: &'a [u8],
    pub ty: GgmlType,
    pub row_bytes: usize,
    pub head_bytes: usize,
}

/// Shapes shared by both ops.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub head_dim: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Cache cells the mask covers (padded; masked cells are skipped).
    pub n_kv: usize,
    pub n_chunks: usize,
    pub scale: f32,
}

impl Geometry {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    pub fn n_tasks(&self) -> usize {
        self.n_head_kv * self.n_chunks
    }

    /// Cells `[start, end)` of chunk `c`.
    pub(crate) fn chunk(&self, c: usize) -> (usize, usize) {
        let len = self.n_kv.div_ceil(self.n_chunks);
        ((c * len).min(self.n_kv), ((c + 1) * len).min(self.n_kv))
    }

    /// Where task `task`'s output starts in the partials tensor
    /// (`[n_chunks][n_head][partial_len]`) and how long it is.
    pub fn task_region(&self, task: usize) -> (usize, usize) {
        let (kv_head, chunk) = (task % self.n_head_kv, task / self.n_head_kv);
        let p = partial_len(self.head_dim);
        (
            (chunk * self.n_head + kv_head * self.group()) * p,
            self.group() * p,
        )
    }
}

/// Whether the kernel runs for this cache and model shape on this CPU; where it
/// does not, the graph uses ggml's flash attention.
pub fn supports(
    ty_k: GgmlType,
    ty_v: GgmlType,
    head_dim: usize,
    n_head: usize,
    n_head_kv: usize,
) -> bool {
    DECODE_CACHE_TYPES.contains(&ty_k)
        && DECODE_CACHE_TYPES.contains(&ty_v)
        && matches!(head_dim, 64 | 128)
        && n_head_kv > 0
        && n_head.is_multiple_of(n_head_kv)
        && n_head / n_head_kv <= MAX_GROUP
        && simd_available()
}

#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    avx2::available()
}

#[cfg(not(target_arch = "x86_64"))]
fn simd_available() -> bool {
    false
}

/// Task `task` = (KV head `task % n_head_kv`, chunk `task / n_head_kv`): writes, for
/// each query head of the group, `[max score, sum of exp, Σ exp(score - max) · v]`
/// into `out` (the task's region, see [`Geometry::task_region`]).
/// `q` is `[n_head][head_dim]`; `mask` holds one f16 bit pattern per cell.
/// Only for shapes [`supports`] accepts.
pub fn partials(
    geo: &Geometry,
    q: &[f32],
    k: &CacheRows<'_>,
    v: &CacheRows<'_>,
    mask: &[u16],
    task: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    avx2::partials(geo, q, k, v, mask, task, out);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("decode attention has no kernel for this CPU; supports() said no");
}

/// Merges the chunks of query heads `heads` (partials `[n_chunks][n_head][p]`) into
/// `out` (`[heads.len()][head_dim]`).
pub fn reduce(geo: &Geometry, partials: &[f32], heads: std::ops::Range<usize>, out: &mut [f32]) {
    let (hd, p) = (geo.head_dim, partial_len(geo.head_dim));
    for (head, o) in heads.zip(out.chunks_exact_mut(hd)) {
        let part = |c: usize| &partials[(c * geo.n_head + head) * p..][..p];
        let max = (0..geo.n_chunks)
            .map(|c| part(c)[0])
            .fold(f32::NEG_INFINITY, f32::max);
        o.fill(0.0);
        if max == f32::NEG_INFINITY {
            continue; // no visible cell (cannot happen for a real query)
        }
        let mut sum = 0.0f32;
        for c in 0..geo.n_chunks {
            let pc = part(c);
            if pc[0] == f32::NEG_INFINITY {
                continue;
            }
            let w = (pc[0] - max).exp();
            sum += pc[1] * w;
            axpy(o, w, &pc[2..]);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let (yc, xc) = (y.chunks_exact_mut(16), x.chunks_exact(16));
    for (y, x) in yc.zip(xc) {
        let y: &mut [f32; 16] = y.try_into().expect("chunk of 16");
        let x: &[f32; 16] = x.try_into().expect("chunk of 16");
        for i in 0..16 {
            y[i] += a * x[i];
        }
    }
    let n = y.len() / 16 * 16;
    for (y, x) in y[n..].iter_mut().zip(&x[n..]) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ggml::ffi::{dequantize, quantize};
    use half::f16;

    /// Plain f64 softmax attention for one query head over f32 rows; `bias[t]` is
    /// the mask value (`None` = masked).
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        bias: &[Option<f32>],
        scale: f32,
    ) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .iter()
            .zip(bias)
            .map(|(k, b)| match b {
                Some(b) => {
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                        + *b as f64
                }
                None => f64::NEG_INFINITY,
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        let mut out = vec![0.0f64; q.len()];
        for (wi, v) in w.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += wi / sum * *x as f64;
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Rows `0..n_kv` of KV head `head`, dequantized by ggml (the oracle).
    fn head_rows(c: &CacheRows, n_kv: usize, head: usize, hd: usize) -> Vec<Vec<f32>> {
        (0..n_kv)
            .map(|t| {
                let at = t * c.row_bytes + head * c.head_bytes;
                dequantize(c.ty, &c.data[at..at + c.head_bytes], hd).unwrap()
            })
            .collect()
    }

    /// Both ops together against the f64 reference over ggml's dequantization of
    /// the same cache: only f32 rounding and the polynomial exp (relative 2e-7)
    /// separate them; tolerance 1e-4 absolute on outputs of magnitude ~1.
    /// Masks have padding, evicted holes (as a window leaves) and finite biases.
    #[test]
    fn grouped_decode_attention_matches_f64_reference() {
        if !supports(GgmlType::Q8_0, GgmlType::Q8_0, 64, 9, 3) {
            eprintln!("skipped: this CPU lacks AVX2/FMA/F16C, so the graph uses ggml's kernel");
            return;
        }
        let cases = [
            // (n_kv, visible_upto, n_head, n_head_kv, head_dim)
            (256, 200, 9, 3, 64),
            (37, 37, 4, 2, 64),
            (512, 1, 8, 8, 64),
            (300, 290, 8, 1, 128),
            (4352, 4100, 9, 3, 64),
        ];
        for ty in DECODE_CACHE_TYPES {
            for (n_kv, visible_upto, n_head, n_head_kv, hd) in cases {
                assert!(supports(ty, ty, hd, n_head, n_head_kv));
                let row_elems = hd * n_head_kv;
                let raw = pseudo_random(n_kv * row_elems, 7 + n_kv as u64);
                let kq = quantize(ty, &raw, row_elems).unwrap();
                let vq = quantize(ty, &pseudo_random(n_kv * row_elems, 99), row_elems).unwrap();
                let row_bytes = kq.len() / n_kv;
                let rows = |data| CacheRows {
                    data,
                    ty,
                    row_bytes,
                    head_bytes: row_bytes / n_head_kv,
                };
                let (k, v) = (rows(&kq), rows(&vq));
                let q = pseudo_random(n_head * hd, 3);
                let bias: Vec<Option<f32>> = (0..n_kv)
                    .map(|t| match t {
                        t if t >= visible_upto => None,
                        t if t > 0 && t % 11 == 4 => None,
                        t if t % 5 == 2 => Some(-0.75),
                        _ => Some(0.0),
                    })
                    .collect();
                let mask: Vec<u16> = bias
                    .iter()
                    .map(|b| b.map_or(NEG_INF_F16, |b| f16::from_f32(b).to_bits()))
                    .collect();
                let geo = Geometry {
                    head_dim: hd,
                    n_head,
                    n_head_kv,
                    n_kv,
                    n_chunks: CACHE_CHUNKS,
                    scale: 1.0 / (hd as f32).sqrt(),
                };
                let mut parts = vec![0.0f32; CACHE_CHUNKS * n_head * partial_len(hd)];
                for task in 0..geo.n_tasks() {
                    let (off, len) = geo.task_region(task);
                    partials(&geo, &q, &k, &v, &mask, task, &mut parts[off..off + len]);
                }
                let mut out = vec![0.0f32; n_head * hd];
                reduce(&geo, &parts, 0..n_head, &mut out);

                for head in 0..n_head {
                    let g = head / (n_head / n_head_kv);
                    let want = reference(
                        &q[head * hd..][..hd],
                        &head_rows(&k, n_kv, g, hd),
                        &head_rows(&v, n_kv, g, hd),
                        &bias,
                        geo.scale,
                    );
                    for (a, b) in out[head * hd..][..hd].iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-4,
                            "{} n_kv {n_kv} hd {hd} head {head}: {a} vs {b}",
                            ty.name()
                        );
                    }
                }
            }
        }
    }

    /// Not a test: time one layer's partials at depth 4096 on one thread
    /// (`cargo test --release --lib time_partials -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn time_partials() {
        let (hd, n_head, n_head_kv, n_kv) = (64, 9, 3, 4096);
        let row_elems = hd * n_head_kv;
        let kq = quantize(
            GgmlType::Q8_0,
            &pseudo_random(n_kv * row_elems, 5),
            row_elems,
        )
        .unwrap();
        let row_bytes = kq.len() / n_kv;
        let k = CacheRows {
            data: &kq,
            ty: GgmlType::Q8_0,
            row_bytes,
            head_bytes: row_bytes / n_head_kv,
        };
        let q = pseudo_random(n_head * hd, 3);
        let mask = vec![0u16; n_kv];
        let geo = Geometry {
            head_dim: hd,
            n_head,
            n_head_kv,
            n_kv,
            n_chunks: CACHE_CHUNKS,
            scale: 0.125,
        };
        let mut parts = vec![0.0f32; CACHE_CHUNKS * n_head * partial_len(hd)];
        let reps = 200;
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            for task in 0..geo.n_tasks() {
                let (off, len) = geo.task_region(task);
                partials(&geo, &q, &k, &k, &mask, task, &mut parts[off..off + len]);
            }
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        eprintln!(
            "one layer, n_kv {n_kv}, 1 thread: {:.3} ms = {:.2} ns per key per group",
            dt * 1e3,
            dt * 1e9 / (n_kv * n_head_kv) as f64
        );
    }
}
