//! The KVSharer strategy search (`shared/KVSHARER.md`, "The strategy search"):
//! capture every layer's K/V on calibration texts with the unshared model, rank layer
//! pairs by how different their caches are, then greedily accept pairs whose sharing
//! keeps the final hidden states close to the unshared model's.
//!
//! Every calibration text is cut to the same number of tokens, and all texts are
//! packed into one cache and evaluated by one graph (see `Layout::Packed`), so a
//! candidate map costs one batched forward pass.

use sha2::{Digest, Sha256};

use crate::kvplan::ShareMapError;
use crate::runtime::RuntimeError;
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
    #[error(transparent)]
    Plan(#[from] crate::kvplan::KvPlanError),
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
            "at least 1 calibration text (sample) is needed".into(),
        ));
    }
    if max_tokens < MIN_TOKENS_PER_SAMPLE {
        return Err(CalibrateError::Corpus(format!(
            "texts must be cut to at least {MIN_TOKENS_PER_SAMPLE} tokens"
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
    pub base_hidden: std::sync::Arc<Vec<f32>>,
}

/// Step 3: `score[i][j]` for `i > j` = (dK + dV) / 2, where dK is the mean over
/// (head, position) of the L2 norm over head_dim of `K_i - K_j`. Zero elsewhere.
pub fn distance_matrix(capture: &Capture, head_dim: usize) -> Vec<Vec<f32>> {
    let dk = half_distances(&capture.keys, head_dim);
    let dv = half_distances(&capture.values, head_dim);
    dk.iter()
        .zip(&dv)
        .map(|(k, v)| k.iter().zip(v).map(|(a, b)| (a + b) / 2.0).collect())
        .collect()
}

/// `d[i][j]` for `i > j`: the mean over (head, position) of the L2 norm over
/// head_dim of `X_i - X_j`, for one half's captures `X` (keys or values).
pub fn half_distances(layers: &[Vec<f32>], head_dim: usize) -> Vec<Vec<f32>> {
    let n = layers.len();
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
            *cell = dist(&layers[i], &layers[j]) as f32;
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
