//! Compute backends. `ggml` is the CPU path (and CUDA/Vulkan/Metal through ggml's
//! own backends behind cargo features); `graph` is the Llama forward pass on it.

pub mod decode_attention;
pub mod ggml;
pub mod graph;
#[cfg(feature = "wgpu")]
pub mod wgpu;
