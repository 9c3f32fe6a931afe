//! Inbound frames to `handle-message`.
//!
//! Each session has an [`Inbound`] sink, called by its socket's reader, and one [`deliver`]
//! task. The sink decodes the frame (JSON envelopes), hands replies to the requests waiting for
//! them (at once, so a component blocked in `request` on this session still gets its reply), and
//! queues everything else in a small bounded queue. The deliver task calls `handle-message` for
//! one message at a time, in order; when the queue is full the reader stops reading the socket.
//! Every call is bounded by the link's handler timeout, which covers the whole wRPC call (a reply
//! lost by the transport would otherwise hang the session forever); failures and timeouts are
//! logged with the session and subject, counted, and do not stop the messages that follow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, debug_span, warn, Instrument as _};

use tokio_tungstenite::tungstenite::Message;

use crate::bindings::wasmcloud::messaging::handler;
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::config::Format;
use crate::envelope;
use crate::sessions::Session;
use crate::stats::Stats;
use crate::wrpc::ComponentClient;
use crate::ws::socket::FrameSink;

/// Messages that may wait for `handle-message` on one session before the reader pauses.
pub const DELIVERY_QUEUE: usize = 16;

/// `handle-message` calls in flight across all sessions of the provider. When all are taken,
/// delivery waits, session queues fill, and readers stop reading their sockets.
pub const MAX_CONCURRENT_HANDLERS: usize = 256;
static HANDLER_SLOTS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_CONCURRENT_HANDLERS);

/// The reader-side sink of one session.
pub struct Inbound {
    pub session: Arc<Session>,
    /// Boxed, so the queue's up-front room for 32 items is 32 pointers (see `Outbound`).
    pub queue: mpsc::Sender<Box<BrokerMessage>>,
    pub stats: Arc<Stats>,
}

impl Inbound {
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
                        self.stats.undelivered("invalid_envelope");
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
            self.stats.undelivered("no_handler");
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

    /// The `mode` attribute of this session's metrics.
    fn mode(&self) -> &'static str {
        if self.session.request.is_some() {
            crate::stats::SERVER
        } else {
            crate::stats::CLIENT
        }
    }
}

impl FrameSink for Inbound {
    async fn frame(&self, payload: Bytes, _text: bool) {
        self.stats.frame_in(self.mode(), payload.len());
        if let Some(message) = self.message(payload) {
            // Waiting here is the backpressure: the socket is not read while the queue is full.
            let _ = self.queue.send(Box::new(message)).await;
        }
    }

    async fn kicked(&self) {
        self.session.kicked().await;
    }

    fn connected(&self) {
        self.stats.session_opened(self.mode());
    }

    fn disconnected(&self) {
        self.stats.session_closed(self.mode());
    }

    fn written(&self, frames: u64, bytes: u64) {
        self.stats.frames_out(self.mode(), frames, bytes);
    }

    fn reconnected(&self) {
        self.stats.reconnected();
    }
}

/// Starts delivery for `session`: a small queue, and a task that calls `handle-message` for what
/// is queued. The task ends by itself once every sender of the queue (the returned sink, and
/// any clone of its `queue`) is gone.
pub fn start(
    session: Arc<Session>,
    wrpc: ComponentClient,
    timeout: Duration,
    stats: Arc<Stats>,
) -> Arc<Inbound> {
    let (queue, queued) = mpsc::channel(DELIVERY_QUEUE);
    tokio::spawn(deliver(
        Arc::clone(&session),
        wrpc,
        timeout,
        Arc::clone(&stats),
        queued,
    ));
    Arc::new(Inbound {
        session,
        queue,
        stats,
    })
}

/// The trace context of `span` as invocation headers, so the component's spans continue this
/// trace; `None` when there is no trace to continue (tracing off).
fn trace_headers(span: &tracing::Span) -> Option<async_nats::HeaderMap> {
    use wasmcloud_provider_sdk::wasmcloud_tracing::context::TraceContextInjector;
    if span.is_disabled() {
        return None;
    }
    let mut injector = TraceContextInjector::new(Default::default());
    injector.inject_context_from_span(span);
    let context: &std::collections::HashMap<String, String> = injector.as_ref();
    if context.is_empty() {
        return None;
    }
    let mut headers = async_nats::HeaderMap::new();
    for (key, value) in context {
        headers.insert(key.as_str(), value.as_str());
    }
    Some(headers)
}

/// Calls `handle-message` for each queued message of `session`, one at a time, in order.
async fn deliver(
    session: Arc<Session>,
    wrpc: ComponentClient,
    timeout: Duration,
    stats: Arc<Stats>,
    mut queue: mpsc::Receiver<Box<BrokerMessage>>,
) {
    while let Some(message) = queue.recv().await {
        let Ok(_slot) = HANDLER_SLOTS.acquire().await else {
            return;
        };
        let session = &session;
        let span = debug_span!("handle_message", session = %session.id,
            component = %session.component_id, subject = %message.subject);
        let headers = trace_headers(&span);
        // Boxed: the call's state is large, and an idle session should not carry it.
        let call = Box::pin(handler::handle_message(&wrpc, headers, &message).instrument(span));
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, call).await;
        let outcome = match &result {
            Ok(Ok(Ok(()))) => "ok",
            Ok(_) => "error",
            Err(_) => "timeout",
        };
        stats.handled(started.elapsed(), outcome);
        match result {
            Ok(Ok(Ok(()))) => {
                debug!(session = %session.id, subject = %message.subject, "delivered");
            }
            Ok(Ok(Err(error))) => {
                warn!(session = %session.id, subject = %message.subject, %error,
                    component = %session.component_id, "handle-message returned an error");
            }
            Ok(Err(error)) => {
                warn!(session = %session.id, subject = %message.subject, error = %format!("{error:#}"),
                    component = %session.component_id, "handle-message call failed");
            }
            Err(_) => {
                warn!(session = %session.id, subject = %message.subject,
                    component = %session.component_id, ?timeout,
                    "handle-message did not finish in time; counted as hung");
            }
        }
    }
}
