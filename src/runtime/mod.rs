//! The runtime: one `RunState` interface over every backend, what a caller asks of
//! it (`RunOptions`) and what a backend can do (`Capabilities`), one error type,
//! one chunk planner, and `open`, which puts a run state on the backend a user
//! chose. Generation, perplexity, the sharing search and chat are written over
//! `RunState` alone.
//!
//! Backends import the vocabulary modules (`state`, `request`, `options`, `error`,
//! `chunks`) by path; only `open` imports the backends.

pub mod chunks;
pub mod error;
pub mod open;
pub mod options;
pub mod request;
pub mod state;

pub use error::{BackendError, Capability, RuntimeError};
pub use open::{open, open_plan, BackendChoice, Opened};
pub use options::{
    default_threads, parse_cache_type, Capabilities, KvWindow, RunOptions, CACHE_TYPES,
};
pub use request::{ForwardOutput, ForwardRequest, Logits, PackedBatch};
pub use state::RunState;
