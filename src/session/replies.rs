//! What waits for a session's peer: requests a component made (`consumer.request`), matched by
//! the reply subject (inbox) written in the request's envelope, and `send-acked` calls, matched
//! by the message ID the peer's `{"ack": ...}` names.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::envelope::Envelope;

/// Requests (and, apart, acknowledged sends) that may wait on one session at once.
pub const MAX_PENDING_REQUESTS: usize = 10_000;

/// What a peer's ack answer says: handled, or the peer's reason why not.
pub type PeerOutcome = Result<(), String>;

/// Callers waiting for one answer each, by key.
struct Waiting<T>(Mutex<HashMap<String, oneshot::Sender<T>>>);

impl<T> Waiting<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<T>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expect(
        &self,
        key: String,
        full: impl FnOnce() -> String,
    ) -> Result<oneshot::Receiver<T>, String> {
        let mut waiting = self.lock();
        if waiting.len() >= MAX_PENDING_REQUESTS {
            return Err(full());
        }
        let (tx, rx) = oneshot::channel();
        waiting.insert(key, tx);
        Ok(rx)
    }

    /// Hands `value` to the caller waiting on `key`; gives it back if none waits. A caller that
    /// gave up in the meantime simply drops it.
    fn resolve(&self, key: &str, value: T) -> Option<T> {
        let waiting = self.lock().remove(key);
        match waiting {
            Some(tx) => {
                let _ = tx.send(value);
                None
            }
            None => Some(value),
        }
    }
}

/// What waits on one session.
pub struct Replies {
    id: Uuid,
    /// Requests, by inbox.
    requests: Waiting<Envelope>,
    /// `send-acked` calls waiting for the peer's `{"ack": ...}`, by message ID.
    acks: Waiting<PeerOutcome>,
}

impl Replies {
    pub(super) fn new(id: Uuid) -> Self {
        Self {
            id,
            requests: Waiting(Mutex::default()),
            acks: Waiting(Mutex::default()),
        }
    }

    /// Registers a request waiting for the envelope the peer sends to `inbox`.
    pub fn expect(&self, inbox: String) -> Result<oneshot::Receiver<Envelope>, String> {
        self.requests.expect(inbox, || {
            format!(
                "session {} already has {MAX_PENDING_REQUESTS} requests waiting",
                self.id
            )
        })
    }

    pub fn forget(&self, inbox: &str) {
        self.requests.lock().remove(inbox);
    }

    /// Hands `envelope` to the request waiting on its subject; gives it back if none waits.
    pub fn resolve(&self, envelope: Envelope) -> Option<Envelope> {
        let subject = envelope.subject.clone();
        self.requests.resolve(&subject, envelope)
    }

    /// Registers a `send-acked` call waiting for the peer's ack of message `id`.
    pub fn expect_ack(&self, id: String) -> Result<oneshot::Receiver<PeerOutcome>, String> {
        self.acks.expect(id, || {
            format!(
                "session {} already has {MAX_PENDING_REQUESTS} acknowledged sends waiting",
                self.id
            )
        })
    }

    pub fn forget_ack(&self, id: &str) {
        self.acks.lock().remove(id);
    }

    /// Hands the peer's ack of message `id` to the call waiting for it; `false` if none waits
    /// (an unknown ID, or a call that gave up at its timeout).
    pub fn resolve_ack(&self, id: &str, outcome: PeerOutcome) -> bool {
        self.acks.resolve(id, outcome).is_none()
    }

    /// Ends every request waiting for a reply and every send waiting for an ack: the session
    /// is gone.
    pub(super) fn end_all(&self) {
        self.requests.lock().clear();
        self.acks.lock().clear();
    }
}
