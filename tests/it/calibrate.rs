//! The KVSharer search, the stored map and `share` on tiny generated models.

use crate::support;

use std::collections::BTreeSet;

use kvsharer::backend::ggml::Session;
use kvsharer::gguf::GgufFile;
use kvsharer::kvplan::{self, ShareMap};
use kvsharer::loader;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};
use kvsharer::search::{self, report, CalibrationOptions, Corpus, PairOrder};
use sha2::{Digest, Sha256};
use support::{write_planted_model, TinySpec};

/// A 6-layer model in which layers 2 and 4 have a zero attention output matrix: what
/// they attend over cannot matter, so sharing their cache is harmless, while sharing
/// any other layer changes the output.
fn planted_model(dir: &std::path::Path) -> std::path::PathBuf {
    let spec = TinySpec {
        n_layers: 6,
        seed: 7,
        ..TinySpec::default()
    };
    let path = dir.join("planted.gguf");
    write_planted_model(&spec, &[2, 4], &path);
    path
}

fn opts(target: usize, threshold: f32) -> CalibrationOptions {
    CalibrationOptions {
        samples: 6,
        tokens: 32,
        target,
        threshold,
        order: PairOrder::Dissimilar,
        threads: 2,
    }
}

#[test]
fn search_finds_the_planted_harmless_layers() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let corpus = Corpus::default_corpus();
    let r = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &corpus,
        &opts(2, 0.9999),
        |_| {},
    )
    .unwrap();
    let shared: BTreeSet<usize> = r.map.pairs().iter().map(|p| p.0).collect();
    eprintln!("{}", report::trials_table(&r));
    assert_eq!(shared, BTreeSet::from([2, 4]), "map {}", r.map);
    assert_eq!(r.shared, 2);
    // Every kept pair is harmless (cosine 1 up to rounding); every other pair was
    // refused because it moved the output.
    for t in &r.trials {
        assert_eq!(t.kept, t.layer == 2 || t.layer == 4, "{t:?}");
        if t.kept {
            assert!(t.cosine > 0.99999, "{t:?}");
        }
    }
    // Pairs were tried most dissimilar first.
    let scores: Vec<f32> = r.trials.iter().map(|t| t.score).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(r.outcome.contains("target met"));
}

#[test]
fn search_reports_an_unmet_target_honestly() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let r = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &Corpus::default_corpus(),
        &opts(4, 0.9999),
        |_| {},
    )
    .unwrap();
    assert_eq!(r.shared, 2);
    assert!(r.outcome.contains("NOT met"), "{}", r.outcome);
    // All 15 pairs of a 6-layer model were considered (minus those whose layer was
    // already shared when their turn came).
    assert!(r.trials.len() >= 10);
}

#[test]
fn similar_first_order_is_the_reverse_ranking() {
    let scores = vec![vec![0.0; 3], vec![5.0, 0.0, 0.0], vec![1.0, 9.0, 0.0]];
    assert_eq!(
        search::ranked_pairs(&scores, PairOrder::Dissimilar),
        vec![(2, 1), (1, 0), (2, 0)]
    );
    assert_eq!(
        search::ranked_pairs(&scores, PairOrder::Similar),
        vec![(2, 0), (1, 0), (2, 1)]
    );
}

#[test]
#[allow(clippy::needless_range_loop)]
fn captured_kv_and_distances_follow_the_definition() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        n_layers: 3,
        ..TinySpec::default()
    };
    let path = dir.path().join("m.gguf");
    let w = support::write_tiny_model(&spec, &path);
    let loaded = loader::load(&path).unwrap();
    let set = search::prepare(&loaded.tokenizer, &Corpus::default_corpus(), 3, 16).unwrap();
    assert_eq!(set.seq_len, 16);
    assert_eq!(set.tokens.len(), 48);
    let cap = search::capture(&loaded.model, &set, 2).unwrap();
    // Average of the reference's f16-cached keys over the three texts.
    let kv = spec.kv_dim();
    let mut mean_k = vec![vec![0f32; 16 * kv]; 3];
    for text in set.tokens.chunks(16) {
        let out = support::reference_forward_full(&w, &spec, &ShareMap::identity(3), text);
        for l in 0..3 {
            for p in 0..16 {
                for d in 0..kv {
                    mean_k[l][p * kv + d] += half::f16::from_f32(out.k[l][p][d]).to_f32() / 3.0;
                }
            }
        }
    }
    for l in 0..3 {
        let max = cap.keys[l]
            .iter()
            .zip(&mean_k[l])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max < 2e-2,
            "layer {l}: captured keys differ from the reference by {max}"
        );
    }
    let d = search::distance_matrix(&cap, spec.head_dim());
    // dK(1,0) from the definition: mean over (head, position) of the L2 norm.
    let hd = spec.head_dim();
    let dist = |a: &[f32], b: &[f32]| {
        let n = a.len() / hd;
        a.chunks(hd)
            .zip(b.chunks(hd))
            .map(|(x, y)| {
                x.iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).powi(2))
                    .sum::<f32>()
                    .sqrt()
            })
            .sum::<f32>()
            / n as f32
    };
    let expected = (dist(&cap.keys[1], &cap.keys[0]) + dist(&cap.values[1], &cap.values[0])) / 2.0;
    assert!((d[1][0] - expected).abs() < 1e-4 * expected.max(1.0));
    assert_eq!(d[0][1], 0.0);
}

#[test]
fn too_little_calibration_text_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let few = Corpus::from_text("one line only\nand another\n");
    let e = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &few,
        &opts(1, 0.5),
        |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("only 2 non-empty lines"), "{e}");
    let short = Corpus::from_text(&"tiny\n".repeat(10));
    let e = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &short,
        &opts(1, 0.5),
        |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least 8"), "{e}");
    let e = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &Corpus::default_corpus(),
        &opts(6, 0.5),
        |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("cannot share 6 layers"), "{e}");
}

fn tensor_hashes(f: &GgufFile) -> Vec<(String, Vec<u8>)> {
    f.tensors()
        .iter()
        .map(|t| (t.name.clone(), Sha256::digest(f.tensor_data(t)).to_vec()))
        .collect()
}

#[test]
fn stored_map_round_trips_with_identical_tensors_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let src = planted_model(dir.path());
    let loaded = loader::load(&src).unwrap();
    let r = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &Corpus::default_corpus(),
        &opts(2, 0.9999),
        |_| {},
    )
    .unwrap();
    let out = dir.path().join("shared.gguf");
    let before = std::fs::read(&src).unwrap();
    kvsharer::gguf::write_with_metadata(
        loaded.model.file(),
        &report::metadata(&r),
        &["kvsharer."],
        &out,
    )
    .unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), before, "input changed");

    let a = GgufFile::open(&src).unwrap();
    let b = GgufFile::open(&out).unwrap();
    assert_eq!(tensor_hashes(&a), tensor_hashes(&b));
    for (k, v) in a.metadata() {
        assert_eq!(b.get(k), Some(v), "key {k}");
    }
    assert_eq!(b.get_u32("kvsharer.version").unwrap(), 1);
    assert_eq!(b.get_u32("kvsharer.shared_layer_count").unwrap(), 2);
    assert_eq!(b.get_u32("kvsharer.calibration.sample_count").unwrap(), 6);
    assert_eq!(
        b.get_str("kvsharer.calibration.corpus_sha256").unwrap(),
        Corpus::default_corpus().sha256
    );
    let reloaded = loader::load(&out).unwrap();
    assert_eq!(reloaded.model.stored_map.as_ref(), Some(&r.map));
}

#[test]
fn identity_map_gives_bit_identical_logits_to_no_map() {
    let dir = tempfile::tempdir().unwrap();
    let src = planted_model(dir.path());
    let out = dir.path().join("identity.gguf");
    let plain = loader::load(&src).unwrap();
    kvsharer::gguf::write_with_metadata(
        plain.model.file(),
        &kvplan::to_metadata(&ShareMap::identity(6)),
        &[],
        &out,
    )
    .unwrap();
    let stored = loader::load(&out).unwrap();
    let map = stored.model.stored_map.clone().expect("map stored");
    assert!(map.is_identity());
    let opts = RunOptions {
        n_ctx: 64,
        n_threads: 2,
        ..Default::default()
    };
    let toks: Vec<u32> = (0..20).map(|i| (i * 5 + 1) % 90).collect();
    let a = Session::new(&plain.model, &ShareMap::identity(6), &opts)
        .unwrap()
        .eval(&toks, Logits::All)
        .unwrap();
    let b = Session::new(&stored.model, &map, &opts)
        .unwrap()
        .eval(&toks, Logits::All)
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn invalid_stored_maps_are_rejected_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let src = planted_model(dir.path());
    let plain = GgufFile::open(&src).unwrap();
    use kvsharer::gguf::{Array, Value};
    let cases: Vec<(Value, &str)> = vec![
        (
            Value::Array(Array::U32(vec![0, 1, 2])),
            "3 entries but the model has 6",
        ),
        (
            Value::Array(Array::U32(vec![0, 1, 2, 9, 4, 5])),
            "does not exist",
        ),
        (
            Value::Array(Array::U32(vec![0, 1, 5, 3, 4, 5])),
            "later layer",
        ),
        (Value::Array(Array::U32(vec![0, 0, 1, 3, 4, 5])), "chains"),
        (Value::String("0,1,2".into()), "array of u32"),
    ];
    for (i, (value, want)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("bad{i}.gguf"));
        kvsharer::gguf::write_with_metadata(
            &plain,
            &[("kvsharer.kv_source_layer".into(), value)],
            &[],
            &out,
        )
        .unwrap();
        let msg = match loader::load(&out) {
            Ok(_) => panic!("case {i} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(want), "case {i}: {msg}");
    }
}

#[test]
fn report_json_round_trips_the_map_and_the_svg_marks_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let r = search::paper::search(
        &loaded.model,
        &loaded.tokenizer,
        &Corpus::default_corpus(),
        &opts(2, 0.9999),
        |_| {},
    )
    .unwrap();
    let (json, svg) = report::write_report_dir(&r, &dir.path().join("rep")).unwrap();
    assert_eq!(report::read_report_map(&json, 6).unwrap(), r.map);
    let svg = std::fs::read_to_string(svg).unwrap();
    assert_eq!(svg.matches("stroke=\"red\"").count(), 2);
    assert_eq!(svg.matches("<title>").count(), 15);
}

#[test]
fn a_run_started_mid_network_equals_a_full_run() {
    use kvsharer::runtime::{ForwardRequest, PackedBatch};
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&planted_model(dir.path())).unwrap();
    let set = search::prepare(&loaded.tokenizer, &Corpus::default_corpus(), 4, 16).unwrap();
    let opts = RunOptions {
        n_ctx: set.tokens.len(),
        n_threads: 2,
        ..Default::default()
    };
    let req = ForwardRequest {
        logits: Logits::None,
        hidden: true,
        layer_inputs: true,
    };
    let base_map = ShareMap::identity(6);
    let mut s = Session::new(&loaded.model, &base_map, &opts).unwrap();
    let base = s.eval_packed(&set.tokens, set.seq_len, req).unwrap();
    assert_eq!(base.layer_inputs.len(), 6);
    // Same map, restarted at layer 3 from the captured stream: identical output.
    let (layer, input) = &base.layer_inputs[3];
    let again = s
        .forward_packed(
            PackedBatch {
                tokens: &set.tokens,
                seq_len: set.seq_len,
                start: Some((*layer, input)),
                refill: &[],
            },
            req,
        )
        .unwrap();
    assert_eq!(again.hidden, base.hidden);
    // A candidate sharing 3 <- 1: layers below 3 are unchanged, so restarting at 3
    // (slots 0..3 still hold the base run) equals a full run under the candidate.
    let cand = base_map.with_shared(3, 1).unwrap();
    let mut full = Session::new(&loaded.model, &cand, &opts).unwrap();
    let want = full
        .eval_packed(&set.tokens, set.seq_len, req)
        .unwrap()
        .hidden
        .unwrap();
    let mut partial = Session::new(&loaded.model, &cand, &opts).unwrap();
    partial.eval_packed(&set.tokens, set.seq_len, req).unwrap();
    let got = partial
        .forward_packed(
            PackedBatch {
                tokens: &set.tokens,
                seq_len: set.seq_len,
                start: Some((3, input)),
                refill: &[],
            },
            req,
        )
        .unwrap()
        .hidden
        .unwrap();
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn random_maps_are_valid_seeded_and_of_the_requested_size() {
    for seed in 0..50 {
        let m = search::random_map(30, 8, seed).unwrap();
        assert_eq!(m.shared_count(), 8);
        assert!(ShareMap::for_model(m.sources().to_vec(), 30).is_ok());
        assert_eq!(m, search::random_map(30, 8, seed).unwrap());
    }
    assert_ne!(
        search::random_map(30, 8, 1).unwrap(),
        search::random_map(30, 8, 2).unwrap()
    );
    assert!(search::random_map(4, 4, 0).is_err());
}
