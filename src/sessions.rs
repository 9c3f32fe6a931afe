//! The session registry: the only state shared between the wRPC exports and the sockets.
//!
//! A session is one WebSocket connection owned by one component. The registry maps session IDs
//! (UUIDs) to sessions; a session carries its owner, its remote URI, its connection state, the
//! handler links that want its inbound frames, and the sender half of its bounded outbound
//! queue, its metadata and its pending requests. Lookups by ID check the owner, so a component
//! never reaches another's session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::config::{Format, FrameType};
use crate::envelope::{self, Envelope};
use crate::ws::socket::{ConnState, Outbound};

/// Session subjects are this prefix followed by the session's UUID.
pub const SESSION_SUBJECT_PREFIX: &str = "ws.session.";

/// Metadata limits per session.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_BYTES: usize = 128;
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;
/// Group limits: name length, and groups one session may be in.
pub const MAX_GROUP_NAME_BYTES: usize = 128;
pub const MAX_GROUPS_PER_SESSION: usize = 64;
/// Requests that may wait for a reply on one session at once.
pub const MAX_PENDING_REQUESTS: usize = 10_000;

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
    /// The link that opened the connection.
    pub link_name: String,
    /// Remote URI (client mode) or peer address (server mode).
    pub remote: String,
    /// When false the session is not addressable by ID and inbound messages carry no reply_to.
    pub tracking: bool,
    pub frame_type: FrameType,
    pub format: Format,
    state: watch::Receiver<ConnState>,
    outbound: mpsc::Sender<Box<Outbound>>,
    routes: Mutex<Vec<Route>>,
    metadata: Mutex<BTreeMap<String, String>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Envelope>>>,
    groups: Mutex<BTreeSet<String>>,
    pub request: Option<RequestInfo>,
    reconnect_wait: Option<std::time::Duration>,
    waiting: tokio::sync::Semaphore,
    write_timeout: std::time::Duration,
    close_slow: bool,
    kick: tokio::sync::Notify,
    /// Woken when a handler link attaches (see [`Session::wait_for_route`]).
    route_added: tokio::sync::Notify,
}

/// The upgrade request of a server-mode session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub subprotocol: Option<String>,
}

/// What the session API shows of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    pub link_name: String,
    pub remote: String,
    pub tracking: bool,
    pub frame_type: FrameType,
    pub format: Format,
    pub request: Option<RequestInfo>,
    /// Client sessions reconnect: a publish while disconnected waits this long for the socket.
    /// `None` (server sessions) fails at once.
    pub reconnect_wait: Option<std::time::Duration>,
    /// How many publishes may wait for a reconnect at once.
    pub max_waiting: usize,
    /// How long a publish waits for its write; past it the peer is a slow consumer.
    pub write_timeout: std::time::Duration,
    /// Close a slow consumer's socket (`SLOW_CONSUMER=close`) instead of failing the publish only.
    pub close_slow: bool,
}

impl SessionOptions {
    /// The options a link's settings give a session; callers set what differs by mode
    /// (`request`, `reconnect_wait`, `max_waiting`).
    pub fn from_link(
        component_id: &str,
        link_name: &str,
        remote: String,
        settings: &crate::config::LinkSettings,
    ) -> Self {
        Self {
            component_id: component_id.to_string(),
            link_name: link_name.to_string(),
            remote,
            tracking: settings.session_tracking,
            frame_type: settings.frame_type,
            format: settings.format,
            request: None,
            reconnect_wait: None,
            max_waiting: 0,
            write_timeout: settings.write_timeout,
            close_slow: settings.close_slow_consumers,
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
        Self {
            id: Uuid::new_v4(),
            component_id: options.component_id,
            link_name: options.link_name,
            remote: options.remote,
            tracking: options.tracking,
            frame_type: options.frame_type,
            format: options.format,
            state,
            outbound,
            routes: Mutex::default(),
            metadata: Mutex::default(),
            pending: Mutex::default(),
            groups: Mutex::default(),
            request: options.request,
            reconnect_wait: options.reconnect_wait,
            waiting: tokio::sync::Semaphore::new(options.max_waiting),
            write_timeout: options.write_timeout,
            close_slow: options.close_slow,
            kick: tokio::sync::Notify::new(),
            route_added: tokio::sync::Notify::new(),
        }
    }

    pub fn info(&self) -> SessionInfo {
        let since = match *self.state.borrow() {
            ConnState::Connected { since } => since
                .duration_since(UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_millis()).ok()),
            _ => None,
        };
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
            groups: lock(&self.groups).iter().cloned().collect(),
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

    /// Registers a request waiting for the envelope the peer sends to `inbox`.
    pub fn expect_reply(&self, inbox: String) -> Result<oneshot::Receiver<Envelope>, String> {
        let mut pending = lock(&self.pending);
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

    pub fn forget_reply(&self, inbox: &str) {
        lock(&self.pending).remove(inbox);
    }

    /// Ends every request waiting for a reply on this session: the session is gone.
    fn end_requests(&self) {
        lock(&self.pending).clear();
    }

    /// Hands `envelope` to the request waiting on its subject; gives it back if none waits.
    pub fn resolve_reply(&self, envelope: Envelope) -> Option<Envelope> {
        let waiting = lock(&self.pending).remove(&envelope.subject);
        match waiting {
            Some(tx) => {
                // A request that gave up in the meantime simply drops the reply.
                let _ = tx.send(envelope);
                None
            }
            None => Some(envelope),
        }
    }

    /// The frame for a message sent to this session: the body itself (raw) or an envelope.
    pub fn frame(
        &self,
        subject: &str,
        body: Bytes,
        reply_to: Option<&str>,
        frame_type: FrameType,
    ) -> Result<Message, String> {
        match self.format {
            Format::Raw => encode(body, frame_type),
            Format::Json => Ok(Message::text(envelope::encode(subject, &body, reply_to))),
        }
    }

    /// The subject that names this session in `reply_to` and `publish`.
    pub fn subject(&self) -> String {
        format!("{SESSION_SUBJECT_PREFIX}{}", self.id)
    }

    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    pub fn is_connected(&self) -> bool {
        matches!(*self.state.borrow(), ConnState::Connected { .. })
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

    /// Writes one frame and waits until it was flushed to the socket.
    /// Every failure is returned as a message for the caller; nothing is dropped silently.
    pub async fn send(&self, message: Message) -> Result<(), String> {
        if !self.is_connected() {
            self.wait_connected().await?;
        }
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        self.send_until(message, deadline, true).await
    }

    /// One frame of a fan-out: queued at once (a disconnected session fails at once), and
    /// waited for until the fan-out's one `deadline`. A session that has not written it by
    /// then counts as not reached (the frame may still be written); only a full queue counts
    /// as a slow consumer.
    pub async fn send_fanout(
        &self,
        message: Message,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        if !self.is_connected() {
            return Err(format!("session {} is not connected", self.id));
        }
        self.send_until(message, deadline, false).await
    }

    async fn send_until(
        &self,
        message: Message,
        deadline: tokio::time::Instant,
        slow_on_timeout: bool,
    ) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        self.outbound
            .try_send(Box::new(Outbound {
                message,
                ack: Some(ack),
            }))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.slow_consumer(format!("send queue of session {} is full", self.id))
                }
                mpsc::error::TrySendError::Closed(_) => format!("session {} is closed", self.id),
            })?;
        match tokio::time::timeout_at(deadline, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(format!("session {} closed before the write", self.id)),
            Err(_) if slow_on_timeout => Err(self.slow_consumer(format!(
                "session {} did not take the frame within {} ms: the peer is not reading (the frame may still be written)",
                self.id,
                self.write_timeout.as_millis()
            ))),
            Err(_) => Err(format!(
                "session {} did not take the frame before the fan-out's deadline (it may still be written)",
                self.id
            )),
        }
    }

    /// Applies the slow-consumer policy and returns the error for the publisher.
    fn slow_consumer(&self, error: String) -> String {
        if self.close_slow {
            // Only the socket being served now is kicked: no permit is stored for a later one.
            self.kick.notify_waiters();
            format!("{error}; the session is being closed (SLOW_CONSUMER=close)")
        } else {
            error
        }
    }

    /// Resolves when the slow-consumer policy wants this session's socket dropped.
    pub async fn kicked(&self) {
        self.kick.notified().await;
    }
}

impl Session {
    /// Waits (bounded in time and in number of waiters) for a client session to reconnect.
    async fn wait_connected(&self) -> Result<(), String> {
        let not_connected = || format!("session {} is not connected", self.id);
        let wait = self.reconnect_wait.ok_or_else(not_connected)?;
        let _permit = self.waiting.try_acquire().map_err(|_| {
            format!(
                "session {} is not connected and too many publishes are already waiting",
                self.id
            )
        })?;
        let mut state = self.state.clone();
        let waited = tokio::time::timeout(wait, async {
            state
                .wait_for(|s| matches!(s, ConnState::Connected { .. }))
                .await
                .is_ok()
        })
        .await;
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("session {} is closed", self.id)),
            Err(_) => Err(format!(
                "session {} is not connected (waited {} ms for a reconnect)",
                self.id,
                wait.as_millis()
            )),
        }
    }

    /// Queues one frame without waiting for the write (error frames); fails when the queue is full.
    pub fn send_nowait(&self, message: Message) -> Result<(), String> {
        self.outbound
            .try_send(Box::new(Outbound { message, ack: None }))
            .map_err(|_| format!("send queue of session {} is full or closed", self.id))
    }

    /// Closes the socket with `code` and `reason`, waiting until the close frame was written.
    pub async fn close(&self, code: u16, reason: &str) -> Result<(), String> {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        if !(code == 1000 || (3000..=4999).contains(&code)) {
            return Err(format!(
                "close code {code} is not allowed: use 1000 or 3000-4999"
            ));
        }
        if reason.len() > 123 {
            return Err("close reason must be at most 123 bytes".to_string());
        }
        self.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        })))
        .await
    }
}

/// Turns a body into a frame of the requested type.
pub fn encode(body: Bytes, frame_type: FrameType) -> Result<Message, String> {
    match frame_type {
        FrameType::Binary => Ok(Message::Binary(body)),
        FrameType::Text => body
            .try_into()
            .map(Message::Text)
            .map_err(|_| "body is not valid UTF-8, but FRAME_TYPE is text".to_string()),
        FrameType::Auto => Ok(match body.clone().try_into() {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(body),
        }),
    }
}

/// All live sessions, keyed by ID, and the groups of each component.
#[derive(Default)]
pub struct Registry {
    sessions: DashMap<Uuid, Arc<Session>>,
    /// (component, group) -> member sessions.
    groups: DashMap<(String, String), BTreeSet<Uuid>>,
}

impl Registry {
    pub fn insert(&self, session: Arc<Session>) {
        self.sessions.insert(session.id, session);
    }

    /// Removes a session, and with it its group memberships.
    pub fn remove(&self, id: &Uuid) {
        let Some((_, session)) = self.sessions.remove(id) else {
            return;
        };
        // Requests waiting for this session's peer fail now, not at their timeout.
        session.end_requests();
        let groups = std::mem::take(&mut *lock(&session.groups));
        for group in groups {
            let key = (session.component_id.clone(), group);
            self.groups.remove_if_mut(&key, |_, members| {
                members.remove(id);
                members.is_empty()
            });
        }
    }

    /// Adds `session` to its component's group `group`.
    pub fn join(&self, session: &Session, group: &str) -> Result<(), String> {
        if group.is_empty() || group.len() > MAX_GROUP_NAME_BYTES {
            return Err(format!(
                "group names must be 1 to {MAX_GROUP_NAME_BYTES} bytes"
            ));
        }
        {
            let mut groups = lock(&session.groups);
            if !groups.contains(group) && groups.len() >= MAX_GROUPS_PER_SESSION {
                return Err(format!(
                    "a session may be in at most {MAX_GROUPS_PER_SESSION} groups"
                ));
            }
            groups.insert(group.to_string());
        }
        self.groups
            .entry((session.component_id.clone(), group.to_string()))
            .or_default()
            .insert(session.id);
        // The session may have ended meanwhile: do not leave a dangling member behind.
        if !self.sessions.contains_key(&session.id) {
            self.remove_member(session, group);
        }
        Ok(())
    }

    /// Removes `session` from its component's group `group` (absent is fine).
    pub fn leave(&self, session: &Session, group: &str) {
        lock(&session.groups).remove(group);
        self.remove_member(session, group);
    }

    fn remove_member(&self, session: &Session, group: &str) {
        let key = (session.component_id.clone(), group.to_string());
        self.groups.remove_if_mut(&key, |_, members| {
            members.remove(&session.id);
            members.is_empty()
        });
    }

    /// The live sessions in `component_id`'s group `group`.
    pub fn group_members(&self, component_id: &str, group: &str) -> Vec<Arc<Session>> {
        let ids: Vec<Uuid> = self
            .groups
            .get(&(component_id.to_string(), group.to_string()))
            .map(|m| m.iter().copied().collect())
            .unwrap_or_default();
        ids.iter()
            .filter_map(|id| self.get_owned(component_id, id))
            .collect()
    }

    /// The session `id` if it belongs to `component_id` and is tracked. A foreign, untracked
    /// or unknown ID gives the same `None`, so IDs of other components cannot be probed.
    pub fn get_owned(&self, component_id: &str, id: &Uuid) -> Option<Arc<Session>> {
        self.sessions
            .get(id)
            .filter(|s| s.component_id == component_id && s.tracking)
            .map(|s| Arc::clone(s.value()))
    }

    /// Every session (tracked or not) that server link `link_name` of `component_id` accepted.
    pub fn clients_of_link(&self, component_id: &str, link_name: &str) -> Vec<Arc<Session>> {
        let mut sessions: Vec<Arc<Session>> = self
            .sessions
            .iter()
            .filter(|s| {
                s.component_id == component_id && s.link_name == link_name && s.request.is_some()
            })
            .map(|s| Arc::clone(s.value()))
            .collect();
        sessions.sort_by_key(|s| s.id);
        sessions
    }

    /// Every session (tracked or not) of `component_id` that takes frames from `link_name`.
    pub fn routed_to(&self, component_id: &str, link_name: &str) -> Vec<Arc<Session>> {
        self.sessions
            .iter()
            .filter(|s| s.component_id == component_id && s.has_route(link_name))
            .map(|s| Arc::clone(s.value()))
            .collect()
    }

    /// The tracked sessions of `component_id`, ordered by ID.
    pub fn owned_by(&self, component_id: &str) -> Vec<Arc<Session>> {
        let mut sessions: Vec<Arc<Session>> = self
            .sessions
            .iter()
            .filter(|s| s.component_id == component_id && s.tracking)
            .map(|s| Arc::clone(s.value()))
            .collect();
        sessions.sort_by_key(|s| s.id);
        sessions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(component: &str, tracking: bool) -> Arc<Session> {
        let (_tx, state) = watch::channel(ConnState::Connecting);
        let (out, _rx) = mpsc::channel(1);
        Arc::new(Session::new(
            SessionOptions {
                component_id: component.into(),
                link_name: "l".into(),
                remote: "ws://x".into(),
                tracking,
                frame_type: FrameType::Auto,
                format: Format::Raw,
                request: None,
                reconnect_wait: None,
                max_waiting: 1,
                write_timeout: std::time::Duration::from_secs(1),
                close_slow: false,
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
        assert_eq!(a.info().groups.len(), 0);
    }

    #[test]
    fn auto_frames_pick_text_for_utf8_only() {
        assert!(matches!(
            encode(Bytes::from_static(b"hi"), FrameType::Auto),
            Ok(Message::Text(_))
        ));
        assert!(matches!(
            encode(Bytes::from_static(&[0xff]), FrameType::Auto),
            Ok(Message::Binary(_))
        ));
        assert!(encode(Bytes::from_static(&[0xff]), FrameType::Text).is_err());
        assert!(matches!(
            encode(Bytes::from_static(b"hi"), FrameType::Binary),
            Ok(Message::Binary(_))
        ));
    }

    #[tokio::test]
    async fn send_on_a_disconnected_session_is_an_error() {
        let s = session("a", true);
        let e = s.send(Message::text("x")).await.expect_err("not connected");
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
        assert_eq!(s.info().metadata.len(), MAX_METADATA_ENTRIES - 1);
    }

    #[test]
    fn replies_go_to_the_waiting_request_only() {
        let s = session("a", true);
        let mut rx = s.expect_reply("_INBOX.1".into()).expect("registered");
        let other = Envelope {
            subject: "x".into(),
            body: Bytes::new(),
            reply_to: None,
        };
        assert!(s.resolve_reply(other).is_some(), "not a reply: handed back");
        let reply = Envelope {
            subject: "_INBOX.1".into(),
            body: Bytes::from_static(b"r"),
            reply_to: None,
        };
        assert!(s.resolve_reply(reply).is_none());
        assert_eq!(rx.try_recv().expect("resolved").body.as_ref(), b"r");
    }
}
