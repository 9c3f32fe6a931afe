//! The link table: every link the provider holds, by (component ID, link name) and
//! interface, the links whose config was refused, and the pool of shared client connections.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::{Endpoint, FrameType};
use crate::link::client::ClientSocket;
use crate::link::server::Listener;

/// (component ID, link name)
pub(super) type LinkKey = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Direction {
    Handler,
    Consumer,
    Sessions,
}

impl Direction {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Direction::Handler => "handler",
            Direction::Consumer => "consumer",
            Direction::Sessions => "sessions",
        }
    }

    /// The component->provider interface a link's WIT namespace and package name.
    pub(super) fn of_target(namespace: &str, package: &str) -> Self {
        if namespace == "wasmcloud-websocket" && package == "provider" {
            Direction::Sessions
        } else {
            Direction::Consumer
        }
    }
}

/// A provider->component link: its connection, whose frames it receives.
pub(super) struct HandlerLink {
    pub(super) conn: Arc<ClientSocket>,
    pub(super) link_name: String,
}

impl Drop for HandlerLink {
    fn drop(&mut self) {
        self.conn.session.remove_route(&self.link_name);
    }
}

/// A component->provider link: its own connection, if its config set `URI`.
pub(super) struct ConsumerLink {
    pub(super) conn: Option<Arc<ClientSocket>>,
    pub(super) frame_type: Option<FrameType>,
    pub(super) fanout_timeout: Duration,
}

/// A component->provider link to the session API.
pub(super) struct SessionsLink {
    pub(super) fanout_timeout: Duration,
}

/// A provider->component link in server mode: its listener and the subject of its clients.
pub(super) struct ServerLink {
    pub(super) listener: Arc<Listener>,
    pub(super) subject: String,
    /// `RECOVERY=true`: the link's history (its stream is deleted with the link).
    pub(super) history: Option<Arc<crate::recovery::History>>,
}

#[derive(Default)]
pub(super) struct Links {
    pub(super) handlers: HashMap<LinkKey, HandlerLink>,
    pub(super) servers: HashMap<LinkKey, ServerLink>,
    pub(super) consumers: HashMap<LinkKey, ConsumerLink>,
    pub(super) sessions: HashMap<LinkKey, SessionsLink>,
    pub(super) pool: HashMap<(String, Endpoint), Weak<ClientSocket>>,
    /// Links whose config was refused, with the reason (reported by health).
    pub(super) errors: HashMap<(Direction, LinkKey), String>,
}

impl Links {
    pub(super) fn connection_for(
        &self,
        component: &str,
        endpoint: &Endpoint,
    ) -> Option<Arc<ClientSocket>> {
        self.pool
            .get(&(component.to_string(), endpoint.clone()))
            .and_then(Weak::upgrade)
    }

    pub(super) fn prune_pool(&mut self) {
        self.pool.retain(|_, conn| conn.strong_count() > 0);
    }
}
