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
//!
//! Limits that keep one peer or component from hurting the others:
//! - a socket with no handler link yet is not read further (TCP holds the peer's frames) until
//!   one attaches, up to the link's `HANDLER_WAIT_MS`; frames after that are counted as
//!   undeliverable (`no_handler`), never dropped unseen;
//! - queued frames hold a share of the provider-wide budget of inbound bytes
//!   (`MAX_INBOUND_BYTES`) until their call ends or they are dropped, also after their socket
//!   closed; a reader waits for room, so memory is bounded by the budget, not by the number of
//!   peers;
//! - each component has its own [`MAX_CONCURRENT_HANDLERS`] call slots, so a slow or attacked
//!   component cannot take the others' slots;
//! - frames queued for a handler link that has been deleted are dropped and counted
//!   (`link_deleted`), not delivered;
//! - a peer's envelope may not use the provider's own subjects (`ws.lifecycle.*`,
//!   `ws.session.*`); invalid envelopes are answered with an error frame, logged at most once a
//!   second per session (with the count), and each one gives up its turn on the runtime.

mod ack;
mod budget;
mod inbound;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, debug_span, warn, Instrument as _};

use crate::bindings::wasmcloud::messaging::handler;
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::envelope::NotHandled;
use crate::metrics::{Metrics, Outcome, Reason};
use crate::session::Session;
use crate::wrpc::ComponentClient;

use budget::handler_slots;
pub use budget::{set_inbound_budget, Reserved, MAX_CONCURRENT_HANDLERS};
pub use inbound::{Inbound, LIFECYCLE_COST};

/// Messages that may wait for `handle-message` on one session before the reader pauses.
pub const DELIVERY_QUEUE: usize = 16;

/// What waits in a session's delivery queue: a message for the handler link `link`.
pub struct Queued {
    pub kind: Kind,
    pub message: BrokerMessage,
    /// The handler link it is for; if that link is gone by delivery time, it is dropped.
    pub link: String,
    /// Its share of the inbound budget, given back when it is delivered or dropped.
    pub(super) _budget: Option<Reserved>,
    /// The answer owed to the peer, if it asked for an acknowledgment.
    pub(super) ack: Option<ack::AckTicket>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A frame from the peer.
    Frame,
    /// A lifecycle message: delivered alone, after every earlier message's call has finished
    /// and before any later one starts, whatever `MAX_IN_FLIGHT` says.
    Lifecycle,
}

/// How a session's messages are handed to `handle-message`.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryOptions {
    /// Bound on one whole call.
    pub timeout: Duration,
    /// Calls of one session running at once (`MAX_IN_FLIGHT`); 1 is strict order.
    pub max_in_flight: usize,
    /// How long an unread socket waits for a handler link (`HANDLER_WAIT_MS`).
    pub handler_wait: Duration,
}

impl From<&crate::config::LinkSettings> for DeliveryOptions {
    fn from(settings: &crate::config::LinkSettings) -> Self {
        Self {
            timeout: settings.handler_timeout,
            max_in_flight: settings.max_in_flight,
            handler_wait: settings.handler_wait,
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
    metrics: Arc<Metrics>,
) -> Arc<Inbound> {
    let (queue, queued) = mpsc::channel(DELIVERY_QUEUE);
    let (farewell, last) = oneshot::channel();
    let delivery = Delivery {
        slots: handler_slots(&session.component_id),
        session: Arc::clone(&session),
        wrpc,
        timeout: options.timeout,
        metrics: Arc::clone(&metrics),
    };
    tokio::spawn(delivery.run(options.max_in_flight.max(1), queued, last));
    Arc::new(Inbound::new(
        session,
        queue,
        farewell,
        metrics,
        options.handler_wait,
    ))
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
    /// The component's call slots.
    slots: Arc<Semaphore>,
    session: Arc<Session>,
    wrpc: ComponentClient,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Delivery {
    /// Calls `handle-message` for each queued message, in order: each call starts (is
    /// published) only after the one before it has started, and at most `max_in_flight` run
    /// at once. With 1, each call also finishes before the next starts.
    /// Delivers what is queued until the queue's last sender is gone, then the session's
    /// farewell (its `ws.lifecycle.disconnected`), if it left one: after everything before it.
    async fn run(
        self,
        max_in_flight: usize,
        queue: mpsc::Receiver<Box<Queued>>,
        last: oneshot::Receiver<Box<Queued>>,
    ) {
        if max_in_flight == 1 {
            self.one_at_a_time(queue).await;
        } else {
            self.overlapping(max_in_flight, queue).await;
        }
        if let Ok(farewell) = last.await {
            self.deliver(farewell, None).await;
        }
    }

    async fn one_at_a_time(&self, mut queue: mpsc::Receiver<Box<Queued>>) {
        while let Some(queued) = queue.recv().await {
            self.deliver(queued, None).await;
        }
    }

    /// Up to `max_in_flight` calls at once, each started after the one before it.
    async fn overlapping(&self, max_in_flight: usize, mut queue: mpsc::Receiver<Box<Queued>>) {
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
            if queued.kind == Kind::Lifecycle {
                while running.next().await.is_some() {}
                self.deliver(queued, None).await;
                continue;
            }
            let (started_tx, mut started) = oneshot::channel();
            let this = &self;
            let mut call = Box::pin(async move {
                // The queued item (and its share of the budget) lives until the call ends.
                this.deliver(queued, Some(started_tx)).await;
            });
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

    /// Delivers one queued message if its handler link still exists (else drops and counts it),
    /// and answers its acknowledgment, if the peer asked for one.
    async fn deliver(&self, mut queued: Box<Queued>, started: Option<oneshot::Sender<()>>) {
        let outcome = if self.session.has_route(&queued.link) {
            self.handle(&queued.message, started).await
        } else {
            self.metrics.undelivered(Reason::LinkDeleted);
            debug!(session = %self.session.id, link = %queued.link, subject = %queued.message.subject,
                "queued message dropped: its handler link was deleted");
            Err((
                NotHandled::LinkDeleted,
                "the handler link was deleted before delivery".to_string(),
            ))
        };
        if let Some(ticket) = queued.ack.take() {
            ticket.settle(outcome);
        }
    }

    /// One `handle-message` call, bounded by the handler timeout; `started` is told once the
    /// call has been handed to NATS.
    async fn handle(
        &self,
        message: &BrokerMessage,
        started: Option<oneshot::Sender<()>>,
    ) -> Result<(), (NotHandled, String)> {
        let Ok(_slot) = self.slots.acquire().await else {
            return Err((NotHandled::Refused, "the provider is stopping".to_string()));
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
        let call = handler::handle_message(&client, headers, message);
        // Boxed: the call's state is large, and an idle session should not carry it.
        let result = tokio::time::timeout(self.timeout, Box::pin(call.instrument(span))).await;
        let outcome = match &result {
            Ok(Ok(Ok(()))) => Outcome::Ok,
            Ok(_) => Outcome::Error,
            Err(_) => Outcome::Timeout,
        };
        self.metrics.handled(started_at.elapsed(), outcome);
        let timeout = self.timeout;
        match result {
            Ok(Ok(Ok(()))) => {
                debug!(session = %session.id, subject = %message.subject, "delivered");
                Ok(())
            }
            Ok(Ok(Err(error))) => {
                warn!(session = %session.id, subject = %message.subject, %error,
                    component = %session.component_id, "handle-message returned an error");
                Err((NotHandled::HandlerError, error))
            }
            Ok(Err(error)) => {
                warn!(session = %session.id, subject = %message.subject, error = %format!("{error:#}"),
                    component = %session.component_id, "handle-message call failed");
                Err((
                    NotHandled::HandlerError,
                    "the call to the component failed (it trapped or could not be reached)"
                        .to_string(),
                ))
            }
            Err(_) => {
                warn!(session = %session.id, subject = %message.subject,
                    component = %session.component_id, ?timeout,
                    "handle-message did not finish in time; counted as hung");
                Err((
                    NotHandled::Timeout,
                    format!(
                        "handle-message did not finish within {} ms",
                        timeout.as_millis()
                    ),
                ))
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
