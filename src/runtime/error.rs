//! The one error type of every run state. Messages say what went wrong in the
//! library's words; the CLI adds the flag to change.

use crate::gguf::GgmlType;

/// Something a backend may lack (see `Capabilities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    CacheType(GgmlType),
    /// Keys and values from different layers, or slots of different types.
    MixedPlan,
    Window,
    ContextShift,
    Packed,
    /// Several sequences in one run state (`RunOptions::n_seq`).
    Sequences,
    /// A KV window on a run state of several sequences.
    WindowedSequences,
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Capability::CacheType(t) => write!(f, "a {} KV cache", t.name().to_lowercase()),
            Capability::MixedPlan => {
                f.write_str("KV plans with keys and values shared apart or per-layer cache types")
            }
            Capability::Window => f.write_str("a KV window (StreamingLLM eviction)"),
            Capability::ContextShift => f.write_str("context shift"),
            Capability::Packed => f.write_str("packed multi-text evaluation"),
            Capability::Sequences => {
                f.write_str("several sequences decoded together (parallel slots)")
            }
            Capability::WindowedSequences => {
                f.write_str("a KV window with several sequences (parallel slots)")
            }
        }
    }
}

/// A backend's own error, boxed so that every backend's fits one variant.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the context is full: {needed} tokens needed but the context holds {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary ({n_vocab} tokens)")]
    BadToken { id: u32, n_vocab: usize },
    #[error("nothing to evaluate: the token list is empty")]
    Empty,
    #[error("the {backend} backend does not support {capability}")]
    Unsupported {
        backend: &'static str,
        capability: Capability,
    },
    #[error(
        "KV cache type {0} is not supported (use f16, q8_0, q5_1, q5_0, q4_1, iq4_nl or q4_0)"
    )]
    UnknownCacheType(String),
    #[error("the {backend} backend is not in this build (cargo feature `{feature}`)")]
    NotBuilt {
        backend: &'static str,
        feature: &'static str,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Map(#[from] crate::kvplan::ShareMapError),
    #[error(transparent)]
    Plan(#[from] crate::kvplan::KvPlanError),
    #[error(transparent)]
    Backend(BackendError),
}

impl RuntimeError {
    /// Wraps a backend's own error.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        RuntimeError::Backend(Box::new(e))
    }
}
