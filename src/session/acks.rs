//! The acknowledgment window of one session: which envelope IDs the peer asked to have
//! acknowledged, whether each is still being handled, and the answer given, so that a retried
//! ID is answered again (once per retry) without a second delivery.
//!
//! Only answers that say the component got the message are remembered (`ok: true`, and a
//! `timeout`, whose call may still finish): a message that was refused, found no handler, or
//! whose handler returned an error is delivered again when retried.
//!
//! An answer is remembered for [`ACK_WINDOW`] or until [`ACK_WINDOW_ENTRIES`] newer answers
//! have been given, whichever comes first; a retry after that is delivered as a new message.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an answer is remembered for retries of its ID.
pub const ACK_WINDOW: Duration = Duration::from_secs(60);
/// How many answers a session remembers at most.
pub const ACK_WINDOW_ENTRIES: usize = 1024;

enum Entry {
    /// Being handled; `repeats` retries arrived meanwhile and are owed an answer too.
    Pending { repeats: usize },
    /// Answered with `frame`.
    Done { frame: Arc<str> },
}

#[derive(Default)]
struct Window {
    entries: HashMap<String, Entry>,
    /// Answered IDs, oldest first, with when they were answered.
    answered: VecDeque<(String, Instant)>,
}

/// What a session does with an acknowledged envelope.
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// A new ID: deliver it, then answer through [`Acks::finish`].
    New,
    /// A retry of an ID still being handled: its answer will be written once more.
    Pending,
    /// A retry of an answered ID: write this answer again, do not deliver.
    Repeat(Arc<str>),
}

#[derive(Default)]
pub struct Acks {
    window: Mutex<Window>,
}

impl Acks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the peer sent an envelope with `id` and asked for an acknowledgment.
    pub fn begin(&self, id: &str) -> Begin {
        let mut window = self.lock();
        window.forget_old(Instant::now());
        match window.entries.get_mut(id) {
            None => {
                window
                    .entries
                    .insert(id.to_string(), Entry::Pending { repeats: 0 });
                Begin::New
            }
            Some(Entry::Pending { repeats }) => {
                *repeats += 1;
                Begin::Pending
            }
            Some(Entry::Done { frame }) => Begin::Repeat(Arc::clone(frame)),
        }
    }

    /// Forgets `id` after an answer a retry should not get again (the message was not handled);
    /// returns how many times to write that answer, as [`Acks::finish`] does.
    pub fn give_up(&self, id: &str) -> usize {
        match self.lock().entries.remove(id) {
            Some(Entry::Pending { repeats }) => 1 + repeats,
            _ => 1,
        }
    }

    /// Records the answer to `id`; returns how many times to write it (1, plus one for each
    /// retry that arrived while it was being handled).
    pub fn finish(&self, id: &str, frame: Arc<str>) -> usize {
        let mut window = self.lock();
        let now = Instant::now();
        let repeats = match window.entries.insert(id.to_string(), Entry::Done { frame }) {
            Some(Entry::Pending { repeats }) => repeats,
            _ => 0,
        };
        window.answered.push_back((id.to_string(), now));
        window.forget_old(now);
        1 + repeats
    }
}

impl Window {
    fn forget_old(&mut self, now: Instant) {
        while let Some((id, at)) = self.answered.front() {
            let expired = now.saturating_duration_since(*at) > ACK_WINDOW;
            if !expired && self.answered.len() <= ACK_WINDOW_ENTRIES {
                break;
            }
            if matches!(self.entries.get(id), Some(Entry::Done { .. })) {
                self.entries.remove(id);
            }
            self.answered.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_answered_again_not_delivered_again() {
        let acks = Acks::default();
        assert_eq!(acks.begin("a"), Begin::New);
        assert_eq!(acks.begin("a"), Begin::Pending);
        assert_eq!(acks.begin("a"), Begin::Pending);
        assert_eq!(
            acks.finish("a", Arc::from("A")),
            3,
            "once, and once per retry"
        );
        assert_eq!(acks.begin("a"), Begin::Repeat(Arc::from("A")));
        assert_eq!(acks.begin("b"), Begin::New);
        assert_eq!(acks.begin("b"), Begin::Pending);
        assert_eq!(acks.give_up("b"), 2);
        assert_eq!(
            acks.begin("b"),
            Begin::New,
            "a failed message is delivered again"
        );
    }

    #[test]
    fn the_window_is_bounded() {
        let acks = Acks::default();
        for i in 0..=ACK_WINDOW_ENTRIES {
            let id = i.to_string();
            assert_eq!(acks.begin(&id), Begin::New);
            acks.finish(&id, Arc::from("x"));
        }
        assert_eq!(
            acks.begin("0"),
            Begin::New,
            "the oldest answer is forgotten"
        );
        assert_eq!(acks.begin("1"), Begin::Repeat(Arc::from("x")));
        assert!(acks.lock().entries.len() <= ACK_WINDOW_ENTRIES + 1);
    }
}
