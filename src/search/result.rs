//! What a search returns: the map, every pair tried, the scores, the strategy and
//! objective that found it, and the time it took.

use std::time::Duration;

use crate::kvplan::ShareMap;
use crate::search::calibration::PairOrder;

/// Which search finds the map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The paper's: distance-ordered pairs, kept while the cosine passes a threshold.
    #[default]
    Paper,
    /// Best pair by the objective at every step.
    Greedy,
    /// The `W` best maps at every step.
    Beam,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Paper => "paper",
            Strategy::Greedy => "greedy",
            Strategy::Beam => "beam",
        }
    }
}

/// What a stepwise search optimises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Mean final-hidden cosine against the unshared model (higher is better).
    #[default]
    Cosine,
    /// Mean next-token KL divergence from the unshared model (lower is better).
    Kld,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Cosine => "cosine",
            Objective::Kld => "kld",
        }
    }
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

impl SearchResult {
    pub fn total_time(&self) -> Duration {
        Duration::from_secs_f64(self.capture_seconds + self.search_seconds)
    }
}
