//! The reader-side sink of one session: decodes each frame with the session's codec, hands
//! replies to waiting requests, waits for a handler link, reserves the frame's bytes, and
//! queues it for the session's delivery task. Also counts what the socket reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tracing::warn;

use super::ack::{write_answer, AckTicket};
use super::budget::{component_share, reserve, try_reserve};
use super::{Kind, Queued};
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::codec;
use crate::envelope::{self, NotHandled};
use crate::metrics::{Metrics, Reason};
use crate::session::acks::Begin;
use crate::session::Session;
use crate::ws::socket::FrameSink;

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
    /// The session's last message, delivered after everything queued (see [`Inbound::farewell`]).
    farewell: Mutex<Option<oneshot::Sender<Box<Queued>>>>,
    pub metrics: Arc<Metrics>,
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
    /// The peer asked for an acknowledgment under this ID.
    ack_id: Option<String>,
}

impl Inbound {
    pub(super) fn new(
        session: Arc<Session>,
        queue: mpsc::Sender<Box<Queued>>,
        farewell: oneshot::Sender<Box<Queued>>,
        metrics: Arc<Metrics>,
        handler_wait: Duration,
    ) -> Self {
        let share = component_share(&session.component_id);
        Self {
            session,
            queue,
            farewell: Mutex::new(Some(farewell)),
            metrics,
            handler_wait,
            unrouted_since: Mutex::new(None),
            share,
            opened: Instant::now(),
            invalid_log: LogLimit::default(),
            no_handler_log: LogLimit::default(),
        }
    }

    /// Decodes a frame (the session's codec), or `None` when it is not for the component (a
    /// reply to a pending request, an invalid envelope).
    async fn decode(&self, payload: Bytes) -> Option<Decoded> {
        let session = &self.session;
        let envelope = match session.codec.decode(payload) {
            Ok(codec::Inbound::Raw(body)) => {
                return Some(Decoded {
                    subject: None,
                    body,
                    reply_to: session.reply_to_for(None),
                    ack_id: None,
                })
            }
            Ok(codec::Inbound::Envelope(envelope)) => envelope,
            Ok(codec::Inbound::Ack(ack)) => {
                if !session.replies.resolve_ack(&ack.id, ack.outcome) {
                    tracing::debug!(session = %session.id,
                        "ack for no waiting send (unknown id, or its send timed out)");
                }
                return None;
            }
            Err(error) => {
                self.metrics.undelivered(Reason::InvalidEnvelope);
                if let Some(held) = self.invalid_log.allow(self.opened) {
                    warn!(session = %session.id, component = %session.component_id, %error,
                        more_since_last = held,
                        "invalid envelope; error frame sent to the peer (logged at most once a second)");
                }
                let _ = session
                    .outbox
                    .send_nowait(Message::text(envelope::error_frame(&error)));
                // A flood of bad frames must not hold the runtime thread.
                tokio::task::consume_budget().await;
                return None;
            }
        };
        let ack_id = envelope.ack_id.clone();
        let Some(envelope) = session.replies.resolve(envelope) else {
            // A reply handed to the request waiting for it: handled.
            if let Some(ticket) = ack_id.and_then(|id| self.ticket(id)) {
                ticket.settle(Ok(()));
            }
            return None;
        };
        Some(Decoded {
            subject: Some(envelope.subject),
            body: envelope.body,
            reply_to: session.reply_to_for(envelope.reply_to),
            ack_id: envelope.ack_id,
        })
    }

    /// The ticket of an acknowledged envelope with `id`, or `None` when the ID is a retry inside
    /// the window: then its answer is (or will be) written again, and it is not delivered again.
    fn ticket(&self, id: String) -> Option<AckTicket> {
        match self.session.acks.begin(&id) {
            Begin::New => Some(AckTicket::new(Arc::clone(&self.session), id)),
            Begin::Pending => None,
            Begin::Repeat(frame) => {
                write_answer(&self.session, &frame, 1);
                None
            }
        }
    }

    /// A lifecycle message for handler link `link`, holding its share of the budget
    /// ([`LIFECYCLE_COST`]); `None`, counted and logged, when the component's share is used up
    /// (a component that does not keep up while clients connect and leave).
    pub fn lifecycle(&self, message: BrokerMessage, link: &str) -> Option<Queued> {
        let Some(reserved) = try_reserve(&self.share, LIFECYCLE_COST) else {
            self.metrics.undelivered(Reason::Budget);
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
            ack: None,
        })
    }

    /// Leaves the session's last message (a closed session's `ws.lifecycle.disconnected`): the
    /// session's delivery task delivers it once everything queued before it is done and the
    /// socket is gone. Only the first call counts.
    pub fn farewell(&self, last: Queued) {
        if let Some(farewell) = lock(&self.farewell).take() {
            let _ = farewell.send(Box::new(last));
        }
    }

    /// What is left of the wait for a handler link in this gap without one: the wait is one
    /// per gap, so once it is over, frames are counted at once until a link attaches.
    fn wait_left(&self) -> Duration {
        let since = *lock(&self.unrouted_since).get_or_insert_with(Instant::now);
        self.handler_wait.saturating_sub(since.elapsed())
    }
}

impl FrameSink for Inbound {
    async fn frame(&self, payload: Bytes, _text: bool) {
        self.metrics.frame_in(self.session.mode, payload.len());
        let len = payload.len();
        let Some(decoded) = self.decode(payload).await else {
            return;
        };
        let mut ack = match decoded.ack_id.clone() {
            Some(id) => match self.ticket(id) {
                Some(ticket) => Some(ticket),
                None => return,
            },
            None => None,
        };
        let session = &self.session;
        // Waiting here keeps the socket unread: TCP holds the peer's next frames meanwhile.
        let route = match session.route() {
            Some(route) => route,
            None => match session.wait_for_route(self.wait_left()).await {
                Some(route) => route,
                None => {
                    self.metrics.undelivered(Reason::NoHandler);
                    if let Some(held) = self.no_handler_log.allow(self.opened) {
                        warn!(session = %session.id, component = %session.component_id,
                            waited = ?self.handler_wait, more_since_last = held,
                            "frame arrived on a connection with no handler link, and none attached in time; not delivered");
                    }
                    if let Some(ticket) = ack.take() {
                        ticket.settle(Err((
                            NotHandled::NoHandler,
                            format!(
                                "no handler link took the message within {} ms",
                                self.handler_wait.as_millis()
                            ),
                        )));
                    }
                    return;
                }
            },
        };
        *lock(&self.unrouted_since) = None;
        // Waiting for room in the budget is backpressure too.
        let Some(budget) = reserve(&self.share, len).await else {
            if let Some(ticket) = ack.take() {
                ticket.settle(Err((
                    NotHandled::Refused,
                    "the provider is stopping: no room in MAX_INBOUND_BYTES".to_string(),
                )));
            }
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
            ack,
        };
        // Waiting here is the backpressure: the socket is not read while the queue is full.
        let _ = self.queue.send(Box::new(queued)).await;
    }

    async fn kicked(&self) {
        self.session.outbox.kicked().await;
    }

    fn connected(&self) {
        self.metrics.session_opened(self.session.mode);
    }

    fn disconnected(&self) {
        self.metrics.session_closed(self.session.mode);
    }

    fn written(&self, frames: u64, bytes: u64) {
        self.metrics.frames_out(self.session.mode, frames, bytes);
    }

    fn reconnected(&self) {
        self.metrics.reconnected();
    }

    fn pong(&self) {
        self.session.outbox.ponged();
    }
}
