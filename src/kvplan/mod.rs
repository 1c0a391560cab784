//! The KV plan: which cache slot every layer reads (`ShareMap`), and its round trip
//! through GGUF metadata (`kvsharer.*`, see `shared/KVSHARER.md`). A leaf: it knows
//! the GGUF value types and nothing of models, backends or searches, which all build
//! on it.

mod map;
mod plan;

pub use map::{ShareMap, ShareMapError};
pub use plan::{Half, KvPlan, KvPlanError, PLAN_TYPES};

use crate::gguf::{Array, GgmlType, GgufFile, Value};

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
pub const KEY_K_SOURCE: &str = "kvsharer.k_source_layer";
pub const KEY_V_SOURCE: &str = "kvsharer.v_source_layer";
pub const KEY_K_TYPE: &str = "kvsharer.k_type";
pub const KEY_V_TYPE: &str = "kvsharer.v_type";
pub const KEY_PLAN_BUDGET: &str = "kvsharer.plan.budget";
pub const KEY_PLAN_PREDICTED_KLD: &str = "kvsharer.plan.predicted_kld";
/// Version 1: one whole-layer map. Version 2: the KV memory plan (K and V apart,
/// a type per owned slot), with version 1's map beside it when the halves agree.
pub const MAP_VERSION: u32 = 1;
pub const PLAN_VERSION: u32 = 2;
/// The newest format this build reads.
pub const FORMAT_VERSION: u32 = PLAN_VERSION;

/// Why a stored map could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("stored KV sharing map: {0}")]
    Format(String),
    #[error("stored KV sharing map has format version {found}; this kvsharer reads versions 1 to {FORMAT_VERSION} (upgrade kvsharer, or run without the map)")]
    Version { found: u32 },
    #[error("stored KV sharing map is invalid: {0}")]
    Map(#[from] ShareMapError),
    #[error("stored KV plan is invalid: {0}")]
    Plan(#[from] KvPlanError),
}

/// The keys that describe the map itself, as a writer stores them (version 1).
pub fn to_metadata(map: &ShareMap) -> Vec<(String, Value)> {
    vec![
        (KEY_VERSION.to_string(), Value::U32(MAP_VERSION)),
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

fn u32_array(v: impl IntoIterator<Item = usize>) -> Value {
    Value::Array(Array::U32(v.into_iter().map(|s| s as u32).collect()))
}

/// The keys of a version-2 plan: both halves' sources and types, version 1's map
/// when the halves agree (so older readers still share), and what the planner
/// aimed at and predicted.
pub fn plan_to_metadata(plan: &KvPlan, budget: f32, predicted_kld: f32) -> Vec<(String, Value)> {
    let types = |half: Half| {
        Value::Array(Array::String(
            plan.types(half)
                .iter()
                .map(|t| t.name().to_string())
                .collect(),
        ))
    };
    let mut kv = vec![
        (KEY_VERSION.to_string(), Value::U32(PLAN_VERSION)),
        (
            KEY_K_SOURCE.to_string(),
            u32_array(plan.sources(Half::Keys).sources().iter().copied()),
        ),
        (
            KEY_V_SOURCE.to_string(),
            u32_array(plan.sources(Half::Values).sources().iter().copied()),
        ),
        (KEY_K_TYPE.to_string(), types(Half::Keys)),
        (KEY_V_TYPE.to_string(), types(Half::Values)),
        (KEY_PLAN_BUDGET.to_string(), Value::F32(budget)),
        (
            KEY_PLAN_PREDICTED_KLD.to_string(),
            Value::F32(predicted_kld),
        ),
    ];
    if let Some(map) = plan.as_map() {
        kv.push((
            KEY_SOURCE_LAYER.to_string(),
            u32_array(map.sources().iter().copied()),
        ));
        kv.push((
            KEY_SHARED_COUNT.to_string(),
            Value::U32(map.shared_count() as u32),
        ));
    }
    kv
}

/// The version-2 plan stored in `file`, checked against the model's `n_layers`;
/// `None` when the file stores none (a version-1 map is read by `from_gguf`).
pub fn plan_from_gguf(file: &GgufFile, n_layers: usize) -> Result<Option<KvPlan>, PlanError> {
    let Some(k_source) = file.get(KEY_K_SOURCE) else {
        return Ok(None);
    };
    check_version(file)?;
    let sources = |key: &str, value: Option<&Value>| -> Result<Vec<usize>, PlanError> {
        let value = value.ok_or_else(|| PlanError::Format(format!("{key} is missing")))?;
        let v = value
            .as_array()
            .and_then(|a| a.to_u32_vec())
            .ok_or_else(|| {
                PlanError::Format(format!(
                    "{key} must be an array of u32, found {}",
                    value.type_name()
                ))
            })?;
        Ok(v.into_iter().map(|s| s as usize).collect())
    };
    let types = |key: &str| -> Result<Vec<GgmlType>, PlanError> {
        let value = file
            .get(key)
            .ok_or_else(|| PlanError::Format(format!("{key} is missing")))?;
        let names = value
            .as_array()
            .and_then(|a| a.as_strings())
            .ok_or_else(|| {
                PlanError::Format(format!(
                    "{key} must be an array of strings, found {}",
                    value.type_name()
                ))
            })?;
        names
            .iter()
            .map(|n| {
                GgmlType::from_name(n)
                    .ok_or_else(|| PlanError::Format(format!("{key}: '{n}' is not a ggml type")))
            })
            .collect()
    };
    let plan = KvPlan::new(
        sources(KEY_K_SOURCE, Some(k_source))?,
        sources(KEY_V_SOURCE, file.get(KEY_V_SOURCE))?,
        types(KEY_K_TYPE)?,
        types(KEY_V_TYPE)?,
        n_layers,
    )?;
    Ok(Some(plan))
}

/// Refuses a `kvsharer.version` newer than this build reads, or one that is not a
/// number. Files without the key predate it and hold version 1's map.
fn check_version(file: &GgufFile) -> Result<(), PlanError> {
    let Some(v) = file.get(KEY_VERSION) else {
        return Ok(());
    };
    match v.as_u64() {
        Some(found) if (1..=u64::from(FORMAT_VERSION)).contains(&found) => Ok(()),
        Some(found) => Err(PlanError::Version {
            found: u32::try_from(found).unwrap_or(u32::MAX),
        }),
        None => Err(PlanError::Format(format!(
            "{KEY_VERSION} must be an unsigned integer, found {}",
            v.type_name()
        ))),
    }
}

/// The map stored in `file`, checked against its format version and the model's
/// `n_layers`; `None` when the file stores none.
pub fn from_gguf(file: &GgufFile, n_layers: usize) -> Result<Option<ShareMap>, PlanError> {
    let Some(value) = file.get(KEY_SOURCE_LAYER) else {
        return Ok(None);
    };
    check_version(file)?;
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
