//! Inbound frames to `handle-message`.
//!
//! Each session has an [`Inbound`] sink, called by its socket's reader, and one delivery task.
//! The sink decodes the frame (JSON envelopes), hands replies to the requests waiting for them
//! (at once, so a component blocked in `request` on this session still gets its reply), and
//! queues everything else in a small bounded queue. The delivery task calls `handle-message`
//! for the queued messages in arrival order: one at a time by default, or up to the link's
//! `MAX_IN_FLIGHT` at once, each started (published) after the one before it; when the queue is
//! full the reader stops reading the socket.
//! Every call is bounded by the link's handler timeout, which covers the whole wRPC call (a reply
//! lost by the transport would otherwise hang the session forever); failures and timeouts are
//! logged with the session and subject, counted, and do not stop the messages that follow.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
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
    pub queue: mpsc::Sender<Box<Queued>>,
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
            let _ = self.queue.send(Box::new(Queued::Frame(message))).await;
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

/// What waits in a session's delivery queue.
pub enum Queued {
    /// A frame from the peer.
    Frame(BrokerMessage),
    /// A lifecycle message (`ws.lifecycle.*`): delivered alone, after every earlier message's
    /// call has finished and before any later one starts, whatever `MAX_IN_FLIGHT` says.
    Lifecycle(BrokerMessage),
}

/// How a session's messages are handed to `handle-message`.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryOptions {
    /// Bound on one whole call.
    pub timeout: Duration,
    /// Calls of one session running at once (`MAX_IN_FLIGHT`); 1 is strict order.
    pub max_in_flight: usize,
}

impl From<&crate::config::LinkSettings> for DeliveryOptions {
    fn from(settings: &crate::config::LinkSettings) -> Self {
        Self {
            timeout: settings.handler_timeout,
            max_in_flight: settings.max_in_flight,
        }
    }
}

/// Starts delivery for `session`: a small queue, and a task that calls `handle-message` for what
/// is queued. The task ends by itself once every sender of the queue (the returned sink, and
/// any clone of its `queue`) is gone, after the calls it started have finished.
pub fn start(
    session: Arc<Session>,
    wrpc: ComponentClient,
    options: DeliveryOptions,
    stats: Arc<Stats>,
) -> Arc<Inbound> {
    let (queue, queued) = mpsc::channel(DELIVERY_QUEUE);
    let delivery = Delivery {
        session: Arc::clone(&session),
        wrpc,
        timeout: options.timeout,
        stats: Arc::clone(&stats),
    };
    tokio::spawn(delivery.run(options.max_in_flight.max(1), queued));
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

/// One session's delivery task.
struct Delivery {
    session: Arc<Session>,
    wrpc: ComponentClient,
    timeout: Duration,
    stats: Arc<Stats>,
}

impl Delivery {
    /// Calls `handle-message` for each queued message, in order: each call starts (is
    /// published) only after the one before it has started, and at most `max_in_flight` run
    /// at once. With 1, each call also finishes before the next starts.
    async fn run(self, max_in_flight: usize, mut queue: mpsc::Receiver<Box<Queued>>) {
        if max_in_flight == 1 {
            while let Some(queued) = queue.recv().await {
                let (Queued::Frame(message) | Queued::Lifecycle(message)) = *queued;
                self.handle(message, None).await;
            }
            return;
        }
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() >= max_in_flight {
                running.next().await;
            }
            let queued = tokio::select! {
                biased;
                Some(()) = running.next(), if !running.is_empty() => continue,
                queued = queue.recv() => queued,
            };
            let Some(queued) = queued else { break };
            let message = match *queued {
                Queued::Lifecycle(message) => {
                    while running.next().await.is_some() {}
                    self.handle(message, None).await;
                    continue;
                }
                Queued::Frame(message) => message,
            };
            let (started_tx, mut started) = oneshot::channel();
            let mut call = Box::pin(self.handle(message, Some(started_tx)));
            // The next message waits until this call has been published (or has finished);
            // meanwhile the calls already running go on.
            let finished = loop {
                tokio::select! {
                    biased;
                    _ = &mut started => break false,
                    () = &mut call => break true,
                    Some(()) = running.next(), if !running.is_empty() => {}
                }
            };
            if !finished {
                running.push(call);
            }
        }
        while running.next().await.is_some() {}
    }

    /// One `handle-message` call, bounded by the handler timeout; `started` is told once the
    /// call has been handed to NATS.
    async fn handle(&self, message: BrokerMessage, started: Option<oneshot::Sender<()>>) {
        let Ok(_slot) = HANDLER_SLOTS.acquire().await else {
            return;
        };
        let session = &self.session;
        let span = debug_span!("handle_message", session = %session.id,
            component = %session.component_id, subject = %message.subject);
        let headers = trace_headers(&span);
        let started_at = Instant::now();
        let client = Starting {
            client: &self.wrpc,
            started: Mutex::new(started),
        };
        let call = handler::handle_message(&client, headers, &message);
        // Boxed: the call's state is large, and an idle session should not carry it.
        let result = tokio::time::timeout(self.timeout, Box::pin(call.instrument(span))).await;
        let outcome = match &result {
            Ok(Ok(Ok(()))) => "ok",
            Ok(_) => "error",
            Err(_) => "timeout",
        };
        self.stats.handled(started_at.elapsed(), outcome);
        let timeout = self.timeout;
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

/// Calls through `client`, and says so on `started` (if any) once the call has been published:
/// the delivery task starts a session's calls one after another in arrival order.
struct Starting<'a> {
    client: &'a ComponentClient,
    started: Mutex<Option<oneshot::Sender<()>>>,
}

impl wrpc_transport::Invoke for Starting<'_> {
    type Context = <ComponentClient as wrpc_transport::Invoke>::Context;
    type Outgoing = <ComponentClient as wrpc_transport::Invoke>::Outgoing;
    type Incoming = <ComponentClient as wrpc_transport::Invoke>::Incoming;

    async fn invoke<P: AsRef<[Option<usize>]> + Send + Sync>(
        &self,
        cx: Self::Context,
        instance: &str,
        func: &str,
        params: Bytes,
        paths: impl AsRef<[P]> + Send,
    ) -> anyhow::Result<(Self::Outgoing, Self::Incoming)> {
        let call = self.client.invoke(cx, instance, func, params, paths).await;
        let started = self.started.lock().ok().and_then(|mut s| s.take());
        if let Some(started) = started {
            let _ = started.send(());
        }
        call
    }
}
