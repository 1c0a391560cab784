//! StreamingLLM-style windows: the cache keeps exactly sink + window cells, memory
//! never grows, and what is kept is the sink plus the most recent tokens.

use crate::support;

use kvsharer::backend::ggml::kv::KvPart;
use kvsharer::backend::ggml::Session;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::runtime::{KvWindow, RunOptions};
use kvsharer::runtime::{Logits, RunState};

fn tiny() -> (tempfile::TempDir, std::path::PathBuf) {
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

#[test]
fn window_keeps_exactly_sink_plus_recent_and_the_right_tokens() {
    let (_d, path) = tiny();
    let loaded = loader::load(&path).unwrap();
    let w = KvWindow {
        sink: 4,
        recent: 16,
    };
    let opts = RunOptions {
        n_ctx: 4096,
        n_threads: 1,
        window: Some(w),
        ..Default::default()
    };
    let map = ShareMap::new(vec![0, 1, 1]).unwrap();
    let mut s = Session::new(&loaded.model, &map, &opts).unwrap();
    assert_eq!(s.n_ctx(), 20, "the cache is sized to the window, not -c");
    let toks: Vec<u32> = (0..60u32).map(|i| (i * 13 + 5) % 90).collect();
    s.eval(&toks, Logits::Last).unwrap();
    assert_eq!(s.n_past(), 20);
    assert_eq!(s.evicted(), 40);
    // Values do not depend on position at layer 0: the kept rows must be tokens
    // 0..4 and 44..60, as a fresh run of exactly those tokens gives.
    let mut fresh = Session::new(
        &loaded.model,
        &map,
        &RunOptions {
            n_ctx: 64,
            n_threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let kept: Vec<u32> = toks[..4].iter().chain(&toks[44..]).copied().collect();
    fresh.eval(&kept, Logits::None).unwrap();
    let a = s.cache().read_rows_f32(0, KvPart::Values, 0..20).unwrap();
    let b = fresh
        .cache()
        .read_rows_f32(0, KvPart::Values, 0..20)
        .unwrap();
    assert_eq!(a, b);
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

fn ten_thousand_token_generation() {
    let (_d, path) = tiny();
    let loaded = loader::load(&path).unwrap();
    let w = KvWindow {
        sink: 4,
        recent: 60,
    };
    let opts = RunOptions {
        n_ctx: 64,
        n_threads: 1,
        window: Some(w),
        ..Default::default()
    };
    let mut s = Session::new(&loaded.model, &ShareMap::identity(3), &opts).unwrap();
    let kv_bytes = s.kv_bytes();
    let mut tok = 1u32;
    let mut rss_after_warmup = 0;
    for i in 0..10_000 {
        let logits = s.eval(&[tok], Logits::Last).unwrap();
        tok = kvsharer::sample::argmax(&logits) % 90;
        assert!(s.n_past() <= 64);
        if i == 1_000 {
            rss_after_warmup = rss_kib();
        }
    }
    assert_eq!(s.kv_bytes(), kv_bytes);
    assert_eq!(s.n_past(), 64);
    assert_eq!(s.evicted(), 10_000 - 64);
    let rss_end = rss_kib();
    // Allow allocator noise, not growth proportional to the 9,000 extra tokens.
    assert!(
        rss_end <= rss_after_warmup + 4096,
        "RSS grew from {rss_after_warmup} KiB to {rss_end} KiB"
    );
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
