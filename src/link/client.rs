//! A client connection: a registered session plus the task that owns its socket (connecting,
//! reconnecting).
//!
//! [`ClientSocket::open`] registers the session and spawns the socket task. The handle is shared
//! (`Arc`) by every link that uses the socket; when the last one lets go, `Drop` cancels the task
//! (which sends a close frame) and removes the session from the registry.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument as _;

use crate::cluster::lease::Holding;
use crate::cluster::Cluster;

use crate::config::{ClientSettings, LinkSettings};
use crate::metrics::Metrics;
use crate::session::{Mode, Registry, Session, SessionOptions};
use crate::task::OwnedTask;
use crate::wrpc::ComponentClient;
use crate::ws::client::{self, ClientOptions};
use crate::ws::socket::ConnState;

pub struct ClientSocket {
    pub session: Arc<Session>,
    registry: Arc<Registry>,
    /// The lease of a connection several replicas share; dropped first (a deleted link deletes
    /// it).
    holding: Option<Holding>,
    /// Alone: the socket task's permission to connect, always given.
    _allowed: Option<watch::Sender<bool>>,
    task: OwnedTask,
    /// `RECOVERY=true`: writes what was kept while the connection was down, at each reconnect.
    _flush: Option<OwnedTask>,
}

/// A connection that several replicas share: the lattice's leases, the connection's lease key
/// and the session ID the replicas agreed on.
pub struct Shared {
    pub cluster: Cluster,
    pub key: String,
    pub id: uuid::Uuid,
}

impl ClientSocket {
    /// Registers a session for `component_id` and starts connecting it as the settings of
    /// link `link_name` say (`client` is their client part).
    pub fn open(
        component_id: &str,
        link_name: &str,
        settings: &LinkSettings,
        client: &ClientSettings,
        wrpc: ComponentClient,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shared: Option<Shared>,
        history: Option<Arc<crate::recovery::History>>,
    ) -> Arc<Self> {
        let keeper = history.map(|h| Arc::new(crate::recovery::Keeper::new(h)));
        let opened = super::open(super::Opening {
            id: shared.as_ref().map(|s| s.id),
            register: shared.is_none(),
            options: SessionOptions {
                publish_wait: Some(client.publish_wait),
                max_waiting: settings.send_queue_len,
                keeper,
                ..SessionOptions::from_link(
                    Mode::Client,
                    component_id,
                    link_name,
                    client.endpoint.redacted_uri(),
                    settings,
                )
            },
            state: ConnState::Connecting,
            queue_len: settings.send_queue_len,
            route: None,
            delivery: settings.into(),
            wrpc,
            registry: &registry,
            metrics,
        });
        let session = Arc::clone(&opened.session);
        let flush = session
            .outbox
            .keeps()
            .then(|| flush_on_connect(Arc::clone(&session)));
        let options = client_options(settings, client);
        // Everything the socket task logs names its session, component and link.
        let span = tracing::info_span!("session", id = %session.id, component = component_id,
            link = link_name, mode = "client");
        let (allowed, allowed_rx) = watch::channel(shared.is_none());
        let task = OwnedTask::spawn(|cancel| {
            // Delivery ends by itself once the socket task (which owns the sink) has ended.
            client::run(
                options,
                opened.inbound,
                opened.outbound,
                opened.state,
                allowed_rx,
                cancel,
            )
            .instrument(span)
        });
        let (holding, allowed) = match shared {
            Some(shared) => (
                Some(shared.cluster.hold_lease(
                    shared.key,
                    client.endpoint.redacted_uri(),
                    Arc::clone(&session),
                    Arc::clone(&registry),
                    allowed,
                )),
                None,
            ),
            None => (None, Some(allowed)),
        };
        Arc::new(Self {
            session,
            registry,
            holding,
            _allowed: allowed,
            task,
            _flush: flush,
        })
    }

    /// Closes the socket (with a close frame) and waits up to `grace` for the task to end; a
    /// held lease is handed back for another replica to take at once.
    pub async fn close(&self, grace: Duration) {
        match &self.holding {
            Some(holding) => {
                futures::future::join(holding.hand_back(grace), self.task.close(grace)).await;
            }
            None => self.task.close(grace).await,
        }
    }
}

/// Each time `session`'s connection comes up, writes what was kept while it was down.
fn flush_on_connect(session: Arc<Session>) -> OwnedTask {
    OwnedTask::spawn(move |cancel| async move {
        let mut state = session.outbox.watch_state();
        let up = |s: &ConnState| matches!(s, ConnState::Connected { .. });
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = state.wait_for(up) => if changed.is_err() { return },
            }
            // Until it is done (or the connection goes): a history that did not answer is
            // asked again, so kept messages never wait behind a healthy connection.
            let mut retry = std::time::Duration::from_millis(200);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    done = session.outbox.flush_kept() => if done { break },
                }
                if !up(&state.borrow()) {
                    break;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(std::time::Duration::from_secs(5));
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = state.wait_for(|s| !up(s)) => if changed.is_err() { return },
            }
        }
    })
}

/// The transport's options for a client link's socket.
fn client_options(settings: &LinkSettings, client: &ClientSettings) -> ClientOptions {
    let endpoint = &client.endpoint;
    ClientOptions {
        uri: endpoint.uri.clone(),
        shown_uri: endpoint.redacted_uri(),
        token: super::token(endpoint.auth_token.as_ref()),
        headers: endpoint.headers.clone(),
        connect_timeout: client.connect_timeout,
        reconnect_min: client.reconnect_min,
        reconnect_max: client.reconnect_max,
        max_message_bytes: settings.max_message_bytes,
        keepalive: settings.keepalive.into(),
    }
}

impl Drop for ClientSocket {
    fn drop(&mut self) {
        // Dropping `task` cancels the socket task, which sends a close frame.
        self.registry.remove_same(&self.session);
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn the_socket_takes_the_client_settings_without_showing_credentials() {
        let settings = super::super::tests::settings(
            &[
                ("URI", "wss://u:pw0rd@example.com/x?k=qu3ry"),
                ("HEADER_X-One", "1"),
                ("CONNECT_TIMEOUT_SEC", "3"),
            ],
            "t0k",
        );
        let client = settings.client().expect("client mode");
        let options = client_options(&settings, client);
        assert_eq!(options.uri, client.endpoint.uri);
        assert_eq!(
            options.shown_uri,
            "wss://<redacted>@example.com/x?<redacted>"
        );
        assert_eq!(options.token.as_ref().map(|t| t.expose()), Some("t0k"));
        assert_eq!(options.headers, client.endpoint.headers);
        assert_eq!(options.connect_timeout, Duration::from_secs(3));
        assert_eq!(
            options.keepalive.pong_timeout,
            settings.keepalive.pong_timeout
        );
        let shown = format!("{options:?}");
        for secret in ["pw0rd", "qu3ry", "t0k"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
