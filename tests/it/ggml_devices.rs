//! Sessions on ggml's backend devices. On every build: the CPU session reads the
//! weights in place from the mapped file (no device copy), and a GPU backend left out
//! of the build is a clear error naming the cargo feature. On a build with
//! `--features cuda|vulkan|metal`: the whole forward pass on that device against the
//! ggml CPU backend on the real default model (a 64-token prompt in one pass, then 4
//! tokens decoded one at a time), with and without a sharing map, and the device's
//! copy of the weights byte-identical to the file. Without a device the test prints
//! why it is skipped, past the harness's capture, and returns.

use crate::support;

use kvsharer::backend::ggml::session::{Session, SessionError};
use kvsharer::backend::ggml::weights::{self, PlacedWeights};
use kvsharer::backend::ggml::{DeviceKind, GgmlBackend, GgmlError};
use kvsharer::kvplan::{Half, ShareMap};
use kvsharer::loader;
use kvsharer::model::{LayerRole, Model};
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::RunState;
use support::{
    compare_logits, dequantized_copy, eval_then_decode, prompt_tokens, say, session_options, skip,
    three_layer_map, write_tiny_model, TinySpec, N_PREFILL, N_TOKENS,
};

const GPU_KINDS: [DeviceKind; 3] = [DeviceKind::Cuda, DeviceKind::Vulkan, DeviceKind::Metal];

#[test]
fn cpu_sessions_read_the_mapped_weights_and_missing_backends_name_their_feature() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&TinySpec::default(), &path);
    let model = Model::load(&path).unwrap();
    let cpu = GgmlBackend::cpu(1).unwrap();
    let weights = weights::place(&model, &cpu).unwrap();
    assert!(!weights.is_device_copy());
    // In place: the model's tensors, pointing into the mapping.
    let embd = model.weights.token_embd();
    assert_eq!(
        weights.get(embd).read_bytes(0, 64),
        model.weight_bytes(embd)[..64]
    );
    let map = ShareMap::identity(model.config.n_layers);
    let opts = RunOptions {
        n_ctx: 32,
        n_threads: 1,
        ..Default::default()
    };
    let s = Session::new(&model, &map, &opts).unwrap();
    assert!(s.backend().is_cpu());

    for kind in GPU_KINDS.into_iter().filter(|k| !k.compiled_in()) {
        let err = Session::on_device(kind, &model, &map, &opts)
            .err()
            .expect("a backend that is not built cannot start");
        assert!(
            matches!(err, SessionError::Ggml(GgmlError::BackendNotBuilt { .. })),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("--features {}", kind.name())),
            "{err}"
        );
    }
}

const PROMPT: &str = "The ferry left the harbour at seven, loaded with crates of apples, \
    two bicycles and a piano wrapped in grey blankets. The captain, who had made the \
    crossing for thirty years, kept one eye on the clouds gathering over the western \
    cliffs. Halfway across, the wind turned, and the piano began to slide towards the \
    rail. Three passengers leapt up to hold it, laughing, while the apples rolled across \
    the deck like marbles. By the time they reached the island, everyone knew each \
    other's names.";

/// `toks` as one `N_PREFILL`-token pass (or passes of `n_batch`), then one token at
/// a time; the logits of every position.
fn logits(s: &mut Session<'_>, toks: &[u32]) -> Vec<f32> {
    let out = eval_then_decode(s, toks, N_PREFILL);
    assert_eq!(s.n_past(), toks.len());
    out
}

/// The device's weights, byte for byte the file's.
fn check_weights_copy(model: &Model, device: &GgmlBackend) {
    let w = weights::place(model, device).unwrap();
    let PlacedWeights::Device(copy) = &w else {
        panic!(
            "weights on {} were not copied to the device",
            device.device_name()
        );
    };
    // Sessions on one device share one copy while any of them lives.
    let PlacedWeights::Device(again) = weights::place(model, device).unwrap() else {
        panic!("a second look-up left the device");
    };
    assert!(std::sync::Arc::ptr_eq(copy, &again));
    let t = &model.weights;
    let mut indices = vec![t.token_embd(), t.output_norm(), t.output()];
    for l in t.layers() {
        indices.extend(LayerRole::ALL.map(|r| l[r]));
    }
    for i in indices {
        let ours = w.get(i);
        assert_eq!(
            ours.read_bytes(0, ours.n_bytes()),
            model.weight_bytes(i),
            "weight {i} differs on the device"
        );
    }
}

/// A device session on `model` (`None`, the skip printed, without a device).
fn device_session<'m>(
    test: &str,
    kind: DeviceKind,
    model: &'m Model,
    map: &ShareMap,
) -> Option<Session<'m>> {
    match Session::on_device(kind, model, map, &session_options(512)) {
        Ok(s) => {
            assert!(!s.backend().is_cpu());
            assert_eq!(s.cache().plan().owner_count(Half::Keys), map.owner_count());
            Some(s)
        }
        Err(SessionError::Ggml(e @ GgmlError::NoDevice { .. })) => {
            skip(&format!("{test}: {kind}"), &e.to_string());
            None
        }
        Err(e) => panic!("{test}: {kind}: {e}"),
    }
}

/// The device against ggml's CPU backend, twice. On the f32-dequantized model both
/// multiply the same weight values by f32 activations, so only summation order and
/// f16 rounding inside attention separate them: there the bar is the issue's, max
/// |logit diff| < 0.1 and top-1 identical at every position. On the quantized file
/// the CPU rounds every matmul input to 8 bits (q8_1) while a device may not, and
/// that rounding moves ggml's own logits as much when only its batch size changes:
/// there the device is held to ggml's own variation (mean within 1.5x, max within
/// 2x) and must not flip more than a tenth of the top-1 picks.
fn whole_model(test: &str, map_of: impl Fn(usize) -> ShareMap) {
    let kinds: Vec<DeviceKind> = GPU_KINDS.into_iter().filter(|k| k.compiled_in()).collect();
    if kinds.is_empty() {
        skip(
            test,
            "built without cuda, vulkan and metal (rebuild with --features vulkan, say)",
        );
        return;
    }
    let path = support::default_model_path();
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let map = map_of(model.config.n_layers);
    let toks = prompt_tokens(&loaded, PROMPT);
    let n_vocab = model.config.n_vocab;
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.gguf");
    dequantized_copy(&path, &f32_path);
    let f32_model = Model::load(&f32_path).unwrap();

    let cpu = logits(
        &mut Session::new(model, &map, &session_options(512)).unwrap(),
        &toks,
    );
    let cpu_b16 = logits(
        &mut Session::new(model, &map, &session_options(16)).unwrap(),
        &toks,
    );
    let cpu_f32 = logits(
        &mut Session::new(&f32_model, &map, &session_options(512)).unwrap(),
        &toks,
    );
    let (own_max, own_mean, own_mismatches) = compare_logits(&cpu_b16, &cpu, n_vocab);

    for kind in kinds {
        let Some(mut gpu) = device_session(test, kind, model, &map) else {
            continue;
        };
        let device = gpu.backend().device_name().to_string();
        check_weights_copy(model, gpu.backend());
        let ours = logits(&mut gpu, &toks);
        drop(gpu);
        let Some(mut gpu_f32) = device_session(test, kind, &f32_model, &map) else {
            continue;
        };
        let ours_f32 = logits(&mut gpu_f32, &toks);
        drop(gpu_f32);

        let (max_f, mean_f, mismatches_f) = compare_logits(&ours_f32, &cpu_f32, n_vocab);
        let (max, mean, mismatches) = compare_logits(&ours, &cpu, n_vocab);
        say(&format!(
            "{test}: {kind} on {device}, {N_TOKENS} positions: f32-dequantized model vs ggml cpu: \
             max |logit diff| {max_f:.5}, mean {mean_f:.5}, top-1 mismatches {mismatches_f}; \
             q4_1 file vs ggml cpu: max {max:.4}, mean {mean:.4}, top-1 mismatches {mismatches} \
             (ggml cpu batch 16 vs 512: max {own_max:.4}, mean {own_mean:.4}, top-1 mismatches {own_mismatches})"
        ));
        assert!(max_f < 0.1, "f32 model: max |logit diff| {max_f}");
        assert_eq!(
            mismatches_f, 0,
            "f32 model: top-1 differs at {mismatches_f} positions"
        );
        assert!(
            mean <= 1.5 * own_mean,
            "mean |logit diff| {mean} vs ggml cpu's own {own_mean}"
        );
        assert!(
            max <= 2.0 * own_max,
            "max |logit diff| {max} vs ggml cpu's own {own_max}"
        );
        assert!(
            mismatches * 10 <= N_TOKENS,
            "top-1 differs at {mismatches} of {N_TOKENS} positions (ggml cpu itself: {own_mismatches})"
        );
        if !map.is_identity() {
            // The map must matter far more than the device does, or this comparison
            // could not tell a device that ignores it.
            let unshared = logits(
                &mut Session::new(
                    &f32_model,
                    &ShareMap::identity(map.n_layers()),
                    &session_options(512),
                )
                .unwrap(),
                &toks,
            );
            let (_, sharing_mean, _) = compare_logits(&unshared, &cpu_f32, n_vocab);
            say(&format!(
                "{test}: the map itself moves ggml's f32 logits by mean {sharing_mean:.4}"
            ));
            assert!(mean_f * 10.0 < sharing_mean, "{mean_f} vs {sharing_mean}");
        }
    }
}

#[test]
fn gpu_device_logits_match_cpu_unshared() {
    whole_model("gpu_device_logits_match_cpu_unshared", ShareMap::identity);
}

#[test]
fn gpu_device_logits_match_cpu_with_sharing() {
    whole_model("gpu_device_logits_match_cpu_with_sharing", three_layer_map);
}
