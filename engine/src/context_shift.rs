//! Keeping a conversation inside the context, as llama.cpp's and Ollama's chats do: when it
//! outgrows the context, the oldest turns after the system prompt are dropped and what remains
//! is evaluated again.
//!
//! [`trim_history`] picks what to keep: every leading system message, then the newest turns
//! (a turn starts at a user message and holds the replies after it) whose rendering fits a
//! token budget. It renders nothing itself: the caller's `count` renders and tokenizes a
//! candidate list of messages (with its own template, in whatever process it renders in), so
//! a chat front end and the server share the choice.

use crate::chat::ChatMessage;

/// What [`trim_history`] kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trimmed {
    /// The leading system messages (kept whatever happens).
    pub system: usize,
    /// Index of the first kept message after them; the messages between `system` and `start`
    /// are dropped.
    pub start: usize,
    /// Turns dropped (user messages among the dropped ones, or 1 for replies before any).
    pub dropped_turns: usize,
    /// Tokens of the kept conversation, as `count` gave them.
    pub tokens: usize,
}

impl Trimmed {
    /// Messages dropped.
    pub fn dropped_messages(&self) -> usize {
        self.start - self.system
    }

    /// The kept conversation: the system messages, then messages `start..`.
    pub fn kept(&self, messages: &[ChatMessage]) -> Vec<ChatMessage> {
        let mut kept = messages[..self.system].to_vec();
        kept.extend_from_slice(&messages[self.start..]);
        kept
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrimError<E> {
    /// Even the system prompt with the newest turn alone is over the limit.
    #[error(
        "the system prompt and the newest turn take {tokens} tokens, more than the {limit} \
         the context has room for"
    )]
    TooLong { tokens: usize, limit: usize },
    /// `count` failed (the template or the tokenizer).
    #[error(transparent)]
    Count(E),
}

/// Choose the messages to keep so that their rendering takes at most `target` tokens, dropping
/// whole turns from the oldest (after the leading system messages); the newest turn is always
/// kept, and then it is enough to fit `limit` (`target <= limit`). `count(messages)` is the
/// token count of a candidate list. Dropping nothing is a valid answer when everything fits.
///
/// Candidates are tried by bisection over the turn boundaries (a rendering grows with the
/// messages in it), so `count` runs about log2(turns) + 2 times; the answer is always a list
/// `count` measured within the bound.
pub fn trim_history<E>(
    messages: &[ChatMessage],
    target: usize,
    limit: usize,
    mut count: impl FnMut(&[ChatMessage]) -> Result<usize, E>,
) -> Result<Trimmed, TrimError<E>> {
    let system = messages.iter().take_while(|m| m.role == "system").count();
    // Where a kept conversation may start: the first message after the system prompt, or any
    // later user message.
    let mut starts: Vec<usize> = (system..messages.len())
        .filter(|&i| i == system || messages[i].role == "user")
        .collect();
    if starts.is_empty() {
        starts.push(messages.len());
    }
    let mut measure = |si: usize| -> Result<Trimmed, TrimError<E>> {
        let start = starts[si];
        let dropped_turns = messages[system..start]
            .iter()
            .filter(|m| m.role == "user")
            .count()
            .max(usize::from(start > system));
        let mut t = Trimmed {
            system,
            start,
            dropped_turns,
            tokens: 0,
        };
        t.tokens = count(&t.kept(messages)).map_err(TrimError::Count)?;
        Ok(t)
    };
    let all = measure(0)?;
    if all.tokens <= target {
        return Ok(all);
    }
    let last = starts.len() - 1;
    let newest = measure(last)?;
    if newest.tokens > target {
        return if newest.tokens <= limit {
            Ok(newest)
        } else {
            Err(TrimError::TooLong {
                tokens: newest.tokens,
                limit,
            })
        };
    }
    // The earliest start that fits: starts[lo] does not fit, starts[hi] does.
    let (mut lo, mut hi, mut best) = (0, last, newest);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let t = measure(mid)?;
        if t.tokens <= target {
            (hi, best) = (mid, t);
        } else {
            lo = mid;
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(turns: usize, system: bool) -> Vec<ChatMessage> {
        let mut m = vec![];
        if system {
            m.push(ChatMessage::system("be brief"));
        }
        for i in 0..turns {
            m.push(ChatMessage::user(format!("question {i}")));
            if i + 1 < turns {
                m.push(ChatMessage::assistant(format!("answer {i}")));
            }
        }
        m
    }

    /// 10 tokens per message: a stand-in for rendering and tokenizing.
    fn ten_each(m: &[ChatMessage]) -> Result<usize, std::convert::Infallible> {
        Ok(10 * m.len())
    }

    #[test]
    fn everything_kept_when_it_fits() {
        let m = chat(3, true);
        let t = trim_history(&m, 60, 100, ten_each).unwrap();
        assert_eq!((t.start, t.dropped_turns, t.tokens), (1, 0, 60));
        assert_eq!(t.kept(&m), m);
    }

    #[test]
    fn oldest_turns_go_first_and_the_system_prompt_stays() {
        // system + 5 turns (9 user/assistant messages) = 100 tokens; a target of 55 keeps the
        // system prompt and the newest 2 full turns plus the new question (5 messages).
        let m = chat(5, true);
        let t = trim_history(&m, 55, 100, ten_each).unwrap();
        let kept = t.kept(&m);
        assert_eq!(kept[0], ChatMessage::system("be brief"));
        assert_eq!(kept[1], ChatMessage::user("question 3"));
        assert_eq!(kept.last(), Some(&ChatMessage::user("question 4")));
        assert_eq!(
            (t.dropped_turns, t.dropped_messages(), t.tokens),
            (3, 6, 40)
        );
        // The most that fits: one turn more would be 60 > 55.
        assert!(t.tokens + 20 > 55);
    }

    #[test]
    fn the_newest_turn_alone_may_use_the_limit_but_not_more() {
        let mut m = chat(3, true);
        // A huge newest question: 10 + 10 + 500 tokens alone.
        let big = "x".repeat(500);
        *m.last_mut().unwrap() = ChatMessage::user(big.clone());
        let count = |m: &[ChatMessage]| -> Result<usize, ()> {
            Ok(m.iter().map(|x| x.content.len().max(10)).sum())
        };
        let t = trim_history(&m, 100, 600, count).unwrap();
        assert_eq!(
            t.kept(&m),
            vec![ChatMessage::system("be brief"), ChatMessage::user(big)]
        );
        assert_eq!(t.tokens, 510);
        match trim_history(&m, 100, 400, count) {
            Err(TrimError::TooLong {
                tokens: 510,
                limit: 400,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_system_prompt_and_count_errors() {
        let m = chat(4, false);
        let t = trim_history(&m, 30, 100, ten_each).unwrap();
        assert_eq!(t.kept(&m)[0], ChatMessage::user("question 2"));
        assert_eq!(t.system, 0);
        let e = trim_history(&m, 30, 100, |_| Err::<usize, _>("template failed"));
        assert!(matches!(e, Err(TrimError::Count("template failed"))));
    }

    #[test]
    fn counts_few_candidates() {
        // 200 turns: bisection, not one render per turn.
        let m = chat(200, true);
        let mut calls = 0;
        let t = trim_history(&m, 1000, 2000, |x| {
            calls += 1;
            ten_each(x)
        })
        .unwrap();
        // From question 150 on: the system prompt and 99 messages, exactly the target.
        assert_eq!(t.tokens, 1000);
        assert_eq!(t.kept(&m)[1], ChatMessage::user("question 150"));
        assert!(calls <= 12, "{calls} renders");
    }
}
