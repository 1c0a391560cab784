//! Helpers for comparing a backend's logits with ggml's CPU backend: the comparison
//! itself, the same model dequantized to f32 (so both sides multiply the file's
//! exact weight values by f32 activations, without ggml's 8-bit activation rounding),
//! and the setup the whole-model suites share (prompt, feeding, CPU side, map).

use std::path::Path;

use kvsharer::backend::ggml::dequantize;
use kvsharer::backend::ggml::Session;
use kvsharer::gguf::{GgmlType, GgufBuilder, GgufFile, Value};
use kvsharer::kvplan::ShareMap;
use kvsharer::loader::LoadedModel;
use kvsharer::model::Model;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};
use kvsharer::sample::argmax;

/// Max and mean |a - b| over all logits, and the positions (rows of `n_vocab`)
/// whose top-1 differs.
pub fn compare_logits(a: &[f32], b: &[f32], n_vocab: usize) -> (f32, f64, usize) {
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

/// Writes a copy of the GGUF at `src` with every tensor dequantized to f32 by
/// ggml's own dequantizer: the same model, exactly, in a form ggml's CPU backend
/// multiplies in f32 (its f32 weights take f32 activations, no 8-bit rounding).
pub fn dequantized_copy(src: &Path, out: &Path) {
    let file = GgufFile::open(src).unwrap();
    let mut b = GgufBuilder::new();
    for (k, v) in file.metadata() {
        b.set(k, v.clone());
    }
    b.set("general.file_type", Value::U32(0));
    for t in file.tensors() {
        let n = t.n_elements() as usize;
        let values = dequantize(t.ggml_type, file.tensor_data(t), n).unwrap();
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        b.add_tensor(&t.name, &t.dims, GgmlType::F32, bytes)
            .unwrap();
    }
    b.write_to(out).unwrap();
}

/// The whole-model comparisons with ggml's CPU backend (`wgpu_parity` for the wgpu
/// backend, `ggml_devices` for ggml's GPU devices) feed both sides a prompt's first
/// `N_TOKENS` tokens the same way: one `N_PREFILL`-token pass, then one token at a
/// time, so the prefill and the decode paths both run.
pub const N_PREFILL: usize = 64;
pub const N_TOKENS: usize = 68;

/// `prompt`'s first `N_TOKENS` tokens (with BOS).
pub fn prompt_tokens(loaded: &LoadedModel, prompt: &str) -> Vec<u32> {
    let mut toks = loaded.tokenizer.encode(prompt, true, false).unwrap();
    assert!(
        toks.len() >= N_TOKENS,
        "prompt is only {} tokens",
        toks.len()
    );
    toks.truncate(N_TOKENS);
    toks
}

/// `toks[..n_first]` in one call (passes of the session's batch size), then the rest
/// one token at a time; the logits of every position.
pub fn eval_then_decode<'m>(s: &mut dyn RunState<'m>, toks: &[u32], n_first: usize) -> Vec<f32> {
    let mut out = s.eval(&toks[..n_first], Logits::All).unwrap();
    for &t in &toks[n_first..] {
        out.extend(s.eval(&[t], Logits::Last).unwrap());
    }
    out
}

/// The ggml session options of the whole-model comparisons (CPU and device sessions).
pub fn session_options(n_batch: usize) -> RunOptions {
    RunOptions {
        n_ctx: 128,
        n_batch,
        n_threads: 2,
        ..Default::default()
    }
}

/// ggml's CPU backend on `model` under `map`, prefill in batches of `n_batch`: the
/// logits of every position, fed as [`eval_then_decode`] with `N_PREFILL`.
pub fn cpu_logits(model: &Model, map: &ShareMap, toks: &[u32], n_batch: usize) -> Vec<f32> {
    let mut cpu = Session::new(model, map, &session_options(n_batch)).unwrap();
    eval_then_decode(&mut cpu, toks, N_PREFILL)
}

/// The 3-layer map both whole-model suites share with: three shared layers, two of
/// them reading the same source. (Sharing many layers by an arbitrary map leaves a
/// model whose logits swing by tens on tiny rounding differences: ggml then
/// disagrees with itself across batch sizes at most positions, and the comparison
/// says nothing.)
pub fn three_layer_map(n_layers: usize) -> ShareMap {
    let mut src: Vec<usize> = (0..n_layers).collect();
    for (l, s) in [(22, 21), (28, 27), (29, 27)] {
        src[l] = s;
    }
    ShareMap::for_model(src, n_layers).unwrap()
}
