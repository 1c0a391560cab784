//! Context shift (llama.cpp style): after dropping `n_discard` cells behind the
//! first `n_keep`, every slot holds the kept rows moved down, values unchanged and
//! keys re-rotated to their new positions. (Layers above the first still remember
//! that the dropped tokens were once in context, in llama.cpp as here: a shift is
//! an approximation only in that sense.)

use crate::support;

use kvsharer::backend::ggml::kv::KvPart;
use kvsharer::backend::ggml::Session;
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};

const KEEP: usize = 4;
const DISCARD: usize = 10;
const N: usize = 40;

#[test]
fn shift_moves_values_and_rerotates_keys_in_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    // head_dim 32, so q8_0 blocks fit a head.
    let spec = support::TinySpec {
        n_layers: 4,
        n_embd: 128,
        ..Default::default()
    };
    let path = dir.path().join("m.gguf");
    support::write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let toks: Vec<u32> = (0..N as u32).map(|i| (i * 31 + 7) % 90).collect();
    let kv = spec.kv_dim();
    for map in [
        ShareMap::identity(4),
        ShareMap::new(vec![0, 1, 0, 1]).unwrap(),
    ] {
        for ty in [GgmlType::F16, GgmlType::Q8_0] {
            let opts = RunOptions {
                n_ctx: 64,
                n_threads: 2,
                type_k: ty,
                type_v: ty,
                ..Default::default()
            };
            let mut s = Session::new(&loaded.model, &map, &opts).unwrap();
            s.eval(&toks, Logits::None).unwrap();
            let before: Vec<_> = (0..4)
                .map(|l| {
                    (
                        s.cache().read_rows_f32(l, KvPart::Keys, 0..N).unwrap(),
                        s.cache().read_rows_f32(l, KvPart::Values, 0..N).unwrap(),
                    )
                })
                .collect();
            s.context_shift(KEEP, DISCARD).unwrap();
            assert_eq!(s.n_past(), N - DISCARD);
            // Key rounding: f16 keeps ~3 digits, q8_0 is re-quantized after rotation.
            let tol = if ty == GgmlType::F16 { 4e-3 } else { 0.06 };
            for (l, (k0, v0)) in before.iter().enumerate() {
                let k1 = s
                    .cache()
                    .read_rows_f32(l, KvPart::Keys, 0..N - DISCARD)
                    .unwrap();
                let v1 = s
                    .cache()
                    .read_rows_f32(l, KvPart::Values, 0..N - DISCARD)
                    .unwrap();
                assert_eq!(&v1[..KEEP * kv], &v0[..KEEP * kv]);
                assert_eq!(
                    &v1[KEEP * kv..],
                    &v0[(KEEP + DISCARD) * kv..],
                    "layer {l} values moved"
                );
                assert_eq!(&k1[..KEEP * kv], &k0[..KEEP * kv], "kept keys untouched");
                // Rotating the shifted keys forward by DISCARD gives the old keys back.
                let mut restored = k1[KEEP * kv..].to_vec();
                support::rope_norm(&mut restored, spec.head_dim(), DISCARD, spec.rope_base);
                let d = support::max_abs_diff(&restored, &k0[(KEEP + DISCARD) * kv..]);
                assert!(
                    d < tol,
                    "map {map} {} layer {l}: re-rotation off by {d}",
                    ty.name()
                );
                let unrotated =
                    support::max_abs_diff(&k1[KEEP * kv..], &k0[(KEEP + DISCARD) * kv..]);
                assert!(
                    unrotated > 10.0 * tol,
                    "keys were not rotated at all ({unrotated})"
                );
            }
        }
    }
}

#[test]
fn first_layer_keys_after_a_shift_equal_a_fresh_evaluation() {
    // Layer 0's keys depend only on token and position, so there the shifted cache
    // must equal evaluating the kept tokens from scratch.
    let path = support::default_model_path();
    let loaded = loader::load(&path).unwrap();
    let map = ShareMap::identity(loaded.model.config.n_layers);
    let opts = RunOptions {
        n_ctx: 64,
        n_threads: 2,
        ..Default::default()
    };
    let toks: Vec<u32> = (0..N as u32).map(|i| (i * 977 + 13) % 40000).collect();
    let mut a = Session::new(&loaded.model, &map, &opts).unwrap();
    a.eval(&toks, Logits::None).unwrap();
    a.context_shift(KEEP, DISCARD).unwrap();
    let mut b = Session::new(&loaded.model, &map, &opts).unwrap();
    let kept: Vec<u32> = toks[..KEEP]
        .iter()
        .chain(&toks[KEEP + DISCARD..])
        .copied()
        .collect();
    b.eval(&kept, Logits::None).unwrap();
    let ka = a
        .cache()
        .read_rows_f32(0, KvPart::Keys, 0..N - DISCARD)
        .unwrap();
    let kb = b
        .cache()
        .read_rows_f32(0, KvPart::Keys, 0..N - DISCARD)
        .unwrap();
    let scale = kb.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = support::max_abs_diff(&ka, &kb);
    eprintln!("layer-0 keys after shift vs fresh: max |diff| {d} (max |key| {scale})");
    assert!(d < 2e-3 * scale.max(1.0), "{d}");
    // And generation goes on from the shifted cache.
    let logits = a.eval(&[toks[0]], Logits::Last).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    assert_eq!(a.n_past(), N - DISCARD + 1);
}
