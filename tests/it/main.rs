//! kvsharer's integration tests, in one binary so that llama.cpp is linked once
//! instead of once per suite. Each former `tests/*.rs` file is a module here, and
//! `support` is what they share. Run one suite with
//! `cargo test --release --test it <module>::`.
//!
//! The tests of all suites run as threads of this one process: none may change
//! process-wide state (environment variables, the current directory) that another
//! reads. `tests/gguf_hostile.rs` stays a binary of its own: its counting
//! `#[global_allocator]` would be the allocator of every suite here. A test that
//! measures the whole process (kv_window's RSS check) runs itself in a process of
//! its own with `support::in_own_process`.
//!
//! `chat_pty` forks a pty child while other tests run on other threads, which is
//! fine here: the child only closes every descriptor but its pty and execs (no
//! test changes the environment), and a concurrent spawn can inherit at most the
//! pty's master side, never the slave side whose closing ends the chat's output.

mod support;

mod adapters;
mod architectures;

mod calibrate;
#[cfg(unix)]
mod chat_pty;
mod chat_templates;
mod cli;
mod context_shift;
mod examples;
mod forward_reference;
mod ggml_devices;
mod hostile_models;
mod kv_plan;
mod kv_window;
mod llama_parity;
mod perplexity;
mod quantized_cache;
mod reference_selftest;
mod search;
mod sequences;
#[cfg(unix)]
mod serve;
mod share_crash;
mod tokenizer_families;
mod tokenizer_parity;
#[cfg(feature = "wgpu")]
mod wgpu_cache;
#[cfg(feature = "wgpu")]
mod wgpu_parity;
#[cfg(feature = "wgpu")]
mod wgpu_search;
#[cfg(feature = "wgpu")]
mod wgpu_sibling;
