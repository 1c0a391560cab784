//! `RunState`: one conversation's (or one evaluation's) state on some backend — its
//! KV cache, position and the memory of its forward passes — behind the one
//! interface that generation, perplexity, the sharing search and chat are written
//! over (llama2.c's `RunState`, llama.cpp's `llama_memory_i` over `ggml_backend`).

use std::ops::Range;

use super::error::{Capability, RuntimeError};
use super::options::{Capabilities, KvWindow, RunOptions};
use super::request::{ForwardOutput, ForwardRequest, Logits, PackedBatch};
use crate::kvplan::{KvPlan, ShareMap};
use crate::model::Model;

pub trait RunState<'m> {
    fn model(&self) -> &'m Model;

    /// The KV plan the cache is laid out for (sources and types of both halves).
    fn plan(&self) -> &KvPlan;

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

    /// Bytes the same cache (every sequence's cells) would take with no layer
    /// sharing, at the same cache types: what `kv_bytes` saves against.
    fn kv_bytes_unshared(&self) -> usize {
        self.kv_bytes_per_token().1 * self.n_ctx() * self.n_seq()
    }

    /// The keys (post-RoPE) and values `layer` attends over at cache cells `rows`,
    /// as f32 `[rows][n_embd_kv]` each.
    fn read_kv(
        &self,
        layer: usize,
        rows: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError>;

    /// Lays the cache out for another plan over the same weights and empties the
    /// context (the searches measure many plans on one run state). Refused, by
    /// capability, where the backend lacks the plan's types or K/V-apart sharing.
    fn set_plan(&mut self, plan: &KvPlan) -> Result<(), RuntimeError>;

    /// `set_plan` with both halves following `map`, the types kept.
    fn set_map(&mut self, map: &ShareMap) -> Result<(), RuntimeError> {
        if map.n_layers() != self.plan().n_layers() {
            return Err(crate::kvplan::ShareMapError::WrongLength {
                expected: self.plan().n_layers(),
                found: map.n_layers(),
            }
            .into());
        }
        let plan = self.plan().with_map(map)?;
        self.set_plan(&plan)
    }

    /// Sequences the cache holds (`RunOptions::n_seq`), each `n_ctx()` cells of its
    /// own. Sequence 0 is the one `forward`, `n_past` and `truncate` work on.
    fn n_seq(&self) -> usize {
        1
    }

    /// Tokens cached in sequence `seq`.
    fn seq_past(&self, seq: usize) -> usize {
        if seq == 0 {
            self.n_past()
        } else {
            0
        }
    }

    /// Keeps the first `n` tokens of sequence `seq`.
    fn truncate_seq(&mut self, seq: usize, n: usize) {
        if seq == 0 {
            self.truncate(n);
        }
    }

    /// One step over several sequences: each entry `(seq, tokens)` appends its
    /// tokens to its sequence (distinct sequences, all in one forward pass, so the
    /// weights are read once for every sequence). Returns each entry's last-token
    /// logits, row-major `[entries][n_vocab]`. A single entry may be longer than
    /// the batch size (it runs in passes); several must fit one pass together.
    fn forward_seqs(&mut self, batch: &[(usize, &[u32])]) -> Result<Vec<f32>, RuntimeError> {
        match batch {
            [(0, tokens)] => self.eval(tokens, Logits::Last),
            _ => Err(self.capabilities().lacks(Capability::Sequences)),
        }
    }

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

    /// `sibling` laid out for `plan` (default: a sibling for the identity map, laid
    /// out anew; backends that can build for a plan directly override it).
    fn sibling_plan(
        &self,
        plan: &KvPlan,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError> {
        let mut s = self.sibling(&ShareMap::identity(plan.n_layers()), opts)?;
        s.set_plan(plan)?;
        Ok(s)
    }

    /// A second run state for the same model on this one's device (sharing its
    /// weights where the backend can), for `map` and `opts`.
    fn sibling(
        &self,
        map: &ShareMap,
        opts: &RunOptions,
    ) -> Result<Box<dyn RunState<'m> + 'm>, RuntimeError>;
}
