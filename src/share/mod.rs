//! KV cache sharing: the map (`ShareMap`) and, in `calibrate`, the search that finds it.

pub mod calibrate;
pub mod evaluator;
pub mod map;
pub mod report;
pub mod search;

pub use map::{ShareMap, ShareMapError};

/// GGUF metadata keys of a stored map (see `shared/KVSHARER.md`).
pub const KEY_VERSION: &str = "kvsharer.version";
pub const KEY_SOURCE_LAYER: &str = "kvsharer.kv_source_layer";
pub const KEY_SHARED_COUNT: &str = "kvsharer.shared_layer_count";
pub const KEY_THRESHOLD: &str = "kvsharer.calibration.threshold";
pub const KEY_MEAN_COSINE: &str = "kvsharer.calibration.mean_cosine";
pub const KEY_SAMPLE_COUNT: &str = "kvsharer.calibration.sample_count";
pub const KEY_TOKENS_PER_SAMPLE: &str = "kvsharer.calibration.tokens_per_sample";
pub const KEY_CORPUS_SHA256: &str = "kvsharer.calibration.corpus_sha256";
pub const KEY_STRATEGY: &str = "kvsharer.calibration.strategy";
pub const KEY_MEAN_KLD: &str = "kvsharer.calibration.mean_kld";
pub const FORMAT_VERSION: u32 = 1;
