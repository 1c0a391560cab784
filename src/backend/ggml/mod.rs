//! The ggml backend: llama.cpp's tensor library on the CPU (weights read in place
//! from the mapped file) or on ggml's own GPU backends (CUDA, Vulkan, Metal, behind
//! cargo features).
//!
//! - `ffi`: the only module that calls ggml (backends, tensors, graphs, quantization);
//! - `weights`: the model's weights placed from its plan (in place on the CPU, one
//!   shared copy per GPU device);
//! - `forward`: the Llama forward pass as a ggml graph, with KV sharing;
//! - `kv`: the KV cache, slots for the owning layers of a sharing map only;
//! - `session`: the run state (`Session`, a `runtime::RunState`);
//! - `decode_attention`: the AVX2 decode-attention kernel over quantized caches,
//!   run as a ggml custom op on the CPU.

pub mod decode_attention;
pub mod ffi;
pub mod forward;
pub mod kv;
pub mod session;
pub mod weights;

pub use ffi::{
    dequantize, f32_to_f16_bits, quantize, quantize_as_cache, raw_type_traits, row_size,
    DeviceKind, GgmlBackend, GgmlError, Tensor, TensorArena, WeightPlacement,
};
pub use session::Session;
pub use weights::PlacedWeights;
