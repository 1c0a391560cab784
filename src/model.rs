//! A Llama-family model: its hyper-parameters (`LlamaConfig`) read and validated from
//! GGUF metadata, and its weights (`TransformerWeights`) used in place from the mmap'd
//! file. Run state (KV cache, positions) lives in `session`, never here.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use crate::backend::ggml::{GgmlBackend, GgmlError, Tensor, TensorArena, WeightPlacement};
use crate::gguf::{GgmlType, GgufError, GgufFile};
use crate::kvplan::{self, PlanError, ShareMap};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    #[error("unsupported architecture '{0}': kvsharer runs Llama-family models (general.architecture = llama)")]
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

/// Architectures whose GGUF layout and graph are the Llama one.
const LLAMA_ARCHS: &[&str] = &["llama"];

/// Weight types ggml's CPU backend can multiply with (`vec_dot` exists).
pub const MATMUL_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ3_XXS,
    GgmlType::IQ1_S,
    GgmlType::IQ4_NL,
    GgmlType::IQ3_S,
    GgmlType::IQ2_S,
    GgmlType::IQ4_XS,
    GgmlType::IQ1_M,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::MXFP4,
];

/// Llama hyper-parameters, from `{arch}.*` metadata keys.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_dim: usize,
    pub rope_freq_base: f32,
    /// 1 / linear scaling factor (1.0 when the model is not rope-scaled).
    pub rope_freq_scale: f32,
}

impl LlamaConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file.get_str("general.architecture")?.to_string();
        if !LLAMA_ARCHS.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize, ModelError> { Ok(file.get_u32(&key(k))? as usize) };
        let opt = |k: &str| -> Result<Option<usize>, ModelError> {
            match file.get(&key(k)) {
                None => Ok(None),
                Some(_) => Ok(Some(file.get_u32(&key(k))? as usize)),
            }
        };
        let n_layers = req("block_count")?;
        let n_embd = req("embedding_length")?;
        let n_ff = req("feed_forward_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ctx_train = req("context_length")?;
        if n_layers == 0 || n_embd == 0 || n_ff == 0 || n_head == 0 || n_head_kv == 0 {
            return Err(ModelError::Metadata(
                "block_count, embedding_length, feed_forward_length and head counts must be > 0"
                    .into(),
            ));
        }
        if n_layers > 4096 || n_head > 4096 || n_embd > 1 << 20 || n_ff > 1 << 22 {
            return Err(ModelError::Metadata(format!(
                "implausible sizes (layers {n_layers}, heads {n_head}, embd {n_embd}, ff {n_ff})"
            )));
        }
        if n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::Metadata(format!(
                "embedding {n_embd} / heads {n_head} / kv heads {n_head_kv} are not divisible"
            )));
        }
        let head_dim = opt("attention.key_length")?.unwrap_or(n_embd / n_head);
        let v_dim = opt("attention.value_length")?.unwrap_or(n_embd / n_head);
        if head_dim != v_dim || head_dim == 0 || head_dim % 2 != 0 {
            return Err(ModelError::Metadata(format!(
                "key length {head_dim} and value length {v_dim} must be equal and even"
            )));
        }
        let rope_dim = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(ModelError::Metadata(format!(
                "partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) are not supported"
            )));
        }
        let rms_eps = file.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_freq_base = match file.get(&key("rope.freq_base")) {
            None => 10000.0,
            Some(_) => file.get_f32(&key("rope.freq_base"))?,
        };
        let rope_freq_scale = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => {
                let f = file.get_f32(&key("rope.scaling.factor"))?;
                if !(f.is_finite() && f > 0.0) {
                    return Err(ModelError::Metadata(format!(
                        "rope.scaling.factor {f} is invalid"
                    )));
                }
                1.0 / f
            }
            Some(other) => {
                return Err(ModelError::Metadata(format!(
                    "rope scaling type '{other}' is not supported (only linear)"
                )))
            }
        };
        if !(rms_eps.is_finite()
            && rms_eps > 0.0
            && rope_freq_base.is_finite()
            && rope_freq_base > 0.0)
        {
            return Err(ModelError::Metadata(
                "rms epsilon or rope base is not a positive number".into(),
            ));
        }
        let token_embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let n_vocab = token_embd.dims.get(1).copied().unwrap_or(0) as usize;
        Ok(LlamaConfig {
            architecture: arch,
            n_layers,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope_dim,
            rope_freq_base,
            rope_freq_scale,
        })
    }

    /// Width of one layer's keys (or values) for one token: kv heads x head dim.
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// Indices of one decoder layer's tensors in the weight arena.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: usize,
    pub wq: usize,
    pub wk: usize,
    pub wv: usize,
    pub wo: usize,
    pub ffn_norm: usize,
    pub ffn_gate: usize,
    pub ffn_up: usize,
    pub ffn_down: usize,
}

/// Indices of every weight in the arena (llama2.c's `TransformerWeights`).
#[derive(Clone, Debug)]
pub struct TransformerWeights {
    pub token_embd: usize,
    pub output_norm: usize,
    /// `output.weight`, or `token_embd.weight` when the embeddings are tied.
    pub output: usize,
    pub tied_output: bool,
    pub rope_freqs: Option<usize>,
    pub layers: Vec<LayerWeights>,
}

/// A loaded model: config, weights placed on the CPU backend, the file they live in,
/// and the sharing map stored in the file, if any.
pub struct Model {
    pub config: LlamaConfig,
    pub weights: TransformerWeights,
    pub stored_map: Option<ShareMap>,
    arena: TensorArena,
    /// Copies of `arena` on GPU devices, by device name, alive while a session uses
    /// them: sessions on one device share one copy.
    device_copies: Mutex<Vec<(String, Weak<TensorArena>)>>,
    file: Arc<GgufFile>,
}

/// The weights a session's graphs read, indexed as `TransformerWeights` says.
pub enum PlacedWeights<'m> {
    /// The model's own tensors, in place in the mapped file (the CPU backend).
    Mapped(&'m TensorArena),
    /// A copy in a device buffer (CUDA, Vulkan, Metal).
    Device(Arc<TensorArena>),
}

impl PlacedWeights<'_> {
    pub fn get(&self, index: usize) -> Tensor<'_> {
        match self {
            PlacedWeights::Mapped(a) => a.tensor(index),
            PlacedWeights::Device(a) => a.tensor(index),
        }
    }

    /// Whether the weights were copied off the mapped file.
    pub fn is_device_copy(&self) -> bool {
        matches!(self, PlacedWeights::Device(_))
    }
}

impl Model {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::from_file(Arc::new(GgufFile::open(path)?))
    }

    pub fn from_file(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(&file)?;
        let (placements, weights) = plan_weights(&file, &config)?;
        let arena = TensorArena::from_mapped(file.bytes(), &placements)?;
        let stored_map = kvplan::from_gguf(&file, config.n_layers)?;
        Ok(Model {
            config,
            weights,
            stored_map,
            arena,
            device_copies: Mutex::new(Vec::new()),
            file,
        })
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// A weight tensor by its arena index (see `TransformerWeights`).
    pub fn w(&self, index: usize) -> Tensor<'_> {
        self.arena.tensor(index)
    }

    /// A CPU backend for this model's sessions.
    pub fn cpu_backend(n_threads: usize) -> Result<GgmlBackend, ModelError> {
        Ok(GgmlBackend::cpu(n_threads)?)
    }

    /// The weights as `backend` reads them: in place from the mapping on the CPU (no
    /// copy), else a copy in the device's memory, made on first use and shared by
    /// every session on that device while any of them lives.
    pub fn weights_for(&self, backend: &GgmlBackend) -> Result<PlacedWeights<'_>, ModelError> {
        if backend.is_cpu() {
            return Ok(PlacedWeights::Mapped(&self.arena));
        }
        // A poisoned lock only means another thread panicked mid-upload; the list
        // itself (weak handles) is always consistent.
        let mut copies = self
            .device_copies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        copies.retain(|(_, w)| w.strong_count() > 0);
        let device = backend.device_name();
        if let Some(live) = copies
            .iter()
            .find(|(name, _)| name == device)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(PlacedWeights::Device(live));
        }
        let copy = Arc::new(self.arena.copy_to_device(backend)?);
        copies.push((device.to_string(), Arc::downgrade(&copy)));
        Ok(PlacedWeights::Device(copy))
    }
}

fn plan_weights<'f>(
    file: &'f GgufFile,
    c: &LlamaConfig,
) -> Result<(Vec<WeightPlacement<'f>>, TransformerWeights), ModelError> {
    let mut placements: Vec<WeightPlacement<'f>> = Vec::new();
    let base = file.data_offset() as usize;
    let mut place =
        |name: &str, shape: &[usize], matmul: bool| -> Result<Option<usize>, ModelError> {
            let Some(t) = file.tensor(name) else {
                return Ok(None);
            };
            let expected: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            let mut found = t.dims.clone();
            while found.len() > expected.len() && found.last() == Some(&1) {
                found.pop();
            }
            if found != expected {
                return Err(ModelError::Shape {
                    name: name.to_string(),
                    expected,
                    found: t.dims.clone(),
                });
            }
            let ok_type = if matmul {
                MATMUL_TYPES.contains(&t.ggml_type)
            } else {
                t.ggml_type == GgmlType::F32
            };
            if !ok_type {
                let supported = if matmul {
                    MATMUL_TYPES
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    "f32".to_string()
                };
                return Err(ModelError::UnsupportedType {
                    name: name.to_string(),
                    ty: t.ggml_type.name(),
                    supported,
                });
            }
            placements.push(WeightPlacement {
                name: &t.name,
                ty: t.ggml_type,
                ne: t.dims.iter().map(|&d| d as i64).collect(),
                offset: base + t.offset as usize,
                n_bytes: t.n_bytes as usize,
            });
            Ok(Some(placements.len() - 1))
        };
    let mut need = |name: &str, shape: &[usize], matmul: bool| -> Result<usize, ModelError> {
        place(name, shape, matmul)?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    };
    let (e, kv, q) = (c.n_embd, c.n_embd_kv(), c.n_head * c.head_dim);
    let token_embd = need("token_embd.weight", &[e, c.n_vocab], true)?;
    let output_norm = need("output_norm.weight", &[e], false)?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        layers.push(LayerWeights {
            attn_norm: need(&n("attn_norm"), &[e], false)?,
            wq: need(&n("attn_q"), &[e, q], true)?,
            wk: need(&n("attn_k"), &[e, kv], true)?,
            wv: need(&n("attn_v"), &[e, kv], true)?,
            wo: need(&n("attn_output"), &[q, e], true)?,
            ffn_norm: need(&n("ffn_norm"), &[e], false)?,
            ffn_gate: need(&n("ffn_gate"), &[e, c.n_ff], true)?,
            ffn_up: need(&n("ffn_up"), &[e, c.n_ff], true)?,
            ffn_down: need(&n("ffn_down"), &[c.n_ff, e], true)?,
        });
    }
    let output = place("output.weight", &[e, c.n_vocab], true)?;
    let rope_freqs = place("rope_freqs.weight", &[c.head_dim / 2], false)?;
    let weights = TransformerWeights {
        token_embd,
        output_norm,
        output: output.unwrap_or(token_embd),
        tied_output: output.is_none(),
        rope_freqs,
        layers,
    };
    Ok((placements, weights))
}
