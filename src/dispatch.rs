//! Inbound frames to `handle-message`.
//!
//! A [`Dispatcher`] belongs to one session. The socket task hands it frames one at a time, so a
//! session's messages reach the component in order and the next frame is not read until the
//! previous call ended. Every call is bounded by the link's handler timeout, which covers the
//! whole wRPC call (a reply lost by the transport would otherwise hang the session forever);
//! failures and timeouts are logged with the session and subject, counted, and do not stop the
//! frames that follow.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};
use wasmcloud_provider_sdk::provider::WrpcClient;

use crate::bindings::wasmcloud::messaging::handler;
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::sessions::Session;
use crate::stats::Stats;
use crate::ws::client::FrameSink;

pub struct Dispatcher {
    pub session: Arc<Session>,
    pub wrpc: WrpcClient,
    pub timeout: Duration,
    pub stats: Arc<Stats>,
}

impl FrameSink for Dispatcher {
    async fn frame(&self, payload: Bytes, _text: bool) {
        let session = &self.session;
        let Some(route) = session.route() else {
            Stats::bump(&self.stats.undeliverable);
            warn!(session = %session.id, component = %session.component_id,
                "frame arrived on a connection with no handler link; not delivered");
            return;
        };
        let message = BrokerMessage {
            subject: route.subject,
            body: payload,
            reply_to: session.tracking.then(|| session.subject()),
        };
        let call = handler::handle_message(&self.wrpc, None, &message);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(Ok(()))) => {
                Stats::bump(&self.stats.delivered);
                debug!(session = %session.id, subject = %message.subject, "delivered");
            }
            Ok(Ok(Err(error))) => {
                Stats::bump(&self.stats.handler_errors);
                warn!(session = %session.id, subject = %message.subject, %error,
                    component = %session.component_id, "handle-message returned an error");
            }
            Ok(Err(error)) => {
                Stats::bump(&self.stats.handler_errors);
                warn!(session = %session.id, subject = %message.subject, error = %format!("{error:#}"),
                    component = %session.component_id, "handle-message call failed");
            }
            Err(_) => {
                Stats::bump(&self.stats.handler_timeouts);
                warn!(session = %session.id, subject = %message.subject,
                    component = %session.component_id, timeout = ?self.timeout,
                    "handle-message did not finish in time; counted as hung");
            }
        }
    }
}
