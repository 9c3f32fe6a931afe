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

use tokio_tungstenite::tungstenite::Message;

use crate::bindings::wasmcloud::messaging::handler;
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::config::Format;
use crate::envelope;
use crate::sessions::Session;
use crate::stats::Stats;
use crate::ws::client::FrameSink;

pub struct Dispatcher {
    pub session: Arc<Session>,
    pub wrpc: WrpcClient,
    pub timeout: Duration,
    pub stats: Arc<Stats>,
}

impl Dispatcher {
    /// Turns a frame into the message for `handle-message`, or `None` when it is not for the
    /// component (a reply to a pending request, an invalid envelope, no handler link).
    fn message(&self, payload: Bytes) -> Option<BrokerMessage> {
        let session = &self.session;
        let (subject, body, reply_to) = match session.format {
            Format::Raw => (None, payload, session.tracking.then(|| session.subject())),
            Format::Json => {
                let envelope = match envelope::decode(&payload) {
                    Ok(envelope) => envelope,
                    Err(error) => {
                        Stats::bump(&self.stats.invalid_envelopes);
                        warn!(session = %session.id, component = %session.component_id, %error,
                            "invalid envelope; error frame sent to the peer");
                        let _ = session.send_nowait(Message::text(envelope::error_frame(&error)));
                        return None;
                    }
                };
                let envelope = session.resolve_reply(envelope)?;
                // A peer's reply_to is scoped to its session, so a publish to it can only
                // reach this peer; without tracking it is passed on as the peer wrote it.
                let reply_to = if session.tracking {
                    Some(match &envelope.reply_to {
                        Some(peer) => format!("{}.{peer}", session.subject()),
                        None => session.subject(),
                    })
                } else {
                    envelope.reply_to
                };
                (Some(envelope.subject), envelope.body, reply_to)
            }
        };
        let Some(route) = session.route() else {
            Stats::bump(&self.stats.undeliverable);
            warn!(session = %session.id, component = %session.component_id,
                "frame arrived on a connection with no handler link; not delivered");
            return None;
        };
        Some(BrokerMessage {
            subject: subject.unwrap_or(route.subject),
            body,
            reply_to,
        })
    }
}

impl FrameSink for Dispatcher {
    async fn frame(&self, payload: Bytes, _text: bool) {
        let session = &self.session;
        let Some(message) = self.message(payload) else {
            return;
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
