//! A server-mode link: one listener per (component, link name), one session per client.
//!
//! [`Listener::start`] binds the address (so "address in use" is the link's error, reported at
//! once) and runs the transport's accept loop. Each admitted client becomes a registered
//! session of the component, with the link's route, its own `handle-message` delivery task and,
//! when `LIFECYCLE_EVENTS` is on, a `ws.lifecycle.connected` message before its first frame and
//! a `ws.lifecycle.disconnected` message after its last. Dropping the handle (link deleted)
//! closes the listener and every client with a close frame (1001).
//!
//! With `RECOVERY=true` a session outlives a dropped socket: [`resume`] keeps it for
//! `HISTORY_TTL_SEC`, and a client that comes back with its resume token gets it back.

mod resume;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::wrpc::ComponentClient;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use tokio_util::sync::CancellationToken;

use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::config::{LinkSettings, ServerSettings};
use crate::delivery::Inbound;
use crate::metrics::Metrics;
use crate::recovery::{History, Sequencer};
use crate::session::{Mode, Registry, RequestInfo, Route, Session, SessionOptions};
use crate::task::OwnedTask;
use crate::ws::server::{Accept, Opened, PeerInfo, Server, ServerOptions};
use crate::ws::socket::{Closed, ConnState, Outbound};
use resume::{Kept, Resumer};

pub const LIFECYCLE_CONNECTED: &str = "ws.lifecycle.connected";
pub const LIFECYCLE_DISCONNECTED: &str = "ws.lifecycle.disconnected";
/// A recoverable session whose client did not come back within `HISTORY_TTL_SEC`.
pub const LIFECYCLE_EXPIRED: &str = "ws.lifecycle.expired";

pub struct Listener {
    pub address: Option<SocketAddr>,
    task: OwnedTask,
}

impl Listener {
    /// Binds and starts accepting clients for `component_id` on link `link_name`; `history`
    /// is the link's history when it has `RECOVERY=true`.
    pub async fn start(
        component_id: &str,
        link_name: &str,
        settings: &LinkSettings,
        wrpc: ComponentClient,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        history: Option<Arc<History>>,
    ) -> Result<Arc<Self>, String> {
        let server_settings = settings
            .server()
            .ok_or_else(|| "link is not in server mode".to_string())?;
        let lifecycle = server_settings.lifecycle_events;
        let server = Server::bind(server_options(settings, server_settings)).await?;
        let address = server.local_addr();
        let tokens = match history {
            Some(_) => Some(crate::recovery::tokens()?),
            None => None,
        };
        let resumer = history.zip(tokens).map(|(history, tokens)| {
            Arc::new(Resumer::new(
                history,
                tokens,
                server_settings.max_connections,
                component_id,
                link_name,
                lifecycle,
                Arc::clone(&registry),
            ))
        });
        let acceptor = Arc::new(Acceptor {
            component_id: component_id.to_string(),
            link_name: link_name.to_string(),
            subject: settings.inbound_subject(link_name),
            settings: settings.clone(),
            lifecycle,
            wrpc,
            registry,
            metrics,
            resumer,
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
        resume: settings.recovery.is_some(),
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
    /// `RECOVERY=true`: the sessions waiting for their clients, the history, the tokens.
    resumer: Option<Arc<Resumer>>,
}

/// Lives as long as one client connection.
enum Guard {
    /// A session that ends with its socket.
    Plain {
        session: Arc<Session>,
        inbound: Arc<Inbound>,
        state: watch::Sender<ConnState>,
    },
    /// Connection `generation` of a recoverable session.
    Kept { kept: Arc<Kept>, generation: u32 },
}

/// A new session, before its guard: what its socket task needs and its state's sender.
struct NewSession {
    session: Arc<Session>,
    inbound: Arc<Inbound>,
    outbound: mpsc::Receiver<Box<Outbound>>,
    state: watch::Sender<ConnState>,
}

/// A lifecycle message.
fn lifecycle_message(
    subject: &str,
    body: serde_json::Value,
    reply_to: Option<String>,
) -> BrokerMessage {
    BrokerMessage {
        subject: subject.to_string(),
        body: Bytes::from(body.to_string()),
        reply_to,
    }
}

impl Acceptor {
    /// The `ws.lifecycle.connected` message of a client's connection: `resumed` when it took
    /// its session back, `recovered` when it then got every message it missed.
    fn connected(
        &self,
        session: &Session,
        resumed: bool,
        recovered: Option<bool>,
    ) -> BrokerMessage {
        let mut body = serde_json::json!({
            "session": session.id.to_string(),
            "link": self.link_name,
            "remote": session.remote,
            "path": session.request.as_ref().map(|r| r.path.clone()),
            "resumed": resumed,
        });
        if let Some(recovered) = recovered {
            body["recovered"] = recovered.into();
        }
        lifecycle_message(
            LIFECYCLE_CONNECTED,
            body,
            session.tracking.then(|| session.subject().to_string()),
        )
    }

    /// The `ws.lifecycle.disconnected` message: `resumable` when the session waits for its
    /// client to come back.
    fn disconnected(&self, session: &Session, closed: &Closed, resumable: bool) -> BrokerMessage {
        let body = serde_json::json!({
            "session": session.id.to_string(),
            "link": self.link_name,
            "code": closed.code,
            "reason": closed.reason,
            "resumable": resumable,
        });
        lifecycle_message(LIFECYCLE_DISCONNECTED, body, None)
    }

    /// Queues a lifecycle message before the socket's next frame (when lifecycle events are on).
    fn announce(&self, inbound: &Inbound, message: BrokerMessage) {
        if self.lifecycle {
            if let Some(queued) = inbound.lifecycle(message, &self.link_name) {
                let _ = inbound.queue.try_send(Box::new(queued));
            }
        }
    }

    /// A new registered session for `peer`, numbered by `recovery` when the link has it.
    fn new_session(&self, peer: PeerInfo, recovery: Option<Arc<Sequencer>>) -> NewSession {
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
                recovery,
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
        NewSession {
            session,
            inbound,
            outbound,
            state,
        }
    }

    /// A session that ends with its socket (no recovery).
    fn open_plain(&self, peer: PeerInfo) -> Opened<Inbound, Guard> {
        let NewSession {
            session,
            inbound,
            outbound,
            state,
        } = self.new_session(peer, None);
        // Queued before the socket is read, so it arrives before the client's first message.
        self.announce(&inbound, self.connected(&session, false, None));
        let guard = Guard::Plain {
            session,
            inbound: Arc::clone(&inbound),
            state,
        };
        Opened::Serve(inbound, outbound, guard)
    }
}

impl Accept for Acceptor {
    type Sink = Inbound;
    type Guard = Guard;

    async fn open(&self, peer: PeerInfo, cancel: CancellationToken) -> Opened<Inbound, Guard> {
        match &self.resumer {
            None => self.open_plain(peer),
            Some(resumer) => resumer.open(self, peer, cancel).await,
        }
    }

    fn rejected(&self, status: u16) {
        self.metrics.rejected(status);
    }

    fn closed(&self, guard: Guard, closed: Closed) {
        match guard {
            Guard::Plain {
                session,
                inbound,
                state,
            } => {
                state.send_replace(ConnState::Disconnected {
                    error: closed.reason.clone(),
                });
                self.registry.remove(&session.id);
                if self.lifecycle {
                    // Delivered after the session's last messages.
                    let message = self.disconnected(&session, &closed, false);
                    if let Some(disconnected) = inbound.lifecycle(message, &self.link_name) {
                        inbound.farewell(disconnected);
                    }
                }
            }
            Guard::Kept { kept, generation } => {
                if let Some(resumer) = &self.resumer {
                    resumer.closed(self, &kept, generation, &closed);
                }
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
