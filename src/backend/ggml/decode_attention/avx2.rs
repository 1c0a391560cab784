//! The x86-64 kernel behind [`super::partials`]: AVX2, FMA and F16C, which every
//! x86-64 laptop CPU of the last decade has. Intrinsics are the reason this file
//! holds `unsafe`: loads and stores through pointers, and calling a
//! `#[target_feature]` function, which the dispatcher does only after checking the
//! CPU at run time.
//!
//! Work per cache block of [`BLOCK`] cells, for the query heads of one GQA group:
//! dequantize the block's keys once into an f32 scratch, score them against every
//! head (eight keys at a time, so eight FMA chains run side by side and one
//! transpose-add gives eight scores), fold the block into each head's running
//! softmax (online: rescale the sums when the maximum grows), then dequantize the
//! values once and accumulate `p · v` with each head's sums held in registers.

use std::arch::x86_64::*;

use half::f16;

use super::{CacheRows, Geometry, MAX_GROUP, NEG_INF_F16};
use crate::gguf::GgmlType;

/// Cache cells per softmax block: the key and value scratch stay in L1.
const BLOCK: usize = 32;

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Runs task `task` of [`super::partials`] for head dims 64 and 128. The caller
/// (`super::partials`) has checked [`available`] and the geometry.
pub fn partials(
    geo: &Geometry,
    q: &[f32],
    k: &CacheRows<'_>,
    v: &CacheRows<'_>,
    mask: &[u16],
    task: usize,
    out: &mut [f32],
) {
    assert!(
        available(),
        "decode attention kernel on a CPU without AVX2/FMA/F16C"
    );
    match geo.head_dim {
        // SAFETY: the CPU has AVX2, FMA and F16C (asserted above).
        64 => unsafe { kernel::<64>(geo, q, k, v, mask, task, out) },
        // SAFETY: as above.
        128 => unsafe { kernel::<128>(geo, q, k, v, mask, task, out) },
        hd => unreachable!("head dim {hd} was refused by decode_attention::supports"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn kernel<const HD: usize>(
    geo: &Geometry,
    q: &[f32],
    k: &CacheRows<'_>,
    v: &CacheRows<'_>,
    mask: &[u16],
    task: usize,
    out: &mut [f32],
) {
    let group = geo.group();
    assert!(group <= MAX_GROUP && geo.head_dim == HD);
    let (kv_head, chunk) = (task % geo.n_head_kv, task / geo.n_head_kv);
    let (start, end) = geo.chunk(chunk);
    let q = &q[kv_head * group * HD..][..group * HD];
    let p = HD + 2;
    assert!(out.len() >= group * p && mask.len() >= end);
    for o in out.chunks_exact_mut(p).take(group) {
        o[0] = f32::NEG_INFINITY;
        o[1..].fill(0.0);
    }

    let mut kbuf = [[0.0f32; HD]; BLOCK];
    let mut vbuf = [[0.0f32; HD]; BLOCK];
    let mut scores = [0.0f32; MAX_GROUP * BLOCK];
    let mut first = start;
    while first < end {
        let n = (end - first).min(BLOCK);
        // Mask values; cells past `n` stay masked so a short block needs no tail code.
        let mut bias = [f32::NEG_INFINITY; BLOCK];
        let mut visible = 0;
        for (b, &bits) in bias.iter_mut().zip(&mask[first..first + n]) {
            if bits != NEG_INF_F16 {
                *b = f16::from_bits(bits).to_f32();
                visible += 1;
            }
        }
        if visible == 0 {
            first += n; // padding or evicted cells: nothing to read
            continue;
        }
        for (j, row) in kbuf.iter_mut().enumerate().take(n) {
            dequantize::<HD>(k, first + j, kv_head, row);
        }
        for h in 0..group {
            let s = &mut scores[h * BLOCK..][..BLOCK];
            score_block::<HD>(&q[h * HD..][..HD], &kbuf, geo.scale, &bias, s);
            let o = &mut out[h * p..][..p];
            fold_softmax::<HD>(s, o);
        }
        for (j, row) in vbuf.iter_mut().enumerate().take(n) {
            if bias[j] == f32::NEG_INFINITY {
                row.fill(0.0); // weight 0 must not meet stale or unwritten values
            } else {
                dequantize::<HD>(v, first + j, kv_head, row);
            }
        }
        for h in 0..group {
            let o = &mut out[h * p + 2..][..HD];
            accumulate::<HD>(&scores[h * BLOCK..][..n], &vbuf, o);
        }
        first += n;
    }
}

/// `s[j] = q · k_j * scale + bias[j]` for the block's cells (`-inf` where masked).
#[target_feature(enable = "avx2,fma,f16c")]
fn score_block<const HD: usize>(
    q: &[f32],
    kbuf: &[[f32; HD]; BLOCK],
    scale: f32,
    bias: &[f32; BLOCK],
    s: &mut [f32],
) {
    let scale = _mm256_set1_ps(scale);
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    for j0 in (0..BLOCK).step_by(8) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for d in (0..HD).step_by(8) {
            let qv = load(q, d);
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, load(&kbuf[j0 + t], d), *a);
            }
        }
        let b = load(bias, j0);
        let sc = _mm256_fmadd_ps(hsum8(acc), scale, b);
        // Masked cells are -inf whatever their (possibly stale) keys gave.
        let masked = _mm256_cmp_ps::<_CMP_EQ_OQ>(b, neg_inf);
        store(s, j0, _mm256_blendv_ps(sc, neg_inf, masked));
    }
}

/// Folds one block's scores into a head's running softmax `o = [max, sum, acc..]`:
/// turns `s` into weights `exp(s - max)` and rescales `sum` and `acc` if the
/// maximum grew.
#[target_feature(enable = "avx2,fma,f16c")]
fn fold_softmax<const HD: usize>(s: &mut [f32], o: &mut [f32]) {
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    for j in (0..BLOCK).step_by(8) {
        mv = _mm256_max_ps(mv, load(s, j));
    }
    let mut lanes = [0.0f32; 8];
    store(&mut lanes, 0, mv);
    let block_max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let new_max = o[0].max(block_max);
    if new_max == f32::NEG_INFINITY {
        s.fill(0.0); // cannot happen for a block with a visible cell; kept total
        return;
    }
    if new_max > o[0] && o[0] > f32::NEG_INFINITY {
        let c = (o[0] - new_max).exp();
        o[1] *= c;
        o[2..].iter_mut().for_each(|x| *x *= c);
    }
    o[0] = new_max;
    let m = _mm256_set1_ps(new_max);
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut sum = _mm256_setzero_ps();
    for j in (0..BLOCK).step_by(8) {
        let x = load(s, j);
        let e = exp_nonpositive(_mm256_sub_ps(x, m));
        let e = _mm256_blendv_ps(
            e,
            _mm256_setzero_ps(),
            _mm256_cmp_ps::<_CMP_EQ_OQ>(x, neg_inf),
        );
        sum = _mm256_add_ps(sum, e);
        store(s, j, e);
    }
    store(&mut lanes, 0, sum);
    o[1] += lanes.iter().sum::<f32>();
}

/// `o += Σ_j w[j] · v_j`, 64 dimensions at a time so the sums stay in registers.
#[target_feature(enable = "avx2,fma,f16c")]
fn accumulate<const HD: usize>(w: &[f32], vbuf: &[[f32; HD]; BLOCK], o: &mut [f32]) {
    for d0 in (0..HD).step_by(64) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = load(o, d0 + 8 * i);
        }
        for (j, &wj) in w.iter().enumerate() {
            let wv = _mm256_set1_ps(wj);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, load(&vbuf[j], d0 + 8 * i), *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            store(o, d0 + 8 * i, *a);
        }
    }
}

/// A block's little-endian f16 scale, broadcast.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_f16(lo: u8, hi: u8) -> __m256 {
    let bits = _mm_cvtsi32_si128(u16::from_le_bytes([lo, hi]) as i32);
    _mm256_broadcastss_ps(_mm_cvtph_ps(bits))
}

/// KV head `head` of cache cell `t` as `HD` floats, with the rounding of ggml's
/// `dequantize_row_*` (value times the block's f16 scale, plus its offset for the
/// `_1` types; f16 cells exactly).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dequantize<const HD: usize>(c: &CacheRows<'_>, t: usize, head: usize, out: &mut [f32]) {
    let at = t * c.row_bytes + head * c.head_bytes;
    let bytes = &c.data[at..at + c.head_bytes];
    match c.ty {
        GgmlType::F16 => {
            for (i, eight) in bytes.chunks_exact(16).take(HD / 8).enumerate() {
                store(out, 8 * i, _mm256_cvtph_ps(load_i8x16(eight)));
            }
        }
        GgmlType::Q8_0 => {
            for (b, block) in bytes.chunks_exact(34).take(HD / 32).enumerate() {
                let d = scale_f16(block[0], block[1]);
                for i in 0..4 {
                    let q = load_i8x8(&block[2 + 8 * i..10 + 8 * i]);
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    store(out, b * 32 + 8 * i, _mm256_mul_ps(f, d));
                }
            }
        }
        GgmlType::Q4_0 => {
            for (b, block) in bytes.chunks_exact(18).take(HD / 32).enumerate() {
                let d = scale_f16(block[0], block[1]);
                let q = _mm256_sub_epi8(nibbles(load_i8x16(&block[2..18])), _mm256_set1_epi8(8));
                store_blocks(out, b, q, |f| _mm256_mul_ps(f, d));
            }
        }
        GgmlType::Q4_1 => {
            for (b, block) in bytes.chunks_exact(20).take(HD / 32).enumerate() {
                let (d, m) = (scale_f16(block[0], block[1]), scale_f16(block[2], block[3]));
                let q = nibbles(load_i8x16(&block[4..20]));
                store_blocks(out, b, q, |f| _mm256_add_ps(_mm256_mul_ps(f, d), m));
            }
        }
        GgmlType::IQ4_NL => {
            // SAFETY: reads exactly the 16 bytes of the table; unaligned load.
            let table = unsafe { _mm_loadu_si128(IQ4_NL_VALUES.as_ptr() as *const __m128i) };
            for (b, block) in bytes.chunks_exact(18).take(HD / 32).enumerate() {
                let d = scale_f16(block[0], block[1]);
                let idx = nibbles(load_i8x16(&block[2..18]));
                // The nibbles index the non-linear table, one lookup per 128-bit lane.
                let table = _mm256_set_m128i(table, table);
                let q = _mm256_shuffle_epi8(table, idx);
                store_blocks(out, b, q, |f| _mm256_mul_ps(f, d));
            }
        }
        GgmlType::Q5_0 => {
            for (b, block) in bytes.chunks_exact(22).take(HD / 32).enumerate() {
                let d = scale_f16(block[0], block[1]);
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                // A clear fifth bit makes the byte negative (nibble - 16), a set one
                // leaves the nibble: ggml's `(q | h << 4) - 16` without a subtraction.
                let high = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
                let q = _mm256_or_si256(nibbles(load_i8x16(&block[6..22])), high);
                store_blocks(out, b, q, |f| _mm256_mul_ps(f, d));
            }
        }
        GgmlType::Q5_1 => {
            for (b, block) in bytes.chunks_exact(24).take(HD / 32).enumerate() {
                let (d, m) = (scale_f16(block[0], block[1]), scale_f16(block[2], block[3]));
                let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
                let high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
                let q = _mm256_or_si256(nibbles(load_i8x16(&block[8..24])), high);
                store_blocks(out, b, q, |f| _mm256_add_ps(_mm256_mul_ps(f, d), m));
            }
        }
        other => unreachable!("decode attention over a {} cache", other.name()),
    }
}

/// ggml's `kvalues_iq4nl`: the 16 levels an iq4_nl nibble selects.
const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// A block's 16 packed bytes as 32 nibbles in element order: the low nibbles are
/// elements 0..16, the high ones 16..32 (ggml's layout for every 4- and 5-bit type).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles(raw: __m128i) -> __m256i {
    let low = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(raw, low);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), low);
    _mm256_set_m128i(hi, lo)
}

/// Bit `i` of `bits` as byte `i` of the result: 0xFF where set, 0 where clear.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits_to_bytes(bits: u32) -> __m256i {
    // Byte i takes the word's byte i / 8, then tests its bit i % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        ),
    );
    let select = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
}

/// Block `b`'s 32 signed byte values, converted and mapped by `f` (the block's
/// scale, and offset where it has one), stored as elements `32 b .. 32 b + 32`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_blocks(out: &mut [f32], b: usize, q: __m256i, f: impl Fn(__m256) -> __m256) {
    let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
    for (i, eight) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)]
        .into_iter()
        .enumerate()
    {
        let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
        store(out, b * 32 + 8 * i, f(x));
    }
}

/// Eight sums of eight vectors each: `[Σa0, Σa1, .., Σa7]`.
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8(a: [__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    // Lanes 0..4 of u0 hold the low-half sums of a0..a3, lanes 4..8 their high halves.
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

/// `e^x` for `x <= 0` (`-inf` gives about 1e-38; callers zero masked lanes),
/// relative error about 2e-7: `x = n ln 2 + r`, a degree-6 polynomial for `e^r`,
/// and `2^n` built in the exponent bits.
#[target_feature(enable = "avx2,fma,f16c")]
fn exp_nonpositive(x: __m256) -> __m256 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut poly = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
    }
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(poly, _mm256_castsi256_ps(two_n))
}

/// Eight floats from `s[at..at + 8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load(s: &[f32], at: usize) -> __m256 {
    let s = &s[at..at + 8];
    // SAFETY: `s` holds exactly 8 floats (bounds checked above); unaligned load.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

/// Stores eight floats into `s[at..at + 8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store(s: &mut [f32], at: usize, v: __m256) {
    let s = &mut s[at..at + 8];
    // SAFETY: `s` holds exactly 8 floats (bounds checked above); unaligned store.
    unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
}

/// Eight bytes into the low half of a vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_i8x8(b: &[u8]) -> __m128i {
    let b: &[u8; 8] = b.try_into().expect("8 quant bytes");
    // SAFETY: reads exactly the 8 bytes of `b`; unaligned load.
    unsafe { _mm_loadl_epi64(b.as_ptr() as *const __m128i) }
}

/// Sixteen bytes as a vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_i8x16(b: &[u8]) -> __m128i {
    let b: &[u8; 16] = b.try_into().expect("16 quant bytes");
    // SAFETY: reads exactly the 16 bytes of `b`; unaligned load.
    unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) }
}
