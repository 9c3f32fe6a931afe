//! Recoverable sessions of one server link (`RECOVERY=true`): a session outlives a socket that
//! dropped without a close (TCP cut, dead peer, slow consumer) for `HISTORY_TTL_SEC`, and a
//! client that comes back with its resume token and the last `seq` it saw gets it back: the
//! same session ID, metadata and groups, the messages it missed in order, then live ones.
//!
//! The protocol (see the README): the first frame of every connection is
//! `{"session": {"id", "token", "seq", "resumed", ...}}`; a client resumes with
//! `?resume=<token>&last_seq=<n>`. A token is used once: each connection gets a new one. A token
//! that this provider did not issue for this link is refused (close 4403); an old one (already
//! used) too; one presented while the session's socket still answers pings is refused (close
//! 4409), so that two clients never hold a session at once. A token whose session has expired
//! gets a new session with `"recovered": false, "reason": "expired"`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use uuid::Uuid;

use super::{lifecycle_message, Acceptor, Guard, NewSession, LIFECYCLE_EXPIRED};
use crate::delivery::Inbound;
use crate::recovery::history::ReadError;
use crate::recovery::{link_tag, History, Sequencer, Tokens};
use crate::session::{Registry, Session};
use crate::task::OwnedTask;
use crate::ws::server::{Opened, PeerInfo};
use crate::ws::socket::{Closed, ConnState, Outbound};

/// How long a resume waits for the session's old socket to answer a ping before it counts as
/// gone (a TCP cut leaves it looking open).
const PROBE_WAIT: Duration = Duration::from_secs(3);

/// How long after a resume the token it used is still taken (by a client whose new socket
/// failed before the session frame came), when the new socket does not answer a ping.
const RETRY_GRACE: Duration = Duration::from_secs(30);

/// Resumes reading their replay at once, across the provider (each reads at most
/// `MAX_READ_BYTES`): the memory a burst of resumes can take.
static REPLAYS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// The close code of a client that leaves a socket to resume on another: its session waits.
pub const RECONNECTING: u16 = 4000;

/// Close codes of a refused resume.
const REFUSED: u16 = 4403;
const IN_USE: u16 = 4409;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The recoverable sessions of one link.
pub(super) struct Resumer {
    history: Arc<History>,
    tokens: &'static Tokens,
    /// Sessions that may wait for their clients at once (`MAX_CONNECTIONS`); past it the one
    /// that has waited longest ends.
    max_waiting: usize,
    tag: [u8; 8],
    link_name: String,
    lifecycle: bool,
    sessions: Mutex<HashMap<Uuid, Arc<Kept>>>,
    registry: Arc<Registry>,
}

/// One recoverable session, with or without a socket now.
pub(super) struct Kept {
    session: Arc<Session>,
    inbound: Arc<Inbound>,
    state: watch::Sender<ConnState>,
    conn: Mutex<Conn>,
    /// One resume of a session at a time.
    resuming: tokio::sync::Mutex<()>,
}

/// The session's current connection.
struct Conn {
    /// The connection (and the token) that may resume it; older ones are refused.
    generation: u32,
    /// Ends the socket being served, if there is one.
    cancel: Option<CancellationToken>,
    /// Ends the session when its client does not come back in time.
    expiry: Option<OwnedTask>,
    /// Since when the session has waited for its client (no socket).
    waiting_since: Option<Instant>,
    /// When the current connection resumed the session (its predecessor's token is still
    /// taken for [`RETRY_GRACE`] while its session frame was not written: the client may
    /// never have got the new token).
    resumed_at: Option<Instant>,
    /// How the write of the current connection's session frame ended, once it has.
    welcome: Option<oneshot::Receiver<Result<(), String>>>,
    welcomed: bool,
    ended: bool,
}

impl Conn {
    /// Whether the current connection's session frame (with its token) was written.
    fn welcomed(&mut self) -> bool {
        if let Some(welcome) = self.welcome.as_mut() {
            match welcome.try_recv() {
                Ok(Ok(())) => {
                    self.welcomed = true;
                    self.welcome = None;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => self.welcome = None,
            }
        }
        self.welcomed
    }
}

/// What a resume could give back of what the client missed.
struct Replay {
    recovered: bool,
    reason: Option<&'static str>,
    frames: Vec<bytes::Bytes>,
}

/// The first frame of a connection: its session, its resume token, the session's last `seq`.
fn welcome(
    id: Uuid,
    token: &str,
    seq: u64,
    resumed: bool,
    recovered: Option<bool>,
    reason: Option<&str>,
    missed: Option<usize>,
) -> String {
    let mut session = serde_json::json!({
        "id": id.to_string(),
        "token": token,
        "seq": seq,
        "resumed": resumed,
    });
    if let Some(recovered) = recovered {
        session["recovered"] = recovered.into();
    }
    if let Some(reason) = reason {
        session["reason"] = reason.into();
    }
    if let Some(missed) = missed {
        session["missed"] = missed.into();
    }
    serde_json::json!({ "session": session }).to_string()
}

fn refuse(close: u16, code: &str, message: &str) -> Opened<Inbound, Guard> {
    debug!(code, message, "resume refused");
    Opened::Refuse {
        code: close,
        reason: code.to_string(),
        frame: Some(serde_json::json!({"error": {"code": code, "message": message}}).to_string()),
    }
}

impl Resumer {
    pub(super) fn new(
        history: Arc<History>,
        tokens: &'static Tokens,
        max_waiting: usize,
        component_id: &str,
        link_name: &str,
        lifecycle: bool,
        registry: Arc<Registry>,
    ) -> Self {
        Self {
            history,
            tokens,
            max_waiting,
            tag: link_tag(component_id, link_name),
            link_name: link_name.to_string(),
            lifecycle,
            sessions: Mutex::default(),
            registry,
        }
    }

    /// A client of a recoverable link: a new session, or its old one when it resumes.
    pub(super) async fn open(
        self: &Arc<Self>,
        acceptor: &Acceptor,
        mut peer: PeerInfo,
        cancel: CancellationToken,
    ) -> Opened<Inbound, Guard> {
        let Some(resume) = peer.resume.take() else {
            return self.open_new(acceptor, peer, cancel, None).await;
        };
        let claims = match self.tokens.verify(&resume.token, self.tag) {
            Ok(claims) => claims,
            Err(why) => return refuse(REFUSED, "resume_refused", why),
        };
        let kept = lock(&self.sessions).get(&claims.session).cloned();
        match kept {
            Some(kept) => {
                self.resume(acceptor, kept, claims.generation, resume.last_seq, cancel)
                    .await
            }
            None => self.open_new(acceptor, peer, cancel, Some("expired")).await,
        }
    }

    /// A new session; `not_recovered` says why a resume gave a new session instead.
    async fn open_new(
        &self,
        acceptor: &Acceptor,
        peer: PeerInfo,
        cancel: CancellationToken,
        not_recovered: Option<&'static str>,
    ) -> Opened<Inbound, Guard> {
        let sequencer = Arc::new(Sequencer::new(Arc::clone(&self.history)));
        // Nothing is numbered before the welcome is queued: it is the socket's first frame.
        let numbering = sequencer.hold().await;
        let NewSession {
            session,
            inbound,
            outbound,
            state,
        } = acceptor.new_session(peer, Some(Arc::clone(&sequencer)));
        let id = session.id;
        let token = self.tokens.issue(id, self.tag, 1);
        let first = welcome(
            id,
            &token,
            0,
            false,
            not_recovered.map(|_| false),
            not_recovered,
            None,
        );
        let _ = session.outbox.send_nowait(Message::text(first));
        drop(numbering);
        let kept = Arc::new(Kept {
            session: Arc::clone(&session),
            inbound: Arc::clone(&inbound),
            state,
            conn: Mutex::new(Conn {
                generation: 1,
                cancel: Some(cancel),
                expiry: None,
                waiting_since: None,
                resumed_at: None,
                welcome: None,
                welcomed: true,
                ended: false,
            }),
            resuming: tokio::sync::Mutex::new(()),
        });
        lock(&self.sessions).insert(id, Arc::clone(&kept));
        acceptor.announce(
            &inbound,
            acceptor.connected(&session, false, not_recovered.map(|_| false)),
        );
        Opened::Serve(
            inbound,
            outbound,
            Guard::Kept {
                kept,
                generation: 1,
            },
        )
    }

    /// Gives `kept` to the client that presented its token of connection `generation`.
    async fn resume(
        self: &Arc<Self>,
        acceptor: &Acceptor,
        kept: Arc<Kept>,
        generation: u32,
        last_seq: u64,
        cancel: CancellationToken,
    ) -> Opened<Inbound, Guard> {
        let _one = kept.resuming.lock().await;
        let (current, old, ended, resumed_at, welcomed) = {
            let mut conn = lock(&kept.conn);
            (
                conn.generation,
                conn.cancel.clone(),
                conn.ended,
                conn.resumed_at,
                conn.welcomed(),
            )
        };
        if ended {
            return refuse(REFUSED, "resume_refused", "the session has ended");
        }
        // The token of the connection before the current one is taken shortly after a resume:
        // its client may never have got the new one (the probe below still refuses it while
        // the current socket answers).
        let retry = generation.wrapping_add(1) == current
            && !welcomed
            && resumed_at.is_some_and(|t| t.elapsed() < RETRY_GRACE);
        if generation != current && !retry {
            return refuse(
                REFUSED,
                "resume_refused",
                "the resume token was already used (each connection gets a new one)",
            );
        }
        if old.is_some() && kept.session.outbox.probe(PROBE_WAIT).await {
            return refuse(
                IN_USE,
                "session_in_use",
                "the session's socket is connected: a resume token is used by one client at a time",
            );
        }
        let next = current.wrapping_add(1);
        let expiry = {
            let mut conn = lock(&kept.conn);
            if conn.ended || conn.generation != current {
                return refuse(REFUSED, "resume_refused", "the session has ended");
            }
            // From here the old socket's end is not the session's: it was replaced.
            conn.generation = next;
            conn.waiting_since = None;
            conn.resumed_at = Some(Instant::now());
            if let Some(old) = conn.cancel.take() {
                old.cancel();
            }
            conn.expiry.take()
        };
        drop(expiry);
        let session = &kept.session;
        let Some(sequencer) = session.outbox.recovery() else {
            return refuse(REFUSED, "resume_refused", "the session keeps no history");
        };
        let numbering = sequencer.hold().await;
        sequencer.settled().await;
        let seq = *numbering;
        let replay = {
            let _turn = REPLAYS.acquire().await;
            self.replay(session.id, last_seq, seq).await
        };
        let token = self.tokens.issue(session.id, self.tag, next);
        let queue_len = acceptor.settings.send_queue_len + replay.frames.len() + 1;
        let (tx, outbound) = mpsc::channel::<Box<Outbound>>(queue_len);
        let first = welcome(
            session.id,
            &token,
            seq,
            true,
            Some(replay.recovered),
            replay.reason,
            replay.recovered.then_some(replay.frames.len()),
        );
        let (written, welcome) = oneshot::channel();
        let _ = tx.try_send(Box::new(Outbound {
            message: Message::text(first),
            ack: Some(written),
        }));
        let frames = replay
            .frames
            .into_iter()
            .filter_map(|f| tokio_tungstenite::tungstenite::Utf8Bytes::try_from(f).ok())
            .map(Message::Text);
        for message in frames {
            let _ = tx.try_send(Box::new(Outbound { message, ack: None }));
        }
        session.outbox.attach(tx);
        kept.state.send_replace(ConnState::Connected {
            since: SystemTime::now(),
        });
        {
            let mut conn = lock(&kept.conn);
            conn.cancel = Some(cancel);
            conn.welcome = Some(welcome);
            conn.welcomed = false;
        }
        drop(numbering);
        info!(session = %session.id, recovered = replay.recovered, reason = replay.reason, "session resumed");
        acceptor.announce(
            &kept.inbound,
            acceptor.connected(session, true, Some(replay.recovered)),
        );
        Opened::Serve(
            Arc::clone(&kept.inbound),
            outbound,
            Guard::Kept {
                kept: Arc::clone(&kept),
                generation: next,
            },
        )
    }

    /// The messages after `last_seq` up to `seq`, if the history still has every one of them.
    async fn replay(&self, id: Uuid, last_seq: u64, seq: u64) -> Replay {
        let not = |reason| Replay {
            recovered: false,
            reason: Some(reason),
            frames: Vec::new(),
        };
        if last_seq > seq {
            return not("last_seq_ahead");
        }
        let missed = seq - last_seq;
        if missed == 0 {
            return Replay {
                recovered: true,
                reason: None,
                frames: Vec::new(),
            };
        }
        if missed > self.history.settings.history_size as u64 {
            return not("too_long");
        }
        match self.history.read(id, last_seq).await {
            Ok(kept) => {
                let complete = kept.len() as u64 == missed
                    && kept
                        .iter()
                        .zip(last_seq + 1..)
                        .all(|((s, _), expected)| *s == expected);
                if complete {
                    Replay {
                        recovered: true,
                        reason: None,
                        frames: kept.into_iter().map(|(_, f)| f).collect(),
                    }
                } else {
                    not("expired")
                }
            }
            Err(ReadError::TooLarge) => not("too_long"),
            Err(ReadError::Unavailable(e)) => {
                tracing::warn!(session = %id, error = %e, "history unavailable for a resume");
                not("history_unavailable")
            }
        }
    }

    /// Connection `generation` of `kept` ended: the session waits for its client when the
    /// socket dropped without a close (1006), was closed as a slow consumer (1008), or the
    /// client closed it with [`RECONNECTING`]; it ends otherwise (any other close frame, a
    /// `close` of the session API, the link going away).
    pub(super) fn closed(
        self: &Arc<Self>,
        acceptor: &Acceptor,
        kept: &Arc<Kept>,
        generation: u32,
        closed: &Closed,
    ) {
        let resumable = matches!(closed.code, 1006 | 1008 | RECONNECTING)
            && !kept.session.outbox.closed_by_provider();
        let expiry = {
            let mut conn = lock(&kept.conn);
            if conn.generation != generation || conn.ended {
                return; // replaced by a resumed connection
            }
            conn.cancel = None;
            if resumable {
                kept.session.outbox.detach();
                kept.state.send_replace(ConnState::Disconnected {
                    error: closed.reason.clone(),
                });
                conn.waiting_since = Some(Instant::now());
                conn.expiry = Some(self.expiry(kept, generation));
                None
            } else {
                // Decided under the same lock as the check: a resume cannot slip in between.
                conn.ended = true;
                Some(conn.expiry.take())
            }
        };
        let message = acceptor.disconnected(&kept.session, closed, resumable);
        match expiry {
            None => {
                acceptor.announce(&kept.inbound, message);
                self.evict_over_cap();
            }
            Some(expiry) => {
                drop(expiry);
                self.finish(kept, Some(message));
            }
        }
    }

    /// Ends the sessions that have waited longest while more than `max_waiting` wait.
    fn evict_over_cap(&self) {
        let mut waiting: Vec<(Instant, Arc<Kept>)> = lock(&self.sessions)
            .values()
            .filter_map(|k| {
                let since = lock(&k.conn).waiting_since?;
                Some((since, Arc::clone(k)))
            })
            .collect();
        if waiting.len() <= self.max_waiting {
            return;
        }
        waiting.sort_by_key(|(since, _)| *since);
        let over = waiting.len() - self.max_waiting;
        for (since, kept) in waiting.into_iter().take(over) {
            tracing::warn!(session = %kept.session.id,
                "more sessions wait for their clients than MAX_CONNECTIONS: the one that waited longest ends");
            self.end_if(
                &kept,
                |c| c.waiting_since == Some(since),
                self.expired(&kept),
            );
        }
    }

    /// The `ws.lifecycle.expired` message of `kept`.
    fn expired(
        &self,
        kept: &Kept,
    ) -> Option<crate::bindings::wasmcloud::messaging::types::BrokerMessage> {
        let body = serde_json::json!({
            "session": kept.session.id.to_string(),
            "link": self.link_name,
        });
        Some(lifecycle_message(LIFECYCLE_EXPIRED, body, None))
    }

    /// Ends `kept` after `HISTORY_TTL_SEC` unless connection `generation` was resumed.
    fn expiry(self: &Arc<Self>, kept: &Arc<Kept>, generation: u32) -> OwnedTask {
        let (resumer, kept): (Weak<Self>, Weak<Kept>) =
            (Arc::downgrade(self), Arc::downgrade(kept));
        let ttl = self.history.settings.history_ttl;
        OwnedTask::spawn(move |cancel| async move {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(ttl) => {}
            }
            let (Some(resumer), Some(kept)) = (resumer.upgrade(), kept.upgrade()) else {
                return;
            };
            let expired = resumer.expired(&kept);
            resumer.end_if(
                &kept,
                |c| c.generation == generation && c.cancel.is_none(),
                expired,
            );
        })
    }

    /// Ends a session for good when `decide` says so of its connection, checked and marked
    /// under one lock (a resume cannot take it in between).
    fn end_if(
        &self,
        kept: &Arc<Kept>,
        decide: impl FnOnce(&Conn) -> bool,
        last: Option<crate::bindings::wasmcloud::messaging::types::BrokerMessage>,
    ) {
        let expiry = {
            let mut conn = lock(&kept.conn);
            if conn.ended || !decide(&conn) {
                return;
            }
            conn.ended = true;
            conn.cancel = None;
            conn.expiry.take()
        };
        drop(expiry);
        self.finish(kept, last);
    }

    /// What ending a session marked ended does: unregistered, its history forgotten, `last`
    /// its farewell.
    fn finish(
        &self,
        kept: &Arc<Kept>,
        last: Option<crate::bindings::wasmcloud::messaging::types::BrokerMessage>,
    ) {
        let id = kept.session.id;
        {
            let mut sessions = lock(&self.sessions);
            if sessions.get(&id).is_some_and(|k| Arc::ptr_eq(k, kept)) {
                sessions.remove(&id);
            }
        }
        kept.state.send_replace(ConnState::Disconnected {
            error: "session ended".to_string(),
        });
        self.registry.remove(&id);
        if let (true, Some(last)) = (self.lifecycle, last) {
            if let Some(last) = kept.inbound.lifecycle(last, &self.link_name) {
                kept.inbound.farewell(last);
            }
        }
        let history = Arc::clone(&self.history);
        tokio::spawn(async move { history.forget(id).await });
    }
}

impl Drop for Resumer {
    /// The link is gone: its sessions waiting for their clients end with it.
    fn drop(&mut self) {
        for (id, kept) in lock(&self.sessions).drain() {
            lock(&kept.conn).ended = true;
            self.registry.remove(&id);
        }
    }
}
