//! The one chunk planner: how a run state splits a token list into forward passes,
//! and the checks every backend makes before it runs any of them.

use super::error::RuntimeError;
use super::options::KvWindow;
use super::request::{ForwardOutput, ForwardRequest, Logits};
use super::state::RunState;

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

/// Refuses a step of several sequences (`RunState::forward_seqs`) naming a
/// sequence the run state lacks or twice, or whose tokens `check_tokens` refuses
/// for that sequence (`past[seq]` cached of `cells`).
pub fn check_seqs(
    batch: &[(usize, &[u32])],
    past: &[usize],
    cells: usize,
    n_vocab: usize,
) -> Result<(), RuntimeError> {
    if batch.is_empty() {
        return Err(RuntimeError::Empty);
    }
    for (i, &(seq, tokens)) in batch.iter().enumerate() {
        if seq >= past.len() {
            return Err(RuntimeError::InvalidRequest(format!(
                "sequence {seq} does not exist (the run state holds {})",
                past.len()
            )));
        }
        if batch[..i].iter().any(|&(s, _)| s == seq) {
            return Err(RuntimeError::InvalidRequest(format!(
                "sequence {seq} appears twice in one step"
            )));
        }
        check_tokens(tokens, past[seq], cells, n_vocab)?;
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

/// How every backend evaluates `tokens` through a KV window: in blocks of at most
/// half the window's recent part (and `n_batch`), evicting just enough before each
/// block that it fits (`RunState::context_shift` past the sink), so every token
/// sees the sink and at least half a window of recent context. `append` runs one
/// block on the unwindowed path. Returns the output and how many tokens it evicted.
pub fn windowed<'m, S: RunState<'m> + ?Sized>(
    state: &mut S,
    w: KvWindow,
    n_batch: usize,
    tokens: &[u32],
    req: ForwardRequest,
    mut append: impl FnMut(&mut S, &[u32], ForwardRequest) -> Result<ForwardOutput, RuntimeError>,
) -> Result<(ForwardOutput, usize), RuntimeError> {
    if tokens.is_empty() {
        return Err(RuntimeError::Empty);
    }
    let block = (w.recent / 2).clamp(1, n_batch.max(1));
    let mut out = ForwardOutput::default();
    let mut evicted = 0;
    for (b, logits) in plan(tokens, block, req.logits) {
        let overflow = (state.n_past() + b.len()).saturating_sub(w.cells());
        if overflow > 0 {
            state.context_shift(w.sink, overflow)?;
            evicted += overflow;
        }
        out.append(append(state, b, ForwardRequest { logits, ..req })?);
    }
    Ok((out, evicted))
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
