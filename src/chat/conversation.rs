//! The pure bookkeeping behind a chat: which turns to drop when the context is full,
//! and how to bring the KV cache from the tokens it holds to the tokens a conversation
//! renders to while re-using as much as possible.

use super::{Message, Role};

/// Removes the oldest turn (a user message and everything up to the next user
/// message) that follows the leading system messages. The last user message, the one
/// about to be answered, is never removed. Returns how many messages were removed
/// (0 when there was nothing to drop).
pub fn drop_oldest_turn(messages: &mut Vec<Message>) -> usize {
    let start = messages
        .iter()
        .take_while(|m| m.role == Role::System)
        .count();
    let Some(last_user) = messages.iter().rposition(|m| m.role == Role::User) else {
        return 0;
    };
    if last_user <= start {
        return 0;
    }
    // The first turn runs to the next user message after `start`.
    let end = messages[start + 1..]
        .iter()
        .position(|m| m.role == Role::User)
        .map_or(messages.len(), |i| start + 1 + i);
    if end > last_user {
        return 0;
    }
    messages.drain(start..end);
    end - start
}

/// What fitting a conversation into the context did.
#[derive(Debug, PartialEq, Eq)]
pub struct Fitted {
    /// Tokens of the conversation that fits.
    pub tokens: Vec<u32>,
    /// Turns dropped and the messages they held.
    pub dropped_turns: usize,
    pub dropped_messages: usize,
}

/// Drops the oldest turns from `messages` until its tokens (first `tokens`, then
/// `retokenize(messages)` after each drop) number at most `budget`, or nothing more
/// can be dropped. The result may still exceed `budget`; the caller decides whether
/// what is left is usable.
pub fn fit_to_budget<E>(
    messages: &mut Vec<Message>,
    tokens: Vec<u32>,
    budget: usize,
    mut retokenize: impl FnMut(&[Message]) -> Result<Vec<u32>, E>,
) -> Result<Fitted, E> {
    let mut fitted = Fitted {
        tokens,
        dropped_turns: 0,
        dropped_messages: 0,
    };
    while fitted.tokens.len() > budget {
        let removed = drop_oldest_turn(messages);
        if removed == 0 {
            break;
        }
        fitted.dropped_turns += 1;
        fitted.dropped_messages += removed;
        fitted.tokens = retokenize(messages)?;
    }
    Ok(fitted)
}

pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How to turn the cached tokens into a prefix of the target tokens: keep the first
/// `keep`, discard the `discard` after them, keep the `retain` after those (they now
/// follow position `keep`), and drop the rest of the cache. The target's tokens from
/// `keep + retain` on must then be evaluated.
///
/// `discard > 0` is the context-shift case: the dropped turns sat between the
/// kept prefix (system prompt) and the retained later turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachePlan {
    pub keep: usize,
    pub discard: usize,
    pub retain: usize,
}

impl CachePlan {
    /// Tokens the cache holds once the plan is carried out.
    pub fn cached_after(&self) -> usize {
        self.keep + self.retain
    }
}

pub fn plan_cache_sync(cached: &[u32], target: &[u32]) -> CachePlan {
    let keep = common_prefix_len(cached, target);
    let no_shift = CachePlan {
        keep,
        discard: 0,
        retain: 0,
    };
    if keep == cached.len() || keep == target.len() {
        return no_shift;
    }
    let wanted = &target[keep..];
    let stale = &cached[keep..];
    // The discard length that lets the longest run of cached tokens move down intact.
    let mut best = no_shift;
    for discard in 1..stale.len() {
        if stale[discard] != wanted[0] {
            continue;
        }
        let retain = common_prefix_len(&stale[discard..], wanted);
        if retain > best.retain {
            best = CachePlan {
                keep,
                discard,
                retain,
            };
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys(t: &str) -> Message {
        Message::new(Role::System, t)
    }
    fn user(t: &str) -> Message {
        Message::new(Role::User, t)
    }
    fn bot(t: &str) -> Message {
        Message::new(Role::Assistant, t)
    }

    fn contents(m: &[Message]) -> Vec<&str> {
        m.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn drops_the_oldest_turn_after_the_system_prompt() {
        let mut m = vec![
            sys("s"),
            user("u1"),
            bot("a1"),
            user("u2"),
            bot("a2"),
            user("u3"),
        ];
        assert_eq!(drop_oldest_turn(&mut m), 2);
        assert_eq!(contents(&m), ["s", "u2", "a2", "u3"]);
        assert_eq!(drop_oldest_turn(&mut m), 2);
        assert_eq!(contents(&m), ["s", "u3"]);
        assert_eq!(
            drop_oldest_turn(&mut m),
            0,
            "the pending user message stays"
        );
        assert_eq!(contents(&m), ["s", "u3"]);
    }

    #[test]
    fn drops_turns_without_a_system_prompt_and_with_several_replies() {
        let mut m = vec![user("u1"), bot("a1"), bot("a1b"), user("u2")];
        assert_eq!(drop_oldest_turn(&mut m), 3);
        assert_eq!(contents(&m), ["u2"]);
        assert_eq!(drop_oldest_turn(&mut m), 0);
    }

    #[test]
    fn finished_conversation_keeps_its_last_user_turn() {
        // A conversation that ends with a reply: the last turn is still kept.
        let mut m = vec![sys("s"), user("u1"), bot("a1"), user("u2"), bot("a2")];
        assert_eq!(drop_oldest_turn(&mut m), 2);
        assert_eq!(contents(&m), ["s", "u2", "a2"]);
        assert_eq!(drop_oldest_turn(&mut m), 0);
        let mut only_system = vec![sys("s")];
        assert_eq!(drop_oldest_turn(&mut only_system), 0);
        let mut empty: Vec<Message> = Vec::new();
        assert_eq!(drop_oldest_turn(&mut empty), 0);
    }

    /// One token per word, plus one per message for the template's markers.
    fn word_tokens(m: &[Message]) -> Result<Vec<u32>, std::convert::Infallible> {
        let n: usize = m
            .iter()
            .map(|m| 1 + m.content.split_whitespace().count())
            .sum();
        Ok((0..n as u32).collect())
    }

    #[test]
    fn fit_drops_just_enough_turns() {
        let mut m = vec![
            sys("be brief"),
            user("one two three"),
            bot("four five six seven"),
            user("eight"),
            bot("nine ten"),
            user("eleven twelve"),
        ];
        let first = word_tokens(&m).unwrap();
        assert_eq!(first.len(), 3 + 4 + 5 + 2 + 3 + 3);
        let fitted = fit_to_budget(&mut m, first, 12, word_tokens).unwrap();
        assert_eq!(fitted.dropped_turns, 1);
        assert_eq!(fitted.dropped_messages, 2);
        assert_eq!(fitted.tokens.len(), 3 + 2 + 3 + 3);
        assert_eq!(
            contents(&m),
            ["be brief", "eight", "nine ten", "eleven twelve"]
        );
    }

    #[test]
    fn fit_stops_when_nothing_more_can_go() {
        let mut m = vec![sys("a b c d e f"), user("g h"), bot("i"), user("j k l m")];
        let first = word_tokens(&m).unwrap();
        let fitted = fit_to_budget(&mut m, first, 4, word_tokens).unwrap();
        assert_eq!(fitted.dropped_turns, 1);
        assert_eq!(
            fitted.tokens.len(),
            7 + 5,
            "still over budget; the caller decides"
        );
        assert_eq!(contents(&m), ["a b c d e f", "j k l m"]);
    }

    #[test]
    fn fit_leaves_a_conversation_that_fits_alone() {
        let mut m = vec![user("hello"), bot("hi"), user("again")];
        let first = vec![7; 6];
        let fitted = fit_to_budget(&mut m, first.clone(), 6, word_tokens).unwrap();
        assert_eq!(
            fitted,
            Fitted {
                tokens: first,
                dropped_turns: 0,
                dropped_messages: 0
            }
        );
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn appending_keeps_the_whole_cache() {
        let plan = plan_cache_sync(&[1, 2, 3], &[1, 2, 3, 4, 5]);
        assert_eq!(
            plan,
            CachePlan {
                keep: 3,
                discard: 0,
                retain: 0
            }
        );
        assert_eq!(plan.cached_after(), 3);
    }

    #[test]
    fn a_changed_middle_truncates_to_the_common_prefix() {
        let plan = plan_cache_sync(&[1, 2, 3, 4], &[1, 2, 9, 4, 5]);
        assert_eq!(plan.cached_after(), 2);
        assert_eq!(plan.discard, 0);
        // Target shorter than the cache and a prefix of it.
        let plan = plan_cache_sync(&[1, 2, 3, 4], &[1, 2]);
        assert_eq!(plan.cached_after(), 2);
        assert_eq!(plan_cache_sync(&[], &[1]).cached_after(), 0);
    }

    #[test]
    fn dropped_turns_become_a_discard_between_prefix_and_kept_tail() {
        // system = [1, 2]; turns [10, 11] [20, 21, 22] [30, 31]; the new target drops
        // the first turn and adds a new one.
        let cached = [1, 2, 10, 11, 20, 21, 22, 30, 31];
        let target = [1, 2, 20, 21, 22, 30, 31, 40, 41];
        let plan = plan_cache_sync(&cached, &target);
        assert_eq!(
            plan,
            CachePlan {
                keep: 2,
                discard: 2,
                retain: 5
            }
        );
        let mut after: Vec<u32> = cached[..plan.keep].to_vec();
        after.extend_from_slice(
            &cached[plan.keep + plan.discard..plan.keep + plan.discard + plan.retain],
        );
        assert_eq!(after, target[..plan.cached_after()]);
    }

    #[test]
    fn discard_picks_the_longest_reusable_run() {
        // Token 21 starts two runs in the stale part; the later one is longer.
        let cached = [1, 5, 21, 9, 21, 22, 23];
        let target = [1, 21, 22, 23, 24];
        let plan = plan_cache_sync(&cached, &target);
        assert_eq!(plan.keep, 1);
        assert_eq!(plan.discard, 3);
        assert_eq!(plan.retain, 3);
        let mut after: Vec<u32> = cached[..plan.keep].to_vec();
        after.extend_from_slice(
            &cached[plan.keep + plan.discard..plan.keep + plan.discard + plan.retain],
        );
        assert_eq!(after, target[..plan.cached_after()]);
    }
}
