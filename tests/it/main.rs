//! kvsharer's integration tests, in one binary so that llama.cpp is linked once
//! instead of once per suite. Each former `tests/*.rs` file is a module here, and
//! `support` is what they share. Run one suite with
//! `cargo test --release --test it <module>::`.
//!
//! The tests of all suites run as threads of this one process: none may change
//! process-wide state (environment variables, the current directory) that another
//! reads. `tests/gguf_hostile.rs` stays a binary of its own: its counting
//! `#[global_allocator]` would be the allocator of every suite here.

mod support;

mod calibrate;
#[cfg(unix)]
mod chat_pty;
mod cli;
mod context_shift;
mod forward_reference;
mod ggml_devices;
mod hostile_models;
mod kv_window;
mod llama_parity;
mod perplexity;
mod quantized_cache;
mod reference_selftest;
mod search;
mod share_crash;
mod tokenizer_parity;
#[cfg(feature = "wgpu")]
mod wgpu_parity;
#[cfg(feature = "wgpu")]
mod wgpu_search;
#[cfg(feature = "wgpu")]
mod wgpu_sibling;
