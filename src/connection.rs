//! A live client connection: a registered session plus the task that owns its socket.
//!
//! [`Connection::open`] registers the session and spawns the socket task. The handle is shared
//! (`Arc`) by every link that uses the socket; when the last one lets go, `Drop` cancels the task
//! (which sends a close frame) and removes the session from the registry.

use std::sync::Arc;
use std::time::Duration;

use crate::wrpc::ComponentClient;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::config::{ClientSettings, LinkSettings};
use crate::dispatch;
use crate::sessions::{Registry, Session, SessionOptions};
use crate::stats::Stats;
use crate::task::OwnedTask;
use crate::ws::client::{self, ClientOptions};
use crate::ws::socket::ConnState;

pub struct Connection {
    pub session: Arc<Session>,
    registry: Arc<Registry>,
    task: OwnedTask,
}

impl Connection {
    /// Registers a session for `component_id` and starts connecting it as the settings of
    /// link `link_name` say (`client` is their client part).
    pub fn open(
        component_id: &str,
        link_name: &str,
        settings: &LinkSettings,
        client: &ClientSettings,
        wrpc: ComponentClient,
        registry: Arc<Registry>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        let (state_tx, state_rx) = watch::channel(ConnState::Connecting);
        let (out_tx, out_rx) = mpsc::channel(settings.send_queue_len);
        let session = Arc::new(Session::new(
            SessionOptions {
                reconnect_wait: Some(client.publish_wait),
                max_waiting: settings.send_queue_len,
                ..SessionOptions::from_link(
                    component_id,
                    link_name,
                    client.endpoint.redacted_uri(),
                    settings,
                )
            },
            state_rx,
            out_tx,
        ));
        registry.insert(Arc::clone(&session));
        let options = ClientOptions {
            endpoint: client.endpoint.clone(),
            connect_timeout: client.connect_timeout,
            reconnect_min: client.reconnect_min,
            reconnect_max: client.reconnect_max,
            max_message_bytes: settings.max_message_bytes,
            keepalive: settings.keepalive,
        };
        // Delivery ends by itself once the socket task (which owns the sink) has ended.
        let inbound = dispatch::start(Arc::clone(&session), wrpc, settings.into(), stats);
        // Everything the socket task logs names its session, component and link.
        let span = tracing::info_span!("session", id = %session.id, component = component_id,
            link = link_name, mode = "client");
        let task = OwnedTask::spawn(|cancel| {
            client::run(options, inbound, out_rx, state_tx, cancel).instrument(span)
        });
        Arc::new(Self {
            session,
            registry,
            task,
        })
    }

    /// Closes the socket (with a close frame) and waits up to `grace` for the task to end.
    pub async fn close(&self, grace: Duration) {
        self.task.close(grace).await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Dropping `task` cancels the socket task, which sends a close frame.
        self.registry.remove(&self.session.id);
    }
}
