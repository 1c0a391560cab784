//! Next-token sampling, following llama.cpp's default sampler chain:
//! repetition penalty -> top-k -> top-p -> min-p -> temperature -> seeded draw.
//!
//! As in llama.cpp, top-p and min-p look at the distribution *before* temperature
//! (temperature comes last in the chain), so temperature changes how the kept
//! tokens are weighted but not which tokens are kept.

use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::math;

/// Seed used by [`SamplingParams::default`]. llama.cpp defaults to a random seed;
/// we default to a fixed one so that runs are reproducible unless a seed is given.
pub const DEFAULT_SEED: u64 = 0x6b76_7368_6172_6572;

/// Sampling settings. Defaults are llama.cpp's (`common_params_sampling`).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits of the kept tokens; `0` means greedy (argmax after the
    /// repetition penalty).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns top-k off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability mass reaches
    /// `top_p`; `1.0` turns top-p off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's;
    /// `0.0` turns min-p off.
    pub min_p: f32,
    /// Positive logits of recently seen tokens are divided by this, negative ones
    /// multiplied; `1.0` turns it off.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalty looks at; `0` turns
    /// it off.
    pub repeat_last_n: usize,
    /// Seed of the random generator used for the draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: DEFAULT_SEED,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("temperature must be a finite number >= 0 (0 = greedy), got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1] (1 = off), got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1] (0 = off), got {0}")]
    MinP(f32),
    #[error("repeat_penalty must be a finite number > 0 (1 = off), got {0}")]
    RepeatPenalty(f32),
}

impl SamplingParams {
    /// Checks the settings. Errors reject values with no sensible meaning:
    /// a negative, NaN or infinite temperature; `top_p` outside `(0, 1]`
    /// (`top_p = 0` would keep nothing, and llama.cpp silently treats it as
    /// "keep one token": use `temperature = 0` or `top_k = 1` for that);
    /// `min_p` outside `[0, 1]`; a `repeat_penalty` that is not finite and
    /// positive (zero or negative would flip or erase logits).
    ///
    /// On success returns notices about settings that are legal but do something
    /// a user may not expect (e.g. `repeat_penalty < 1` rewards repetition);
    /// callers show them as warnings.
    pub fn validate(&self) -> Result<Vec<String>, SampleError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SampleError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SampleError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SampleError::MinP(self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(SampleError::RepeatPenalty(self.repeat_penalty));
        }
        let mut notices = Vec::new();
        if self.temperature > 0.0 && self.top_k == 1 {
            notices.push("top_k = 1 keeps only the most likely token: sampling is greedy".into());
        }
        if self.temperature > 0.0 && self.min_p == 1.0 {
            notices.push(
                "min_p = 1 keeps only tokens tied with the most likely one: sampling is greedy"
                    .into(),
            );
        }
        if self.repeat_penalty < 1.0 {
            notices.push(format!(
                "repeat_penalty = {} is below 1: recently seen tokens become more likely",
                self.repeat_penalty
            ));
        }
        if self.repeat_penalty != 1.0 && self.repeat_last_n == 0 {
            notices.push("repeat_last_n = 0 disables the repetition penalty".into());
        }
        Ok(notices)
    }
}

/// One token of the final distribution a draw is made from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub id: u32,
    /// Probability after all filters and temperature; candidates sum to 1.
    pub prob: f64,
}

/// A seeded sampler. [`Sampler::sample`] never panics: settings that
/// [`SamplingParams::validate`] would reject are treated as the nearest meaningful
/// value (negative temperature -> greedy, `top_p` clamped into `(0, 1]`, `min_p`
/// into `[0, 1]`, a non-positive or non-finite penalty -> off).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token id from `logits` (one per vocabulary entry), with
    /// `history` the tokens so far (prompt and generated), oldest first.
    /// Empty `logits` give 0; NaN logits are never picked unless all are NaN.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if self.is_greedy() {
            return argmax(&self.penalized(logits, history));
        }
        let candidates = self.candidates(logits, history);
        let u: f64 = self.rng.random();
        let mut cumulative = 0.0;
        for candidate in &candidates {
            cumulative += candidate.prob;
            if u < cumulative {
                return candidate.id;
            }
        }
        // Rounding can leave the total a hair under u; the last kept token is the
        // one whose interval was cut short.
        candidates.last().map_or(0, |c| c.id)
    }

    /// The distribution [`Sampler::sample`] draws from: the kept tokens, most
    /// likely first, with probabilities summing to 1. With temperature 0 it is the
    /// single argmax token.
    pub fn candidates(&self, logits: &[f32], history: &[u32]) -> Vec<Candidate> {
        let penalized = self.penalized(logits, history);
        if penalized.is_empty() {
            return Vec::new();
        }
        if self.is_greedy() {
            return vec![Candidate {
                id: argmax(&penalized),
                prob: 1.0,
            }];
        }
        let mut kept: Vec<(u32, f32)> = penalized
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();

        let top_k = self.params.top_k;
        if top_k > 0 && top_k < kept.len() {
            kept.select_nth_unstable_by(top_k - 1, by_logit_desc);
            kept.truncate(top_k);
        }
        kept.sort_unstable_by(by_logit_desc);
        // Tokens with zero probability (-inf, or NaN mapped to -inf) are dropped,
        // except that one token always survives.
        let finite_or_max = kept
            .iter()
            .position(|&(_, l)| l == f32::NEG_INFINITY)
            .unwrap_or(kept.len())
            .max(1);
        kept.truncate(finite_or_max);

        let top_p = self.params.top_p;
        if top_p < 1.0 {
            let logits: Vec<f32> = kept.iter().map(|&(_, l)| l).collect();
            let probs = math::softmax(&logits);
            let mut cumulative = 0.0;
            let mut keep = kept.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            kept.truncate(keep.max(1));
        }

        let min_p = self.params.min_p.min(1.0);
        if min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  logit_i >= logit_max + ln(min_p).
            let threshold = f64::from(kept[0].1) + f64::from(min_p).ln();
            let keep = kept
                .iter()
                .position(|&(_, l)| f64::from(l) < threshold)
                .unwrap_or(kept.len());
            kept.truncate(keep.max(1));
        }

        let logits: Vec<f32> = kept.iter().map(|&(_, l)| l).collect();
        let probs = math::softmax_with_temperature(&logits, f64::from(self.params.temperature));
        kept.iter()
            .zip(probs)
            .map(|(&(id, _), prob)| Candidate { id, prob })
            .collect()
    }

    fn is_greedy(&self) -> bool {
        // NaN counts as greedy too: it has no meaningful draw.
        self.params.temperature.is_nan() || self.params.temperature <= 0.0
    }

    /// Logits after the repetition penalty, with NaN replaced by -inf.
    fn penalized(&self, logits: &[f32], history: &[u32]) -> Vec<f32> {
        let mut out: Vec<f32> = logits
            .iter()
            .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l })
            .collect();
        let penalty = self.params.repeat_penalty;
        if penalty.is_finite() && penalty > 0.0 {
            apply_repeat_penalty(&mut out, history, penalty, self.params.repeat_last_n);
        }
        out
    }
}

/// llama.cpp's repetition penalty: every distinct token among the last `last_n`
/// entries of `history` has its logit divided by `penalty` when positive and
/// multiplied by it otherwise, once regardless of how often it occurred. Ids
/// outside `logits` are ignored.
pub fn apply_repeat_penalty(logits: &mut [f32], history: &[u32], penalty: f32, last_n: usize) {
    if penalty == 1.0 || last_n == 0 {
        return;
    }
    let window = &history[history.len().saturating_sub(last_n)..];
    let mut seen: Vec<u32> = window.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if let Some(logit) = logits.get_mut(id as usize) {
            if *logit <= 0.0 {
                *logit *= penalty;
            } else {
                *logit /= penalty;
            }
        }
    }
}

/// OpenAI's presence and frequency penalties: every token already in `generated`
/// loses `presence` once and `frequency` per occurrence from its logit. Ids
/// outside `logits` are ignored.
pub fn apply_presence_frequency(
    logits: &mut [f32],
    generated: &[u32],
    presence: f32,
    frequency: f32,
) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    let mut counts: Vec<u32> = generated.to_vec();
    counts.sort_unstable();
    for run in counts.chunk_by(|a, b| a == b) {
        if let Some(logit) = logits.get_mut(run[0] as usize) {
            *logit -= presence + frequency * run.len() as f32;
        }
    }
}

/// [`math::argmax`] as a token id: the first largest logit; NaN entries never win;
/// an empty or all-NaN slice gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    math::argmax(logits) as u32
}

/// Descending by logit, ascending by id on ties: a total order, so the kept set
/// never depends on the sort algorithm.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 7,
        }
    }

    /// Independent oracle: plain softmax(logits / t) in f64.
    fn oracle_softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let exps: Vec<f64> = logits.iter().map(|&l| (f64::from(l) / t).exp()).collect();
        let total: f64 = exps.iter().sum();
        exps.iter().map(|e| e / total).collect()
    }

    fn counts(sampler: &mut Sampler, logits: &[f32], history: &[u32], draws: usize) -> Vec<usize> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits, history) as usize] += 1;
        }
        counts
    }

    /// Logits whose softmax is exactly `probs` (up to a constant).
    fn logits_from_probs(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    #[test]
    fn presence_and_frequency_penalties_count_occurrences() {
        let mut logits = vec![1.0f32; 5];
        apply_presence_frequency(&mut logits, &[1, 3, 3, 3, 9], 0.5, 0.25);
        assert_eq!(logits, [1.0, 0.25, 1.0, -0.25, 1.0]);
        let mut same = vec![1.0f32; 3];
        apply_presence_frequency(&mut same, &[0, 1], 0.0, 0.0);
        assert_eq!(same, [1.0; 3]);
    }

    #[test]
    fn defaults_are_llama_cpp_defaults_and_valid() {
        let p = SamplingParams::default();
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.min_p),
            (0.8, 40, 0.95, 0.05)
        );
        assert_eq!((p.repeat_penalty, p.repeat_last_n), (1.0, 64));
        assert_eq!(p.validate().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn validate_rejects_meaningless_values() {
        let base = SamplingParams::default();
        let bad = [
            SamplingParams {
                temperature: -0.1,
                ..base.clone()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..base.clone()
            },
            SamplingParams {
                temperature: f32::INFINITY,
                ..base.clone()
            },
            SamplingParams {
                top_p: 0.0,
                ..base.clone()
            },
            SamplingParams {
                top_p: 1.5,
                ..base.clone()
            },
            SamplingParams {
                top_p: f32::NAN,
                ..base.clone()
            },
            SamplingParams {
                min_p: -0.01,
                ..base.clone()
            },
            SamplingParams {
                min_p: 1.01,
                ..base.clone()
            },
            SamplingParams {
                min_p: f32::NAN,
                ..base.clone()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..base.clone()
            },
            SamplingParams {
                repeat_penalty: -1.0,
                ..base.clone()
            },
            SamplingParams {
                repeat_penalty: f32::NAN,
                ..base.clone()
            },
        ];
        for p in bad {
            let err = p.validate().unwrap_err();
            assert!(!err.to_string().is_empty());
        }
        let edge_ok = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 0.0,
            top_k: 0,
            ..base.clone()
        };
        assert!(edge_ok.validate().unwrap().is_empty());
        let with_notice = SamplingParams {
            repeat_penalty: 0.9,
            top_k: 1,
            ..base
        };
        assert_eq!(with_notice.validate().unwrap().len(), 2);
    }

    #[test]
    fn argmax_takes_first_max_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, -1.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[0.0, f32::INFINITY, f32::NAN]), 1);
    }

    #[test]
    fn greedy_picks_argmax_after_penalty() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        let mut greedy = Sampler::new(params(0.0, 40, 0.95, 0.05));
        for _ in 0..10 {
            assert_eq!(greedy.sample(&logits, &[]), 1);
        }
        // 2.0 / 1.1 = 1.818 < 1.9, so the penalty moves the argmax.
        let mut penalized = Sampler::new(SamplingParams {
            repeat_penalty: 1.1,
            ..params(0.0, 40, 0.95, 0.05)
        });
        assert_eq!(penalized.sample(&logits, &[1]), 2);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37 % 101) as f32).sin()).collect();
        let expected = argmax(&logits);
        let mut sampler = Sampler::new(params(1.5, 1, 1.0, 0.0));
        for _ in 0..200 {
            assert_eq!(sampler.sample(&logits, &[]), expected);
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let flat = vec![0.0f32; 1000];
        let run = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0, 0, 1.0, 0.0)
            });
            (0..64).map(|_| s.sample(&flat, &[])).collect()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        // A flat distribution over 1000 tokens: 64 draws should not all coincide.
        let draws = run(42);
        assert!(draws.iter().any(|&d| d != draws[0]));
    }

    #[test]
    fn top_p_never_leaves_the_nucleus() {
        // Probabilities deliberately out of id order.
        let probs = [0.07, 0.25, 0.03, 0.5, 0.15];
        let logits = logits_from_probs(&probs);
        // Sorted: 0.5 (id 3), 0.25 (id 1): cumulative 0.75 >= 0.7 -> nucleus {3, 1}.
        let mut sampler = Sampler::new(params(1.0, 0, 0.7, 0.0));
        let c = counts(&mut sampler, &logits, &[], 5000);
        assert_eq!(c[0] + c[2] + c[4], 0, "{c:?}");
        assert!(c[3] > 0 && c[1] > 0, "{c:?}");
        // Within the nucleus the renormalized weights are 2/3 and 1/3.
        let f3 = c[3] as f64 / 5000.0;
        assert!((f3 - 2.0 / 3.0).abs() < 0.03, "{f3}");

        // Cumulative 0.5, 0.75, 0.90 >= 0.8 -> {3, 1, 4}.
        let mut sampler = Sampler::new(params(1.0, 0, 0.8, 0.0));
        let c = counts(&mut sampler, &logits, &[], 5000);
        assert_eq!(c[0] + c[2], 0, "{c:?}");
        assert!(c[3] > 0 && c[1] > 0 && c[4] > 0, "{c:?}");
    }

    #[test]
    fn min_p_never_picks_below_threshold() {
        let probs = [0.07, 0.25, 0.03, 0.5, 0.15];
        let logits = logits_from_probs(&probs);
        // Threshold 0.1 * 0.5 = 0.05: 0.03 (id 2) is out, 0.07 (id 0) stays.
        let mut sampler = Sampler::new(params(1.0, 0, 1.0, 0.1));
        let c = counts(&mut sampler, &logits, &[], 10_000);
        assert_eq!(c[2], 0, "{c:?}");
        assert!(c.iter().enumerate().all(|(i, &n)| i == 2 || n > 0), "{c:?}");
        // Threshold 0.4 * 0.5 = 0.2: only ids 3 and 1.
        let mut sampler = Sampler::new(params(1.0, 0, 1.0, 0.4));
        let c = counts(&mut sampler, &logits, &[], 5000);
        assert_eq!(c[0] + c[2] + c[4], 0, "{c:?}");
        // Truncation happens before temperature: a hot temperature must not let
        // dropped tokens back in.
        let mut hot = Sampler::new(params(5.0, 0, 1.0, 0.4));
        let c = counts(&mut hot, &logits, &[], 5000);
        assert_eq!(c[0] + c[2] + c[4], 0, "{c:?}");
    }

    #[test]
    fn top_k_keeps_the_k_largest() {
        let probs = [0.07, 0.25, 0.03, 0.5, 0.15];
        let logits = logits_from_probs(&probs);
        let mut sampler = Sampler::new(params(1.0, 3, 1.0, 0.0));
        let c = counts(&mut sampler, &logits, &[], 5000);
        assert_eq!(c[0] + c[2], 0, "{c:?}");
        assert!(c[3] > 0 && c[1] > 0 && c[4] > 0, "{c:?}");
    }

    #[test]
    fn repeat_penalty_exact_arithmetic() {
        let mut logits = [2.0f32, -1.0, 0.5, 1.0, 3.0];
        // Token 0 appears twice but is penalized once; token 4 is outside the
        // window of the last 3; id 99 is out of range and ignored.
        apply_repeat_penalty(&mut logits, &[4, 0, 1, 0, 99], 2.0, 4);
        assert_eq!(logits, [1.0, -2.0, 0.5, 1.0, 3.0]);

        let mut off = [2.0f32, -1.0];
        apply_repeat_penalty(&mut off, &[0, 1], 1.0, 64);
        assert_eq!(off, [2.0, -1.0]);
        apply_repeat_penalty(&mut off, &[0, 1], 2.0, 0);
        assert_eq!(off, [2.0, -1.0]);
    }

    #[test]
    fn repeat_penalty_lowers_repeated_token_probability() {
        let logits = [1.0f32, 1.0, 0.0];
        let base = SamplingParams {
            repeat_penalty: 1.5,
            ..params(1.0, 0, 1.0, 0.0)
        };
        let sampler = Sampler::new(base.clone());
        let cands = sampler.candidates(&logits, &[0]);
        let prob_of = |id: u32| cands.iter().find(|c| c.id == id).unwrap().prob;
        // Oracle: softmax of [1/1.5, 1, 0].
        let expected = oracle_softmax(&[1.0 / 1.5, 1.0, 0.0], 1.0);
        for id in 0..3 {
            assert!((prob_of(id) - expected[id as usize]).abs() < 1e-6);
        }
        assert!(prob_of(0) < 1.0 / (2.0 + (-1.0f64).exp()));
        let mut sampler = Sampler::new(base);
        let c = counts(&mut sampler, &logits, &[0], 20_000);
        assert!(c[0] < c[1], "{c:?}");
    }

    /// Frequencies over 20k draws match the oracle softmax: each token within
    /// 5 binomial standard deviations, plus a chi-square test at p = 0.001.
    fn assert_frequencies_match(logits: &[f32], temperature: f32, seed: u64) {
        const DRAWS: usize = 20_000;
        let expected = oracle_softmax(logits, f64::from(temperature));
        let mut sampler = Sampler::new(SamplingParams {
            seed,
            ..params(temperature, 0, 1.0, 0.0)
        });
        let c = counts(&mut sampler, logits, &[], DRAWS);
        let n = DRAWS as f64;
        let mut chi2 = 0.0;
        for (i, &p) in expected.iter().enumerate() {
            let freq = c[i] as f64 / n;
            let sigma = (p * (1.0 - p) / n).sqrt();
            assert!(
                (freq - p).abs() <= 5.0 * sigma,
                "token {i}: frequency {freq}, softmax {p}, sigma {sigma}"
            );
            chi2 += (c[i] as f64 - n * p).powi(2) / (n * p);
        }
        // 99.9th percentile of chi-square with 5 degrees of freedom.
        assert!(chi2 < 20.52, "chi-square {chi2}");
    }

    #[test]
    fn frequencies_match_softmax_at_temperature_one() {
        assert_frequencies_match(&[2.0, 1.0, 0.5, 0.0, -1.0, -2.0], 1.0, 1);
    }

    #[test]
    fn frequencies_match_tempered_softmax() {
        assert_frequencies_match(&[1.0, 0.8, 0.2, 0.0, -0.5, -0.6], 0.5, 2);
        assert_frequencies_match(&[1.0, 0.8, 0.2, 0.0, -0.5, -0.6], 2.0, 3);
    }

    #[test]
    fn candidates_are_a_distribution_in_descending_order() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 13 % 97) as f32) * 0.05).collect();
        let sampler = Sampler::new(SamplingParams::default());
        let cands = sampler.candidates(&logits, &[]);
        assert!(!cands.is_empty() && cands.len() <= 40);
        let total: f64 = cands.iter().map(|c| c.prob).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(cands.windows(2).all(|w| w[0].prob >= w[1].prob));
        assert_eq!(cands[0].id, argmax(&logits));
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        let mut sampler = Sampler::new(SamplingParams::default());
        assert_eq!(sampler.sample(&[], &[]), 0);
        assert_eq!(sampler.sample(&[f32::NAN, 1.0, f32::NAN], &[5, 1]), 1);
        assert_eq!(
            sampler.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY], &[]),
            0
        );
        assert_eq!(sampler.sample(&[0.0, f32::INFINITY, 1.0], &[]), 1);
        // Parameters validate() rejects are clamped rather than panicking.
        let mut odd = Sampler::new(SamplingParams {
            temperature: -1.0,
            top_p: 0.0,
            min_p: 3.0,
            repeat_penalty: f32::NAN,
            ..SamplingParams::default()
        });
        assert_eq!(odd.sample(&[0.0, 2.0, 1.0], &[1]), 1);
        let mut odd = Sampler::new(SamplingParams {
            top_p: -1.0,
            min_p: 3.0,
            ..SamplingParams::default()
        });
        assert_eq!(odd.sample(&[0.0, 2.0, 1.0], &[1]), 1);
    }
}
