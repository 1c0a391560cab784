//! The model's weights as ggml tensors, placed from the model's `WeightPlan` (arena
//! index = plan index): on the CPU, tensor headers over the mapped file (no copy);
//! on a GPU device, one copy in device memory shared by every session of the model
//! on that device while any of them lives.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex, Weak};

use super::ffi::{GgmlBackend, GgmlError, Tensor, TensorArena, WeightPlacement};
use crate::gguf::GgufFile;
use crate::model::Model;

/// The weights a session's graphs read, indexed as the model's `WeightPlan` says.
pub enum PlacedWeights<'m> {
    /// The model's own tensors, in place in the mapped file (the CPU backend).
    Mapped(MappedWeights<'m>),
    /// A copy in a device buffer (CUDA, Vulkan, Metal).
    Device(Arc<TensorArena>),
}

/// Tensors over the bytes of a model's mapped file, valid while the model lives.
pub struct MappedWeights<'m> {
    arena: TensorArena,
    _file: PhantomData<&'m GgufFile>,
}

impl PlacedWeights<'_> {
    pub fn get(&self, index: usize) -> Tensor<'_> {
        match self {
            PlacedWeights::Mapped(m) => m.arena.tensor(index),
            PlacedWeights::Device(a) => a.tensor(index),
        }
    }

    /// Whether the weights were copied off the mapped file.
    pub fn is_device_copy(&self) -> bool {
        matches!(self, PlacedWeights::Device(_))
    }
}

/// The weights as `backend` reads them: in place from the mapping on the CPU (only
/// tensor headers are made, so every CPU session makes its own), else a copy in the
/// device's memory, made on first use and shared by every session of the model on
/// that device while any of them lives.
pub fn place<'m>(model: &'m Model, backend: &GgmlBackend) -> Result<PlacedWeights<'m>, GgmlError> {
    if backend.is_cpu() {
        return Ok(PlacedWeights::Mapped(mapped(model)?));
    }
    device_copy(model, backend).map(PlacedWeights::Device)
}

fn mapped(model: &Model) -> Result<MappedWeights<'_>, GgmlError> {
    let placements: Vec<WeightPlacement<'_>> = model
        .weights
        .tensors()
        .iter()
        .map(|t| WeightPlacement {
            name: &t.name,
            ty: t.ty,
            ne: t.dims.iter().map(|&d| d as i64).collect(),
            offset: t.offset,
            n_bytes: t.n_bytes,
        })
        .collect();
    Ok(MappedWeights {
        // The mapping lives in the model's file, which outlives 'm.
        arena: TensorArena::from_mapped(model.file().bytes(), &placements)?,
        _file: PhantomData,
    })
}

/// A model's weights on one device, as the registry remembers them.
struct DeviceCopy {
    device: String,
    /// Which model: its file (a weak handle keeps the allocation, so no other file
    /// can take its address while the entry exists).
    file: Weak<GgufFile>,
    arena: Weak<TensorArena>,
}

/// Every device copy some session still holds. Sessions are opened from only a
/// model and a device, and the model layer holds nothing backend-specific, so the
/// sharing lives here, in the ggml backend: a process-wide list of weak handles,
/// keyed by device name and model file. Sessions hold the `Arc`s; an entry whose copy
/// is gone is dropped at the next look-up.
static DEVICE_COPIES: Mutex<Vec<DeviceCopy>> = Mutex::new(Vec::new());

fn device_copy(model: &Model, backend: &GgmlBackend) -> Result<Arc<TensorArena>, GgmlError> {
    // A poisoned lock only means another thread panicked mid-upload; the list
    // itself (weak handles) is always consistent.
    let mut copies = DEVICE_COPIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    copies.retain(|c| c.arena.strong_count() > 0);
    let device = backend.device_name();
    let file = Arc::downgrade(model.file());
    if let Some(live) = copies
        .iter()
        .find(|c| c.device == device && Weak::ptr_eq(&c.file, &file))
        .and_then(|c| c.arena.upgrade())
    {
        return Ok(live);
    }
    let copy = Arc::new(mapped(model)?.arena.copy_to_device(backend)?);
    copies.push(DeviceCopy {
        device: device.to_string(),
        file,
        arena: Arc::downgrade(&copy),
    });
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::write_test_model;

    fn load(dir: &std::path::Path, name: &str) -> Model {
        let path = dir.join(name);
        write_test_model(&path, false);
        Model::load(&path).unwrap()
    }

    #[test]
    fn cpu_weights_are_the_mapped_file() {
        let dir = tempfile::tempdir().unwrap();
        let model = load(dir.path(), "m.gguf");
        let w = place(&model, &GgmlBackend::cpu(1).unwrap()).unwrap();
        assert!(!w.is_device_copy());
        for i in 0..model.weights.tensors().len() {
            let t = w.get(i);
            assert_eq!(t.read_bytes(0, t.n_bytes()), model.weight_bytes(i));
        }
    }

    /// The registry, exercised through a CPU backend (a build without a GPU feature
    /// has no other device): one copy per model and device while any holder lives.
    #[test]
    fn device_copies_are_shared_per_model_and_device_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (load(dir.path(), "a.gguf"), load(dir.path(), "b.gguf"));
        let cpu = GgmlBackend::cpu(1).unwrap();
        let first = device_copy(&a, &cpu).unwrap();
        let again = device_copy(&a, &cpu).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = device_copy(&b, &cpu).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        for i in 0..a.weights.tensors().len() {
            let t = first.tensor(i);
            assert_eq!(t.read_bytes(0, t.n_bytes()), a.weight_bytes(i));
        }
        // The registry holds no strong handle: when the holders go, so does the copy.
        drop((first, again));
        let fresh = device_copy(&a, &cpu).unwrap();
        assert_eq!(Arc::strong_count(&fresh), 1);
    }
}
