//! Tokenizer parity checks against llama.cpp's `llama_tokenize` and
//! `llama_token_to_piece`, shared by the default model's suite and the vocabulary
//! families' (SentencePiece, the BPE pre-tokenizers).

use kvsharer::oracle::LlamaCppModel;
use kvsharer::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// Pieces chosen to stress pre-tokenization: digits (also non-ASCII numerals),
// contractions in both cases, whitespace runs and exotic spaces, punctuation,
// accents and combining marks, CJK, emoji (multi-token UTF-8), control and
// unassigned code points, special markup.
pub const ATOMS: &[&str] = &[
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "a",
    "the",
    "The",
    "ing",
    "'s",
    "'ll",
    "'",
    "0",
    "7",
    "42",
    "3.14",
    ",",
    ".",
    "!?",
    "(",
    ")",
    "{",
    "}",
    "_",
    "-",
    "é",
    "ü",
    "ß",
    "日本",
    "中",
    "한",
    "😀",
    "👍🏽",
    "\u{a0}",
    "Ω",
    "—",
    "<|im_end|>",
    "<|im_start|>",
    "<",
    "|",
    ">",
    "x",
    "Q",
    "über",
    "naïve",
    "\\",
    "\"",
    "#",
    "$5",
    "\u{85}",
    "\u{301}",
    "e\u{301}",
    "\u{1}",
    "\u{7f}",
    "\u{e000}",
    "\u{10ffff}",
    "\u{2028}",
    "\u{3000}",
    "１２３",
    "٣",
    "Ⅻ",
    "½",
    "²",
    "\u{fe0f}",
    "❤️",
    "ǅ",
    "ʰ",
    "\u{a0}\u{a0}",
    "   ",
    "\n\n",
    " \n",
    "\u{b}",
    "\u{c}",
    "\u{1680}",
    "\u{202f}",
    "'S",
    "'T",
    "'re",
    "'D",
];

/// Our ids equal llama.cpp's for `text`; returns how many.
pub fn same_ids(
    ours: &Tokenizer,
    llama: &LlamaCppModel,
    text: &str,
    add_special: bool,
    parse_special: bool,
) -> usize {
    let mine = ours.encode(text, add_special, parse_special).unwrap();
    let theirs = llama.tokenize(text, add_special, parse_special).unwrap();
    assert_eq!(
        mine, theirs,
        "ids differ for {text:?} (add_special={add_special}, parse_special={parse_special})"
    );
    mine.len()
}

/// `n` random strings of 1-15 atoms (`ATOMS` plus `extra`), each with and without
/// special-token parsing.
pub fn random_texts_match(ours: &Tokenizer, llama: &LlamaCppModel, extra: &[&str], n: usize) {
    let atoms: Vec<&str> = ATOMS.iter().chain(extra).copied().collect();
    let mut rng = StdRng::seed_from_u64(0x6b76_7368);
    for _ in 0..n {
        let k = rng.random_range(1..16);
        let text: String = (0..k)
            .map(|_| atoms[rng.random_range(0..atoms.len())])
            .collect();
        for parse_special in [false, true] {
            same_ids(ours, llama, &text, false, parse_special);
        }
    }
}

/// Every token's piece equals llama.cpp's, and the special ids and end-of-generation
/// set agree.
pub fn pieces_and_specials_match(ours: &Tokenizer, llama: &LlamaCppModel) {
    assert_eq!(ours.n_vocab(), llama.n_vocab());
    for id in 0..ours.n_vocab() as u32 {
        assert_eq!(
            ours.decode_piece(id),
            llama.token_to_piece(id, false),
            "piece of token {id} ({:?})",
            ours.token_text(id)
        );
    }
    assert_eq!(ours.bos(), llama.bos());
    assert_eq!(ours.eos(), llama.eos());
    assert_eq!(ours.add_bos(), llama.add_bos());
    assert_eq!(ours.add_eos(), llama.add_eos());
    let eog = |is: &dyn Fn(u32) -> bool| {
        (0..ours.n_vocab() as u32)
            .filter(|&i| is(i))
            .collect::<Vec<_>>()
    };
    assert_eq!(eog(&|i| ours.is_eog(i)), eog(&|i| llama.is_eog(i)));
}
