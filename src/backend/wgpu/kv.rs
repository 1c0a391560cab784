//! The GPU KV cache: one slot per owned half of the `KvPlan` (a K slot for every
//! layer that owns its keys, a V slot for every layer that owns its values), each
//! in the plan's type for it and laid out as ggml lays a cache row out (`[cells]
//! [n_embd_kv]` in the type's blocks), so the bytes per token are the CPU's exactly.
//! A layer that shares a half has no storage for it: it binds its source's slot.

use super::device::GpuContext;
use super::kernels::storage;
use super::GpuError;
use crate::gguf::GgmlType;
use crate::kvplan::{Half, KvPlan};

/// One cache slot: `cells` rows of `row_bytes` (plus a word of padding, since the
/// unaligned reads of `kv_cache.wgsl` may touch the word after the last byte).
pub(crate) struct Slot {
    pub buf: wgpu::Buffer,
    pub ty: GgmlType,
    pub row_bytes: u32,
}

fn row_bytes(ty: GgmlType, n: usize) -> usize {
    ty.row_bytes(n as u64).unwrap_or(0) as usize
}

pub(crate) struct GpuKv {
    /// Per half, per layer: the layer's own slot where it owns that half.
    slots: [Vec<Option<Slot>>; 2],
    cells: usize,
    n_embd_kv: usize,
    head_dim: usize,
}

fn index(half: Half) -> usize {
    match half {
        Half::Keys => 0,
        Half::Values => 1,
    }
}

impl GpuKv {
    /// Slots for `plan`'s owned halves, `cells` rows each; the checks before any
    /// allocation (a type the kernels read, rows of whole blocks, the binding limit).
    pub fn new(
        ctx: &GpuContext,
        plan: &KvPlan,
        cells: usize,
        (n_embd_kv, head_dim): (usize, usize),
        max_binding: u64,
    ) -> Result<Self, GpuError> {
        let n = plan.n_layers();
        let mut kv = GpuKv {
            slots: [
                (0..n).map(|_| None).collect(),
                (0..n).map(|_| None).collect(),
            ],
            cells,
            n_embd_kv,
            head_dim,
        };
        kv.relayout(ctx, plan, max_binding)?;
        Ok(kv)
    }

    /// Lays the cache out for `plan`: keeps the slots it still needs in the same
    /// type, frees the others and allocates the missing ones (zeroed). Kept slots
    /// keep their rows; the caller decides whether they still mean anything.
    pub fn relayout(
        &mut self,
        ctx: &GpuContext,
        plan: &KvPlan,
        max_binding: u64,
    ) -> Result<(), GpuError> {
        for half in Half::BOTH {
            for layer in (0..plan.n_layers()).filter(|&l| plan.owns(half, l)) {
                let ty = plan.types(half)[layer];
                // As the CPU's cache: a head never straddles a block.
                if !(self.head_dim as u64).is_multiple_of(ty.block_size()) {
                    return Err(GpuError::BadInput(format!(
                        "KV cache type {} needs the head dimension ({}) to be a multiple of {}",
                        ty.name(),
                        self.head_dim,
                        ty.block_size()
                    )));
                }
                let bytes = (self.cells * row_bytes(ty, self.n_embd_kv)) as u64 + 4;
                if bytes > max_binding {
                    return Err(GpuError::Limit {
                        adapter: ctx.adapter_description(),
                        limit: "max_storage_buffer_binding_size",
                        needed: bytes,
                        available: max_binding,
                        what: format!("a {} KV cache slot of {} cells", ty.name(), self.cells),
                    });
                }
            }
        }
        for half in Half::BOTH {
            for (layer, slot) in self.slots[index(half)].iter_mut().enumerate() {
                let want = plan.owns(half, layer).then(|| plan.types(half)[layer]);
                if slot.as_ref().map(|s| s.ty) == want {
                    continue;
                }
                *slot = want.map(|ty| {
                    let row = row_bytes(ty, self.n_embd_kv);
                    Slot {
                        buf: storage(
                            ctx,
                            &format!("cache_{}_l{layer}", half.letter().to_ascii_lowercase()),
                            (self.cells * row) as u64 + 4,
                        ),
                        ty,
                        row_bytes: row as u32,
                    }
                });
            }
        }
        Ok(())
    }

    /// The slot `layer` owns for `half` (`None` where it shares that half).
    pub fn own(&self, half: Half, layer: usize) -> Option<&Slot> {
        self.slots[index(half)].get(layer)?.as_ref()
    }

    /// Every slot, with its half.
    pub fn all(&self) -> impl Iterator<Item = (Half, &Slot)> {
        Half::BOTH
            .into_iter()
            .flat_map(move |h| self.slots[index(h)].iter().flatten().map(move |s| (h, s)))
    }

    /// Bytes per token of context across all slots.
    pub fn bytes_per_token(&self) -> usize {
        self.all().map(|(_, s)| s.row_bytes as usize).sum()
    }

    /// Bytes of K and V storage (padding words not counted), as the CPU counts them.
    pub fn bytes(&self) -> usize {
        self.bytes_per_token() * self.cells
    }

    pub fn n_slots(&self) -> usize {
        self.all().count()
    }
}
