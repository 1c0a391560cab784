//! kvsharer: a local LLM runtime for quantized GGUF Llama-family models with
//! layer-wise KV cache sharing (KVSharer, arXiv 2410.18517).
//!
//! Data flow: `gguf` (file) -> `model` (config + weights) -> `runtime::open` (a
//! `RunState` on a backend: KV cache, positions) -> logits -> `sample`. `search` holds
//! the sharing map and its calibration search; `generate`, `eval` (perplexity, KL
//! divergence) and the search are written over `RunState` alone.

pub mod backend;
pub mod chat;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod kvplan;
pub mod loader;
pub mod math;
pub mod model;
pub mod oracle;
pub mod runtime;
pub mod sample;
pub mod search;
pub mod serve;
pub mod tokenizer;
