//! What `/metrics` reports, in Prometheus' text format: counters the HTTP side and
//! the engine update with atomics, read without locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    /// Requests answered with an error status (bad input, queue full, ...).
    pub requests_failed: AtomicU64,
    /// Requests whose client went away before the answer was complete.
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens served from a slot's cached prefix instead of evaluated.
    pub prompt_tokens_cached: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub active: AtomicU64,
    pub queued: AtomicU64,
    /// Time the engine spent in forward passes, in microseconds.
    pub busy_micros: AtomicU64,
    /// Generated tokens per second over the last engine step, times 1000.
    pub step_tps_milli: AtomicU64,
}

/// Fixed facts about the slots, for the gauges that do not change.
#[derive(Clone, Copy, Debug)]
pub struct SlotFacts {
    pub slots: usize,
    pub n_ctx: usize,
    pub kv_bytes: usize,
    /// Bytes the same slots would take with no layer sharing (same cache types).
    pub kv_bytes_unshared: usize,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, facts: &SlotFacts) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP kvsharer_{name} {help}");
            let _ = writeln!(out, "# TYPE kvsharer_{name} {kind}");
            let _ = writeln!(out, "kvsharer_{name} {value}");
        };
        let get = |c: &AtomicU64| c.load(Relaxed) as f64;
        metric(
            "requests_total",
            "counter",
            "Completion requests received.",
            get(&self.requests),
        );
        metric(
            "requests_failed_total",
            "counter",
            "Requests answered with an error.",
            get(&self.requests_failed),
        );
        metric(
            "requests_cancelled_total",
            "counter",
            "Requests whose client disconnected first.",
            get(&self.requests_cancelled),
        );
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of all requests.",
            get(&self.prompt_tokens),
        );
        metric(
            "prompt_tokens_cached_total",
            "counter",
            "Prompt tokens reused from a slot's cache.",
            get(&self.prompt_tokens_cached),
        );
        metric(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.generated_tokens),
        );
        let busy = get(&self.busy_micros) / 1e6;
        metric(
            "busy_seconds_total",
            "counter",
            "Seconds spent in forward passes.",
            busy,
        );
        let tps = if busy > 0.0 {
            get(&self.generated_tokens) / busy
        } else {
            0.0
        };
        metric(
            "generated_tokens_per_second",
            "gauge",
            "Generated tokens per busy second since start.",
            tps,
        );
        metric(
            "step_tokens_per_second",
            "gauge",
            "Generated tokens per second in the last step.",
            get(&self.step_tps_milli) / 1000.0,
        );
        metric(
            "requests_active",
            "gauge",
            "Requests holding a slot.",
            get(&self.active),
        );
        metric(
            "requests_queued",
            "gauge",
            "Requests waiting for a slot.",
            get(&self.queued),
        );
        metric(
            "slots",
            "gauge",
            "Slots (conversations decoded together).",
            facts.slots as f64,
        );
        metric(
            "slot_context_tokens",
            "gauge",
            "Context tokens per slot.",
            facts.n_ctx as f64,
        );
        metric(
            "kv_cache_bytes",
            "gauge",
            "KV cache bytes allocated for all slots.",
            facts.kv_bytes as f64,
        );
        metric(
            "kv_cache_saved_bytes",
            "gauge",
            "KV cache bytes layer sharing saves against the same slots unshared.",
            facts.kv_bytes_unshared.saturating_sub(facts.kv_bytes) as f64,
        );
        out
    }
}
