//! The KV cache: one K tensor per layer that owns its keys and one V tensor per
//! layer that owns its values, each in the type the plan gives it; a layer that
//! shares a half has no storage for it and reads its source's slot. The `KvPlan`
//! is the only link between layers and slots.

use std::ops::Range;

use super::ffi::{dequantize, row_size, GgmlBackend, GgmlError, Tensor, TensorArena};
use crate::gguf::GgmlType;
use crate::kvplan::{Half, KvPlan};
use crate::model::LlamaConfig;
use crate::runtime::options::CACHE_TYPES;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    #[error("sharing map has {map} layers but the model has {model}")]
    MapMismatch { map: usize, model: usize },
    #[error("KV cache type {0} is not supported (use f16, q8_0 or q4_0)")]
    UnsupportedType(String),
    #[error(
        "KV cache type {ty} needs the head dimension ({head_dim}) to be a multiple of {block}"
    )]
    BlockMismatch {
        ty: &'static str,
        head_dim: usize,
        block: u64,
    },
    #[error("context size must be at least 1")]
    EmptyContext,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPart {
    Keys,
    Values,
}

pub struct KvCache {
    arena: TensorArena,
    /// Arena index of each owned K slot and V slot, `[n_embd_kv, n_ctx]` each,
    /// and the type each holds.
    k: Vec<(usize, GgmlType)>,
    v: Vec<(usize, GgmlType)>,
    /// Slot index every layer reads, per half.
    k_slot_of_layer: Vec<usize>,
    v_slot_of_layer: Vec<usize>,
    plan: KvPlan,
    n_ctx: usize,
    n_embd_kv: usize,
    /// Whether attention reads the cells as they are stored (ggml's own kernel
    /// over an all-f16 or all-f32 cache) rather than in f32 (`RunOptions::
    /// exact_attention`, and every cache with another type anywhere).
    in_place: bool,
}

impl KvCache {
    /// A cache laid out by `plan`; with `exact`, attention reads even an all-f16
    /// cache in f32 (see [`KvCache::reads_in_place`]).
    pub fn new(
        config: &LlamaConfig,
        plan: &KvPlan,
        n_ctx: usize,
        exact: bool,
        backend: &GgmlBackend,
    ) -> Result<Self, KvError> {
        if plan.n_layers() != config.n_layers {
            return Err(KvError::MapMismatch {
                map: plan.n_layers(),
                model: config.n_layers,
            });
        }
        if n_ctx == 0 {
            return Err(KvError::EmptyContext);
        }
        for half in Half::BOTH {
            for layer in (0..config.n_layers).filter(|&l| plan.owns(half, l)) {
                let ty = plan.types(half)[layer];
                if !CACHE_TYPES.contains(&ty) {
                    return Err(KvError::UnsupportedType(ty.name().to_string()));
                }
                if !(config.head_dim as u64).is_multiple_of(ty.block_size()) {
                    return Err(KvError::BlockMismatch {
                        ty: ty.name(),
                        head_dim: config.head_dim,
                        block: ty.block_size(),
                    });
                }
            }
        }
        let n_embd_kv = config.n_embd_kv();
        let mut arena =
            TensorArena::new(plan.owner_count(Half::Keys) + plan.owner_count(Half::Values))?;
        let ne = [n_embd_kv as i64, n_ctx as i64];
        let mut slots = |half: Half, prefix: &str| -> Vec<(usize, GgmlType)> {
            (0..config.n_layers)
                .filter(|&l| plan.owns(half, l))
                .map(|l| {
                    let ty = plan.types(half)[l];
                    (arena.add_tensor(ty, &ne, &format!("{prefix}_l{l}")), ty)
                })
                .collect()
        };
        let k = slots(Half::Keys, "cache_k");
        let v = slots(Half::Values, "cache_v");
        arena.allocate(backend)?;
        let float = |t| matches!(t, GgmlType::F16 | GgmlType::F32);
        let in_place = !exact && matches!(plan.uniform_types(), Some((k, v)) if k == v && float(k));
        Ok(KvCache {
            arena,
            k,
            v,
            k_slot_of_layer: plan.sources(Half::Keys).slot_of_layers(),
            v_slot_of_layer: plan.sources(Half::Values).slot_of_layers(),
            plan: plan.clone(),
            n_ctx,
            n_embd_kv,
            in_place,
        })
    }

    /// Whether attention on ggml's CPU backend reads the cells as stored, with
    /// ggml's own kernel: only where the whole cache is one float type, llama.cpp's
    /// configuration, and exact reads were not asked for. That kernel rounds the
    /// queries to f16 and sums the values in f16; in a plan that mixes f16 with
    /// 4-bit slots, the next layer's 4-bit keys amplify that rounding into other
    /// tokens (a tiny model: 0.034 off the f32 reference, where cells read in f32
    /// are 1.2e-5 off, as wgpu's are). Every other cache reads its cells in f32.
    pub fn reads_in_place(&self) -> bool {
        self.in_place
    }

    /// The K tensor layer `layer` writes (if it owns its keys) or reads (if shared).
    pub fn k(&self, layer: usize) -> Tensor<'_> {
        self.arena.tensor(self.k[self.k_slot_of_layer[layer]].0)
    }

    pub fn v(&self, layer: usize) -> Tensor<'_> {
        self.arena.tensor(self.v[self.v_slot_of_layer[layer]].0)
    }

    /// The type of the K slot `layer` reads.
    pub fn type_k(&self, layer: usize) -> GgmlType {
        self.k[self.k_slot_of_layer[layer]].1
    }

    pub fn type_v(&self, layer: usize) -> GgmlType {
        self.v[self.v_slot_of_layer[layer]].1
    }

    pub fn plan(&self) -> &KvPlan {
        &self.plan
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn row_bytes(&self, ty: GgmlType) -> usize {
        row_size(ty, self.n_embd_kv as i64)
    }

    /// Bytes per token of context across all owned slots.
    pub fn bytes_per_token(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|&(_, ty)| self.row_bytes(ty))
            .sum()
    }

    /// Bytes of K and V storage actually allocated (all slots).
    pub fn bytes(&self) -> usize {
        self.bytes_per_token() * self.n_ctx
    }

    /// Bytes per token the same cache would take with every layer owning both
    /// halves, each in the type it reads now.
    pub fn bytes_per_token_unshared(&self) -> usize {
        self.plan.unshared_bytes_per_token(self.n_embd_kv)
    }

    /// The keys (post-RoPE) or values layer `layer` sees at cache rows `rows`, as f32,
    /// row-major `[rows][n_head_kv * head_dim]`.
    pub fn read_rows_f32(
        &self,
        layer: usize,
        part: KvPart,
        rows: Range<usize>,
    ) -> Result<Vec<f32>, KvError> {
        let (t, ty) = match part {
            KvPart::Keys => (self.k(layer), self.type_k(layer)),
            KvPart::Values => (self.v(layer), self.type_v(layer)),
        };
        let row_bytes = self.row_bytes(ty);
        let rows = rows.start.min(self.n_ctx)..rows.end.min(self.n_ctx);
        let bytes = t.read_bytes(rows.start * row_bytes, rows.len() * row_bytes);
        Ok(dequantize(ty, &bytes, rows.len() * self.n_embd_kv)?)
    }

    /// Copies rows `from` of every slot (K and V) to start at row `to` (`to <=
    /// from.start`), for context shifts and window eviction.
    pub fn move_rows(&self, from: Range<usize>, to: usize) {
        if from.is_empty() || to == from.start {
            return;
        }
        for &(t, ty) in self.k.iter().chain(&self.v) {
            let tensor = self.arena.tensor(t);
            let row = self.row_bytes(ty);
            let bytes = tensor.read_bytes(from.start * row, from.len() * row);
            tensor.write_bytes(to * row, &bytes);
        }
    }

    /// Zeroes every slot (a new conversation).
    pub fn clear(&self) {
        self.arena.clear();
    }
}
