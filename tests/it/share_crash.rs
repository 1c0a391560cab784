//! `share` is crash-safe: killing it at random moments leaves either no output or a
//! complete, loadable model, and never changes its input.

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use kvsharer::gguf::{GgmlType, GgufBuilder, GgufFile};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

fn sha(path: &std::path::Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// A loadable tiny model padded with a large unused tensor, so writing a copy takes
/// long enough to be interrupted at many different points.
fn big_model(dir: &std::path::Path) -> std::path::PathBuf {
    let tiny = dir.join("tiny.gguf");
    support::write_tiny_model(
        &support::TinySpec {
            n_layers: 4,
            ..Default::default()
        },
        &tiny,
    );
    let f = GgufFile::open(&tiny).unwrap();
    let mut b = GgufBuilder::new();
    for (k, v) in f.metadata() {
        b.set(k, v.clone());
    }
    for t in f.tensors() {
        b.add_tensor(&t.name, &t.dims, t.ggml_type, f.tensor_data(t).to_vec())
            .unwrap();
    }
    let n = 48 << 20; // 48 Mi f32 = 192 MiB
    let pad: Vec<u8> = (0..n * 4).map(|i| (i % 251) as u8).collect();
    b.add_tensor("padding.weight", &[n as u64], GgmlType::F32, pad)
        .unwrap();
    let path = dir.join("big.gguf");
    b.write_to(&path).unwrap();
    path
}

#[test]
fn killing_share_at_random_moments_never_leaves_a_broken_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = big_model(dir.path());
    let input_hash = sha(&input);
    let report = dir.path().join("report.json");
    std::fs::write(&report, r#"{"map": {"source": [0, 1, 1, 3]}}"#).unwrap();
    let out = dir.path().join("out.gguf");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_kvsharer"))
            .args([
                "share",
                "-m",
                input.to_str().unwrap(),
                "--map",
                report.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long an uninterrupted write takes here.
    let t = Instant::now();
    assert!(run().wait().unwrap().success());
    let full = t.elapsed();
    let reference: Vec<(String, Vec<u8>)> = {
        let f = GgufFile::open(&out).unwrap();
        f.tensors()
            .iter()
            .map(|t| (t.name.clone(), Sha256::digest(f.tensor_data(t)).to_vec()))
            .collect()
    };
    std::fs::remove_file(&out).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let (mut absent, mut complete) = (0, 0);
    for _ in 0..24 {
        let mut child = run();
        let delay = rng.random_range(0..full.as_micros() as u64 + 1);
        std::thread::sleep(Duration::from_micros(delay));
        let _ = child.kill();
        let _ = child.wait();
        if out.exists() {
            let f = GgufFile::open(&out).expect("a present output must be a complete GGUF");
            let hashes: Vec<(String, Vec<u8>)> = f
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), Sha256::digest(f.tensor_data(t)).to_vec()))
                .collect();
            assert_eq!(hashes, reference);
            assert!(kvsharer::loader::load(&out)
                .unwrap()
                .model
                .stored_map
                .is_some());
            complete += 1;
            std::fs::remove_file(&out).unwrap();
        } else {
            absent += 1;
        }
        assert_eq!(sha(&input), input_hash, "the input changed");
    }
    eprintln!("24 kills over a {full:?} write: {absent} left no output, {complete} a complete one, 0 broken");
}
