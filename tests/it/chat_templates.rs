//! Chat templates of the families people run (Qwen2.5, Qwen3, Llama 3.1/3.2,
//! Mistral Nemo, and the default model's own) rendered by kvsharer (minijinja) equal
//! what Python's jinja2 renders the way Hugging Face's `apply_chat_template` does
//! (tests/chat/render_jinja.py), on three conversations each. The templates are the
//! ones llama.cpp keeps in `models/templates`, taken at test time from the PyPI
//! source package `llama-cpp-python==0.3.36` (which vendors llama.cpp), not copied
//! into this repository.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvsharer::chat::{ChatTemplate, Message, Role};
use serde_json::json;

use crate::support;

/// llama.cpp's template directory from the sdist, fetched once per target directory.
fn templates_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("llama-cpp-python-0.3.36");
    let out = root.join("templates");
    if out.join(".done").exists() {
        return out;
    }
    let sdist = root.join("llama_cpp_python-0.3.36.tar.gz");
    if !sdist.exists() {
        support::pip_download("llama-cpp-python==0.3.36", &root, &["--no-binary", ":all:"]);
    }
    std::fs::create_dir_all(&out).unwrap();
    let ok = Command::new("tar")
        .arg("xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(&out)
        .args([
            "--strip-components=5",
            "--wildcards",
            "*/vendor/llama.cpp/models/templates/*.jinja",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot extract the templates from {}", sdist.display());
    std::fs::write(out.join(".done"), "").unwrap();
    out
}

fn conversations() -> Vec<Vec<Message>> {
    let m = Message::new;
    vec![
        vec![m(Role::User, "What is the capital of France?")],
        vec![
            m(Role::System, "You are a terse assistant."),
            m(Role::User, "Name three colours."),
        ],
        vec![
            m(Role::User, "Hi! Can you count to 3?"),
            m(Role::Assistant, "1, 2, 3."),
            m(Role::User, "Now backwards, with \"quotes\" and ünïcode."),
        ],
    ]
}

#[test]
fn family_templates_render_as_jinja2_does() {
    let dir = templates_dir();
    let default_model = kvsharer::loader::load(&support::default_model_path()).unwrap();
    let mut templates: Vec<(String, String, &str, &str)> = [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>"),
        ("Qwen-Qwen3-0.6B.jinja", "", "<|im_end|>"),
        (
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        (
            "meta-llama-Llama-3.2-3B-Instruct.jinja",
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>"),
    ]
    .iter()
    .map(|(file, bos, eos)| {
        let source =
            std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        (file.to_string(), source, *bos, *eos)
    })
    .collect();
    templates.push((
        "SmolLM2 (the default model's)".into(),
        default_model
            .chat_template
            .clone()
            .expect("the default model has a template"),
        "<|im_start|>",
        "<|im_end|>",
    ));

    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (name, source, bos, eos) in &templates {
        let template = ChatTemplate::new(Some(source), bos, eos)
            .unwrap_or_else(|e| panic!("{name} does not compile: {e}"));
        for conv in conversations() {
            for add_generation_prompt in [true, false] {
                cases.push(
                    json!({"template": source, "bos_token": bos, "eos_token": eos,
                    "messages": conv, "add_generation_prompt": add_generation_prompt}),
                );
                ours.push((name.clone(), template.render(&conv, add_generation_prompt)));
            }
        }
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_string(&cases).unwrap()).unwrap();
    let python = support::python_with(&["jinja2>=3.1,<4"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat/render_jinja.py");
    let o = Command::new(python)
        .arg(script)
        .arg(file.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(theirs.len(), ours.len());
    let mut rendered = 0;
    for ((name, mine), reference) in ours.iter().zip(&theirs) {
        match (mine, reference.as_str()) {
            (Ok(text), Some(expected)) => {
                assert_eq!(text, expected, "{name} renders differently");
                rendered += 1;
            }
            (Err(_), None) => {} // both refuse the conversation (e.g. no system role)
            (mine, _) => panic!("{name}: ours {mine:?}, jinja2 {reference}"),
        }
    }
    eprintln!(
        "{rendered} of {} renders equal jinja2's; the rest both refused",
        ours.len()
    );
    assert!(rendered >= 30, "only {rendered} renders compared");
}
