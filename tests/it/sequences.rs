//! Several sequences in one run state (serve's slots): `RunState::forward_seqs`
//! steps them together in one graph (one pass on wgpu), each attending over its
//! own cells. The same checks run on ggml's CPU backend and on wgpu (lavapipe in
//! CI; skipped, with the reason printed, without an adapter).
//!
//! Oracle: one single-sequence session per text (the path whose logits match
//! llama.cpp's, `llama_parity`), fed the same tokens. Tolerance 1e-2 on logits of
//! magnitude ~5-10: the batched graph runs the same ops, but ggml's matrix kernels
//! may sum a batch's rows in another order (~5e-7), which can round a cached f16
//! value the other way and move later logits by ~2e-3 (measured: 2.7e-3 at most).
//! With q8_0 keys and q4_0 values such a flip moves a quantized value by a whole
//! step: 0.1 there (measured: 3.5e-2 at most). Attending over another sequence's
//! cells would move logits by far more: the sequences' own logits differ by more
//! than 0.5, checked too. On wgpu the single sessions are wgpu's too (their
//! parity with ggml is `wgpu_parity`'s and `wgpu_cache`'s); a batch there runs the
//! tiled matmul where one token runs the matrix-vector kernel, another summation
//! order, so the same tolerances hold.

use crate::support;

use kvsharer::backend::ggml::Session;
#[cfg(feature = "wgpu")]
use kvsharer::backend::wgpu::{AdapterPolicy, GpuSession};
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::{Half, KvPlan, ShareMap};
use kvsharer::loader;
use kvsharer::model::Model;
use kvsharer::runtime::{KvWindow, Logits, RunOptions, RunState, RuntimeError};
#[cfg(feature = "wgpu")]
use support::wgpu::or_skip_without_adapter;
use support::{max_abs_diff, write_tiny_model, TinySpec};

/// Opens a run state for a plan and options, or `None` where the backend is
/// missing (wgpu without an adapter: skipped).
type Open = dyn for<'m> Fn(&'m Model, &KvPlan, &RunOptions) -> Option<Box<dyn RunState<'m> + 'm>>;

fn cpu<'m>(
    model: &'m Model,
    plan: &KvPlan,
    opts: &RunOptions,
) -> Option<Box<dyn RunState<'m> + 'm>> {
    let cpu = kvsharer::backend::ggml::DeviceKind::Cpu;
    Some(Box::new(
        Session::with_plan(cpu, model, plan, opts).unwrap(),
    ))
}

#[cfg(feature = "wgpu")]
fn wgpu<'m>(
    model: &'m Model,
    plan: &KvPlan,
    opts: &RunOptions,
) -> Option<Box<dyn RunState<'m> + 'm>> {
    let opened = GpuSession::open_plan(model, plan, opts, AdapterPolicy::Any);
    let s = or_skip_without_adapter("sequences (wgpu)", opened)?;
    Some(Box::new(s))
}

fn spec() -> TinySpec {
    TinySpec::four_layers_head_dim_64()
}

fn opts(n_seq: usize) -> RunOptions {
    RunOptions {
        n_ctx: 300,
        n_batch: 64,
        n_threads: 2,
        n_seq,
        ..Default::default()
    }
}

fn text(spec: &TinySpec, seed: u32, n: u32) -> Vec<u32> {
    (0..n)
        .map(|i| (i * 7 + seed * 13 + 3) % spec.n_vocab as u32)
        .collect()
}

/// Prefills three sequences (one longer than the batch size), then runs steps that
/// decode all of them, only some, and one that mixes a prefill chunk with decoding;
/// every entry's logits are checked against a single-sequence session.
fn check_plan(open: &Open, plan: &KvPlan, tol: f32) {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let Some(mut multi) = open(model, plan, &opts(3)) else {
        return;
    };
    let mut singles: Vec<_> = (0..3)
        .map(|_| open(model, plan, &opts(1)).unwrap())
        .collect();
    assert_eq!(multi.n_seq(), 3);
    assert_eq!(multi.n_ctx(), 300);

    let prompts = [text(&spec, 1, 9), text(&spec, 2, 150), text(&spec, 3, 1)];
    let mut worst = 0.0f32;
    let mut check = |got: &[f32], single: &mut Box<dyn RunState + '_>, tokens: &[u32]| {
        let want = single.eval(tokens, Logits::Last).unwrap();
        let d = max_abs_diff(got, &want);
        worst = worst.max(d);
        assert!(d < tol, "batched logits differ from one sequence's by {d}");
    };
    for (seq, p) in prompts.iter().enumerate() {
        let got = multi.forward_seqs(&[(seq, p)]).unwrap();
        check(&got, &mut singles[seq], p);
        assert_eq!(multi.seq_past(seq), p.len());
    }
    let n_vocab = spec.n_vocab;
    let steps: Vec<Vec<(usize, Vec<u32>)>> = vec![
        vec![(0, vec![5]), (1, vec![6]), (2, vec![7])],
        vec![(2, vec![8]), (0, vec![9])],
        vec![(1, text(&spec, 4, 20)), (0, vec![10]), (2, vec![11])],
        vec![(0, vec![12]), (1, vec![13]), (2, vec![14])],
    ];
    for step in &steps {
        let batch: Vec<(usize, &[u32])> = step.iter().map(|(s, t)| (*s, t.as_slice())).collect();
        let got = multi.forward_seqs(&batch).unwrap();
        assert_eq!(got.len(), batch.len() * n_vocab);
        let apart = max_abs_diff(&got[..n_vocab], &got[n_vocab..2 * n_vocab]);
        assert!(apart > 0.5, "two sequences' logits differ by only {apart}");
        for (i, (seq, tokens)) in step.iter().enumerate() {
            check(
                &got[i * n_vocab..(i + 1) * n_vocab],
                &mut singles[*seq],
                tokens,
            );
        }
    }
    // A sequence cut back and continued sees only what it kept.
    multi.truncate_seq(1, 100);
    singles[1].truncate(100);
    let got = multi.forward_seqs(&[(1, &[3]), (0, &[4])]).unwrap();
    check(&got[..n_vocab], &mut singles[1], &[3]);
    check(&got[n_vocab..], &mut singles[0], &[4]);
    eprintln!("{}: max |batched - single| = {worst:.2e}", multi.describe());
}

/// q8_0 keys and q4_0 values, layer 2 reading layer 1's keys and layer 3 reading
/// layer 2's keys and values.
fn quantized_shared_plan() -> KvPlan {
    KvPlan::unshared(4, GgmlType::Q8_0, GgmlType::Q4_0)
        .with_shared(Half::Keys, 2, 1)
        .unwrap()
        .with_map(&ShareMap::new(vec![0, 1, 2, 2]).unwrap())
        .unwrap()
}

#[test]
fn sequences_stepped_together_match_single_sessions_f16() {
    check_plan(
        &cpu,
        &KvPlan::unshared(4, GgmlType::F16, GgmlType::F16),
        1e-2,
    );
}

#[test]
fn sequences_stepped_together_match_single_sessions_quantized_and_shared() {
    // q8_0/q4_0 slots take the CPU decode kernel for one-token spans; a shared
    // layer reads its source's cells of the same sequence.
    check_plan(&cpu, &quantized_shared_plan(), 0.1);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_sequences_stepped_together_match_single_sessions() {
    check_plan(
        &wgpu,
        &KvPlan::unshared(4, GgmlType::F16, GgmlType::F16),
        1e-2,
    );
    check_plan(&wgpu, &quantized_shared_plan(), 0.1);
}

#[test]
fn bad_sequence_batches_are_refused() {
    bad_batches(&cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_bad_sequence_batches_are_refused() {
    bad_batches(&wgpu);
}

fn bad_batches(open: &Open) {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let plan = KvPlan::unshared(4, GgmlType::F16, GgmlType::F16);
    let Some(mut s) = open(&loaded.model, &plan, &opts(2)) else {
        return;
    };
    let msg = |r: Result<Vec<f32>, RuntimeError>| r.unwrap_err().to_string();
    assert!(msg(s.forward_seqs(&[(2, &[1])])).contains("does not exist"));
    assert!(msg(s.forward_seqs(&[(1, &[1]), (1, &[2])])).contains("twice"));
    assert!(msg(s.forward_seqs(&[])).contains("empty"));
    let long = text(&spec, 5, 301);
    assert!(matches!(
        s.forward_seqs(&[(0, &long)]),
        Err(RuntimeError::ContextFull { .. })
    ));
    let many = text(&spec, 6, 40);
    assert!(msg(s.forward_seqs(&[(0, &many), (1, &many)])).contains("batch size"));
    // Nothing above changed either sequence.
    assert_eq!((s.seq_past(0), s.seq_past(1)), (0, 0));
    // Windows evict per run state: refused with several sequences.
    let windowed = RunOptions {
        window: Some(KvWindow {
            sink: 4,
            recent: 32,
        }),
        ..opts(2)
    };
    let err = s.sibling(&ShareMap::identity(4), &windowed).err().unwrap();
    assert!(
        err.to_string().contains("KV window with several sequences"),
        "{err}"
    );
}
