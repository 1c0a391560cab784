//! Llama hyper-parameters (`LlamaConfig`), read and validated from GGUF metadata.

use super::role::Role;
use super::ModelError;
use crate::gguf::GgufFile;

/// The Llama-family variants kvsharer runs: the Llama graph with small
/// differences, each a property of the variant rather than a forward pass of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1-3.x, Mistral, SmolLM: the reference graph (optional Q/K/V biases and
    /// `rope_freqs` as llama.cpp reads them).
    Llama,
    /// Qwen2 / Qwen2.5: biases on Q, K and V; NEOX RoPE.
    Qwen2,
    /// Qwen3: an RMS norm on each head's queries and keys before RoPE; NEOX RoPE.
    Qwen3,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3];

    /// The `general.architecture` value.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// RoPE rotates pairs `(i, i + head_dim/2)` (llama.cpp's NEOX type) rather
    /// than adjacent pairs.
    pub fn rope_neox(self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Qwen3)
    }

    /// Q, K and V projections carry biases (required).
    pub fn qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }

    /// Queries and keys are RMS-normed per head before RoPE (required).
    pub fn qk_norm(self) -> bool {
        self == Arch::Qwen3
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Llama hyper-parameters, from `{arch}.*` metadata keys.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub arch: Arch,
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
        let Some(variant) = Arch::from_name(&arch) else {
            return Err(ModelError::UnsupportedArchitecture(arch));
        };
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
        let embd_name = Role::TokenEmbd.tensor_name();
        let token_embd = file
            .tensor(&embd_name)
            .ok_or(ModelError::MissingTensor(embd_name))?;
        let n_vocab = token_embd.dims.get(1).copied().unwrap_or(0) as usize;
        Ok(LlamaConfig {
            architecture: arch,
            arch: variant,
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
