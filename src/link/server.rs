//! A server-mode link: one listener per (component, link name), one session per client.
//!
//! [`Listener::start`] binds the address (so "address in use" is the link's error, reported at
//! once) and runs the transport's accept loop. Each admitted client becomes a registered
//! session of the component, with the link's route, its own `handle-message` delivery task and,
//! when `LIFECYCLE_EVENTS` is on, a `ws.lifecycle.connected` message before its first frame and
//! a `ws.lifecycle.disconnected` message after its last. Dropping the handle (link deleted)
//! closes the listener and every client with a close frame (1001).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::wrpc::ComponentClient;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::config::{LinkSettings, ServerSettings};
use crate::delivery::Inbound;
use crate::metrics::Metrics;
use crate::session::{Mode, Registry, RequestInfo, Route, Session, SessionOptions};
use crate::task::OwnedTask;
use crate::ws::server::{Accept, PeerInfo, Server, ServerOptions};
use crate::ws::socket::{Closed, ConnState, Outbound};

pub const LIFECYCLE_CONNECTED: &str = "ws.lifecycle.connected";
pub const LIFECYCLE_DISCONNECTED: &str = "ws.lifecycle.disconnected";

pub struct Listener {
    pub address: Option<SocketAddr>,
    task: OwnedTask,
}

impl Listener {
    /// Binds and starts accepting clients for `component_id` on link `link_name`.
    pub async fn start(
        component_id: &str,
        link_name: &str,
        settings: &LinkSettings,
        wrpc: ComponentClient,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let server_settings = settings
            .server()
            .ok_or_else(|| "link is not in server mode".to_string())?;
        let lifecycle = server_settings.lifecycle_events;
        let server = Server::bind(server_options(settings, server_settings)).await?;
        let address = server.local_addr();
        let acceptor = Arc::new(Acceptor {
            component_id: component_id.to_string(),
            link_name: link_name.to_string(),
            subject: settings.inbound_subject(link_name),
            settings: settings.clone(),
            lifecycle,
            wrpc,
            registry,
            metrics,
        });
        // Everything the listener and its connections log names the component and link.
        let span = tracing::info_span!(
            "listener",
            component = component_id,
            link = link_name,
            mode = "server"
        );
        let task = OwnedTask::spawn(|cancel| server.run(acceptor, cancel).instrument(span));
        Ok(Arc::new(Self { address, task }))
    }

    /// Stops accepting, closes every client, and waits up to `grace` for them.
    pub async fn close(&self, grace: Duration) {
        self.task.close(grace).await;
    }
}

/// The transport's options for a server link's listener.
fn server_options(settings: &LinkSettings, server: &ServerSettings) -> ServerOptions {
    ServerOptions {
        listen_address: server.listen_address,
        path: server.path.clone(),
        token: super::token(server.auth_token.as_ref()),
        allowed_origins: server.allowed_origins.clone(),
        max_connections: server.max_connections,
        subprotocols: server.subprotocols.clone(),
        tls: server.tls.clone(),
        session_headers: server.session_headers.clone(),
        handshake_timeout: server.handshake_timeout,
        max_pending_handshakes: server.max_pending_handshakes,
        max_handshakes_per_address: server.max_handshakes_per_address,
        max_message_bytes: settings.max_message_bytes,
        keepalive: settings.keepalive.into(),
    }
}

/// Turns admitted clients into sessions of one component's link.
struct Acceptor {
    component_id: String,
    link_name: String,
    subject: String,
    settings: LinkSettings,
    lifecycle: bool,
    wrpc: ComponentClient,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

/// Lives as long as one client connection.
struct Guard {
    session: Arc<Session>,
    inbound: Arc<Inbound>,
    _state: watch::Sender<ConnState>,
}

impl Acceptor {
    /// The `ws.lifecycle.connected` message of a new client's session.
    fn connected(&self, session: &Session) -> BrokerMessage {
        let body = serde_json::json!({
            "session": session.id.to_string(),
            "link": self.link_name,
            "remote": session.remote,
            "path": session.request.as_ref().map(|r| r.path.clone()),
        });
        BrokerMessage {
            subject: LIFECYCLE_CONNECTED.to_string(),
            body: Bytes::from(body.to_string()),
            reply_to: session.tracking.then(|| session.subject().to_string()),
        }
    }
}

impl Accept for Acceptor {
    type Sink = Inbound;
    type Guard = Guard;

    fn open(&self, peer: PeerInfo) -> (Arc<Inbound>, mpsc::Receiver<Box<Outbound>>, Guard) {
        let super::Opened {
            session,
            inbound,
            outbound,
            state,
        } = super::open(super::Opening {
            options: SessionOptions {
                request: Some(RequestInfo {
                    path: peer.path,
                    query: peer.query,
                    headers: peer.headers,
                    subprotocol: peer.subprotocol,
                }),
                ..SessionOptions::from_link(
                    Mode::Server,
                    &self.component_id,
                    &self.link_name,
                    peer.addr.to_string(),
                    &self.settings,
                )
            },
            state: ConnState::Connected {
                since: SystemTime::now(),
            },
            queue_len: self.settings.send_queue_len,
            route: Some(Route {
                link_name: self.link_name.clone(),
                subject: self.subject.clone(),
            }),
            delivery: (&self.settings).into(),
            wrpc: self.wrpc.clone(),
            id: None,
            register: true,
            registry: &self.registry,
            metrics: Arc::clone(&self.metrics),
        });
        if self.lifecycle {
            // Queued before the socket is read, so it arrives before the client's first message.
            if let Some(connected) = inbound.lifecycle(self.connected(&session), &self.link_name) {
                let _ = inbound.queue.try_send(Box::new(connected));
            }
        }
        let guard = Guard {
            session,
            inbound: Arc::clone(&inbound),
            _state: state,
        };
        (inbound, outbound, guard)
    }

    fn rejected(&self, status: u16) {
        self.metrics.rejected(status);
    }

    fn closed(&self, guard: Guard, closed: Closed) {
        let Guard {
            session,
            inbound,
            _state: state,
        } = guard;
        state.send_replace(ConnState::Disconnected {
            error: closed.reason.clone(),
        });
        self.registry.remove(&session.id);
        if self.lifecycle {
            let body = serde_json::json!({
                "session": session.id.to_string(),
                "link": self.link_name,
                "code": closed.code,
                "reason": closed.reason,
            });
            let message = BrokerMessage {
                subject: LIFECYCLE_DISCONNECTED.to_string(),
                body: Bytes::from(body.to_string()),
                reply_to: None,
            };
            // Delivered after the session's last messages.
            if let Some(disconnected) = inbound.lifecycle(message, &self.link_name) {
                inbound.farewell(disconnected);
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn the_listener_takes_the_server_settings_and_their_own_token() {
        let settings = super::super::tests::settings(
            &[
                ("MODE", "server"),
                ("LISTEN_ADDRESS", "127.0.0.1:9"),
                ("PATH", "/ws"),
                ("PING_INTERVAL_SEC", "0"),
            ],
            "t0k",
        );
        let server = settings.server().expect("server mode");
        let options = server_options(&settings, server);
        assert_eq!(options.token.as_ref().map(|t| t.expose()), Some("t0k"));
        assert_eq!(options.listen_address, server.listen_address);
        assert_eq!(options.path, "/ws");
        assert_eq!(options.keepalive.ping_interval, None);
        assert!(!format!("{options:?}").contains("t0k"));
    }
}
