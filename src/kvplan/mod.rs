//! The KV plan: which cache slot every layer reads (`ShareMap`), and its round trip
//! through GGUF metadata (`kvsharer.*`, see `shared/KVSHARER.md`). A leaf: it knows
//! the GGUF value types and nothing of models, backends or searches, which all build
//! on it.

mod map;

pub use map::{ShareMap, ShareMapError};

use crate::gguf::{Array, GgufFile, Value};

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
/// The format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Why a stored map could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("stored KV sharing map: {0}")]
    Format(String),
    #[error("stored KV sharing map has format version {found}; this kvsharer reads version {FORMAT_VERSION} (upgrade kvsharer, or run without the map)")]
    Version { found: u32 },
    #[error("stored KV sharing map is invalid: {0}")]
    Map(#[from] ShareMapError),
}

/// The keys that describe the map itself, as a writer stores them.
pub fn to_metadata(map: &ShareMap) -> Vec<(String, Value)> {
    vec![
        (KEY_VERSION.to_string(), Value::U32(FORMAT_VERSION)),
        (
            KEY_SOURCE_LAYER.to_string(),
            Value::Array(Array::U32(
                map.sources().iter().map(|&s| s as u32).collect(),
            )),
        ),
        (
            KEY_SHARED_COUNT.to_string(),
            Value::U32(map.shared_count() as u32),
        ),
    ]
}

/// The map stored in `file`, checked against its format version and the model's
/// `n_layers`; `None` when the file stores none.
pub fn from_gguf(file: &GgufFile, n_layers: usize) -> Result<Option<ShareMap>, PlanError> {
    let Some(value) = file.get(KEY_SOURCE_LAYER) else {
        return Ok(None);
    };
    // Files without a version key predate it and hold version 1's map.
    if let Some(v) = file.get(KEY_VERSION) {
        match v.as_u64() {
            Some(found) if found == u64::from(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(PlanError::Version {
                    found: u32::try_from(found).unwrap_or(u32::MAX),
                })
            }
            None => {
                return Err(PlanError::Format(format!(
                    "{KEY_VERSION} must be an unsigned integer, found {}",
                    v.type_name()
                )))
            }
        }
    }
    let sources = value
        .as_array()
        .and_then(|a| a.to_u32_vec())
        .ok_or_else(|| {
            PlanError::Format(format!(
                "{KEY_SOURCE_LAYER} must be an array of u32, found {}",
                value.type_name()
            ))
        })?;
    let sources = sources.into_iter().map(|s| s as usize).collect();
    Ok(Some(ShareMap::for_model(sources, n_layers)?))
}
