//! Publish routing as the link table sees it: the caller's links are gathered under the
//! table's lock and [`routing::route`] decides; fan-out deadlines; the caller's sessions.

use std::sync::Arc;
use std::time::Duration;

use super::table::Links;
use super::WsProvider;
use crate::config::FrameType;
use crate::routing::{self, Destination};
use crate::session::{Registry, Session};

/// Where a publish goes: the sessions, the frame type chosen by the consumer link (if it set
/// one), the subject written in an envelope, and the deadline of a fan-out.
pub struct Target {
    pub sessions: Vec<Arc<Session>>,
    /// What other replicas must write too.
    pub remote: Remote,
    pub frame_type: Option<FrameType>,
    pub subject: String,
    pub fanout_timeout: Duration,
}

/// The part of a publish that other replicas hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Remote {
    None,
    /// The session is not here: the replica that holds it writes.
    Session(uuid::Uuid),
    /// The link's own connection, which another replica holds (or none, during a takeover).
    Connection(uuid::Uuid),
    /// The server link's clients on other replicas.
    ServerLink(String),
}

impl WsProvider {
    /// Chooses the sessions a component's publish or request goes to ([`routing::route`]):
    /// a named session must be the caller's own.
    pub fn route_publish(
        &self,
        component: &str,
        link_name: &str,
        subject: &str,
    ) -> Result<Target, String> {
        let links = self.links();
        let key = (component.to_string(), link_name.to_string());
        let consumer = links.consumers.get(&key);
        let caller = || {
            let mut connections: Vec<Arc<Session>> = links
                .handlers
                .iter()
                .filter(|((c, _), _)| c == component)
                .map(|(_, h)| Arc::clone(&h.conn.session))
                .collect();
            connections.sort_by_key(|s| s.id);
            connections.dedup_by_key(|s| s.id);
            routing::CallerLinks {
                server_links: links
                    .servers
                    .iter()
                    .filter(|((c, _), _)| c == component)
                    .map(|((_, link), server)| (link.as_str(), server.subject.as_str()))
                    .collect(),
                consumer_connection: consumer
                    .and_then(|c| c.conn.as_ref())
                    .map(|conn| Arc::clone(&conn.session)),
                connections,
            }
        };
        let cluster = self.cluster_now();
        let lattice = cluster.is_some();
        // Alone (or the only replica): a server link's clients are all here.
        let replicated = cluster.is_some_and(|c| !c.alone());
        let (sessions, written, remote) =
            match routing::route(caller, component, link_name, subject)? {
                Destination::Session { id, subject } => {
                    match self.inner.registry.get_owned(component, &id) {
                        Some(session) => (vec![session], subject, Remote::None),
                        None if lattice => (Vec::new(), subject, Remote::Session(id)),
                        None => return Err(format!("unknown session {id}")),
                    }
                }
                Destination::ServerLink(link) => {
                    let clients = self.server_clients(component, &link);
                    let remote = if replicated {
                        Remote::ServerLink(link.to_string())
                    } else {
                        Remote::None
                    };
                    (clients, subject, remote)
                }
                Destination::Connection(session) if !session.is_here() => {
                    (Vec::new(), subject, Remote::Connection(session.id))
                }
                Destination::Connection(session) => (vec![session], subject, Remote::None),
            };
        Ok(Target {
            sessions,
            remote,
            frame_type: consumer.and_then(|c| c.frame_type),
            subject: written.to_string(),
            fanout_timeout: self.fanout_timeout_of(&links, component, link_name),
        })
    }

    /// The deadline of one fan-out made on `component`'s link `link_name`: the consumer link's
    /// `FANOUT_TIMEOUT_MS`, else the sessions link's, else the default.
    pub(super) fn fanout_timeout_of(
        &self,
        links: &Links,
        component: &str,
        link_name: &str,
    ) -> Duration {
        let key = (component.to_string(), link_name.to_string());
        links
            .consumers
            .get(&key)
            .map(|c| c.fanout_timeout)
            .or_else(|| links.sessions.get(&key).map(|s| s.fanout_timeout))
            .unwrap_or(crate::config::DEFAULT_FANOUT_TIMEOUT)
    }

    /// The deadline of one fan-out of the session API called on `link_name`.
    pub fn fanout_timeout(&self, component: &str, link_name: &str) -> Duration {
        self.fanout_timeout_of(&self.links(), component, link_name)
    }

    /// The clients of one of `component`'s server-mode links, tracked or not: the link's
    /// subject names all of them.
    pub(crate) fn server_clients(&self, component: &str, link_name: &str) -> Vec<Arc<Session>> {
        self.inner.registry.clients_of_link(component, link_name)
    }

    /// The caller's own tracked session `id` (a UUID string).
    pub fn owned_session(&self, component: &str, id: &str) -> Result<Arc<Session>, String> {
        uuid::Uuid::parse_str(id)
            .ok()
            .and_then(|uuid| self.inner.registry.get_owned(component, &uuid))
            .ok_or_else(|| format!("unknown session {id}"))
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The caller's tracked sessions.
    pub fn owned_sessions(&self, component: &str) -> Vec<Arc<Session>> {
        self.inner.registry.owned_by(component)
    }
}
