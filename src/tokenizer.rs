//! Text <-> token ids for GGUF models, built from the tokenizer metadata in the file
//! and matching llama.cpp's `llama_tokenize` / `llama_token_to_piece` id for id.
//!
//! The vocabulary becomes a `tokenizers::Tokenizer` (BPE model, pre-tokenizer,
//! normalizer) that encodes plain text. Two llama.cpp behaviours sit around it,
//! because the `tokenizers` crate does them differently:
//! - special tokens (control, user-defined, unknown) are cut out of the text first,
//!   longest token first, exactly as llama.cpp's `tokenizer_st_partition` does; the
//!   `tokenizers` added-vocabulary matcher is leftmost-longest instead;
//! - decoding uses a per-token byte table that reproduces `llama_token_to_piece`
//!   (control tokens render as nothing, byte tokens as raw bytes), so streaming can
//!   hand out partial UTF-8 sequences correctly.
//!
//! Supported: `tokenizer.ggml.model` = `gpt2` (byte-level BPE with the pre-tokenizer
//! regexes llama.cpp uses for the `tokenizer.ggml.pre` families listed in
//! [`PRE_TOKENIZER_FAMILIES`]) and `llama` (SentencePiece BPE driven by token scores).

use std::collections::{HashMap, HashSet};

use tokenizers::models::bpe::{BpeBuilder, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Tokenizer metadata as stored in a GGUF file (`tokenizer.ggml.*` keys); `None`
/// means the key is absent, and llama.cpp's default for it applies.
#[derive(Clone, Debug, Default)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Option<Vec<i32>>,
    pub scores: Option<Vec<f32>>,
    /// gpt2 merges, "left right" in the byte-level alphabet, highest priority first.
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub eom_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer.ggml.tokens is empty")]
    EmptyVocab,
    #[error("unsupported tokenizer.ggml.model {0:?} (supported: \"gpt2\", \"llama\")")]
    UnsupportedModel(String),
    #[error("unsupported tokenizer.ggml.pre {0:?} for a gpt2 tokenizer")]
    UnsupportedPreTokenizer(String),
    #[error("tokenizer.ggml.merges is missing; a gpt2 tokenizer needs it")]
    MissingMerges,
    #[error("{key} has {got} entries but the vocabulary has {want} tokens")]
    LengthMismatch {
        key: &'static str,
        got: usize,
        want: usize,
    },
    #[error("token text {text:?} appears twice (ids {first} and {second})")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    #[error("cannot add the {0} token: the model asks for it but defines no id")]
    MissingSpecialToken(&'static str),
    #[error("building the tokenizers pipeline failed: {0}")]
    Build(String),
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// `tokenizer.ggml.pre` values accepted for gpt2 tokenizers, by regex family. An
/// absent key means "default", as in llama.cpp.
pub const PRE_TOKENIZER_FAMILIES: &[(&str, &[&str])] = &[
    ("default", &["default"]),
    (
        "gpt2",
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
            "trillion",
            "granite-docling",
        ],
    ),
    (
        "llama3",
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ],
    ),
    (
        "smollm",
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
    ),
    (
        "qwen2",
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
        ],
    ),
    ("tekken", &["tekken"]),
];

// The regexes below are the ones llama.cpp's llm_tokenizer_bpe applies, in order,
// each splitting the pieces the previous one produced.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Mistral's tekken, as llama.cpp rewrites it for its regex engine: "a letter
// that is not a-z" stands for the upper-case classes of the original.
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one gpt2 pre-tokenizer family behaves.
struct PreTokenizerRules {
    regexes: &'static [&'static str],
    /// A whole pre-token that is itself in the vocabulary is emitted without merging.
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when the GGUF key is absent.
    add_bos_default: bool,
}

fn pre_tokenizer_rules(pre: Option<&str>) -> Result<PreTokenizerRules, TokenizerError> {
    const DEFAULT: &[&str] = &[
        r"[\p{P}\$\+<=>\^~\|]+",
        GPT2_REGEX,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ];
    let family = match pre {
        None => "default",
        Some(name) => PRE_TOKENIZER_FAMILIES
            .iter()
            .find(|(_, names)| names.contains(&name))
            .map(|(family, _)| *family)
            .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(name.to_owned()))?,
    };
    let rules = |regexes, ignore_merges, add_bos_default| PreTokenizerRules {
        regexes,
        ignore_merges,
        add_bos_default,
    };
    Ok(match family {
        "default" => rules(DEFAULT, false, false),
        "gpt2" => rules(&[GPT2_REGEX], false, false),
        "llama3" => {
            // dbrx and smaug share the llama3 regex but not its flags.
            let llama3_proper = !matches!(pre, Some("dbrx" | "smaug-bpe"));
            rules(&[LLAMA3_REGEX], llama3_proper, llama3_proper)
        }
        "smollm" => rules(&[r"\p{N}", GPT2_REGEX], false, false),
        "tekken" => rules(&[TEKKEN_REGEX], true, true),
        _ => rules(&[QWEN2_REGEX], false, false),
    })
}

// llama.cpp token attribute bits (enum llama_token_attr).
const ATTR_UNDEFINED: u16 = 0;
const ATTR_UNKNOWN: u16 = 1 << 0;
const ATTR_UNUSED: u16 = 1 << 1;
const ATTR_NORMAL: u16 = 1 << 2;
const ATTR_CONTROL: u16 = 1 << 3;
const ATTR_USER_DEFINED: u16 = 1 << 4;
const ATTR_BYTE: u16 = 1 << 5;

fn attr_from_token_type(token_type: i32) -> u16 {
    match token_type {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => ATTR_UNDEFINED,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VocabKind {
    /// gpt2: byte-level BPE with merges.
    ByteLevelBpe,
    /// llama: SentencePiece, merges ranked by token score, byte fallback.
    SentencePiece,
}

/// GPT-2's reversible byte <-> printable char table: printable Latin-1 bytes stand
/// for themselves, the rest are shifted to U+0100 and up, in byte order.
fn byte_level_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_shifted = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let printable = matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            byte as u32
        } else {
            next_shifted += 1;
            next_shifted - 1
        };
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// The hex byte of an SPM byte token `<0xNN>`.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A GGUF vocabulary turned into an encoder/decoder matching llama.cpp.
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    kind: VocabKind,
    tokens: Vec<String>,
    attrs: Vec<u16>,
    /// Control, user-defined and unknown tokens, longest text first: the order in
    /// which they are cut out of the input.
    special_cut_order: Vec<u32>,
    /// `llama_token_to_piece(special = false)` for every id.
    pieces: Vec<Vec<u8>>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: HashSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Token texts llama.cpp recognises as end-of-turn when no eot id is given.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Token texts llama.cpp always treats as end-of-generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// Control tokens of gpt-oss that llama.cpp renders as text.
const ALWAYS_RENDERED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// llama.cpp's vocabulary state after `llama_vocab::impl::load`: attributes with its
/// text-based overrides, special ids and the end-of-generation set.
struct LoadedVocab {
    attrs: Vec<u16>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: HashSet<u32>,
}

fn load_vocab_like_llama_cpp(
    spec: &TokenizerSpec,
    tokens: &[String],
    token_to_id: &HashMap<&str, u32>,
    kind: VocabKind,
) -> LoadedVocab {
    let n = tokens.len();
    let mut attrs: Vec<u16> = match &spec.token_types {
        Some(types) => types
            .iter()
            .take(n)
            .map(|&t| attr_from_token_type(t))
            .collect(),
        None => vec![ATTR_NORMAL; n],
    };
    let in_range = |id: u32| (id as usize) < n;
    // Defaults per model type; a GGUF value replaces them only if it is in range.
    let (bos_default, eos_default) = match kind {
        VocabKind::SentencePiece => (Some(1), Some(2)),
        VocabKind::ByteLevelBpe => (Some(11), Some(11)),
    };
    let pick = |given: Option<u32>, default: Option<u32>| {
        given
            .filter(|&id| in_range(id))
            .or(default.filter(|&id| in_range(id)))
    };
    let bos = pick(spec.bos_id, bos_default);
    let eos = pick(spec.eos_id, eos_default);
    let mut eot = pick(spec.eot_id, None);
    let mut eom = pick(spec.eom_id, None);

    // Text-based detection, which also forces the control attribute. llama.cpp
    // walks a hash map, so among several candidates its choice is arbitrary; the
    // lowest id is taken here. For EOT/EOM that cannot change the end-of-generation
    // set (every candidate is in EOG_TEXTS); for the FIM pad/repo/sep slots it
    // could, in a vocabulary holding two candidates for one slot.
    let detect = |slot: &mut Option<u32>, texts: &[&str], attrs: &mut Vec<u16>| {
        if slot.is_some() {
            return;
        }
        let found = texts
            .iter()
            .filter_map(|t| token_to_id.get(t).copied())
            .min();
        if let Some(id) = found {
            *slot = Some(id);
            attrs[id as usize] |= ATTR_CONTROL;
        }
    };
    let (mut fim_pre, mut fim_suf, mut fim_mid) = (None, None, None);
    let (mut fim_pad, mut fim_rep, mut fim_sep) = (None, None, None);
    detect(&mut eot, EOT_TEXTS, &mut attrs);
    detect(&mut eom, EOM_TEXTS, &mut attrs);
    detect(&mut fim_pre, FIM_PRE_TEXTS, &mut attrs);
    detect(&mut fim_suf, FIM_SUF_TEXTS, &mut attrs);
    detect(&mut fim_mid, FIM_MID_TEXTS, &mut attrs);
    detect(&mut fim_pad, FIM_PAD_TEXTS, &mut attrs);
    detect(&mut fim_rep, FIM_REP_TEXTS, &mut attrs);
    detect(&mut fim_sep, FIM_SEP_TEXTS, &mut attrs);

    let mut eog: HashSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
    for text in EOG_TEXTS {
        if let Some(&id) = token_to_id.get(text) {
            eog.insert(id);
            attrs[id as usize] |= ATTR_CONTROL;
        }
    }
    for text in ALWAYS_RENDERED_TEXTS {
        if let Some(&id) = token_to_id.get(text) {
            attrs[id as usize] = ATTR_USER_DEFINED;
        }
    }
    eog.extend([eos, eot, eom].into_iter().flatten());

    // gpt-oss / solar-open: "<|end|>" ends a message, not the generation.
    if let Some(end) = eog_token_with_text(&eog, tokens, "<|end|>") {
        let has = |text| eog_token_with_text(&eog, tokens, text).is_some();
        let has_call = has("<|call|>") || has("<|calls|>");
        if has_call && (has("<|return|>") || has("<|flush|>")) {
            eog.remove(&end);
            attrs[end as usize] = ATTR_USER_DEFINED;
        }
    }
    // gemma4 / plamo2: "</s>" is an ordinary token there.
    if let Some(s) = eog_token_with_text(&eog, tokens, "</s>") {
        let has = |text| eog_token_with_text(&eog, tokens, text).is_some();
        if has("<|tool_response>") || has("<|plamo:eos|>") {
            eog.remove(&s);
            attrs[s as usize] = ATTR_NORMAL;
        }
    }

    LoadedVocab {
        attrs,
        bos,
        eos,
        eog,
    }
}

fn eog_token_with_text(eog: &HashSet<u32>, tokens: &[String], text: &str) -> Option<u32> {
    eog.iter().copied().find(|&id| tokens[id as usize] == text)
}

/// What `llama_token_to_piece(special = false)` returns for one token.
fn piece_bytes(
    text: &str,
    attr: u16,
    kind: VocabKind,
    byte_of_char: &HashMap<char, u8>,
) -> Vec<u8> {
    if attr & (ATTR_UNKNOWN | ATTR_CONTROL) != 0 {
        return Vec::new();
    }
    if attr & ATTR_USER_DEFINED != 0 {
        return text.as_bytes().to_vec();
    }
    if attr & ATTR_NORMAL != 0 {
        return match kind {
            VocabKind::SentencePiece => text.replace('▁', " ").into_bytes(),
            VocabKind::ByteLevelBpe => {
                let mut out = Vec::with_capacity(text.len());
                for ch in text.chars() {
                    match byte_of_char.get(&ch) {
                        Some(&b) => out.push(b),
                        None => {
                            // llama.cpp's marker for a char outside the byte alphabet.
                            let mut utf8 = [0u8; 4];
                            out.extend_from_slice(b"[UNK_BYTE_0x");
                            for b in ch.encode_utf8(&mut utf8).bytes() {
                                out.extend_from_slice(format!("{b:02x}").as_bytes());
                            }
                            out.extend_from_slice(text.as_bytes());
                            out.push(b']');
                        }
                    }
                }
                out
            }
        };
    }
    if attr & ATTR_BYTE != 0 {
        return parse_byte_token(text).map(|b| vec![b]).unwrap_or_default();
    }
    Vec::new()
}

/// SentencePiece merges from scores: every way to split a token into two tokens is a
/// merge producing it, ranked by the produced token's score (higher first), as
/// llama.cpp's SPM tokenizer ranks bigrams.
fn score_ranked_merges(
    tokens: &[String],
    scores: &[f32],
    token_to_id: &HashMap<&str, u32>,
) -> Merges {
    let mut ranked: Vec<(f32, u32, usize)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        for (split, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(split);
            if token_to_id.contains_key(left) && token_to_id.contains_key(right) {
                ranked.push((scores.get(id).copied().unwrap_or(0.0), id as u32, split));
            }
        }
    }
    // Ties: lower id first, then the shorter left part. llama.cpp breaks score ties
    // by position in the text, which a rank table cannot express exactly; with
    // distinct scores the two agree (see `spm_matches_reference_on_random_vocabularies`).
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .map(|(_, id, split)| {
            let (left, right) = tokens[id as usize].split_at(split);
            (left.to_owned(), right.to_owned())
        })
        .collect()
}

/// gpt2 merges "left right" (split at the first space after the first byte, as
/// llama.cpp does), keeping the first occurrence and dropping merges whose parts
/// or result are not tokens (llama.cpp could never emit those either).
fn byte_level_merges(merges: &[String], token_to_id: &HashMap<&str, u32>) -> Merges {
    let mut seen = HashSet::new();
    let mut out = Merges::with_capacity(merges.len());
    for merge in merges {
        // Byte search: the first char may be multi-byte, and a space is always a
        // char boundary.
        let space = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
        let Some(space) = space else {
            continue;
        };
        let (left, right) = (&merge[..space], &merge[space + 1..]);
        let joined = format!("{left}{right}");
        let usable = token_to_id.contains_key(left)
            && token_to_id.contains_key(right)
            && token_to_id.contains_key(joined.as_str());
        if usable && seen.insert((left, right)) {
            out.push((left.to_owned(), right.to_owned()));
        }
    }
    out
}

fn build_error(err: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(err.to_string())
}

impl Tokenizer {
    pub fn from_spec(spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        let kind = match spec.model.as_str() {
            "gpt2" => VocabKind::ByteLevelBpe,
            "llama" => VocabKind::SentencePiece,
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };
        if spec.tokens.is_empty() {
            return Err(TokenizerError::EmptyVocab);
        }
        let n = spec.tokens.len();
        let check_len = |key: &'static str, got: Option<usize>| match got {
            Some(got) if got < n => Err(TokenizerError::LengthMismatch { key, got, want: n }),
            _ => Ok(()),
        };
        check_len(
            "tokenizer.ggml.token_type",
            spec.token_types.as_ref().map(Vec::len),
        )?;
        check_len("tokenizer.ggml.scores", spec.scores.as_ref().map(Vec::len))?;
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.tokens",
                got: n,
                want: u32::MAX as usize,
            });
        }

        // llama.cpp renames empty tokens so that every text is a distinct key.
        let tokens: Vec<String> = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.clone()
                }
            })
            .collect();
        let mut token_to_id: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (id, text) in tokens.iter().enumerate() {
            if let Some(first) = token_to_id.insert(text.as_str(), id as u32) {
                return Err(TokenizerError::DuplicateToken {
                    text: text.clone(),
                    first,
                    second: id as u32,
                });
            }
        }

        let rules = match kind {
            VocabKind::ByteLevelBpe => Some(pre_tokenizer_rules(spec.pre.as_deref())?),
            VocabKind::SentencePiece => None,
        };
        let loaded = load_vocab_like_llama_cpp(&spec, &tokens, &token_to_id, kind);
        let (add_bos_default, add_space_prefix_default) = match &rules {
            Some(rules) => (rules.add_bos_default, false),
            None => (true, true),
        };
        let add_bos = spec.add_bos.unwrap_or(add_bos_default);
        let add_eos = spec.add_eos.unwrap_or(false);
        let add_space_prefix = spec.add_space_prefix.unwrap_or(add_space_prefix_default);

        let hf = build_hf_tokenizer(
            &spec,
            &tokens,
            &token_to_id,
            &loaded.attrs,
            kind,
            rules.as_ref(),
            add_space_prefix,
        )?;

        let byte_of_char: HashMap<char, u8> = byte_level_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let pieces = tokens
            .iter()
            .zip(&loaded.attrs)
            .map(|(text, &attr)| piece_bytes(text, attr, kind, &byte_of_char))
            .collect();
        let mut special_cut_order: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                loaded.attrs[id as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        special_cut_order.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));

        Ok(Tokenizer {
            hf,
            kind,
            tokens,
            attrs: loaded.attrs,
            special_cut_order,
            pieces,
            bos: loaded.bos,
            eos: loaded.eos,
            eog: loaded.eog,
            add_bos,
            add_eos,
            add_space_prefix,
        })
    }

    /// Text to ids. `add_special` adds BOS/EOS as the model's `add_bos`/`add_eos`
    /// say (llama.cpp's defaults when the keys are absent); `parse_special` lets
    /// control tokens written in the text become single tokens. User-defined tokens
    /// are always matched, as in llama.cpp.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            ids.push(self.bos.ok_or(TokenizerError::MissingSpecialToken("BOS"))?);
        }
        for fragment in self.cut_special_tokens(text, parse_special) {
            match fragment {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(piece) => {
                    let encoding = self
                        .hf
                        .encode_fast(piece, false)
                        .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                    ids.extend_from_slice(encoding.get_ids());
                }
            }
        }
        if add_special && self.add_eos {
            ids.push(self.eos.ok_or(TokenizerError::MissingSpecialToken("EOS"))?);
        }
        Ok(ids)
    }

    /// Splits `text` around special tokens the way llama.cpp's
    /// `tokenizer_st_partition` does: for each special token, longest first, every
    /// occurrence in the remaining text pieces becomes a token.
    fn cut_special_tokens<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = if text.is_empty() {
            Vec::new()
        } else {
            vec![Fragment::Text(text)]
        };
        for &id in &self.special_cut_order {
            if !parse_special && self.attrs[id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let present = fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)));
            if !present {
                continue;
            }
            let mut cut = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    cut.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(needle) {
                    if at > 0 {
                        cut.push(Fragment::Text(&rest[..at]));
                    }
                    cut.push(Fragment::Token(id));
                    rest = &rest[at + needle.len()..];
                }
                if !rest.is_empty() {
                    cut.push(Fragment::Text(rest));
                }
            }
            fragments = cut;
        }
        fragments
    }

    /// Bytes of one token as `llama_token_to_piece(special = false)` gives them:
    /// control tokens render as nothing; unknown ids as nothing.
    pub fn decode_piece(&self, id: u32) -> Vec<u8> {
        self.pieces.get(id as usize).cloned().unwrap_or_default()
    }

    fn piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether decoding drops one leading space from the first text: SentencePiece
    /// encoding with `add_space_prefix` put it there.
    fn strips_leading_space(&self) -> bool {
        self.kind == VocabKind::SentencePiece && self.add_space_prefix
    }

    /// Ids to text (invalid UTF-8 replaced by U+FFFD). Control tokens render as
    /// nothing; for SentencePiece models the space the encoder prefixed is removed.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut decoder = StreamDecoder::new();
        let mut text: String = ids.iter().map(|&id| decoder.push(self, id)).collect();
        text.push_str(&decoder.flush());
        text
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether generation should stop at `id`: EOS, EOT, EOM and the tokens
    /// llama.cpp recognises by text (e.g. "<|im_end|>", "<|endoftext|>").
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// The token's text as stored in the GGUF vocabulary (byte-level alphabet for
    /// gpt2, "▁" for spaces in SentencePiece).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
}

fn build_hf_tokenizer(
    spec: &TokenizerSpec,
    tokens: &[String],
    token_to_id: &HashMap<&str, u32>,
    attrs: &[u16],
    kind: VocabKind,
    rules: Option<&PreTokenizerRules>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let (merges, byte_fallback) = match kind {
        VocabKind::ByteLevelBpe => {
            let merges = spec
                .merges
                .as_deref()
                .ok_or(TokenizerError::MissingMerges)?;
            (byte_level_merges(merges, token_to_id), false)
        }
        VocabKind::SentencePiece => {
            let no_scores = vec![0.0; tokens.len()];
            let scores = spec.scores.as_deref().unwrap_or(&no_scores);
            (score_ranked_merges(tokens, scores, token_to_id), true)
        }
    };
    let mut builder = BpeBuilder::new()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(byte_fallback)
        .ignore_merges(rules.is_some_and(|r| r.ignore_merges));
    if kind == VocabKind::SentencePiece {
        if let Some(unk) = spec
            .unk_id
            .or(Some(0))
            .and_then(|id| tokens.get(id as usize))
        {
            builder = builder.unk_token(unk.clone());
        }
    }
    let bpe = builder.build().map_err(build_error)?;
    let mut hf = tokenizers::Tokenizer::new(bpe);

    match rules {
        Some(rules) => {
            let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(rules.regexes.len() + 1);
            for regex in rules.regexes {
                let split = Split::new(
                    SplitPattern::Regex((*regex).to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(build_error)?;
                steps.push(split.into());
            }
            steps.push(ByteLevel::new(false, false, false).into());
            hf.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
        }
        None => {
            let mut steps: Vec<NormalizerWrapper> = Vec::with_capacity(2);
            if add_space_prefix {
                steps.push(Prepend::new("▁".to_owned()).into());
            }
            steps.push(Replace::new(" ", "▁").map_err(build_error)?.into());
            hf.with_normalizer(Some(NormalizerSequence::new(steps)))
                .map_err(build_error)?;
        }
    }

    // Registered so the pipeline knows its special tokens, but never matched by it:
    // `cut_special_tokens` has removed them before text reaches `tokenizers`.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(attrs)
        .filter(|(_, &attr)| attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
        .map(|(text, &attr)| {
            AddedToken::from(text.clone(), attr & ATTR_USER_DEFINED == 0).normalized(false)
        })
        .collect();
    hf.add_special_tokens(added).map_err(build_error)?;
    hf.set_encode_special_tokens(true);
    Ok(hf)
}

/// Turns a stream of ids into text, holding back bytes until they form complete
/// UTF-8 characters (a character may span several byte tokens).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    seen_text: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that is now complete (often empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        let mut piece = tok.piece(id);
        if piece.is_empty() {
            return String::new();
        }
        if !self.seen_text {
            self.seen_text = true;
            if tok.strips_leading_space() {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
        }
        self.pending.extend_from_slice(piece);
        self.take_complete()
    }

    /// Everything still held, with incomplete sequences replaced by U+FFFD.
    pub fn flush(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(valid) => {
                    out.push_str(valid);
                    start = self.pending.len();
                    break;
                }
                Err(err) => {
                    let valid_end = start + err.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid_end]));
                    match err.error_len() {
                        // Bytes that can never become valid: replace and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid_end + bad;
                        }
                        // An unfinished character at the end: keep it for later.
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece vocabulary small enough to tokenize by hand: <unk>, <s>,
    /// </s>, the 256 byte tokens (ids 3..=258) and a few scored pieces.
    fn tiny_spm() -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces: &[(&str, f32)] = &[
            ("▁", -1.0),       // 259
            ("h", -2.0),       // 260
            ("e", -3.0),       // 261
            ("l", -4.0),       // 262
            ("o", -5.0),       // 263
            ("w", -6.0),       // 264
            ("r", -7.0),       // 265
            ("d", -8.0),       // 266
            ("▁h", -20.0),     // 267
            ("ll", -10.0),     // 268
            ("he", -11.0),     // 269
            ("llo", -12.0),    // 270
            ("▁he", -13.0),    // 271
            ("▁hello", -14.0), // 272
            ("or", -15.0),     // 273
            ("▁w", -16.0),     // 274
            ("ld", -17.0),     // 275
            ("▁wor", -30.0),   // 276
        ];
        for (text, score) in pieces {
            tokens.push((*text).to_owned());
            types.push(1);
            scores.push(*score);
        }
        Tokenizer::from_spec(TokenizerSpec {
            model: "llama".into(),
            tokens,
            token_types: Some(types),
            scores: Some(scores),
            ..TokenizerSpec::default()
        })
        .expect("tiny SPM vocabulary builds")
    }

    #[test]
    fn spm_merges_by_score_like_llama_cpp() {
        let tok = tiny_spm();
        // "▁hello▁world": ll, he, llo, ▁he, ▁hello, or, ▁w, ld, ▁wor in score order;
        // "▁h" is stale by the time its turn comes.
        assert_eq!(
            tok.encode("hello world", false, false).unwrap(),
            vec![272, 276, 275]
        );
        // BOS is added by default for llama vocabularies.
        assert_eq!(
            tok.encode("hello world", true, false).unwrap(),
            vec![1, 272, 276, 275]
        );
        assert_eq!(tok.decode(&[1, 272, 276, 275]), "hello world");
    }

    #[test]
    fn spm_falls_back_to_bytes() {
        let tok = tiny_spm();
        // "i" and "€" (E2 82 AC) are not pieces: byte tokens are 3 + byte value.
        assert_eq!(
            tok.encode("hi€", false, false).unwrap(),
            vec![267, 3 + 0x69, 3 + 0xE2, 3 + 0x82, 3 + 0xAC]
        );
        assert_eq!(
            tok.decode(&[267, 3 + 0x69, 3 + 0xE2, 3 + 0x82, 3 + 0xAC]),
            "hi€"
        );
    }

    #[test]
    fn spm_special_tokens_only_when_parsed() {
        let tok = tiny_spm();
        // The text after a special token gets its own "▁" prefix.
        assert_eq!(tok.encode("<s>hello", false, true).unwrap(), vec![1, 272]);
        // As text: "▁<s>hello" -> ▁, bytes of "<s>", then "he" + "llo" (no "▁" next
        // to "h", so "▁he" cannot form).
        assert_eq!(
            tok.encode("<s>hello", false, false).unwrap(),
            vec![
                259,
                3 + b'<' as u32,
                3 + b's' as u32,
                3 + b'>' as u32,
                269,
                270
            ]
        );
        assert!(tok.is_eog(2));
        assert!(!tok.is_eog(1));
        assert!(
            tok.decode_piece(1).is_empty(),
            "control tokens render as nothing"
        );
        assert_eq!(tok.decode_piece(3 + 0x41), b"A");
    }

    #[test]
    fn stream_decoder_holds_partial_utf8() {
        let tok = tiny_spm();
        let mut stream = StreamDecoder::new();
        assert_eq!(stream.push(&tok, 267), "h", "leading space dropped");
        assert_eq!(stream.push(&tok, 3 + 0xE2), "");
        assert_eq!(stream.push(&tok, 3 + 0x82), "");
        assert_eq!(stream.push(&tok, 3 + 0xAC), "€");
        assert_eq!(stream.push(&tok, 3 + 0xE2), "");
        assert_eq!(
            stream.push(&tok, 3 + 0x41),
            "\u{FFFD}A",
            "broken sequence replaced"
        );
        assert_eq!(stream.push(&tok, 3 + 0xF0), "");
        assert_eq!(stream.flush(), "\u{FFFD}");
        assert_eq!(stream.flush(), "");
    }

    #[test]
    fn rejects_unknown_model_and_pre_tokenizer() {
        let spec = |model: &str, pre: Option<&str>| TokenizerSpec {
            model: model.into(),
            pre: pre.map(str::to_owned),
            tokens: vec!["a".into(), "b".into()],
            merges: Some(vec![]),
            ..TokenizerSpec::default()
        };
        let err = Tokenizer::from_spec(spec("bert", None)).err().unwrap();
        assert!(err.to_string().contains("\"bert\""), "{err}");
        let err = Tokenizer::from_spec(spec("gpt2", Some("no-such-pre")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("\"no-such-pre\""), "{err}");
        let mut dup = spec("gpt2", None);
        dup.tokens = vec!["a".into(), "a".into()];
        let err = Tokenizer::from_spec(dup).err().unwrap();
        assert!(matches!(
            err,
            TokenizerError::DuplicateToken {
                first: 0,
                second: 1,
                ..
            }
        ));
    }

    /// Byte-level vocabulary: ids 0..=255 are the byte chars (id = byte value), then
    /// "Ġt" 256, "he" 257, "Ġthe" 258, "12" 259, "123" 260, "xyz" 261 (reachable by
    /// no merge) and "<|endoftext|>" 262 (control).
    fn tiny_gpt2(pre: Option<&str>) -> Tokenizer {
        let mut tokens: Vec<String> = byte_level_chars().iter().map(|c| c.to_string()).collect();
        let mut types = vec![1; 256];
        for text in ["Ġt", "he", "Ġthe", "12", "123", "xyz"] {
            tokens.push(text.to_owned());
            types.push(1);
        }
        tokens.push("<|endoftext|>".to_owned());
        types.push(3);
        let merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "no such"];
        Tokenizer::from_spec(TokenizerSpec {
            model: "gpt2".into(),
            pre: pre.map(str::to_owned),
            tokens,
            token_types: Some(types),
            merges: Some(merges.iter().map(|m| (*m).to_owned()).collect()),
            ..TokenizerSpec::default()
        })
        .expect("tiny gpt2 vocabulary builds")
    }

    #[test]
    fn byte_level_bpe_follows_the_pre_tokenizer_family() {
        let smollm = tiny_gpt2(Some("smollm"));
        // " the " -> " the" + " "; digits one by one, so "12"/"123" never form.
        assert_eq!(
            smollm.encode(" the 12", false, false).unwrap(),
            vec![258, 32, 49, 50]
        );
        assert_eq!(
            smollm.encode("12345", false, false).unwrap(),
            vec![49, 50, 51, 52, 53]
        );
        assert_eq!(
            smollm.encode("xyz", false, false).unwrap(),
            vec![120, 121, 122]
        );
        assert_eq!(smollm.decode(&[258, 32, 49, 50]), " the 12");

        let llama3 = tiny_gpt2(Some("llama-bpe"));
        // Digits in groups of three; a whole pre-token in the vocab skips merging.
        assert_eq!(
            llama3.encode("12345", false, false).unwrap(),
            vec![260, 52, 53]
        );
        assert_eq!(llama3.encode("xyz", false, false).unwrap(), vec![261]);

        let gpt2 = tiny_gpt2(Some("gpt-2"));
        assert_eq!(
            gpt2.encode("12345", false, false).unwrap(),
            vec![260, 52, 53]
        );
        assert_eq!(
            gpt2.encode("xyz", false, false).unwrap(),
            vec![120, 121, 122]
        );
    }

    #[test]
    fn byte_level_bpe_special_token_defaults_follow_llama_cpp() {
        // Without bos/eos keys llama.cpp uses id 11 for both, and adds BOS by
        // default only for the llama3 family.
        let smollm = tiny_gpt2(Some("smollm"));
        assert_eq!((smollm.bos(), smollm.eos()), (Some(11), Some(11)));
        assert_eq!(smollm.encode("he", true, false).unwrap(), vec![257]);
        assert!(smollm.is_eog(11));
        let llama3 = tiny_gpt2(Some("llama-bpe"));
        assert_eq!(llama3.encode("he", true, false).unwrap(), vec![11, 257]);

        // "<|endoftext|>" is end-of-generation and a single token only when parsed.
        assert!(smollm.is_eog(262));
        assert_eq!(
            smollm.encode("<|endoftext|>", false, true).unwrap(),
            vec![262]
        );
        assert_eq!(
            smollm.encode("<|endoftext|>", false, false).unwrap().len(),
            13
        );
        assert!(smollm.decode_piece(262).is_empty());
    }

    #[test]
    fn merges_split_at_the_first_space_after_the_first_byte() {
        let tokens = ["Ġ", "t", "Ġt", " ", "x", " x"];
        let to_id: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, i as u32))
            .collect();
        let merges: Vec<String> = ["Ġ t", "  x", "Ġ t", "Ġ q"]
            .iter()
            .map(|m| (*m).to_owned())
            .collect();
        // Duplicates keep the first rank; merges naming non-tokens are dropped; a
        // merge may start with a space ("  x" is " " + "x").
        assert_eq!(
            byte_level_merges(&merges, &to_id),
            vec![
                ("Ġ".to_owned(), "t".to_owned()),
                (" ".to_owned(), "x".to_owned())
            ]
        );
    }

    /// llama.cpp's SPM session, transcribed as directly as possible: merge the
    /// adjacent pair forming the best-scored token (ties: leftmost), repeat.
    fn reference_spm(text: &str, tokens: &[String], scores: &[f32]) -> Vec<u32> {
        let to_id: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let mut symbols: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..symbols.len().saturating_sub(1) {
                let joined = format!("{}{}", symbols[i], symbols[i + 1]);
                if let Some(&id) = to_id.get(joined.as_str()) {
                    let score = scores[id as usize];
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        symbols
            .iter()
            .flat_map(|s| match to_id.get(s.as_str()) {
                Some(&id) => vec![id],
                None => s
                    .bytes()
                    .map(|b| to_id[format!("<0x{b:02X}>").as_str()])
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn spm_matches_reference_on_random_vocabularies() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = ['▁', 'a', 'b', 'c'];
        let mut mismatches = 0;
        for _ in 0..200 {
            let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
            tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
            tokens.extend(alphabet.iter().map(char::to_string));
            while tokens.len() < 259 + 3 + 25 {
                let len = rng.random_range(2..6);
                let piece: String = (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect();
                if !tokens.contains(&piece) {
                    tokens.push(piece);
                }
            }
            // Distinct scores: llama.cpp and a rank table agree on different tokens.
            let scores: Vec<f32> = (0..tokens.len())
                .map(|i| -(i as f32) - rng.random::<f32>())
                .collect();
            let mut types = vec![2, 3, 3];
            types.extend(std::iter::repeat_n(6, 256));
            types.resize(tokens.len(), 1);
            let tok = Tokenizer::from_spec(TokenizerSpec {
                model: "llama".into(),
                tokens: tokens.clone(),
                token_types: Some(types),
                scores: Some(scores.clone()),
                add_space_prefix: Some(false),
                ..TokenizerSpec::default()
            })
            .unwrap();
            for _ in 0..20 {
                let len = rng.random_range(1..14);
                let text: String = (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect();
                let ours = tok.encode(&text, false, false).unwrap();
                let reference = reference_spm(&text, &tokens, &scores);
                if ours != reference {
                    mismatches += 1;
                    eprintln!("{text:?}: ours {ours:?} reference {reference:?}");
                }
            }
        }
        assert_eq!(mismatches, 0);
    }

    #[test]
    fn byte_level_table_is_gpt2s() {
        let table = byte_level_chars();
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[0], 'Ā');
        let distinct: HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
