//! StreamingLLM-style windows: the cache keeps exactly sink + window cells, memory
//! never grows, and what is kept is the sink plus the most recent tokens.

use crate::support;

use kvsharer::backend::ggml::Session;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::runtime::{KvWindow, RunOptions};
use kvsharer::runtime::{Logits, RunState};

pub(crate) fn tiny() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    support::write_tiny_model(
        &support::TinySpec {
            n_layers: 3,
            ..Default::default()
        },
        &path,
    );
    (dir, path)
}

pub(crate) const WINDOW: KvWindow = KvWindow {
    sink: 4,
    recent: 16,
};

pub(crate) fn window_options() -> RunOptions {
    RunOptions {
        n_ctx: 4096,
        n_threads: 1,
        window: Some(WINDOW),
        ..Default::default()
    }
}

/// On `s` (opened with `WINDOW` over 3 layers, layer 2 sharing layer 1): 60 tokens
/// leave exactly the 20 cells of the window, holding tokens 0..4 and 44..60.
/// Values do not depend on position at layer 0, so there they must equal a fresh
/// run of exactly those tokens on `fresh` (same backend, no window).
pub(crate) fn check_window(s: &mut dyn RunState<'_>, fresh: &mut dyn RunState<'_>) {
    assert_eq!(s.n_ctx(), 20, "the cache is sized to the window, not -c");
    let toks: Vec<u32> = (0..60u32).map(|i| (i * 13 + 5) % 90).collect();
    s.eval(&toks, Logits::Last).unwrap();
    assert_eq!(s.n_past(), 20);
    let kept: Vec<u32> = toks[..4].iter().chain(&toks[44..]).copied().collect();
    fresh.eval(&kept, Logits::None).unwrap();
    let (_, a) = s.read_kv(0, 0..20).unwrap();
    let (_, b) = fresh.read_kv(0, 0..20).unwrap();
    assert_eq!(a, b);
}

pub(crate) fn fresh_options() -> RunOptions {
    RunOptions {
        n_ctx: 64,
        n_threads: 1,
        ..Default::default()
    }
}

#[test]
fn window_keeps_exactly_sink_plus_recent_and_the_right_tokens() {
    let (_d, path) = tiny();
    let loaded = loader::load(&path).unwrap();
    let map = ShareMap::new(vec![0, 1, 1]).unwrap();
    let mut s = Session::new(&loaded.model, &map, &window_options()).unwrap();
    let mut fresh = Session::new(&loaded.model, &map, &fresh_options()).unwrap();
    check_window(&mut s, &mut fresh);
    assert_eq!(s.evicted(), 40);
}

/// This one measures the process's RSS, which tests running beside it in the same
/// binary would move: it runs in a process of its own.
#[test]
fn ten_thousand_token_generation_never_grows_memory() {
    support::in_own_process(
        "kv_window::ten_thousand_token_generation_never_grows_memory",
        ten_thousand_token_generation,
    );
}

/// 10,000 greedy tokens through a 64-cell window (4 sink, 60 recent): the cache
/// never holds more than its cells and the KV bytes never change. `memory` is
/// sampled after 1,000 tokens and at the end; it may grow by at most `slack`.
pub(crate) fn generate_through_window(
    s: &mut dyn RunState<'_>,
    mut memory: impl FnMut() -> u64,
    slack: u64,
) -> (u64, u64) {
    let kv_bytes = s.kv_bytes();
    let mut tok = 1u32;
    let mut after_warmup = 0;
    for i in 0..10_000 {
        let logits = s.eval(&[tok], Logits::Last).unwrap();
        tok = kvsharer::sample::argmax(&logits) % 90;
        assert!(s.n_past() <= 64);
        if i == 1_000 {
            after_warmup = memory();
        }
    }
    assert_eq!(s.kv_bytes(), kv_bytes);
    assert_eq!(s.n_past(), 64);
    let end = memory();
    // Allow allocator noise, not growth proportional to the 9,000 extra tokens.
    assert!(
        end <= after_warmup + slack,
        "memory grew from {after_warmup} to {end}"
    );
    (after_warmup, end)
}

pub(crate) fn ten_thousand_options() -> RunOptions {
    RunOptions {
        n_ctx: 64,
        n_threads: 1,
        window: Some(KvWindow {
            sink: 4,
            recent: 60,
        }),
        ..Default::default()
    }
}

fn ten_thousand_token_generation() {
    let (_d, path) = tiny();
    let loaded = loader::load(&path).unwrap();
    let mut s = Session::new(
        &loaded.model,
        &ShareMap::identity(3),
        &ten_thousand_options(),
    )
    .unwrap();
    generate_through_window(&mut s, || rss_kib() as u64, 4096);
    assert_eq!(s.evicted(), 10_000 - 64);
}

fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
