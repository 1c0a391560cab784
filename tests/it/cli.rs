//! The `kvsharer` binary on bad input and on tiny generated models: one-line errors
//! and a non-zero exit, never a panic; `share` writes a loadable copy and never
//! touches its input.

use crate::support;

use std::path::Path;
use std::process::{Command, Output};

use support::{write_tiny_model, TinySpec};

fn kvsharer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvsharer"))
        .args(args)
        .env(
            "KVSHARER_CACHE_DIR",
            std::env::temp_dir().join("kvsharer-cli-test-cache"),
        )
        .output()
        .expect("run kvsharer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails the test on a panic or a signal; returns the first line of the error.
fn expect_clean_failure(o: &Output) -> String {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "killed or crashed: {:?}; stderr: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    first.to_string()
}

fn tiny(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("tiny.gguf");
    write_tiny_model(
        &TinySpec {
            n_layers: 4,
            ..TinySpec::default()
        },
        &p,
    );
    p
}

#[test]
fn missing_file() {
    let e = expect_clean_failure(&kvsharer(&[
        "run",
        "-m",
        "/nonexistent/model.gguf",
        "-p",
        "hi",
    ]));
    assert!(e.contains("does not exist"), "{e}");
    let e = expect_clean_failure(&kvsharer(&["info", "/nonexistent/model.gguf"]));
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.gguf");
    std::fs::write(&p, "these are not the weights you are looking for").unwrap();
    let e = expect_clean_failure(&kvsharer(&["run", "-m", p.to_str().unwrap(), "-p", "hi"]));
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(tiny(dir.path())).unwrap();
    for cut in [3usize, 24, 200, full.len() / 2, full.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &full[..cut]).unwrap();
        let e = expect_clean_failure(&kvsharer(&["run", "-m", p.to_str().unwrap(), "-p", "hi"]));
        assert!(
            e.contains("truncated")
                || e.contains("remaining")
                || e.contains("outside")
                || e.contains("not a GGUF")
                || e.contains("past the end"),
            "cut {cut}: {e}"
        );
        expect_clean_failure(&kvsharer(&["info", p.to_str().unwrap()]));
    }
}

#[test]
fn other_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let src = kvsharer::gguf::GgufFile::open(&tiny(dir.path())).unwrap();
    let p = dir.path().join("gpt2.gguf");
    kvsharer::gguf::write_with_metadata(
        &src,
        &[(
            "general.architecture".into(),
            kvsharer::gguf::Value::String("gpt2".into()),
        )],
        &[],
        &p,
    )
    .unwrap();
    let e = expect_clean_failure(&kvsharer(&["run", "-m", p.to_str().unwrap(), "-p", "hi"]));
    assert!(e.contains("unsupported architecture 'gpt2'"), "{e}");
    expect_clean_failure(&kvsharer(&["info", p.to_str().unwrap()]));
}

/// Every line of stderr once: no `caused by:` line repeats what the line before it
/// already says, and `needle` (the root cause) appears exactly once.
fn assert_said_once(o: &Output, needle: &str) {
    let err = stderr(o);
    expect_clean_failure(o);
    assert_eq!(err.matches(needle).count(), 1, "{needle:?} repeated: {err}");
    let lines: Vec<&str> = err.lines().collect();
    for pair in lines.windows(2) {
        if let Some(cause) = pair[1].trim_start().strip_prefix("caused by: ") {
            assert!(!pair[0].contains(cause), "echoed cause: {err}");
        }
    }
}

#[test]
fn errors_say_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_said_once(&kvsharer(&["info", d]), "is a directory");
    assert_said_once(&kvsharer(&["run", "-m", d, "-p", "hi"]), "is a directory");
    // ...and names the directory once.
    assert_said_once(&kvsharer(&["run", "-m", d, "-p", "hi"]), d);

    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "these are not the weights you are looking for").unwrap();
    let text = text.to_str().unwrap();
    assert_said_once(&kvsharer(&["info", text]), "not a GGUF file");
    assert_said_once(
        &kvsharer(&["run", "-m", text, "-p", "hi"]),
        "not a GGUF file",
    );

    let src = kvsharer::gguf::GgufFile::open(&tiny(dir.path())).unwrap();
    let gemma = dir.path().join("gemma.gguf");
    kvsharer::gguf::write_with_metadata(
        &src,
        &[(
            "general.architecture".into(),
            kvsharer::gguf::Value::String("gemma".into()),
        )],
        &[],
        &gemma,
    )
    .unwrap();
    let gemma = gemma.to_str().unwrap();
    let arch = "unsupported architecture 'gemma'";
    assert_said_once(&kvsharer(&["info", gemma]), arch);
    assert_said_once(&kvsharer(&["run", "-m", gemma, "-p", "hi"]), arch);
    // A cause that adds something is still printed.
    let o = kvsharer(&["run", "-m", tiny(dir.path()).to_str().unwrap(), "-f", d]);
    expect_clean_failure(&o);
    assert!(stderr(&o).contains("caused by: "), "{}", stderr(&o));
}

#[test]
fn zero_threads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    for args in [
        &["run", "-m", m, "-t", "0", "-p", "hi"][..],
        &["run", "-m", m, "--threads=0", "-p", "hi"],
        &["calibrate", "-m", m, "-t", "0", "--layers", "1"],
        &["bench", "-m", m, "-t", "0"],
    ] {
        let e = expect_clean_failure(&kvsharer(args));
        assert!(e.contains("--threads must be at least 1"), "{args:?}: {e}");
    }
    // One thread is fine.
    let o = kvsharer(&["run", "-m", m, "-t", "1", "-p", "hi", "-n", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn prompt_longer_than_the_context_and_bad_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    let long = "abc ".repeat(100);
    let e = expect_clean_failure(&kvsharer(&["run", "-m", m, "-c", "64", "-p", &long]));
    assert!(e.contains("context holds 64"), "{e}");
    let e = expect_clean_failure(&kvsharer(&["run", "-m", m, "--temp=-1", "-p", "x"]));
    assert!(e.contains("temperature"), "{e}");
    let e = expect_clean_failure(&kvsharer(&["run", "-m", m, "--top-p", "0", "-p", "x"]));
    assert!(e.contains("top_p"), "{e}");
    let e = expect_clean_failure(&kvsharer(&[
        "run",
        "-m",
        m,
        "--cache-type-k",
        "q3_k",
        "-p",
        "x",
    ]));
    assert!(e.contains("not supported"), "{e}");
}

#[test]
fn run_generates_and_reports_kv_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let o = kvsharer(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "hello",
        "-n",
        "12",
        "--temp",
        "0",
        "--ignore-eos",
        "-c",
        "128",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hello"));
    // 4 layers x (K + V) x 2 KV heads x 16 dims x f16 x 128 cells.
    assert!(
        err.contains(&format!("KV cache {} bytes", 4 * 2 * 32 * 2 * 128)),
        "{err}"
    );
    assert!(err.contains("generation: 12 tokens"), "{err}");
    // -n 0 and an empty prompt are fine.
    let o = kvsharer(&["run", "-m", m.to_str().unwrap(), "-p", "", "-n", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn kv_share_without_a_stored_map_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let e = expect_clean_failure(&kvsharer(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "--kv-share",
        "-p",
        "x",
    ]));
    assert!(
        e.contains("no stored sharing map") && e.contains("kvsharer share"),
        "{e}"
    );
    let e = expect_clean_failure(&kvsharer(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "--kv-share",
        "4",
        "-p",
        "x",
    ]));
    assert!(e.contains("cannot share 4 of 4"), "{e}");
}

#[test]
fn share_writes_a_loadable_copy_and_refuses_bad_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let ms = m.to_str().unwrap();
    let before = std::fs::read(&m).unwrap();
    let out = dir.path().join("shared.gguf");
    let o = kvsharer(&[
        "share",
        "-m",
        ms,
        "--layers",
        "1",
        "--samples",
        "4",
        "--tokens",
        "16",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&m).unwrap(), before);
    let info = kvsharer(&["info", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("1 of 4 layers shared"), "{text}");
    let run = kvsharer(&[
        "run",
        "-m",
        out.to_str().unwrap(),
        "--kv-share",
        "-p",
        "ab",
        "-n",
        "4",
        "-c",
        "64",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("KV sharing on: 1 of 4 layers shared"),
        "{}",
        stderr(&run)
    );
    // Never overwrite the input; no output into a missing directory.
    let e = expect_clean_failure(&kvsharer(&["share", "-m", ms, "--layers", "1", "-o", ms]));
    assert!(e.contains("refusing to overwrite"), "{e}");
    let e = expect_clean_failure(&kvsharer(&[
        "share",
        "-m",
        ms,
        "--layers",
        "1",
        "-o",
        "/nonexistent-dir/x.gguf",
    ]));
    assert!(e.contains("does not exist"), "{e}");
    let e = expect_clean_failure(&kvsharer(&[
        "share",
        "-m",
        ms,
        "--layers",
        "4",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("cannot share 4 layers"), "{e}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn odd_but_legal_inputs_do_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    // Invalid UTF-8 in a prompt file: replaced, with a notice.
    let f = dir.path().join("prompt.bin");
    std::fs::write(&f, [b'a', b'b', 0xff, 0xfe, b'c']).unwrap();
    let o = kvsharer(&[
        "run",
        "-m",
        m,
        "-f",
        f.to_str().unwrap(),
        "-n",
        "2",
        "-c",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("not valid UTF-8"), "{}", stderr(&o));
    // A huge -n stops at the end of the context, cleanly.
    let o = kvsharer(&[
        "run",
        "-m",
        m,
        "-p",
        "ab",
        "-n",
        "1000000",
        "-c",
        "24",
        "--ignore-eos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("context full"), "{}", stderr(&o));
    // ...and with a window it keeps going to the requested length.
    let o = kvsharer(&[
        "run",
        "-m",
        m,
        "-p",
        "ab",
        "-n",
        "200",
        "--kv-window",
        "16",
        "--kv-sink",
        "2",
        "--ignore-eos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("generation: 200 tokens"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn on_the_fly_sharing_is_calibrated_once_then_cached() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let cache = dir.path().join("cache");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_kvsharer"))
            .args([
                "run",
                "-m",
                m.to_str().unwrap(),
                "--kv-share",
                "25%",
                "-p",
                "ab",
                "-n",
                "3",
                "-c",
                "64",
            ])
            .env("KVSHARER_CACHE_DIR", &cache)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("calibrating"), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("KV sharing on: 1 of 4 layers shared"),
        "{}",
        stderr(&first)
    );
    let second = run();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("using cached map"),
        "{}",
        stderr(&second)
    );
    assert!(
        !stderr(&second).contains("calibrating"),
        "{}",
        stderr(&second)
    );
    // The same map both times.
    let line = |o: &Output| {
        stderr(o)
            .lines()
            .find(|l| l.contains("KV sharing on"))
            .map(|l| l.to_string())
    };
    assert_eq!(line(&first), line(&second));
}

/// `perplexity --backend wgpu` (lavapipe in CI) measures what the CPU backend
/// measures: on an f32 tiny model both compute in f32, so perplexities agree to
/// 0.1%, with and without a sharing map. The comparison path runs two GPU sessions
/// on one device (the second a sibling of the first), so the adapter line is
/// printed once there too.
#[test]
fn perplexity_on_the_wgpu_backend_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let text = text.to_str().unwrap();
    let ppl = |extra: &[&str]| -> Option<(f64, Option<f64>, String)> {
        let mut args = vec![
            "perplexity",
            "-m",
            m,
            "-f",
            text,
            "-c",
            "64",
            "--chunks",
            "3",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = kvsharer(&args);
        let err = stderr(&o);
        if support::kvsharer_found_no_wgpu_adapter(&o) {
            return None;
        }
        assert!(o.status.success(), "{args:?}: {err}");
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        Some(match j.get("comparison").filter(|c| !c.is_null()) {
            Some(c) => (
                c["ppl_test"]["value"].as_f64().unwrap(),
                c["kld"]["value"].as_f64(),
                err,
            ),
            None => (j["perplexity"]["ppl"]["value"].as_f64().unwrap(), None, err),
        })
    };
    let adapter_lines = |err: &str| {
        err.lines()
            .filter(|l| l.starts_with("backend: wgpu on "))
            .count()
    };
    let (cpu, _, _) = ppl(&["--backend", "cpu"]).unwrap();
    let Some((gpu, _, gpu_err)) = ppl(&["--backend", "wgpu"]) else {
        support::skip(
            "perplexity_on_the_wgpu_backend_matches_the_cpu",
            support::NO_WGPU_ADAPTER,
        );
        return;
    };
    assert!((gpu / cpu - 1.0).abs() < 1e-3, "cpu {cpu} gpu {gpu}");
    assert_eq!(adapter_lines(&gpu_err), 1, "{gpu_err}");
    let (cpu_shared, cpu_kld, _) = ppl(&["--backend", "cpu", "--kv-share", "1"]).unwrap();
    let (gpu_shared, gpu_kld, shared_err) = ppl(&["--backend", "wgpu", "--kv-share", "1"]).unwrap();
    assert_eq!(adapter_lines(&shared_err), 1, "{shared_err}");
    assert!(
        shared_err.contains("comparing against the unshared model"),
        "{shared_err}"
    );
    assert!(
        (gpu_shared / cpu_shared - 1.0).abs() < 1e-3,
        "shared: cpu {cpu_shared} gpu {gpu_shared}"
    );
    let (ck, gk) = (cpu_kld.unwrap(), gpu_kld.unwrap());
    assert!(
        ck > 0.0 && (gk - ck).abs() <= 0.01 * ck + 1e-6,
        "kld cpu {ck} gpu {gk}"
    );
}

/// `--backend cuda|vulkan|metal` on a binary built without that cargo feature: a
/// one-line error naming the feature to rebuild with, exit 1, no panic, on every
/// subcommand that takes a backend; the sharing search refuses them as CPU-only.
#[test]
fn ggml_gpu_backends_missing_from_the_build_say_how_to_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "one two three four five six seven. ".repeat(10)).unwrap();
    let text = text.to_str().unwrap();
    let built = [
        ("cuda", cfg!(feature = "cuda")),
        ("vulkan", cfg!(feature = "vulkan")),
        ("metal", cfg!(feature = "metal")),
    ];
    let mut checked = 0;
    for (name, compiled_in) in built {
        if !compiled_in {
            let hint = format!("rebuild with --features {name}");
            // The sharing search runs on ggml's GPU backends too, so calibrate
            // says how to get one like every other command.
            let commands: [Vec<&str>; 5] = [
                vec!["chat", "-m", m, "--backend", name],
                vec!["calibrate", "-m", m, "--layers", "1", "--backend", name],
                vec!["run", "-m", m, "-p", "x", "-n", "1", "--backend", name],
                vec![
                    "perplexity",
                    "-m",
                    m,
                    "-f",
                    text,
                    "-c",
                    "32",
                    "--backend",
                    name,
                ],
                vec![
                    "bench",
                    "-m",
                    m,
                    "--no-llama-cpp",
                    "-p",
                    "8",
                    "-n",
                    "2",
                    "--backend",
                    name,
                ],
            ];
            for args in commands {
                let o = kvsharer(&args);
                let first = expect_clean_failure(&o);
                assert!(first.contains(&format!("--backend {name}")), "{first}");
                assert!(stderr(&o).contains(&hint), "{args:?}: {}", stderr(&o));
                checked += 1;
            }
        }
    }
    if checked == 0 {
        support::skip(
            "ggml_gpu_backends_missing_from_the_build_say_how_to_get_them",
            "the missing-feature half: cuda, vulkan and metal are all built in",
        );
    }
}

/// A build with the `vulkan` feature but no usable device (here: ggml's Vulkan
/// backend switched off by its own GGML_DISABLE_VULKAN) names the cause and exits 1.
#[test]
fn vulkan_built_in_without_a_device_names_the_cause() {
    if !cfg!(feature = "vulkan") {
        support::skip(
            "vulkan_built_in_without_a_device_names_the_cause",
            "built without the vulkan feature",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let o = Command::new(env!("CARGO_BIN_EXE_kvsharer"))
        .args(["run", "-m", m.to_str().unwrap(), "-p", "x", "-n", "1"])
        .args(["--backend", "vulkan"])
        .env("GGML_DISABLE_VULKAN", "1")
        .output()
        .expect("run kvsharer");
    let first = expect_clean_failure(&o);
    assert!(first.contains("--backend vulkan"), "{first}");
    let err = stderr(&o);
    assert!(err.contains("no Vulkan device found"), "{err}");
    assert!(err.contains("GGML_VK_VISIBLE_DEVICES"), "{err}");
}

/// `bench --llama-ngl` offloads llama.cpp's side where this build has a GPU
/// backend; in a CPU-only build it says the flag is ignored and still measures both.
#[test]
fn bench_llama_ngl_says_where_llama_cpp_runs() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let o = kvsharer(&[
        "bench",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
        "-c",
        "64",
        "--llama-ngl",
        "99",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("llama.cpp") && out.contains("tg2"),
        "both runtimes measured: {out}"
    );
    if kvsharer::oracle::supports_gpu_offload() {
        assert!(err.contains("99 layers offloaded"), "{err}");
    } else {
        assert!(err.contains("--llama-ngl is ignored"), "{err}");
    }
}

/// `--backend auto` takes a real GPU or says why it runs on the CPU; a window
/// and the cache types run on `--backend wgpu` as on the CPU, refused alike where
/// the model cannot have them.
#[test]
fn backend_auto_falls_back_with_a_notice_and_wgpu_runs_windows_and_cache_types() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let m = m.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "-m", m, "-p", "ab", "-n", "2", "--temp", "0"];
        args.extend_from_slice(extra);
        kvsharer(&args)
    };
    let o = run(&["--backend", "auto"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("backend: wgpu on ")
            || (err.contains("note: --backend auto: no usable GPU")
                && err.contains("using the CPU backend")),
        "auto must name the GPU or the reason for the CPU: {err}"
    );
    if err.contains("note: --backend auto") {
        // The reason printed is the adapter check's (software only, or none at all).
        assert!(
            err.contains("software") || err.contains("no GPU adapter"),
            "{err}"
        );
    }

    // A window runs on wgpu as on the CPU, with the same greedy output (the tiny
    // model's weights are f32, so both compute the same sums).
    let windowed = |backend: &str| {
        kvsharer(&[
            "run",
            "-m",
            m,
            "-p",
            "abcab",
            "-n",
            "16",
            "--temp",
            "0",
            "--kv-window",
            "8",
            "--kv-sink",
            "1",
            "--backend",
            backend,
        ])
    };
    let cpu = windowed("cpu");
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    let gpu = windowed("wgpu");
    if !support::kvsharer_found_no_wgpu_adapter(&gpu) {
        assert!(gpu.status.success(), "{}", stderr(&gpu));
        assert_eq!(
            String::from_utf8_lossy(&gpu.stdout),
            String::from_utf8_lossy(&cpu.stdout)
        );
    }
    // The tiny model's 16-wide heads allow no block-quantized cache, on either
    // backend: a clean error naming the head dimension.
    for backend in ["cpu", "wgpu"] {
        let o = run(&["--backend", backend, "--cache-type-v", "q4_0"]);
        if support::kvsharer_found_no_wgpu_adapter(&o) {
            continue;
        }
        expect_clean_failure(&o);
        let e = stderr(&o);
        assert!(e.contains("head dimension"), "{backend}: {e}");
    }
}
