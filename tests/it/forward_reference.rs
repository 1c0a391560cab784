//! The ggml forward pass against a plain f32 reference forward (tests/support), on
//! tiny random models written by the tests, for every weight type ggml can multiply,
//! with and without a non-trivial sharing map.
//!
//! Tolerances: ggml converts activations to the weight's "vec_dot" type before a
//! matmul (f16 for F16, bf16 for BF16, 8-bit blocks for quantized types), which the
//! f32 reference does not, so the allowed error grows with the weight type. Every
//! comparison must also be far closer to the reference with the *same* map than the
//! reference with another map is (ratio < 0.25), so a test cannot pass by accident.
//! Measured max errors: f32 0.006, f16 0.008, bf16 0.034, 4-8 bit quants 0.08-0.16,
//! while sharing moves the reference logits by 2.5-4.

use crate::support;

use kvsharer::backend::ggml::Session;
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};
use support::{max_abs_diff, reference_forward_with, write_tiny_model, RefPrecision, TinySpec};

/// Max |ours - reference| over all positions, and the distance between the
/// reference's logits under `map` and under the identity map.
fn check(ty: GgmlType, map_sources: Vec<usize>, tol: f32) -> (f32, f32) {
    let mut spec = TinySpec::for_type(ty);
    spec.n_layers = map_sources.len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let weights = write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap_or_else(|e| panic!("{}: {e}", ty.name()));
    let map = ShareMap::new(map_sources).unwrap();
    let tokens: Vec<u32> = (0..24u32)
        .map(|i| (i * 7 + 3) % spec.n_vocab as u32)
        .collect();
    let opts = RunOptions {
        n_ctx: 64,
        n_batch: 512,
        n_threads: 2,
        ..Default::default()
    };
    let mut s = Session::new(&loaded.model, &map, &opts).unwrap();
    let ours = s.eval(&tokens, Logits::All).unwrap();

    let precision = RefPrecision {
        kv_cache_f16: true,
        attn_inputs_f16: false,
    };
    let reference = reference_forward_with(&weights, &spec, &map, &tokens, precision)
        .logits
        .concat();
    let unshared = ShareMap::identity(spec.n_layers);
    let other = reference_forward_with(&weights, &spec, &unshared, &tokens, precision)
        .logits
        .concat();
    let err = max_abs_diff(&ours, &reference);
    let separation = max_abs_diff(&reference, &other);
    eprintln!(
        "{:>8} map {map}: max |ours - ref| {err:.5}, |ref(map) - ref(identity)| {separation:.4}",
        ty.name()
    );
    assert!(err < tol, "{}: max diff {err} >= {tol}", ty.name());
    if !map.is_identity() {
        assert!(
            err < 0.25 * separation,
            "{}: error {err} is not small next to the sharing effect {separation}",
            ty.name()
        );
    }
    (err, separation)
}

/// (type, tolerance on logits of magnitude ~5-10)
const TYPES: &[(GgmlType, f32)] = &[
    (GgmlType::F32, 0.01),
    (GgmlType::F16, 0.015),
    (GgmlType::BF16, 0.06),
    (GgmlType::Q8_0, 0.15),
    (GgmlType::Q4_0, 0.3),
    (GgmlType::Q4_1, 0.3),
    (GgmlType::Q5_0, 0.3),
    (GgmlType::Q5_1, 0.3),
    (GgmlType::Q2_K, 0.5),
    (GgmlType::Q3_K, 0.5),
    (GgmlType::Q4_K, 0.3),
    (GgmlType::Q5_K, 0.3),
    (GgmlType::Q6_K, 0.3),
    (GgmlType::IQ4_NL, 0.3),
    (GgmlType::IQ4_XS, 0.3),
    (GgmlType::TQ1_0, 0.5),
    (GgmlType::TQ2_0, 0.5),
    (GgmlType::MXFP4, 0.5),
];

#[test]
fn every_weight_type_matches_the_reference_without_sharing() {
    for &(ty, tol) in TYPES {
        check(ty, vec![0, 1, 2], tol);
    }
}

#[test]
fn every_weight_type_matches_the_reference_with_sharing() {
    for &(ty, tol) in TYPES {
        // Layer 2 reads layer 0's cache, layer 3 reads layer 1's.
        check(ty, vec![0, 1, 0, 1], tol);
    }
}

#[test]
fn sharing_with_many_readers_of_one_slot_matches_the_reference() {
    check(GgmlType::F32, vec![0, 0, 2, 0, 2], 0.01);
}

#[test]
fn kv_bytes_are_exactly_the_owned_fraction() {
    let spec = TinySpec {
        n_layers: 4,
        ..TinySpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let opts = RunOptions {
        n_ctx: 128,
        n_threads: 1,
        ..Default::default()
    };
    let full = Session::new(&loaded.model, &ShareMap::identity(4), &opts)
        .unwrap()
        .kv_bytes();
    for (sources, owners) in [
        (vec![0, 1, 2, 3], 4),
        (vec![0, 0, 2, 3], 3),
        (vec![0, 0, 0, 3], 2),
    ] {
        let map = ShareMap::new(sources).unwrap();
        let s = Session::new(&loaded.model, &map, &opts).unwrap();
        assert_eq!(s.kv_bytes() * 4, full * owners, "map {map}");
        assert_eq!(s.cache().bytes_per_token_unshared() * 128, full);
    }
    // f16, 2 KV heads x 16 dims, K and V, 128 cells, 4 layers.
    assert_eq!(full, 2 * 2 * 32 * 128 * 4);
}

#[test]
fn unsupported_weight_types_are_a_clear_error() {
    for ty in [GgmlType::NVFP4, GgmlType::Q1_0, GgmlType::Q2_0] {
        let spec = TinySpec::for_type(ty);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        if support::try_write_tiny_model(&spec, &path).is_err() {
            continue;
        }
        let msg = match loader::load(&path) {
            Ok(_) => panic!("{} should be refused", ty.name()),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains(ty.name()) && msg.contains("cannot run"),
            "{msg}"
        );
    }
}
