//! Recovery (`RECOVERY=true`, `FORMAT=json`): every message the provider writes to a session
//! carries a per-session sequence number `"seq"` and is kept in the link's history in
//! JetStream ([`history`]), so a client that comes back with its resume token ([`token`]) and
//! the last `seq` it saw gets what it missed, in order, before live messages.
//!
//! [`Sequencer`] is a session's part: it numbers the session's messages in the order they are
//! queued for its socket and starts storing each before it is queued, so a resume that holds
//! the sequencer sees every numbered message stored or failed.

pub mod history;
pub mod token;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard, Notify};

pub use history::{History, Stored};
pub use token::{link_tag, Claims, Tokens};

/// The key resume tokens are signed with, one per provider process (an error, for the link
/// that needs it, when the system has no randomness).
pub fn tokens() -> Result<&'static Tokens, String> {
    static TOKENS: OnceLock<Result<Tokens, String>> = OnceLock::new();
    TOKENS
        .get_or_init(Tokens::new)
        .as_ref()
        .map_err(Clone::clone)
}

/// How long a resume waits for the messages already numbered to be stored.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// A session's message numbering and its way into the history.
pub struct Sequencer {
    pub history: Arc<History>,
    /// The last sequence number given out (0: none yet).
    last: Mutex<u64>,
    /// Messages numbered whose storing has not finished.
    storing: AtomicUsize,
    stored: Notify,
}

impl Sequencer {
    pub fn new(history: Arc<History>) -> Self {
        Self {
            history,
            last: Mutex::new(0),
            storing: AtomicUsize::new(0),
            stored: Notify::new(),
        }
    }

    /// Holds the numbering: while held, no message of the session is numbered or queued.
    pub async fn hold(&self) -> MutexGuard<'_, u64> {
        self.last.lock().await
    }

    /// [`Sequencer::hold`], waiting until `deadline` at most (a resume may hold it a while).
    pub async fn hold_until(&self, deadline: tokio::time::Instant) -> Option<MutexGuard<'_, u64>> {
        tokio::time::timeout_at(deadline, self.last.lock())
            .await
            .ok()
    }

    /// Counts a message whose storing starts now (call under [`Sequencer::hold`]) until the
    /// returned guard is dropped.
    pub fn begin(&self) -> Storing<'_> {
        self.storing.fetch_add(1, Ordering::AcqRel);
        Storing(self)
    }

    /// Waits (bounded) until every message numbered so far is stored or failed. Call it under
    /// [`Sequencer::hold`], so that no new one starts.
    pub async fn settled(&self) {
        let _ = tokio::time::timeout(SETTLE_WAIT, async {
            loop {
                let notified = self.stored.notified();
                if self.storing.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

/// A message being stored, counted until dropped (also when its publish is given up).
pub struct Storing<'a>(&'a Sequencer);

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        if self.0.storing.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.stored.notify_waiters();
        }
    }
}

/// Client mode: messages published while the connection is down, kept in the history and
/// written in order once it is back (instead of failing after `PUBLISH_WAIT_MS`).
pub struct Keeper {
    pub history: Arc<History>,
    kept: Mutex<Kept>,
}

/// What a [`Keeper`] holds now.
#[derive(Default)]
pub struct Kept {
    /// The number of the last message kept (they are stored in this order).
    pub last: u64,
    /// Messages kept and not yet written.
    pub pending: usize,
    /// The number of the last kept message whose write was confirmed.
    pub flushed: u64,
}

impl Keeper {
    pub fn new(history: Arc<History>) -> Self {
        Self {
            history,
            kept: Mutex::default(),
        }
    }

    /// Holds the kept messages: while held, nothing is kept, queued past them or flushed.
    pub async fn hold(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().await
    }

    /// [`Keeper::hold`], waiting until `deadline` at most (a flush may hold it a while).
    pub async fn hold_until(&self, deadline: tokio::time::Instant) -> Option<MutexGuard<'_, Kept>> {
        tokio::time::timeout_at(deadline, self.kept.lock())
            .await
            .ok()
    }
}

/// `frame` (an envelope, a JSON object) with `"seq": seq` first.
pub fn with_seq(frame: &str, seq: u64) -> String {
    match frame.strip_prefix('{') {
        Some(rest) if rest.trim_start().starts_with('}') => format!("{{\"seq\":{seq}}}"),
        Some(rest) => format!("{{\"seq\":{seq},{rest}"),
        None => frame.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_goes_first_and_the_envelope_stays_valid() {
        let frame = crate::envelope::encode("s", b"hi", Some("r"));
        let numbered = with_seq(&frame, 42);
        let v: serde_json::Value = serde_json::from_str(&numbered).expect("json");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["subject"], "s");
        assert_eq!(v["body"], "hi");
        assert!(numbered.starts_with("{\"seq\":42,"));
        assert_eq!(with_seq("{}", 1), "{\"seq\":1}");
    }
}
