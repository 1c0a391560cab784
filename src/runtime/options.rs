//! What a caller asks of a run state (`RunOptions`), and what a backend can give
//! (`Capabilities`), checked against each other by the backend itself.

use super::error::{Capability, RuntimeError};
use crate::gguf::GgmlType;
use crate::kvplan::KvPlan;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub n_ctx: usize,
    /// Prompt tokens per forward pass during prefill (llama.cpp's `--batch-size`).
    pub n_batch: usize,
    pub n_threads: usize,
    /// Cache types of every slot when a run state is opened from a whole-layer map
    /// (`runtime::open`); a `KvPlan` (`runtime::open_plan`) carries its own.
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    /// StreamingLLM-style eviction; when set, the cache holds exactly
    /// `sink + recent` cells whatever `n_ctx` says.
    pub window: Option<KvWindow>,
    /// Sequences the cache holds, each `n_ctx` cells of its own (serve's slots,
    /// decoded together by `RunState::forward_seqs`); 1 for one conversation.
    pub n_seq: usize,
    /// Attend over every cache slot in f32, with f32 queries and sums, even in an
    /// all-f16 cache, where ggml's CPU kernel (llama.cpp's, and the default here)
    /// rounds both to f16 (a plan mixing types is always read in f32: see
    /// `KvCache::reads_in_place`). Calibration sets this, so that a plan and its
    /// f16 reference read their cells alike: a move restarted from the reference's
    /// layer inputs then equals a full run of the plan. The wgpu backend always
    /// reads exactly.
    pub exact_attention: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: default_threads(),
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            window: None,
            n_seq: 1,
            exact_attention: false,
        }
    }
}

/// Keep the first `sink` tokens and the `recent` most recent ones in every owning
/// layer's slot (shared layers follow their sources). Older tokens are evicted as
/// new ones arrive, and the kept ones are re-positioned (keys re-rotated), so
/// memory is bounded and positions stay inside what the model was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvWindow {
    pub sink: usize,
    pub recent: usize,
}

impl KvWindow {
    pub fn cells(&self) -> usize {
        self.sink + self.recent
    }
}

/// Physical cores are what ggml scales with; without a reliable count, use all
/// logical CPUs up to 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get().min(8))
}

/// Element types a cache slot may use (llama.cpp's `--cache-type-k/-v` spells
/// them by `GgmlType::name`): every type a plan may hold.
pub const CACHE_TYPES: &[GgmlType] = crate::kvplan::PLAN_TYPES;

/// A cache type by its llama.cpp name (`f16`, `q8_0`, ...).
pub fn parse_cache_type(name: &str) -> Result<GgmlType, RuntimeError> {
    CACHE_TYPES
        .iter()
        .copied()
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| RuntimeError::UnknownCacheType(name.to_string()))
}

/// What a backend can do beyond plain f16 evaluation. Each backend states its own;
/// `check` refuses options it cannot honour, naming the capability.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// The backend's name in errors and status lines (`cpu`, `wgpu`, `vulkan`, ...).
    pub backend: &'static str,
    /// Types a KV cache slot may hold.
    pub cache_types: &'static [GgmlType],
    /// StreamingLLM windows (`RunOptions::window`).
    pub window: bool,
    /// llama.cpp's context shift (`RunState::context_shift`).
    pub context_shift: bool,
    /// Plans beyond one map and one type per half (`Capability::MixedPlan`).
    pub mixed_plans: bool,
    /// Many texts in one packed pass, optionally from a cached layer input
    /// (`RunState::forward_packed`); the search falls back to one text at a time.
    pub packed: bool,
    /// Several sequences in one cache, stepped together (`RunOptions::n_seq`,
    /// `RunState::forward_seqs`).
    pub sequences: bool,
}

impl Capabilities {
    /// Refuses `opts` where they ask for something this backend lacks.
    pub fn check(&self, opts: &RunOptions) -> Result<(), RuntimeError> {
        for ty in [opts.type_k, opts.type_v] {
            if !self.cache_types.contains(&ty) {
                return Err(self.lacks(Capability::CacheType(ty)));
            }
        }
        if opts.window.is_some() && !self.window {
            return Err(self.lacks(Capability::Window));
        }
        if opts.n_seq == 0 {
            return Err(RuntimeError::InvalidRequest(
                "a run state needs at least one sequence".into(),
            ));
        }
        if opts.n_seq > 1 && !self.sequences {
            return Err(self.lacks(Capability::Sequences));
        }
        if opts.n_seq > 1 && opts.window.is_some() {
            return Err(self.lacks(Capability::WindowedSequences));
        }
        Ok(())
    }

    /// Refuses `plan` where this backend lacks one of its types, or it mixes what
    /// the backend cannot.
    pub fn check_plan(&self, plan: &KvPlan) -> Result<(), RuntimeError> {
        for half in crate::kvplan::Half::BOTH {
            for l in 0..plan.n_layers() {
                let ty = plan.read_type(half, l);
                if !self.cache_types.contains(&ty) {
                    return Err(self.lacks(Capability::CacheType(ty)));
                }
            }
        }
        if !self.mixed_plans && (plan.as_map().is_none() || plan.uniform_types().is_none()) {
            return Err(self.lacks(Capability::MixedPlan));
        }
        Ok(())
    }

    /// The error for `capability`, named for this backend.
    pub fn lacks(&self, capability: Capability) -> RuntimeError {
        RuntimeError::Unsupported {
            backend: self.backend,
            capability,
        }
    }
}
