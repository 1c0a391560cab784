//! A Llama-family model, backend-neutral: its hyper-parameters (`config`), the plan
//! of its weights (`weights`: for every role, the tensor of the file that fills
//! it), the mapped file, and the sharing map stored in it. Backends place the weights
//! from the plan; run state (KV cache, positions) lives in their sessions, never here.

use std::path::Path;
use std::sync::Arc;

use crate::gguf::{GgufError, GgufFile};
use crate::kvplan::{self, KvPlan, PlanError, ShareMap};

pub mod config;
pub mod role;
pub mod weights;

pub use config::{Arch, LlamaConfig};
pub use role::{LayerRole, Role};
pub use weights::{adapter_key, LayerWeights, PlannedTensor, WeightPlan, MATMUL_TYPES};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture '{0}': kvsharer runs llama (Llama, Mistral, SmolLM), qwen2 and qwen3 models")]
    UnsupportedArchitecture(String),
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor '{name}' uses quantization type {ty}, which kvsharer cannot run (supported: {supported})")]
    UnsupportedType {
        name: String,
        ty: &'static str,
        supported: String,
    },
    #[error(transparent)]
    StoredMap(#[from] PlanError),
}

/// A loaded model: config, weight plan, the file the weights live in, and the sharing
/// map stored in the file, if any.
pub struct Model {
    pub config: LlamaConfig,
    pub weights: WeightPlan,
    /// Version 1's whole-layer map (also kept by version-2 files whose halves agree).
    pub stored_map: Option<ShareMap>,
    /// Version 2's KV memory plan, where the file stores one.
    pub stored_plan: Option<KvPlan>,
    file: Arc<GgufFile>,
}

impl Model {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::from_file(Arc::new(GgufFile::open(path)?))
    }

    pub fn from_file(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(&file)?;
        let weights = WeightPlan::from_gguf(&file, &config)?;
        let stored_map = kvplan::from_gguf(&file, config.n_layers)?;
        let stored_plan = kvplan::plan_from_gguf(&file, config.n_layers)?;
        Ok(Model {
            config,
            weights,
            stored_map,
            stored_plan,
            file,
        })
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// The bytes of planned weight `index` (see `WeightPlan::tensors`), in the
    /// mapped file.
    pub fn weight_bytes(&self, index: usize) -> &[u8] {
        let t = self.weights.tensor(index);
        // The plan's ranges come from the file's tensor index, whose bounds the
        // reader checked at open.
        &self.file.bytes()[t.offset..t.offset + t.n_bytes]
    }
}
