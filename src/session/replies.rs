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
}

impl Replies {
    pub(super) fn new(id: Uuid) -> Self {
        Self {
            id,
            pending: Mutex::default(),
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

    /// Ends every request waiting for a reply: the session is gone.
    pub(super) fn end_all(&self) {
        self.pending().clear();
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
