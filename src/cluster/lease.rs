//! One client connection held by one replica: a lease in the lattice's key-value bucket.
//!
//! The key `c.<digest>` names the connection (a digest of the component, URI, token and headers,
//! so no credential is stored); its value says which replica holds it and the session ID the
//! connection keeps across replicas. The holder renews it every quarter of the lease time; a
//! replica that could not renew for three fifths of it closes the socket (it stops reading) and
//! contends again. Another replica takes over only after it has seen the same revision for the
//! whole lease time, by compare-and-set on that revision, so at most one wins, and only after the
//! old holder has stopped (both count time on their own monotonic clocks; no clock is shared).
//! A holder that stops cleanly hands the lease back at once; a deleted link deletes it.
//!
//! The session's metadata and groups are kept under `m.<session ID>` by the holder, and
//! restored by the next one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{Operation, UpdateErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::Cluster;
use crate::session::{Registry, Session};
use crate::task::OwnedTask;

#[derive(Debug, Serialize, Deserialize)]
struct Value {
    /// The replica that holds it; empty: free.
    holder: String,
    /// The host of the holder: a host runs one replica, so a new replica on the holder's host
    /// knows the holder is gone (a restart) and need not wait out the lease.
    #[serde(default)]
    host: String,
    session: Uuid,
}

/// A session's state as its holder keeps it for the next.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub metadata: Vec<(String, String)>,
    pub groups: Vec<String>,
}

/// PBKDF2 rounds of a lease key: the key is derived from the connection's credentials, and
/// anyone who can read the bucket should not be able to test guesses at a token cheaply.
const KEY_ROUNDS: u32 = 10_000;

/// The lease key of a client connection: `c.` and a key derived (PBKDF2-HMAC-SHA256) from what
/// makes it one connection: the component and URI (the salt) and its credentials (`secret`:
/// token and headers). Slow on purpose: call it off the runtime's threads.
pub fn key(component: &str, uri: &str, secret: &[&str]) -> String {
    let mut salt = Vec::with_capacity(component.len() + uri.len() + 1);
    salt.extend_from_slice(component.as_bytes());
    salt.push(0);
    salt.extend_from_slice(uri.as_bytes());
    let mut password = Vec::new();
    for part in secret {
        password.extend_from_slice(&(part.len() as u64).to_be_bytes());
        password.extend_from_slice(part.as_bytes());
    }
    let mut out = [0u8; 16];
    let rounds = std::num::NonZeroU32::new(KEY_ROUNDS).unwrap_or(std::num::NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        &salt,
        &password,
        &mut out,
    );
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    format!("c.{hex}")
}

fn state_key(id: &Uuid) -> String {
    format!("m.{}", id.simple())
}

fn encode(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

impl Cluster {
    /// The session ID of the connection `key`: the one its lease carries, or a new one that
    /// the lease records (free) for every replica to agree on.
    pub async fn connection_id(&self, key: &str) -> Result<Uuid, String> {
        // A bucket that does not answer now may in a moment: retry for about 10 s.
        let mut last = String::new();
        for attempt in 0..20u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            match self.kv().entry(key).await {
                Ok(Some(e)) if e.operation == Operation::Put => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&e.value) {
                        return Ok(v.session);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            }
            let fresh = Value {
                holder: String::new(),
                host: String::new(),
                session: Uuid::new_v4(),
            };
            match self.kv().create(key, encode(&fresh)).await {
                Ok(_) => return Ok(fresh.session),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("the lease bucket did not answer: {last}"))
    }

    /// Saves a held session's metadata and groups for whoever holds it next.
    pub async fn save_state(&self, session: &Session, registry: &Registry) {
        let state = State {
            metadata: session.metadata(),
            groups: registry.groups_of(&session.id),
        };
        let bytes = Bytes::from(serde_json::to_vec(&state).unwrap_or_default());
        if let Err(e) = self.kv().put(state_key(&session.id), bytes).await {
            warn!(session = %session.id, error = %e, "session state not saved for failover");
        }
    }

    async fn restore_state(&self, session: &Session, registry: &Registry) {
        let Ok(Some(entry)) = self.kv().entry(state_key(&session.id)).await else {
            return;
        };
        if entry.operation != Operation::Put {
            return;
        }
        let Ok(state) = serde_json::from_slice::<State>(&entry.value) else {
            return;
        };
        session.restore_metadata(state.metadata);
        for group in state.groups {
            let _ = registry.join(session, &group);
        }
    }

    /// Contends for and holds the lease `key` for `session` until the returned handle is
    /// dropped (the link is gone: the lease is deleted) or [`Holding::hand_back`] is called
    /// first (shutdown: the lease is freed for another replica at once). `allowed` lets the
    /// socket task connect while the lease is held.
    pub fn hold_lease(
        &self,
        key: String,
        shown: String,
        session: Arc<Session>,
        registry: Arc<Registry>,
        allowed: watch::Sender<bool>,
    ) -> Holding {
        let hand_back = Arc::new(AtomicBool::new(false));
        let run = Contender {
            cluster: self.clone(),
            key,
            shown,
            session,
            registry,
            allowed,
            hand_back: Arc::clone(&hand_back),
            token: fastrand::u64(..),
        };
        Holding {
            task: OwnedTask::spawn(move |cancel| run.run(cancel)),
            hand_back,
        }
    }
}

/// The lease task's handle.
pub struct Holding {
    task: OwnedTask,
    hand_back: Arc<AtomicBool>,
}

impl Holding {
    /// Frees the lease (for a clean stop) and waits up to `grace` for it.
    pub async fn hand_back(&self, grace: Duration) {
        self.hand_back.store(true, Ordering::SeqCst);
        self.task.close(grace).await;
    }
}

struct Contender {
    cluster: Cluster,
    key: String,
    shown: String,
    session: Arc<Session>,
    registry: Arc<Registry>,
    allowed: watch::Sender<bool>,
    hand_back: Arc<AtomicBool>,
    /// Tells this handle's entry in the held list from another's of the same connection.
    token: u64,
}

/// How the lease task times itself, from the lease time.
struct Timing {
    ttl: Duration,
    renew: Duration,
    fence: Duration,
    poll: Duration,
}

impl Timing {
    fn of(ttl: Duration) -> Self {
        Self {
            ttl,
            renew: ttl / 4,
            fence: ttl * 3 / 5,
            poll: (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        }
    }
}

impl Contender {
    fn value(&self, holder: &str) -> Bytes {
        let host = if holder.is_empty() {
            ""
        } else {
            self.cluster.host()
        };
        encode(&Value {
            holder: holder.to_string(),
            host: host.to_string(),
            session: self.session.id,
        })
    }

    async fn run(self, cancel: CancellationToken) {
        let timing = Timing::of(self.cluster.lease_ttl());
        loop {
            let Some((revision, since)) = self.acquire(&timing, &cancel).await else {
                return;
            };
            match self.keep(revision, since, &timing, &cancel).await {
                Kept::Stopped(revision) => {
                    self.stop(revision).await;
                    return;
                }
                Kept::Lost(why) => {
                    self.let_go();
                    self.cluster.counted_loss();
                    warn!(session = %self.session.id, reason = %why, "lost the lease of a client connection; socket closed");
                }
            }
        }
    }

    /// Waits until this replica holds the lease: the revision it wrote and when it sent it.
    async fn acquire(&self, timing: &Timing, cancel: &CancellationToken) -> Option<(u64, Instant)> {
        let me = self.cluster.replica().to_string();
        let mut seen: Option<(u64, Instant)> = None;
        let mut missing_since: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            let attempt = match self.cluster.kv().entry(self.key.as_str()).await {
                Ok(Some(e)) if e.operation == Operation::Put => {
                    missing_since = None;
                    let value = serde_json::from_slice::<Value>(&e.value).ok();
                    let (holder, host, session) = value.map_or_else(
                        || (String::new(), String::new(), self.session.id),
                        |v| (v.holder, v.host, v.session),
                    );
                    if seen.is_none_or(|(rev, _)| rev != e.revision) {
                        seen = Some((e.revision, Instant::now()));
                    }
                    let stale = seen.is_some_and(|(_, at)| at.elapsed() >= timing.ttl);
                    // The holder ran on this host before this replica: it is gone (restart).
                    let restarted = !holder.is_empty() && host == self.cluster.host();
                    if session != self.session.id {
                        // The link was deleted and put again elsewhere, under a new session:
                        // this handle is about to go (its delete is on the way).
                        None
                    } else if holder.is_empty() || holder == me || stale || restarted {
                        let takeover = !holder.is_empty() && holder != me;
                        if takeover {
                            self.cluster.gone(&holder);
                        }
                        let updated = self
                            .cluster
                            .kv()
                            .update(self.key.as_str(), self.value(&me), e.revision)
                            .await;
                        Some((updated.map_err(|e| e.to_string()), takeover))
                    } else {
                        None
                    }
                }
                Ok(_) => {
                    // Deleted: its link is going away here too, unless that stays so for long.
                    let since = *missing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= timing.ttl * 2 {
                        let created = self
                            .cluster
                            .kv()
                            .create(self.key.as_str(), self.value(&me))
                            .await;
                        Some((created.map_err(|e| e.to_string()), false))
                    } else {
                        None
                    }
                }
                Err(e) => {
                    warn!(error = %e, "lease bucket unreachable");
                    None
                }
            };
            if let Some((Ok(revision), takeover)) = attempt {
                if self.take(takeover, sent + timing.fence).await {
                    return Some((revision, sent));
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(timing.poll) => {}
            }
        }
    }

    /// Now held: the session is registered, its state restored, and its socket may connect,
    /// unless all that took past the fence (`fence_at`): then it is let go again (false).
    async fn take(&self, takeover: bool, fence_at: Instant) -> bool {
        self.session.set_here(true);
        self.registry.insert(Arc::clone(&self.session));
        let left = fence_at.saturating_duration_since(Instant::now());
        let restore = self.cluster.restore_state(&self.session, &self.registry);
        if tokio::time::timeout(left, restore).await.is_err() || Instant::now() >= fence_at {
            self.session.set_here(false);
            self.registry.remove_same(&self.session);
            return false;
        }
        self.cluster.hold(&self.key, &self.shown, self.token);
        if takeover {
            self.cluster.counted_takeover();
            info!(session = %self.session.id, uri = %self.shown, "took over a client connection from a replica that stopped renewing it");
        }
        self.allowed.send_replace(true);
        true
    }

    /// Not held any more: the socket closes before anything else, then the session leaves the
    /// registry here.
    fn let_go(&self) {
        self.allowed.send_replace(false);
        self.session.set_here(false);
        self.registry.remove_same(&self.session);
        self.cluster.release(&self.key, self.token);
    }

    async fn keep(
        &self,
        mut revision: u64,
        mut renewed: Instant,
        timing: &Timing,
        cancel: &CancellationToken,
    ) -> Kept {
        let me = self.cluster.replica().to_string();
        let mut wait = timing.renew;
        loop {
            let fence_at = renewed + timing.fence;
            tokio::select! {
                () = cancel.cancelled() => return Kept::Stopped(revision),
                () = tokio::time::sleep(wait) => {}
            }
            let sent = Instant::now();
            let left = fence_at.saturating_duration_since(sent);
            if left.is_zero() {
                return Kept::Lost(format!("not renewed for {} ms", timing.fence.as_millis()));
            }
            let update = self
                .cluster
                .kv()
                .update(self.key.as_str(), self.value(&me), revision);
            match tokio::time::timeout(left, update).await {
                Ok(Ok(r)) => {
                    revision = r;
                    renewed = sent;
                    wait = timing.renew;
                }
                Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    match tokio::time::timeout(left, self.recheck(&me)).await {
                        Ok(Ok(Some((r, fresh)))) => {
                            revision = r;
                            // A revision found (not written now) may be older than `sent`.
                            if fresh {
                                renewed = sent;
                            }
                            wait = if fresh { timing.renew } else { Duration::ZERO };
                        }
                        Ok(Ok(None)) => return Kept::Lost("another replica holds it".into()),
                        Ok(Err(_)) | Err(_) => wait = timing.poll,
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    // Retry soon; the fence above decides when to give up.
                    wait = timing.poll;
                }
            }
        }
    }

    /// A renewal found another revision: still ours (an earlier renewal whose answer was lost:
    /// `(revision, false)`), or gone (the bucket lost it: taken again now, first come first
    /// served: `(revision, true)`), or another's (`None`). `Err`: the bucket did not answer.
    async fn recheck(&self, me: &str) -> Result<Option<(u64, bool)>, String> {
        let kv = self.cluster.kv();
        match kv
            .entry(self.key.as_str())
            .await
            .map_err(|e| e.to_string())?
        {
            Some(e) if e.operation == Operation::Put => {
                let mine = serde_json::from_slice::<Value>(&e.value)
                    .is_ok_and(|v| v.holder == me && v.session == self.session.id);
                Ok(mine.then_some((e.revision, false)))
            }
            _ => Ok(kv
                .create(self.key.as_str(), self.value(me))
                .await
                .ok()
                .map(|r| (r, true))),
        }
    }

    /// The task is stopping while it holds the lease: hand it back (clean stop) or delete it
    /// with the session's state (the link is gone).
    async fn stop(&self, revision: u64) {
        self.let_go();
        let kv = self.cluster.kv();
        if self.hand_back.load(Ordering::SeqCst) {
            let _ = kv.update(self.key.as_str(), self.value(""), revision).await;
        } else if kv
            .delete_expect_revision(self.key.as_str(), Some(revision))
            .await
            .is_ok()
        {
            let _ = kv.purge(state_key(&self.session.id)).await;
        }
    }
}

enum Kept {
    Stopped(u64),
    Lost(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_connection_without_its_secrets() {
        let a = key("comp", "ws://h/x", &["s3cret", "x-a=1"]);
        assert_eq!(a, key("comp", "ws://h/x", &["s3cret", "x-a=1"]));
        assert_ne!(a, key("comp", "ws://h/x", &["other", "x-a=1"]));
        assert_ne!(a, key("comp2", "ws://h/x", &["s3cret", "x-a=1"]));
        assert_ne!(a, key("comp", "ws://h/y", &["s3cret", "x-a=1"]));
        // Parts are separated: moving a boundary changes the key.
        assert_ne!(key("c", "u", &["ab", "c"]), key("c", "u", &["a", "bc"]));
        assert!(!a.contains("s3cret") && a.len() == 34, "{a}");
    }

    #[test]
    fn the_holder_fences_itself_before_anyone_takes_over() {
        for ttl in [1, 4, 10, 30] {
            let t = Timing::of(Duration::from_secs(ttl));
            assert!(t.renew < t.fence && t.fence < t.ttl, "ttl {ttl}");
            // A renewal may be retried at least twice before the fence.
            assert!(t.renew + t.poll * 2 < t.fence, "ttl {ttl}");
        }
    }
}
