//! The paper's search (`shared/KVSHARER.md`, steps 1-6): distance-ordered pairs,
//! each kept while the final-hidden cosine stays above the threshold; the K/V
//! capture it starts from; and the random-map baseline.

use std::time::Instant;

use crate::kvplan::ShareMap;
use crate::model::Model;
use crate::search::calibration::{
    distance_matrix, mean_text_cosine, prepare, ranked_pairs, CalibrateError, CalibrationOptions,
    CalibrationSet, Capture, Corpus,
};
use crate::search::evaluator::Evaluator;
use crate::search::result::{Objective, PairTrial, Progress, SearchResult, Strategy};
use crate::tokenizer::Tokenizer;

/// Step 1 and 2: run the unshared model and average each layer's K/V over texts.
pub fn capture(
    model: &Model,
    set: &CalibrationSet,
    threads: usize,
) -> Result<Capture, CalibrateError> {
    let mut eval = Evaluator::cpu(model, set, threads, false)?.without_prefix();
    Ok(eval.capture(false)?.1)
}

/// Steps 1-6: the paper's search for `opts.target` shared layers.
pub fn search(
    model: &Model,
    tokenizer: &Tokenizer,
    corpus: &Corpus,
    opts: &CalibrationOptions,
    progress: impl FnMut(Progress),
) -> Result<SearchResult, CalibrateError> {
    opts.check(model.config.n_layers)?;
    let set = prepare(tokenizer, corpus, opts.samples, opts.tokens)?;
    let mut eval = Evaluator::cpu(model, &set, opts.threads, false)?.without_prefix();
    search_with(&mut eval, &set, &corpus.sha256, opts, progress)
}

/// The paper's search with any backend's evaluator; `set` is what `eval` runs.
pub fn search_with(
    eval: &mut Evaluator<'_>,
    set: &CalibrationSet,
    corpus_sha256: &str,
    opts: &CalibrationOptions,
    mut progress: impl FnMut(Progress),
) -> Result<SearchResult, CalibrateError> {
    let config = eval.model().config.clone();
    let n_layers = config.n_layers;
    opts.check(n_layers)?;
    let t0 = Instant::now();
    let (_, cap) = eval.capture(false)?;
    let capture_time = t0.elapsed();
    let scores = distance_matrix(&cap, config.head_dim);
    let per_text = set.seq_len * config.n_embd;

    let t1 = Instant::now();
    let mut map = ShareMap::identity(n_layers);
    let mut mean_cos = 1.0f32;
    let mut trials = Vec::new();
    for (i, j) in ranked_pairs(&scores, opts.order) {
        if map.shared_count() >= opts.target {
            break;
        }
        if !map.owns_slot(i) {
            continue;
        }
        let candidate = map.with_shared(i, j)?;
        let out = eval.run_map(&candidate, false)?;
        let cos = mean_text_cosine(&cap.base_hidden, &out.hidden, per_text);
        let kept = cos > opts.threshold;
        trials.push(PairTrial {
            layer: i,
            source: j,
            resolved_source: candidate.source(i),
            score: scores[i][j],
            cosine: cos,
            kept,
            kld: None,
            step: None,
            seconds: Some(t1.elapsed().as_secs_f64()),
        });
        if kept {
            map = candidate;
            mean_cos = cos;
        }
        progress(Progress {
            tried: trials.len(),
            accepted: map.shared_count(),
            target: opts.target,
            last_cosine: cos,
        });
    }
    let shared = map.shared_count();
    let outcome = if shared >= opts.target {
        format!("target met: {shared} of {n_layers} layers shared")
    } else {
        format!(
            "target NOT met: only {shared} of the {} requested layers could be shared with cosine > {} after trying every pair",
            opts.target, opts.threshold
        )
    };
    Ok(SearchResult {
        map,
        target: opts.target,
        shared,
        threshold: opts.threshold,
        order: opts.order,
        mean_cosine: mean_cos,
        trials,
        scores,
        samples: set.n_samples,
        tokens_per_sample: set.seq_len,
        corpus_sha256: corpus_sha256.to_string(),
        capture_seconds: capture_time.as_secs_f64(),
        search_seconds: t1.elapsed().as_secs_f64(),
        outcome,
        strategy: Strategy::Paper,
        objective: Objective::Cosine,
        mean_kld: None,
        max_kld: None,
        beam: None,
        candidates: None,
        lazy: false,
        report_seconds: 0.0,
    })
}

/// A random valid map with `target` shared layers (the paper's "random sharing"
/// baseline): `target` distinct layers from 1.., each reading a random earlier
/// layer that owns its slot. Seeded, so a comparison can be repeated.
pub fn random_map(n_layers: usize, target: usize, seed: u64) -> Result<ShareMap, CalibrateError> {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    if target >= n_layers {
        return Err(CalibrateError::Target { target, n_layers });
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut layers: Vec<usize> = (1..n_layers).collect();
    layers.shuffle(&mut rng);
    let mut shared = layers[..target].to_vec();
    shared.sort_unstable();
    let mut map = ShareMap::identity(n_layers);
    for i in shared {
        let owners: Vec<usize> = (0..i).filter(|&j| map.owns_slot(j)).collect();
        let j = owners[rng.random_range(0..owners.len())];
        map = map.with_shared(i, j)?;
    }
    Ok(map)
}
