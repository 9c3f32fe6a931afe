//! The host's link-delete messages: the SDK's delete callback does not say which interface
//! went, so when a consumer and a sessions link of one component share a name, the provider's
//! own subscription to `linkdefs.del` tells.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tracing::warn;

use super::table::{Direction, LinkKey};
use super::WsProvider;
use crate::task::OwnedTask;

/// How long a delete of a component->provider link waits for the host's delete message to
/// say which interface it was, when a consumer and a sessions link share the name.
const DELETE_HINT_WAIT: Duration = Duration::from_secs(2);
/// How long a delete message's hint stays usable.
const DELETE_HINT_FRESH: Duration = Duration::from_secs(5);

impl WsProvider {
    /// Which component->provider link of `key` the host deleted: the only one there is, or
    /// (when a consumer and a sessions link share the name) the one its delete message named.
    pub(super) async fn deleted_target(&self, key: &LinkKey) -> Option<Direction> {
        let (consumer, sessions) = {
            let links = self.links();
            (
                links.consumers.contains_key(key)
                    || links
                        .errors
                        .contains_key(&(Direction::Consumer, key.clone())),
                links.sessions.contains_key(key)
                    || links
                        .errors
                        .contains_key(&(Direction::Sessions, key.clone())),
            )
        };
        match (consumer, sessions) {
            (true, false) => {
                self.forget_delete_hints(key);
                return Some(Direction::Consumer);
            }
            (false, true) => {
                self.forget_delete_hints(key);
                return Some(Direction::Sessions);
            }
            (false, false) => return None,
            (true, true) => {}
        }
        let deadline = tokio::time::Instant::now() + DELETE_HINT_WAIT;
        loop {
            let seen = self.inner.deleted_seen.notified();
            {
                let mut deleted = self.inner.deleted.lock().unwrap_or_else(|e| e.into_inner());
                // The newest hint for the key is this delete's; older ones are stale.
                // A hint arrives within milliseconds of its delete: older ones are stale.
                deleted.retain(|(_, _, at)| at.elapsed() < DELETE_HINT_FRESH);
                if let Some(i) = deleted.iter().rposition(|(k, _, _)| k == key) {
                    let direction = deleted.remove(i).1;
                    deleted.retain(|(k, _, _)| k != key);
                    return Some(direction);
                }
            }
            if tokio::time::timeout_at(deadline, seen).await.is_err() {
                warn!(component = %key.0, link = %key.1,
                    "a consumer and a sessions link share this name, and the host's delete message did not say which one went; both kept");
                return None;
            }
        }
    }

    /// Drops the delete hints of `key` (a put or an unambiguous delete makes them stale).
    pub(super) fn forget_delete_hints(&self, key: &LinkKey) {
        self.inner
            .deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(k, _, _)| k != key);
    }

    /// Follows the host's link-delete messages for this provider, so that a delete of one of
    /// two component->provider links with the same name removes the right one.
    pub async fn watch_link_deletes(
        &self,
        nats: async_nats::Client,
        lattice: &str,
        provider_id: &str,
    ) -> anyhow::Result<()> {
        #[derive(serde::Deserialize)]
        struct Deleted {
            source_id: String,
            target: String,
            #[serde(default)]
            name: Option<String>,
            wit_namespace: String,
            wit_package: String,
        }
        let subject = format!("wasmbus.rpc.{lattice}.{provider_id}.linkdefs.del");
        let mut deletes = nats
            .subscribe(subject)
            .await
            .context("failed to follow link deletes")?;
        let provider_id = provider_id.to_string();
        let inner = Arc::downgrade(&self.inner);
        let task = OwnedTask::spawn(|cancel| async move {
            use futures::StreamExt as _;
            while let Some(message) = cancel.run_until_cancelled(deletes.next()).await.flatten() {
                let Ok(deleted) = serde_json::from_slice::<Deleted>(&message.payload) else {
                    continue;
                };
                if deleted.target != provider_id {
                    continue;
                }
                let Some(inner) = inner.upgrade() else { return };
                let key = (
                    deleted.source_id,
                    deleted.name.unwrap_or_else(|| "default".to_string()),
                );
                let direction = Direction::of_target(&deleted.wit_namespace, &deleted.wit_package);
                let mut list = inner.deleted.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|(_, _, at)| at.elapsed() < DELETE_HINT_FRESH);
                list.push((key, direction, std::time::Instant::now()));
                drop(list);
                inner.deleted_seen.notify_waiters();
            }
        });
        // Ends with the provider (its shutdown, or the last handle dropped).
        *self
            .inner
            .delete_watch
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(())
    }
}
