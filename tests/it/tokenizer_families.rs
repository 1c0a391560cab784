//! Tokenizer parity with llama.cpp beyond the default model's vocabulary: a real
//! SentencePiece vocabulary (Mistral's, as the PyPI package `mistral-common` ships
//! it, fetched with pip at test time) and the BPE pre-tokenizers of Llama 3
//! (`llama-bpe`), Qwen2 (`qwen2`) and Mistral Nemo (`tekken`) over the default
//! model's real byte-level vocabulary (llama.cpp picks the pre-tokenizer by the
//! `tokenizer.ggml.pre` name, so the same vocabulary under each name exercises each
//! family's splitting rules). Each vocabulary goes into a tiny random-weight GGUF the
//! test writes; both tokenizers load it. Checked: 2,000 random strings (with and
//! without special-token parsing) plus hand-picked ones, ids equal; every token's
//! piece equal to `llama_token_to_piece`; BOS/EOS/EOG and add-BOS rules equal.

use std::path::{Path, PathBuf};

use kvsharer::gguf::{Array, Value};
use kvsharer::loader;
use kvsharer::oracle::LlamaCppModel;

use crate::support::tokenizer_check::{pieces_and_specials_match, random_texts_match, same_ids};
use crate::support::{self, write_tiny_model, TinySpec};

const HAND_PICKED: &[&str] = &[
    "",
    " ",
    "Hello world",
    " Hello world",
    "Hello  world",
    "   leading and trailing   ",
    "\n\nnew\nlines\r\n",
    "tab\tseparated\tvalues",
    "1234567890",
    "3.14159 and 2,718",
    "The year 1987: 12/31/1987 at 23:59.",
    "don't won't I'm you're we've they'll he'd",
    "DON'T WON'T I'M",
    "CamelCaseIdentifiersLikeThis",
    "snake_case_identifiers_like_this",
    "fn main() { println!(\"{}\", x + 1); }",
    "def f(x):\n    return x ** 2\n",
    "<html><body class=\"a\">text</body></html>",
    "SELECT * FROM t WHERE id = 42;",
    "naïve café résumé",
    "Ünïcödé",
    "Straße",
    "日本語のテキスト",
    "中文文本测试",
    "한국어 텍스트",
    "Русский текст",
    "Ελληνικά",
    "עברית",
    "العربية",
    "हिन्दी",
    "emoji 😀👍🏽❤️",
    "👨‍👩‍👧‍👦",
    "math: ∑ ∫ √ ∞ ≠ ≤",
    "\u{a0}non-breaking\u{a0}spaces\u{a0}",
    "zero\u{200b}width",
    "e\u{301} combining",
    "ǅ title case",
    "１２３ fullwidth",
    "٣٤٥ arabic digits",
    "$100.00 €50 ¥1000",
    "a\u{0}null",
    "control\u{7}bell",
    "<s>",
    "</s>",
    "<unk>",
    "[INST] question [/INST]",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "...!!!???",
    "a-b_c.d/e\\f",
    "MiXeD CaSe WoRdS",
    "ÀÉÎÕÜ uppercase accents",
];

/// A tiny model carrying `tokenizer` keys; returns its path.
fn model_with_vocab(
    dir: &Path,
    name: &str,
    tokenizer: Vec<(String, Value)>,
    n_vocab: usize,
) -> PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    let spec = TinySpec {
        n_layers: 1,
        n_embd: 32,
        n_head: 2,
        n_head_kv: 1,
        n_ff: 64,
        n_vocab,
        tied_output: true,
        tokenizer: Some(tokenizer),
        ..TinySpec::default()
    };
    write_tiny_model(&spec, &path);
    path
}

fn check_family(path: &Path, extra_atoms: &[&str]) {
    let ours = loader::load(path).unwrap().tokenizer;
    let llama = LlamaCppModel::load(path).unwrap();
    let mut compared = 0;
    for text in HAND_PICKED {
        for add_special in [false, true] {
            for parse_special in [false, true] {
                compared += same_ids(&ours, &llama, text, add_special, parse_special);
            }
        }
    }
    assert!(compared > 500, "only {compared} ids compared");
    random_texts_match(&ours, &llama, extra_atoms, 2000);
    pieces_and_specials_match(&ours, &llama);
}

fn bpe_family(pre: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (keys, n_vocab) = support::default_tokenizer_keys(Some(pre));
    let path = model_with_vocab(dir.path(), pre, keys, n_vocab);
    check_family(&path, &["CamelCase", "HTTPServer", "é", "É", "/", "\r\n/"]);
}

#[test]
fn llama3_bpe_pre_tokenizer_matches_llama_cpp() {
    bpe_family("llama-bpe");
}

#[test]
fn qwen2_bpe_pre_tokenizer_matches_llama_cpp() {
    bpe_family("qwen2");
}

#[test]
fn tekken_bpe_pre_tokenizer_matches_llama_cpp() {
    bpe_family("tekken");
}

/// `mistral-common`'s wheel, fetched with pip once per target directory; returns
/// the bytes of `member` inside it.
fn mistral_common_file(member: &str) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mistral-common");
    let wheel = || {
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
    };
    if wheel().is_none() {
        support::pip_download("mistral-common==1.13.1", &dir, &[]);
    }
    let file = std::fs::File::open(wheel().expect("the wheel")).unwrap();
    let mut zip = zip::ZipArchive::new(file).unwrap();
    let mut entry = zip.by_name(member).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
    bytes
}

/// The fields of a SentencePiece `ModelProto` llama.cpp's converter reads: every
/// piece (text, score, type) and the normalizer's `add_dummy_prefix`.
fn parse_sentencepiece(bytes: &[u8]) -> (Vec<(String, f32, i32)>, bool) {
    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }
    // (field, wire type, payload) of one message's fields.
    fn fields(b: &[u8]) -> Vec<(u64, u64, &[u8], u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = varint(b, &mut i);
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    let v = varint(b, &mut i);
                    out.push((field, wire, &b[0..0], v));
                }
                1 => {
                    out.push((field, wire, &b[i..i + 8], 0));
                    i += 8;
                }
                2 => {
                    let len = varint(b, &mut i) as usize;
                    out.push((field, wire, &b[i..i + len], 0));
                    i += len;
                }
                5 => {
                    out.push((field, wire, &b[i..i + 4], 0));
                    i += 4;
                }
                w => panic!("protobuf wire type {w}"),
            }
        }
        out
    }
    let mut pieces = Vec::new();
    let mut add_dummy_prefix = true;
    for (field, _, payload, _) in fields(bytes) {
        match field {
            1 => {
                let (mut text, mut score, mut ty) = (String::new(), 0.0f32, 1i32);
                for (f, _, p, v) in fields(payload) {
                    match f {
                        1 => text = String::from_utf8(p.to_vec()).unwrap(),
                        2 => score = f32::from_le_bytes(p.try_into().unwrap()),
                        3 => ty = v as i32,
                        _ => {}
                    }
                }
                pieces.push((text, score, ty));
            }
            3 => {
                for (f, _, _, v) in fields(payload) {
                    if f == 3 {
                        add_dummy_prefix = v != 0;
                    }
                }
            }
            _ => {}
        }
    }
    (pieces, add_dummy_prefix)
}

/// A SentencePiece vocabulary's `tokenizer.*` keys as llama.cpp's converter writes
/// them (SentencePiece's piece types are llama.cpp's token types).
fn sentencepiece_keys(model: &[u8]) -> (Vec<(String, Value)>, usize) {
    let (pieces, add_dummy_prefix) = parse_sentencepiece(model);
    let id_of = |t: &str| pieces.iter().position(|p| p.0 == t).map(|i| i as u32);
    let mut keys = vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(pieces.iter().map(|p| p.0.clone()).collect())),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(Array::F32(pieces.iter().map(|p| p.1).collect())),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(pieces.iter().map(|p| p.2).collect())),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(add_dummy_prefix),
        ),
    ];
    for (key, text) in [("bos", "<s>"), ("eos", "</s>"), ("unknown", "<unk>")] {
        if let Some(id) = id_of(text) {
            keys.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    (keys, pieces.len())
}

fn sentencepiece_family(member: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (keys, n_vocab) = sentencepiece_keys(&mistral_common_file(member));
    assert!(n_vocab >= 32000, "{member}: {n_vocab} pieces");
    let path = model_with_vocab(dir.path(), "spm", keys, n_vocab);
    check_family(&path, &["[INST]", "[/INST]", "▁", "  ", "\u{2581}x"]);
}

#[test]
fn mistral_sentencepiece_v1_matches_llama_cpp() {
    sentencepiece_family("mistral_common/data/tokenizer.model.v1");
}

#[test]
fn mistral_sentencepiece_v3_matches_llama_cpp() {
    sentencepiece_family("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3");
}

/// Standard base64 (tekken's `token_bytes`).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("base64 character {c}"),
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A tekken vocabulary (tiktoken ranks) as llama.cpp's converter writes it: 1,000
/// control tokens first, then the ranked byte tokens in GPT-2's byte-level alphabet,
/// with merges recovered from the ranks (each token is the merge of the two parts a
/// byte-pair encoding restricted to lower ranks leaves of it).
fn tekken_keys(json_bytes: &[u8]) -> (Vec<(String, Value)>, usize) {
    use crate::support::tiny_model::byte_to_unicode;
    use std::collections::HashMap;
    let doc: serde_json::Value = serde_json::from_slice(json_bytes).unwrap();
    let n_special = doc["config"]["default_num_special_tokens"]
        .as_u64()
        .unwrap() as usize;
    let n_total = doc["config"]["default_vocab_size"].as_u64().unwrap() as usize;
    let ranked: Vec<Vec<u8>> = doc["vocab"]
        .as_array()
        .unwrap()
        .iter()
        .take(n_total - n_special)
        .map(|v| base64_decode(v["token_bytes"].as_str().unwrap()))
        .collect();
    let rank: HashMap<&[u8], usize> = ranked
        .iter()
        .enumerate()
        .map(|(r, b)| (b.as_slice(), r))
        .collect();
    let show = |b: &[u8]| b.iter().map(|&x| byte_to_unicode(x)).collect::<String>();
    let mut merges = Vec::new();
    for (r, bytes) in ranked.iter().enumerate().filter(|(_, b)| b.len() > 1) {
        let mut parts: Vec<&[u8]> = (0..bytes.len()).map(|i| &bytes[i..=i]).collect();
        while parts.len() > 2 {
            let best = (0..parts.len() - 1)
                .filter_map(|i| {
                    let joined = &bytes
                        [offset(bytes, parts[i])..offset(bytes, parts[i + 1]) + parts[i + 1].len()];
                    rank.get(joined).filter(|&&jr| jr < r).map(|&jr| (jr, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let start = offset(bytes, parts[i]);
            let end = offset(bytes, parts[i + 1]) + parts[i + 1].len();
            parts[i] = &bytes[start..end];
            parts.remove(i + 1);
        }
        if parts.len() == 2 {
            merges.push(format!("{} {}", show(parts[0]), show(parts[1])));
        }
    }
    let named = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"];
    let mut tokens: Vec<String> = (0..n_special)
        .map(|i| {
            named
                .get(i)
                .map_or(format!("<SPECIAL_{i}>"), |s| s.to_string())
        })
        .collect();
    tokens.extend(ranked.iter().map(|b| show(b)));
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if i < n_special { 3 } else { 1 })
        .collect();
    let n = tokens.len();
    let keys = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("tekken".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(merges)),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ];
    (keys, n)
}

/// Where `part` (a subslice of `whole`) starts in it.
fn offset(whole: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

#[test]
fn mistral_tekken_vocabulary_matches_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, n_vocab) = tekken_keys(&mistral_common_file(
        "mistral_common/data/tekken_240718.json",
    ));
    assert_eq!(n_vocab, 131072);
    let path = model_with_vocab(dir.path(), "tekken", keys, n_vocab);
    check_family(
        &path,
        &["[INST]", "[/INST]", "CamelCase", "HTTPServer", "É"],
    );
    // The recovered merges do merge: ordinary English takes about a token a word.
    let ours = loader::load(&path).unwrap().tokenizer;
    let ids = ours
        .encode(
            "Hello world, this is a test of the tokenizer.",
            false,
            false,
        )
        .unwrap();
    assert!(ids.len() <= 12, "{} tokens: {ids:?}", ids.len());
}
