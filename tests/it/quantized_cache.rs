//! Quantized KV caches (q8_0, q5_1, q5_0, q4_1, iq4_nl, q4_0) against the plain
//! f32 reference, token by token.
//!
//! Decoding one token over a quantized cache runs kvsharer's own grouped attention
//! kernel (`backend::ggml::decode_attention`) where the CPU has AVX2; a batch of tokens
//! runs ggml's flash attention over the cells dequantized to f32, per query for
//! fewer than 64 tokens and tiled for 64 or more. All read the same quantized
//! cells, so the paths must agree closely with each other, and all must
//! stay near the f32 reference (which never rounds K or V) within the cache type's
//! rounding.

use crate::support;

use kvsharer::backend::ggml::decode_attention;
use kvsharer::backend::ggml::Session;
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};
use support::{max_abs_diff, reference_forward, write_tiny_model, TinySpec};

const N: usize = 80;
const PREFILL: usize = 6;
/// A batch this long takes ggml's per-query flash attention (fewer than 64 queries),
/// over the same f32 cells.
const SHORT_BATCH: usize = 40;

/// head_dim 64 (the kernel's smallest), GQA 2: 4 query heads over 2 KV heads.
fn spec() -> TinySpec {
    TinySpec {
        n_layers: 4,
        n_embd: 256,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 512,
        ..TinySpec::default()
    }
}

/// Logits of every position: the first `PREFILL` tokens as one batch, then one
/// token per call (the decode path).
fn decode_logits(s: &mut Session<'_>, tokens: &[u32], n_vocab: usize) -> Vec<f32> {
    let mut out = s.eval(&tokens[..PREFILL], Logits::All).unwrap();
    for &t in &tokens[PREFILL..] {
        let row = s.eval(&[t], Logits::Last).unwrap();
        assert_eq!(row.len(), n_vocab);
        out.extend(row);
    }
    out
}

#[test]
fn quantized_cache_decoding_matches_the_f32_reference_and_ggml_batches() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let weights = write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let tokens: Vec<u32> = (0..N as u32)
        .map(|i| (i * 37 + 5) % spec.n_vocab as u32)
        .collect();
    let kernel = decode_attention::supports(GgmlType::Q8_0, GgmlType::Q8_0, 64, 4, 2);
    if !kernel {
        eprintln!("note: no AVX2/FMA/F16C here, so decoding uses ggml's kernel too");
    }
    // (cache type, tolerance vs the f32 reference on logits of magnitude ~5-10,
    //  tolerance between the decode path and a ggml batch over the same cells: the
    //  same values in another summation order; measured: q8_0 0.045 / 0.031, q4_0
    //  0.64-0.83 / 0.10 when short batches still rounded Q to q8_0 for their key dots)
    //  q5_1, q5_0, q4_1, iq4_nl: llama.cpp's other cache types, same kernel)
    for (ty, tol_ref, tol_paths) in [
        (GgmlType::Q8_0, 0.15, 0.08),
        (GgmlType::Q5_1, 0.5, 0.15),
        (GgmlType::Q5_0, 0.5, 0.15),
        (GgmlType::Q4_1, 1.0, 0.25),
        (GgmlType::IQ4_NL, 1.0, 0.25),
        (GgmlType::Q4_0, 1.0, 0.25),
    ] {
        for map in [
            ShareMap::identity(4),
            ShareMap::new(vec![0, 1, 0, 1]).unwrap(),
        ] {
            let opts = RunOptions {
                n_ctx: N,
                n_threads: 2,
                type_k: ty,
                type_v: ty,
                ..Default::default()
            };
            let mut s = Session::new(&loaded.model, &map, &opts).unwrap();
            let decoded = decode_logits(&mut s, &tokens, spec.n_vocab);
            // All N tokens in one batch: the dequantized (tiled) path.
            let mut s = Session::new(&loaded.model, &map, &opts).unwrap();
            let batched = s.eval(&tokens, Logits::All).unwrap();
            // Batches of SHORT_BATCH: the per-query kernel.
            let mut s = Session::new(&loaded.model, &map, &opts).unwrap();
            let short: Vec<f32> = tokens
                .chunks(SHORT_BATCH)
                .flat_map(|chunk| s.eval(chunk, Logits::All).unwrap())
                .collect();
            let reference = reference_forward(&weights, &spec, &map, &tokens).concat();
            let unshared = reference_forward(&weights, &spec, &ShareMap::identity(4), &tokens);

            let vs_ref = max_abs_diff(&decoded, &reference);
            let vs_batch = max_abs_diff(
                &decoded[PREFILL * spec.n_vocab..],
                &batched[PREFILL * spec.n_vocab..],
            );
            let short_vs_batch = max_abs_diff(&short, &batched);
            let batch_vs_ref = max_abs_diff(&batched, &reference);
            let short_vs_ref = max_abs_diff(&short, &reference);
            let separation = max_abs_diff(&reference, &unshared.concat());
            eprintln!(
                "{} map {map}: decode vs f32 ref {vs_ref:.4}, ggml batch vs f32 ref {batch_vs_ref:.4} (short batches {short_vs_ref:.4}), decode vs batch {vs_batch:.4}, short batches vs batch {short_vs_batch:.4} (sharing moves logits by {separation:.3})",
                ty.name()
            );
            assert!(
                short_vs_ref < tol_ref,
                "{} map {map}: short batches {short_vs_ref}",
                ty.name()
            );
            assert!(
                short_vs_batch < tol_paths,
                "{} map {map}: short batches and one batch differ by {short_vs_batch}",
                ty.name()
            );
            assert!(
                vs_ref < tol_ref,
                "{} map {map}: {vs_ref} >= {tol_ref}",
                ty.name()
            );
            assert!(
                batch_vs_ref < tol_ref,
                "{} map {map}: batch {batch_vs_ref}",
                ty.name()
            );
            assert!(
                vs_batch < tol_paths,
                "{} map {map}: paths differ by {vs_batch}",
                ty.name()
            );
            if !map.is_identity() {
                assert!(
                    vs_ref < 0.25 * separation,
                    "error {vs_ref} vs sharing effect {separation}"
                );
            }
        }
    }
}
