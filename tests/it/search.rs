//! The stepwise sharing searches (`share::search`) on tiny generated models: they
//! find a planted harmless pair, their cached-prefix candidate runs equal full runs,
//! and what they report and store is what a fresh measurement gives.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

use kvsharer::gguf::GgufFile;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader::{self, LoadedModel};
use kvsharer::search::{
    self, report, CalibrationOptions, CalibrationSet, Corpus, Evaluator, KlReference, MapRun,
    Objective, PairOrder, Strategy, StrategyOptions,
};
use support::{max_abs_diff, random_weights, write_planted_model, write_weights, TinySpec};

const N_LAYERS: usize = 6;

/// A 6-layer model whose layer 1 has a zero attention output matrix: what layer 1
/// attends over cannot matter, so sharing 1 <- 0 is harmless, and since layer 1 is
/// the only such layer and 0 its only possible source, that is the only harmless pair.
fn planted_model(dir: &Path) -> PathBuf {
    let spec = TinySpec {
        n_layers: N_LAYERS,
        seed: 11,
        ..TinySpec::default()
    };
    let path = dir.join("planted.gguf");
    write_planted_model(&spec, &[1], &path);
    path
}

/// A model with no harmless pair at all (for the prefix-equivalence checks).
fn plain_model(dir: &Path) -> PathBuf {
    let spec = TinySpec {
        n_layers: N_LAYERS,
        seed: 23,
        ..TinySpec::default()
    };
    let path = dir.join("plain.gguf");
    write_weights(&spec, &random_weights(&spec), &path).unwrap();
    path
}

fn calib(target: usize, threshold: f32) -> CalibrationOptions {
    CalibrationOptions {
        samples: 6,
        tokens: 32,
        target,
        threshold,
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

fn run(
    loaded: &LoadedModel,
    opts: &CalibrationOptions,
    strat: &StrategyOptions,
) -> search::SearchResult {
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

fn set(loaded: &LoadedModel) -> CalibrationSet {
    search::prepare(&loaded.tokenizer, &Corpus::default_corpus(), 6, 32).unwrap()
}

#[test]
fn greedy_picks_the_one_harmless_pair_and_the_paper_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let paper = run(
        &loaded,
        &calib(1, 0.5),
        &strategy(Strategy::Paper, Objective::Cosine),
    );
    eprintln!("paper:\n{}", report::trials_table(&paper));
    for objective in [Objective::Kld, Objective::Cosine] {
        let r = run(
            &loaded,
            &calib(1, 0.5),
            &strategy(Strategy::Greedy, objective),
        );
        eprintln!("greedy {objective:?}:\n{}", report::trials_table(&r));
        assert_eq!(r.map.pairs(), vec![(1, 0)], "{objective:?}: {}", r.map);
        assert_eq!(r.strategy, Strategy::Greedy);
        // All 15 pairs of a 6-layer model were evaluated in the one step.
        assert_eq!(r.trials.len(), 15);
        assert_eq!(r.trials.iter().filter(|t| t.kept).count(), 1);
        let kld = r.mean_kld.unwrap();
        assert!(kld.abs() < 1e-6, "harmless pair has KLD {kld}");
        assert!(r.mean_cosine > 0.99999, "{}", r.mean_cosine);
        // Every other pair moves the output measurably.
        for t in r.trials.iter().filter(|t| !t.kept) {
            assert!(t.cosine < 0.9999, "{t:?}");
            if let Some(k) = t.kld {
                assert!(k > 1e-4, "{t:?}");
            }
        }
    }
    // The paper's dissimilar-first search accepts the first pair whose cosine passes
    // 0.5, which on this model is a harmful one.
    assert_eq!(paper.shared, 1);
    assert_ne!(paper.map.pairs(), vec![(1, 0)], "{}", paper.map);
    assert!(paper.mean_kld.unwrap() > 1e-4, "{:?}", paper.mean_kld);
    assert_eq!(paper.strategy, Strategy::Paper);
}

/// Largest absolute difference, failing on length mismatch.
#[test]
fn prefix_candidate_runs_equal_full_runs_in_any_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&plain_model(dir.path())).unwrap();
    let set = set(&loaded);
    let mut eval = Evaluator::cpu(&loaded.model, &set, 2, true).unwrap();
    let n_vocab = loaded.model.config.n_vocab;
    let base = eval.full(&ShareMap::identity(N_LAYERS)).unwrap();
    let reference = KlReference::new(&base.logits, n_vocab);
    let per_text = set.seq_len * loaded.model.config.n_embd;
    let objectives = |run: &MapRun| {
        (
            search::mean_text_cosine(&base.hidden, &run.hidden, per_text),
            reference.mean_kld(&run.logits, 2),
        )
    };
    // The current map already shares 4 <- 2, so candidates exercise chain
    // resolution (sharing 2 moves its reader 4) and starts below the changed layer.
    let current = eval
        .full(&ShareMap::identity(N_LAYERS).with_shared(4, 2).unwrap())
        .unwrap();
    // Increasing, decreasing and repeated layers, with near and far sources: with a
    // cache shared between candidates, a run from a low layer would corrupt the slots
    // a later one from a higher layer reads.
    let sequence = [
        (5, 3),
        (3, 0),
        (5, 4),
        (2, 1),
        (5, 3),
        (1, 0),
        (3, 2),
        (5, 0),
    ];
    let mut mid_network = 0;
    for (i, j) in sequence {
        let got = eval.candidate(&current, i, j).unwrap();
        let want_map = current.map.with_shared(i, j).unwrap();
        assert_eq!(got.map, want_map);
        let want = eval.full(&want_map).unwrap();
        if got.start > 0 {
            mid_network += 1;
        }
        assert!(
            got.start <= want_map.source(i),
            "{i}<-{j}: start {}",
            got.start
        );
        let (gc, gk) = objectives(&got);
        let (wc, wk) = objectives(&want);
        assert!((gc - wc).abs() < 1e-5, "{i}<-{j}: cosine {gc} vs {wc}");
        assert!((gk - wk).abs() < 1e-5, "{i}<-{j}: KLD {gk} vs {wk}");
        assert!(
            wk > 1e-4,
            "{i}<-{j}: candidate should change the output ({wk})"
        );
        let d = max_abs_diff(&got.logits, &want.logits);
        assert!(d < 1e-4, "{i}<-{j}: logits differ by {d}");
        // The inputs the search keeps for an accepted candidate are those a full
        // re-run of its map produces, at every layer.
        assert_eq!(got.layer_inputs.len(), N_LAYERS);
        for l in 0..N_LAYERS {
            let d = max_abs_diff(&got.layer_inputs[l], &want.layer_inputs[l]);
            assert!(d < 1e-5, "{i}<-{j}: layer {l} input differs by {d}");
        }
    }
    assert!(
        mid_network >= 5,
        "only {mid_network} runs started mid-network"
    );

    // A candidate of an accepted candidate (the next greedy step) as well.
    let accepted = eval.candidate(&current, 5, 4).unwrap();
    let next = eval.candidate(&accepted, 3, 2).unwrap();
    let want = eval.full(&next.map).unwrap();
    assert!(next.start > 0);
    let (gc, gk) = objectives(&next);
    let (wc, wk) = objectives(&want);
    assert!((gc - wc).abs() < 1e-5 && (gk - wk).abs() < 1e-5);
}

#[test]
fn kl_divergence_of_identical_runs_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&plain_model(dir.path())).unwrap();
    let set = set(&loaded);
    let mut eval = Evaluator::cpu(&loaded.model, &set, 2, true).unwrap();
    let a = eval.full(&ShareMap::identity(N_LAYERS)).unwrap();
    let b = eval.full(&ShareMap::identity(N_LAYERS)).unwrap();
    let reference = KlReference::new(&a.logits, loaded.model.config.n_vocab);
    assert_eq!(reference.rows(), set.tokens.len());
    for k in reference.row_klds(&b.logits, 2) {
        assert!(k.abs() < 1e-9, "{k}");
    }
    assert_eq!(eval.mean_cosine(&a.hidden, &b.hidden), 1.0);
}

#[test]
fn greedy_accepts_each_steps_best_and_reports_what_a_fresh_run_measures() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&plain_model(dir.path())).unwrap();
    let r = run(
        &loaded,
        &calib(3, 0.5),
        &strategy(Strategy::Greedy, Objective::Kld),
    );
    eprintln!("{}", report::trials_table(&r));
    assert_eq!(r.shared, 3);
    assert!(r.outcome.contains("target met"), "{}", r.outcome);
    for step in 1..=3 {
        let trials: Vec<_> = r.trials.iter().filter(|t| t.step == Some(step)).collect();
        // 15, then 10 pairs (one layer fewer owning), then ...
        assert!(!trials.is_empty());
        let kept: Vec<_> = trials.iter().filter(|t| t.kept).collect();
        assert_eq!(kept.len(), 1, "step {step}");
        let best = trials
            .iter()
            .map(|t| t.kld.unwrap())
            .fold(f32::INFINITY, f32::min);
        assert_eq!(kept[0].kld.unwrap(), best, "step {step}");
        assert!(r
            .map
            .pairs()
            .contains(&(kept[0].layer, r.map.source(kept[0].layer))));
    }
    assert_eq!(r.trials.iter().filter(|t| t.step == Some(1)).count(), 15);
    // The reported objectives equal a fresh measurement of the final map.
    let set = set(&loaded);
    let fresh = search::measure_kld(&loaded.model, &set, 2, &r.map).unwrap();
    let kld = r.mean_kld.unwrap();
    assert!((fresh - kld).abs() < 1e-5, "{fresh} vs {kld}");
    let last_kept = r.trials.iter().rfind(|t| t.kept).unwrap();
    assert_eq!(last_kept.kld, Some(kld));
    assert_eq!(last_kept.cosine, r.mean_cosine);
}

#[test]
fn lazy_greedy_skips_only_pairs_whose_last_harm_could_not_win() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&plain_model(dir.path())).unwrap();
    let eager = run(
        &loaded,
        &calib(3, 0.5),
        &StrategyOptions {
            lazy: false,
            ..strategy(Strategy::Greedy, Objective::Kld)
        },
    );
    let lazy = run(
        &loaded,
        &calib(3, 0.5),
        &strategy(Strategy::Greedy, Objective::Kld),
    );
    eprintln!("lazy:\n{}", report::trials_table(&lazy));
    assert!(lazy.lazy && !eager.lazy);
    assert!(
        lazy.trials.len() < eager.trials.len(),
        "lazy {} vs eager {} evaluations",
        lazy.trials.len(),
        eager.trials.len()
    );
    // Replay: at each step, a pair not evaluated had, when last evaluated, done at
    // least as much harm as the accepted pair did now.
    let mut map = ShareMap::identity(N_LAYERS);
    let mut current = 0f32;
    let mut last_harm: std::collections::HashMap<(usize, usize), f32> = Default::default();
    for step in 1..=3 {
        let trials: Vec<_> = lazy
            .trials
            .iter()
            .filter(|t| t.step == Some(step))
            .collect();
        let kept = trials
            .iter()
            .find(|t| t.kept)
            .expect("a kept pair per step");
        let accepted_harm = kept.kld.unwrap() - current;
        for (i, j) in search::strategy::allowed_pairs(&map) {
            if trials.iter().any(|t| (t.layer, t.source) == (i, j)) {
                continue;
            }
            let h = last_harm[&(i, j)];
            assert!(
                h >= accepted_harm,
                "step {step}: {i}<-{j} skipped with harm {h} < {accepted_harm}"
            );
        }
        for t in &trials {
            last_harm.insert((t.layer, t.source), t.kld.unwrap() - current);
        }
        map = map.with_shared(kept.layer, kept.source).unwrap();
        current = kept.kld.unwrap();
    }
    assert_eq!(map, lazy.map);
    // Step 1 has nothing to go by: it evaluates every pair.
    assert_eq!(lazy.trials.iter().filter(|t| t.step == Some(1)).count(), 15);
}

#[test]
fn max_kld_stops_the_search_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let strat = StrategyOptions {
        max_kld: Some(1e-4),
        ..strategy(Strategy::Greedy, Objective::Kld)
    };
    let r = run(&loaded, &calib(3, 0.5), &strat);
    assert_eq!(r.map.pairs(), vec![(1, 0)]);
    assert!(r.outcome.contains("NOT met"), "{}", r.outcome);
    assert!(r.outcome.contains("KLD limit"), "{}", r.outcome);
    // The cosine objective stops at --threshold instead.
    let r = run(
        &loaded,
        &calib(3, 0.9999),
        &strategy(Strategy::Greedy, Objective::Cosine),
    );
    assert_eq!(r.map.pairs(), vec![(1, 0)]);
    assert!(r.outcome.contains("threshold"), "{}", r.outcome);
}

#[test]
fn beam_finds_the_harmless_pair_and_evaluates_each_map_once() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let r = run(
        &loaded,
        &calib(2, 0.5),
        &strategy(Strategy::Beam, Objective::Kld),
    );
    assert_eq!(r.strategy, Strategy::Beam);
    assert_eq!(r.beam, Some(2));
    assert_eq!(r.shared, 2);
    assert!(r.map.pairs().contains(&(1, 0)), "{}", r.map);
    // Step 2 expands two maps; pairs reachable from both are evaluated once.
    let step2 = r.trials.iter().filter(|t| t.step == Some(2)).count();
    assert!(step2 < 2 * 10, "{step2} evaluations in step 2");
    // Only the winning path is marked kept.
    assert_eq!(r.trials.iter().filter(|t| t.kept).count(), 2);
}

#[test]
fn candidates_prefilter_limits_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&plain_model(dir.path())).unwrap();
    let strat = StrategyOptions {
        candidates: Some(4),
        lazy: false,
        ..strategy(Strategy::Greedy, Objective::Cosine)
    };
    let r = run(&loaded, &calib(2, 0.5), &strat);
    for step in 1..=2 {
        assert_eq!(r.trials.iter().filter(|t| t.step == Some(step)).count(), 4);
    }
    // Step 1 evaluated the four pairs with the lowest (or highest) distance score.
    let mut all: Vec<f32> = (1..N_LAYERS)
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .map(|(i, j)| r.scores[i][j])
        .collect();
    all.sort_by(f32::total_cmp);
    if !search::strategy::PREFILTER_KEEPS_SIMILAR {
        all.reverse();
    }
    let mut tried: Vec<f32> = r
        .trials
        .iter()
        .filter(|t| t.step == Some(1))
        .map(|t| t.score)
        .collect();
    tried.sort_by(f32::total_cmp);
    let mut want = all[..4].to_vec();
    want.sort_by(f32::total_cmp);
    assert_eq!(tried, want);
}

#[test]
fn stored_map_records_strategy_and_both_objectives() {
    let dir = tempfile::tempdir().unwrap();
    let src = planted_model(dir.path());
    let loaded = loader::load(&src).unwrap();
    let r = run(
        &loaded,
        &calib(1, 0.5),
        &strategy(Strategy::Greedy, Objective::Kld),
    );
    let out = dir.path().join("shared.gguf");
    kvsharer::gguf::write_with_metadata(
        loaded.model.file(),
        &report::metadata(&r),
        &["kvsharer."],
        &out,
    )
    .unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(
        f.get_str("kvsharer.calibration.strategy").unwrap(),
        "greedy"
    );
    let kld = f.get_f32("kvsharer.calibration.mean_kld").unwrap();
    assert_eq!(kld, r.mean_kld.unwrap());
    assert_eq!(
        f.get_f32("kvsharer.calibration.mean_cosine").unwrap(),
        r.mean_cosine
    );
    // The report directory round-trips the map and names both objectives.
    let (json, svg) = report::write_report_dir(&r, &dir.path().join("rep")).unwrap();
    assert_eq!(report::read_report_map(&json, N_LAYERS).unwrap(), r.map);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(v["strategy"], "greedy");
    assert_eq!(v["objective"], "kld");
    assert!(v["mean_kld"].as_f64().is_some());
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.contains("mean KLD") && svg.contains("mean cosine"));
    assert!(svg.contains("1&lt;-0"), "map caption missing or unescaped");
    let table = report::trials_table(&r);
    assert!(table.contains("KLD") && table.contains("mean cosine"));
}

#[test]
fn old_reports_without_strategy_fields_still_parse_as_paper() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let r = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &Corpus::default_corpus(),
        &calib(1, 0.5),
        |_| {},
    )
    .unwrap();
    let mut v = serde_json::to_value(&r).unwrap();
    for key in [
        "strategy",
        "objective",
        "mean_kld",
        "max_kld",
        "beam",
        "candidates",
    ] {
        v.as_object_mut().unwrap().remove(key);
    }
    for t in v["trials"].as_array_mut().unwrap() {
        t.as_object_mut().unwrap().remove("kld");
        t.as_object_mut().unwrap().remove("step");
    }
    let back: search::SearchResult = serde_json::from_value(v).unwrap();
    assert_eq!(back.strategy, Strategy::Paper);
    assert_eq!(back.map, r.map);
}

fn kvsharer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvsharer"))
        .args(args)
        .env(
            "KVSHARER_CACHE_DIR",
            std::env::temp_dir().join("kvsharer-search-test-cache"),
        )
        .output()
        .expect("run kvsharer")
}

#[test]
fn cli_runs_each_strategy_and_rejects_bad_strategy_flags() {
    let dir = tempfile::tempdir().unwrap();
    let model = planted_model(dir.path());
    let m = model.to_str().unwrap();
    let common = [
        "calibrate",
        "-m",
        m,
        "--samples",
        "6",
        "--tokens",
        "32",
        "-t",
        "2",
    ];
    for (flags, want) in [
        (
            vec!["--strategy", "greedy", "--candidates", "all"],
            "[0,0,2,3,4,5]",
        ),
        (
            vec![
                "--strategy",
                "greedy",
                "--objective",
                "cosine",
                "--candidates",
                "all",
            ],
            "[0,0,2,3,4,5]",
        ),
        (
            vec!["--strategy", "beam", "--beam", "2", "--candidates", "all"],
            "[0,0,2,3,4,5]",
        ),
    ] {
        let rep = dir.path().join(flags.join("_"));
        let mut args: Vec<&str> = common.to_vec();
        args.extend(["--layers", "1", "--report", rep.to_str().unwrap()]);
        args.extend(flags.iter().copied());
        let o = kvsharer(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{flags:?}: {err}");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want, "{flags:?}");
        assert!(err.contains("mean KLD"), "{flags:?}: {err}");
        let json = std::fs::read_to_string(rep.join("report.json")).unwrap();
        assert!(
            json.contains(&format!("\"strategy\": \"{}\"", flags[1])),
            "{json}"
        );
    }
    for (flags, want) in [
        (vec!["--candidates", "0"], "--candidates"),
        (vec!["--candidates", "many"], "--candidates"),
        (vec!["--max-kld=-1"], "--max-kld must be a non-negative"),
        (vec!["--strategy", "beam", "--beam", "0"], "--beam"),
        (vec!["--strategy", "sideways"], "--strategy"),
    ] {
        let mut args: Vec<&str> = common.to_vec();
        args.extend(["--layers", "1"]);
        args.extend(flags.iter().copied());
        let o = kvsharer(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flags:?} succeeded");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}

/// Where a candidate's time goes on the default model (run by hand:
/// `cargo test --release --test it search::timing -- --ignored --nocapture`).
#[test]
#[ignore]
fn timing_breakdown_on_the_default_model() {
    use std::time::Instant;
    let loaded = loader::load(&support::default_model_path()).unwrap();
    let set = search::prepare(&loaded.tokenizer, &Corpus::default_corpus(), 30, 64).unwrap();
    let n = loaded.model.config.n_layers;
    let mut with_logits = Evaluator::cpu(&loaded.model, &set, 2, true).unwrap();
    let mut without = Evaluator::cpu(&loaded.model, &set, 2, false).unwrap();
    let t = Instant::now();
    let base = with_logits.full(&ShareMap::identity(n)).unwrap();
    eprintln!("full run with logits: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let _ = without.full(&ShareMap::identity(n)).unwrap();
    eprintln!(
        "full run without logits: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let reference = KlReference::new(&base.logits, loaded.model.config.n_vocab);
    eprintln!("KL reference: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let k = reference.mean_kld(&base.logits, 2);
    eprintln!(
        "one KL evaluation: {:.2} s ({k})",
        t.elapsed().as_secs_f64()
    );
    for (i, j) in [(29, 28), (20, 19), (10, 9)] {
        let t = Instant::now();
        let c = with_logits.candidate(&base, i, j).unwrap();
        eprintln!(
            "candidate {i}<-{j} (start {}): {:.2} s",
            c.start,
            t.elapsed().as_secs_f64()
        );
    }
}
