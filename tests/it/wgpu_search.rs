//! The sharing search on the wgpu backend (`share::evaluator::Evaluator` on a wgpu run state) against
//! the same search on the CPU (`share::search::run`, ggml), on tiny planted models:
//! same distance scores, same pairs tried, same map, and objective values that agree
//! within the stated tolerances. Plus `calibrate`/`share --backend wgpu|auto` end to
//! end.
//!
//! Both backends compute an f32 tiny model in f32 with an f16 KV cache, so they
//! differ only by summation order: the measured gaps are printed by each test.
//! Without an adapter each test prints why it is skipped and returns.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kvsharer::gguf::GgufFile;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader::{self, LoadedModel};
use kvsharer::runtime::BackendChoice;
use kvsharer::search::{
    self, report, CalibrationOptions, Corpus, Evaluator, Objective, PairOrder, SearchResult,
    Strategy, StrategyOptions,
};
use support::wgpu::or_skip_without_adapter;
use support::{say, write_planted_model, TinySpec};

const N_LAYERS: usize = 6;

/// Layers 1 and 4 have a zero attention output matrix: sharing 1 <- 0 is the only
/// harmless first step, and 4 <- (any owner) is harmless too, so a 2-step greedy
/// search has one right answer at each step; the third step must take a harmful
/// pair, chosen by a real comparison of nonzero divergences.
fn planted_model(dir: &Path) -> PathBuf {
    let spec = TinySpec {
        n_layers: N_LAYERS,
        seed: 11,
        ..TinySpec::default()
    };
    let path = dir.join("planted.gguf");
    write_planted_model(&spec, &[1, 4], &path);
    path
}

fn calib(target: usize) -> CalibrationOptions {
    CalibrationOptions {
        samples: 4,
        tokens: 24,
        target,
        threshold: 0.5,
        order: PairOrder::Dissimilar,
        threads: 2,
    }
}

fn strategy(strategy: Strategy, objective: Objective) -> StrategyOptions {
    StrategyOptions {
        strategy,
        objective,
        max_kld: None,
        beam: 2,
        candidates: None,
        lazy: true,
    }
}

/// The search on the GPU, or `None` (with the reason printed) without an adapter.
fn gpu_search(
    test: &str,
    loaded: &LoadedModel,
    opts: &CalibrationOptions,
    strat: &StrategyOptions,
) -> Option<SearchResult> {
    let corpus = Corpus::default_corpus();
    let set = search::prepare(&loaded.tokenizer, &corpus, opts.samples, opts.tokens).unwrap();
    let opened = Evaluator::open(BackendChoice::Wgpu, &loaded.model, &set, 2, false);
    let (mut eval, _) = or_skip_without_adapter(test, opened)?;
    say(&format!("{test}: {}", eval.describe()));
    Some(search::run_with(&mut eval, &set, &corpus, opts, strat, |_| {}).unwrap())
}

fn cpu_search(
    loaded: &LoadedModel,
    opts: &CalibrationOptions,
    strat: &StrategyOptions,
) -> SearchResult {
    search::run(
        &loaded.model,
        &loaded.tokenizer,
        &Corpus::default_corpus(),
        opts,
        strat,
        |_| {},
    )
    .unwrap()
}

/// Largest relative difference of the distance scores (relative to the largest).
fn score_gap(a: &SearchResult, b: &SearchResult) -> f32 {
    let top = a.scores.iter().flatten().fold(0f32, |m, &x| m.max(x));
    assert!(top > 0.0, "all distances are zero");
    a.scores
        .iter()
        .flatten()
        .zip(b.scores.iter().flatten())
        .map(|(x, y)| (x - y).abs() / top)
        .fold(0f32, f32::max)
}

/// Tolerances, about 100x what lavapipe measures (KLD 1.5e-6 relative, cosine
/// 1e-6, scores 1.4e-6 of the largest), to leave room for other adapters' fused
/// multiply-adds and summation orders. KL divergence: 1e-3 relative, or 1e-6
/// absolute for the harmless pairs, whose KLD is rounding noise (~1e-16) on both;
/// cosine: 1e-5 absolute; distance scores: 1e-4 of the largest (keys and values go
/// through the f16 cache on both backends, where one value can round one f16 step
/// apart).
const KLD_REL: f64 = 1e-3;
const KLD_ABS: f64 = 1e-6;
const COSINE_ABS: f32 = 1e-5;
const SCORE_REL: f32 = 1e-4;

/// Same trials in the same order with the same decisions; returns the largest
/// relative KLD gap (over pairs with KLD above 1e-6) and absolute cosine gap.
fn assert_same_trials(what: &str, cpu: &SearchResult, gpu: &SearchResult) -> (f64, f32) {
    let pairs = |r: &SearchResult| {
        r.trials
            .iter()
            .map(|t| (t.step, t.layer, t.source, t.kept))
            .collect::<Vec<_>>()
    };
    assert_eq!(pairs(cpu), pairs(gpu), "{what}: different trials");
    let (mut kld_gap, mut cos_gap) = (0f64, 0f32);
    for (c, g) in cpu.trials.iter().zip(&gpu.trials) {
        let dc = (c.cosine - g.cosine).abs();
        assert!(dc <= COSINE_ABS, "{what}: cosine {c:?} vs {g:?}");
        cos_gap = cos_gap.max(dc);
        match (c.kld, g.kld) {
            (Some(kc), Some(kg)) => {
                let d = (kc as f64 - kg as f64).abs();
                assert!(
                    d <= KLD_REL * kc.abs() as f64 + KLD_ABS,
                    "{what}: kld {c:?} vs {g:?}"
                );
                if kc > 1e-6 {
                    kld_gap = kld_gap.max(d / kc as f64);
                }
            }
            (None, None) => {}
            other => panic!("{what}: KLD measured on one backend only: {other:?}"),
        }
    }
    (kld_gap, cos_gap)
}

#[test]
fn gpu_greedy_search_finds_the_cpu_map_with_matching_objectives() {
    let test = "gpu_greedy_search_finds_the_cpu_map_with_matching_objectives";
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    for objective in [Objective::Kld, Objective::Cosine] {
        let strat = strategy(Strategy::Greedy, objective);
        let opts = calib(3);
        let Some(gpu) = gpu_search(test, &loaded, &opts, &strat) else {
            return;
        };
        let cpu = cpu_search(&loaded, &opts, &strat);
        say(&format!(
            "{test}: {objective:?}: cpu map {} gpu map {}",
            cpu.map, gpu.map
        ));
        // The two planted harmless layers are shared on both.
        for r in [&cpu, &gpu] {
            assert_eq!(r.shared, 3, "{}", r.outcome);
            assert!(r.map.source(1) == 0 && !r.map.owns_slot(4), "{}", r.map);
        }
        assert_eq!(cpu.map, gpu.map, "{objective:?}");
        let gap = score_gap(&cpu, &gpu);
        assert!(
            gap <= SCORE_REL,
            "{objective:?}: distance scores differ by {gap}"
        );
        let (kld_gap, cos_gap) = assert_same_trials(&format!("{objective:?}"), &cpu, &gpu);
        // Per accepted step: the objective of the map after that step.
        let accepted = |r: &SearchResult| {
            r.trials
                .iter()
                .filter(|t| t.kept)
                .map(|t| (t.kld, t.cosine))
                .collect::<Vec<_>>()
        };
        say(&format!(
            "{test}: {objective:?}: accepted steps (kld, cosine) cpu {:?} gpu {:?}; final mean KLD cpu {:?} gpu {:?}; largest gaps: KLD {:.2e} (relative), cosine {cos_gap:.2e}, scores {gap:.2e} (relative)",
            accepted(&cpu),
            accepted(&gpu),
            cpu.mean_kld,
            gpu.mean_kld,
            kld_gap
        ));
        let (kc, kg) = (cpu.mean_kld.unwrap() as f64, gpu.mean_kld.unwrap() as f64);
        assert!(
            kc > 1e-4,
            "the third shared layer should cost something: {kc}"
        );
        assert!(
            (kc - kg).abs() <= KLD_REL * kc + KLD_ABS,
            "mean KLD cpu {kc} gpu {kg}"
        );
        assert!((cpu.mean_cosine - gpu.mean_cosine).abs() <= COSINE_ABS);
    }
}

#[test]
fn gpu_paper_search_tries_the_cpu_pairs_and_finds_the_cpu_map() {
    let test = "gpu_paper_search_tries_the_cpu_pairs_and_finds_the_cpu_map";
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    // A threshold that rejects some pairs, so the accept/reject decisions matter.
    let opts = CalibrationOptions {
        threshold: 0.8,
        ..calib(3)
    };
    let strat = strategy(Strategy::Paper, Objective::Cosine);
    let Some(gpu) = gpu_search(test, &loaded, &opts, &strat) else {
        return;
    };
    let cpu = cpu_search(&loaded, &opts, &strat);
    say(&format!(
        "{test}: cpu trials\n{}",
        report::trials_table(&cpu)
    ));
    say(&format!(
        "{test}: gpu trials\n{}",
        report::trials_table(&gpu)
    ));
    assert_eq!(cpu.map, gpu.map);
    assert!(
        cpu.trials.iter().any(|t| !t.kept),
        "threshold rejected nothing"
    );
    let gap = score_gap(&cpu, &gpu);
    assert!(gap <= SCORE_REL, "distance scores differ by {gap}");
    let (_, cos_gap) = assert_same_trials("paper", &cpu, &gpu);
    let (kc, kg) = (cpu.mean_kld.unwrap() as f64, gpu.mean_kld.unwrap() as f64);
    assert!(
        (kc - kg).abs() <= KLD_REL * kc + KLD_ABS,
        "mean KLD cpu {kc} gpu {kg}"
    );
    say(&format!(
        "{test}: map cpu {} gpu {}; {} trials; cosine gap {cos_gap:.2e}; score gap {gap:.2e}; final KLD cpu {kc:.6} gpu {kg:.6}",
        cpu.map,
        gpu.map,
        cpu.trials.len()
    ));
}

fn kvsharer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvsharer"))
        .args(args)
        .env(
            "KVSHARER_CACHE_DIR",
            std::env::temp_dir().join("kvsharer-wgpu-search-test-cache"),
        )
        .output()
        .expect("run kvsharer")
}

#[test]
fn calibrate_and_share_run_the_search_on_wgpu() {
    let test = "calibrate_and_share_run_the_search_on_wgpu";
    let dir = tempfile::tempdir().unwrap();
    let model = planted_model(dir.path());
    let m = model.to_str().unwrap();
    let search_flags = ["--layers", "1", "--samples", "4", "--tokens", "24"];
    let report_dir = dir.path().join("report");
    let mut args = vec!["calibrate", "-m", m, "--backend", "wgpu"];
    args.extend(search_flags);
    args.extend(["--report", report_dir.to_str().unwrap()]);
    let o = kvsharer(&args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    if support::kvsharer_found_no_wgpu_adapter(&o) {
        support::skip(test, support::NO_WGPU_ADAPTER);
        return;
    }
    assert!(o.status.success(), "{err}");
    let adapter = err
        .lines()
        .find(|l| l.starts_with("backend: wgpu on "))
        .unwrap_or_else(|| panic!("no adapter line: {err}"));
    say(&format!("{test}: {adapter}"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let sources: Vec<usize> = serde_json::from_str(stdout.trim()).unwrap();
    let map = ShareMap::new(sources).unwrap();
    // One of the planted harmless layers (which one is the search's tie-break
    // between exactly equal outputs), and the map the CPU search writes.
    let pairs = map.pairs();
    assert!(pairs.len() == 1 && [1, 4].contains(&pairs[0].0), "{map}");
    let mut args = vec!["calibrate", "-m", m, "--backend", "cpu"];
    args.extend(search_flags);
    let o = kvsharer(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cpu: Vec<usize> = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(ShareMap::new(cpu).unwrap(), map, "cpu vs wgpu");
    let from_report = report::read_report_map(&report_dir.join("report.json"), N_LAYERS).unwrap();
    assert_eq!(from_report, map);

    // share: the same map and metadata in the written copy.
    let out = dir.path().join("shared.gguf");
    let mut args = vec!["share", "-m", m, "--backend", "wgpu"];
    args.extend(search_flags);
    args.extend(["-o", out.to_str().unwrap()]);
    let o = kvsharer(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_u32("kvsharer.shared_layer_count").unwrap(), 1);
    assert_eq!(f.get_u32("kvsharer.calibration.sample_count").unwrap(), 4);
    assert_eq!(
        f.get_u32("kvsharer.calibration.tokens_per_sample").unwrap(),
        24
    );
    assert_eq!(
        f.get_str("kvsharer.calibration.corpus_sha256").unwrap(),
        Corpus::default_corpus().sha256
    );
    let reloaded = loader::load(&out).unwrap();
    assert_eq!(reloaded.model.stored_map.as_ref(), Some(&map));

    // auto: a real GPU runs it, a software adapter (lavapipe) leaves it on the CPU
    // with a note; the map is the same either way.
    let mut args = vec!["calibrate", "-m", m, "--backend", "auto"];
    args.extend(search_flags);
    let o = kvsharer(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("backend: wgpu on ") || err.contains("note: --backend auto: no usable GPU"),
        "{err}"
    );
    let sources: Vec<usize> =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(ShareMap::new(sources).unwrap(), map);

    // Bad settings are refused before any adapter is opened, without a panic.
    let o = kvsharer(&["calibrate", "-m", m, "--backend", "wgpu", "--layers", "6"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("cannot share 6 layers"), "{err}");
    assert!(!err.contains("backend: wgpu on"), "{err}");
}

/// `GpuSession::set_map` (what the GPU search runs every candidate through) gives
/// the logits a session built for that map gives, bit for bit; and what it cannot
/// do is refused with a clear error.
#[test]
fn set_map_equals_a_fresh_session_and_lays_out_missing_slots() {
    use kvsharer::backend::wgpu::{GpuOptions, GpuSession};
    use kvsharer::runtime::{Logits, RunState};
    let test = "set_map_equals_a_fresh_session_and_refuses_missing_slots";
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let model = &loaded.model;
    let opts = GpuOptions {
        n_ctx: 32,
        n_batch: 32,
        ..GpuOptions::default()
    };
    let identity = ShareMap::identity(N_LAYERS);
    let Some(mut s) = or_skip_without_adapter(test, GpuSession::new(model, &identity, &opts))
    else {
        return;
    };
    let tokens: Vec<u32> = (0..20).map(|k| (k * 7 + 3) % 90).collect();
    let shared = ShareMap::new(vec![0, 1, 1, 3, 3, 0]).unwrap();
    let fresh = |map: &ShareMap| {
        let mut f = GpuSession::new(model, map, &opts).unwrap();
        f.eval(&tokens, Logits::All).unwrap()
    };
    let (want_shared, want_identity) = (fresh(&shared), fresh(&identity));
    assert_ne!(want_shared, want_identity, "the map changes nothing");
    s.eval(&tokens[..5], Logits::None).unwrap();
    s.set_map(&shared).unwrap();
    assert_eq!(s.n_past(), 0, "set_map keeps stale cells");
    assert_eq!(s.plan().as_map(), Some(&shared));
    let (logits, hidden) = s.eval_with_hidden(&tokens, Logits::All).unwrap();
    assert_eq!(logits, want_shared);
    assert_eq!(hidden.len(), tokens.len() * model.config.n_embd);
    assert!(hidden.iter().all(|x| x.is_finite()) && hidden.iter().any(|&x| x != 0.0));
    s.set_map(&identity).unwrap();
    assert_eq!(s.eval(&tokens, Logits::All).unwrap(), want_identity);

    // K/V of layer 2 under `shared` is layer 1's slot.
    s.set_map(&shared).unwrap();
    s.eval(&tokens, Logits::None).unwrap();
    let (k1, v1) = s.read_kv(1, 0..tokens.len()).unwrap();
    let (k2, v2) = s.read_kv(2, 0..tokens.len()).unwrap();
    assert_eq!((&k1, &v1), (&k2, &v2));
    assert_eq!(k1.len(), tokens.len() * model.config.n_embd_kv());
    assert!(k1.iter().any(|&x| x != 0.0));
    for (layer, rows) in [(N_LAYERS, 1), (0, tokens.len() + 1)] {
        let e = s.read_kv(layer, 0..rows).unwrap_err().to_string();
        assert!(e.contains("layer") || e.contains("cells"), "{e}");
    }

    // A session built for `shared` has no slot (nor K/V weights) for layer 2 until
    // a map needs them: then it uploads the projections and allocates the slots,
    // and computes what a session built for that map computes.
    let mut narrow = GpuSession::new(model, &shared, &opts).unwrap();
    let narrow_bytes = narrow.kv_bytes();
    narrow.set_map(&identity).unwrap();
    assert!(narrow.kv_bytes() > narrow_bytes);
    assert_eq!(narrow.eval(&tokens, Logits::All).unwrap(), want_identity);
    narrow.set_map(&shared).unwrap();
    assert_eq!(narrow.kv_bytes(), narrow_bytes);
    let e = narrow
        .set_map(&ShareMap::identity(N_LAYERS + 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers"), "{e}");
    // Still usable after the refusals.
    assert_eq!(narrow.eval(&tokens, Logits::All).unwrap(), want_shared);
}

/// The default model (SmolLM2-135M-Instruct Q4_1, 30 layers), run by hand (about 5
/// minutes on lavapipe): `cargo test --release --test it wgpu_search::real_model --
/// --ignored --nocapture`. Greedy by KLD for 2 layers, 4 texts x 32 tokens, 4
/// candidates per step, on the GPU with the Q4_1 file, and on ggml's CPU backend
/// with the same file and with its f32-dequantized copy. The GPU multiplies the
/// file's exact weights by f32 activations, as ggml does for f32 weights; for
/// quantized weights ggml rounds activations to 8 bits first, which moves every
/// KLD by more than the gaps between candidates.
#[test]
#[ignore]
fn real_model_gpu_search_vs_cpu_on_the_quantized_and_dequantized_files() {
    let test = "real_model_gpu_search_vs_cpu_on_the_quantized_and_dequantized_files";
    let path = support::default_model_path();
    let loaded = loader::load(&path).unwrap();
    let opts = CalibrationOptions {
        samples: 4,
        tokens: 32,
        target: 2,
        threshold: 0.5,
        order: PairOrder::Dissimilar,
        threads: 2,
    };
    let strat = StrategyOptions {
        candidates: Some(4),
        ..StrategyOptions::default()
    };
    let Some(gpu) = gpu_search(test, &loaded, &opts, &strat) else {
        return;
    };
    let cpu_q = cpu_search(&loaded, &opts, &strat);
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.gguf");
    support::dequantized_copy(&path, &f32_path);
    let cpu_f32 = cpu_search(&loader::load(&f32_path).unwrap(), &opts, &strat);
    for (name, r) in [
        ("gpu, q4_1 file", &gpu),
        ("ggml cpu, q4_1 file", &cpu_q),
        ("ggml cpu, f32 copy", &cpu_f32),
    ] {
        say(&format!(
            "{test}: {name}: map {} mean KLD {:?} score gap to the gpu {:.2e}\n{}",
            r.map,
            r.mean_kld,
            score_gap(r, &gpu),
            report::trials_table(r)
        ));
    }
    let (kld_gap, cos_gap) = assert_same_trials("gpu vs cpu f32", &cpu_f32, &gpu);
    say(&format!(
        "{test}: gpu vs ggml cpu on the f32 copy: largest KLD gap {kld_gap:.2e} (relative), cosine {cos_gap:.2e}"
    ));
    assert_eq!(gpu.map, cpu_f32.map);
}

/// The packed pass the search runs every candidate through (`forward_packed`):
/// on wgpu, texts packed one after another in the cache, each attending only to
/// itself, give what ggml's packed pass gives (logits, hidden states, every
/// layer's input); a pass that starts mid-network from cached layer inputs, with
/// the lower slots it reads refilled from theirs, gives what a full pass of the
/// same plan gives (bit for bit on wgpu: the same kernels on the same inputs).
/// Tolerance against ggml: 2e-2 on logits of magnitude ~5 (both compute the f32
/// model in f32; an f16 cache value rounded the other way after another
/// summation order moves later logits by ~1e-3; the figures are printed).
#[test]
fn packed_passes_from_a_cached_prefix_match_full_passes_and_ggml() {
    use kvsharer::backend::ggml::{DeviceKind, Session};
    use kvsharer::backend::wgpu::{AdapterPolicy, GpuSession};
    use kvsharer::gguf::GgmlType;
    use kvsharer::kvplan::{Half, KvPlan};
    use kvsharer::runtime::{ForwardRequest, Logits, PackedBatch, RunOptions, RunState};
    use support::max_abs_diff;
    let test = "packed_passes_from_a_cached_prefix_match_full_passes_and_ggml";
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let model = &loaded.model;
    let (n_texts, seq_len) = (3, 20);
    let tokens: Vec<u32> = (0..n_texts * seq_len)
        .map(|k| (k as u32 * 7 + 3) % 90)
        .collect();
    // Two passes of whole texts on wgpu (batch 40), one graph on the CPU.
    let opts = RunOptions {
        n_ctx: tokens.len(),
        n_batch: 2 * seq_len,
        n_threads: 2,
        ..RunOptions::default()
    };
    // f32 keys beside f16 values (the planted model's heads of 16 take no
    // quantized block).
    let unshared = KvPlan::unshared(N_LAYERS, GgmlType::F32, GgmlType::F16);
    let opened = GpuSession::open_plan(model, &unshared, &opts, AdapterPolicy::Any);
    let Some(mut gpu) = or_skip_without_adapter(test, opened) else {
        return;
    };
    let mut cpu = Session::with_plan(DeviceKind::Cpu, model, &unshared, &opts).unwrap();
    let all = ForwardRequest {
        logits: Logits::All,
        hidden: true,
        layer_inputs: true,
    };
    let full = PackedBatch {
        tokens: &tokens,
        seq_len,
        start: None,
        refill: &[],
    };
    let g = gpu.forward_packed(full, all).unwrap();
    let c = cpu.forward_packed(full, all).unwrap();
    assert_eq!(g.logit_rows, tokens.len());
    assert_eq!(g.layer_inputs.len(), N_LAYERS);
    let d_logits = max_abs_diff(&g.logits, &c.logits);
    let d_hidden = max_abs_diff(g.hidden.as_ref().unwrap(), c.hidden.as_ref().unwrap());
    let d_inputs = g
        .layer_inputs
        .iter()
        .zip(&c.layer_inputs)
        .map(|((lg, xg), (lc, xc))| {
            assert_eq!(lg, lc);
            max_abs_diff(xg, xc)
        })
        .fold(0.0f32, f32::max);
    say(&format!(
        "{test}: full packed pass, wgpu vs ggml: logits {d_logits:.2e}, hidden {d_hidden:.2e}, layer inputs {d_inputs:.2e}"
    ));
    assert!(d_logits < 2e-2 && d_hidden < 2e-2 && d_inputs < 2e-2);
    // Each text attends only to itself: the second text alone gives its rows.
    gpu.reset();
    let alone = gpu
        .forward(
            &tokens[seq_len..2 * seq_len],
            ForwardRequest::logits(Logits::All),
        )
        .unwrap();
    let n_vocab = model.config.n_vocab;
    let d_alone = max_abs_diff(
        &alone.logits,
        &g.logits[seq_len * n_vocab..2 * seq_len * n_vocab],
    );
    assert!(
        d_alone < 1e-4,
        "a packed text sees another's cells: {d_alone}"
    );

    // Layers 4 and 5 read keys and values from layers 1 and 2: a pass from layer
    // 3 (whose input the unshared run left) refills slots 1 and 2 from theirs.
    let plan = unshared
        .with_shared(Half::Keys, 4, 1)
        .unwrap()
        .with_shared(Half::Values, 5, 2)
        .unwrap();
    let logits = ForwardRequest::logits(Logits::All);
    let other: Vec<u32> = tokens.iter().map(|t| (t + 11) % 90).collect();
    let run = |s: &mut dyn RunState, start: bool| {
        s.set_plan(&plan).unwrap();
        // Other texts first, so slots 1 and 2 hold nothing the pass could reuse.
        let clobber = PackedBatch {
            tokens: &other,
            ..full
        };
        s.forward_packed(clobber, logits).unwrap();
        let refill: Vec<(usize, &[f32])> = [1, 2]
            .iter()
            .map(|&l| (l, g.layer_inputs[l].1.as_slice()))
            .collect();
        let batch = PackedBatch {
            start: start.then(|| (3, g.layer_inputs[3].1.as_slice())),
            refill: &refill,
            ..full
        };
        s.forward_packed(batch, logits).unwrap().logits
    };
    let gpu_full = run(&mut gpu, false);
    let gpu_start = run(&mut gpu, true);
    let cpu_start = run(&mut cpu, true);
    assert_ne!(gpu_full, g.logits, "the plan changes nothing");
    let d_start = max_abs_diff(&gpu_start, &gpu_full);
    let d_cpu = max_abs_diff(&gpu_start, &cpu_start);
    say(&format!(
        "{test}: from layer 3 vs full pass on wgpu: {d_start:.2e}; vs ggml from layer 3: {d_cpu:.2e}"
    ));
    assert!(d_start < 1e-5, "{d_start}");
    assert!(d_cpu < 2e-2, "{d_cpu}");

    // Bad packed batches are refused, and nothing is left half-run.
    let bad =
        |s: &mut dyn RunState, b: PackedBatch| s.forward_packed(b, logits).unwrap_err().to_string();
    let e = bad(&mut gpu, PackedBatch { seq_len: 7, ..full });
    assert!(e.contains("whole texts"), "{e}");
    let short = vec![0.0f32; 5];
    let e = bad(
        &mut gpu,
        PackedBatch {
            start: Some((3, &short)),
            ..full
        },
    );
    assert!(e.contains("input values"), "{e}");
    let e = bad(
        &mut gpu,
        PackedBatch {
            seq_len: 60,
            ..full
        },
    );
    assert!(e.contains("does not fit one pass"), "{e}");
}
