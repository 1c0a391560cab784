//! Checks of the test oracle itself (`tests/support`): the reference forward pass
//! against hand-computed facts, and the tiny GGUF model writer for every weight type
//! ggml can quantize without an importance matrix.

use crate::support;

use std::path::Path;

use kvsharer::gguf::{GgmlType, GgufFile};
use kvsharer::kvplan::ShareMap;
use support::*;

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn tiny_weights(spec: &TinySpec) -> RefWeights {
    // The oracle checks below need no file: the random f32 weights are a model too.
    random_weights(spec)
}

const TOKENS: [u32; 7] = [5, 17, 42, 3, 88, 17, 60];

#[test]
fn rms_norm_matches_hand_computation() {
    // mean(3^2, 4^2) = 12.5, so x / sqrt(12.5) * w.
    let y = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
    let r = 12.5f32.sqrt();
    assert!(
        (y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6,
        "{y:?}"
    );
    // eps enters under the root: mean(x^2)=0 with eps=0.25 gives scale 2.
    let y = rms_norm(&[0.0, 0.0], &[1.0, 1.0], 0.25);
    assert_eq!(y, vec![0.0, 0.0]);
    let y = rms_norm(&[0.5], &[1.0], 0.75);
    assert!(
        (y[0] - 0.5).abs() < 1e-7,
        "0.5/sqrt(0.25+0.75) = 0.5, got {}",
        y[0]
    );
}

#[test]
fn silu_matches_hand_values() {
    assert_eq!(silu(0.0), 0.0);
    assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    assert!((silu(-2.0) - (-0.238_405_85)).abs() < 1e-6);
}

#[test]
fn rope_at_position_zero_is_identity() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let mut y = x.clone();
    rope_norm(&mut y, 16, 0, 10000.0);
    assert_eq!(x, y, "RoPE at position 0 must leave the vector unchanged");
}

#[test]
fn rope_preserves_pair_norms_and_changes_the_vector() {
    let hd = 16;
    let x: Vec<f32> = (0..hd * 3).map(|i| (i as f32 * 1.3).cos() + 0.1).collect();
    let mut y = x.clone();
    rope_norm(&mut y, hd, 11, 10000.0);
    for (a, b) in x.chunks(2).zip(y.chunks(2)) {
        let (na, nb) = (a[0].hypot(a[1]), b[0].hypot(b[1]));
        assert!(
            (na - nb).abs() <= 1e-5 * na.max(1.0),
            "pair norm {na} -> {nb}"
        );
    }
    assert!(
        max_abs_diff(&[x], &[y]) > 0.1,
        "RoPE at position 11 did nothing"
    );
}

#[test]
fn rope_rotates_adjacent_pairs_by_pos_times_base_power() {
    let (hd, base, pos) = (16usize, 10000.0f32, 3usize);
    for i in 0..hd / 2 {
        // A unit vector on the first element of pair i.
        let mut x = vec![0.0f32; hd];
        x[2 * i] = 1.0;
        rope_norm(&mut x, hd, pos, base);
        let theta = pos as f64 * 10000f64.powf(-(2.0 * i as f64) / hd as f64);
        assert!(
            (x[2 * i] as f64 - theta.cos()).abs() < 1e-6,
            "pair {i}: {x:?}"
        );
        assert!(
            (x[2 * i + 1] as f64 - theta.sin()).abs() < 1e-6,
            "pair {i}: {x:?}"
        );
        // NORM mode: nothing leaks into the NEOX partner (i + hd/2) or elsewhere.
        let others = x
            .iter()
            .enumerate()
            .filter(|(j, _)| *j / 2 != i)
            .all(|(_, v)| *v == 0.0);
        assert!(others, "pair {i} leaked: {x:?}");
    }
    // Pair 0 rotates by exactly pos radians: (1, 0) at pos 3 -> (cos 3, sin 3).
    let mut x = vec![1.0f32, 0.0];
    rope_norm(&mut x, 2, 3, base);
    assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[1] - 3f32.sin()).abs() < 1e-6);
}

#[test]
fn rope_scores_depend_only_on_relative_position() {
    let hd = 32;
    let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.7).sin()).collect();
    let k: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.3).cos()).collect();
    let score = |pq: usize, pk: usize| {
        let (mut a, mut b) = (q.clone(), k.clone());
        rope_norm(&mut a, hd, pq, 10000.0);
        rope_norm(&mut b, hd, pk, 10000.0);
        a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
    };
    let (s1, s2, s3) = (score(5, 2), score(40, 37), score(5, 4));
    assert!(
        (s1 - s2).abs() < 1e-4,
        "same offset, different scores {s1} {s2}"
    );
    assert!(
        (s1 - s3).abs() > 1e-3,
        "different offsets, same score {s1} {s3}"
    );
}

#[test]
fn attention_over_one_position_returns_its_value_exactly() {
    let q = [0.3f32, -1.2, 2.0, 0.5];
    let k = [1.0f32, 2.0, -0.5, 0.25];
    let v = [7.5f32, -3.25, 0.125, 1e-3];
    let out = attend_head(&q, &[&k], &[&v], 0.5, false);
    assert_eq!(out, v.to_vec());
}

#[test]
fn attention_weights_follow_the_softmax_of_scaled_scores() {
    // Scores 0 and 2*ln(3)*0.5 = ln(3): weights 1/4 and 3/4.
    let q = [1.0f32, 0.0];
    let keys = [[0.0f32, 5.0], [2.0 * 3f32.ln(), -1.0]];
    let values = [[4.0f32, 0.0], [0.0f32, 8.0]];
    let out = attend_head(
        &q,
        &[&keys[0], &keys[1]],
        &[&values[0], &values[1]],
        0.5,
        false,
    );
    assert!(
        (out[0] - 1.0).abs() < 1e-6 && (out[1] - 6.0).abs() < 1e-6,
        "{out:?}"
    );
}

#[test]
fn query_heads_read_their_gqa_kv_head() {
    assert_eq!(
        (0..4).map(|h| kv_head_for(h, 4, 2)).collect::<Vec<_>>(),
        [0, 0, 1, 1]
    );
    assert_eq!(
        (0..9).map(|h| kv_head_for(h, 9, 3)).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 1, 2, 2, 2]
    );
    // At position 0 each head's attention output is its KV head's value exactly.
    let spec = TinySpec::default();
    let w = tiny_weights(&spec);
    let out = reference_forward_full(&w, &spec, &ShareMap::identity(3), &[9, 4]);
    let hd = spec.head_dim();
    for l in 0..spec.n_layers {
        for h in 0..spec.n_head {
            let kvh = h / spec.group_size();
            assert_eq!(
                out.attn[l][0][h * hd..(h + 1) * hd],
                out.v[l][0][kvh * hd..(kvh + 1) * hd],
                "layer {l} head {h}"
            );
        }
        // ...while the two KV heads really differ, so the check above discriminates.
        assert_ne!(out.v[l][0][..hd], out.v[l][0][hd..2 * hd]);
    }
}

#[test]
fn attention_is_causal() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec);
    let map = ShareMap::identity(spec.n_layers);
    let a = reference_forward(&w, &spec, &map, &TOKENS);
    let mut changed = TOKENS;
    changed[4] = 1;
    let b = reference_forward(&w, &spec, &map, &changed);
    assert_eq!(a[..4], b[..4], "earlier positions saw a later token");
    assert!(
        max_abs_diff(&a[4..], &b[4..]) > 1e-3,
        "the changed token had no effect"
    );
}

#[test]
fn sharing_is_honoured_and_shared_layers_ignore_their_own_kv_weights() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec);
    let identity = ShareMap::identity(3);
    let shared = ShareMap::new(vec![0, 1, 0]).unwrap();
    let base_identity = reference_forward(&w, &spec, &identity, &TOKENS);
    let base_shared = reference_forward(&w, &spec, &shared, &TOKENS);
    let d = max_abs_diff(&base_identity, &base_shared);
    assert!(d > 1e-2, "sharing layer 2 <- 0 changed logits by only {d}");

    // Scramble layer 2's Wk/Wv: under sharing they are never read.
    let mut scrambled = w.clone();
    let layer2 = &mut scrambled.layers[2];
    for m in [&mut layer2.wk, &mut layer2.wv] {
        m.data.iter_mut().enumerate().for_each(|(i, x)| {
            *x = ((i * 7919) % 101) as f32 / 50.0 - 1.0;
        });
    }
    let shared_after = reference_forward(&scrambled, &spec, &shared, &TOKENS);
    assert_eq!(
        base_shared, shared_after,
        "a shared layer read its own Wk/Wv"
    );
    let identity_after = reference_forward(&scrambled, &spec, &identity, &TOKENS);
    assert!(max_abs_diff(&base_identity, &identity_after) > 1e-2);

    // Scrambling the source layer's Wk/Wv does reach the sharing layer.
    let mut source_scrambled = w.clone();
    source_scrambled.layers[0]
        .wk
        .data
        .iter_mut()
        .for_each(|x| *x = -*x * 1.5);
    let out = reference_forward_full(&source_scrambled, &spec, &shared, &TOKENS);
    assert!(max_abs_diff(&out.logits, &base_shared) > 1e-2);
}

#[test]
fn shared_layer_attends_over_its_source_cache() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec);
    let shared = ShareMap::new(vec![0, 1, 0]).unwrap();
    let out = reference_forward_full(&w, &spec, &shared, &TOKENS);
    assert_eq!(out.k[2], out.k[0]);
    assert_eq!(out.v[2], out.v[0]);
    let own = reference_forward_full(&w, &spec, &ShareMap::identity(3), &TOKENS);
    assert_ne!(own.k[2], own.k[0]);
    assert_eq!(own.k[0], out.k[0], "layer 0 is upstream of the sharing");
    assert_eq!(own.k[1], out.k[1]);
    assert_eq!(out.k.len(), 3);
    assert!(out.k[0].iter().all(|k| k.len() == spec.kv_dim()));
    assert!(out.hidden.iter().all(|h| h.len() == spec.n_embd));
    assert!(out.logits.iter().all(|l| l.len() == spec.n_vocab));
}

#[test]
fn f16_cache_rounds_kv_and_moves_logits_only_slightly() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec);
    let map = ShareMap::identity(3);
    let exact = reference_forward_full(&w, &spec, &map, &TOKENS);
    let f16_logits = reference_forward_f16_cache(&w, &spec, &map, &TOKENS);
    let precision = RefPrecision {
        kv_cache_f16: true,
        attn_inputs_f16: false,
    };
    let f16_full = reference_forward_with(&w, &spec, &map, &TOKENS, precision);
    assert_eq!(f16_full.logits, f16_logits);
    for layer in f16_full.k.iter().chain(&f16_full.v) {
        for x in layer.iter().flatten() {
            assert_eq!(
                half::f16::from_f32(*x).to_f32(),
                *x,
                "{x} is not an f16 value"
            );
        }
    }
    let d = max_abs_diff(&exact.logits, &f16_logits);
    // f16 has an 11-bit significand: relative error ~5e-4 on O(1) keys and values.
    assert!(d > 0.0 && d < 2e-2, "f16 cache moved logits by {d}");
}

/// Bytes per block and elements per block for each type, from the block structs in
/// ggml-common.h, independently of the crate's tables.
fn block_layout(ty: GgmlType) -> (usize, usize) {
    use GgmlType::*;
    match ty {
        F32 => (4, 1),
        F16 | BF16 => (2, 1),
        Q4_0 | IQ4_NL => (18, 32),
        Q4_1 => (20, 32),
        Q5_0 => (22, 32),
        Q5_1 => (24, 32),
        Q8_0 => (34, 32),
        MXFP4 => (17, 32),
        Q2_K => (84, 256),
        Q3_K => (110, 256),
        Q4_K => (144, 256),
        Q5_K => (176, 256),
        Q6_K => (210, 256),
        IQ4_XS => (136, 256),
        TQ1_0 => (54, 256),
        TQ2_0 => (66, 256),
        NVFP4 => (36, 64),
        Q1_0 => (18, 128),
        Q2_0 => (18, 64),
        other => panic!("no block layout for {other:?}"),
    }
}

/// Largest relative RMS error `|deq - w| / |w|` allowed for any matrix of Gaussian
/// weights. Measured worst case with the default seeds in brackets; bounds leave
/// about 1.5x headroom, less for the 1-2 bit types whose error is near its ceiling
/// (quantizing everything to zero would give 1.0).
fn round_trip_tolerance(ty: GgmlType) -> f64 {
    use GgmlType::*;
    match ty {
        F32 => 0.0,
        F16 => 3.5e-4,                                // [2.1e-4]
        BF16 => 2.6e-3,                               // [1.7e-3]
        Q8_0 => 8e-3,                                 // [5.5e-3]
        Q6_K => 2.7e-2,                               // [1.8e-2]
        Q5_0 | Q5_1 | Q5_K => 6.5e-2,                 // [4.5e-2, 3.9e-2, 3.7e-2]
        Q4_0 | Q4_1 | Q4_K | IQ4_NL | IQ4_XS => 0.13, // [8.9e-2, 8.0e-2, 7.2e-2, 7.8e-2, 7.7e-2]
        MXFP4 | NVFP4 => 0.18,                        // [0.118, 0.097]
        Q3_K => 0.23,                                 // [0.152]
        Q2_K => 0.45,                                 // [0.299]
        Q1_0 => 0.7,                                  // [0.603 = sqrt(1 - 2/pi), sign * mean|w|]
        Q2_0 => 0.8,                                  // [0.721]
        TQ1_0 | TQ2_0 => 0.9,                         // [0.812, 0.812]
        other => panic!("no tolerance for {other:?}"),
    }
}

fn matrices(w: &RefWeights) -> Vec<(String, &RefMatrix)> {
    let mut out = vec![("token_embd.weight".to_string(), &w.token_embd)];
    for (i, l) in w.layers.iter().enumerate() {
        for (name, m) in [
            ("attn_q", &l.wq),
            ("attn_k", &l.wk),
            ("attn_v", &l.wv),
            ("attn_output", &l.wo),
            ("ffn_gate", &l.gate),
            ("ffn_up", &l.up),
            ("ffn_down", &l.down),
        ] {
            out.push((format!("blk.{i}.{name}.weight"), m));
        }
    }
    if let Some(m) = &w.output {
        out.push(("output.weight".to_string(), m));
    }
    out
}

fn relative_rms_error(a: &[f32], b: &[f32]) -> f64 {
    let err: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (err / norm).sqrt()
}

/// Reads the file back with the crate's GGUF reader and checks llama.cpp's layout.
fn check_read_back(path: &Path, spec: &TinySpec, stored: &RefWeights) {
    let f = GgufFile::open(path).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    for (key, want) in [
        ("llama.block_count", spec.n_layers),
        ("llama.context_length", spec.n_ctx_train),
        ("llama.embedding_length", spec.n_embd),
        ("llama.feed_forward_length", spec.n_ff),
        ("llama.attention.head_count", spec.n_head),
        ("llama.attention.head_count_kv", spec.n_head_kv),
        ("llama.rope.dimension_count", spec.head_dim()),
        ("llama.vocab_size", spec.n_vocab),
    ] {
        assert_eq!(f.get_u32(key).unwrap() as usize, want, "{key}");
    }
    assert_eq!(
        f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        spec.rms_eps
    );
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), spec.rope_base);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "default");
    let tokens = f.get_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.as_strings().unwrap().len(), spec.n_vocab);
    assert_eq!(
        f.get_array("tokenizer.ggml.token_type").unwrap().len(),
        spec.n_vocab
    );
    assert!(f.get("general.alignment").is_none());
    assert_eq!(f.alignment(), 32);

    let n_expected = 1 + 9 * spec.n_layers + 1 + usize::from(!spec.tied_output);
    assert_eq!(f.tensors().len(), n_expected);
    for (name, m) in matrices(stored) {
        let t = f.tensor(&name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dims, m.ggml_dims().to_vec(), "{name} dims");
        assert_eq!(t.ggml_type, spec.weight_type, "{name} type");
        let deq = kvsharer::backend::ggml::dequantize(t.ggml_type, f.tensor_data(t), m.data.len())
            .unwrap();
        assert_eq!(
            deq, m.data,
            "{name}: file bytes do not dequantize to RefWeights"
        );
    }
    let norm = f.tensor("blk.0.ffn_norm.weight").unwrap();
    assert_eq!(
        (norm.dims.clone(), norm.ggml_type),
        (vec![spec.n_embd as u64], GgmlType::F32)
    );
    assert_eq!(f.tensor("output.weight").is_none(), spec.tied_output);
}

#[test]
fn tiny_model_round_trips_for_every_quantizable_type() {
    use GgmlType::*;
    let dir = tempfile::tempdir().unwrap();
    let mut failed = Vec::new();
    let mut report = Vec::new();
    for ty in [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
        TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0, Q2_0,
    ] {
        let spec = TinySpec::for_type(ty);
        assert_eq!(spec.n_embd % ty.block_size() as usize, 0);
        assert_eq!(spec.n_ff % ty.block_size() as usize, 0);
        let path = dir.path().join(format!("tiny-{}.gguf", ty.name()));
        let stored = match try_write_tiny_model(&spec, &path) {
            Ok(w) => w,
            Err(e) => {
                failed.push(format!("{}: {e}", ty.name()));
                continue;
            }
        };
        let original = random_weights(&spec);

        let (block_bytes, block_elems) = block_layout(ty);
        let tensor_bytes: usize = matrices(&original)
            .iter()
            .map(|(_, m)| m.data.len() / block_elems * block_bytes)
            .sum::<usize>()
            + (2 * spec.n_layers + 1) * spec.n_embd * 4;
        let size = std::fs::metadata(&path).unwrap().len() as usize;
        let vocab_bytes: usize = tiny_vocab(spec.n_vocab)
            .tokens
            .iter()
            .map(|t| t.len())
            .sum();
        assert!(
            size > tensor_bytes + vocab_bytes && size < tensor_bytes + 32 * 1024,
            "{}: file is {size} bytes for {tensor_bytes} bytes of tensors",
            ty.name()
        );

        let mut worst = 0.0f64;
        for ((name, a), (_, b)) in matrices(&original).iter().zip(matrices(&stored)) {
            let e = relative_rms_error(&a.data, &b.data);
            assert!(
                e <= round_trip_tolerance(ty),
                "{}: {name} round-trip error {e}",
                ty.name()
            );
            worst = worst.max(e);
        }
        if ty != F32 {
            assert!(
                worst > 0.0,
                "{}: weights were not rounded at all",
                ty.name()
            );
        }
        assert_eq!(stored.layers[0].attn_norm, original.layers[0].attn_norm);
        check_read_back(&path, &spec, &stored);

        // The reference runs on every stored model and stays finite.
        let logits = reference_forward(&stored, &spec, &ShareMap::identity(3), &[1, 2, 3]);
        assert!(
            logits.iter().flatten().all(|x| x.is_finite()),
            "{}",
            ty.name()
        );
        report.push(format!("{} {size}B err {worst:.2e}", ty.name()));
    }
    eprintln!("written: {report:#?}\nrefused: {failed:#?}");
    // Every type ggml quantizes without an importance matrix must be writable.
    assert!(
        failed.is_empty(),
        "types that could not be written: {failed:#?}"
    );
}

#[test]
fn tied_output_writes_no_output_tensor_and_uses_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        tied_output: true,
        weight_type: GgmlType::Q8_0,
        ..TinySpec::default()
    };
    let path = dir.path().join("tied.gguf");
    let w = write_tiny_model(&spec, &path);
    assert!(w.output.is_none());
    check_read_back(&path, &spec, &w);
    let out = reference_forward_full(&w, &spec, &ShareMap::identity(3), &[7]);
    let row = w.token_embd.row(11);
    let logit: f32 = row.iter().zip(&out.hidden[0]).map(|(a, b)| a * b).sum();
    assert!((logit - out.logits[0][11]).abs() < 1e-4 * logit.abs().max(1.0));
}

#[test]
fn gpt2_byte_mapping_matches_known_characters() {
    assert_eq!(byte_to_unicode(b' '), 'Ġ');
    assert_eq!(byte_to_unicode(b'\n'), 'Ċ');
    assert_eq!(byte_to_unicode(b'a'), 'a');
    assert_eq!(byte_to_unicode(0x00), '\u{100}');
    assert_eq!(byte_to_unicode(0xAD), 'Ń');
    assert_eq!(byte_to_unicode(0xFF), 'ÿ');
    let mut all: Vec<char> = (0..=255u8).map(byte_to_unicode).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 256, "the byte mapping is not injective");
}

#[test]
fn tiny_vocab_layout() {
    let small = tiny_vocab(96);
    assert_eq!(small.tokens.len(), 96);
    assert_eq!(small.tokens[0], "Ġ");
    assert_eq!(small.tokens[1], "!");
    assert_eq!((small.bos, small.eos), (94, 95));
    assert_eq!(small.tokens[94], "<|bos|>");
    assert_eq!(small.token_types[95], 3);
    assert!(small.merges.is_empty());

    let big = tiny_vocab(300);
    assert_eq!(big.tokens.len(), 300);
    for b in 0..=255u8 {
        assert_eq!(big.tokens[b as usize], byte_to_unicode(b).to_string());
    }
    assert_eq!(big.tokens[256], "aa");
    assert_eq!(big.merges.len(), 42);
    assert_eq!(big.merges[0], "a a");
    for (merge, token) in big.merges.iter().zip(&big.tokens[256..298]) {
        assert_eq!(&merge.replace(' ', ""), token);
    }
    let mut distinct = big.tokens.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 300);
    assert_eq!(big.token_types.iter().filter(|&&t| t == 1).count(), 298);
}
