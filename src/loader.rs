//! Everything a GGUF file provides, loaded together: the model, its tokenizer and its
//! chat template, all from the file's own metadata.

use std::path::Path;
use std::sync::Arc;

use crate::gguf::{GgufError, GgufFile};
use crate::model::{Model, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError, TokenizerSpec};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read; the error names its path already.
    #[error(transparent)]
    Open(GgufError),
    #[error("{path}: {source}")]
    Model {
        path: String,
        #[source]
        source: ModelError,
    },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: String,
        #[source]
        source: TokenizerError,
    },
    #[error("{path}: tokenizer metadata: {source}")]
    TokenizerMetadata {
        path: String,
        #[source]
        source: GgufError,
    },
    #[error("{path}: tokenizer vocabulary has {tokenizer} tokens but the embedding matrix has {model} rows")]
    VocabMismatch {
        path: String,
        tokenizer: usize,
        model: usize,
    },
}

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, if the file has a non-empty one.
    pub chat_template: Option<String>,
}

pub fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    let p = path.display().to_string();
    let file = GgufFile::open(path).map_err(|e| match e {
        GgufError::Open { .. } => LoadError::Open(e),
        e => LoadError::Model {
            path: p.clone(),
            source: ModelError::Gguf(e),
        },
    })?;
    let file = Arc::new(file);
    let model = Model::from_file(file.clone()).map_err(|e| LoadError::Model {
        path: p.clone(),
        source: e,
    })?;
    let spec = tokenizer_spec(&file).map_err(|e| LoadError::TokenizerMetadata {
        path: p.clone(),
        source: e,
    })?;
    let tokenizer = Tokenizer::from_spec(spec).map_err(|e| LoadError::Tokenizer {
        path: p.clone(),
        source: e,
    })?;
    if tokenizer.n_vocab() > model.config.n_vocab {
        return Err(LoadError::VocabMismatch {
            path: p,
            tokenizer: tokenizer.n_vocab(),
            model: model.config.n_vocab,
        });
    }
    let chat_template = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string);
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
    })
}

/// Reads the `tokenizer.ggml.*` keys. Optional keys that are present with the wrong
/// type are errors, not silently ignored.
pub fn tokenizer_spec(file: &GgufFile) -> Result<TokenizerSpec, GgufError> {
    let opt_u32 = |k: &str| file.get(k).map(|_| file.get_u32(k)).transpose();
    let opt_bool = |k: &str| file.get(k).map(|_| file.get_bool(k)).transpose();
    let tokens = file
        .get_array("tokenizer.ggml.tokens")?
        .as_strings()
        .ok_or_else(|| GgufError::WrongType {
            key: "tokenizer.ggml.tokens".into(),
            expected: "array of strings",
            found: "another array",
        })?
        .to_vec();
    let token_types = match file.get("tokenizer.ggml.token_type") {
        None => None,
        Some(_) => Some(
            file.get_array("tokenizer.ggml.token_type")?
                .to_i32_vec()
                .ok_or_else(|| GgufError::WrongType {
                    key: "tokenizer.ggml.token_type".into(),
                    expected: "array of integers",
                    found: "another array",
                })?,
        ),
    };
    let scores = match file.get("tokenizer.ggml.scores") {
        None => None,
        Some(_) => Some(
            file.get_array("tokenizer.ggml.scores")?
                .to_f32_vec()
                .ok_or_else(|| GgufError::WrongType {
                    key: "tokenizer.ggml.scores".into(),
                    expected: "array of floats",
                    found: "another array",
                })?,
        ),
    };
    let merges = match file.get("tokenizer.ggml.merges") {
        None => None,
        Some(_) => Some(
            file.get_array("tokenizer.ggml.merges")?
                .as_strings()
                .ok_or_else(|| GgufError::WrongType {
                    key: "tokenizer.ggml.merges".into(),
                    expected: "array of strings",
                    found: "another array",
                })?
                .to_vec(),
        ),
    };
    Ok(TokenizerSpec {
        model: file.get_str("tokenizer.ggml.model")?.to_string(),
        pre: file
            .get("tokenizer.ggml.pre")
            .map(|_| file.get_str("tokenizer.ggml.pre"))
            .transpose()?
            .map(str::to_string),
        tokens,
        token_types,
        scores,
        merges,
        bos_id: opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_id: opt_u32("tokenizer.ggml.eos_token_id")?,
        eot_id: opt_u32("tokenizer.ggml.eot_token_id")?,
        eom_id: opt_u32("tokenizer.ggml.eom_token_id")?,
        unk_id: opt_u32("tokenizer.ggml.unknown_token_id")?,
        pad_id: opt_u32("tokenizer.ggml.padding_token_id")?,
        add_bos: opt_bool("tokenizer.ggml.add_bos_token")?,
        add_eos: opt_bool("tokenizer.ggml.add_eos_token")?,
        add_space_prefix: opt_bool("tokenizer.ggml.add_space_prefix")?,
    })
}
