//! `GpuSession::sibling`: a second session on the first one's device, kernels and
//! weights computes exactly what an independent `GpuSession::new` computes, and
//! running it leaves its parent's state alone.
//!
//! Runs on any wgpu adapter (lavapipe in CI); without one each test prints why it
//! is skipped, on stderr past the test harness's capture, and returns.

use crate::support;

use kvsharer::backend::wgpu::{AdapterPolicy, GpuError, GpuOptions, GpuSession};
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::runtime::{Logits, RunState};
use support::wgpu::or_skip_without_adapter;
use support::{eval_then_decode, say, write_tiny_model, TinySpec};

const N_LAYERS: usize = 4;
/// Tokens of the prompt; `SPLIT` of them first, then the rest.
const N_TOKENS: usize = 40;
const SPLIT: usize = 20;
/// The last `N_DECODE` tokens go one at a time (the decode kernels).
const N_DECODE: usize = 4;

fn opts() -> GpuOptions {
    GpuOptions {
        n_ctx: 64,
        n_batch: 16,
        ..Default::default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Logits of every token of `tokens` fed in batches, then the last `N_DECODE` one
/// by one.
fn run(s: &mut GpuSession<'_>, tokens: &[u32]) -> Vec<f32> {
    eval_then_decode(s, tokens, tokens.len() - N_DECODE)
}

/// For parent maps identity and shared, and sibling maps identity and shared: the
/// parent's logits before and after its sibling ran, and the sibling's, each bit
/// for bit those of a fresh `GpuSession::new` fed the same tokens the same way.
/// The sibling holds none of its own weights except K/V projections its parent
/// left out, and runs on the parent's device; a fresh session shares nothing.
#[test]
fn sibling_sessions_match_fresh_sessions_bit_for_bit_and_leave_the_parent_alone() {
    let test = "sibling_sessions_match_fresh_sessions_bit_for_bit_and_leave_the_parent_alone";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        n_layers: N_LAYERS,
        ..TinySpec::for_type(kvsharer::gguf::GgmlType::Q8_0)
    };
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let tokens: Vec<u32> = (0..N_TOKENS as u32)
        .map(|i| (i * 7 + 3) % spec.n_vocab as u32)
        .collect();
    let identity = ShareMap::identity(N_LAYERS);
    let shared = ShareMap::new(vec![0, 0, 2, 2]).unwrap();
    let Some(probe) = or_skip_without_adapter(test, GpuSession::new(model, &identity, &opts()))
    else {
        return;
    };
    let fresh = |map: &ShareMap| {
        GpuSession::new(model, map, &opts())
            .unwrap_or_else(|e| panic!("{test}: the wgpu backend failed to start: {e}"))
    };
    say(&format!("{test}: adapter {}", probe.adapter_description()));
    // What each map computes, from independent sessions: the first part and the
    // whole prompt (the parent's continuation is compared against the latter).
    let expected = |map: &ShareMap| {
        let mut s = fresh(map);
        let first = s.eval(&tokens[..SPLIT], Logits::All).unwrap();
        let rest = run(&mut s, &tokens[SPLIT..]);
        let whole = run(&mut fresh(map), &tokens);
        (first, rest, whole)
    };
    let (id_first, id_rest, id_whole) = expected(&identity);
    let (sh_first, sh_rest, sh_whole) = expected(&shared);
    // The maps must compute different things, or agreement proves nothing.
    let moved = id_whole
        .iter()
        .zip(&sh_whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "sharing moves the logits by only {moved}");

    let cases = [
        ("identity", &identity, "identity", &identity),
        ("identity", &identity, "shared", &shared),
        ("shared", &shared, "identity", &identity),
        ("shared", &shared, "shared", &shared),
    ];
    for (parent_name, parent_map, sibling_name, sibling_map) in cases {
        let case = format!("parent {parent_name}, sibling {sibling_name}");
        let pick = |map: &ShareMap| {
            if map == &identity {
                (&id_first, &id_rest, &id_whole)
            } else {
                (&sh_first, &sh_rest, &sh_whole)
            }
        };
        let (p_first, p_rest, _) = pick(parent_map);
        let (_, _, s_whole) = pick(sibling_map);

        let mut parent = fresh(parent_map);
        let first = parent.eval(&tokens[..SPLIT], Logits::All).unwrap();
        assert_eq!(bits(&first), bits(p_first), "{case}: parent before");

        let mut sibling = parent.sibling_with(sibling_map, &opts()).unwrap();
        assert!(sibling.shares_device_with(&parent), "{case}");
        assert!(!sibling.shares_device_with(&probe), "{case}");
        assert_eq!(sibling.weight_buffers_shared_with(&probe), 0, "{case}");
        assert_eq!(sibling.plan().as_map(), Some(sibling_map), "{case}");
        assert_eq!(sibling.n_slots(), 2 * sibling_map.owner_count(), "{case}");
        assert_eq!(sibling.n_past(), 0, "{case}");
        assert_eq!(parent.n_past(), SPLIT, "{case}");
        // Every weight the parent uploaded is the sibling's too; the sibling adds
        // only the K/V projections (2 per layer) the parent's map left out.
        let missing = (0..N_LAYERS)
            .filter(|&l| sibling_map.owns_slot(l) && !parent_map.owns_slot(l))
            .count();
        assert_eq!(
            sibling.weight_buffers_shared_with(&parent),
            parent.n_weight_buffers(),
            "{case}"
        );
        assert_eq!(
            sibling.n_weight_buffers(),
            parent.n_weight_buffers() + 2 * missing,
            "{case}"
        );

        let got = run(&mut sibling, &tokens);
        assert_eq!(bits(&got), bits(s_whole), "{case}: sibling");
        let rest = run(&mut parent, &tokens[SPLIT..]);
        assert_eq!(
            bits(&rest),
            bits(p_rest),
            "{case}: parent after the sibling ran"
        );
        // And the other way round: the parent's run left the sibling's cache alone
        // (a decode step reads the whole cache).
        sibling.truncate(N_TOKENS - 1);
        let last = sibling.eval(&tokens[N_TOKENS - 1..], Logits::Last).unwrap();
        let n_vocab = spec.n_vocab;
        assert_eq!(
            bits(&last),
            bits(&s_whole[s_whole.len() - n_vocab..]),
            "{case}: sibling after the parent ran"
        );
        say(&format!(
            "{test}: {case}: bit-identical; sibling holds {} weight buffers, {} of them the parent's",
            sibling.n_weight_buffers(),
            sibling.weight_buffers_shared_with(&parent)
        ));
    }
}

/// A sibling refuses what `GpuSession::new` refuses, with the same errors, and the
/// parent keeps working after a refused sibling.
#[test]
fn sibling_sessions_reject_bad_requests_like_new_sessions() {
    let test = "sibling_sessions_reject_bad_requests_like_new_sessions";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        n_layers: N_LAYERS,
        ..TinySpec::default()
    };
    write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let identity = ShareMap::identity(N_LAYERS);
    let Some(mut parent) =
        or_skip_without_adapter(test, GpuSession::new(&loaded.model, &identity, &opts()))
    else {
        return;
    };
    let wrong = ShareMap::identity(N_LAYERS + 1);
    assert!(matches!(
        parent.sibling_with(&wrong, &opts()),
        Err(GpuError::MapMismatch { map, model }) if map == N_LAYERS + 1 && model == N_LAYERS
    ));
    let no_ctx = GpuOptions { n_ctx: 0, ..opts() };
    assert!(matches!(
        parent.sibling_with(&identity, &no_ctx),
        Err(GpuError::BadInput(_))
    ));
    let hardware = GpuOptions {
        policy: AdapterPolicy::HardwareOnly,
        ..opts()
    };
    let refused = parent.sibling_with(&identity, &hardware);
    if parent.is_software() {
        assert!(
            matches!(&refused, Err(GpuError::SoftwareOnly(a)) if *a == parent.adapter_description()),
            "a software adapter's sibling accepted HardwareOnly"
        );
    } else {
        assert!(refused.is_ok(), "{:?}", refused.err());
    }
    let out = parent.eval(&[1, 2, 3], Logits::Last).unwrap();
    assert_eq!(out.len(), spec.n_vocab);
    assert!(out.iter().all(|x| x.is_finite()));
}
