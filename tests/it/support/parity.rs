//! Helpers for comparing a backend's logits with ggml's CPU backend: the comparison
//! itself, and the same model dequantized to f32 (so both sides multiply the file's
//! exact weight values by f32 activations, without ggml's 8-bit activation rounding).

use std::path::Path;

use kvsharer::backend::ggml::dequantize;
use kvsharer::gguf::{GgmlType, GgufBuilder, GgufFile, Value};
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
