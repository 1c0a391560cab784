//! Compute backends, each a `runtime::RunState` implementation: `ggml` (the CPU,
//! and CUDA/Vulkan/Metal through ggml's own backends behind cargo features) and
//! `wgpu` (WGSL compute shaders on Vulkan, Metal, DX12). A backend imports the
//! runtime's vocabulary and the model, never a product (`search`, `eval`,
//! `generate`, `chat`) or the CLI.

pub mod ggml;
#[cfg(feature = "wgpu")]
pub mod wgpu;
