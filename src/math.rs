//! Numerics on rows of logits and vectors, defined once for the whole crate:
//! sampling, perplexity (`eval`), the sharing search and calibration all call these.
//!
//! Policy, for every function here:
//!
//! - Arithmetic: inputs are `f32`, results `f64`. Log-sum-exp subtracts the row's
//!   maximum (so no term overflows, whatever the logits' magnitude) and sums the
//!   terms `exp(x - max)` in `f64`.
//! - Non-finite logits are read as the limit of finite rows: `+inf` entries share all
//!   of the probability mass equally, a row of only `-inf` entries is uniform, and a
//!   `-inf` entry beside a finite one has probability 0. A NaN anywhere in a row
//!   makes every result from that row NaN, except [`argmax`], where NaN never wins.
//! - An empty row has log-sum-exp `-inf`, an empty (log-)softmax, and argmax 0.
//! - Functions of two rows (or vectors) give NaN when the lengths differ.

/// Index of the largest value, the first one on ties. NaN entries are skipped (they
/// never win); an empty or all-NaN slice gives 0. `-inf` entries take part like any
/// other value, so an all-`-inf` slice gives 0 too.
pub fn argmax(x: &[f32]) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// `ln(sum(exp(x)))`: the row's maximum plus the log of the `f64` sum of
/// `exp(x - max)`. `-inf` for an empty or all-`-inf` row, `+inf` if an entry is
/// `+inf`, NaN if an entry is NaN.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    match Norm::of(x) {
        Norm::Finite(lse) => lse,
        Norm::PosInf(_) => f64::INFINITY,
        Norm::NegInf(_) => f64::NEG_INFINITY,
        Norm::Nan => f64::NAN,
    }
}

/// Natural-log probabilities of a row of logits: `x - log_sum_exp(x)` for rows
/// with a finite entry and no NaN or `+inf`; the limits of the module policy
/// otherwise (`-ln k` for each of `k` `+inf` entries, `-ln n` for each entry of an
/// all-`-inf` row of `n`).
pub fn log_softmax(x: &[f32]) -> Vec<f64> {
    let norm = Norm::of(x);
    x.iter().map(|&v| norm.log_prob(v)).collect()
}

/// `ln P(index)` under the distribution of `x`, as [`log_softmax`] gives it; NaN for
/// an index outside the row.
pub fn log_prob(x: &[f32], index: usize) -> f64 {
    match x.get(index) {
        Some(&v) => Norm::of(x).log_prob(v),
        None => f64::NAN,
    }
}

/// `softmax(x)`: probabilities summing to 1 (within rounding), `exp(x - max)`
/// normalised in `f64`. Same as [`softmax_with_temperature`] at temperature 1.
pub fn softmax(x: &[f32]) -> Vec<f64> {
    softmax_with_temperature(x, 1.0)
}

/// `softmax(x / temperature)`: `exp((x - max) / temperature)` normalised in `f64`.
/// `temperature` should be positive: callers treat zero and NaN as greedy and never
/// get here. Non-finite logits follow the module policy (the `+inf` entries share
/// the mass, an all-`-inf` row is uniform, any NaN gives all NaN) whatever the
/// temperature.
pub fn softmax_with_temperature(x: &[f32], temperature: f64) -> Vec<f64> {
    let max = row_max(x);
    let weights: Vec<f64> = if max.is_finite() {
        let max = f64::from(max);
        x.iter()
            .map(|&v| ((f64::from(v) - max) / temperature).exp())
            .collect()
    } else if x.iter().any(|v| v.is_nan()) {
        return vec![f64::NAN; x.len()];
    } else if max == f32::INFINITY {
        x.iter()
            .map(|&v| if v == f32::INFINITY { 1.0 } else { 0.0 })
            .collect()
    } else {
        vec![1.0; x.len()]
    };
    let total: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// `KL(P || Q) = sum_i p_i (ln p_i - ln q_i)` for the distributions ([`log_softmax`])
/// of two rows of logits over the same vocabulary. Every term is summed (llama.cpp
/// skips those with `ln p_i <= -16` because its base probabilities are stored
/// quantized; here they are exact); a token with `p_i = 0` contributes 0, one with
/// `p_i > 0 = q_i` makes the result `+inf`. Identical rows give exactly 0. NaN when
/// the rows' lengths differ or either row holds a NaN.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    if p_logits.len() != q_logits.len() {
        return f64::NAN;
    }
    let (norm_p, norm_q) = (Norm::of(p_logits), Norm::of(q_logits));
    if matches!(norm_q, Norm::Nan) {
        return f64::NAN;
    }
    p_logits
        .iter()
        .zip(q_logits)
        .map(|(&p, &q)| {
            let log_p = norm_p.log_prob(p);
            if log_p == f64::NEG_INFINITY {
                0.0
            } else {
                log_p.exp() * (log_p - norm_q.log_prob(q))
            }
        })
        .sum()
}

/// Cosine similarity `a.b / (|a| |b|)`, accumulated in `f64` and clamped to
/// `[-1, 1]`; `cosine(a, a)` is exactly 1. A zero vector has no direction: 0. NaN
/// when the lengths differ or an entry is NaN.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    // One square root of the product (no overflow: |f32|^2 sums stay far inside
    // f64's range) so that identical vectors give exactly 1.
    (dot / (na * nb).sqrt()).clamp(-1.0, 1.0)
}

/// The largest non-NaN entry; `-inf` for an empty or all-NaN row.
fn row_max(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// A row's normaliser: what turns a logit into a log-probability under the module
/// policy.
#[derive(Clone, Copy, Debug)]
enum Norm {
    /// Some entry is finite, none is NaN or `+inf`: `ln sum exp(x)`, finite.
    Finite(f64),
    /// This many entries are `+inf` (and none is NaN): they share all the mass.
    PosInf(usize),
    /// Every one of this many entries (possibly 0) is `-inf`: uniform.
    NegInf(usize),
    /// Some entry is NaN.
    Nan,
}

impl Norm {
    fn of(x: &[f32]) -> Norm {
        let max = row_max(x);
        if max.is_finite() {
            let max = f64::from(max);
            // Every term is in [0, 1] and the maximum's is 1, so the sum is in
            // [1, len]; a NaN entry makes it NaN.
            let sum: f64 = x.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            return if sum.is_nan() {
                Norm::Nan
            } else {
                Norm::Finite(max + sum.ln())
            };
        }
        if x.iter().any(|v| v.is_nan()) {
            Norm::Nan
        } else if max == f32::INFINITY {
            Norm::PosInf(x.iter().filter(|&&v| v == f32::INFINITY).count())
        } else {
            Norm::NegInf(x.len())
        }
    }

    fn log_prob(self, v: f32) -> f64 {
        match self {
            Norm::Finite(lse) => f64::from(v) - lse,
            Norm::PosInf(k) if v == f32::INFINITY => -(k as f64).ln(),
            Norm::PosInf(_) => f64::NEG_INFINITY,
            Norm::NegInf(n) => -(n as f64).ln(),
            Norm::Nan => f64::NAN,
        }
    }
}

/// Logits spread over [-20, 20) in steps of 1/64, repeatable from `seed` (a small
/// LCG): for tests here and in other modules.
#[cfg(test)]
pub(crate) fn pseudo_random_logits(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32) * 40.0 - 20.0
        })
        .map(|x| (x * 64.0).round() / 64.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f32 = f32::INFINITY;
    const NEG_INF: f32 = f32::NEG_INFINITY;
    const NAN: f32 = f32::NAN;

    // Plain f64 references: the textbook formulas, no shift, no special cases.

    fn ref_log_sum_exp(x: &[f32]) -> f64 {
        x.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln()
    }

    fn naive_log_softmax(x: &[f32]) -> Vec<f64> {
        let sum: f64 = x.iter().map(|&v| f64::from(v).exp()).sum();
        x.iter().map(|&v| (f64::from(v).exp() / sum).ln()).collect()
    }

    fn ref_softmax(x: &[f32], t: f64) -> Vec<f64> {
        let exps: Vec<f64> = x.iter().map(|&v| (f64::from(v) / t).exp()).collect();
        let total: f64 = exps.iter().sum();
        exps.iter().map(|e| e / total).collect()
    }

    fn ref_kl(p: &[f32], q: &[f32]) -> f64 {
        let (p, q) = (ref_softmax(p, 1.0), ref_softmax(q, 1.0));
        p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum()
    }

    fn ref_cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    }

    fn assert_close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b} (tolerance {tol:e})");
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn argmax_never_picks_nan() {
        assert_eq!(argmax(&[NAN, -5.0, -1.0, NAN]), 2);
        // A leading NaN used to win in one of the two old copies.
        assert_eq!(argmax(&[NAN, 1.0, 2.0]), 2);
        assert_eq!(argmax(&[NAN, NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[NEG_INF, NEG_INF]), 0);
        assert_eq!(argmax(&[NAN, NEG_INF]), 1);
        assert_eq!(argmax(&[0.0, INF, NAN, INF]), 1);
    }

    #[test]
    fn argmax_matches_a_plain_scan() {
        let x = pseudo_random_logits(49152, 5);
        let max = x.iter().copied().fold(NEG_INF, f32::max);
        assert_eq!(argmax(&x), x.iter().position(|&v| v == max).unwrap());
    }

    /// Tolerance 1e-12 absolute against the unshifted f64 formula on logits within
    /// +-20 (where it cannot overflow); 1e-9 once shifted by +-8192 (f64 rounding of
    /// values near 8192).
    #[test]
    fn log_sum_exp_matches_the_plain_sum_and_survives_extreme_logits() {
        for seed in [1, 2, 3] {
            let x = pseudo_random_logits(1000, seed);
            assert_close(log_sum_exp(&x), ref_log_sum_exp(&x), 1e-12);
        }
        let x = pseudo_random_logits(1000, 4);
        for shift in [8192.0f32, -8192.0] {
            // Multiples of 1/64 within +-2^15: the shift is exact in f32.
            let shifted: Vec<f32> = x.iter().map(|&v| v + shift).collect();
            assert!(!ref_log_sum_exp(&shifted).is_finite());
            let want = ref_log_sum_exp(&x) + f64::from(shift);
            assert_close(log_sum_exp(&shifted), want, 1e-9);
        }
        // Far beyond exp's range: 1001 + ln(1 + 1/e).
        let want = 1001.0 + (1.0 + (-1f64).exp()).ln();
        assert_close(log_sum_exp(&[1000.0, 1001.0]), want, 1e-12);
        assert_eq!(log_sum_exp(&[f32::MAX, f32::MIN]), f64::from(f32::MAX));
        assert_eq!(log_sum_exp(&[7.5]), 7.5);
    }

    #[test]
    fn log_sum_exp_of_non_finite_rows() {
        // -inf entries contribute nothing.
        assert_close(
            log_sum_exp(&[0.0, NEG_INF, 0.0]),
            std::f64::consts::LN_2,
            1e-15,
        );
        assert_eq!(log_sum_exp(&[NEG_INF, NEG_INF]), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[1.0, INF, NEG_INF]), f64::INFINITY);
        assert!(log_sum_exp(&[1.0, NAN]).is_nan());
        assert!(log_sum_exp(&[NAN, NEG_INF]).is_nan());
        assert!(log_sum_exp(&[INF, NAN]).is_nan());
    }

    #[test]
    fn log_softmax_matches_naive_and_survives_extreme_logits() {
        let moderate = pseudo_random_logits(1000, 7);
        let naive = naive_log_softmax(&moderate);
        for (a, b) in log_softmax(&moderate).iter().zip(&naive) {
            assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        }
        // The same distribution shifted far up or down: the naive formula overflows
        // (inf/inf) or underflows (0/0), the shifted one must not notice the shift.
        // Values are multiples of 1/64 within +-2^15, so the shift is exact in f32.
        for shift in [8192.0f32, -8192.0] {
            let shifted: Vec<f32> = moderate.iter().map(|&x| x + shift).collect();
            assert!(naive_log_softmax(&shifted).iter().any(|v| !v.is_finite()));
            let ours = log_softmax(&shifted);
            for (a, b) in ours.iter().zip(&naive) {
                assert!((a - b).abs() < 1e-9, "shift {shift}: {a} vs {b}");
            }
        }
        // A known answer far beyond exp's range: p = (1, e) / (1 + e).
        let ls = log_softmax(&[1000.0f32, 1001.0]);
        let lse = (1.0 + std::f64::consts::E).ln();
        assert!((ls[0] + lse).abs() < 1e-12, "{ls:?}");
        assert!((ls[1] - (1.0 - lse)).abs() < 1e-12, "{ls:?}");
        // Saturated extremes stay finite where they should.
        let ls = log_softmax(&[f32::MAX, f32::MIN]);
        assert_eq!(ls[0], 0.0);
        assert!(ls[1].is_finite() && ls[1] < -6e38, "{ls:?}");
    }

    #[test]
    fn log_softmax_of_non_finite_rows_takes_the_limits() {
        let ls = log_softmax(&[0.0, NEG_INF, 0.0]);
        assert_close(ls[0], -std::f64::consts::LN_2, 1e-15);
        assert_eq!(ls[1], f64::NEG_INFINITY);
        assert_eq!(ls[0], ls[2]);
        let ls = log_softmax(&[INF, 3.0, INF, NEG_INF]);
        assert_close(ls[0], -std::f64::consts::LN_2, 1e-15);
        assert_eq!(ls[2], ls[0]);
        assert_eq!(ls[1], f64::NEG_INFINITY);
        assert_eq!(ls[3], f64::NEG_INFINITY);
        for v in log_softmax(&[NEG_INF; 4]) {
            assert_close(v, -(4f64.ln()), 1e-15);
        }
        assert!(log_softmax(&[1.0, NAN]).iter().all(|v| v.is_nan()));
        assert!(log_softmax(&[]).is_empty());
        assert_eq!(log_prob(&[INF, 3.0], 0), 0.0);
        assert!(log_prob(&[1.0, 2.0], 2).is_nan());
    }

    /// Tolerance 1e-12 absolute per probability against the plain f64 formula.
    #[test]
    fn softmax_matches_the_plain_formula() {
        let x = pseudo_random_logits(1000, 9);
        for t in [1.0, 0.5, 1.5, 7.0] {
            let ours = softmax_with_temperature(&x, t);
            for (a, b) in ours.iter().zip(ref_softmax(&x, t)) {
                assert_close(*a, b, 1e-12);
            }
            assert_close(ours.iter().sum(), 1.0, 1e-12);
        }
        assert_eq!(softmax(&x), softmax_with_temperature(&x, 1.0));
        // The same distribution as exp(log_softmax).
        for (a, b) in softmax(&x).iter().zip(log_softmax(&x)) {
            assert_close(*a, b.exp(), 1e-15);
        }
        // Extreme logits: the plain formula overflows, the shifted one does not.
        let p = softmax(&[1000.0, 1001.0]);
        let e = std::f64::consts::E;
        assert_close(p[0], 1.0 / (1.0 + e), 1e-15);
        assert_close(p[1], e / (1.0 + e), 1e-15);
    }

    #[test]
    fn softmax_of_non_finite_rows_takes_the_limits() {
        assert_eq!(softmax(&[0.0, INF, 1.0, INF]), vec![0.0, 0.5, 0.0, 0.5]);
        assert_eq!(softmax(&[NEG_INF, NEG_INF]), vec![0.5, 0.5]);
        assert_eq!(softmax(&[NEG_INF, 2.0]), vec![0.0, 1.0]);
        assert!(softmax(&[NAN, 2.0]).iter().all(|v| v.is_nan()));
        assert!(softmax(&[NAN, INF]).iter().all(|v| v.is_nan()));
        assert!(softmax(&[]).is_empty());
        // And it agrees with exp(log_softmax) there too.
        for row in [[0.0, INF, 1.0, INF], [NEG_INF; 4]] {
            for (a, b) in softmax(&row).iter().zip(log_softmax(&row)) {
                assert_close(*a, b.exp(), 1e-15);
            }
        }
    }

    #[test]
    fn kl_of_identical_distributions_is_zero() {
        let logits = pseudo_random_logits(49152, 11);
        assert_eq!(kl_divergence(&logits, &logits), 0.0);
        // Shift invariance: the same distribution written with different logits.
        let shifted: Vec<f32> = logits.iter().map(|&x| x + 512.0).collect();
        assert!(kl_divergence(&logits, &shifted).abs() < 1e-12);
    }

    #[test]
    fn kl_known_value_on_three_tokens() {
        // P = (1/2, 1/4, 1/4), Q = (1/4, 1/2, 1/4), written as logits with offsets.
        // KL(P||Q) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = (ln 2) / 4.
        let p = [0.5f32.ln() + 3.0, 0.25f32.ln() + 3.0, 0.25f32.ln() + 3.0];
        let q = [0.25f32.ln() - 1.0, 0.5f32.ln() - 1.0, 0.25f32.ln() - 1.0];
        let expected = std::f64::consts::LN_2 / 4.0;
        assert!((kl_divergence(&p, &q) - expected).abs() < 1e-7);
        // KL(Q||P) = 1/4 ln(1/2) + 1/2 ln 2 = the same here by symmetry of the example.
        assert!((kl_divergence(&q, &p) - expected).abs() < 1e-7);
        // A zero-probability token in P contributes nothing.
        let p0 = [0.0f32, f32::NEG_INFINITY, 0.0];
        let q0 = [0.0f32, 0.0, 0.0];
        // P = (1/2, 0, 1/2), Q uniform: KL = ln(3/2).
        assert!((kl_divergence(&p0, &q0) - 1.5f64.ln()).abs() < 1e-12);
    }

    /// Tolerance 1e-12 absolute against the plain f64 formula (rows within +-20).
    #[test]
    fn kl_matches_the_plain_formula() {
        for seed in [21, 22, 23] {
            let p = pseudo_random_logits(4096, seed);
            let q = pseudo_random_logits(4096, seed + 100);
            let want = ref_kl(&p, &q);
            assert!(want > 0.1, "test rows too close: {want}");
            assert_close(kl_divergence(&p, &q), want, 1e-12);
        }
    }

    #[test]
    fn kl_of_non_finite_and_mismatched_rows() {
        // Q gives no mass where P has some: infinite divergence.
        assert_eq!(kl_divergence(&[0.0, 0.0], &[0.0, NEG_INF]), f64::INFINITY);
        // +inf in P puts all its mass there.
        assert_close(
            kl_divergence(&[INF, 0.0], &[0.0, 0.0]),
            std::f64::consts::LN_2,
            1e-15,
        );
        assert!(kl_divergence(&[0.0, NAN], &[0.0, 0.0]).is_nan());
        assert!(kl_divergence(&[0.0, 0.0], &[NAN, 0.0]).is_nan());
        assert!(kl_divergence(&[0.0, 0.0], &[0.0, 0.0, 0.0]).is_nan());
        assert_eq!(kl_divergence(&[], &[]), 0.0);
    }

    /// Tolerance 1e-12 absolute against the plain f64 formula.
    #[test]
    fn cosine_matches_the_plain_formula() {
        let a = pseudo_random_logits(576, 31);
        let b = pseudo_random_logits(576, 32);
        assert_close(cosine(&a, &b), ref_cosine(&a, &b), 1e-12);
        let near: Vec<f32> = a.iter().map(|&v| v + 0.01).collect();
        assert_close(cosine(&a, &near), ref_cosine(&a, &near), 1e-12);
        // Scale does not matter (a power of two keeps every value exact); identical
        // and opposite vectors are exact.
        let scaled: Vec<f32> = a.iter().map(|&v| v * 2f32.powi(100)).collect();
        assert_close(cosine(&scaled, &b), cosine(&a, &b), 1e-12);
        assert_eq!(cosine(&a, &a), 1.0);
        assert_eq!(cosine(&scaled, &scaled), 1.0);
        let neg: Vec<f32> = a.iter().map(|&v| -v).collect();
        assert_eq!(cosine(&a, &neg), -1.0);
    }

    #[test]
    fn cosine_edge_cases() {
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
        assert_eq!(cosine(&[], &[]), 0.0);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
        assert!(cosine(&[1.0, 2.0], &[1.0]).is_nan());
        assert!(cosine(&[1.0, NAN], &[1.0, 2.0]).is_nan());
        // Tiny values do not underflow in f64.
        assert_eq!(cosine(&[1e-40, 0.0], &[1e-40, 0.0]), 1.0);
    }
}
