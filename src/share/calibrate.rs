//! The KVSharer strategy search (`shared/KVSHARER.md`, "The strategy search"):
//! capture every layer's K/V on calibration texts with the unshared model, rank layer
//! pairs by how different their caches are, then greedily accept pairs whose sharing
//! keeps the final hidden states close to the unshared model's.
//!
//! Every calibration text is cut to the same number of tokens, and all texts are
//! packed into one cache and evaluated by one graph (see `Layout::Packed`), so a
//! candidate map costs one batched forward pass.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::kvplan::{ShareMap, ShareMapError};
use crate::model::Model;
use crate::runtime::RuntimeError;
use crate::share::evaluator::Evaluator;
use crate::share::search::{Objective, Strategy};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Cosine similarity, defined in [`crate::math`] (re-exported under its old path).
pub use crate::math::cosine;

/// The project's own calibration corpus (original prose, one text per line).
pub const DEFAULT_CORPUS: &str = include_str!("../../data/calibration.txt");

/// Texts shorter than this many tokens are too short to say anything about a layer.
pub const MIN_TOKENS_PER_SAMPLE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("calibration text: {0}")]
    Corpus(String),
    #[error("calibration: cannot share {target} layers of a {n_layers}-layer model (layer 0 always owns its cache; at most {max})", max = n_layers - 1)]
    Target { target: usize, n_layers: usize },
    #[error("calibration: threshold must be a number in [-1, 1], got {0}")]
    Threshold(f32),
    #[error("search strategy: {0}")]
    Strategy(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Map(#[from] ShareMapError),
}

/// Calibration texts: one per non-empty line, as the paper's code reads them.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub texts: Vec<String>,
    /// sha256 of the whole corpus text as given (recorded in the GGUF).
    pub sha256: String,
}

impl Corpus {
    pub fn from_text(text: &str) -> Corpus {
        Corpus {
            texts: text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
            sha256: hex(&Sha256::digest(text.as_bytes())),
        }
    }

    pub fn default_corpus() -> Corpus {
        Corpus::from_text(DEFAULT_CORPUS)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which pairs the paper's greedy search tries first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairOrder {
    /// Most dissimilar caches first (the paper's finding).
    Dissimilar,
    /// Most similar first (the intuitive baseline the paper argues against).
    Similar,
}

#[derive(Clone, Debug)]
pub struct CalibrationOptions {
    pub samples: usize,
    pub tokens: usize,
    pub target: usize,
    pub threshold: f32,
    pub order: PairOrder,
    pub threads: usize,
}

impl CalibrationOptions {
    /// Refuses a target that leaves no owning layer and a threshold no cosine can
    /// meet, before any work is done.
    pub fn check(&self, n_layers: usize) -> Result<(), CalibrateError> {
        if self.target >= n_layers {
            return Err(CalibrateError::Target {
                target: self.target,
                n_layers,
            });
        }
        if !(-1.0..=1.0).contains(&self.threshold) {
            return Err(CalibrateError::Threshold(self.threshold));
        }
        Ok(())
    }
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            samples: 30,
            tokens: 64,
            target: 0,
            threshold: 0.5,
            order: PairOrder::Dissimilar,
            threads: crate::runtime::default_threads(),
        }
    }
}

/// The calibration texts, tokenized and cut to a common length, packed end to end.
#[derive(Clone, Debug)]
pub struct CalibrationSet {
    pub tokens: Vec<u32>,
    pub seq_len: usize,
    pub n_samples: usize,
}

/// Tokenizes the first `samples` texts (BOS as the model's metadata says) and cuts
/// every one to the shortest text's length, at most `max_tokens`, so the per-layer
/// K/V can be averaged position by position across texts.
pub fn prepare(
    tokenizer: &Tokenizer,
    corpus: &Corpus,
    samples: usize,
    max_tokens: usize,
) -> Result<CalibrationSet, CalibrateError> {
    if samples == 0 {
        return Err(CalibrateError::Corpus(
            "--samples must be at least 1".into(),
        ));
    }
    if max_tokens < MIN_TOKENS_PER_SAMPLE {
        return Err(CalibrateError::Corpus(format!(
            "--tokens must be at least {MIN_TOKENS_PER_SAMPLE}"
        )));
    }
    if corpus.texts.len() < samples {
        return Err(CalibrateError::Corpus(format!(
            "{samples} samples requested but the text has only {} non-empty lines (one text per line)",
            corpus.texts.len()
        )));
    }
    let mut encoded = Vec::with_capacity(samples);
    for text in &corpus.texts[..samples] {
        encoded.push(tokenizer.encode(text, true, false)?);
    }
    let shortest = encoded.iter().map(Vec::len).min().unwrap_or(0);
    let seq_len = shortest.min(max_tokens);
    if seq_len < MIN_TOKENS_PER_SAMPLE {
        return Err(CalibrateError::Corpus(format!(
            "the shortest of the first {samples} lines is {shortest} tokens; every text must have at least {MIN_TOKENS_PER_SAMPLE} (each is cut to the shortest one's length, at most {max_tokens})"
        )));
    }
    let tokens = encoded
        .iter()
        .flat_map(|e| e[..seq_len].iter().copied())
        .collect();
    Ok(CalibrationSet {
        tokens,
        seq_len,
        n_samples: samples,
    })
}

/// Mean over texts of the cosine similarity of each text's flattened final hidden
/// states (`per_text` values each) in `hidden` versus `base_hidden`.
pub fn mean_text_cosine(base_hidden: &[f32], hidden: &[f32], per_text: usize) -> f32 {
    let cosines: Vec<f64> = base_hidden
        .chunks(per_text.max(1))
        .zip(hidden.chunks(per_text.max(1)))
        .map(|(a, b)| cosine(a, b))
        .collect();
    (cosines.iter().sum::<f64>() / cosines.len().max(1) as f64) as f32
}

/// Every layer's keys and values averaged across the calibration texts, position by
/// position: `[layer][seq_len * n_embd_kv]`, plus the unshared final hidden states.
pub struct Capture {
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub base_hidden: Vec<f32>,
}

/// Step 1 and 2: run the unshared model and average each layer's K/V over texts.
pub fn capture(
    model: &Model,
    set: &CalibrationSet,
    threads: usize,
) -> Result<Capture, CalibrateError> {
    let mut eval = Evaluator::cpu(model, set, threads, false)?.without_prefix();
    Ok(eval.capture(false)?.1)
}

/// Step 3: `score[i][j]` for `i > j` = (dK + dV) / 2, where dK is the mean over
/// (head, position) of the L2 norm over head_dim of `K_i - K_j`. Zero elsewhere.
pub fn distance_matrix(capture: &Capture, head_dim: usize) -> Vec<Vec<f32>> {
    let n = capture.keys.len();
    let dist = |a: &[f32], b: &[f32]| -> f64 {
        let vectors = a.len() / head_dim;
        let total: f64 = a
            .chunks(head_dim)
            .zip(b.chunks(head_dim))
            .map(|(x, y)| {
                x.iter()
                    .zip(y)
                    .map(|(p, q)| ((p - q) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .sum();
        total / vectors.max(1) as f64
    };
    let mut m = vec![vec![0f32; n]; n];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate().take(i) {
            let dk = dist(&capture.keys[i], &capture.keys[j]);
            let dv = dist(&capture.values[i], &capture.values[j]);
            *cell = ((dk + dv) / 2.0) as f32;
        }
    }
    m
}

/// Step 4: all pairs `(i, j)`, `i > j`, by score, most dissimilar first (or last).
pub fn ranked_pairs(scores: &[Vec<f32>], order: PairOrder) -> Vec<(usize, usize)> {
    let n = scores.len();
    let mut pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (0..i).map(move |j| (i, j))).collect();
    pairs.sort_by(|a, b| {
        let (sa, sb) = (scores[a.0][a.1], scores[b.0][b.1]);
        let ord = sb.total_cmp(&sa).then(a.cmp(b));
        match order {
            PairOrder::Dissimilar => ord,
            PairOrder::Similar => sa.total_cmp(&sb).then(a.cmp(b)),
        }
    });
    pairs
}

/// One pair the greedy search tried.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PairTrial {
    pub layer: usize,
    pub source: usize,
    /// The source actually used after resolving chains.
    pub resolved_source: usize,
    pub score: f32,
    pub cosine: f32,
    pub kept: bool,
    /// Mean KL divergence from the unshared model, when the strategy measured it.
    #[serde(default)]
    pub kld: Option<f32>,
    /// The step of a stepwise strategy (greedy, beam) that evaluated this pair.
    #[serde(default)]
    pub step: Option<usize>,
    /// Seconds from the start of the search (after the capture) to this trial's end,
    /// so the time to reach any smaller target can be read off one run.
    #[serde(default)]
    pub seconds: Option<f64>,
}

/// Progress of the search, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub tried: usize,
    pub accepted: usize,
    pub target: usize,
    pub last_cosine: f32,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SearchResult {
    pub map: ShareMap,
    pub target: usize,
    pub shared: usize,
    pub threshold: f32,
    pub order: PairOrder,
    /// Calibration cosine of the final map (1.0 for the identity map).
    pub mean_cosine: f32,
    pub trials: Vec<PairTrial>,
    pub scores: Vec<Vec<f32>>,
    pub samples: usize,
    pub tokens_per_sample: usize,
    pub corpus_sha256: String,
    pub capture_seconds: f64,
    pub search_seconds: f64,
    /// Why the search stopped.
    pub outcome: String,
    /// Which search found the map (`share::search`); reports written before
    /// strategies existed were all the paper's.
    #[serde(default)]
    pub strategy: Strategy,
    /// What the strategy optimised (the paper: cosine against a threshold).
    #[serde(default)]
    pub objective: Objective,
    /// Mean KL divergence of the final map's next-token distributions from the
    /// unshared model's over all calibration positions (both objectives are reported
    /// for every map, whichever one the search used).
    #[serde(default)]
    pub mean_kld: Option<f32>,
    /// Stop limit of a KL-driven search.
    #[serde(default)]
    pub max_kld: Option<f32>,
    /// Beam width of the beam strategy (1 for greedy).
    #[serde(default)]
    pub beam: Option<usize>,
    /// Pre-filter of the stepwise strategies: candidates per step.
    #[serde(default)]
    pub candidates: Option<usize>,
    /// Whether greedy skipped pairs that could not win a step (lazy evaluation).
    #[serde(default)]
    pub lazy: bool,
    /// Seconds spent measuring the objective the search did not use for the final map.
    #[serde(default)]
    pub report_seconds: f64,
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

impl SearchResult {
    pub fn total_time(&self) -> Duration {
        Duration::from_secs_f64(self.capture_seconds + self.search_seconds)
    }
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
