//! The weight plan: for every role a Llama model's forward pass reads (embeddings,
//! norms, projections), the tensor that fills it in the GGUF file, with its name,
//! shape, type and where its bytes lie, checked once against the config. Backends
//! place the weights from the plan (ggml: tensors over the mapped file or a device
//! copy; wgpu: GPU buffers) and never spell a tensor name themselves.

use std::ops::Index;

use super::config::{Arch, LlamaConfig};
use super::role::{LayerRole, Role};
use super::ModelError;
use crate::gguf::{Array, GgmlType, GgufFile};
use crate::kvplan::{Half, KvPlan};

/// Matrix weight types kvsharer runs: those ggml's CPU backend multiplies with
/// (`vec_dot` exists). The wgpu backend reads a subset (`GPU_WEIGHT_TYPES`).
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

/// The shape the config calls for, in ggml order (`[0]` is the row length).
fn expected_shape(role: Role, c: &LlamaConfig) -> Vec<usize> {
    let (e, kv, q) = (c.n_embd, c.n_embd_kv(), c.n_head * c.head_dim);
    match role {
        Role::TokenEmbd | Role::Output => vec![e, c.n_vocab],
        Role::OutputNorm => vec![e],
        Role::RopeFreqs => vec![c.head_dim / 2],
        Role::Layer(_, r) => match r {
            LayerRole::AttnNorm | LayerRole::FfnNorm => vec![e],
            LayerRole::AttnQ | LayerRole::AttnQAdapted => vec![e, q],
            LayerRole::AttnK | LayerRole::AttnV => vec![e, kv],
            LayerRole::AttnOutput | LayerRole::AttnOutputAdapted => vec![q, e],
            LayerRole::FfnGate | LayerRole::FfnUp => vec![e, c.n_ff],
            LayerRole::FfnDown => vec![c.n_ff, e],
            LayerRole::AttnQBias => vec![q],
            LayerRole::AttnKBias | LayerRole::AttnVBias => vec![kv],
            LayerRole::AttnQNorm | LayerRole::AttnKNorm => vec![c.head_dim],
        },
    }
}

/// One planned weight: which tensor of the file fills `role`, and where its bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub role: Role,
    pub name: String,
    /// Shape as the file stores it, in ggml order (trailing 1s kept).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the file (not of its data section).
    pub offset: usize,
    pub n_bytes: usize,
}

/// Where one decoder layer's tensors are in a list, by `LayerRole`: in
/// `WeightPlan::tensors` for the plan's own; a backend may index its placed copies
/// the same way (the wgpu session: its buffers). Every role of `LayerRole::ALL` is
/// there; those of `LayerRole::OPTIONAL` where the variant has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerWeights {
    required: [usize; 9],
    optional: [Option<usize>; 7],
}

impl LayerWeights {
    /// The index of every required role's tensor, as `index` gives them in
    /// `LayerRole::ALL` order; the first error stops it. No optional ones.
    pub fn try_from_fn<E>(mut index: impl FnMut(LayerRole) -> Result<usize, E>) -> Result<Self, E> {
        let mut required = [0; 9];
        for (id, role) in required.iter_mut().zip(LayerRole::ALL) {
            *id = index(role)?;
        }
        Ok(LayerWeights {
            required,
            optional: [None; 7],
        })
    }

    /// The tensor of `role`, if the layer has one.
    pub fn get(&self, role: LayerRole) -> Option<usize> {
        match LayerRole::OPTIONAL.iter().position(|&r| r == role) {
            Some(i) => self.optional[i],
            None => Some(self.required[role as usize]),
        }
    }

    /// Records the tensor of an optional role (`LayerRole::OPTIONAL`).
    pub fn set_optional(&mut self, role: LayerRole, index: usize) {
        let i = LayerRole::OPTIONAL
            .iter()
            .position(|&r| r == role)
            .expect("an optional role");
        self.optional[i] = Some(index);
    }
}

/// A required role's tensor (`LayerRole::ALL`); optional roles go through `get`.
impl Index<LayerRole> for LayerWeights {
    type Output = usize;

    fn index(&self, role: LayerRole) -> &usize {
        assert!(
            !LayerRole::OPTIONAL.contains(&role),
            "{role:?} is optional: use LayerWeights::get"
        );
        &self.required[role as usize]
    }
}

/// Every weight of the model (llama2.c's `TransformerWeights`), checked against the
/// config: names, shapes, types. Roles refer to tensors by their index in
/// `tensors()`, so a backend that places `tensors()` in order can look them up by
/// the same index.
#[derive(Clone, Debug)]
pub struct WeightPlan {
    tensors: Vec<PlannedTensor>,
    token_embd: usize,
    output_norm: usize,
    output: usize,
    tied_output: bool,
    rope_freqs: Option<usize>,
    layers: Vec<LayerWeights>,
    /// Per half (keys, values), per layer: the source layer that layer's adapted
    /// tensor (`AttnQAdapted`, `AttnOutputAdapted`) was fitted for.
    adapted_for: [Vec<Option<usize>>; 2],
}

impl WeightPlan {
    /// The plan of `file`'s weights for `config`: every required tensor present, of
    /// the shape the config says and a type kvsharer runs.
    pub fn from_gguf(file: &GgufFile, config: &LlamaConfig) -> Result<Self, ModelError> {
        let mut tensors = Vec::new();
        let base = file.data_offset() as usize;
        let mut plan = |role: Role| -> Result<Option<usize>, ModelError> {
            let name = role.tensor_name();
            let Some(t) = file.tensor(&name) else {
                return Ok(None);
            };
            let expected: Vec<u64> = expected_shape(role, config)
                .iter()
                .map(|&d| d as u64)
                .collect();
            let mut found = t.dims.clone();
            while found.len() > expected.len() && found.last() == Some(&1) {
                found.pop();
            }
            if found != expected {
                return Err(ModelError::Shape {
                    name,
                    expected,
                    found: t.dims.clone(),
                });
            }
            let matmul = role.is_matmul();
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
                    name,
                    ty: t.ggml_type.name(),
                    supported,
                });
            }
            tensors.push(PlannedTensor {
                role,
                name,
                dims: t.dims.clone(),
                ty: t.ggml_type,
                offset: base + t.offset as usize,
                n_bytes: t.n_bytes as usize,
            });
            Ok(Some(tensors.len() - 1))
        };
        // A tensor the variant may have (`None` when absent), or must have.
        let mut need_if = |role: Role, required: bool| -> Result<Option<usize>, ModelError> {
            match plan(role)? {
                None if required => Err(ModelError::MissingTensor(role.tensor_name())),
                found => Ok(found),
            }
        };
        let token_embd = need_if(Role::TokenEmbd, true)?.expect("required");
        let output_norm = need_if(Role::OutputNorm, true)?.expect("required");
        let mut layers = Vec::with_capacity(config.n_layers);
        let arch = config.arch;
        for il in 0..config.n_layers {
            let mut lw = LayerWeights::try_from_fn(|r| {
                need_if(Role::Layer(il, r), true).map(|t| t.expect("required"))
            })?;
            // Biases: required on qwen2, read where present on llama (as llama.cpp
            // does); the per-head norms only on qwen3.
            for role in LayerRole::OPTIONAL {
                let is_bias = matches!(
                    role,
                    LayerRole::AttnQBias | LayerRole::AttnKBias | LayerRole::AttnVBias
                );
                let adapted =
                    matches!(role, LayerRole::AttnQAdapted | LayerRole::AttnOutputAdapted);
                let (read, required) = if is_bias {
                    (arch != Arch::Qwen3, arch.qkv_bias())
                } else if adapted {
                    (true, false)
                } else {
                    (arch.qk_norm(), arch.qk_norm())
                };
                let index = if read {
                    need_if(Role::Layer(il, role), required)?
                } else {
                    None
                };
                if let Some(index) = index {
                    lw.set_optional(role, index);
                }
            }
            layers.push(lw);
        }
        let output = need_if(Role::Output, false)?;
        let rope_freqs = need_if(Role::RopeFreqs, false)?;
        let adapted_for = [
            adapted_sources(file, &layers, Half::Keys, LayerRole::AttnQAdapted)?,
            adapted_sources(file, &layers, Half::Values, LayerRole::AttnOutputAdapted)?,
        ];
        Ok(WeightPlan {
            tensors,
            token_embd,
            output_norm,
            output: output.unwrap_or(token_embd),
            tied_output: output.is_none(),
            rope_freqs,
            layers,
            adapted_for,
        })
    }

    /// The role whose tensor layer `il` projects queries with (`Half::Keys`) or
    /// multiplies its attention output by (`Half::Values`) under `plan`: the adapted
    /// one where the file has it and the layer reads that half from the source it
    /// was fitted for, else the original.
    pub fn adapted_role(&self, il: usize, half: Half, plan: &KvPlan) -> LayerRole {
        let (plain, adapted) = match half {
            Half::Keys => (LayerRole::AttnQ, LayerRole::AttnQAdapted),
            Half::Values => (LayerRole::AttnOutput, LayerRole::AttnOutputAdapted),
        };
        let source = plan.source(half, il);
        let fitted = self.adapted_for[half as usize].get(il).copied().flatten();
        if source != il && fitted == Some(source) {
            adapted
        } else {
            plain
        }
    }

    /// For each layer, the source layer its adapted tensor for `half` was fitted for.
    pub fn adapted_for(&self, half: Half) -> &[Option<usize>] {
        &self.adapted_for[half as usize]
    }

    /// Every planned tensor once (a tied output is the embedding's entry).
    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    pub fn tensor(&self, index: usize) -> &PlannedTensor {
        &self.tensors[index]
    }

    pub fn token_embd(&self) -> usize {
        self.token_embd
    }

    pub fn output_norm(&self) -> usize {
        self.output_norm
    }

    /// `output.weight`, or `token_embd.weight` when the embeddings are tied.
    pub fn output(&self) -> usize {
        self.output
    }

    pub fn tied_output(&self) -> bool {
        self.tied_output
    }

    pub fn rope_freqs(&self) -> Option<usize> {
        self.rope_freqs
    }

    pub fn layers(&self) -> &[LayerWeights] {
        &self.layers
    }
}

/// A one-layer Llama GGUF of f32 weights, for unit tests of the plan and of backends
/// placing it: embedding 32, 2 query heads and 1 KV head of 16, feed-forward 64,
/// vocabulary 8; every value is `element index / 1000`.
#[cfg(test)]
pub(crate) fn write_test_model(path: &std::path::Path, tied_output: bool) {
    use crate::gguf::{GgufBuilder, Value};
    let config = LlamaConfig {
        architecture: "llama".into(),
        arch: Arch::Llama,
        n_layers: 1,
        n_embd: 32,
        n_ff: 64,
        n_head: 2,
        n_head_kv: 1,
        head_dim: 16,
        n_vocab: 8,
        n_ctx_train: 64,
        rms_eps: 1e-5,
        rope_dim: 16,
        rope_freq_base: 10000.0,
        rope_freq_scale: 1.0,
    };
    let mut b = GgufBuilder::new();
    b.set("general.architecture", Value::String("llama".into()));
    for (key, v) in [
        ("block_count", config.n_layers),
        ("embedding_length", config.n_embd),
        ("feed_forward_length", config.n_ff),
        ("attention.head_count", config.n_head),
        ("attention.head_count_kv", config.n_head_kv),
        ("context_length", config.n_ctx_train),
    ] {
        b.set(&format!("llama.{key}"), Value::U32(v as u32));
    }
    b.set(
        "llama.attention.layer_norm_rms_epsilon",
        Value::F32(config.rms_eps),
    );
    let mut roles = vec![Role::TokenEmbd, Role::OutputNorm];
    roles.extend(LayerRole::ALL.map(|r| Role::Layer(0, r)));
    if !tied_output {
        roles.push(Role::Output);
    }
    for role in roles {
        let dims: Vec<u64> = expected_shape(role, &config)
            .iter()
            .map(|&d| d as u64)
            .collect();
        let n = dims.iter().product::<u64>() as usize;
        let data = (0..n)
            .flat_map(|i| (i as f32 / 1000.0).to_le_bytes())
            .collect();
        b.add_tensor(&role.tensor_name(), &dims, GgmlType::F32, data)
            .unwrap();
    }
    b.write_to(path).unwrap();
}

/// GGUF keys naming, per layer, the source an adapted tensor was fitted for
/// (`kvsharer.adapter.k_source_layer`, `kvsharer.adapter.v_source_layer`).
pub fn adapter_key(half: Half) -> &'static str {
    match half {
        Half::Keys => "kvsharer.adapter.k_source_layer",
        Half::Values => "kvsharer.adapter.v_source_layer",
    }
}

/// The fitted sources of `half`'s adapted tensors: every adapted tensor needs one,
/// an earlier layer, and the key's array has one entry per layer.
fn adapted_sources(
    file: &GgufFile,
    layers: &[LayerWeights],
    half: Half,
    role: LayerRole,
) -> Result<Vec<Option<usize>>, ModelError> {
    let key = adapter_key(half);
    let any = layers.iter().any(|lw| lw.get(role).is_some());
    let sources: Option<Vec<u64>> = match file.get(key) {
        None => None,
        Some(v) => {
            let bad = |why: &str| ModelError::Metadata(format!("{key}: {why}"));
            let Ok(array) = file.get_array(key) else {
                return Err(bad(&format!("expected an array of u32, found {v:?}")));
            };
            let values = match array {
                Array::U32(v) => v.iter().map(|&x| x as u64).collect::<Vec<_>>(),
                _ => return Err(bad("expected an array of u32")),
            };
            if values.len() != layers.len() {
                return Err(bad(&format!(
                    "{} entries for {} layers",
                    values.len(),
                    layers.len()
                )));
            }
            Some(values)
        }
    };
    let mut out = vec![None; layers.len()];
    if !any {
        return Ok(out);
    }
    let Some(sources) = sources else {
        return Err(ModelError::Metadata(format!(
            "the file has adapted tensors ({}) but no {key}",
            Role::Layer(0, role)
                .tensor_name()
                .replace("blk.0.", "blk.N.")
        )));
    };
    for (il, lw) in layers.iter().enumerate() {
        if lw.get(role).is_none() {
            continue;
        }
        let source = sources[il] as usize;
        if source >= il {
            return Err(ModelError::Metadata(format!(
                "{key}: layer {il}'s adapted tensor is fitted for layer {source}, which is not an earlier layer"
            )));
        }
        out[il] = Some(source);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn tensor_names_follow_the_gguf_convention() {
        assert_eq!(Role::TokenEmbd.tensor_name(), "token_embd.weight");
        assert_eq!(Role::Output.tensor_name(), "output.weight");
        assert_eq!(
            Role::Layer(3, LayerRole::AttnK).tensor_name(),
            "blk.3.attn_k.weight"
        );
        assert_eq!(
            Role::Layer(0, LayerRole::FfnDown).tensor_name(),
            "blk.0.ffn_down.weight"
        );
        assert!(!Role::Layer(0, LayerRole::FfnNorm).is_matmul());
        assert!(Role::TokenEmbd.is_matmul());
    }

    #[test]
    fn the_plan_names_every_role_with_its_shape_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for tied in [false, true] {
            let path = dir.path().join(format!("tied-{tied}.gguf"));
            write_test_model(&path, tied);
            let model = Model::load(&path).unwrap();
            let plan = &model.weights;
            assert_eq!(plan.tensors().len(), if tied { 11 } else { 12 });
            assert_eq!(plan.tied_output(), tied);
            assert_eq!(plan.output() == plan.token_embd(), tied);
            assert_eq!(plan.rope_freqs(), None);
            assert_eq!(plan.layers().len(), 1);
            let k = plan.tensor(plan.layers()[0][LayerRole::AttnK]);
            assert_eq!(k.role, Role::Layer(0, LayerRole::AttnK));
            assert_eq!(k.name, "blk.0.attn_k.weight");
            assert_eq!(k.dims, [32, 16]);
            assert_eq!(k.ty, GgmlType::F32);
            for (i, t) in plan.tensors().iter().enumerate() {
                assert_eq!(t.name, t.role.tensor_name());
                let info = model.file().tensor(&t.name).unwrap();
                assert_eq!(model.weight_bytes(i), model.file().tensor_data(info));
            }
        }
    }
}
