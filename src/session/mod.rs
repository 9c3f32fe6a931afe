//! A session: one WebSocket connection owned by one component, with its ID, owner, mode, the
//! handler links that take its frames (routes), its metadata, its [`Outbox`] (the way to the
//! socket) and its [`Replies`] (requests waiting for the peer). Its groups are kept by the
//! [`Registry`], which holds every live session.

pub mod acks;
mod outbox;
mod registry;
mod replies;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::codec::Codec;
use crate::config::{Format, FrameType};
pub use crate::metrics::Mode;
use crate::ws::socket::{ConnState, Outbound};

pub use outbox::Outbox;
pub use registry::{Registry, MAX_GROUPS_PER_SESSION, MAX_GROUP_NAME_BYTES};
pub use replies::{Replies, MAX_PENDING_REQUESTS};

/// Session subjects are this prefix followed by the session's UUID.
pub const SESSION_SUBJECT_PREFIX: &str = "ws.session.";

/// Metadata limits per session.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_BYTES: usize = 128;
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;

/// A subject that names a session: `ws.session.<id>`, or `ws.session.<id>.<peer subject>` for a
/// reply to a peer's `reply_to` (JSON envelopes).
#[derive(Debug, PartialEq, Eq)]
pub struct SessionSubject<'a> {
    pub id: Uuid,
    /// The peer's own subject after the session part, if any.
    pub peer_subject: Option<&'a str>,
}

/// Returns the session named by `subject`, if it is a session subject.
pub fn parse_session_subject(subject: &str) -> Option<SessionSubject<'_>> {
    let rest = subject.strip_prefix(SESSION_SUBJECT_PREFIX)?;
    let (id, tail) = rest.split_at_checked(36)?;
    let id = Uuid::parse_str(id).ok()?;
    let peer_subject = match tail {
        "" => None,
        t => Some(t.strip_prefix('.').filter(|t| !t.is_empty())?),
    };
    Some(SessionSubject { id, peer_subject })
}

/// A handler link that receives a session's inbound frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub link_name: String,
    pub subject: String,
}

pub struct Session {
    pub id: Uuid,
    pub component_id: String,
    pub mode: Mode,
    /// The link that opened the connection.
    pub link_name: String,
    /// Remote URI (client mode) or peer address (server mode).
    pub remote: String,
    /// When false the session is not addressable by ID and inbound messages carry no reply_to.
    pub tracking: bool,
    /// How its frames map to messages.
    pub codec: Codec,
    /// `ws.session.<id>`: the subject that names this session.
    subject: String,
    /// The upgrade request (server mode).
    pub request: Option<RequestInfo>,
    pub outbox: Outbox,
    pub replies: Replies,
    /// Envelope IDs the peer asked to have acknowledged (JSON envelopes).
    pub acks: acks::Acks,
    routes: Mutex<Vec<Route>>,
    /// Woken when a handler link attaches (see [`Session::wait_for_route`]).
    route_added: tokio::sync::Notify,
    metadata: Mutex<BTreeMap<String, String>>,
    /// See [`Session::is_here`].
    here: AtomicBool,
}

/// The upgrade request of a server-mode session.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestInfo {
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub subprotocol: Option<String>,
}

/// What the session API shows of a session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    pub id: Uuid,
    pub link_name: String,
    pub remote: String,
    pub connected: bool,
    pub connected_since_ms: Option<u64>,
    pub metadata: Vec<(String, String)>,
    pub groups: Vec<String>,
    pub request: Option<RequestInfo>,
}

/// Options of a new session (from the link that opens it).
pub struct SessionOptions {
    pub component_id: String,
    pub mode: Mode,
    pub link_name: String,
    pub remote: String,
    pub tracking: bool,
    pub frame_type: FrameType,
    pub format: Format,
    pub request: Option<RequestInfo>,
    /// Client sessions reconnect: a publish while disconnected waits this long for the socket.
    /// `None` (server sessions) fails at once.
    pub publish_wait: Option<std::time::Duration>,
    /// How many publishes may wait for a reconnect at once.
    pub max_waiting: usize,
    /// How long a publish waits for its write; past it the peer is a slow consumer.
    pub write_timeout: std::time::Duration,
    /// Close a slow consumer's socket (`SLOW_CONSUMER=close`) instead of failing the publish only.
    pub close_slow: bool,
    /// `RECOVERY=true`: the session's numbering and history.
    pub recovery: Option<std::sync::Arc<crate::recovery::Sequencer>>,
    /// `RECOVERY=true` in client mode: where publishes wait while the connection is down.
    pub keeper: Option<std::sync::Arc<crate::recovery::Keeper>>,
    /// The largest frame the socket can write (its write buffer).
    pub max_frame_bytes: usize,
}

impl SessionOptions {
    /// The options a link's settings give a session; callers set what differs by mode
    /// (`request`, `publish_wait`, `max_waiting`).
    pub fn from_link(
        mode: Mode,
        component_id: &str,
        link_name: &str,
        remote: String,
        settings: &crate::config::LinkSettings,
    ) -> Self {
        Self {
            component_id: component_id.to_string(),
            mode,
            link_name: link_name.to_string(),
            remote,
            tracking: settings.session_tracking,
            frame_type: settings.frame_type,
            format: settings.format,
            request: None,
            publish_wait: None,
            max_waiting: 0,
            write_timeout: settings.write_timeout,
            close_slow: settings.close_slow_consumers,
            recovery: None,
            keeper: None,
            max_frame_bytes: settings.max_message_bytes.saturating_mul(4).max(1 << 20),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("component_id", &self.component_id)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(
        options: SessionOptions,
        state: watch::Receiver<ConnState>,
        outbound: mpsc::Sender<Box<Outbound>>,
    ) -> Self {
        Self::with_id(Uuid::new_v4(), options, state, outbound)
    }

    /// A session under a given ID (a client connection's, which replicas agree on).
    pub fn with_id(
        id: Uuid,
        options: SessionOptions,
        state: watch::Receiver<ConnState>,
        outbound: mpsc::Sender<Box<Outbound>>,
    ) -> Self {
        let outbox = Outbox::new(id, &options, state, outbound);
        Self {
            id,
            subject: format!("{SESSION_SUBJECT_PREFIX}{id}"),
            component_id: options.component_id,
            mode: options.mode,
            link_name: options.link_name,
            remote: options.remote,
            tracking: options.tracking,
            codec: Codec {
                format: options.format,
                frame_type: options.frame_type,
            },
            request: options.request,
            outbox,
            replies: Replies::new(id),
            acks: acks::Acks::default(),
            routes: Mutex::default(),
            route_added: tokio::sync::Notify::new(),
            metadata: Mutex::default(),
            here: AtomicBool::new(true),
        }
    }

    /// Whether this replica holds the session's socket now. A client connection of a lattice
    /// with several replicas is held by one of them; the others keep the session object, not
    /// the socket, and forward to the holder.
    pub fn is_here(&self) -> bool {
        self.here.load(Ordering::Acquire)
    }

    pub fn set_here(&self, here: bool) {
        self.here.store(here, Ordering::Release);
    }

    /// The metadata entries, sorted by key.
    pub fn metadata(&self) -> Vec<(String, String)> {
        lock(&self.metadata)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Replaces the metadata (a client connection taken over from another replica).
    pub fn restore_metadata(&self, entries: Vec<(String, String)>) {
        *lock(&self.metadata) = entries.into_iter().collect();
    }

    /// What the session API shows of this session, given its groups (see [`Registry::info`]).
    fn info(&self, groups: Vec<String>) -> SessionInfo {
        let since = self.outbox.connected_since_ms();
        SessionInfo {
            id: self.id,
            link_name: self.link_name.clone(),
            remote: self.remote.clone(),
            connected: since.is_some(),
            connected_since_ms: since,
            metadata: lock(&self.metadata)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            groups,
            request: self.request.clone(),
        }
    }

    pub fn set_metadata(&self, key: String, value: String) -> Result<(), String> {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
            return Err(format!(
                "metadata keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes"
            ));
        }
        if value.len() > MAX_METADATA_VALUE_BYTES {
            return Err(format!(
                "metadata values must be at most {MAX_METADATA_VALUE_BYTES} bytes"
            ));
        }
        let mut metadata = lock(&self.metadata);
        if !metadata.contains_key(&key) && metadata.len() >= MAX_METADATA_ENTRIES {
            return Err(format!(
                "a session holds at most {MAX_METADATA_ENTRIES} metadata entries"
            ));
        }
        metadata.insert(key, value);
        Ok(())
    }

    pub fn get_metadata(&self, key: &str) -> Option<String> {
        lock(&self.metadata).get(key).cloned()
    }

    pub fn remove_metadata(&self, key: &str) {
        lock(&self.metadata).remove(key);
    }

    /// The subject that names this session in `reply_to` and `publish`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The `reply_to` a component sees on a frame from this session's peer: scoped to the
    /// session (`ws.session.<id>[.<peer reply_to>]`), so a publish to it can only reach this
    /// peer; without tracking, the peer's own `reply_to` unchanged.
    pub fn reply_to_for(&self, peer: Option<String>) -> Option<String> {
        if !self.tracking {
            return peer;
        }
        Some(match peer {
            Some(peer) => format!("{}.{peer}", self.subject),
            None => self.subject.clone(),
        })
    }

    /// The handler link that receives inbound frames now, if any.
    pub fn route(&self) -> Option<Route> {
        lock(&self.routes).first().cloned()
    }

    /// Attaches a handler link (a re-put replaces the link's earlier route).
    pub fn add_route(&self, route: Route) {
        {
            let mut routes = lock(&self.routes);
            routes.retain(|r| r.link_name != route.link_name);
            routes.push(route);
        }
        self.route_added.notify_waiters();
    }

    pub fn remove_route(&self, link_name: &str) {
        lock(&self.routes).retain(|r| r.link_name != link_name);
    }

    /// Whether handler link `link_name` still takes this session's frames.
    pub fn has_route(&self, link_name: &str) -> bool {
        lock(&self.routes).iter().any(|r| r.link_name == link_name)
    }

    /// The handler link that takes inbound frames, waiting up to `wait` for one to attach.
    pub async fn wait_for_route(&self, wait: std::time::Duration) -> Option<Route> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so an attach between the two is not missed.
            let attached = self.route_added.notified();
            if let Some(route) = self.route() {
                return Some(route);
            }
            if tokio::time::timeout_at(deadline, attached).await.is_err() {
                return self.route();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use tokio_tungstenite::tungstenite::Message;

    use super::*;
    use crate::envelope::Envelope;

    fn session(component: &str, tracking: bool) -> Arc<Session> {
        let (_tx, state) = watch::channel(ConnState::Connecting);
        let (out, _rx) = mpsc::channel(1);
        Arc::new(Session::new(
            SessionOptions {
                component_id: component.into(),
                mode: Mode::Client,
                link_name: "l".into(),
                remote: "ws://x".into(),
                tracking,
                frame_type: FrameType::Auto,
                format: Format::Raw,
                request: None,
                publish_wait: None,
                max_waiting: 1,
                write_timeout: std::time::Duration::from_secs(1),
                close_slow: false,
                recovery: None,
                keeper: None,
                max_frame_bytes: usize::MAX,
            },
            state,
            out,
        ))
    }

    #[test]
    fn subjects_round_trip() {
        let s = session("a", true);
        let subject = s.subject();
        let parsed = parse_session_subject(&subject).expect("session subject");
        assert_eq!((parsed.id, parsed.peer_subject), (s.id, None));
        let reply = format!("{}.inbox.7", s.subject());
        let parsed = parse_session_subject(&reply).expect("reply subject");
        assert_eq!((parsed.id, parsed.peer_subject), (s.id, Some("inbox.7")));
        assert_eq!(parse_session_subject(&format!("{}.", s.subject())), None);
        assert_eq!(parse_session_subject(&format!("{}x", s.subject())), None);
        assert_eq!(parse_session_subject("ws.session.nope"), None);
        assert_eq!(parse_session_subject("other"), None);
    }

    #[test]
    fn lookups_check_owner_and_tracking() {
        let reg = Registry::default();
        let mine = session("a", true);
        let untracked = session("a", false);
        reg.insert(Arc::clone(&mine));
        reg.insert(Arc::clone(&untracked));
        assert!(reg.get_owned("a", &mine.id).is_some());
        assert!(reg.get_owned("b", &mine.id).is_none());
        assert!(reg.get_owned("a", &untracked.id).is_none());
        assert!(reg.get_owned("a", &Uuid::new_v4()).is_none());
    }

    #[test]
    fn groups_follow_their_sessions() {
        let reg = Registry::default();
        let (a, b, other) = (session("c", true), session("c", true), session("d", true));
        for s in [&a, &b, &other] {
            reg.insert(Arc::clone(s));
        }
        reg.join(&a, "room").expect("join");
        reg.join(&b, "room").expect("join");
        reg.join(&other, "room").expect("join");
        assert_eq!(reg.group_members("c", "room").len(), 2);
        assert_eq!(reg.group_members("d", "room").len(), 1);
        reg.leave(&a, "room");
        assert_eq!(reg.group_members("c", "room").len(), 1);
        reg.remove(&b.id);
        assert!(reg.group_members("c", "room").is_empty());
        assert!(reg.join(&a, "").is_err());
        assert_eq!(reg.info(&a).groups.len(), 0);
        reg.join(&a, "room").expect("join");
        assert_eq!(reg.info(&a).groups, vec!["room".to_string()]);
    }

    #[tokio::test]
    async fn send_on_a_disconnected_session_is_an_error() {
        let s = session("a", true);
        let e = s
            .outbox
            .send(Message::text("x"))
            .await
            .expect_err("not connected");
        assert!(e.contains("not connected"), "{e}");
    }

    #[test]
    fn metadata_is_bounded() {
        let s = session("a", true);
        s.set_metadata("k".into(), "v".into()).expect("set");
        assert_eq!(s.get_metadata("k").as_deref(), Some("v"));
        assert!(s.set_metadata(String::new(), "v".into()).is_err());
        assert!(s.set_metadata("x".repeat(129), "v".into()).is_err());
        assert!(s.set_metadata("big".into(), "v".repeat(4097)).is_err());
        for i in 1..MAX_METADATA_ENTRIES {
            s.set_metadata(format!("k{i}"), "v".into())
                .expect("within the limit");
        }
        assert!(s.set_metadata("one-too-many".into(), "v".into()).is_err());
        s.set_metadata("k".into(), "replaced".into())
            .expect("replacing is fine");
        s.remove_metadata("k");
        assert_eq!(s.get_metadata("k"), None);
        assert_eq!(s.info(Vec::new()).metadata.len(), MAX_METADATA_ENTRIES - 1);
    }

    #[test]
    fn replies_go_to_the_waiting_request_only() {
        let s = session("a", true);
        let mut rx = s.replies.expect("_INBOX.1".into()).expect("registered");
        let other = Envelope {
            subject: "x".into(),
            body: Bytes::new(),
            reply_to: None,
            ack_id: None,
        };
        assert!(
            s.replies.resolve(other).is_some(),
            "not a reply: handed back"
        );
        let reply = Envelope {
            subject: "_INBOX.1".into(),
            body: Bytes::from_static(b"r"),
            reply_to: None,
            ack_id: None,
        };
        assert!(s.replies.resolve(reply).is_none());
        assert_eq!(rx.try_recv().expect("resolved").body.as_ref(), b"r");
    }
}
