//! Perplexity and KL divergence against the unshared model, measured the way
//! llama.cpp's `llama-perplexity` does (and `--kl-divergence` for the comparison).
//!
//! The text is tokenized once (BOS first when the model asks for it) and cut into
//! chunks of `n_ctx` tokens. Every chunk starts from an empty cache, with its first
//! token replaced by BOS when the model adds BOS, so every chunk looks like the start
//! of a document. Only the second half of each chunk is scored (positions
//! `n_ctx/2 .. n_ctx-2` predicting the token after them), so every scored token has
//! at least `n_ctx/2` tokens of context.
//!
//! All probabilities are computed in f64 from the f32 logits; chunks are processed
//! one at a time, so memory holds the logits of one chunk per session, never more
//! (49152 x 512 x 4 bytes = 100 MB for the default model at `-c 512`).

use crate::runtime::{Logits, RunState, RuntimeError};
use crate::tokenizer::{Tokenizer, TokenizerError};

use crate::math::{argmax, kl_divergence};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "not enough text: it tokenizes to {found} tokens, but one chunk of context {n_ctx} needs \
         {needed}"
    )]
    TooFewTokens {
        found: usize,
        needed: usize,
        n_ctx: usize,
    },
    #[error("context size {0} is too small for perplexity: chunks need at least 3 tokens so that one is scored")]
    ContextTooSmall(usize),
    #[error("0 chunks asked for: at least one chunk must be evaluated")]
    ZeroChunks,
    #[error("the session holds {session} tokens but chunks of {n_ctx} tokens were asked for (hint: create the session with n_ctx >= {n_ctx})")]
    SessionTooSmall { session: usize, n_ctx: usize },
    #[error("the two sessions disagree on the vocabulary size ({base} vs {test}); they must run the same model")]
    VocabMismatch { base: usize, test: usize },
    #[error("tokenizing the text: {0}")]
    Tokenize(#[from] TokenizerError),
    #[error("the model adds BOS but the vocabulary has no BOS token")]
    MissingBos,
    #[error("chunk {chunk}: {source}")]
    Session {
        chunk: usize,
        #[source]
        source: RuntimeError,
    },
    #[error("chunk {chunk}: the model returned {found} logits, expected {expected} ({rows} rows of {n_vocab})")]
    LogitsShape {
        chunk: usize,
        found: usize,
        expected: usize,
        rows: usize,
        n_vocab: usize,
    },
    #[error("chunk {chunk}, position {position}: the {which} model's log-probability of token {token} is not finite")]
    NonFinite {
        chunk: usize,
        position: usize,
        token: u32,
        which: &'static str,
    },
}

/// How the text is cut and how much of it is used.
#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    /// Tokens per chunk (llama-perplexity's `-c`).
    pub n_ctx: usize,
    /// Evaluate at most this many chunks (llama-perplexity's `--chunks`); `None`: all.
    pub max_chunks: Option<usize>,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions {
            n_ctx: 512,
            max_chunks: None,
        }
    }
}

/// Tokenizes an evaluation text as llama-perplexity does (`common_tokenize` with
/// special tokens added, e.g. BOS, and special-token text left as plain text).
pub fn tokenize_text(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, EvalError> {
    Ok(tokenizer.encode(text, true, false)?)
}

/// Which tokens each chunk feeds and scores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    pub n_ctx: usize,
    /// First position whose prediction is scored (`n_ctx / 2`).
    pub first: usize,
    pub n_chunks: usize,
    /// Replaces the first token of every chunk when the model adds BOS.
    pub bos: Option<u32>,
}

impl ChunkPlan {
    pub fn new(
        n_tokens: usize,
        opts: &PerplexityOptions,
        tokenizer: &Tokenizer,
    ) -> Result<Self, EvalError> {
        let bos = if tokenizer.add_bos() {
            Some(tokenizer.bos().ok_or(EvalError::MissingBos)?)
        } else {
            None
        };
        Self::with_bos(n_tokens, opts, bos)
    }

    pub fn with_bos(
        n_tokens: usize,
        opts: &PerplexityOptions,
        bos: Option<u32>,
    ) -> Result<Self, EvalError> {
        let n_ctx = opts.n_ctx;
        if n_ctx < 3 {
            return Err(EvalError::ContextTooSmall(n_ctx));
        }
        if opts.max_chunks == Some(0) {
            return Err(EvalError::ZeroChunks);
        }
        // llama-perplexity itself refuses texts shorter than two chunks; one chunk is
        // enough for the method, so only that is required here.
        let available = n_tokens / n_ctx;
        if available == 0 {
            return Err(EvalError::TooFewTokens {
                found: n_tokens,
                needed: n_ctx,
                n_ctx,
            });
        }
        Ok(ChunkPlan {
            n_ctx,
            first: n_ctx / 2,
            n_chunks: opts.max_chunks.map_or(available, |m| m.min(available)),
            bos,
        })
    }

    /// Scored positions per chunk: predictions from `first` to `n_ctx - 2`.
    pub fn scored_per_chunk(&self) -> usize {
        self.n_ctx - 1 - self.first
    }

    /// The tokens fed to the model for chunk `chunk`: the text's `n_ctx` tokens,
    /// with the first one replaced by BOS when the model adds BOS.
    pub fn input(&self, tokens: &[u32], chunk: usize) -> Vec<u32> {
        let start = chunk * self.n_ctx;
        let mut input = tokens[start..start + self.n_ctx].to_vec();
        if let Some(bos) = self.bos {
            input[0] = bos;
        }
        input
    }

    /// The tokens scored in chunk `chunk`, in order: the token after each scored
    /// position.
    pub fn targets<'t>(&self, tokens: &'t [u32], chunk: usize) -> &'t [u32] {
        let start = chunk * self.n_ctx;
        &tokens[start + self.first + 1..start + self.n_ctx]
    }
}

/// A mean with llama.cpp's uncertainty (standard error of the mean).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub value: f64,
    pub uncertainty: f64,
}

/// llama.cpp's `mean_and_uncertainty`: the mean of the values whose sum and sum of
/// squares are given, and the standard error `sqrt(var / (count - 1))`, reported as
/// 0 for 10 values or fewer or a non-positive variance.
pub fn mean_and_uncertainty(sum: f64, sum2: f64, count: usize) -> Estimate {
    if count == 0 {
        return Estimate {
            value: 0.0,
            uncertainty: 0.0,
        };
    }
    let n = count as f64;
    let mean = sum / n;
    let var = sum2 / n - mean * mean;
    let uncertainty = if var > 0.0 && count > 10 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Estimate {
        value: mean,
        uncertainty,
    }
}

/// llama.cpp's covariance of the means of two paired series (0 below 10 pairs).
pub fn covariance_of_means(sum_a: f64, sum_b: f64, sum_ab: f64, count: usize) -> f64 {
    if count < 10 {
        return 0.0;
    }
    let n = count as f64;
    (sum_ab / n - (sum_a / n) * (sum_b / n)) / (n - 1.0)
}

/// `-ln P(target)` under the distribution of `logits` ([`crate::math::log_prob`]);
/// NaN for a target outside the row.
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    -crate::math::log_prob(logits, target as usize)
}

/// Running sums of negative log-likelihoods, as llama-perplexity keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct NllSums {
    pub sum: f64,
    pub sum2: f64,
    pub count: usize,
}

impl NllSums {
    pub fn push(&mut self, nll: f64) {
        self.sum += nll;
        self.sum2 += nll * nll;
        self.count += 1;
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }

    /// `exp(mean NLL)`.
    pub fn ppl(&self) -> f64 {
        self.mean().exp()
    }

    /// llama-perplexity's final estimate: PPL and `PPL * sqrt(var(nll) / (count-1))`
    /// (0 when the variance is not positive or fewer than 2 tokens were scored,
    /// where llama.cpp prints an error instead).
    pub fn ppl_estimate(&self) -> Estimate {
        let ppl = self.ppl();
        let n = self.count as f64;
        let var = self.sum2 / n.max(1.0) - self.mean() * self.mean();
        let uncertainty = if var > 0.0 && self.count > 1 {
            (var / (n - 1.0)).sqrt() * ppl
        } else {
            0.0
        };
        Estimate {
            value: ppl,
            uncertainty,
        }
    }
}

/// What `perplexity` reports after each chunk.
#[derive(Clone, Copy, Debug)]
pub struct PerplexityProgress {
    /// 1-based chunk just finished.
    pub chunk: usize,
    pub n_chunks: usize,
    /// Perplexity over every position scored so far.
    pub ppl: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityReport {
    pub n_ctx: usize,
    /// Tokens in the whole text (including BOS when added).
    pub n_tokens: usize,
    pub n_chunks: usize,
    /// Positions scored in total (`n_chunks * (n_ctx - 1 - n_ctx/2)`).
    pub scored: usize,
    /// llama-perplexity's "Final estimate: PPL = x +/- y".
    pub ppl: Estimate,
    /// Perplexity over all chunks so far after each chunk (llama.cpp's `[1]x,[2]y`).
    pub running_ppl: Vec<f64>,
    pub nll: NllSums,
    pub kv_bytes: usize,
}

/// Evaluates chunk `chunk` on `session` from an empty cache and returns the logits
/// of the scored positions, row-major `[scored_per_chunk][n_vocab]`.
fn scored_logits(
    session: &mut dyn RunState<'_>,
    plan: &ChunkPlan,
    tokens: &[u32],
    chunk: usize,
) -> Result<Vec<f32>, EvalError> {
    let n_vocab = session.model().config.n_vocab;
    let input = plan.input(tokens, chunk);
    session.reset();
    // The whole chunk goes in one call, logits for every token, as llama-perplexity
    // decodes it. Feeding the unscored half separately, or leaving out the last
    // token, changes the graph's batch shapes, and with them the rounding of
    // the quantized matmuls and attention: measured on SmolLM2-135M Q4_1, logits move
    // by up to 0.8 and perplexity by 1% (llama.cpp's own forward moves the same way).
    let mut logits = session
        .eval(&input, Logits::All)
        .map_err(|e| EvalError::Session {
            chunk: chunk + 1,
            source: e,
        })?;
    let rows = plan.scored_per_chunk();
    if logits.len() != plan.n_ctx * n_vocab || n_vocab == 0 {
        return Err(EvalError::LogitsShape {
            chunk: chunk + 1,
            found: logits.len(),
            expected: plan.n_ctx * n_vocab,
            rows: plan.n_ctx,
            n_vocab,
        });
    }
    logits.truncate((plan.first + rows) * n_vocab);
    logits.drain(..plan.first * n_vocab);
    // `compare` holds two of these at once: give back the unscored half.
    logits.shrink_to_fit();
    Ok(logits)
}

fn check_session(session: &dyn RunState<'_>, n_ctx: usize) -> Result<(), EvalError> {
    // A windowed session evicts as it goes, so any chunk length fits it.
    if !session.evicts() && session.n_ctx() < n_ctx {
        return Err(EvalError::SessionTooSmall {
            session: session.n_ctx(),
            n_ctx,
        });
    }
    Ok(())
}

/// llama-perplexity's perplexity of `session`'s model on `tokens` (tokenized with
/// [`tokenize_text`]). The session's cache is reset for every chunk.
pub fn perplexity(
    session: &mut dyn RunState<'_>,
    tokenizer: &Tokenizer,
    tokens: &[u32],
    opts: &PerplexityOptions,
    mut progress: impl FnMut(&PerplexityProgress),
) -> Result<PerplexityReport, EvalError> {
    let plan = ChunkPlan::new(tokens.len(), opts, tokenizer)?;
    check_session(session, plan.n_ctx)?;
    let n_vocab = session.model().config.n_vocab;
    let mut nll = NllSums::default();
    let mut running_ppl = Vec::with_capacity(plan.n_chunks);
    for chunk in 0..plan.n_chunks {
        let logits = scored_logits(session, &plan, tokens, chunk)?;
        for (row, (&target, row_logits)) in plan
            .targets(tokens, chunk)
            .iter()
            .zip(logits.chunks_exact(n_vocab))
            .enumerate()
        {
            let v = token_nll(row_logits, target);
            if !v.is_finite() {
                return Err(EvalError::NonFinite {
                    chunk: chunk + 1,
                    position: plan.first + row,
                    token: target,
                    which: "evaluated",
                });
            }
            nll.push(v);
        }
        running_ppl.push(nll.ppl());
        progress(&PerplexityProgress {
            chunk: chunk + 1,
            n_chunks: plan.n_chunks,
            ppl: nll.ppl(),
        });
    }
    Ok(PerplexityReport {
        n_ctx: plan.n_ctx,
        n_tokens: tokens.len(),
        n_chunks: plan.n_chunks,
        scored: nll.count,
        ppl: nll.ppl_estimate(),
        running_ppl,
        nll,
        kv_bytes: session.kv_bytes(),
    })
}

/// One scored position seen by both models.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PositionComparison {
    pub nll_base: f64,
    pub nll_test: f64,
    /// `KL(P_base || P_test)`.
    pub kld: f64,
    /// Whether both models' most likely token is the same.
    pub same_top: bool,
    /// `P_test(target) - P_base(target)`.
    pub p_diff: f64,
}

/// Compares the next-token distributions of a base and a test model at one
/// position whose true next token is `target`.
pub fn compare_position(base: &[f32], test: &[f32], target: u32) -> PositionComparison {
    let nll_base = token_nll(base, target);
    let nll_test = token_nll(test, target);
    PositionComparison {
        nll_base,
        nll_test,
        kld: kl_divergence(base, test),
        same_top: argmax(base) == argmax(test),
        p_diff: (-nll_test).exp() - (-nll_base).exp(),
    }
}

/// llama.cpp's `kl_divergence_result`: running sums over the positions compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ComparisonSums {
    pub count: usize,
    pub sum_nll_base: f64,
    pub sum_nll_base2: f64,
    pub sum_nll_test: f64,
    pub sum_nll_test2: f64,
    pub sum_nll_test_nll_base: f64,
    pub sum_kld: f64,
    pub sum_kld2: f64,
    pub sum_p_diff: f64,
    pub sum_p_diff2: f64,
    pub sum_p_diff4: f64,
    pub max_abs_p_diff: f64,
    pub same_top: usize,
}

impl ComparisonSums {
    pub fn push(&mut self, p: &PositionComparison) {
        self.count += 1;
        self.sum_nll_base += p.nll_base;
        self.sum_nll_base2 += p.nll_base * p.nll_base;
        self.sum_nll_test += p.nll_test;
        self.sum_nll_test2 += p.nll_test * p.nll_test;
        self.sum_nll_test_nll_base += p.nll_test * p.nll_base;
        self.sum_kld += p.kld;
        self.sum_kld2 += p.kld * p.kld;
        self.sum_p_diff += p.p_diff;
        let d2 = p.p_diff * p.p_diff;
        self.sum_p_diff2 += d2;
        self.sum_p_diff4 += d2 * d2;
        self.max_abs_p_diff = self.max_abs_p_diff.max(p.p_diff.abs());
        self.same_top += usize::from(p.same_top);
    }

    /// Mean NLL of the base model, `ln PPL(base)`.
    pub fn log_ppl_base(&self) -> Estimate {
        mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, self.count)
    }

    /// Mean NLL of the test model, `ln PPL(test)`.
    pub fn log_ppl_test(&self) -> Estimate {
        mean_and_uncertainty(self.sum_nll_test, self.sum_nll_test2, self.count)
    }

    pub fn ppl_base(&self) -> Estimate {
        exp_estimate(self.log_ppl_base())
    }

    pub fn ppl_test(&self) -> Estimate {
        exp_estimate(self.log_ppl_test())
    }

    /// Covariance of the two mean NLLs (they are paired: same positions).
    pub fn log_ppl_covariance(&self) -> f64 {
        covariance_of_means(
            self.sum_nll_test,
            self.sum_nll_base,
            self.sum_nll_test_nll_base,
            self.count,
        )
    }

    /// `ln(PPL(test) / PPL(base))`; the pairing makes its uncertainty far smaller
    /// than either perplexity's.
    pub fn log_ppl_ratio(&self) -> Estimate {
        let t = self.log_ppl_test();
        let b = self.log_ppl_base();
        let var = t.uncertainty * t.uncertainty + b.uncertainty * b.uncertainty
            - 2.0 * self.log_ppl_covariance();
        Estimate {
            value: t.value - b.value,
            uncertainty: var.max(0.0).sqrt(),
        }
    }

    pub fn ppl_ratio(&self) -> Estimate {
        exp_estimate(self.log_ppl_ratio())
    }

    pub fn ppl_diff(&self) -> Estimate {
        let t = self.ppl_test();
        let b = self.ppl_base();
        let cov = t.value * b.value * self.log_ppl_covariance();
        let var = t.uncertainty * t.uncertainty + b.uncertainty * b.uncertainty - 2.0 * cov;
        Estimate {
            value: t.value - b.value,
            uncertainty: var.max(0.0).sqrt(),
        }
    }

    /// Correlation of `ln PPL(test)` and `ln PPL(base)`; 0 when undefined.
    pub fn log_ppl_correlation(&self) -> f64 {
        let denom = self.log_ppl_test().uncertainty * self.log_ppl_base().uncertainty;
        if denom > 0.0 {
            self.log_ppl_covariance() / denom
        } else {
            0.0
        }
    }

    pub fn kld(&self) -> Estimate {
        mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count)
    }

    /// Fraction of positions where both models' top token agrees, with the
    /// binomial standard error llama.cpp gives it.
    pub fn same_top(&self) -> Estimate {
        if self.count == 0 {
            return Estimate {
                value: 0.0,
                uncertainty: 0.0,
            };
        }
        let p = self.same_top as f64 / self.count as f64;
        let uncertainty = if self.count > 1 {
            (p * (1.0 - p) / (self.count - 1) as f64).sqrt()
        } else {
            0.0
        };
        Estimate {
            value: p,
            uncertainty,
        }
    }

    /// Mean of `P_test(target) - P_base(target)`.
    pub fn p_diff(&self) -> Estimate {
        mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, self.count)
    }

    /// Root mean square of the target-probability difference.
    pub fn p_diff_rms(&self) -> Estimate {
        let mse = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, self.count);
        let rms = mse.value.sqrt();
        Estimate {
            value: rms,
            uncertainty: if rms > 0.0 {
                0.5 / rms * mse.uncertainty
            } else {
                0.0
            },
        }
    }
}

/// `exp` of an estimate, with its uncertainty carried to first order.
fn exp_estimate(e: Estimate) -> Estimate {
    let value = e.value.exp();
    Estimate {
        value,
        uncertainty: value * e.uncertainty,
    }
}

/// llama.cpp's percentile: linear interpolation between the sorted values.
/// `sorted` must be non-empty and ascending.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    match sorted {
        [] => f64::NAN,
        _ if fraction <= 0.0 => sorted[0],
        _ if fraction >= 1.0 => sorted[sorted.len() - 1],
        _ => {
            let p = fraction * (sorted.len() - 1) as f64;
            let i = p as usize;
            let frac = p - i as f64;
            (1.0 - frac) * sorted[i] + frac * sorted[(i + 1).min(sorted.len() - 1)]
        }
    }
}

/// The median: middle value, or the mean of the two middle values.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n.is_multiple_of(2) => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
        _ => sorted[n / 2],
    }
}

/// The distribution of one per-position quantity, as llama.cpp prints it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Quantiles {
    pub min: f64,
    pub p0_1: f64,
    pub p1: f64,
    pub p5: f64,
    pub p10: f64,
    pub p25: f64,
    pub median: f64,
    pub p75: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Quantiles {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Quantiles {
            min: v[0],
            p0_1: percentile(&v, 0.001),
            p1: percentile(&v, 0.01),
            p5: percentile(&v, 0.05),
            p10: percentile(&v, 0.10),
            p25: percentile(&v, 0.25),
            median: median(&v),
            p75: percentile(&v, 0.75),
            p90: percentile(&v, 0.90),
            p95: percentile(&v, 0.95),
            p99: percentile(&v, 0.99),
            p99_9: percentile(&v, 0.999),
            max: v[v.len() - 1],
        })
    }
}

/// What `compare` reports after each chunk.
#[derive(Clone, Copy, Debug)]
pub struct ComparisonProgress<'a> {
    /// 1-based chunk just finished.
    pub chunk: usize,
    pub n_chunks: usize,
    /// Sums over every position compared so far.
    pub sums: &'a ComparisonSums,
}

/// The comparison of a test model (e.g. with a sharing map) against a base model
/// (unshared) on the same chunks, with llama.cpp's `--kl-divergence` statistics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ComparisonReport {
    pub n_ctx: usize,
    pub n_tokens: usize,
    pub n_chunks: usize,
    pub scored: usize,
    pub ppl_base: Estimate,
    pub ppl_test: Estimate,
    /// `ln(PPL(test) / PPL(base))`.
    pub log_ppl_ratio: Estimate,
    pub ppl_ratio: Estimate,
    pub ppl_diff: Estimate,
    pub log_ppl_correlation: f64,
    /// Mean `KL(P_base || P_test)` per position, in nats.
    pub kld: Estimate,
    pub kld_quantiles: Option<Quantiles>,
    /// Fraction of positions whose top token agrees.
    pub same_top: Estimate,
    pub p_diff: Estimate,
    pub p_diff_rms: Estimate,
    pub p_diff_quantiles: Option<Quantiles>,
    pub max_abs_p_diff: f64,
    pub sums: ComparisonSums,
    pub base_kv_bytes: usize,
    pub test_kv_bytes: usize,
}

/// Runs `base` and `test` over the same chunks (both reset for every chunk) and
/// compares their next-token distributions at every scored position. Only one
/// chunk's scored logits per session are held at a time.
pub fn compare(
    base: &mut dyn RunState<'_>,
    test: &mut dyn RunState<'_>,
    tokenizer: &Tokenizer,
    tokens: &[u32],
    opts: &PerplexityOptions,
    mut progress: impl FnMut(&ComparisonProgress),
) -> Result<ComparisonReport, EvalError> {
    let plan = ChunkPlan::new(tokens.len(), opts, tokenizer)?;
    check_session(base, plan.n_ctx)?;
    check_session(test, plan.n_ctx)?;
    let n_vocab = base.model().config.n_vocab;
    let test_vocab = test.model().config.n_vocab;
    if n_vocab != test_vocab {
        return Err(EvalError::VocabMismatch {
            base: n_vocab,
            test: test_vocab,
        });
    }
    let mut sums = ComparisonSums::default();
    let total = plan.n_chunks * plan.scored_per_chunk();
    let mut kld_values = Vec::with_capacity(total);
    let mut p_diff_values = Vec::with_capacity(total);
    for chunk in 0..plan.n_chunks {
        let base_logits = scored_logits(base, &plan, tokens, chunk)?;
        let test_logits = scored_logits(test, &plan, tokens, chunk)?;
        let rows = base_logits
            .chunks_exact(n_vocab)
            .zip(test_logits.chunks_exact(n_vocab));
        for (row, (&target, (b, t))) in plan.targets(tokens, chunk).iter().zip(rows).enumerate() {
            let p = compare_position(b, t, target);
            for (v, which) in [(p.nll_base, "base"), (p.nll_test, "test")] {
                if !v.is_finite() {
                    return Err(EvalError::NonFinite {
                        chunk: chunk + 1,
                        position: plan.first + row,
                        token: target,
                        which,
                    });
                }
            }
            sums.push(&p);
            kld_values.push(p.kld);
            p_diff_values.push(p.p_diff);
        }
        progress(&ComparisonProgress {
            chunk: chunk + 1,
            n_chunks: plan.n_chunks,
            sums: &sums,
        });
    }
    Ok(ComparisonReport {
        n_ctx: plan.n_ctx,
        n_tokens: tokens.len(),
        n_chunks: plan.n_chunks,
        scored: sums.count,
        ppl_base: sums.ppl_base(),
        ppl_test: sums.ppl_test(),
        log_ppl_ratio: sums.log_ppl_ratio(),
        ppl_ratio: sums.ppl_ratio(),
        ppl_diff: sums.ppl_diff(),
        log_ppl_correlation: sums.log_ppl_correlation(),
        kld: sums.kld(),
        kld_quantiles: Quantiles::of(&kld_values),
        same_top: sums.same_top(),
        p_diff: sums.p_diff(),
        p_diff_rms: sums.p_diff_rms(),
        p_diff_quantiles: Quantiles::of(&p_diff_values),
        max_abs_p_diff: sums.max_abs_p_diff,
        sums,
        base_kv_bytes: base.kv_bytes(),
        test_kv_bytes: test.kv_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::log_softmax;
    use crate::math::pseudo_random_logits;

    #[test]
    fn token_nll_is_minus_log_softmax_at_the_target() {
        let logits = pseudo_random_logits(50, 3);
        let ls = log_softmax(&logits);
        for t in [0u32, 17, 49] {
            assert!((token_nll(&logits, t) + ls[t as usize]).abs() < 1e-12);
        }
        assert!(token_nll(&logits, 50).is_nan());
    }

    #[test]
    fn compare_position_on_a_hand_example() {
        // Base P = (1/2, 1/4, 1/4), test Q = (1/4, 1/2, 1/4), target token 0.
        let p = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
        let q = [0.25f32.ln(), 0.5f32.ln(), 0.25f32.ln()];
        let c = compare_position(&p, &q, 0);
        assert!((c.nll_base - std::f64::consts::LN_2).abs() < 1e-7);
        assert!((c.nll_test - 4f64.ln()).abs() < 1e-7);
        assert!((c.p_diff - (0.25 - 0.5)).abs() < 1e-7);
        assert!(!c.same_top);
        assert!(compare_position(&p, &p, 1).same_top);
    }

    #[test]
    fn mean_and_uncertainty_is_the_standard_error() {
        let xs: Vec<f64> = (0..20).map(|i| (i as f64 * 0.37).sin()).collect();
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let sample_var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let e = mean_and_uncertainty(xs.iter().sum(), xs.iter().map(|x| x * x).sum(), xs.len());
        assert!((e.value - mean).abs() < 1e-12);
        // llama.cpp's sqrt(population var / (n-1)) = sample sd / sqrt(n).
        assert!((e.uncertainty - (sample_var / n).sqrt()).abs() < 1e-12);
        // Ten values or fewer: no uncertainty, as in llama.cpp.
        assert_eq!(mean_and_uncertainty(3.0, 5.0, 3).uncertainty, 0.0);
    }

    #[test]
    fn nll_sums_give_llama_cpp_final_estimate() {
        let nlls = [2.0, 2.5, 1.5, 3.0, 2.2];
        let mut s = NllSums::default();
        nlls.iter().for_each(|&v| s.push(v));
        let mean: f64 = nlls.iter().sum::<f64>() / 5.0;
        let pop_var = nlls.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0;
        let e = s.ppl_estimate();
        assert!((e.value - mean.exp()).abs() < 1e-12);
        assert!((e.uncertainty - mean.exp() * (pop_var / 4.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn paired_ratio_uncertainty_vanishes_for_a_constant_shift() {
        // Test NLL = base NLL + 0.1 everywhere: the ratio is exactly e^0.1 and, the
        // series being perfectly correlated, certain.
        let mut sums = ComparisonSums::default();
        for i in 0..50 {
            let b = 2.0 + (i as f64 * 0.7).sin();
            sums.push(&PositionComparison {
                nll_base: b,
                nll_test: b + 0.1,
                kld: 0.01,
                same_top: i % 5 != 0,
                p_diff: (-(b + 0.1)).exp() - (-b).exp(),
            });
        }
        let r = sums.log_ppl_ratio();
        assert!((r.value - 0.1).abs() < 1e-12);
        assert!(r.uncertainty < 1e-6, "{r:?}");
        assert!((sums.log_ppl_correlation() - 1.0).abs() < 1e-6);
        assert!((sums.same_top().value - 0.8).abs() < 1e-12);
        assert!((sums.kld().value - 0.01).abs() < 1e-12);
    }

    #[test]
    fn percentiles_interpolate_like_llama_cpp() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.1), 0.4);
        assert_eq!(percentile(&v, 0.0), 0.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), 2.5);
        let q = Quantiles::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((q.min, q.median, q.max), (1.0, 2.0, 3.0));
        assert!(Quantiles::of(&[]).is_none());
    }

    #[test]
    fn chunk_plan_follows_llama_perplexity() {
        let opts = PerplexityOptions {
            n_ctx: 8,
            max_chunks: None,
        };
        let tokens: Vec<u32> = (100..120).collect();
        let plan = ChunkPlan::with_bos(tokens.len(), &opts, Some(1)).unwrap();
        assert_eq!(
            (plan.n_chunks, plan.first, plan.scored_per_chunk()),
            (2, 4, 3)
        );
        // Chunk 1 starts at token 8; BOS replaces it.
        assert_eq!(
            plan.input(&tokens, 1),
            vec![1, 109, 110, 111, 112, 113, 114, 115]
        );
        // Positions 4, 5, 6 of chunk 1 predict tokens 13, 14, 15 of the text.
        assert_eq!(plan.targets(&tokens, 1), &[113, 114, 115]);
        let no_bos = ChunkPlan::with_bos(tokens.len(), &opts, None).unwrap();
        assert_eq!(no_bos.input(&tokens, 0)[0], 100);
        let capped = ChunkPlan::with_bos(
            tokens.len(),
            &PerplexityOptions {
                max_chunks: Some(1),
                ..opts.clone()
            },
            None,
        )
        .unwrap();
        assert_eq!(capped.n_chunks, 1);
        let err = ChunkPlan::with_bos(7, &opts, None).unwrap_err();
        assert!(matches!(
            err,
            EvalError::TooFewTokens {
                found: 7,
                needed: 8,
                ..
            }
        ));
        assert!(err.to_string().contains("7 tokens") && err.to_string().contains("needs 8"));
        assert!(matches!(
            ChunkPlan::with_bos(
                100,
                &PerplexityOptions {
                    n_ctx: 2,
                    max_chunks: None
                },
                None
            ),
            Err(EvalError::ContextTooSmall(2))
        ));
        assert!(matches!(
            ChunkPlan::with_bos(
                100,
                &PerplexityOptions {
                    n_ctx: 8,
                    max_chunks: Some(0)
                },
                None
            ),
            Err(EvalError::ZeroChunks)
        ));
    }
}
