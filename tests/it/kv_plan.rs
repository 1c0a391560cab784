//! KV memory plans (format version 2): keys and values shared apart and a cache
//! type per owned slot, on tiny random models written by the tests.
//!
//! Oracles: the plain f32 reference forward (`support::reference_forward_split`,
//! f16-rounded cache) for sharing apart, with forward_reference's tolerance for F16
//! weights (0.015 on logits of magnitude ~5-10) and the same separation rule (the
//! error must be under a quarter of what the sharing itself changes); uniform
//! sessions (`--cache-type-k/-v`, an independent code path through `RunOptions`) for
//! per-slot types, which must agree exactly; and a full run for the planner's
//! mid-network restarts (refilled slots), within 1e-4.

use crate::support;

use kvsharer::backend::ggml::Session;
use kvsharer::gguf::{GgmlType, Value};
use kvsharer::kvplan::{self, Half, KvPlan, ShareMap};
use kvsharer::loader;
use kvsharer::runtime::{ForwardRequest, Logits, PackedBatch, RunOptions, RunState};
use support::{max_abs_diff, reference_forward_split, write_tiny_model, RefPrecision, TinySpec};

const F16: GgmlType = GgmlType::F16;
const Q8: GgmlType = GgmlType::Q8_0;
const Q4: GgmlType = GgmlType::Q4_0;

fn spec() -> TinySpec {
    TinySpec::four_layers_head_dim_64()
}

fn opts() -> RunOptions {
    RunOptions {
        n_ctx: 64,
        n_batch: 512,
        n_threads: 2,
        ..Default::default()
    }
}

fn tokens(spec: &TinySpec, n: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 7 + 3) % spec.n_vocab as u32).collect()
}

#[test]
fn keys_and_values_shared_apart_match_the_reference_forward() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let weights = write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let toks = tokens(&spec, 24);
    let precision = RefPrecision {
        kv_cache_f16: true,
        attn_inputs_f16: false,
    };
    let identity = ShareMap::identity(4);
    let unshared = reference_forward_split(&weights, &spec, &identity, &identity, &toks, precision)
        .logits
        .concat();
    let base = KvPlan::unshared(4, F16, F16);
    let plans = [
        ("V only", base.with_shared(Half::Values, 2, 0).unwrap()),
        ("K only", base.with_shared(Half::Keys, 3, 1).unwrap()),
        (
            "K and V from different layers",
            base.with_shared(Half::Keys, 3, 0)
                .unwrap()
                .with_shared(Half::Values, 3, 2)
                .unwrap()
                .with_shared(Half::Values, 1, 0)
                .unwrap(),
        ),
    ];
    for (what, plan) in plans {
        let mut s = Session::with_plan(
            kvsharer::backend::ggml::DeviceKind::Cpu,
            &loaded.model,
            &plan,
            &opts(),
        )
        .unwrap();
        let ours = s.eval(&toks, Logits::All).unwrap();
        let reference = reference_forward_split(
            &weights,
            &spec,
            plan.sources(Half::Keys),
            plan.sources(Half::Values),
            &toks,
            precision,
        )
        .logits
        .concat();
        let err = max_abs_diff(&ours, &reference);
        let separation = max_abs_diff(&reference, &unshared);
        eprintln!(
            "{what}: {plan}: max |ours - ref| {err:.5}, sharing moves logits {separation:.4}"
        );
        assert!(err < 0.015, "{what}: {err}");
        assert!(err < 0.25 * separation, "{what}: {err} vs {separation}");
        // Only owned slots take memory: one row per owned half.
        let row = F16
            .row_bytes((spec.head_dim() * spec.n_head_kv) as u64)
            .unwrap() as usize;
        let owned = 8 - plan.shared_halves();
        assert_eq!(s.kv_bytes_per_token().0, owned * row, "{what}");
    }
}

#[test]
fn per_slot_types_agree_with_uniform_caches_and_decode_like_prefill() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let toks = tokens(&spec, 20);
    let cpu = kvsharer::backend::ggml::DeviceKind::Cpu;
    // Every slot set one by one to K q8_0, V q4_0 equals the uniform q8_0/q4_0 cache.
    let mut per_slot = KvPlan::unshared(4, F16, F16);
    for l in 0..4 {
        per_slot = per_slot
            .with_type(Half::Keys, l, Q8)
            .with_type(Half::Values, l, Q4);
    }
    let uniform_opts = RunOptions {
        type_k: Q8,
        type_v: Q4,
        ..opts()
    };
    let mut uniform = Session::new(&loaded.model, &ShareMap::identity(4), &uniform_opts).unwrap();
    let mut planned = Session::with_plan(cpu, &loaded.model, &per_slot, &opts()).unwrap();
    assert_eq!(
        planned.eval(&toks, Logits::All).unwrap(),
        uniform.eval(&toks, Logits::All).unwrap()
    );
    assert_eq!(planned.kv_bytes(), uniform.kv_bytes());

    // A mixed plan (q4_0 keys on one layer, a q8_0 source read by a later layer's
    // values) decodes token by token (the per-layer decode kernel choice) as its
    // prefill computes the same positions (flash attention).
    let mixed = KvPlan::unshared(4, F16, F16)
        .with_type(Half::Keys, 1, Q4)
        .with_type(Half::Values, 0, Q8)
        .with_shared(Half::Values, 3, 0)
        .unwrap();
    let mut prefill = Session::with_plan(cpu, &loaded.model, &mixed, &opts()).unwrap();
    let all = prefill.eval(&toks, Logits::All).unwrap();
    let mut step = Session::with_plan(cpu, &loaded.model, &mixed, &opts()).unwrap();
    step.eval(&toks[..12], Logits::Last).unwrap();
    let n_vocab = spec.n_vocab;
    for (i, &t) in toks.iter().enumerate().skip(12) {
        let got = step.eval(&[t], Logits::Last).unwrap();
        let want = &all[i * n_vocab..(i + 1) * n_vocab];
        let d = max_abs_diff(&got, want);
        assert!(d < 2e-2, "position {i}: decode vs prefill {d}");
    }
    // The mixed plan's bytes: 3 f16 + 1 q4_0 key rows, 1 q8_0 + 2 f16 value rows.
    let n = (spec.head_dim() * spec.n_head_kv) as u64;
    let row = |t: GgmlType| t.row_bytes(n).unwrap() as usize;
    assert_eq!(
        prefill.kv_bytes_per_token().0,
        3 * row(F16) + row(Q4) + row(Q8) + 2 * row(F16)
    );
}

#[test]
fn a_restart_with_refilled_slots_equals_a_full_run() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let toks = tokens(&spec, 32);
    let cpu = kvsharer::backend::ggml::DeviceKind::Cpu;
    let req = ForwardRequest {
        logits: Logits::All,
        hidden: false,
        layer_inputs: true,
    };
    let base_plan = KvPlan::unshared(4, F16, F16);
    // As calibration opens its run states: the f16 base reads its cells in f32, as
    // every plan mixing types does, so layer inputs below a restart are the plan's.
    let exact = RunOptions {
        exact_attention: true,
        ..opts()
    };
    let mut s = Session::with_plan(cpu, &loaded.model, &base_plan, &exact).unwrap();
    let base = s.eval_packed(&toks, 16, req).unwrap();
    let full = |plan: &KvPlan| {
        let mut f = Session::with_plan(cpu, &loaded.model, plan, &exact).unwrap();
        f.eval_packed(&toks, 16, ForwardRequest::logits(Logits::All))
            .unwrap()
            .logits
    };
    let input = |l: usize| base.layer_inputs[l].1.as_slice();
    let mut restart = |plan: &KvPlan, start: usize, refill: &[(usize, &[f32])]| {
        s.set_plan(plan).unwrap();
        s.forward_packed(
            PackedBatch {
                tokens: &toks,
                seq_len: 16,
                start: Some((start, input(start))),
                refill,
            },
            ForwardRequest::logits(Logits::All),
        )
        .unwrap()
        .logits
    };
    // Layer 3 reads layer 0's values and layer 1's keys: start at 3, with layers 0
    // and 1's slots computed again from their inputs in a freshly laid-out cache.
    let at_3 = base_plan
        .with_shared(Half::Values, 3, 0)
        .unwrap()
        .with_shared(Half::Keys, 3, 1)
        .unwrap();
    let got = restart(&at_3, 3, &[(0, input(0)), (1, input(1))]);
    let d = max_abs_diff(&got, &full(&at_3));
    assert!(d < 1e-4, "restart at 3: {d}");
    // Without the refill a freshly laid-out cache leaves those slots empty: the
    // result must differ (laying out the base plan first forces a new layout).
    restart(&base_plan, 3, &[]);
    let empty = restart(&at_3, 3, &[]);
    assert!(max_abs_diff(&empty, &full(&at_3)) > 1e-2);
    // Layer 1's keys in q4_0 and layer 3 reading layer 0's values: start at 1.
    let at_1 = base_plan
        .with_type(Half::Keys, 1, Q4)
        .with_shared(Half::Values, 3, 0)
        .unwrap();
    let got = restart(&at_1, 1, &[(0, input(0))]);
    let d = max_abs_diff(&got, &full(&at_1));
    assert!(d < 1e-4, "restart at 1: {d}");
    // A refill at or above the start is refused.
    s.set_plan(&at_1).unwrap();
    let e = s
        .forward_packed(
            PackedBatch {
                tokens: &toks,
                seq_len: 16,
                start: Some((1, input(1))),
                refill: &[(2, input(2))],
            },
            ForwardRequest::logits(Logits::All),
        )
        .unwrap_err();
    assert!(e.to_string().contains("refill of layer 2"), "{e}");
}

#[test]
fn stored_plans_round_trip_and_malformed_ones_are_refused() {
    let spec = TinySpec {
        n_layers: 3,
        ..spec()
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    write_tiny_model(&spec, &base);
    let file = kvsharer::gguf::GgufFile::open(&base).unwrap();
    let plan = KvPlan::unshared(3, Q8, Q4)
        .with_shared(Half::Values, 2, 0)
        .unwrap()
        .with_type(Half::Keys, 1, F16);
    let write = |kv: &[(String, Value)], name: &str| {
        let out = dir.path().join(name);
        kvsharer::gguf::write_with_metadata(&file, kv, &["kvsharer."], &out).unwrap();
        loader::load(&out)
    };
    let kv = kvplan::plan_to_metadata(&plan, 0.5, 0.01);
    let back = write(&kv, "plan.gguf").unwrap();
    assert_eq!(back.model.stored_plan.as_ref(), Some(&plan));
    assert_eq!(
        back.model.stored_map, None,
        "halves differ: no version-1 map"
    );
    // A plan whose halves agree also carries version 1's map for older readers.
    let whole = KvPlan::uniform(&ShareMap::new(vec![0, 0, 2]).unwrap(), Q8, Q8);
    let back = write(&kvplan::plan_to_metadata(&whole, 0.3, 0.1), "whole.gguf").unwrap();
    assert_eq!(back.model.stored_map.as_ref(), whole.as_map());

    let with = |key: &str, value: Value| -> Vec<(String, Value)> {
        kv.iter()
            .map(|(k, v)| (k.clone(), if k == key { value.clone() } else { v.clone() }))
            .collect()
    };
    let strings = |v: &[&str]| {
        Value::Array(kvsharer::gguf::Array::String(
            v.iter().map(|s| s.to_string()).collect(),
        ))
    };
    let cases = [
        (
            "a source that does not own the half it lends",
            with(
                kvplan::KEY_V_SOURCE,
                Value::Array(kvsharer::gguf::Array::U32(vec![0, 0, 1])),
            ),
            "V sources",
        ),
        (
            "a type a cache cannot hold",
            with(kvplan::KEY_K_TYPE, strings(&["q8_0", "q6_K", "q8_0"])),
            "q6_K",
        ),
        (
            "a name that is no ggml type",
            with(kvplan::KEY_V_TYPE, strings(&["q4_0", "q4_0", "int3"])),
            "int3",
        ),
        (
            "wrong lengths",
            with(kvplan::KEY_K_TYPE, strings(&["q8_0", "q8_0"])),
            "entries",
        ),
        (
            "a source list of the wrong type",
            with(kvplan::KEY_K_SOURCE, Value::String("0,1,2".into())),
            "array of u32",
        ),
    ];
    for (what, kv, needle) in cases {
        let err = match write(&kv, "bad.gguf") {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(needle), "{what}: {err}");
    }
}

/// Runs the CLI with its cache (planner costs) in `cache`.
pub fn kvsharer(args: &[&str], cache: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kvsharer"))
        .args(args)
        .env("KVSHARER_CACHE_DIR", cache)
        .output()
        .expect("run kvsharer")
}

/// `kvsharer run` of 4 greedy tokens after "hello" on `model`, with `extra` flags.
pub fn run_four_tokens(
    model: &std::path::Path,
    extra: &[&str],
    cache: &std::path::Path,
) -> std::process::Output {
    let mut a = vec!["run", "-m", model.to_str().unwrap()];
    a.extend(["-p", "hello", "-n", "4", "--temp", "0"]);
    a.extend(extra);
    kvsharer(&a, cache)
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `plan` prints a plan within the budget and writes its report; `share
/// --kv-budget` stores it (version 2), `info` shows it, `run --kv-share` uses it
/// and `--no-kv-share` ignores it; bad budgets fail with one clear line, a
/// non-zero exit and nothing written.
#[test]
fn cli_plans_stores_and_runs_a_budget() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &model);
    let m = model.to_str().unwrap();
    let small = ["--plan-samples", "2", "--plan-tokens", "8", "-t", "2"];
    let report = dir.path().join("report");
    let mut args = vec!["plan", "-m", m, "--kv-budget", "40%", "--json", "--report"];
    args.push(report.to_str().unwrap());
    args.extend(small);
    let o = kvsharer(&args, &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fraction = v["fraction"].as_f64().unwrap();
    assert!(fraction <= 0.40 + 1e-9 && fraction > 0.2, "{fraction}");
    assert_eq!(v["layers"].as_array().unwrap().len(), 4);
    assert!(v["measured_kld"].as_f64().unwrap() >= 0.0);
    assert!(report.join("plan.json").exists() && report.join("plan.svg").exists());
    assert!(stderr(&o).contains("predicted"), "{}", stderr(&o));
    // The second plan reuses the cached move costs.
    let o = kvsharer(&args, &cache);
    assert!(stderr(&o).contains("measured before"), "{}", stderr(&o));
    // Only the types plans may use were measured per half: q4_0 is not in the
    // default ladder, so it cost no runs.
    let costs: Vec<serde_json::Value> = std::fs::read_dir(cache.join("plans"))
        .unwrap()
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    assert_eq!(costs.len(), 1);
    let measured: Vec<&str> = costs[0]["whole_half"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["ty"].as_str().unwrap())
        .collect();
    assert_eq!(measured, ["q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl"]);
    // Every layer but the first shared whole from an earlier one, measured; no
    // half shared apart (`--plan-sources 0`, the default).
    let layer_shares = costs[0]["layer_shares"].as_array().unwrap();
    let layers: Vec<u64> = layer_shares
        .iter()
        .map(|s| s["layer"].as_u64().unwrap())
        .collect();
    assert_eq!(layers, [1, 2, 3]);
    assert!(layer_shares
        .iter()
        .all(|s| s["source"].as_u64() < s["layer"].as_u64() && s["kld"].as_f64().unwrap() >= 0.0));
    assert!(costs[0]["shares"].as_array().unwrap().is_empty());

    let out = dir.path().join("planned.gguf");
    let mut share = vec![
        "share",
        "-m",
        m,
        "--kv-budget",
        "40%",
        "-o",
        out.to_str().unwrap(),
    ];
    share.extend(small);
    let o = kvsharer(&share, &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    let loaded = loader::load(&out).unwrap();
    let stored = loaded.model.stored_plan.clone().expect("a stored plan");
    assert!(stored.fraction_of_f16(spec.head_dim() * spec.n_head_kv) <= 0.40 + 1e-9);
    let o = kvsharer(&["info", out.to_str().unwrap()], &cache);
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains("KV plan:") && info.contains("K type"),
        "{info}"
    );

    let run = |extra: &[&str]| run_four_tokens(&out, extra, &cache);
    let o = run(&["--kv-share"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("KV plan"), "{}", stderr(&o));
    let o = run(&["--no-kv-share"]);
    assert!(stderr(&o).contains("KV sharing off"), "{}", stderr(&o));
    // wgpu lays its cache out for the stored plan too, whatever types it holds
    // (lavapipe in CI).
    let o = run(&["--kv-share", "--backend", "wgpu"]);
    if !support::kvsharer_found_no_wgpu_adapter(&o) {
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("KV plan"), "{}", stderr(&o));
    }
    // `--kv-budget` on wgpu plans there too.
    let o = run_four_tokens(
        &model,
        &["--kv-budget", "40%", "--backend", "wgpu", "-t", "2"],
        &cache,
    );
    if !support::kvsharer_found_no_wgpu_adapter(&o) {
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = run(&["--kv-share", "--cache-type-k", "q8_0"]);
    assert!(
        stderr(&o).contains("override") || stderr(&o).contains("set every slot"),
        "{}",
        stderr(&o)
    );

    for (budget, needle) in [
        ("150%", "at most 100%"),
        ("0%", "more than 0%"),
        ("abc", "expected a percentage"),
        ("1%", "no plan reaches"),
    ] {
        let bad = dir.path().join("bad.gguf");
        let mut a = vec![
            "share",
            "-m",
            m,
            "--kv-budget",
            budget,
            "-o",
            bad.to_str().unwrap(),
        ];
        a.extend(small);
        let o = kvsharer(&a, &cache);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{budget}: {err}");
        assert!(
            !err.contains("panicked") && err.contains(needle),
            "{budget}: {err}"
        );
        assert!(!bad.exists(), "{budget}: wrote a file");
    }
}
