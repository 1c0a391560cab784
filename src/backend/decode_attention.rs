//! Attention of one new token over a quantized KV cache (decoding), on the CPU.
//!
//! Why not ggml's flash attention here: for a q8_0/q4_0 cache, ggml's CPU kernel
//! walks the cache one key at a time for every query head, dequantizing each value
//! row once per head and rescaling its running sum at every key; unlike its f16
//! path it has no split over the cache, so 9 query heads are shared by 2 threads
//! unevenly. At depth 4096 that attention is about two thirds of a decode step on
//! the default model. Here the query heads of one GQA group are handled together:
//! every cached key and value row is dequantized once per group, all scores of a
//! chunk of the cache are computed before one softmax, and the cache is split into
//! chunks so every thread gets the same amount of work. The f16 cache keeps ggml's
//! kernel, which has a split path of its own and keeps logits bit-identical to
//! llama.cpp's.
//!
//! ggml custom ops have no barrier, so the work is two ops: [`partials`] computes,
//! for one (KV head, cache chunk), each query head's largest score, sum of
//! exponentials and unnormalized sum of weighted values; [`reduce`] merges the
//! chunks of one query head. `backend::ggml` wires both into the graph.

use half::f16;

use crate::gguf::GgmlType;

/// The f16 bit pattern of -inf, as the graph writes masked cells.
const NEG_INF_F16: u16 = 0xFC00;

/// Cache types this kernel reads.
pub const DECODE_CACHE_TYPES: [GgmlType; 2] = [GgmlType::Q8_0, GgmlType::Q4_0];

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

impl CacheRows<'_> {
    /// Dequantizes KV head `head` of cell `t` into `out` (`head_dim` floats), exactly
    /// as ggml's `dequantize_row_*` does.
    #[inline(always)]
    fn dequantize(&self, t: usize, head: usize, out: &mut [f32]) {
        let start = t * self.row_bytes + head * self.head_bytes;
        let bytes = &self.data[start..start + self.head_bytes];
        match self.ty {
            GgmlType::Q8_0 => {
                for (block, out) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    // Fixed lengths let the compiler vectorize the conversion.
                    let qs: &[u8; 32] = block[2..].try_into().expect("34-byte block");
                    let out: &mut [f32; 32] = out.try_into().expect("32-value block");
                    for i in 0..32 {
                        out[i] = qs[i] as i8 as f32 * d;
                    }
                }
            }
            GgmlType::Q4_0 => {
                for (block, out) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let qs: &[u8; 16] = block[2..].try_into().expect("18-byte block");
                    let out: &mut [f32; 32] = out.try_into().expect("32-value block");
                    for i in 0..16 {
                        out[i] = ((qs[i] & 0x0f) as i32 - 8) as f32 * d;
                        out[i + 16] = ((qs[i] >> 4) as i32 - 8) as f32 * d;
                    }
                }
            }
            other => unreachable!("decode attention built for a {} cache", other.name()),
        }
    }
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
    fn chunk(&self, c: usize) -> (usize, usize) {
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

/// Task `task` = (KV head `task % n_head_kv`, chunk `task / n_head_kv`): writes, for
/// each query head of the group, `[max score, sum of exp, Σ exp(score - max) · v]`
/// into `out` (the task's region, see [`Geometry::task_region`]).
/// `q` is `[n_head][head_dim]`; `mask` holds one f16 bit pattern per cell.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn partials(
    geo: &Geometry,
    q: &[f32],
    k: &CacheRows<'_>,
    v: &CacheRows<'_>,
    mask: &[u16],
    task: usize,
    out: &mut [f32],
) {
    let (hd, group) = (geo.head_dim, geo.group());
    let (kv_head, chunk) = (task % geo.n_head_kv, task / geo.n_head_kv);
    let (start, end) = geo.chunk(chunk);
    let len = end - start;
    let q = &q[kv_head * group * hd..(kv_head + 1) * group * hd];

    // Scores of every query head of the group for every cell of the chunk.
    let mut scores = vec![f32::NEG_INFINITY; group * len];
    let mut row = vec![0.0f32; hd];
    for t in start..end {
        let m = match mask[t] {
            NEG_INF_F16 => continue,
            0 => 0.0,
            bits => f16::from_bits(bits).to_f32(),
        };
        k.dequantize(t, kv_head, &mut row);
        for (h, qh) in q.chunks_exact(hd).enumerate() {
            scores[h * len + t - start] = dot(qh, &row) * geo.scale + m;
        }
    }
    // Softmax numerators, in place.
    let mut stats = vec![(f32::NEG_INFINITY, 0.0f32); group];
    for (h, s) in scores.chunks_exact_mut(len.max(1)).enumerate().take(group) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        if max > f32::NEG_INFINITY {
            for x in s.iter_mut() {
                // Masked cells (-inf) become exactly 0, so the value pass skips them.
                let e = exp_nonpositive(*x - max);
                *x = if *x == f32::NEG_INFINITY { 0.0 } else { e };
            }
            sum = s.iter().sum();
        }
        stats[h] = (max, sum);
    }
    let p = partial_len(hd);
    for (h, o) in out.chunks_exact_mut(p).enumerate() {
        o[0] = stats[h].0;
        o[1] = stats[h].1;
        o[2..].fill(0.0);
    }
    if len == 0 {
        return;
    }
    for t in start..end {
        if (0..group).all(|h| scores[h * len + t - start] == 0.0) {
            continue; // masked (or negligible) for every head
        }
        v.dequantize(t, kv_head, &mut row);
        for (h, o) in out.chunks_exact_mut(p).enumerate() {
            axpy(&mut o[2..], scores[h * len + t - start], &row);
        }
    }
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

/// Sixteen independent sums, so the compiler can keep them in vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        let x: &[f32; 16] = x.try_into().expect("chunk of 16");
        let y: &[f32; 16] = y.try_into().expect("chunk of 16");
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    // Pairwise, so the sum is a few vector shuffles rather than 15 dependent adds.
    let mut half = [0.0f32; 8];
    for i in 0..8 {
        half[i] = acc[i] + acc[i + 8];
    }
    let mut quarter = [0.0f32; 4];
    for i in 0..4 {
        quarter[i] = half[i] + half[i + 4];
    }
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]) + tail
}

/// `e^x` for `x <= 0` (`x` = -inf gives about 1e-38, not 0), relative error about
/// 2e-7: Cody-Waite reduction `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6
/// Taylor polynomial for `e^r`, and `2^n` built in the exponent bits. Unlike the
/// libm call, this compiles to straight-line vector code over a slice.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
    use crate::backend::ggml::quantize;

    #[test]
    fn exp_matches_libm() {
        for i in 0..=200_000 {
            let x = -(i as f32) * 0.000_437;
            let (a, b) = (exp_nonpositive(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b + 1e-37, "exp({x}): {a} vs {b}");
        }
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    /// Plain f64 softmax attention for one query head over dequantized rows.
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        visible: &[bool],
        scale: f32,
    ) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .iter()
            .zip(visible)
            .map(|(k, &vis)| {
                if vis {
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                } else {
                    f64::NEG_INFINITY
                }
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

    /// Both ops together against the f64 reference on the cache's own dequantized
    /// values: only f32 rounding separates them (tolerance 1e-4 of the values' scale).
    #[test]
    fn grouped_decode_attention_matches_f64_reference() {
        for ty in DECODE_CACHE_TYPES {
            for (n_kv, visible_upto, n_head, n_head_kv) in
                [(256, 200, 9, 3), (37, 37, 4, 2), (512, 1, 8, 8)]
            {
                let hd = 64;
                let row_elems = hd * n_head_kv;
                let raw = pseudo_random(n_kv * row_elems, 7 + n_kv as u64);
                let kq = quantize(ty, &raw, row_elems).unwrap();
                let vq = quantize(ty, &pseudo_random(n_kv * row_elems, 99), row_elems).unwrap();
                let row_bytes = kq.len() / n_kv;
                let k = CacheRows {
                    data: &kq,
                    ty,
                    row_bytes,
                    head_bytes: row_bytes / n_head_kv,
                };
                let v = CacheRows {
                    data: &vq,
                    ty,
                    row_bytes,
                    head_bytes: row_bytes / n_head_kv,
                };
                let q = pseudo_random(n_head * hd, 3);
                let mask: Vec<u16> = (0..n_kv)
                    .map(|t| if t < visible_upto { 0 } else { 0xFC00 })
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

                let rows = |c: &CacheRows, h: usize| -> Vec<Vec<f32>> {
                    (0..n_kv)
                        .map(|t| {
                            let mut r = vec![0.0; hd];
                            c.dequantize(t, h, &mut r);
                            r
                        })
                        .collect()
                };
                let visible: Vec<bool> = (0..n_kv).map(|t| t < visible_upto).collect();
                for head in 0..n_head {
                    let g = head / (n_head / n_head_kv);
                    let want = reference(
                        &q[head * hd..][..hd],
                        &rows(&k, g),
                        &rows(&v, g),
                        &visible,
                        geo.scale,
                    );
                    for (a, b) in out[head * hd..][..hd].iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-4,
                            "{} n_kv {n_kv} head {head}: {a} vs {b}",
                            ty.name()
                        );
                    }
                }
            }
        }
    }
}
#[cfg(test)]
mod timing {
    use super::*;
    #[test]
    #[ignore]
    fn time_partials() {
        let (hd, n_head, n_head_kv, n_kv) = (64, 9, 3, 4096);
        let row_elems = hd * n_head_kv;
        let raw: Vec<f32> = (0..n_kv * row_elems)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let kq = crate::backend::ggml::quantize(GgmlType::Q8_0, &raw, row_elems).unwrap();
        let row_bytes = kq.len() / n_kv;
        let k = CacheRows {
            data: &kq,
            ty: GgmlType::Q8_0,
            row_bytes,
            head_bytes: row_bytes / n_head_kv,
        };
        let v = CacheRows {
            data: &kq,
            ty: GgmlType::Q8_0,
            row_bytes,
            head_bytes: row_bytes / n_head_kv,
        };
        let q: Vec<f32> = (0..n_head * hd).map(|i| (i % 13) as f32 / 13.0).collect();
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
        let t0 = std::time::Instant::now();
        let reps = 200;
        for _ in 0..reps {
            for task in 0..geo.n_tasks() {
                let (off, len) = geo.task_region(task);
                partials(&geo, &q, &k, &v, &mask, task, &mut parts[off..off + len]);
            }
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        eprintln!("one layer, n_kv 4096, 1 thread: {:.3} ms = {:.2} ns per key per group; x30 layers = {:.1} ms", dt * 1e3, dt * 1e9 / (n_kv * n_head_kv) as f64, dt * 30e3);
    }
}
