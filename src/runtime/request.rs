//! What a forward pass is asked for and what it returns: the vocabulary every
//! backend and every product shares.

use super::error::RuntimeError;

/// Which rows of logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity, parity tests).
    All,
    /// None (prefill of a prompt whose logits are not needed, calibration capture).
    None,
}

impl Logits {
    /// Rows of logits a pass over `n_tokens` tokens returns.
    pub fn rows(self, n_tokens: usize) -> usize {
        match self {
            Logits::All => n_tokens,
            Logits::Last => n_tokens.min(1),
            Logits::None => 0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ForwardRequest {
    pub logits: Logits,
    /// Also return the final hidden states (after the output norm) of every token.
    pub hidden: bool,
    /// Also return the residual stream entering every layer that runs (all tokens).
    pub layer_inputs: bool,
}

impl ForwardRequest {
    pub fn logits(logits: Logits) -> Self {
        ForwardRequest {
            logits,
            hidden: false,
            layer_inputs: false,
        }
    }
}

/// What a forward pass returns (the parts its `ForwardRequest` asked for).
#[derive(Default, Debug)]
pub struct ForwardOutput {
    /// Row-major `[rows][n_vocab]`.
    pub logits: Vec<f32>,
    pub logit_rows: usize,
    /// Row-major `[n_tokens][n_embd]` when requested.
    pub hidden: Option<Vec<f32>>,
    /// `(layer, [n_tokens][n_embd])` for every layer that ran, when requested.
    pub layer_inputs: Vec<(usize, Vec<f32>)>,
}

impl ForwardOutput {
    /// Appends the output of the next chunk of the same tokens.
    pub fn append(&mut self, next: ForwardOutput) {
        self.logits.extend_from_slice(&next.logits);
        self.logit_rows += next.logit_rows;
        if let Some(h) = next.hidden {
            self.hidden
                .get_or_insert_with(Vec::new)
                .extend_from_slice(&h);
        }
        if self.layer_inputs.is_empty() {
            self.layer_inputs = next.layer_inputs;
        } else {
            for ((_, acc), (_, part)) in self.layer_inputs.iter_mut().zip(next.layer_inputs) {
                acc.extend_from_slice(&part);
            }
        }
    }
}

/// Many equal-length texts evaluated as one batch (calibration): `tokens` holds
/// `tokens.len() / seq_len` texts, each attending only to itself with positions
/// from 0. `start`, when set, is `(layer, residual stream entering it)`: the layers
/// below do not run and their cache slots keep what an earlier packed run of the
/// same texts left there (the search's cached prefix).
#[derive(Clone, Copy, Debug)]
pub struct PackedBatch<'a> {
    pub tokens: &'a [u32],
    pub seq_len: usize,
    pub start: Option<(usize, &'a [f32])>,
    /// With `start`: layers below it whose slots the run reads, each with the
    /// residual stream entering it; their keys and values are computed again from
    /// it, so their slots need not hold an earlier run's (at most 128 layers).
    pub refill: &'a [(usize, &'a [f32])],
}

impl PackedBatch<'_> {
    /// Refuses texts that are not whole, and a start or refill whose layer or
    /// input length does not fit a model of `n_layers` layers of width `n_embd`.
    pub fn check(&self, n_layers: usize, n_embd: usize) -> Result<(), RuntimeError> {
        let n = self.tokens.len();
        if self.seq_len == 0 || !n.is_multiple_of(self.seq_len) {
            return Err(RuntimeError::InvalidRequest(format!(
                "{n} tokens are not whole texts of {} tokens",
                self.seq_len
            )));
        }
        let Some((layer, input)) = self.start else {
            return Ok(());
        };
        let n_inputs = n * n_embd;
        if layer >= n_layers || input.len() != n_inputs {
            return Err(RuntimeError::InvalidRequest(format!(
                "a packed start at layer {layer} needs {n_inputs} input values, got {}",
                input.len()
            )));
        }
        if let Some((l, x)) = self
            .refill
            .iter()
            .find(|(l, x)| *l >= layer || *l >= 128 || x.len() != n_inputs)
        {
            return Err(RuntimeError::InvalidRequest(format!(
                "a refill of layer {l} ({} values) must be below the start ({layer}) and hold {n_inputs} values",
                x.len()
            )));
        }
        Ok(())
    }
}
