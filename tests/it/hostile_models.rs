//! Mutated tiny Llama models through the whole loading path (GGUF reader, model
//! validation, tokenizer, stored map) and, when they load, a short forward pass:
//! every variant must end in Ok or a clear error, never a panic or an abort.
//! (A ggml abort would kill this process, so finishing at all is half the test.)

use crate::support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use kvsharer::backend::ggml::Session;
use kvsharer::gguf::{Array, GgufFile, Value};
use kvsharer::kvplan::{self, ShareMap};
use kvsharer::loader;
use kvsharer::runtime::RunOptions;
use kvsharer::runtime::{Logits, RunState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn load_and_run(path: &std::path::Path) -> Result<(), String> {
    let loaded = loader::load(path).map_err(|e| e.to_string())?;
    let map = loaded
        .model
        .stored_map
        .clone()
        .unwrap_or_else(|| ShareMap::identity(loaded.model.config.n_layers));
    let opts = RunOptions {
        n_ctx: 16,
        n_threads: 1,
        ..Default::default()
    };
    let mut s = Session::new(&loaded.model, &map, &opts).map_err(|e| e.to_string())?;
    let ids = loaded
        .tokenizer
        .encode("ab c", true, false)
        .map_err(|e| e.to_string())?;
    if ids.is_empty() {
        return Ok(());
    }
    s.eval(&ids, Logits::Last).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn mutated_models_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    support::write_tiny_model(
        &support::TinySpec {
            n_layers: 2,
            ..Default::default()
        },
        &base,
    );
    let bytes = std::fs::read(&base).unwrap();
    let header_end = GgufFile::open(&base).unwrap().data_offset() as usize;
    let mut rng = StdRng::seed_from_u64(0x6b76);
    let (mut ok, mut err, mut panics) = (0, 0, 0);
    let mut slowest = Duration::ZERO;
    let variant = dir.path().join("v.gguf");
    for i in 0..1500 {
        let mut v = bytes.clone();
        match i % 4 {
            // Bit flips in the header, where counts, lengths, types and shapes live.
            0 | 1 => {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..header_end);
                    v[at] ^= 1 << rng.random_range(0..8);
                }
            }
            // Byte overwrites anywhere (weights may become NaN/inf: still no crash).
            2 => {
                for _ in 0..8 {
                    let at = rng.random_range(0..v.len());
                    v[at] = rng.random();
                }
            }
            // Truncation.
            _ => v.truncate(rng.random_range(0..v.len())),
        }
        std::fs::write(&variant, &v).unwrap();
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| load_and_run(&variant))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(msg)) => {
                assert!(!msg.contains('\n'), "multi-line error: {msg}");
                err += 1
            }
            Err(_) => panics += 1,
        }
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("mutated models: {ok} ran, {err} refused with an error, {panics} panics; slowest {slowest:?}");
    assert_eq!(panics, 0);
    assert!(err > 500, "the mutations should mostly be caught ({err})");
    assert!(slowest < Duration::from_secs(5));
}

#[test]
fn wrong_types_for_kvsharer_keys_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = two_layer_model(dir.path());
    let values = [
        Value::U32(1),
        Value::F32(1.0),
        Value::String("0 1".into()),
        Value::Array(Array::F32(vec![0.0, 1.0])),
        Value::Array(Array::String(vec!["0".into(), "1".into()])),
        Value::Array(Array::I32(vec![0, -1])),
        Value::Array(Array::U64(vec![0, u64::MAX])),
        Value::Array(Array::U32(vec![])),
    ];
    for (i, value) in values.into_iter().enumerate() {
        let out = dir.path().join(format!("k{i}.gguf"));
        kvsharer::gguf::write_with_metadata(
            &file,
            &[("kvsharer.kv_source_layer".into(), value.clone())],
            &[],
            &out,
        )
        .unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| load_and_run(&out)));
        let msg = r
            .expect("no panic")
            .expect_err(&format!("{value:?} must be refused"));
        assert!(msg.contains("sharing map"), "{msg}");
    }
}

/// `kvsharer.version` is read: a map written by a newer format (or a version that is
/// not a number) is refused with a clear error, never read as version 1's; a file
/// without the key (written before it existed) and version 1 load.
#[test]
fn stored_map_format_version_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = two_layer_model(dir.path());
    let map = ShareMap::for_model(vec![0, 0], 2).unwrap();
    let with_version = |version: Option<Value>, name: &str| {
        let mut kv: Vec<(String, Value)> = kvplan::to_metadata(&map)
            .into_iter()
            .filter(|(k, _)| k != kvplan::KEY_VERSION)
            .collect();
        if let Some(v) = version {
            kv.push((kvplan::KEY_VERSION.to_string(), v));
        }
        let out = dir.path().join(name);
        kvsharer::gguf::write_with_metadata(&file, &kv, &["kvsharer."], &out).unwrap();
        out
    };
    for (version, ok) in [
        (None, true),
        (Some(Value::U32(1)), true),
        (Some(Value::U32(2)), true),
        (Some(Value::U32(3)), false),
        (Some(Value::String("1".into())), false),
    ] {
        let path = with_version(version.clone(), "v.gguf");
        let loaded = kvsharer::loader::load(&path);
        match (ok, loaded) {
            (true, Ok(l)) => assert_eq!(l.model.stored_map.as_ref(), Some(&map), "{version:?}"),
            (false, Err(e)) => {
                let msg = e.to_string();
                assert!(msg.contains("version"), "{version:?}: {msg}");
            }
            (ok, r) => panic!("{version:?}: expected ok={ok}, got {:?}", r.err()),
        }
    }
}

/// A tiny 2-layer model written into `dir`, opened as a GGUF file.
fn two_layer_model(dir: &std::path::Path) -> GgufFile {
    let base = dir.join("base.gguf");
    support::write_tiny_model(
        &support::TinySpec {
            n_layers: 2,
            ..Default::default()
        },
        &base,
    );
    GgufFile::open(&base).unwrap()
}
