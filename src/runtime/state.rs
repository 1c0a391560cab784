//! `RunState`: one conversation's (or one evaluation's) state on some backend — its
//! KV cache, position and the memory of its forward passes — behind the one
//! interface that generation, perplexity, the sharing search and chat are written
//! over (llama2.c's `RunState`, llama.cpp's `llama_memory_i` over `ggml_backend`).

use std::ops::Range;

use super::error::{Capability, RuntimeError};
use super::options::{Capabilities, KvWindow, RunOptions};
use super::request::{ForwardOutput, ForwardRequest, Logits, PackedBatch};
use crate::kvplan::ShareMap;
use crate::model::Model;

pub trait RunState<'m> {
    fn model(&self) -> &'m Model;

    /// The sharing map the cache is laid out for.
    fn map(&self) -> &ShareMap;

    /// What this backend can do; a request beyond it fails with
    /// `RuntimeError::Unsupported` naming the capability.
    fn capabilities(&self) -> Capabilities;

    /// The backend and device in words, for status lines.
    fn describe(&self) -> String;

    /// True when the forward pass runs on a GPU.
    fn on_gpu(&self) -> bool;

    /// Tokens currently in the cache.
    fn n_past(&self) -> usize;

    /// Cache cells (the context size, or `sink + recent` with a window).
    fn n_ctx(&self) -> usize;

    fn window(&self) -> Option<KvWindow> {
        None
    }

    /// True when the cache evicts old tokens itself (a KV window), so a full
    /// context never stops generation.
    fn evicts(&self) -> bool {
        self.window().is_some()
    }

    /// Forgets the conversation.
    fn reset(&mut self);

    /// Keeps the first `n` tokens of the cache.
    fn truncate(&mut self, n: usize);

    /// Appends `tokens` (in passes of at most the batch size) and returns what
    /// `req` asks for.
    fn forward(
        &mut self,
        tokens: &[u32],
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError>;

    /// Appends `tokens` and returns logits: the last token's, every token's, or none.
    fn eval(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.forward(tokens, ForwardRequest::logits(logits))?.logits)
    }

    /// llama.cpp's context shift: keeps the first `keep` cached tokens, drops the
    /// `discard` after them, moves the rest down and re-rotates their keys.
    fn context_shift(&mut self, keep: usize, discard: usize) -> Result<(), RuntimeError> {
        let _ = (keep, discard);
        Err(self.capabilities().lacks(Capability::ContextShift))
    }

    /// Bytes of KV storage this run state allocated.
    fn kv_bytes(&self) -> usize;

    /// KV bytes per token of context as allocated, and per token unshared at the
    /// same cache types.
    fn kv_bytes_per_token(&self) -> (usize, usize);

    /// The keys (post-RoPE) and values `layer` attends over at cache cells `rows`,
    /// as f32 `[rows][n_embd_kv]` each.
    fn read_kv(
        &self,
        layer: usize,
        rows: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError>;

    /// Lays the cache out for another sharing map over the same weights and empties
    /// the context (the sharing search measures many maps on one run state). A run
    /// state opened with the identity map takes any map.
    fn set_map(&mut self, map: &ShareMap) -> Result<(), RuntimeError>;

    /// Evaluates a packed batch of equal-length texts from cache row 0, replacing
    /// whatever the run state held (see `PackedBatch`).
    fn forward_packed(
        &mut self,
        batch: PackedBatch<'_>,
        req: ForwardRequest,
    ) -> Result<ForwardOutput, RuntimeError> {
        let _ = (batch, req);
        Err(self.capabilities().lacks(Capability::Packed))
    }

    /// A second run state for the same model on this one's device (sharing its
    /// weights where the backend can), for `map` and `opts`.
    fn sibling(
        &self,
        map: &ShareMap,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError>;
}
