//! The sharing search (calibration), written once over any backend's `RunState`:
//!
//! - `calibration`: the corpus, the calibration set (texts tokenized and cut to one
//!   length), the K/V distance scores, and the search's errors;
//! - `evaluator`: the one evaluator every strategy runs on (the set under a map);
//! - `paper`: the paper's search (distance order, cosine threshold);
//! - `strategy`: the stepwise searches (greedy, beam) by measured KL divergence or
//!   cosine, and `run`, which runs whichever strategy was asked for;
//! - `planner`: the KV memory plan for a byte budget (sharing K and V apart, a
//!   precision per slot), from measured single-move costs;
//! - `result`, `report`: what a search returns and leaves behind (table, JSON, SVG,
//!   GGUF metadata).
//!
//! The map itself and its GGUF round trip live in `kvplan`.

pub mod adapter;
pub mod calibration;
pub mod evaluator;
pub mod paper;
pub mod planner;
pub mod report;
pub mod result;
pub mod strategy;

pub use calibration::{
    distance_matrix, half_distances, mean_text_cosine, prepare, ranked_pairs, CalibrateError,
    CalibrationOptions, CalibrationSet, Capture, Corpus, PairOrder, DEFAULT_CORPUS,
    MIN_TOKENS_PER_SAMPLE,
};
pub use evaluator::{start_layer, Evaluator, MapRun};
pub use paper::{capture, random_map};
pub use result::{Objective, PairTrial, Progress, SearchResult, Strategy};
pub use strategy::{
    check_options, measure_kld, run, run_with, KlReference, SearchProgress, StrategyOptions,
};
