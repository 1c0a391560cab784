//! Fitted adapters for shared halves (issue 14, item 3) on tiny random models.
//!
//! Oracle: the plain f32 reference forward (`support::reference_forward_split`) on
//! the same weights with the adapted layer's `attn_output` (`attn_q`) replaced by
//! the folded tensor. An adapter is a weight substitution the runtime makes only
//! when the plan reads the half from the source it was fitted for, so the runtime
//! must agree with that reference (kv_plan's tolerance for F16 weights: 0.015, and
//! under a quarter of what the adapters themselves change), and must run exactly
//! the original weights under any other plan.

use crate::kv_plan::{kvsharer, run_four_tokens, stderr};
use crate::support;

use kvsharer::backend::ggml::{DeviceKind, Session};
use kvsharer::gguf::{Array, GgmlType, Value};
use kvsharer::kvplan::{Half, KvPlan};
use kvsharer::loader;
use kvsharer::model::{LayerRole, Model, Role};
use kvsharer::runtime::{Logits, RunOptions, RunState};
use kvsharer::search::adapter::{self, AdapterOptions, AdapterPair, Adapters};
use support::{max_abs_diff, reference_forward_split, write_tiny_model, RefPrecision, TinySpec};

const F16: GgmlType = GgmlType::F16;

fn opts() -> RunOptions {
    RunOptions {
        n_ctx: 64,
        n_batch: 512,
        n_threads: 2,
        ..Default::default()
    }
}

fn logits(model: &Model, plan: &KvPlan, toks: &[u32]) -> Vec<f32> {
    let mut s = Session::with_plan(DeviceKind::Cpu, model, plan, &opts()).unwrap();
    s.eval(toks, Logits::All).unwrap()
}

/// Values of `v.0` read from `v.1`, keys of `k.0` from `k.1`.
fn two_pairs(v: (usize, usize), k: (usize, usize)) -> [AdapterPair; 2] {
    [
        AdapterPair {
            half: Half::Values,
            layer: v.0,
            source: v.1,
        },
        AdapterPair {
            half: Half::Keys,
            layer: k.0,
            source: k.1,
        },
    ]
}

fn folded(adapters: &Adapters, half: Half, layer: usize) -> Vec<f32> {
    let (_, t) = adapters
        .fitted
        .iter()
        .find(|(p, _)| p.half == half && p.layer == layer)
        .expect("fitted");
    t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn adapted_shares_match_the_reference_forward_with_folded_weights() {
    let spec = TinySpec::four_layers_head_dim_64();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let weights = write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let texts: Vec<Vec<u32>> = (0..6u32)
        .map(|s| {
            (0..40u32)
                .map(|i| (i * (7 + s) + 3 * s + 1) % spec.n_vocab as u32)
                .collect()
        })
        .collect();
    let pairs = two_pairs((2, 1), (3, 2));
    for fit in [adapter::ValueFit::Attention, adapter::ValueFit::Rows] {
        let o = AdapterOptions {
            fit,
            ..AdapterOptions::default()
        };
        let (adapters, rows) = adapter::fit(&loaded.model, &pairs, &texts, 2, &o, |_| {}).unwrap();
        assert_eq!(rows, 6 * 40);
        assert_eq!(adapters.counts(), (1, 1));
        let adapted = adapter::adapted_model(&loaded.model, &adapters, dir.path()).unwrap();
        let w = &adapted.model.weights;
        assert_eq!(w.adapted_for(Half::Values), &[None, None, Some(1), None]);
        assert_eq!(w.adapted_for(Half::Keys), &[None, None, None, Some(2)]);

        let plan = KvPlan::unshared(4, F16, F16)
            .with_shared(Half::Values, 2, 1)
            .unwrap()
            .with_shared(Half::Keys, 3, 2)
            .unwrap();
        let toks = &texts[0];
        let ours = logits(&adapted.model, &plan, toks);
        let mut folded_weights = weights.clone();
        folded_weights.layers[2].wo.data = folded(&adapters, Half::Values, 2);
        folded_weights.layers[3].wq.data = folded(&adapters, Half::Keys, 3);
        let precision = RefPrecision {
            kv_cache_f16: true,
            attn_inputs_f16: false,
        };
        let run_ref = |w| {
            reference_forward_split(
                w,
                &spec,
                plan.sources(Half::Keys),
                plan.sources(Half::Values),
                toks,
                precision,
            )
            .logits
            .concat()
        };
        let reference = run_ref(&folded_weights);
        let plain = run_ref(&weights);
        let err = max_abs_diff(&ours, &reference);
        let separation = max_abs_diff(&reference, &plain);
        eprintln!(
            "{fit:?}: max |ours - folded ref| {err:.5}, adapters move logits {separation:.4}"
        );
        assert!(err < 0.015, "{fit:?}: {err}");
        assert!(err < 0.25 * separation, "{fit:?}: {err} vs {separation}");

        // Fitted on this text, the adapters bring the shared model closer to the
        // unshared one than sharing alone (squared logit distance).
        let unshared = logits(&loaded.model, &KvPlan::unshared(4, F16, F16), toks);
        let without = logits(&loaded.model, &plan, toks);
        let dist = |a: &[f32]| -> f64 {
            a.iter()
                .zip(&unshared)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum()
        };
        eprintln!(
            "{fit:?}: distance to unshared, shared {:.3}, shared + adapters {:.3}",
            dist(&without),
            dist(&ours)
        );
        assert!(dist(&ours) < dist(&without), "{fit:?}");

        // Any other source: the adapters stay out and the original weights run.
        let other = KvPlan::unshared(4, F16, F16)
            .with_shared(Half::Values, 2, 0)
            .unwrap()
            .with_shared(Half::Keys, 3, 1)
            .unwrap();
        assert_eq!(
            logits(&adapted.model, &other, toks),
            logits(&loaded.model, &other, toks)
        );
        let none = KvPlan::unshared(4, F16, F16);
        assert_eq!(logits(&adapted.model, &none, toks), unshared);
    }
}

#[test]
fn malformed_adapter_metadata_is_refused() {
    let spec = TinySpec {
        n_layers: 3,
        ..TinySpec::four_layers_head_dim_64()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let file = loaded.model.file();
    let out_info = file
        .tensor(&Role::Layer(2, LayerRole::AttnOutput).tensor_name())
        .unwrap();
    let n = out_info.dims.iter().product::<u64>() as usize;
    let tensor = kvsharer::gguf::NewTensor {
        name: Role::Layer(2, LayerRole::AttnOutputAdapted).tensor_name(),
        dims: out_info.dims.clone(),
        ty: GgmlType::F32,
        data: vec![0u8; 4 * n],
    };
    let key = kvsharer::model::adapter_key(Half::Values).to_string();
    let write = |kv: Vec<(String, Value)>, tensors: &[kvsharer::gguf::NewTensor]| {
        let out = dir.path().join("bad.gguf");
        kvsharer::gguf::write_with_tensors(file, &kv, &[], &|_| false, tensors, &out).unwrap();
        Model::load(&out)
    };
    let u32s = |v: Vec<u32>| Value::Array(Array::U32(v));
    let good = write(
        vec![(key.clone(), u32s(vec![0, 1, 1]))],
        std::slice::from_ref(&tensor),
    )
    .unwrap();
    assert_eq!(
        good.weights.adapted_for(Half::Values),
        &[None, None, Some(1)]
    );
    let cases = [
        (
            "an adapted tensor without its key",
            vec![],
            "no kvsharer.adapter",
        ),
        (
            "a key of the wrong length",
            vec![(key.clone(), u32s(vec![0, 1]))],
            "2 entries for 3 layers",
        ),
        (
            "a source that is not an earlier layer",
            vec![(key.clone(), u32s(vec![0, 1, 2]))],
            "not an earlier layer",
        ),
        (
            "a key of the wrong type",
            vec![(key.clone(), Value::String("1".into()))],
            "array of u32",
        ),
    ];
    for (what, kv, needle) in cases {
        let err = match write(kv, std::slice::from_ref(&tensor)) {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{what}: {err}");
    }
    // A wrongly shaped adapted tensor is refused too.
    let short = kvsharer::gguf::NewTensor {
        dims: vec![out_info.dims[0], out_info.dims[1] / 2],
        data: vec![0u8; 2 * n],
        ..tensor
    };
    let err = match write(vec![(key, u32s(vec![0, 1, 1]))], &[short]) {
        Ok(_) => panic!("a wrongly shaped adapted tensor loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("attn_output.kvsharer"), "{err}");
}

#[test]
fn cli_plans_with_adapters_and_stores_only_those_the_plan_uses() {
    let spec = TinySpec::four_layers_head_dim_64();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &model);
    let m = model.to_str().unwrap();
    let small = [
        "--plan-samples",
        "2",
        "--plan-tokens",
        "8",
        "-t",
        "2",
        "--plan-types",
        "f16",
        "--adapters",
        "values",
        "--adapter-tokens",
        "16",
        "--kv-budget",
        "75%",
    ];
    let mut args = vec!["plan", "-m", m, "--json"];
    args.extend(small);
    let o = kvsharer(&args, &cache);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("3 value (attn_output"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Every layer's share from the layer below measured with its adapter.
    let adapted_moves: Vec<u64> = v["costs"]["shares"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["adapted"] == true)
        .map(|s| s["layer"].as_u64().unwrap())
        .collect();
    assert_eq!(adapted_moves, [1, 2, 3], "{}", v["costs"]);
    let used = v["adapted"].as_array().unwrap().len();

    let out = dir.path().join("adapted.gguf");
    let mut share = vec!["share", "-m", m, "-o", out.to_str().unwrap()];
    share.extend(small);
    let o = kvsharer(&share, &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    let loaded = loader::load(&out).unwrap();
    let stored: usize = loaded
        .model
        .file()
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with(".kvsharer.weight"))
        .count();
    assert_eq!(
        stored, used,
        "the file holds the adapters the plan reads through"
    );
    let o = kvsharer(&["info", out.to_str().unwrap()], &cache);
    let info = String::from_utf8_lossy(&o.stdout);
    assert_eq!(info.matches("+a ").count(), used, "{info}");
    for extra in [
        &["--kv-share"][..],
        &["--no-kv-share"],
        &["--kv-share", "--backend", "wgpu"],
    ] {
        let o = run_four_tokens(&out, extra, &cache);
        if extra.contains(&"wgpu") && support::kvsharer_found_no_wgpu_adapter(&o) {
            continue;
        }
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    }
}

/// The wgpu forward reads the adapted tensors under the same rule: on a tiny f32
/// model, the GPU (prefill, then single-token decode) against the f32 reference
/// with the folded weights, within wgpu_cache's tolerance for f32 weights (2e-3),
/// and far apart from the reference without them.
#[test]
fn wgpu_adapted_shares_match_the_reference_forward() {
    use kvsharer::backend::wgpu::{AdapterPolicy, GpuSession};
    let test = "adapters::wgpu_adapted_shares_match_the_reference_forward";
    let dir = tempfile::tempdir().unwrap();
    let (spec, path) = crate::context_shift::tiny(&dir);
    let weights = support::random_weights(&spec);
    let loaded = loader::load(&path).unwrap();
    let n = spec.n_layers;
    let toks: Vec<u32> = (0..40u32)
        .map(|i| (i * 7 + 3) % spec.n_vocab as u32)
        .collect();
    let pairs = two_pairs((2, 1), (3, 1));
    let (adapters, _) = adapter::fit(
        &loaded.model,
        &pairs,
        std::slice::from_ref(&toks),
        2,
        &AdapterOptions::default(),
        |_| {},
    )
    .unwrap();
    let adapted = adapter::adapted_model(&loaded.model, &adapters, dir.path()).unwrap();
    let f32 = GgmlType::F32;
    let plan = KvPlan::unshared(n, f32, f32)
        .with_shared(Half::Values, 2, 1)
        .unwrap()
        .with_shared(Half::Keys, 3, 1)
        .unwrap();
    let opts = RunOptions {
        n_ctx: 64,
        ..Default::default()
    };
    let Some(mut gpu) = support::wgpu::or_skip_without_adapter(
        test,
        GpuSession::open_plan(&adapted.model, &plan, &opts, AdapterPolicy::Any),
    ) else {
        return;
    };
    let ours = support::eval_then_decode(&mut gpu, &toks, 24);
    let mut folded_weights = weights.clone();
    folded_weights.layers[2].wo.data = folded(&adapters, Half::Values, 2);
    folded_weights.layers[3].wq.data = folded(&adapters, Half::Keys, 3);
    let want = support::reference_forward_plan(&folded_weights, &spec, &plan, &toks)
        .logits
        .concat();
    let plain = support::reference_forward_plan(&weights, &spec, &plan, &toks)
        .logits
        .concat();
    let (max, _, mismatches) = support::compare_logits(&ours, &want, spec.n_vocab);
    let (effect, _, _) = support::compare_logits(&plain, &want, spec.n_vocab);
    support::say(&format!(
        "{test}: max |gpu - folded reference| {max:.6}, top-1 mismatches {mismatches}; the adapters move the logits by {effect:.4}"
    ));
    assert_eq!(mismatches, 0);
    assert!(max < 2e-3, "{max}");
    assert!(max * 20.0 < effect, "{max} vs {effect}");
}
