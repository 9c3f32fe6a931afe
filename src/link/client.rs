//! A client connection: a registered session plus the task that owns its socket (connecting,
//! reconnecting).
//!
//! [`ClientSocket::open`] registers the session and spawns the socket task. The handle is shared
//! (`Arc`) by every link that uses the socket; when the last one lets go, `Drop` cancels the task
//! (which sends a close frame) and removes the session from the registry.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use crate::config::LinkSettings;
use crate::metrics::Metrics;
use crate::session::{Mode, Registry, Session, SessionOptions};
use crate::task::OwnedTask;
use crate::wrpc::ComponentClient;
use crate::ws::client::{self, ClientOptions};
use crate::ws::socket::ConnState;

pub struct ClientSocket {
    pub session: Arc<Session>,
    registry: Arc<Registry>,
    task: OwnedTask,
}

impl ClientSocket {
    /// Registers a session for `component_id` and starts connecting it as the settings of
    /// link `link_name` say.
    pub fn open(
        component_id: &str,
        link_name: &str,
        settings: &LinkSettings,
        wrpc: ComponentClient,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let opened = super::open(super::Opening {
            options: SessionOptions {
                publish_wait: Some(settings.publish_wait),
                max_waiting: settings.send_queue_len,
                ..SessionOptions::from_link(
                    Mode::Client,
                    component_id,
                    link_name,
                    settings.endpoint.redacted_uri(),
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
        let options = ClientOptions {
            endpoint: settings.endpoint.clone(),
            connect_timeout: settings.connect_timeout,
            reconnect_min: settings.reconnect_min,
            reconnect_max: settings.reconnect_max,
            max_message_bytes: settings.max_message_bytes,
            keepalive: settings.keepalive,
        };
        // Everything the socket task logs names its session, component and link.
        let span = tracing::info_span!("session", id = %session.id, component = component_id,
            link = link_name, mode = "client");
        let task = OwnedTask::spawn(|cancel| {
            // Delivery ends by itself once the socket task (which owns the sink) has ended.
            client::run(
                options,
                opened.inbound,
                opened.outbound,
                opened.state,
                cancel,
            )
            .instrument(span)
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

impl Drop for ClientSocket {
    fn drop(&mut self) {
        // Dropping `task` cancels the socket task, which sends a close frame.
        self.registry.remove(&self.session.id);
    }
}
