//! The KV cache: one K and one V tensor per *owning* layer (a slot); a shared layer
//! has no storage of its own and reads its source's slot. The `ShareMap` is the only
//! link between layers and slots.

use std::ops::Range;

use super::ffi::{dequantize, row_size, GgmlBackend, GgmlError, Tensor, TensorArena};
use crate::gguf::GgmlType;
use crate::kvplan::ShareMap;
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
    /// Arena indices of each slot's K and V, `[n_embd_kv, n_ctx]` each.
    k: Vec<usize>,
    v: Vec<usize>,
    slot_of_layer: Vec<usize>,
    map: ShareMap,
    n_ctx: usize,
    n_embd_kv: usize,
    type_k: GgmlType,
    type_v: GgmlType,
}

impl KvCache {
    pub fn new(
        config: &LlamaConfig,
        map: &ShareMap,
        n_ctx: usize,
        type_k: GgmlType,
        type_v: GgmlType,
        backend: &GgmlBackend,
    ) -> Result<Self, KvError> {
        if map.n_layers() != config.n_layers {
            return Err(KvError::MapMismatch {
                map: map.n_layers(),
                model: config.n_layers,
            });
        }
        if n_ctx == 0 {
            return Err(KvError::EmptyContext);
        }
        for ty in [type_k, type_v] {
            if !CACHE_TYPES.iter().any(|(_, t)| *t == ty) {
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
        let n_slots = map.owner_count();
        let n_embd_kv = config.n_embd_kv();
        let mut arena = TensorArena::new(2 * n_slots)?;
        let mut k = Vec::with_capacity(n_slots);
        let mut v = Vec::with_capacity(n_slots);
        for layer in (0..config.n_layers).filter(|&l| map.owns_slot(l)) {
            let ne = [n_embd_kv as i64, n_ctx as i64];
            k.push(arena.add_tensor(type_k, &ne, &format!("cache_k_l{layer}")));
            v.push(arena.add_tensor(type_v, &ne, &format!("cache_v_l{layer}")));
        }
        arena.allocate(backend)?;
        Ok(KvCache {
            arena,
            k,
            v,
            slot_of_layer: map.slot_of_layers(),
            map: map.clone(),
            n_ctx,
            n_embd_kv,
            type_k,
            type_v,
        })
    }

    /// The K tensor layer `layer` writes (if it owns a slot) or reads (if shared).
    pub fn k(&self, layer: usize) -> Tensor<'_> {
        self.arena.tensor(self.k[self.slot_of_layer[layer]])
    }

    pub fn v(&self, layer: usize) -> Tensor<'_> {
        self.arena.tensor(self.v[self.slot_of_layer[layer]])
    }

    pub fn map(&self) -> &ShareMap {
        &self.map
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn type_k(&self) -> GgmlType {
        self.type_k
    }

    pub fn type_v(&self) -> GgmlType {
        self.type_v
    }

    pub fn n_slots(&self) -> usize {
        self.k.len()
    }

    /// Bytes of K and V storage actually allocated (all slots).
    pub fn bytes(&self) -> usize {
        self.n_slots() * self.slot_bytes()
    }

    /// Bytes one slot (K + V) takes for the whole context.
    pub fn slot_bytes(&self) -> usize {
        (row_size(self.type_k, self.n_embd_kv as i64)
            + row_size(self.type_v, self.n_embd_kv as i64))
            * self.n_ctx
    }

    /// Bytes the same cache would take with every layer owning a slot.
    pub fn bytes_unshared(&self) -> usize {
        self.map.n_layers() * self.slot_bytes()
    }

    /// Bytes per token of context across all slots.
    pub fn bytes_per_token(&self) -> usize {
        self.bytes() / self.n_ctx
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
            KvPart::Keys => (self.k(layer), self.type_k),
            KvPart::Values => (self.v(layer), self.type_v),
        };
        let row_bytes = row_size(ty, self.n_embd_kv as i64);
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
        for slot in 0..self.n_slots() {
            for (t, ty) in [(self.k[slot], self.type_k), (self.v[slot], self.type_v)] {
                let tensor = self.arena.tensor(t);
                let row = row_size(ty, self.n_embd_kv as i64);
                let bytes = tensor.read_bytes(from.start * row, from.len() * row);
                tensor.write_bytes(to * row, &bytes);
            }
        }
    }

    /// Zeroes every slot (a new conversation).
    pub fn clear(&self) {
        self.arena.clear();
    }
}
