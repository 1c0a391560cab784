//! The wgpu backend's KV cache against the CPU's: quantized slots and plans mixing
//! types and sources (logits and greedy output against ggml on the f32-dequantized
//! model, KV bytes equal), context shift, StreamingLLM windows (10,000 tokens at
//! constant GPU memory) and a chat that overflows its context without evaluating
//! its kept turns again. The backend-independent checks live with the CPU's suites
//! (`context_shift`, `kv_window`) and run here on wgpu.

use crate::context_shift::{self, check_shift, DISCARD, KEEP, N};
use crate::kv_window::{
    check_window, fresh_options, generate_through_window, ten_thousand_options, window_options,
};
use crate::support;

use std::cell::Cell;
use std::ops::ControlFlow;
use std::rc::Rc;

use kvsharer::backend::ggml::{DeviceKind, Session};
use kvsharer::backend::wgpu::{AdapterPolicy, GpuOptions, GpuSession};
use kvsharer::chat::ChatEngine;
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::{Half, KvPlan, ShareMap};
use kvsharer::loader;
use kvsharer::model::Model;
use kvsharer::runtime::{
    Capabilities, ForwardOutput, ForwardRequest, Logits, RunOptions, RunState, RuntimeError,
};
use kvsharer::sample::{Sampler, SamplingParams};
use support::wgpu::or_skip_without_adapter;

/// The same shifts on the wgpu backend (WGSL load, rotate, re-store), and against
/// the CPU's shift of the same tokens under the same plan: values moved bit for
/// bit on both, and the shifted keys no further apart than the unshifted ones were
/// (up to a rotation's sqrt 2 and one step of the slot's type). Measured: at most
/// 0.34 (f16) to 0.67 (mixed plan) of that allowance.
#[test]
fn wgpu_shift_matches_the_cpu() {
    let test = "wgpu_cache::wgpu_shift_matches_the_cpu";
    let dir = tempfile::tempdir().unwrap();
    let (spec, path) = context_shift::tiny(&dir);
    let loaded = loader::load(&path).unwrap();
    let opts = RunOptions {
        n_ctx: 64,
        n_threads: 2,
        ..Default::default()
    };
    let mut worst_all = Vec::new();
    for plan in context_shift::plans() {
        // ggml's CPU attention takes its f16 path for these 40-token passes; the
        // GPU takes it too here, so what is compared is the cache, not that path.
        let gpu_opts = GpuOptions {
            n_ctx: 64,
            ggml_activation_rounding: true,
            ..Default::default()
        };
        let Some(mut gpu) =
            or_skip_without_adapter(test, GpuSession::with_plan(&loaded.model, &plan, &gpu_opts))
        else {
            return;
        };
        check_shift(&mut gpu, &spec, &format!("wgpu {plan}"));
        let toks: Vec<u32> = (0..N as u32).map(|i| (i * 31 + 7) % 90).collect();
        let mut cpu = Session::with_plan(DeviceKind::Cpu, &loaded.model, &plan, &opts).unwrap();
        cpu.eval(&toks, Logits::None).unwrap();
        gpu.reset();
        gpu.eval(&toks, Logits::None).unwrap();
        let kept = |x: &[f32]| -> Vec<f32> {
            let kv = spec.kv_dim();
            [&x[..KEEP * kv], &x[(KEEP + DISCARD) * kv..]].concat()
        };
        let before: Vec<_> = (0..4)
            .map(|l| {
                let (kg, vg) = gpu.read_kv(l, 0..N).unwrap();
                let (kc, vc) = cpu.read_kv(l, 0..N).unwrap();
                (kept(&kg), kept(&vg), kept(&kc), kept(&vc))
            })
            .collect();
        gpu.context_shift(KEEP, DISCARD).unwrap();
        cpu.context_shift(KEEP, DISCARD).unwrap();
        // The two backends' caches differ before the shift already (ggml's CPU
        // attention rounds the query to the key slot's type; layers above the first
        // inherit that). The shift must add no difference of its own beyond one
        // step of the key slot's type where both re-quantize rotated keys: values
        // move bit for bit on both sides, and a rotation grows no pair's
        // difference (a single element's by at most sqrt 2).
        let mut worst = 0f32;
        for (l, (kg0, vg0, kc0, vc0)) in before.iter().enumerate() {
            let (kg, vg) = gpu.read_kv(l, 0..N - DISCARD).unwrap();
            let (kc, vc) = cpu.read_kv(l, 0..N - DISCARD).unwrap();
            assert_eq!((&vg, &vc), (vg0, vc0), "{plan}: layer {l} values moved");
            let step = match plan.read_type(Half::Keys, l) {
                GgmlType::F16 => 1.0 / 1024.0,
                GgmlType::Q8_0 => 1.0 / 127.0,
                _ => 1.0 / 8.0,
            } * kc.iter().fold(0f32, |m, x| m.max(x.abs()));
            let allowed = std::f32::consts::SQRT_2 * support::max_abs_diff(kg0, kc0) + step;
            worst = worst.max(support::max_abs_diff(&kg, &kc) / allowed);
        }
        support::say(&format!(
            "{test}: {plan}: shifted keys, wgpu vs cpu: at most {worst:.3} of the allowed difference"
        ));
        worst_all.push((plan.to_string(), worst));
    }
    for (plan, worst) in worst_all {
        assert!(
            worst <= 1.0,
            "{plan}: {worst} of the allowed key difference"
        );
    }
}

#[test]
fn wgpu_window_keeps_exactly_sink_plus_recent_and_the_right_tokens() {
    let test = "wgpu_cache::wgpu_window_keeps_exactly_sink_plus_recent_and_the_right_tokens";
    let (_d, path) = crate::kv_window::tiny();
    let loaded = loader::load(&path).unwrap();
    let map = ShareMap::new(vec![0, 1, 1]).unwrap();
    let open = |opts: &RunOptions| GpuSession::open(&loaded.model, &map, opts, AdapterPolicy::Any);
    let Some(mut s) = or_skip_without_adapter(test, open(&window_options())) else {
        return;
    };
    let mut fresh = open(&fresh_options()).unwrap();
    check_window(&mut s, &mut fresh);
    assert_eq!(s.evicted(), 40);
}

/// The same on the wgpu backend, with a q8_0 cache and a shared layer: GPU memory
/// (the device allocator's report) stays what it was after 1,000 tokens.
/// Out of CI for its time on lavapipe (about 5 minutes of a 30-minute budget; the
/// CPU test above holds the window's memory in CI); run it with
/// `cargo test --release --test it wgpu_cache:: -- --ignored --nocapture`.
#[test]
#[ignore]
fn wgpu_ten_thousand_token_generation_holds_gpu_memory() {
    let test = "wgpu_cache::wgpu_ten_thousand_token_generation_holds_gpu_memory";
    // 32-wide heads, so q8_0 blocks fit a head.
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = context_shift::tiny(&dir);
    let loaded = loader::load(&path).unwrap();
    let opts = RunOptions {
        type_k: GgmlType::Q8_0,
        type_v: GgmlType::Q8_0,
        ..ten_thousand_options()
    };
    let map = ShareMap::new(vec![0, 1, 1, 3]).unwrap();
    let Some(mut s) = or_skip_without_adapter(
        test,
        GpuSession::open(&loaded.model, &map, &opts, AdapterPolicy::Any),
    ) else {
        return;
    };
    let probe = s.memory_probe();
    if probe.allocated_bytes().is_none() {
        support::skip(test, "this wgpu backend reports no allocator figures");
        return;
    }
    let (warm, end) =
        generate_through_window(&mut s, || probe.allocated_bytes().unwrap_or(u64::MAX), 0);
    assert_eq!(s.evicted(), 10_000 - 64);
    support::say(&format!(
        "{test}: GPU memory after 1,000 tokens {warm} bytes, after 10,000 {end} bytes"
    ));
}

// ---- quantized slots and mixed plans against the f32 reference ----

/// Every plan of the shift suite (f16, q8_0, q4_0 under two maps, and keys and
/// values shared apart in mixed types, one plan with q5_0, q4_1 and iq4_nl slots)
/// on a tiny f32 model, greedy output equal to ggml's CPU backend's on the same
/// plan for every plan of one type per half (16 tokens after the 40 below; the
/// mixed plans' figures are printed), and the GPU (24 tokens in
/// one pass, then 16 decoded one at a time, so the prefill and both decode kernels
/// run) against the f32 reference forward under the same plan, whose cached rows
/// go through ggml's own quantizer and dequantizer. The GPU quantizes with the same
/// formulas, so what is left is f32 summation order, and an element landing one
/// step apart where it sat on a rounding boundary. Measured on lavapipe: see the
/// printed figures.
#[test]
fn quantized_caches_and_mixed_plans_match_the_f32_reference() {
    let test = "wgpu_cache::quantized_caches_and_mixed_plans_match_the_f32_reference";
    let dir = tempfile::tempdir().unwrap();
    let (spec, path) = context_shift::tiny(&dir);
    let weights = support::random_weights(&spec);
    let loaded = loader::load(&path).unwrap();
    let tokens: Vec<u32> = (0..40u32)
        .map(|i| (i * 7 + 3) % spec.n_vocab as u32)
        .collect();
    let opts = RunOptions {
        n_ctx: 64,
        ..Default::default()
    };
    let n_vocab = spec.n_vocab;
    let mut results = Vec::new();
    for plan in context_shift::plans() {
        let Some(mut gpu) = or_skip_without_adapter(
            test,
            GpuSession::open_plan(&loaded.model, &plan, &opts, AdapterPolicy::Any),
        ) else {
            return;
        };
        // The GPU's cache takes the CPU's bytes for the same plan, exactly.
        let mut cpu = Session::with_plan(DeviceKind::Cpu, &loaded.model, &plan, &opts).unwrap();
        assert_eq!(gpu.kv_bytes(), cpu.kv_bytes(), "{plan}: KV bytes");
        assert_eq!(gpu.kv_bytes_per_token(), cpu.kv_bytes_per_token(), "{plan}");
        let ours = support::eval_then_decode(&mut gpu, &tokens, 24);
        // Greedy output, as `run --temp 0` picks it, against ggml's CPU backend on
        // the same file and plan.
        let theirs = support::eval_then_decode(&mut cpu, &tokens, 24);
        let (vs_ggml, _, _) = support::compare_logits(&ours, &theirs, n_vocab);
        let greedy = |s: &mut dyn RunState<'_>, logits: &[f32]| -> Vec<u32> {
            let mut tok = kvsharer::sample::argmax(&logits[logits.len() - n_vocab..]);
            let mut out = vec![tok];
            while out.len() < 16 {
                tok = kvsharer::sample::argmax(&s.eval(&[tok], Logits::Last).unwrap());
                out.push(tok);
            }
            out
        };
        let (g, c) = (greedy(&mut gpu, &ours), greedy(&mut cpu, &theirs));
        let same = g.iter().zip(&c).take_while(|(a, b)| a == b).count();
        // ggml reads every slot as the GPU does (f32 queries over dequantized
        // cells), except in an all-f16 cache, where its own f16 kernel (within 5e-3
        // here) is llama.cpp's. Before mixed plans read their f16 slots in f32 too,
        // 4-bit keys amplified that kernel's f16 sums and the greedy tokens of the
        // f16 + q4_0 plan parted at the 12th.
        assert_eq!(g, c, "{plan}: greedy tokens, wgpu vs ggml");
        let want: Vec<f32> = support::reference_forward_plan(&weights, &spec, &plan, &tokens)
            .logits
            .concat();
        let (max, _, mismatches) = support::compare_logits(&ours, &want, n_vocab);
        let unshared = support::reference_forward_plan(
            &weights,
            &spec,
            &KvPlan::unshared(4, GgmlType::F32, GgmlType::F32),
            &tokens,
        )
        .logits
        .concat();
        let (plan_effect, _, _) = support::compare_logits(&unshared, &want, n_vocab);
        support::say(&format!(
            "{test}: {plan}: {} KV bytes on wgpu and cpu; max |gpu - reference| {max:.6}, top-1 mismatches {mismatches}; the plan itself moves the logits by {plan_effect:.4}; vs ggml's CPU backend max {vs_ggml:.4}, the first {same} of 16 greedy tokens equal",
            gpu.kv_bytes()
        ));
        results.push((plan, max, mismatches, plan_effect));
    }
    for (plan, max, mismatches, plan_effect) in results {
        assert_eq!(mismatches, 0, "{plan}");
        // 2e-3 holds f32 summation order; a boundary element one step apart in a
        // 4- or 5-bit slot moves these logits by a few 1e-3 (measured 0.004 for the
        // q5_0/q4_1/iq4_nl plan), still a thousandth of what that plan does.
        assert!(max < 1e-2, "{plan}: {max}");
        // The plan must matter far more than the backend does, or this could not
        // tell a GPU that ignores it (the unshared f16 cache only rounds).
        if !plan.is_unshared() || plan.uniform_types() != Some((GgmlType::F16, GgmlType::F16)) {
            assert!(max * 20.0 < plan_effect, "{plan}: {max} vs {plan_effect}");
        }
    }
}

// ---- the default model: quantized slots and mixed plans against ggml ----

/// Plans on the 30-layer default model: a q8_0 cache, a q4_0 cache under the
/// 8-layer map the paper's search finds (`calibrate --layers 8`), and keys and
/// values shared apart (that map for keys, a 3-layer map for values) in mixed
/// types per slot.
fn model_plans(n: usize) -> Vec<(&'static str, KvPlan)> {
    use GgmlType::{F16, Q4_0, Q8_0};
    let mut map8: Vec<usize> = (0..n).collect();
    for l in [11, 16, 18, 19, 21, 25, 27, 28] {
        map8[l] = 9;
    }
    let map3 = support::three_layer_map(n);
    let map8 = ShareMap::for_model(map8, n).unwrap();
    let k_type = (0..n).map(|l| [Q8_0, F16, Q4_0][l % 3]).collect();
    let v_type = (0..n).map(|l| [Q4_0, Q8_0, F16][l % 3]).collect();
    vec![
        ("q8_0 cache", KvPlan::unshared(n, Q8_0, Q8_0)),
        (
            "q4_0 cache, 8-layer map",
            KvPlan::uniform(&map8, Q4_0, Q4_0),
        ),
        (
            "K and V shared apart, mixed types",
            KvPlan::new(
                map8.sources().to_vec(),
                map3.sources().to_vec(),
                k_type,
                v_type,
                n,
            )
            .unwrap(),
        ),
    ]
}

/// Greedy tokens decoded after `eval_then_decode`'s positions.
const GREEDY: usize = 16;

/// The GPU on the Q4_1 file against ggml's CPU backend on the same file dequantized
/// to f32 (the same weight values, f32 activations on both sides, as the f16 parity
/// tests compare), with the same plan: a 64-token prompt pass and 4 single-token
/// passes compared logit by logit, then greedy tokens each side picks alone. KV
/// bytes and bytes per token are the CPU's exactly (asserted for every plan).
///
/// With quantized slots the two no longer meet the f16 cache's bar (max |diff| <
/// 0.1): both read the slots in f32 (ggml's tiled prefill over cells cast to f32,
/// kvsharer's decode kernel), but the K/V rows they quantize differ in summation
/// order, so an element on a rounding boundary lands a whole step apart, and on
/// this 135M model 4-bit keys move the logits a lot by themselves (mean 1.73 for
/// the q4_0 plan). What the GPU computes per element is checked against the f32
/// reference above (to 4e-4 for every plan); here the figures are printed, and
/// greedy output must be ggml's for the q8_0 cache. Measured on lavapipe: q8_0
/// max 0.29, mean 0.031, top-1 mismatches 0 of 68, 16 greedy tokens equal; q4_0
/// under the 8-layer map max 6.86, mean 0.45, 7 of 68 apart, greedy tokens part
/// at the second; the mixed plan max 1.71, mean 0.18, 3 of 68 apart, 16 greedy
/// tokens equal (not asserted).
/// Out of CI for its time on lavapipe (a 30-minute budget); run it with
/// `cargo test --release --test it wgpu_cache:: -- --ignored --nocapture`.
#[test]
#[ignore]
fn quantized_caches_and_mixed_plans_match_ggml_f32() {
    let test = "wgpu_cache::quantized_caches_and_mixed_plans_match_ggml_f32";
    let path = support::default_model_path();
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let toks = support::prompt_tokens(&loaded, crate::wgpu_parity::PROMPT);
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.gguf");
    let mut f32_model = None;
    let n_vocab = model.config.n_vocab;
    let opts = support::session_options(512);
    for (name, plan) in model_plans(model.config.n_layers) {
        let Some(mut gpu) = or_skip_without_adapter(
            test,
            GpuSession::open_plan(model, &plan, &opts, AdapterPolicy::Any),
        ) else {
            return;
        };
        let f32_model = &f32_model
            .get_or_insert_with(|| {
                support::dequantized_copy(&path, &f32_path);
                loader::load(&f32_path).unwrap()
            })
            .model;
        let mut cpu = Session::with_plan(DeviceKind::Cpu, f32_model, &plan, &opts).unwrap();
        assert_eq!(gpu.kv_bytes(), cpu.kv_bytes(), "{name}: KV bytes");
        assert_eq!(
            gpu.kv_bytes_per_token(),
            cpu.kv_bytes_per_token(),
            "{name}: KV bytes per token"
        );
        let ours = support::eval_then_decode(&mut gpu, &toks, support::N_PREFILL);
        let theirs = support::eval_then_decode(&mut cpu, &toks, support::N_PREFILL);
        let (max, mean, mismatches) = support::compare_logits(&ours, &theirs, n_vocab);
        // What the cache types themselves change: the same sources in f16.
        let theirs_f16 = {
            let f16 = plan.with_uniform_types(GgmlType::F16, GgmlType::F16);
            let mut s = Session::with_plan(DeviceKind::Cpu, f32_model, &f16, &opts).unwrap();
            support::eval_then_decode(&mut s, &toks, support::N_PREFILL)
        };
        let (_, q_mean, _) = support::compare_logits(&theirs_f16, &theirs, n_vocab);
        let greedy = |s: &mut dyn RunState<'_>, last: &[f32]| -> Vec<u32> {
            let mut tok = kvsharer::sample::argmax(last);
            let mut out = vec![tok];
            for _ in 1..GREEDY {
                tok = kvsharer::sample::argmax(&s.eval(&[tok], Logits::Last).unwrap());
                out.push(tok);
            }
            out
        };
        let g = greedy(&mut gpu, &ours[ours.len() - n_vocab..]);
        let c = greedy(&mut cpu, &theirs[theirs.len() - n_vocab..]);
        let same = g.iter().zip(&c).take_while(|(a, b)| a == b).count();
        support::say(&format!(
            "{test}: {name}: {} KV bytes on both; {} positions, gpu (q4_1 file) vs ggml cpu (f32 file): \
             max |logit diff| {max:.5}, mean {mean:.5}, top-1 mismatches {mismatches} \
             (the cache types themselves move ggml's logits by mean {q_mean:.4}); \
             greedy: the first {same} of {GREEDY} tokens equal",
            gpu.kv_bytes(),
            support::N_TOKENS,
        ));
        if plan == KvPlan::unshared(model.config.n_layers, GgmlType::Q8_0, GgmlType::Q8_0) {
            assert_eq!(g, c, "{name}: greedy output differs");
        }
    }
}

// ---- chat past the context on wgpu ----

/// A run state that counts the tokens it is given to evaluate.
struct Counting<'m> {
    inner: GpuSession<'m>,
    evaluated: Rc<Cell<usize>>,
}

impl<'m> RunState<'m> for Counting<'m> {
    fn model(&self) -> &'m Model {
        self.inner.model()
    }
    fn plan(&self) -> &KvPlan {
        self.inner.plan()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn on_gpu(&self) -> bool {
        true
    }
    fn n_past(&self) -> usize {
        self.inner.n_past()
    }
    fn n_ctx(&self) -> usize {
        self.inner.n_ctx()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn truncate(&mut self, n: usize) {
        self.inner.truncate(n)
    }
    fn forward(
        &mut self,
        tokens: &[u32],
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        self.evaluated.set(self.evaluated.get() + tokens.len());
        self.inner.forward(tokens, req)
    }
    fn context_shift(&mut self, keep: usize, discard: usize) -> Result<(), RuntimeError> {
        self.inner.context_shift(keep, discard)
    }
    fn kv_bytes(&self) -> usize {
        self.inner.kv_bytes()
    }
    fn kv_bytes_per_token(&self) -> (usize, usize) {
        self.inner.kv_bytes_per_token()
    }
    fn read_kv(
        &self,
        layer: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        self.inner.read_kv(layer, rows)
    }
    fn set_plan(&mut self, plan: &KvPlan) -> Result<(), RuntimeError> {
        self.inner.set_plan(plan)
    }
    fn sibling(
        &self,
        map: &ShareMap,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError> {
        self.inner.sibling(map, opts)
    }
}

/// A chat on wgpu that outgrows its 192-token context: the turns that overflow
/// drop the oldest turn by context shift, so the turns kept after it come from the
/// cache: the tokens evaluated for such a turn are its new message, its reply and
/// the template's closing only, and more than the system prompt stays cached.
/// Out of CI for its time on lavapipe (a 30-minute budget); run it with
/// `cargo test --release --test it wgpu_cache:: -- --ignored --nocapture`.
#[test]
#[ignore]
fn chat_past_the_context_keeps_its_turns_cached() {
    let test = "wgpu_cache::chat_past_the_context_keeps_its_turns_cached";
    let loaded = loader::load(&support::default_model_path()).unwrap();
    let model = &loaded.model;
    let opts = RunOptions {
        n_ctx: 192,
        ..Default::default()
    };
    let map = ShareMap::identity(model.config.n_layers);
    let Some(gpu) = or_skip_without_adapter(
        test,
        GpuSession::open(model, &map, &opts, AdapterPolicy::Any),
    ) else {
        return;
    };
    let evaluated = Rc::new(Cell::new(0));
    let session = Box::new(Counting {
        inner: gpu,
        evaluated: evaluated.clone(),
    });
    let (template, _) = kvsharer::chat::model_template(&loaded).unwrap();
    let sampler = Sampler::new(SamplingParams {
        temperature: 0.0,
        ..Default::default()
    });
    let mut engine = ChatEngine::new(
        session,
        &loaded.tokenizer,
        template,
        sampler,
        Some(12),
        Some("You are terse.".into()),
    )
    .unwrap();
    let system = engine.session().n_past();
    let mut overflowed = 0;
    for i in 0..7 {
        let before = evaluated.get();
        let turn = engine
            .prepare(&format!("Question {i}: name a colour and a fruit, please."))
            .unwrap();
        let dropped = turn.dropped_turns;
        engine.reply(turn, |_| ControlFlow::Continue(())).unwrap();
        let n_past = engine.session().n_past();
        let this_turn = evaluated.get() - before;
        let from_cache = n_past - this_turn;
        support::say(&format!(
            "{test}: turn {i}: dropped {dropped} turns, evaluated {this_turn} tokens, {from_cache} of {n_past} cached came from earlier turns"
        ));
        if dropped > 0 {
            overflowed += 1;
            assert!(
                from_cache >= system + 20,
                "turn {i}: only {from_cache} cached tokens were kept (system prompt {system}): the kept turns were evaluated again"
            );
        }
    }
    assert!(overflowed >= 2, "the chat never outgrew its context");
}

/// Every cache type the GPU takes stores what ggml's CPU backend stores: after the
/// same 24-token pass, layer 0's keys and values (whose inputs differ between the
/// backends only by f32 summation order) read back equal to ggml's, except for
/// elements that sat on a rounding boundary and landed one quantization step apart
/// (at most 1 in 256, each within one step of its block). Layers above inherit the
/// backends' upstream differences, so only layer 0 is compared. Measured on
/// lavapipe: every type equal except q5_1, 1 key element of 1536 one step apart.
#[test]
fn every_cache_type_stores_what_ggml_stores() {
    let test = "wgpu_cache::every_cache_type_stores_what_ggml_stores";
    let dir = tempfile::tempdir().unwrap();
    let (spec, path) = context_shift::tiny(&dir);
    let loaded = loader::load(&path).unwrap();
    let tokens: Vec<u32> = (0..24u32)
        .map(|i| (i * 7 + 3) % spec.n_vocab as u32)
        .collect();
    let opts = RunOptions {
        n_ctx: 64,
        ..Default::default()
    };
    for &ty in kvsharer::runtime::CACHE_TYPES {
        let plan = KvPlan::unshared(4, ty, ty);
        let Some(mut gpu) = or_skip_without_adapter(
            test,
            GpuSession::open_plan(&loaded.model, &plan, &opts, AdapterPolicy::Any),
        ) else {
            return;
        };
        let mut cpu = Session::with_plan(DeviceKind::Cpu, &loaded.model, &plan, &opts).unwrap();
        gpu.eval(&tokens, Logits::None).unwrap();
        cpu.eval(&tokens, Logits::None).unwrap();
        let (kg, vg) = gpu.read_kv(0, 0..tokens.len()).unwrap();
        let (kc, vc) = cpu.read_kv(0, 0..tokens.len()).unwrap();
        for (half, gpu_rows, cpu_rows) in [("K", &kg, &kc), ("V", &vg, &vc)] {
            assert_eq!(gpu_rows.len(), cpu_rows.len());
            let mut apart = 0;
            for (g, c) in gpu_rows.chunks(32).zip(cpu_rows.chunks(32)) {
                let (lo, hi) = c
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                // The largest step any of these types takes within a block.
                let step = (hi - lo) / 7.0 + 1e-3;
                for (a, b) in g.iter().zip(c) {
                    // f16 and f32 slots hold their own rounding of f32 inputs.
                    if (a - b).abs() > 2e-3 * b.abs().max(1.0) {
                        apart += 1;
                        assert!((a - b).abs() <= step, "{ty:?} {half}: {a} vs {b}");
                    }
                }
            }
            support::say(&format!(
                "{test}: {} {half}: {apart} of {} elements apart from ggml's",
                ty.name(),
                gpu_rows.len()
            ));
            assert!(
                apart * 256 <= gpu_rows.len(),
                "{ty:?} {half}: {apart} apart"
            );
        }
    }
}
