//! The session registry: the only state shared between the wRPC exports and the sockets.
//!
//! A session is one WebSocket connection owned by one component. The registry maps session IDs
//! (UUIDs) to sessions; a session carries its owner, its remote URI, its connection state, the
//! handler links that want its inbound frames, and the sender half of its bounded outbound
//! queue. Lookups by ID check the owner, so a component never reaches another's session.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::config::FrameType;
use crate::ws::client::{ConnState, Outbound};

/// Session subjects are this prefix followed by the session's UUID.
pub const SESSION_SUBJECT_PREFIX: &str = "ws.session.";

/// Returns the session ID named by `subject`, if it is a session subject.
pub fn parse_session_subject(subject: &str) -> Option<Uuid> {
    subject
        .strip_prefix(SESSION_SUBJECT_PREFIX)
        .and_then(|id| Uuid::parse_str(id).ok())
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
    pub uri: String,
    /// When false the session is not addressable by ID and inbound messages carry no reply_to.
    pub tracking: bool,
    pub frame_type: FrameType,
    state: watch::Receiver<ConnState>,
    outbound: mpsc::Sender<Outbound>,
    routes: Mutex<Vec<Route>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("component_id", &self.component_id)
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(
        component_id: String,
        uri: String,
        tracking: bool,
        frame_type: FrameType,
        state: watch::Receiver<ConnState>,
        outbound: mpsc::Sender<Outbound>,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            component_id,
            uri,
            tracking,
            frame_type,
            state,
            outbound,
            routes: Mutex::new(Vec::new()),
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
        self.routes.lock().ok().and_then(|r| r.first().cloned())
    }

    pub fn add_route(&self, route: Route) {
        if let Ok(mut routes) = self.routes.lock() {
            routes.push(route);
        }
    }

    pub fn remove_route(&self, link_name: &str) {
        if let Ok(mut routes) = self.routes.lock() {
            routes.retain(|r| r.link_name != link_name);
        }
    }

    /// Writes `body` as one frame and waits until it was flushed to the socket.
    /// Every failure is returned as a message for the caller; nothing is dropped silently.
    pub async fn send(&self, body: Bytes, frame_type: FrameType) -> Result<(), String> {
        if !self.is_connected() {
            return Err(format!("session {} is not connected", self.id));
        }
        let message = encode(body, frame_type)?;
        let (ack, done) = oneshot::channel();
        self.outbound
            .try_send(Outbound {
                message,
                ack: Some(ack),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    format!("send queue of session {} is full", self.id)
                }
                mpsc::error::TrySendError::Closed(_) => format!("session {} is closed", self.id),
            })?;
        done.await
            .unwrap_or_else(|_| Err(format!("session {} closed before the write", self.id)))
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

/// All live sessions, keyed by ID.
#[derive(Default)]
pub struct Registry {
    sessions: DashMap<Uuid, Arc<Session>>,
}

impl Registry {
    pub fn insert(&self, session: Arc<Session>) {
        self.sessions.insert(session.id, session);
    }

    pub fn remove(&self, id: &Uuid) {
        self.sessions.remove(id);
    }

    /// The session `id` if it belongs to `component_id` and is tracked. A foreign, untracked
    /// or unknown ID gives the same `None`, so IDs of other components cannot be probed.
    pub fn get_owned(&self, component_id: &str, id: &Uuid) -> Option<Arc<Session>> {
        self.sessions
            .get(id)
            .filter(|s| s.component_id == component_id && s.tracking)
            .map(|s| Arc::clone(s.value()))
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(component: &str, tracking: bool) -> Arc<Session> {
        let (_tx, state) = watch::channel(ConnState::Connecting);
        let (out, _rx) = mpsc::channel(1);
        Arc::new(Session::new(
            component.into(),
            "ws://x".into(),
            tracking,
            FrameType::Auto,
            state,
            out,
        ))
    }

    #[test]
    fn subjects_round_trip() {
        let s = session("a", true);
        assert_eq!(parse_session_subject(&s.subject()), Some(s.id));
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
        let e = s
            .send(Bytes::from_static(b"x"), FrameType::Auto)
            .await
            .expect_err("not connected");
        assert!(e.contains("not connected"), "{e}");
    }
}
