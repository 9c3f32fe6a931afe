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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
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

/// `handle-message` calls in flight across all sessions of one component. When all are taken,
/// that component's delivery waits, its session queues fill, and its readers stop reading;
/// other components have slots of their own.
pub const MAX_CONCURRENT_HANDLERS: usize = 256;
static HANDLER_SLOTS: LazyLock<dashmap::DashMap<String, Arc<Semaphore>>> =
    LazyLock::new(dashmap::DashMap::new);

/// The call slots of `component`.
fn handler_slots(component: &str) -> Arc<Semaphore> {
    if let Some(slots) = HANDLER_SLOTS.get(component) {
        return Arc::clone(&slots);
    }
    Arc::clone(
        &HANDLER_SLOTS
            .entry(component.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONCURRENT_HANDLERS))),
    )
}

/// Subjects of the provider's own messages, which a peer's envelope may not use.
pub const RESERVED_SUBJECT_PREFIXES: &[&str] = &["ws.lifecycle.", "ws.session."];

fn is_reserved(subject: &str) -> bool {
    RESERVED_SUBJECT_PREFIXES
        .iter()
        .any(|p| subject.starts_with(p) || subject == p.trim_end_matches('.'))
}

/// The budget of inbound bytes is counted in units of this many bytes.
const BUDGET_UNIT: u64 = 1024;

/// The provider-wide budget of inbound bytes waiting for components.
struct Budget {
    room: Arc<Semaphore>,
    /// All of it, in units: a frame larger than the budget takes all of it.
    total: u32,
}

impl Budget {
    /// A component's share: half of the budget.
    fn share_units(&self) -> u32 {
        (self.total / 2).max(1)
    }

    /// The units a frame of `len` bytes takes: at least one, at most a whole share.
    fn units_for(&self, len: usize) -> u32 {
        let units = (len as u64).div_ceil(BUDGET_UNIT).max(1);
        u32::try_from(units)
            .unwrap_or(u32::MAX)
            .min(self.share_units())
    }
}

static INBOUND_BUDGET: OnceLock<Budget> = OnceLock::new();

fn budget_of(bytes: u64) -> Budget {
    let units = (bytes / BUDGET_UNIT).clamp(1, u64::from(u32::MAX));
    let total = u32::try_from(units).unwrap_or(u32::MAX);
    Budget {
        room: Arc::new(Semaphore::new(total as usize)),
        total,
    }
}

/// Sets the provider-wide budget of inbound bytes waiting for components (`MAX_INBOUND_BYTES`);
/// only the first call counts (the provider's init). Without a call, the default applies.
pub fn set_inbound_budget(bytes: u64) {
    let _ = INBOUND_BUDGET.set(budget_of(bytes));
}

fn inbound_budget() -> &'static Budget {
    INBOUND_BUDGET.get_or_init(|| budget_of(crate::config::DEFAULT_MAX_INBOUND_BYTES))
}

/// One component's share of the inbound budget: at most half of it, so one slow or attacked
/// component cannot stop every other component's sockets.
static COMPONENT_SHARES: LazyLock<dashmap::DashMap<String, Arc<Semaphore>>> =
    LazyLock::new(dashmap::DashMap::new);

fn component_share(component: &str) -> Arc<Semaphore> {
    if let Some(share) = COMPONENT_SHARES.get(component) {
        return Arc::clone(&share);
    }
    let half = inbound_budget().share_units() as usize;
    Arc::clone(
        &COMPONENT_SHARES
            .entry(component.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(half))),
    )
}

/// Room for one queued frame: in its component's share, and in the provider-wide budget.
pub struct Reserved {
    _share: OwnedSemaphorePermit,
    _budget: OwnedSemaphorePermit,
}

/// Takes room for a frame of `len` bytes in its component's `share` and in the inbound budget,
/// waiting while either is full. A frame larger than a share takes all of it.
async fn reserve(share: &Arc<Semaphore>, len: usize) -> Option<Reserved> {
    let budget = inbound_budget();
    let want = budget.units_for(len);
    let share = Arc::clone(share).acquire_many_owned(want).await.ok()?;
    let budget = Arc::clone(&budget.room)
        .acquire_many_owned(want)
        .await
        .ok()?;
    Some(Reserved {
        _share: share,
        _budget: budget,
    })
}

/// [`reserve`] without waiting: `None` when the share or the budget is used up.
fn try_reserve(share: &Arc<Semaphore>, len: usize) -> Option<Reserved> {
    let budget = inbound_budget();
    let want = budget.units_for(len);
    let share = Arc::clone(share).try_acquire_many_owned(want).ok()?;
    let budget = Arc::clone(&budget.room).try_acquire_many_owned(want).ok()?;
    Some(Reserved {
        _share: share,
        _budget: budget,
    })
}

/// What a lifecycle message holds of the inbound budget: while it waits it keeps its session
/// (closed, for a disconnect), the session's queue and delivery task alive.
pub const LIFECYCLE_COST: usize = 8 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// At most one warning a second per session; the ones held back are counted in the next.
#[derive(Default)]
struct LogLimit {
    last_ms: AtomicU64,
    held: AtomicU64,
}

impl LogLimit {
    /// `Some(n)` when a warning may be logged now, `n` being how many were held back.
    fn allow(&self, opened: Instant) -> Option<u64> {
        let now = u64::try_from(opened.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1000 {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.last_ms.store(now, Ordering::Relaxed);
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

/// The reader-side sink of one session.
pub struct Inbound {
    pub session: Arc<Session>,
    /// Boxed, so the queue's up-front room for 32 items is 32 pointers (see `Outbound`).
    pub queue: mpsc::Sender<Box<Queued>>,
    pub stats: Arc<Stats>,
    /// How long an unread socket waits for a handler link to attach.
    handler_wait: Duration,
    /// Since when frames have found no handler link (one wait per gap, not one per frame).
    unrouted_since: Mutex<Option<Instant>>,
    /// The component's share of the inbound budget.
    share: Arc<Semaphore>,
    opened: Instant,
    invalid_log: LogLimit,
    no_handler_log: LogLimit,
}

/// What a frame says, before it is given a handler link's subject.
struct Decoded {
    subject: Option<String>,
    body: Bytes,
    reply_to: Option<String>,
}

impl Inbound {
    /// Decodes a frame (JSON envelopes), or `None` when it is not for the component (a reply
    /// to a pending request, an invalid envelope).
    async fn decode(&self, payload: Bytes) -> Option<Decoded> {
        let session = &self.session;
        match session.format {
            Format::Raw => Some(Decoded {
                subject: None,
                body: payload,
                reply_to: session.tracking.then(|| session.subject()),
            }),
            Format::Json => {
                let envelope = envelope::decode(&payload).and_then(|envelope| {
                    if is_reserved(&envelope.subject) {
                        Err(format!(
                            "subject {:?} is reserved for the provider's own messages",
                            envelope.subject
                        ))
                    } else {
                        Ok(envelope)
                    }
                });
                let envelope = match envelope {
                    Ok(envelope) => envelope,
                    Err(error) => {
                        self.stats.undelivered("invalid_envelope");
                        if let Some(held) = self.invalid_log.allow(self.opened) {
                            warn!(session = %session.id, component = %session.component_id, %error,
                                more_since_last = held,
                                "invalid envelope; error frame sent to the peer (logged at most once a second)");
                        }
                        let _ = session.send_nowait(Message::text(envelope::error_frame(&error)));
                        // A flood of bad frames must not hold the runtime thread.
                        tokio::task::consume_budget().await;
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
                Some(Decoded {
                    subject: Some(envelope.subject),
                    body: envelope.body,
                    reply_to,
                })
            }
        }
    }

    /// A lifecycle message for handler link `link`, holding its share of the budget
    /// ([`LIFECYCLE_COST`]); `None`, counted and logged, when the component's share is used up
    /// (a component that does not keep up while clients connect and leave).
    pub fn lifecycle(&self, message: BrokerMessage, link: &str) -> Option<Queued> {
        let Some(reserved) = try_reserve(&self.share, LIFECYCLE_COST) else {
            self.stats.undelivered("budget");
            if let Some(held) = self.no_handler_log.allow(self.opened) {
                warn!(session = %self.session.id, component = %self.session.component_id,
                    subject = %message.subject, more_since_last = held,
                    "lifecycle message dropped: the component's share of MAX_INBOUND_BYTES is used up");
            }
            return None;
        };
        Some(Queued {
            kind: Kind::Lifecycle,
            message,
            link: link.to_string(),
            _budget: Some(reserved),
        })
    }

    /// What is left of the wait for a handler link in this gap without one: the wait is one
    /// per gap, so once it is over, frames are counted at once until a link attaches.
    fn wait_left(&self) -> Duration {
        let since = *lock(&self.unrouted_since).get_or_insert_with(Instant::now);
        self.handler_wait.saturating_sub(since.elapsed())
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
        let len = payload.len();
        let Some(decoded) = self.decode(payload).await else {
            return;
        };
        let session = &self.session;
        // Waiting here keeps the socket unread: TCP holds the peer's next frames meanwhile.
        let route = match session.route() {
            Some(route) => route,
            None => match session.wait_for_route(self.wait_left()).await {
                Some(route) => route,
                None => {
                    self.stats.undelivered("no_handler");
                    if let Some(held) = self.no_handler_log.allow(self.opened) {
                        warn!(session = %session.id, component = %session.component_id,
                            waited = ?self.handler_wait, more_since_last = held,
                            "frame arrived on a connection with no handler link, and none attached in time; not delivered");
                    }
                    return;
                }
            },
        };
        *lock(&self.unrouted_since) = None;
        // Waiting for room in the budget is backpressure too.
        let Some(budget) = reserve(&self.share, len).await else {
            return;
        };
        let message = BrokerMessage {
            subject: decoded.subject.unwrap_or(route.subject),
            body: decoded.body,
            reply_to: decoded.reply_to,
        };
        let queued = Queued {
            kind: Kind::Frame,
            message,
            link: route.link_name,
            _budget: Some(budget),
        };
        // Waiting here is the backpressure: the socket is not read while the queue is full.
        let _ = self.queue.send(Box::new(queued)).await;
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

/// What waits in a session's delivery queue: a message for the handler link `link`.
pub struct Queued {
    pub kind: Kind,
    pub message: BrokerMessage,
    /// The handler link it is for; if that link is gone by delivery time, it is dropped.
    pub link: String,
    /// Its share of the inbound budget, given back when it is delivered or dropped.
    _budget: Option<Reserved>,
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
    stats: Arc<Stats>,
) -> Arc<Inbound> {
    let (queue, queued) = mpsc::channel(DELIVERY_QUEUE);
    let delivery = Delivery {
        slots: handler_slots(&session.component_id),
        session: Arc::clone(&session),
        wrpc,
        timeout: options.timeout,
        stats: Arc::clone(&stats),
    };
    tokio::spawn(delivery.run(options.max_in_flight.max(1), queued));
    let share = component_share(&session.component_id);
    Arc::new(Inbound {
        session,
        queue,
        stats,
        handler_wait: options.handler_wait,
        unrouted_since: Mutex::new(None),
        share,
        opened: Instant::now(),
        invalid_log: LogLimit::default(),
        no_handler_log: LogLimit::default(),
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
    /// The component's call slots.
    slots: Arc<Semaphore>,
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
                if self.still_linked(&queued) {
                    self.handle(&queued.message, None).await;
                }
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
            if !self.still_linked(&queued) {
                continue;
            }
            if queued.kind == Kind::Lifecycle {
                while running.next().await.is_some() {}
                self.handle(&queued.message, None).await;
                continue;
            }
            let (started_tx, mut started) = oneshot::channel();
            let this = &self;
            let mut call = Box::pin(async move {
                // The queued item (and its share of the budget) lives until the call ends.
                this.handle(&queued.message, Some(started_tx)).await;
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

    /// Whether the handler link a message was queued for still exists; counts it if not.
    fn still_linked(&self, queued: &Queued) -> bool {
        if self.session.has_route(&queued.link) {
            return true;
        }
        self.stats.undelivered("link_deleted");
        debug!(session = %self.session.id, link = %queued.link, subject = %queued.message.subject,
            "queued message dropped: its handler link was deleted");
        false
    }

    /// One `handle-message` call, bounded by the handler timeout; `started` is told once the
    /// call has been handed to NATS.
    async fn handle(&self, message: &BrokerMessage, started: Option<oneshot::Sender<()>>) {
        let Ok(_slot) = self.slots.acquire().await else {
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
        let call = handler::handle_message(&client, headers, message);
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
