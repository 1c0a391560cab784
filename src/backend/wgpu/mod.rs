//! The whole Llama forward pass in WGSL on wgpu (Vulkan, Metal, DX12), with KV sharing.
//!
//! Weights stay in their GGUF block format on the GPU: every matrix kernel
//! dequantizes blocks as it reads them (`shaders/quant.wgsl`), so GPU memory holds
//! the file's bytes and nothing more. `GpuSession` is the run state (the KV cache of
//! a `KvPlan` in `kv.rs`, activations, pipelines and bind groups built once); it is a
//! `runtime::RunState` like the ggml `Session`, with the same cache types, plans,
//! windows and context shift. `GpuSession::sibling_with` opens a
//! second run state on a session's device, kernels and weights (perplexity's
//! base/test comparison). `KernelHarness` (feature `test-support`) runs single kernels on
//! host data, for the parity tests.

mod device;
mod kernels;
mod kv;
mod session;

pub use device::{AdapterPolicy, GpuContext};
#[cfg(feature = "test-support")]
pub use kernels::{AttentionPath, KernelHarness};
pub use session::{GpuMemoryProbe, GpuOptions, GpuSession, CAPABILITIES};

use crate::gguf::GgmlType;

/// Weight types the WGSL kernels read directly.
pub const GPU_WEIGHT_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found through wgpu (Vulkan/Metal/DX12) (hint: install a GPU driver, or mesa-vulkan-drivers for the lavapipe software adapter)")]
    NoAdapter,
    #[error("only a software adapter is available ({0}), not a real GPU")]
    SoftwareOnly(String),
    #[error("GPU adapter {adapter}: could not open a device: {message}")]
    RequestDevice { adapter: String, message: String },
    #[error(
        "GPU adapter {adapter}: limit {limit} is {available}, but {needed} is needed ({what})"
    )]
    Limit {
        adapter: String,
        limit: &'static str,
        needed: u64,
        available: u64,
        what: String,
    },
    #[error("WGSL shader '{shader}' failed to compile or link: {message}")]
    Shader { shader: String, message: String },
    #[error("tensor '{tensor}' has type {ty}, which the wgpu backend cannot read (supported: f32, f16, q4_0, q4_1, q8_0, q4_K, q5_K, q6_K)")]
    UnsupportedType { tensor: String, ty: &'static str },
    #[error("the wgpu backend has no {0} KV cache (supported: f16, f32, q8_0, q4_0)")]
    UnsupportedCacheType(&'static str),
    #[error(
        "tensor '{tensor}' has rows of {cols} elements; the wgpu kernels need a multiple of 32"
    )]
    UnsupportedShape { tensor: String, cols: usize },
    #[error("sharing map has {map} layers but the model has {model}")]
    MapMismatch { map: usize, model: usize },
    #[error("kernel input: {0}")]
    BadInput(String),
    #[error("GPU error during {during}: {message}")]
    Device {
        during: &'static str,
        message: String,
    },
}

impl From<GpuError> for crate::runtime::error::RuntimeError {
    fn from(e: GpuError) -> Self {
        crate::runtime::error::RuntimeError::backend(e)
    }
}
