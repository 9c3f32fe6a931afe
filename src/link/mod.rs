//! Opening a link's sessions: client connections ([`client`]) and server listeners
//! ([`server`]) set a session up the same way, here: its channels, the session, its registry
//! entry and its delivery task.

pub mod client;
pub mod server;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config;
use crate::delivery::{self, DeliveryOptions, Inbound};
use crate::metrics::Metrics;
use crate::session::{Registry, Route, Session, SessionOptions};
use crate::wrpc::ComponentClient;
use crate::ws::socket::{ConnState, Keepalive, Outbound};
use crate::ws::Token;

/// What a new session needs.
pub struct Opening<'a> {
    pub options: SessionOptions,
    /// The connection state it starts in.
    pub state: ConnState,
    /// Its outbound queue's length (`SEND_QUEUE_LEN`).
    pub queue_len: usize,
    /// The handler link that takes its frames from the start (server mode), if any.
    pub route: Option<Route>,
    pub delivery: DeliveryOptions,
    pub wrpc: ComponentClient,
    pub registry: &'a Registry,
    pub metrics: Arc<Metrics>,
    /// The session's ID if it is given (a client connection of several replicas), and whether
    /// it is registered now (else its holder registers it once it holds the socket).
    pub id: Option<uuid::Uuid>,
    pub register: bool,
}

/// A registered session, with what its socket task needs: the sink for its frames, its outbound
/// queue, and the sender of its connection state.
pub struct Opened {
    pub session: Arc<Session>,
    pub inbound: Arc<Inbound>,
    pub outbound: mpsc::Receiver<Box<Outbound>>,
    pub state: watch::Sender<ConnState>,
}

/// Sets a session up: registered (addressable by ID) with its delivery task running.
pub fn open(opening: Opening<'_>) -> Opened {
    let (state, state_rx) = watch::channel(opening.state);
    let (out_tx, outbound) = mpsc::channel(opening.queue_len);
    let id = opening.id.unwrap_or_else(uuid::Uuid::new_v4);
    let session = Arc::new(Session::with_id(id, opening.options, state_rx, out_tx));
    if let Some(route) = opening.route {
        session.add_route(route);
    }
    if opening.register {
        opening.registry.insert(Arc::clone(&session));
    } else {
        session.set_here(false);
    }
    let inbound = delivery::start(
        Arc::clone(&session),
        opening.wrpc,
        opening.delivery,
        opening.metrics,
    );
    Opened {
        session,
        inbound,
        outbound,
        state,
    }
}

/// A configured secret as the transport's token.
fn token(secret: Option<&config::Secret>) -> Option<Token> {
    secret.map(|s| Token::new(s.expose()))
}

impl From<config::Keepalive> for Keepalive {
    fn from(k: config::Keepalive) -> Self {
        Self {
            ping_interval: k.ping_interval,
            pong_timeout: k.pong_timeout,
            idle_timeout: k.idle_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::config::{LinkSettings, ProviderDefaults};

    /// The settings of a link with config `pairs` and the secret `AUTH_TOKEN` = `token`.
    pub(super) fn settings(pairs: &[(&str, &str)], token: &str) -> LinkSettings {
        let config: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let secrets = [("AUTH_TOKEN".to_string(), token.to_string())].into();
        ProviderDefaults::default()
            .link_settings(&config, &secrets)
            .expect("parse")
    }
}
