//! The one chunk planner: how a run state splits a token list into forward passes,
//! and the checks every backend makes before it runs any of them.

use super::error::RuntimeError;
use super::request::Logits;

/// Refuses an empty list, a list that would overflow the context, or a token
/// outside the vocabulary, before anything runs.
pub fn check_tokens(
    tokens: &[u32],
    n_past: usize,
    n_ctx: usize,
    n_vocab: usize,
) -> Result<(), RuntimeError> {
    if tokens.is_empty() {
        return Err(RuntimeError::Empty);
    }
    let needed = n_past + tokens.len();
    if needed > n_ctx {
        return Err(RuntimeError::ContextFull { needed, n_ctx });
    }
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(RuntimeError::BadToken { id, n_vocab });
    }
    Ok(())
}

/// `tokens` in passes of at most `len` tokens, each with the logits it must
/// return: `Logits::Last` is the last pass's only (earlier passes return none),
/// `All` and `None` apply to every pass.
pub fn plan(tokens: &[u32], len: usize, logits: Logits) -> Vec<(&[u32], Logits)> {
    let chunks: Vec<&[u32]> = tokens.chunks(len.max(1)).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let want = match logits {
                Logits::Last if i + 1 < n => Logits::None,
                other => other,
            };
            (c, want)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_pass_returns_last_logits() {
        let t: Vec<u32> = (0..10).collect();
        let p = plan(&t, 4, Logits::Last);
        let lens: Vec<usize> = p.iter().map(|(c, _)| c.len()).collect();
        assert_eq!(lens, [4, 4, 2]);
        let wants: Vec<Logits> = p.iter().map(|(_, l)| *l).collect();
        assert_eq!(wants, [Logits::None, Logits::None, Logits::Last]);
        assert!(plan(&t, 4, Logits::All)
            .iter()
            .all(|(_, l)| *l == Logits::All));
        assert_eq!(plan(&t, 0, Logits::Last).len(), 10);
    }

    #[test]
    fn checks_refuse_empty_overflow_and_bad_ids() {
        assert!(matches!(
            check_tokens(&[], 0, 8, 5),
            Err(RuntimeError::Empty)
        ));
        assert!(matches!(
            check_tokens(&[1, 2], 7, 8, 5),
            Err(RuntimeError::ContextFull {
                needed: 9,
                n_ctx: 8
            })
        ));
        assert!(matches!(
            check_tokens(&[1, 5], 0, 8, 5),
            Err(RuntimeError::BadToken { id: 5, n_vocab: 5 })
        ));
        assert!(check_tokens(&[1, 4], 6, 8, 5).is_ok());
    }
}
