//! Our tokenizer against llama.cpp's on the real default model: same ids for the
//! same text, same bytes per token, same end-of-generation set.
//!
//! The tokenizer is built from metadata read by ggml's own GGUF reader
//! (`oracle::tokenizer_spec_via_ggml`), so this test does not depend on the crate's
//! GGUF module.

use std::sync::OnceLock;

use kvsharer::oracle::{tokenizer_spec_via_ggml, LlamaCppModel};
use kvsharer::tokenizer::{StreamDecoder, Tokenizer};

use crate::support;

struct Fixture {
    ours: Tokenizer,
    llama: LlamaCppModel,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = support::default_model_path();
        let spec = tokenizer_spec_via_ggml(&path)
            .unwrap_or_else(|e| panic!("{e} (model {}; set KVSHARER_TEST_MODEL)", path.display()));
        Fixture {
            ours: Tokenizer::from_spec(spec).expect("tokenizer builds from the GGUF metadata"),
            llama: LlamaCppModel::load(&path).expect("llama.cpp loads the model"),
        }
    })
}

const LONG_PARAGRAPH: &str = "It was the best of times, it was the worst of times, it was \
the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the \
epoch of incredulity, it was the season of Light, it was the season of Darkness, it was the \
spring of hope, it was the winter of despair. We had everything before us, we had nothing \
before us; in short, the period was so far like the present period (circa 1775), that some \
of its noisiest authorities insisted on its being received, for good or for evil, in the \
superlative degree of comparison only. There were 2 kings and 2 queens, and 12,345.67 \
pounds went missing on 1775-11-23 at 10:45pm!";

/// Texts without special-token markup: they must round-trip through decode.
fn plain_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "",
        "Hello",
        "Hello, world!",
        " leading space",
        "trailing space ",
        "  two leading spaces",
        "multiple   spaces   between   words",
        "tabs\tand\t\tdouble tabs",
        "\n\n\n",
        "line one\nline two\n\nline four",
        "\r\nwindows line endings\r\n",
        "1234567",
        "3.14159",
        "The year 2024 had 366 days; 1,000,000 people and 0.5% growth.",
        "café naïve résumé Zürich",
        "Ünïcödé ÀÉÎÕÜ ß ñ ç",
        "日本語のテキストです。",
        "中文测试，包括标点。",
        "한국어 문장입니다",
        "Привет, мир!",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "Emoji: 😀🎉👍🏽 and flags 🇫🇷🇯🇵",
        "Greek αβγ δε — “curly quotes” ‘single’ … ellipsis",
        "fn main() {\n    println!(\"Hello {}\", 42);\n}\n",
        "def f(x):\n\treturn x ** 2  # square\n",
        "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
        "I'm sure you've seen what they'll do, didn't you? It's John's. We'd go, they're here.",
        "CAPS LOCK AND camelCase and snake_case_names and SCREAMING_SNAKE",
        "    indented code block",
        "trailing newline\n",
        "  \t \n  mixed whitespace  \n",
        "URL: https://example.com/path?query=1&b=2#frag",
        "email@example.com, +1 (555) 123-4567",
        "\u{a0}non-breaking\u{a0}space and zero\u{200b}width",
        "<|im_start",
        "a < b > c <| |> <tag>",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    texts.push(LONG_PARAGRAPH.to_owned());
    texts.push("ab".repeat(300));
    texts
}

/// Texts containing the model's special-token markup.
fn special_texts() -> Vec<String> {
    [
        "<|im_start|>user\nhi<|im_end|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>assistant\n",
        "text <|endoftext|> more text",
        "<|im_end|><|im_end|>",
        "<reponame>my/repo<filename>src/main.rs<file_sep>",
        "no space<|im_start|>",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn assert_same_ids(text: &str, add_special: bool, parse_special: bool) -> usize {
    let f = fixture();
    let ours = f.ours.encode(text, add_special, parse_special).unwrap();
    let theirs = f.llama.tokenize(text, add_special, parse_special).unwrap();
    assert_eq!(
        ours, theirs,
        "ids differ for {text:?} (add_special={add_special}, parse_special={parse_special})"
    );
    ours.len()
}

#[test]
fn ids_match_llama_cpp_on_varied_texts() {
    let texts: Vec<String> = plain_texts().into_iter().chain(special_texts()).collect();
    assert!(texts.len() >= 30);
    let mut compared = 0;
    for text in &texts {
        for add_special in [false, true] {
            for parse_special in [false, true] {
                compared += assert_same_ids(text, add_special, parse_special);
            }
        }
    }
    assert!(compared > 1000, "only {compared} ids compared");
}

#[test]
fn special_markup_becomes_single_tokens_only_when_parsed() {
    let f = fixture();
    let text = "<|im_start|>user\nhi<|im_end|>";
    let parsed = f.ours.encode(text, false, true).unwrap();
    let im_start = parsed[0];
    let im_end = *parsed.last().unwrap();
    assert_eq!(f.ours.token_text(im_start), Some("<|im_start|>"));
    assert_eq!(f.ours.token_text(im_end), Some("<|im_end|>"));
    assert!(f.ours.is_eog(im_end));
    let as_text = f.ours.encode(text, false, false).unwrap();
    assert!(!as_text.contains(&im_start) && !as_text.contains(&im_end));
    assert!(as_text.len() > parsed.len());
}

#[test]
fn random_texts_match_llama_cpp() {
    let f = fixture();
    support::tokenizer_check::random_texts_match(&f.ours, &f.llama, &[], 2000);
}

#[test]
fn decode_inverts_encode() {
    let f = fixture();
    for text in plain_texts() {
        for parse_special in [false, true] {
            let ids = f.ours.encode(&text, true, parse_special).unwrap();
            assert_eq!(f.ours.decode(&ids), text, "round trip of {text:?}");
        }
    }
    // Markup encoded as plain text decodes back to itself as well.
    for text in special_texts() {
        let ids = f.ours.encode(&text, false, false).unwrap();
        assert_eq!(f.ours.decode(&ids), text, "round trip of {text:?}");
    }
}

#[test]
fn streaming_decode_equals_whole_decode() {
    let f = fixture();
    for text in plain_texts() {
        let ids = f.ours.encode(&text, false, false).unwrap();
        let mut stream = StreamDecoder::new();
        let mut streamed = String::new();
        for &id in &ids {
            let out = stream.push(&f.ours, id);
            assert!(
                !out.contains('\u{FFFD}'),
                "partial UTF-8 leaked for {text:?}"
            );
            streamed.push_str(&out);
        }
        streamed.push_str(&stream.flush());
        assert_eq!(streamed, text);
    }
}

#[test]
fn every_token_and_special_id_match_llama_cpp() {
    let f = fixture();
    support::tokenizer_check::pieces_and_specials_match(&f.ours, &f.llama);
    assert!((0..f.ours.n_vocab() as u32).any(|id| f.ours.is_eog(id)));
}
