//! The wgpu backend against independent CPU oracles: every kernel on random data
//! (per weight type, with ggml's own quantizer and dequantizer as the reference for
//! the block formats), and the whole forward pass on the real default model against
//! the ggml CPU backend, with and without a sharing map.
//!
//! Runs on any wgpu adapter; in CI that is lavapipe (mesa-vulkan-drivers, software
//! Vulkan). Without an adapter each test prints why it is skipped, on stderr past
//! the test harness's capture, and returns.
//!
//! Whole-model parity (SmolLM2-135M-Instruct Q4_1, 64 tokens; 60 prefilled in one
//! pass, then 4 decoded one at a time so both matmul paths and both attention
//! kernels run): measured on lavapipe, see the figures in each test's assertion
//! message and the report in the commit log.

#![cfg(feature = "wgpu")]

mod support;

use std::io::Write;

use kvsharer::backend::ggml::{dequantize, quantize};
use kvsharer::backend::graph::Logits;
use kvsharer::backend::wgpu::{GpuError, GpuOptions, GpuSession, KernelHarness, GPU_WEIGHT_TYPES};
use kvsharer::loader;
use kvsharer::sample::argmax;
use kvsharer::session::{Session, SessionOptions};
use kvsharer::share::ShareMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{reference_forward_with, write_tiny_model, RefPrecision, TinySpec};

/// Printed past libtest's output capture, so a skip is never silent.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

fn harness(test: &str) -> Option<KernelHarness> {
    match KernelHarness::new() {
        Ok(h) => {
            say(&format!("{test}: adapter {}", h.adapter_description()));
            Some(h)
        }
        Err(GpuError::NoAdapter) => {
            say(&format!("{test}: SKIPPED: no wgpu adapter on this machine ({})", GpuError::NoAdapter));
            None
        }
        Err(e) => panic!("{test}: the wgpu backend failed to start: {e}"),
    }
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
    let Some(h) = harness("matmul_kernels_match_ggml_dequantized_weights") else { return };
    let mut rng = StdRng::seed_from_u64(7);
    for &ty in GPU_WEIGHT_TYPES {
        let w = random(&mut rng, ROWS * COLS, 1.0);
        let bytes = quantize(ty, &w, COLS).unwrap();
        let wd = dequantize(ty, &bytes, ROWS * COLS).unwrap();
        // 37 tokens: more than one 32-token tile, ending part-way through the second.
        for (tiled, m) in [(true, 37usize), (false, 3)] {
            let x = random(&mut rng, m * COLS, 1.0);
            let got = h.matmul(ty, &bytes, ROWS, COLS, &x, tiled).unwrap();
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
            assert!(worst < 2e-6, "{} {}: relative error {worst:e}", ty.name(), if tiled { "tiled" } else { "matvec" });
        }
    }
}

#[test]
fn embedding_lookup_matches_ggml_dequantize() {
    let Some(h) = harness("embedding_lookup_matches_ggml_dequantize") else { return };
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
                assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{} row {id} col {k}: gpu {g} ggml {e}", ty.name());
            }
        }
    }
}

#[test]
fn elementwise_kernels_match_f64_references() {
    let Some(h) = harness("elementwise_kernels_match_f64_references") else { return };
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
            assert!((got[t * n + i] as f64 - e).abs() < 1e-5 * e.abs().max(1.0), "rms_norm [{t}][{i}]");
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
                    let mut theta = (pos0 as f64 + t as f64) * (base as f64).powf(-2.0 * i as f64 / hd as f64);
                    if let Some(f) = ff {
                        theta /= f[i] as f64;
                    }
                    theta *= fscale as f64;
                    let o = t * heads * hd + hh * hd + 2 * i;
                    let (x0, x1) = (x[o] as f64, x[o + 1] as f64);
                    let e0 = x0 * theta.cos() - x1 * theta.sin();
                    let e1 = x0 * theta.sin() + x1 * theta.cos();
                    assert!((got[o] as f64 - e0).abs() < 2e-4 && (got[o + 1] as f64 - e1).abs() < 2e-4, "rope t{t} h{hh} i{i}: ({}, {}) vs ({e0}, {e1})", got[o], got[o + 1]);
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
        assert!((got[i] as f64 - e).abs() < 1e-5 * e.abs().max(1.0), "swiglu [{i}]: {} vs {e}", got[i]);
    }

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

/// Causal attention in f64 over f16-rounded queries, keys and values (the cache is
/// f16, and queries are rounded as ggml does).
#[allow(clippy::too_many_arguments)]
fn attention_reference(q: &[f32], k: &[f32], v: &[f32], n_head: usize, n_head_kv: usize, hd: usize, pos0: usize) -> Vec<f64> {
    let m = q.len() / (n_head * hd);
    let kvw = n_head_kv * hd;
    let mut out = vec![0f64; q.len()];
    for t in 0..m {
        for h in 0..n_head {
            let kvh = h / (n_head / n_head_kv);
            let qv: Vec<f64> = (0..hd).map(|d| f16_round(q[(t * n_head + h) * hd + d]) as f64).collect();
            let rows = pos0 + t + 1;
            let scores: Vec<f64> = (0..rows)
                .map(|j| (0..hd).map(|d| qv[d] * f16_round(k[j * kvw + kvh * hd + d]) as f64).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
            let ps: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = ps.iter().sum();
            for d in 0..hd {
                out[(t * n_head + h) * hd + d] = (0..rows).map(|j| ps[j] * f16_round(v[j * kvw + kvh * hd + d]) as f64).sum::<f64>() / sum;
            }
        }
    }
    out
}

#[test]
fn attention_kernels_match_f64_reference() {
    let Some(h) = harness("attention_kernels_match_f64_reference") else { return };
    let mut rng = StdRng::seed_from_u64(5);
    let (n_head, n_head_kv, hd) = (9usize, 3usize, 64usize);
    // Prefill: 70 queries at positions 10.. (more than one 64-key tile), and decode
    // at position 300 (three 128-key splits, the last one partial).
    for (pos0, m, split) in [(10usize, 70usize, false), (0, 1, true), (300, 1, true), (300, 1, false)] {
        let rows = pos0 + m;
        let q = random(&mut rng, m * n_head * hd, 2.0);
        let k = random(&mut rng, rows * n_head_kv * hd, 2.0);
        let v = random(&mut rng, rows * n_head_kv * hd, 1.0);
        let got = h.attention(&q, &k, &v, n_head, n_head_kv, hd, pos0, split).unwrap();
        let want = attention_reference(&q, &k, &v, n_head, n_head_kv, hd, pos0);
        let worst = got.iter().zip(&want).map(|(&g, &e)| (g as f64 - e).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4, "attention pos0 {pos0} tokens {m} split {split}: max |diff| {worst:e}");
    }
}

// ---- whole forward pass, tiny models of every GPU weight type ----

/// The GPU forward on tiny random models of each weight type against the f32
/// reference forward (tests/support, f16 KV cache), with a sharing map: the GPU
/// computes in f32 on exactly the dequantized weights the reference uses, so the
/// error is rounding only. Each error must also be far below what sharing changes.
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
        let tokens: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % spec.n_vocab as u32).collect();
        let mut gpu = GpuSession::new(&loaded.model, &map, &GpuOptions { n_ctx: 64, ..Default::default() }).unwrap();
        assert_eq!(gpu.n_slots(), 2);
        // 36 in one pass, 4 decoded one by one.
        let mut ours = gpu.eval(&tokens[..36], Logits::All).unwrap();
        for &t in &tokens[36..] {
            ours.extend(gpu.eval(&[t], Logits::Last).unwrap());
        }
        let precision = RefPrecision { kv_cache_f16: true, attn_inputs_f16: false };
        let reference = reference_forward_with(&weights, &spec, &map, &tokens, precision).logits.concat();
        let unshared = reference_forward_with(&weights, &spec, &ShareMap::identity(4), &tokens, precision).logits.concat();
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let err = diff(&ours, &reference);
        let separation = diff(&reference, &unshared);
        say(&format!("{test}: {:>5}: max |gpu - ref| {err:.5}, sharing moves the reference by {separation:.3}", ty.name()));
        assert_eq!(ours.len(), reference.len());
        assert!(err < 0.02, "{}: max |gpu - ref| {err}", ty.name());
        assert!(err < 0.05 * separation, "{}: error {err} is not small next to the sharing effect {separation}", ty.name());
    }
}

// ---- whole model ----

const PROMPT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, \
    counting one hundred and twelve steps. In 1987 the lamp was converted to electricity, \
    yet he still carried a brass oil can, out of habit more than need. Ships passing the \
    headland would flash their lights twice in greeting; he answered with three long \
    blinks. The village below kept its own rhythm.";

const N_TOKENS: usize = 64;
const N_PREFILL: usize = 60;
const TOLERANCE: f32 = 0.1;

/// GPU logits for 64 tokens (60 in one prefill pass, then 4 decode passes) against
/// ggml's CPU backend on the same map, and the GPU's greedy argmax. Returns
/// (max |diff|, top-1 mismatches).
fn whole_model(test: &str, map_of: impl Fn(usize) -> ShareMap) -> Option<(f32, usize)> {
    let path = kvsharer::fetch::model_for_tests();
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let map = map_of(model.config.n_layers);
    let mut toks = loaded.tokenizer.encode(PROMPT, true, false).unwrap();
    assert!(toks.len() >= N_TOKENS, "prompt is only {} tokens", toks.len());
    toks.truncate(N_TOKENS);

    let opts = GpuOptions {
        n_ctx: 128,
        ..Default::default()
    };
    let mut gpu = match GpuSession::new(model, &map, &opts) {
        Ok(s) => s,
        Err(GpuError::NoAdapter) => {
            say(&format!("{test}: SKIPPED: no wgpu adapter on this machine"));
            return None;
        }
        Err(e) => panic!("{test}: {e}"),
    };
    say(&format!("{test}: adapter {}", gpu.adapter_description()));
    assert_eq!(gpu.n_slots(), map.owner_count());
    let mut ours = gpu.eval(&toks[..N_PREFILL], Logits::All).unwrap();
    for &t in &toks[N_PREFILL..] {
        ours.extend(gpu.eval(&[t], Logits::Last).unwrap());
    }
    assert_eq!(gpu.n_past(), N_TOKENS);

    let mut cpu = Session::new(
        model,
        &map,
        &SessionOptions {
            n_ctx: 128,
            n_threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let theirs = cpu.eval(&toks, Logits::All).unwrap();
    let n_vocab = model.config.n_vocab;
    assert_eq!(ours.len(), theirs.len());
    let mut max_diff = 0f32;
    let mut mismatches = 0;
    for (pos, (a, b)) in ours.chunks(n_vocab).zip(theirs.chunks(n_vocab)).enumerate() {
        if std::env::var_os("KVSHARER_DEBUG_POS").is_some() {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let mean_abs = b.iter().map(|x| x.abs()).sum::<f32>() / n_vocab as f32;
            say(&format!("pos {pos}: max diff {d} (mean |logit| {mean_abs}) top {} vs {}", argmax(a), argmax(b)));
        }
        if argmax(a) != argmax(b) {
            mismatches += 1;
        }
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
        }
    }

    // Greedy decoding on the GPU picks the CPU's top token after the prompt.
    gpu.truncate(N_TOKENS - 1);
    let id = gpu.eval_argmax(&toks[N_TOKENS - 1..]).unwrap();
    assert_eq!(id, argmax(&theirs[(N_TOKENS - 1) * n_vocab..]));
    say(&format!("{test}: 64 positions, max |logit diff| vs ggml CPU {max_diff}, top-1 mismatches {mismatches}"));
    Some((max_diff, mismatches))
}

#[test]
fn whole_model_logits_match_cpu_unshared() {
    let test = "whole_model_logits_match_cpu_unshared";
    let Some((diff, mismatches)) = whole_model(test, ShareMap::identity) else { return };
    assert_eq!(mismatches, 0, "top-1 differs at {mismatches} positions (max |diff| {diff})");
    assert!(diff < TOLERANCE, "max |logit diff| {diff}");
}

#[test]
fn whole_model_logits_match_cpu_with_sharing() {
    let test = "whole_model_logits_match_cpu_with_sharing";
    // Seven shared layers, including two reading the same source and one reading
    // layer 0.
    let map = |n: usize| {
        let mut src: Vec<usize> = (0..n).collect();
        for (l, s) in [(1, 0), (8, 7), (9, 7), (15, 14), (21, 20), (26, 25), (29, 28)] {
            src[l] = s;
        }
        ShareMap::for_model(src, n).unwrap()
    };
    let Some((diff, mismatches)) = whole_model(test, map) else { return };
    assert_eq!(mismatches, 0, "top-1 differs at {mismatches} positions (max |diff| {diff})");
    assert!(diff < TOLERANCE, "max |logit diff| {diff}");
}
