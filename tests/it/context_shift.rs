//! Context shift (llama.cpp style): after dropping `n_discard` cells behind the
//! first `n_keep`, every slot holds the kept rows moved down, values unchanged and
//! keys re-rotated to their new positions. (Layers above the first still remember
//! that the dropped tokens were once in context, in llama.cpp as here: a shift is
//! an approximation only in that sense.)

use crate::support;

use kvsharer::backend::ggml::kv::KvPart;
use kvsharer::backend::ggml::{DeviceKind, Session};
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::{Half, KvPlan, ShareMap};
use kvsharer::loader;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};

pub(crate) const KEEP: usize = 4;
pub(crate) const DISCARD: usize = 10;
pub(crate) const N: usize = 40;

/// The tiny model both backends shift on: head_dim 32, so q8_0 and q4_0 blocks
/// fit a head.
pub(crate) fn tiny(dir: &tempfile::TempDir) -> (support::TinySpec, std::path::PathBuf) {
    let spec = support::TinySpec {
        n_layers: 4,
        n_embd: 128,
        ..Default::default()
    };
    let path = dir.path().join("m.gguf");
    support::write_tiny_model(&spec, &path);
    (spec, path)
}

/// The plans every backend is shifted under: whole-layer maps in f16, q8_0 and
/// q4_0, and one with keys and values shared apart in mixed types.
pub(crate) fn plans() -> Vec<KvPlan> {
    use GgmlType::{F16, Q4_0, Q8_0};
    let mut plans = Vec::new();
    for map in [
        ShareMap::identity(4),
        ShareMap::new(vec![0, 1, 0, 1]).unwrap(),
    ] {
        for ty in [F16, Q8_0, Q4_0] {
            plans.push(KvPlan::uniform(&map, ty, ty));
        }
    }
    plans.push(
        KvPlan::new(
            vec![0, 1, 1, 3],
            vec![0, 0, 2, 2],
            vec![Q8_0, F16, F16, Q4_0],
            vec![F16, F16, Q4_0, F16],
            4,
        )
        .unwrap(),
    );
    // llama.cpp's other cache types, K and V shared apart. (q5_1 is left to
    // `wgpu_cache::every_cache_type_stores_what_ggml_stores`: with its finer steps
    // one key element here sits on a rounding boundary, lands a step apart on the
    // GPU and moves the logits by 0.06.)
    use GgmlType::{IQ4_NL, Q4_1, Q5_0};
    plans.push(
        KvPlan::new(
            vec![0, 1, 1, 3],
            vec![0, 0, 2, 3],
            vec![Q5_0, IQ4_NL, IQ4_NL, Q4_1],
            vec![Q5_0, Q5_0, Q4_1, IQ4_NL],
            4,
        )
        .unwrap(),
    );
    plans
}

/// On `s` (opened for its plan, `N` tokens of context free): after a shift, every
/// layer's values are the old rows moved down, bit for bit, and its keys are the
/// old ones rotated back by `DISCARD` positions (rotating them forward again gives
/// the old keys within the cache type's rounding).
pub(crate) fn check_shift(s: &mut dyn RunState<'_>, spec: &support::TinySpec, what: &str) {
    let toks: Vec<u32> = (0..N as u32).map(|i| (i * 31 + 7) % 90).collect();
    let kv = spec.kv_dim();
    s.eval(&toks, Logits::None).unwrap();
    let before: Vec<_> = (0..4).map(|l| s.read_kv(l, 0..N).unwrap()).collect();
    s.context_shift(KEEP, DISCARD).unwrap();
    assert_eq!(s.n_past(), N - DISCARD);
    for (l, (k0, v0)) in before.iter().enumerate() {
        let (k1, v1) = s.read_kv(l, 0..N - DISCARD).unwrap();
        assert_eq!(&v1[..KEEP * kv], &v0[..KEEP * kv], "{what}");
        assert_eq!(
            &v1[KEEP * kv..],
            &v0[(KEEP + DISCARD) * kv..],
            "{what}: layer {l} values moved"
        );
        assert_eq!(
            &k1[..KEEP * kv],
            &k0[..KEEP * kv],
            "{what}: kept keys untouched"
        );
        // Key rounding: f16 keeps ~3 digits; q8_0 and q4_0 keys are re-quantized
        // after rotation (a q4_0 step is 1/8 of a block's largest key).
        let tol = match s.plan().read_type(Half::Keys, l) {
            GgmlType::F16 => 4e-3,
            GgmlType::Q8_0 => 0.06,
            _ => 0.5,
        };
        let mut restored = k1[KEEP * kv..].to_vec();
        support::rope_norm(&mut restored, spec.head_dim(), DISCARD, spec.rope_base);
        let d = support::max_abs_diff(&restored, &k0[(KEEP + DISCARD) * kv..]);
        assert!(d < tol, "{what} layer {l}: re-rotation off by {d}");
        let unrotated = support::max_abs_diff(&k1[KEEP * kv..], &k0[(KEEP + DISCARD) * kv..]);
        assert!(
            unrotated > 4.0 * tol,
            "{what} layer {l}: keys were not rotated at all ({unrotated})"
        );
    }
}

#[test]
fn shift_moves_values_and_rerotates_keys_in_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, path) = tiny(&dir);
    let loaded = loader::load(&path).unwrap();
    let opts = RunOptions {
        n_ctx: 64,
        n_threads: 2,
        ..Default::default()
    };
    for plan in plans() {
        let mut s = Session::with_plan(DeviceKind::Cpu, &loaded.model, &plan, &opts).unwrap();
        check_shift(&mut s, &spec, &format!("cpu {plan}"));
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
