//! The wgpu backend against independent CPU oracles: every kernel on random data
//! (per weight type, with ggml's own quantizer and dequantizer as the reference for
//! the block formats), and the whole forward pass on the real default model against
//! the ggml CPU backend, with and without a sharing map.
//!
//! Runs on any wgpu adapter; in CI that is lavapipe (mesa-vulkan-drivers, software
//! Vulkan). Without an adapter each test prints why it is skipped, on stderr past
//! the test harness's capture, and returns.
//!
//! Whole-model parity (SmolLM2-135M-Instruct Q4_1: a 64-token prompt in one pass,
//! then 4 tokens decoded one at a time, so both matmul paths and the prefill and
//! decode attention kernels run) is against ggml fed the same way, twice: against
//! ggml on the same quantized file (where ggml's 8-bit activation rounding dominates
//! the difference), and against ggml on the file dequantized to f32 (the same weight
//! values with f32 activations: there the bar, max |diff| < 0.1 and top-1
//! identical, holds as stated).

use crate::support;

use kvsharer::backend::ggml::Session;
use kvsharer::backend::ggml::{dequantize, quantize};
use kvsharer::backend::wgpu::{
    AttentionPath, GpuOptions, GpuSession, KernelHarness, GPU_WEIGHT_TYPES,
};
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::model::Model;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};
use kvsharer::sample::argmax;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::wgpu::or_skip_without_adapter;
use support::{
    compare_logits, cpu_logits, dequantized_copy, eval_then_decode, prompt_tokens,
    reference_forward_with, say, three_layer_map, write_tiny_model, RefPrecision, TinySpec,
    N_PREFILL, N_TOKENS,
};

fn harness(test: &str) -> Option<KernelHarness> {
    let h = or_skip_without_adapter(test, KernelHarness::new())?;
    say(&format!("{test}: adapter {}", h.adapter_description()));
    Some(h)
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Weight rows: not a multiple of the 64-row tile, to cover the edge. Columns: a
/// multiple of the 256-element K-quant super-block.
const ROWS: usize = 100;
const COLS: usize = 512;

#[test]
fn matmul_kernels_match_ggml_dequantized_weights() {
    let Some(h) = harness("matmul_kernels_match_ggml_dequantized_weights") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(7);
    for &ty in GPU_WEIGHT_TYPES {
        let w = random(&mut rng, ROWS * COLS, 1.0);
        let bytes = quantize(ty, &w, COLS).unwrap();
        let wd = dequantize(ty, &bytes, ROWS * COLS).unwrap();
        // 37 tokens: more than one 32-token tile, ending part-way through the second.
        for (tiled, m) in [(true, 37usize), (false, 3)] {
            let x = random(&mut rng, m * COLS, 1.0);
            let got = h.matmul(ty, &bytes, ROWS, COLS, &x, tiled, false).unwrap();
            assert_eq!(got.len(), m * ROWS);
            let mut worst = 0f64;
            for t in 0..m {
                for r in 0..ROWS {
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for k in 0..COLS {
                        let p = wd[r * COLS + k] as f64 * x[t * COLS + k] as f64;
                        exact += p;
                        mag += p.abs();
                    }
                    let err = (got[t * ROWS + r] as f64 - exact).abs() / (mag + 1e-6);
                    worst = worst.max(err);
                }
            }
            // f32 accumulation over 512 products in a different order than f64.
            assert!(
                worst < 2e-6,
                "{} {}: relative error {worst:e}",
                ty.name(),
                if tiled { "tiled" } else { "matvec" }
            );
        }
    }
}

/// ggml's conversion of activations for a weight of `ty` (its vec_dot_type), in
/// plain Rust: the values the CPU backend multiplies with, and for Q8_1 the per-block
/// stored sum f16(d·Σq) minus the sum the values imply, f16(d)·Σq.
fn ggml_activations(ty: GgmlType, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            let mut out = Vec::new();
            let mut corr = Vec::new();
            for b in x.chunks(32) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let q: Vec<f32> = b.iter().map(|v| (v * id).round_ties_even()).collect();
                let sum: f32 = q.iter().sum();
                out.extend(q.iter().map(|q| q * f16_round(d)));
                corr.push(f16_round(d * sum) - f16_round(d) * sum);
            }
            (out, corr)
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            let mut out = Vec::new();
            for b in x.chunks(256) {
                let m = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let iscale = -127.0 / m;
                out.extend(
                    b.iter()
                        .map(|v| (iscale * v).round_ties_even().min(127.0) * (1.0 / iscale)),
                );
            }
            (out, vec![])
        }
        GgmlType::F16 => (x.iter().map(|&v| f16_round(v)).collect(), vec![]),
        _ => (x.to_vec(), vec![]),
    }
}

/// With ggml's activation rounding on, the kernels compute what ggml's CPU dot
/// products compute: Σ w·x' over the rounded x', plus, for q4_1 weights, each
/// block's min times the Q8_1 block-sum correction.
#[test]
fn matmul_kernels_with_ggml_rounding_match_ggml_formula() {
    let Some(h) = harness("matmul_kernels_with_ggml_rounding_match_ggml_formula") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(17);
    for &ty in GPU_WEIGHT_TYPES {
        let w = random(&mut rng, ROWS * COLS, 1.0);
        let bytes = quantize(ty, &w, COLS).unwrap();
        let wd = dequantize(ty, &bytes, ROWS * COLS).unwrap();
        let rb = bytes.len() / ROWS;
        // Block mins of q4_1 (block_q4_1 { f16 d; f16 m; u8 qs[16]; }).
        let min_of = |r: usize, b: usize| -> f64 {
            let o = r * rb + b * 20 + 2;
            half::f16::from_bits(u16::from_le_bytes([bytes[o], bytes[o + 1]])).to_f64()
        };
        for (tiled, m) in [(true, 37usize), (false, 3)] {
            let x = random(&mut rng, m * COLS, 3.0);
            let got = h.matmul(ty, &bytes, ROWS, COLS, &x, tiled, true).unwrap();
            let mut worst = 0f64;
            for t in 0..m {
                let (xr, corr) = ggml_activations(ty, &x[t * COLS..(t + 1) * COLS]);
                for r in 0..ROWS {
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for k in 0..COLS {
                        let p = wd[r * COLS + k] as f64 * xr[k] as f64;
                        exact += p;
                        mag += p.abs();
                    }
                    if ty == GgmlType::Q4_1 {
                        exact += corr
                            .iter()
                            .enumerate()
                            .map(|(b, &c)| min_of(r, b) * c as f64)
                            .sum::<f64>();
                    }
                    worst = worst.max((got[t * ROWS + r] as f64 - exact).abs() / (mag + 1e-6));
                }
            }
            assert!(
                worst < 2e-6,
                "{} {}: relative error {worst:e}",
                ty.name(),
                if tiled { "tiled" } else { "matvec" }
            );
        }
    }
}

#[test]
fn embedding_lookup_matches_ggml_dequantize() {
    let Some(h) = harness("embedding_lookup_matches_ggml_dequantize") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(11);
    for &ty in GPU_WEIGHT_TYPES {
        let w = random(&mut rng, ROWS * COLS, 2.0);
        let bytes = quantize(ty, &w, COLS).unwrap();
        let ids = [0u32, 99, 17, 17, 63];
        let got = h.get_rows(ty, &bytes, ROWS, COLS, &ids).unwrap();
        let rb = bytes.len() / ROWS;
        for (t, &id) in ids.iter().enumerate() {
            let row = &bytes[id as usize * rb..(id as usize + 1) * rb];
            let want = dequantize(ty, row, COLS).unwrap();
            for (k, (&g, &e)) in got[t * COLS..(t + 1) * COLS].iter().zip(&want).enumerate() {
                // Same f32 formula as ggml up to fused multiply-add: within an ulp or two.
                assert!(
                    (g - e).abs() <= 1e-6 * e.abs().max(1.0),
                    "{} row {id} col {k}: gpu {g} ggml {e}",
                    ty.name()
                );
            }
        }
    }
}

#[test]
fn elementwise_kernels_match_f64_references() {
    let Some(h) = harness("elementwise_kernels_match_f64_references") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(3);

    // RMSNorm over 3 rows of 576 (wider than one 256-invocation pass).
    let n = 576;
    let x = random(&mut rng, 3 * n, 3.0);
    let w = random(&mut rng, n, 1.5);
    let eps = 1e-5f32;
    let got = h.rms_norm(&x, &w, eps).unwrap();
    for t in 0..3 {
        let row = &x[t * n..(t + 1) * n];
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..n {
            let e = row[i] as f64 * s * w[i] as f64;
            assert!(
                (got[t * n + i] as f64 - e).abs() < 1e-5 * e.abs().max(1.0),
                "rms_norm [{t}][{i}]"
            );
        }
    }

    // RoPE, NORM mode (adjacent pairs), with and without frequency factors, at a
    // non-zero starting position.
    let (heads, hd, pos0, base, fscale) = (3usize, 64usize, 37u32, 100000.0f32, 0.5f32);
    let x = random(&mut rng, 4 * heads * hd, 2.0);
    let factors: Vec<f32> = (0..hd / 2).map(|i| 1.0 + i as f32 * 0.25).collect();
    for ff in [None, Some(&factors[..])] {
        let got = h.rope(&x, heads, hd, pos0, base, fscale, ff).unwrap();
        for t in 0..4 {
            for hh in 0..heads {
                for i in 0..hd / 2 {
                    let mut theta =
                        (pos0 as f64 + t as f64) * (base as f64).powf(-2.0 * i as f64 / hd as f64);
                    if let Some(f) = ff {
                        theta /= f[i] as f64;
                    }
                    theta *= fscale as f64;
                    let o = t * heads * hd + hh * hd + 2 * i;
                    let (x0, x1) = (x[o] as f64, x[o + 1] as f64);
                    let e0 = x0 * theta.cos() - x1 * theta.sin();
                    let e1 = x0 * theta.sin() + x1 * theta.cos();
                    assert!(
                        (got[o] as f64 - e0).abs() < 2e-4 && (got[o + 1] as f64 - e1).abs() < 2e-4,
                        "rope t{t} h{hh} i{i}: ({}, {}) vs ({e0}, {e1})",
                        got[o],
                        got[o + 1]
                    );
                }
            }
        }
    }

    // SwiGLU.
    let n = 1536;
    let g = random(&mut rng, 2 * n, 6.0);
    let u = random(&mut rng, 2 * n, 2.0);
    let got = h.swiglu(&g, &u, n).unwrap();
    for i in 0..2 * n {
        let gi = g[i] as f64;
        let e = gi / (1.0 + (-gi).exp()) * u[i] as f64;
        assert!(
            (got[i] as f64 - e).abs() < 1e-5 * e.abs().max(1.0),
            "swiglu [{i}]: {} vs {e}",
            got[i]
        );
    }

    // Activation rounding as ggml's CPU backend converts activations before a matmul:
    // Q8_0 blocks for q4_0/q4_1/q8_0 weights (against ggml's own Q8_0 quantizer),
    // Q8_K super-blocks for k-quants (against its reference formula), f16 for f16.
    let k = 512;
    let x = random(&mut rng, 3 * k, 4.0);
    let q8 = dequantize(
        GgmlType::Q8_0,
        &quantize(GgmlType::Q8_0, &x, k).unwrap(),
        x.len(),
    )
    .unwrap();
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let got = h.round_activations(&x, k, ty).unwrap();
        let off = got
            .iter()
            .zip(&q8)
            .filter(|(g, e)| (*g - *e).abs() > 1e-6 * e.abs().max(1.0))
            .count();
        // ggml's reference quantizer rounds halves away from zero, its AVX2 one (and
        // the GPU) to even: a value exactly at a half step may land one step apart.
        assert!(
            off <= 2,
            "{}: {off} of {} activations differ from ggml's Q8_0",
            ty.name(),
            x.len()
        );
    }
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        let got = h.round_activations(&x, k, ty).unwrap();
        for (b, block) in x.chunks(256).enumerate() {
            let m = block
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let iscale = -127.0 / m;
            for (j, &v) in block.iter().enumerate() {
                let e = (iscale * v).round_ties_even().min(127.0) * (1.0 / iscale);
                let g = got[b * 256 + j];
                assert!(
                    (g - e).abs() <= 1e-6 * e.abs().max(1.0),
                    "{} [{b}][{j}]: {g} vs {e}",
                    ty.name()
                );
            }
        }
    }
    let got = h.round_activations(&x, k, GgmlType::F16).unwrap();
    assert!(
        got.iter().zip(&x).all(|(&g, &v)| g == f16_round(v)),
        "f16 rounding"
    );
    assert_eq!(h.round_activations(&x, k, GgmlType::F32).unwrap(), x);

    // Argmax: ties resolve to the lowest index, NaN never wins.
    let mut v = random(&mut rng, 49152, 10.0);
    v[1000] = 50.0;
    v[40000] = 50.0;
    v[5] = f32::NAN;
    assert_eq!(h.argmax(&v).unwrap(), 1000);
    assert_eq!(h.argmax(&v).unwrap(), argmax(&v));
    let w: Vec<f32> = (0..777).map(|i| ((i * 37) % 101) as f32).collect();
    assert_eq!(h.argmax(&w).unwrap(), argmax(&w));
}

/// Causal attention in f64 over keys and values as given (the caller rounds them as
/// the cache stores them), and queries rounded to f16 when `q_f16` (as ggml's
/// small-batch path does).
#[allow(clippy::too_many_arguments)]
fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
    pos0: usize,
    q_f16: bool,
) -> Vec<f64> {
    let m = q.len() / (n_head * hd);
    let kvw = n_head_kv * hd;
    let mut out = vec![0f64; q.len()];
    for t in 0..m {
        for h in 0..n_head {
            let kvh = h / (n_head / n_head_kv);
            let qv: Vec<f64> = (0..hd)
                .map(|d| q[(t * n_head + h) * hd + d])
                .map(|v| if q_f16 { f16_round(v) } else { v } as f64)
                .collect();
            let rows = pos0 + t + 1;
            let scores: Vec<f64> = (0..rows)
                .map(|j| {
                    (0..hd)
                        .map(|d| qv[d] * k[j * kvw + kvh * hd + d] as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
            let ps: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = ps.iter().sum();
            for d in 0..hd {
                out[(t * n_head + h) * hd + d] = (0..rows)
                    .map(|j| ps[j] * v[j * kvw + kvh * hd + d] as f64)
                    .sum::<f64>()
                    / sum;
            }
        }
    }
    out
}

/// Every attention path over every cache type pair a plan can give a layer: the
/// GPU's quantizers (`kv_store.wgsl`) and in-place block reads against ggml's
/// quantizer and dequantizer. Measured on lavapipe: below 2e-6 for every pair on
/// the f32 paths (the GPU quantizer stores ggml's bytes), ~1e-3 on the f16 one.
#[test]
fn attention_kernels_match_f64_reference() {
    let Some(mut h) = harness("attention_kernels_match_f64_reference") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(5);
    let (n_head, n_head_kv, hd) = (9usize, 3usize, 64usize);
    // Prefill: 70 queries at positions 10.. (more than one 64-key tile); decode at
    // position 300 (three 128-key splits, the last one partial); ggml's serial f16
    // path on 5 queries. The f16 accumulator of the latter costs ~3 decimal digits.
    use AttentionPath::*;
    use GgmlType::{F16, F32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
    for (pos0, m, path, tol, types) in [
        (10usize, 70usize, Tiled, 1e-4, (F16, F16)),
        (0, 1, SplitK, 1e-4, (F16, F16)),
        (300, 1, SplitK, 1e-4, (F16, F16)),
        (300, 1, Tiled, 1e-4, (F16, F16)),
        (100, 5, F16Serial, 5e-3, (F16, F16)),
        (10, 70, Tiled, 1e-4, (Q8_0, Q8_0)),
        (300, 1, SplitK, 1e-4, (Q8_0, Q4_0)),
        (10, 70, Tiled, 1e-4, (Q4_0, Q4_0)),
        (300, 1, SplitK, 1e-4, (Q4_0, F16)),
        (40, 3, Tiled, 1e-4, (F32, Q8_0)),
        (10, 70, Tiled, 1e-4, (Q5_1, Q5_0)),
        (300, 1, SplitK, 1e-4, (Q5_1, Q5_1)),
        (300, 1, SplitK, 1e-4, (Q4_1, IQ4_NL)),
        (10, 70, Tiled, 1e-4, (IQ4_NL, Q4_1)),
    ] {
        let rows = pos0 + m;
        let q = random(&mut rng, m * n_head * hd, 2.0);
        let k = random(&mut rng, rows * n_head_kv * hd, 2.0);
        let v = random(&mut rng, rows * n_head_kv * hd, 1.0);
        let got = h
            .attention(&q, &k, &v, n_head, n_head_kv, hd, pos0, path, types)
            .unwrap();
        let kvw = n_head_kv * hd;
        let (kc, vc) = (
            support::as_cached(types.0, &k, kvw),
            support::as_cached(types.1, &v, kvw),
        );
        let want =
            attention_reference(&q, &kc, &vc, n_head, n_head_kv, hd, pos0, path == F16Serial);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &e)| (g as f64 - e).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < tol,
            "attention pos0 {pos0} tokens {m} {path:?} {types:?}: max |diff| {worst:e}"
        );
    }
}

// ---- whole forward pass, tiny models of every GPU weight type ----

/// The GPU forward on tiny random models of each weight type against the f32
/// reference forward (tests/support, f16 KV cache), with a sharing map: the GPU
/// computes in f32 on exactly the dequantized weights the reference uses, so the
/// error is rounding only. Each error must also be far below what sharing changes.
/// Measured: max |gpu - ref| 0.00002 (q8_0) to 0.00068 (f32), ggml's own 0.006-0.15.
#[test]
fn tiny_models_match_f32_reference_for_every_gpu_weight_type() {
    let test = "tiny_models_match_f32_reference_for_every_gpu_weight_type";
    if harness(test).is_none() {
        return;
    }
    for &ty in GPU_WEIGHT_TYPES {
        let mut spec = TinySpec::for_type(ty);
        spec.n_layers = 4;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let weights = write_tiny_model(&spec, &path);
        let loaded = loader::load(&path).unwrap();
        let map = ShareMap::new(vec![0, 0, 2, 2]).unwrap();
        let tokens: Vec<u32> = (0..40u32)
            .map(|i| (i * 7 + 3) % spec.n_vocab as u32)
            .collect();
        // 36 in one pass, 4 decoded one by one.
        let run_gpu = |ggml_activation_rounding: bool| {
            let opts = GpuOptions {
                n_ctx: 64,
                ggml_activation_rounding,
                ..Default::default()
            };
            let mut gpu = GpuSession::new(&loaded.model, &map, &opts).unwrap();
            assert_eq!(gpu.n_slots(), 2 * map.owner_count());
            let mut out = gpu.eval(&tokens[..36], Logits::All).unwrap();
            for &t in &tokens[36..] {
                out.extend(gpu.eval(&[t], Logits::Last).unwrap());
            }
            out
        };
        let ours = run_gpu(false);
        let ours_rounded = run_gpu(true);
        let cpu_opts = RunOptions {
            n_ctx: 64,
            n_threads: 2,
            ..Default::default()
        };
        let cpu = Session::new(&loaded.model, &map, &cpu_opts)
            .unwrap()
            .eval(&tokens, Logits::All)
            .unwrap();
        let precision = RefPrecision {
            kv_cache_f16: true,
            attn_inputs_f16: false,
        };
        let reference = reference_forward_with(&weights, &spec, &map, &tokens, precision)
            .logits
            .concat();
        let unshared =
            reference_forward_with(&weights, &spec, &ShareMap::identity(4), &tokens, precision)
                .logits
                .concat();
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let err = diff(&ours, &reference);
        let separation = diff(&reference, &unshared);
        let cpu_err = diff(&cpu, &reference);
        let vs_cpu = diff(&ours_rounded, &cpu);
        say(&format!(
            "{test}: {:>5}: max |gpu - ref| {err:.5} (ggml cpu - ref {cpu_err:.5}); rounding as ggml: max |gpu - ref| {:.5}, |gpu - cpu| {vs_cpu:.5}; sharing moves the reference by {separation:.3}",
            ty.name(),
            diff(&ours_rounded, &reference)
        ));
        assert_eq!(ours.len(), reference.len());
        assert!(err < 0.02, "{}: max |gpu - ref| {err}", ty.name());
        // ggml rounds activations to 8 bits before quantized matmuls; so does the
        // GPU with ggml_activation_rounding, which leaves it about as far from the
        // reference as ggml (the two roundings do not coincide bit for bit).
        let rounded_err = diff(&ours_rounded, &reference);
        assert!(
            rounded_err < 2.0 * cpu_err.max(0.01),
            "{}: rounded gpu - ref {rounded_err} vs ggml's {cpu_err}",
            ty.name()
        );
        assert!(
            err < 0.05 * separation,
            "{}: error {err} is not small next to the sharing effect {separation}",
            ty.name()
        );
    }
}

// ---- whole model ----

pub(crate) const PROMPT: &str =
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, \
    counting one hundred and twelve steps. In 1987 the lamp was converted to electricity, \
    yet he still carried a brass oil can, out of habit more than need. Ships passing the \
    headland would flash their lights twice in greeting; he answered with three long \
    blinks. The village below kept its own rhythm.";

/// The GPU fed `toks` as one `N_PREFILL`-token pass, then one token at a time, and
/// its logits for every position; `None` (the skip printed) without an adapter.
fn gpu_logits<'m>(
    test: &str,
    model: &'m Model,
    map: &ShareMap,
    toks: &[u32],
) -> Option<(GpuSession<'m>, Vec<f32>)> {
    let opts = GpuOptions {
        n_ctx: 128,
        ..Default::default()
    };
    let mut gpu = or_skip_without_adapter(test, GpuSession::new(model, map, &opts))?;
    say(&format!("{test}: adapter {}", gpu.adapter_description()));
    // A K and a V slot per owning layer.
    assert_eq!(gpu.n_slots(), 2 * map.owner_count());
    let out = eval_then_decode(&mut gpu, toks, N_PREFILL);
    assert_eq!(gpu.n_past(), toks.len());
    Some((gpu, out))
}

/// The GPU against ggml's CPU backend on the real model, both fed the same 64-token
/// prompt in one pass and 4 single-token passes.
///
/// ggml itself is the yardstick for the tolerance: its 8-bit rounding of every
/// matmul input makes its logits jump on tiny upstream differences, so the CPU
/// backend run with another batch size (16: ggml's f16 attention path instead of
/// its f32 tiled one) differs from itself by as much as ~1.2 and disagrees on
/// top-1 at near-ties. The GPU (f32 throughout) must stay within that self-
/// variation: max and mean |diff| at most 1.25x ggml's own, and top-1 mismatches at
/// most one more than ggml's own. Measured on lavapipe (llvmpipe, Mesa 22.3.6):
/// unshared, GPU vs CPU max 1.239, mean 0.157, 5 top-1 mismatches in 68, against
/// ggml's own 1.220, 0.155, 7; with the 3-layer map, 1.277, 0.174, 2 against
/// 1.247, 0.178, 2, while the map itself moves the logits by mean 2.15.
fn whole_model(test: &str, map_of: impl Fn(usize) -> ShareMap) {
    let path = support::default_model_path();
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let map = map_of(model.config.n_layers);
    let toks = prompt_tokens(&loaded, PROMPT);
    let Some((mut gpu, ours)) = gpu_logits(test, model, &map, &toks) else {
        return;
    };
    let theirs = cpu_logits(model, &map, &toks, 512);
    let theirs_b16 = cpu_logits(model, &map, &toks, 16);
    let n_vocab = model.config.n_vocab;
    assert_eq!(ours.len(), theirs.len());
    let (max, mean, mismatches) = compare_logits(&ours, &theirs, n_vocab);
    let (own_max, own_mean, own_mismatches) = compare_logits(&theirs_b16, &theirs, n_vocab);
    say(&format!(
        "{test}: {N_TOKENS} positions: gpu vs ggml cpu: max |logit diff| {max:.4}, mean {mean:.4}, top-1 mismatches {mismatches}; \
         ggml cpu batch 16 vs batch 512: max {own_max:.4}, mean {own_mean:.4}, top-1 mismatches {own_mismatches}"
    ));
    // Greedy decoding on the GPU (argmax on the device) picks the GPU logits' top.
    gpu.truncate(N_TOKENS - 1);
    let id = gpu.eval_argmax(&toks[N_TOKENS - 1..]).unwrap();
    assert_eq!(id, argmax(&ours[(N_TOKENS - 1) * n_vocab..]));

    assert!(
        max <= 1.25 * own_max,
        "max |logit diff| {max} vs ggml's own {own_max}"
    );
    assert!(
        mean <= 1.25 * own_mean,
        "mean |logit diff| {mean} vs ggml's own {own_mean}"
    );
    assert!(
        mismatches <= own_mismatches + 1,
        "top-1 differs at {mismatches} positions (ggml itself: {own_mismatches})"
    );
    assert!(
        mismatches * 10 <= N_TOKENS,
        "top-1 differs at {mismatches} of {N_TOKENS} positions"
    );
    if !map.is_identity() {
        // The map must matter far more than the backend does, or this comparison
        // could not tell a GPU that ignores it.
        let unshared = cpu_logits(model, &ShareMap::identity(map.n_layers()), &toks, 512);
        let (_, sharing_mean, _) = compare_logits(&unshared, &theirs, n_vocab);
        say(&format!(
            "{test}: the map itself moves ggml's logits by mean {sharing_mean:.4}"
        ));
        assert!(
            mean * 3.0 < sharing_mean,
            "backend difference {mean} is not small next to the sharing effect {sharing_mean}"
        );
    }
}

// Out of CI for time (about 2.5 min each on lavapipe, and CI ran past its 30
// minutes): the two `whole_model_logits_match_ggml_f32_*` tests below check the same
// forward passes against a stricter oracle. Run with `--ignored`.
#[test]
#[ignore]
fn whole_model_logits_match_cpu_unshared() {
    whole_model("whole_model_logits_match_cpu_unshared", ShareMap::identity);
}

#[test]
#[ignore]
fn whole_model_logits_match_cpu_with_sharing() {
    // Three shared layers, two of them reading the same source: see
    // `support::three_layer_map`.
    whole_model("whole_model_logits_match_cpu_with_sharing", three_layer_map);
}

/// The GPU on the quantized model against ggml's CPU backend on the same model
/// dequantized to f32. Both then multiply the file's exact weight values by f32
/// activations, so what is left between them is summation order and ggml's f16
/// rounding of the query in its attention: the bar applies as stated,
/// max |logit diff| < 0.1 and top-1 identical at every position, with and without a
/// sharing map. (Against ggml on the quantized file itself, the difference is
/// ggml's 8-bit activation rounding, as large as ggml's own batch-size variation:
/// see `whole_model` above.) Measured on lavapipe: see the printed figures.
fn whole_model_vs_dequantized(test: &str, map: impl Fn(usize) -> ShareMap) {
    let path = support::default_model_path();
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let map = map(model.config.n_layers);
    let toks = prompt_tokens(&loaded, PROMPT);
    let Some((gpu, ours)) = gpu_logits(test, model, &map, &toks) else {
        return;
    };
    drop(gpu);

    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.gguf");
    dequantized_copy(&path, &f32_path);
    let f32_model = loader::load(&f32_path).unwrap();
    let theirs = cpu_logits(&f32_model.model, &map, &toks, RunOptions::default().n_batch);
    let n_vocab = model.config.n_vocab;
    assert_eq!(ours.len(), theirs.len());
    let (max, mean, mismatches) = compare_logits(&ours, &theirs, n_vocab);
    say(&format!(
        "{test}: {N_TOKENS} positions: gpu (q4_1 file) vs ggml cpu (f32-dequantized file): max |logit diff| {max:.5}, mean {mean:.5}, top-1 mismatches {mismatches}"
    ));
    assert!(max < 0.1, "max |logit diff| {max}");
    assert_eq!(mismatches, 0, "top-1 differs at {mismatches} positions");
}

#[test]
fn whole_model_logits_match_ggml_f32_unshared() {
    whole_model_vs_dequantized(
        "whole_model_logits_match_ggml_f32_unshared",
        ShareMap::identity,
    );
}

#[test]
fn whole_model_logits_match_ggml_f32_with_sharing() {
    // The 8-layer map the paper's search finds on this model (`calibrate --layers 8`).
    whole_model_vs_dequantized("whole_model_logits_match_ggml_f32_with_sharing", |n| {
        let mut src: Vec<usize> = (0..n).collect();
        for l in [11, 16, 18, 19, 21, 25, 27, 28] {
            src[l] = 9;
        }
        ShareMap::for_model(src, n).unwrap()
    });
}
