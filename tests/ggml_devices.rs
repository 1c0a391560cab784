//! Sessions on ggml's backend devices. On every build: the CPU session reads the
//! weights in place from the mapped file (no device copy), and a GPU backend left out
//! of the build is a clear error naming the cargo feature. On a build with
//! `--features cuda|vulkan|metal`: the whole forward pass on that device against the
//! ggml CPU backend on the real default model (a 64-token prompt in one pass, then 4
//! tokens decoded one at a time), with and without a sharing map, and the device's
//! copy of the weights byte-identical to the file. Without a device the test prints
//! why it is skipped, past the harness's capture, and returns.

mod support;

use std::io::Write;

use kvsharer::backend::ggml::{DeviceKind, GgmlBackend, GgmlError};
use kvsharer::backend::graph::Logits;
use kvsharer::loader;
use kvsharer::model::{Model, PlacedWeights};
use kvsharer::sample::argmax;
use kvsharer::session::{Session, SessionError, SessionOptions};
use kvsharer::share::ShareMap;
use support::{write_tiny_model, TinySpec};

const GPU_KINDS: [DeviceKind; 3] = [DeviceKind::Cuda, DeviceKind::Vulkan, DeviceKind::Metal];

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

#[test]
fn cpu_sessions_read_the_mapped_weights_and_missing_backends_name_their_feature() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&TinySpec::default(), &path);
    let model = Model::load(&path).unwrap();
    let cpu = GgmlBackend::cpu(1).unwrap();
    let weights = model.weights_for(&cpu).unwrap();
    assert!(!weights.is_device_copy());
    // In place: the very tensors of the model, pointing into the mapping.
    let embd = model.weights.token_embd;
    assert_eq!(
        weights.get(embd).read_bytes(0, 64),
        model.w(embd).read_bytes(0, 64)
    );
    let map = ShareMap::identity(model.config.n_layers);
    let opts = SessionOptions {
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
const N_PREFILL: usize = 64;
const N_TOKENS: usize = 68;

fn compare(a: &[f32], b: &[f32], n_vocab: usize) -> (f32, f64, usize) {
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let mean = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64;
    let mismatches = a
        .chunks(n_vocab)
        .zip(b.chunks(n_vocab))
        .filter(|(x, y)| argmax(x) != argmax(y))
        .count();
    (max, mean, mismatches)
}

/// `toks` as one `N_PREFILL`-token pass (or passes of `n_batch`), then one token at
/// a time; the logits of every position.
fn logits(s: &mut Session<'_>, toks: &[u32]) -> Vec<f32> {
    let mut out = s.eval(&toks[..N_PREFILL], Logits::All).unwrap();
    for &t in &toks[N_PREFILL..] {
        out.extend(s.eval(&[t], Logits::Last).unwrap());
    }
    assert_eq!(s.n_past(), toks.len());
    out
}

fn options(n_batch: usize) -> SessionOptions {
    SessionOptions {
        n_ctx: 128,
        n_batch,
        n_threads: 2,
        ..Default::default()
    }
}

/// The device's weights, byte for byte the file's.
fn check_weights_copy(model: &Model, device: &GgmlBackend) {
    let w = model.weights_for(device).unwrap();
    assert!(matches!(w, PlacedWeights::Device(_)));
    let t = &model.weights;
    let mut indices = vec![t.token_embd, t.output_norm, t.output];
    for l in &t.layers {
        indices.extend([
            l.attn_norm,
            l.wq,
            l.wk,
            l.wv,
            l.wo,
            l.ffn_norm,
            l.ffn_gate,
            l.ffn_up,
            l.ffn_down,
        ]);
    }
    for i in indices {
        let (ours, file) = (w.get(i), model.w(i));
        assert_eq!(
            ours.read_bytes(0, ours.n_bytes()),
            file.read_bytes(0, file.n_bytes()),
            "weight {i} differs on the device"
        );
    }
}

fn whole_model(test: &str, map_of: impl Fn(usize) -> ShareMap) {
    let kinds: Vec<DeviceKind> = GPU_KINDS.into_iter().filter(|k| k.compiled_in()).collect();
    if kinds.is_empty() {
        say(&format!(
            "{test}: SKIPPED: built without cuda, vulkan and metal (rebuild with --features vulkan, say)"
        ));
        return;
    }
    let path = kvsharer::fetch::model_for_tests();
    let loaded = loader::load(&path).unwrap();
    let model = &loaded.model;
    let map = map_of(model.config.n_layers);
    let mut toks = loaded.tokenizer.encode(PROMPT, true, false).unwrap();
    assert!(
        toks.len() >= N_TOKENS,
        "prompt is only {} tokens",
        toks.len()
    );
    toks.truncate(N_TOKENS);
    let n_vocab = model.config.n_vocab;
    let cpu = logits(
        &mut Session::new(model, &map, &options(512)).unwrap(),
        &toks,
    );
    let cpu_b16 = logits(&mut Session::new(model, &map, &options(16)).unwrap(), &toks);
    let (own_max, own_mean, own_mismatches) = compare(&cpu_b16, &cpu, n_vocab);

    for kind in kinds {
        let mut gpu = match Session::on_device(kind, model, &map, &options(512)) {
            Ok(s) => s,
            Err(SessionError::Ggml(e @ GgmlError::NoDevice { .. })) => {
                say(&format!("{test}: {kind}: SKIPPED: {e}"));
                continue;
            }
            Err(e) => panic!("{test}: {kind}: {e}"),
        };
        let device = gpu.backend().device_name().to_string();
        assert!(!gpu.backend().is_cpu());
        check_weights_copy(model, gpu.backend());
        assert_eq!(gpu.cache().n_slots(), map.owner_count());
        let ours = logits(&mut gpu, &toks);
        assert_eq!(ours.len(), cpu.len());
        let (max, mean, mismatches) = compare(&ours, &cpu, n_vocab);
        say(&format!(
            "{test}: {kind} on {device}: {N_TOKENS} positions vs ggml cpu: max |logit diff| {max:.4}, \
             mean {mean:.4}, top-1 mismatches {mismatches}; ggml cpu batch 16 vs 512: max {own_max:.4}, \
             mean {own_mean:.4}, top-1 mismatches {own_mismatches}"
        ));
        assert!(
            mean <= 1.5 * own_mean + 0.01,
            "mean |logit diff| {mean} vs ggml cpu's own {own_mean}"
        );
        assert!(
            max <= 1.5 * own_max + 0.1,
            "max |logit diff| {max} vs ggml cpu's own {own_max}"
        );
        assert!(
            mismatches <= own_mismatches + 1 && mismatches * 10 <= N_TOKENS,
            "top-1 differs at {mismatches} of {N_TOKENS} positions (ggml cpu itself: {own_mismatches})"
        );
        if !map.is_identity() {
            // The map must matter far more than the device does, or this comparison
            // could not tell a device that ignores it.
            let unshared = logits(
                &mut Session::new(model, &ShareMap::identity(map.n_layers()), &options(512))
                    .unwrap(),
                &toks,
            );
            let (_, sharing_mean, _) = compare(&unshared, &cpu, n_vocab);
            say(&format!(
                "{test}: the map itself moves ggml's logits by mean {sharing_mean:.4}"
            ));
            assert!(mean * 3.0 < sharing_mean, "{mean} vs {sharing_mean}");
        }
    }
}

#[test]
fn gpu_device_logits_match_cpu_unshared() {
    whole_model("gpu_device_logits_match_cpu_unshared", ShareMap::identity);
}

#[test]
fn gpu_device_logits_match_cpu_with_sharing() {
    whole_model("gpu_device_logits_match_cpu_with_sharing", |n: usize| {
        let mut src: Vec<usize> = (0..n).collect();
        for (l, s) in [(22, 21), (28, 27), (29, 27)] {
            src[l] = s;
        }
        ShareMap::for_model(src, n).unwrap()
    });
}
