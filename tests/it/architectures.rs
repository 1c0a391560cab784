//! The Llama-family variants (`qwen2`: Q/K/V biases; `qwen3`: per-head Q/K RMS
//! norms; both NEOX RoPE) on tiny random models the tests write, llama.cpp's
//! converter layout.
//!
//! Oracles: llama.cpp itself through the `llama_*` API on the same file (it cannot
//! share, so only unshared logits; f32 weights within 1e-3, q8_0 within 1e-2: both
//! sides build the same graph, measured 0 to 1e-6), and the plain f32 reference
//! forward for shared layers (f16-rounded cache; 0.05 on logits of magnitude ~30-60,
//! which the tied 49,152-token embedding gives: measured 0.023, ggml's f16 flash
//! attention against the f32 reference; and the sharing must move the reference by
//! 4x more than our error).

use crate::support;

use kvsharer::backend::ggml::Session;
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader;
use kvsharer::model::{Arch, LayerRole};
use kvsharer::oracle::{ContextOptions, LlamaCppModel};
use kvsharer::runtime::{Logits, RunOptions, RunState};
use support::{max_abs_diff, reference_forward_with, write_tiny_model, RefPrecision, TinySpec};

/// Four layers, head dim 32, and the default model's real tokenizer (49,152 tokens),
/// so text tokenizes as on a real model.
fn spec(arch: Arch, ty: GgmlType) -> TinySpec {
    let (keys, n_vocab) = support::default_tokenizer_keys(None);
    TinySpec {
        arch,
        n_layers: 4,
        n_embd: 128,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 256,
        n_vocab,
        tied_output: true,
        weight_type: ty,
        tokenizer: Some(keys),
        ..TinySpec::default()
    }
}

/// A tiny model written to a temporary directory and loaded, with the weights as
/// stored (for the reference forward).
struct Tiny {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    weights: support::RefWeights,
    loaded: kvsharer::loader::LoadedModel,
}

fn tiny(spec: &TinySpec) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let weights = write_tiny_model(spec, &path);
    let loaded = loader::load(&path).unwrap();
    Tiny {
        _dir: dir,
        path,
        weights,
        loaded,
    }
}

/// The runtime's f16 cache, imitated by the reference.
const F16_CACHE: RefPrecision = RefPrecision {
    kv_cache_f16: true,
    attn_inputs_f16: false,
};

/// The reference's logits for every position under `map`.
fn reference(t: &Tiny, spec: &TinySpec, map: &ShareMap, toks: &[u32]) -> Vec<f32> {
    reference_forward_with(&t.weights, spec, map, toks, F16_CACHE)
        .logits
        .concat()
}

fn tokens(spec: &TinySpec) -> Vec<u32> {
    (0..40u32)
        .map(|i| (i * 11 + 5) % spec.n_vocab as u32)
        .collect()
}

fn opts() -> RunOptions {
    RunOptions {
        n_ctx: 128,
        n_threads: 2,
        ..Default::default()
    }
}

/// llama.cpp's logits for every position of `toks` on the file at `path`.
fn llama_cpp_logits(path: &std::path::Path, toks: &[u32]) -> Vec<f32> {
    let llama = LlamaCppModel::load(path).unwrap();
    let mut ctx = llama
        .context(ContextOptions {
            n_ctx: 128,
            n_threads: 2,
            ..Default::default()
        })
        .unwrap();
    ctx.eval_all_logits(toks).unwrap().concat()
}

fn llama_cpp_parity(arch: Arch, ty: GgmlType, tol: f32) {
    let spec = spec(arch, ty);
    let t = tiny(&spec);
    let toks = tokens(&spec);
    let theirs = llama_cpp_logits(&t.path, &toks);
    let loaded = &t.loaded;
    assert_eq!(loaded.model.config.arch, arch);
    let layer = &loaded.model.weights.layers()[0];
    assert_eq!(layer.get(LayerRole::AttnKBias).is_some(), arch.qkv_bias());
    assert_eq!(layer.get(LayerRole::AttnKNorm).is_some(), arch.qk_norm());
    let map = ShareMap::identity(spec.n_layers);
    let mut s = Session::new(&loaded.model, &map, &opts()).unwrap();
    let ours = s.eval(&toks, Logits::All).unwrap();
    let d = max_abs_diff(&ours, &theirs);
    eprintln!("{arch} {}: max |ours - llama.cpp| = {d:.2e}", ty.name());
    assert!(
        d < tol,
        "{arch} {}: logits differ from llama.cpp's by {d}",
        ty.name()
    );

    // The decode path (one token per pass, graph reuse) agrees with the prefill.
    let mut s = Session::new(&loaded.model, &map, &opts()).unwrap();
    let n_vocab = spec.n_vocab;
    let mut decoded = s.eval(&toks[..30], Logits::All).unwrap();
    for &t in &toks[30..] {
        decoded.extend(s.eval(&[t], Logits::Last).unwrap());
    }
    let d = max_abs_diff(&decoded[30 * n_vocab..], &ours[30 * n_vocab..]);
    assert!(
        d < 1e-2,
        "{arch}: token-by-token decoding differs from prefill by {d}"
    );
}

#[test]
fn qwen2_logits_match_llama_cpp() {
    llama_cpp_parity(Arch::Qwen2, GgmlType::F32, 1e-3);
    llama_cpp_parity(Arch::Qwen2, GgmlType::Q8_0, 1e-2);
}

#[test]
fn qwen3_logits_match_llama_cpp() {
    llama_cpp_parity(Arch::Qwen3, GgmlType::F32, 1e-3);
    llama_cpp_parity(Arch::Qwen3, GgmlType::Q8_0, 1e-2);
}

/// A shared layer skips its K/V projection with its bias and key norm: the shared
/// forward equals the reference forward that never reads them.
fn shared_matches_reference(arch: Arch) {
    let spec = spec(arch, GgmlType::F32);
    let t = tiny(&spec);
    let toks = tokens(&spec);
    let identity = ShareMap::identity(spec.n_layers);
    let unshared = reference(&t, &spec, &identity, &toks);
    for sources in [vec![0, 1, 2, 3], vec![0, 0, 2, 2], vec![0, 1, 1, 1]] {
        let map = ShareMap::new(sources).unwrap();
        let mut s = Session::new(&t.loaded.model, &map, &opts()).unwrap();
        let ours = s.eval(&toks, Logits::All).unwrap();
        let expected = reference(&t, &spec, &map, &toks);
        let err = max_abs_diff(&ours, &expected);
        let moved = max_abs_diff(&expected, &unshared);
        eprintln!("{arch} map {map}: max |ours - ref| {err:.5}, sharing moves ref by {moved:.3}");
        assert!(err < 0.05, "{arch} map {map}: {err}");
        if map != identity {
            assert!(
                err < moved / 4.0,
                "{arch} map {map}: error {err} vs separation {moved}"
            );
        }
    }
}

#[test]
fn qwen2_shared_forward_matches_the_reference() {
    shared_matches_reference(Arch::Qwen2);
}

#[test]
fn qwen3_shared_forward_matches_the_reference() {
    shared_matches_reference(Arch::Qwen3);
}

#[test]
fn other_architectures_are_refused_by_name() {
    let t = tiny(&spec(Arch::Llama, GgmlType::F32));
    // Rename the architecture in a copy: one line naming it, no panic.
    let bytes = std::fs::read(&t.path).unwrap();
    let renamed: Vec<u8> = replace_all(&bytes, b"llama", b"gemma");
    let other = t.path.with_file_name("gemma.gguf");
    std::fs::write(&other, renamed).unwrap();
    let err = loader::load(&other).err().expect("refused").to_string();
    assert!(err.contains("unsupported architecture 'gemma'"), "{err}");
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = haystack.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

/// The WGSL forward pass builds the variants too: on any wgpu adapter (lavapipe in
/// CI), qwen2 and qwen3 tiny models, shared and unshared, 36 tokens in one pass then
/// 4 decoded one by one, against the f32 reference (tolerance 0.02, as
/// wgpu_parity's tiny models; measured below 1e-3) and 20x below what sharing moves.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_variants_match_the_reference() {
    use kvsharer::backend::wgpu::{GpuOptions, GpuSession};
    let test = "wgpu_variants_match_the_reference";
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        for ty in [GgmlType::F32, GgmlType::Q8_0] {
            let spec = spec(arch, ty);
            let t = tiny(&spec);
            let toks = tokens(&spec);
            let identity = ShareMap::identity(spec.n_layers);
            let unshared = reference(&t, &spec, &identity, &toks);
            // One session per model (shader compilation dominates on lavapipe); the
            // shared map is laid out by `set_map`, which the CPU's search also uses.
            let opts = GpuOptions {
                n_ctx: 64,
                ..Default::default()
            };
            let Some(mut gpu) = support::wgpu::or_skip_without_adapter(
                test,
                GpuSession::new(&t.loaded.model, &identity, &opts),
            ) else {
                return;
            };
            for map in [identity.clone(), ShareMap::new(vec![0, 0, 2, 2]).unwrap()] {
                gpu.reset();
                gpu.set_map(&map).unwrap();
                let mut ours = gpu.eval(&toks[..36], Logits::All).unwrap();
                for &tok in &toks[36..] {
                    ours.extend(gpu.eval(&[tok], Logits::Last).unwrap());
                }
                let expected = reference(&t, &spec, &map, &toks);
                let err = max_abs_diff(&ours, &expected);
                let moved = max_abs_diff(&expected, &unshared);
                support::say(&format!(
                    "{test}: {arch} {} map {map}: max |gpu - ref| {err:.5}, sharing moves ref by {moved:.3}",
                    ty.name()
                ));
                assert!(err < 0.02, "{arch} {} map {map}: {err}", ty.name());
                if map != identity {
                    assert!(err < moved / 20.0, "{arch} map {map}: {err} vs {moved}");
                }
            }
        }
    }
}

/// `kvsharer perplexity`'s method equals llama-perplexity's scoring on llama.cpp's
/// forward pass, on each variant's tiny file (4 chunks of 128 tokens of
/// tests/data/ppl_sample.txt, tokenized by both as the default model does).
#[test]
fn variant_perplexity_matches_llama_cpp_method() {
    use crate::perplexity::{llama_cpp_perplexity, options, session_options, CHUNKS, N_CTX};
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let spec = spec(arch, GgmlType::Q8_0);
        let t = tiny(&spec);
        let (path, loaded) = (&t.path, &t.loaded);
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ppl_sample.txt"),
        )
        .unwrap();
        let tokens = kvsharer::eval::tokenize_text(&loaded.tokenizer, &text).unwrap();
        let llama = LlamaCppModel::load(path).unwrap();
        assert_eq!(tokens, llama.tokenize(&text, true, false).unwrap());
        assert!(tokens.len() >= CHUNKS * N_CTX);
        let map = ShareMap::identity(spec.n_layers);
        let mut s = Session::new(&loaded.model, &map, &session_options()).unwrap();
        let ours =
            kvsharer::eval::perplexity(&mut s, &loaded.tokenizer, &tokens, &options(), |_| {})
                .unwrap();
        let (ppl, _, _) = llama_cpp_perplexity(path, &tokens);
        let rel = (ours.ppl.value - ppl).abs() / ppl;
        eprintln!(
            "{arch}: PPL ours {:.6}, llama.cpp method {ppl:.6}, relative {rel:.2e}",
            ours.ppl.value
        );
        assert!(rel < 1e-4, "{arch}: PPL {} vs {ppl}", ours.ppl.value);
    }
}

/// Llama 3.1-style files: `rope_freqs.weight` (per-dimension RoPE divisors, as the
/// llama3 rope scaling writes them) and tied output embeddings, against llama.cpp;
/// the same file without the factors gives other logits, so the test sees them.
#[test]
fn llama3_rope_freqs_and_tied_output_match_llama_cpp() {
    let base = spec(Arch::Llama, GgmlType::F32);
    let half = base.head_dim() / 2;
    let spec = TinySpec {
        tied_output: true,
        rope_base: 500000.0,
        // 1 for high frequencies, up to 8 for low ones, smoothly in between.
        rope_freqs: Some(
            (0..half)
                .map(|i| 1.0 + 7.0 * (i as f32 / (half - 1) as f32).powi(2))
                .collect(),
        ),
        ..base
    };
    let t = tiny(&spec);
    let weights = &t.loaded.model.weights;
    assert!(weights.rope_freqs().is_some() && weights.tied_output());
    let toks = tokens(&spec);
    let theirs = llama_cpp_logits(&t.path, &toks);
    let map = ShareMap::identity(spec.n_layers);
    let mut s = Session::new(&t.loaded.model, &map, &opts()).unwrap();
    let ours = s.eval(&toks, Logits::All).unwrap();
    let d = max_abs_diff(&ours, &theirs);
    eprintln!("llama + rope_freqs + tied output: max |ours - llama.cpp| = {d:.2e}");
    assert!(d < 1e-3, "{d}");
    // Without the factors the logits move: the test sees them.
    let plain = TinySpec {
        rope_freqs: None,
        ..spec.clone()
    };
    let plain = tiny(&plain);
    let mut p = Session::new(&plain.loaded.model, &map, &opts()).unwrap();
    let without = p.eval(&toks, Logits::All).unwrap();
    assert!(
        max_abs_diff(&ours, &without) > 0.05,
        "rope_freqs changed nothing"
    );
}

/// What a user sees: `info` names the variant and what is unusual about it, and
/// `run` generates from it (sharing on the variants: the tests above).
#[test]
fn cli_info_and_run_on_the_variants() {
    let kvsharer = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kvsharer"))
            .args(args)
            .output()
            .unwrap()
    };
    for (arch, expect) in [
        (Arch::Qwen2, "qwen2 (Q/K/V biases, tied output embeddings)"),
        (
            Arch::Qwen3,
            "qwen3 (per-head Q/K RMS norm, tied output embeddings)",
        ),
    ] {
        let t = tiny(&spec(arch, GgmlType::Q8_0));
        let p = t.path.to_str().unwrap();
        let o = kvsharer(&["info", p]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && out.contains(expect), "{out}");
        assert!(out.contains("rope:          neox"), "{out}");
        for extra in [&[][..], &["--kv-share", "1"][..]] {
            let mut args = vec![
                "run",
                "-m",
                p,
                "-p",
                "Hello there",
                "-n",
                "8",
                "--temp",
                "0",
                "-c",
                "128",
                "-t",
                "2",
            ];
            args.extend_from_slice(extra);
            let o = kvsharer(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{arch} {extra:?}: {err}");
            assert!(err.contains("generation: 8 tokens"), "{err}");
        }
    }
}
