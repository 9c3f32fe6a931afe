//! Requests a component made on one session (`consumer.request`) that wait for the peer's
//! reply, matched by the reply subject (inbox) written in the request's envelope.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::envelope::Envelope;

/// Requests that may wait for a reply on one session at once.
pub const MAX_PENDING_REQUESTS: usize = 10_000;

/// The requests waiting on one session, by inbox.
pub struct Replies {
    id: Uuid,
    pending: Mutex<HashMap<String, oneshot::Sender<Envelope>>>,
    /// `send-acked` calls waiting for the peer's `{"ack": ...}`, by message ID.
    acks: Mutex<HashMap<String, oneshot::Sender<Result<(), String>>>>,
}

/// What a peer's ack answer says: handled, or the peer's reason why not.
pub type PeerOutcome = Result<(), String>;

impl Replies {
    pub(super) fn new(id: Uuid) -> Self {
        Self {
            id,
            pending: Mutex::default(),
            acks: Mutex::default(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Envelope>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request waiting for the envelope the peer sends to `inbox`.
    pub fn expect(&self, inbox: String) -> Result<oneshot::Receiver<Envelope>, String> {
        let mut pending = self.pending();
        if pending.len() >= MAX_PENDING_REQUESTS {
            return Err(format!(
                "session {} already has {MAX_PENDING_REQUESTS} requests waiting",
                self.id
            ));
        }
        let (tx, rx) = oneshot::channel();
        pending.insert(inbox, tx);
        Ok(rx)
    }

    pub fn forget(&self, inbox: &str) {
        self.pending().remove(inbox);
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<PeerOutcome>>> {
        self.acks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a `send-acked` call waiting for the peer's ack of message `id`.
    pub fn expect_ack(&self, id: String) -> Result<oneshot::Receiver<PeerOutcome>, String> {
        let mut acks = self.acks();
        if acks.len() >= MAX_PENDING_REQUESTS {
            return Err(format!(
                "session {} already has {MAX_PENDING_REQUESTS} acknowledged sends waiting",
                self.id
            ));
        }
        let (tx, rx) = oneshot::channel();
        acks.insert(id, tx);
        Ok(rx)
    }

    pub fn forget_ack(&self, id: &str) {
        self.acks().remove(id);
    }

    /// Hands the peer's ack of message `id` to the call waiting for it; `false` if none waits
    /// (an unknown ID, or a call that gave up at its timeout).
    pub fn resolve_ack(&self, id: &str, outcome: PeerOutcome) -> bool {
        let waiting = self.acks().remove(id);
        waiting.is_some_and(|tx| tx.send(outcome).is_ok())
    }

    /// Ends every request waiting for a reply and every send waiting for an ack: the session
    /// is gone.
    pub(super) fn end_all(&self) {
        self.pending().clear();
        self.acks().clear();
    }

    /// Hands `envelope` to the request waiting on its subject; gives it back if none waits.
    pub fn resolve(&self, envelope: Envelope) -> Option<Envelope> {
        let waiting = self.pending().remove(&envelope.subject);
        match waiting {
            Some(tx) => {
                // A request that gave up in the meantime simply drops the reply.
                let _ = tx.send(envelope);
                None
            }
            None => Some(envelope),
        }
    }
}
