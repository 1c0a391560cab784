//! The programs in `examples/` (public API only) build with the tests and run on the
//! default model: each exits 0 and prints what it promises.

use crate::support;

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/NAME`, next to this test binary's `deps/` folder
/// (cargo builds the examples whenever it builds the integration tests).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing (cargo test builds the examples)",
        path.display()
    );
    path
}

fn run(name: &str, args: &[&str]) -> (String, String) {
    let out = Command::new(example(name))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{name} failed:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn generate_share_and_perplexity_examples_run() {
    let model = support::default_model_path();
    let model = model.to_str().unwrap();

    let (out, err) = run("generate", &[model, "Once upon a time"]);
    assert!(
        out.starts_with("Once upon a time") && out.len() > 20,
        "{out}"
    );
    assert!(
        err.contains("tokens/s") && err.contains("cpu (ggml)"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared.gguf");
    let (_, err) = run("share", &[model, shared.to_str().unwrap(), "2"]);
    assert!(err.contains("with the map stored in it"), "{err}");
    // The generate example picks the stored map up.
    let (_, err) = run("generate", &[shared.to_str().unwrap(), "Hello"]);
    assert!(!err.contains("map identity"), "{err}");

    let (out, _) = run("perplexity", &[model, "data/heldout.txt", "2"]);
    assert!(out.contains("perplexity (unshared): "), "{out}");
    assert!(out.contains("mean KLD"), "{out}");
}
