//! The demux: one reply inbox on a NATS connection, the map of its open calls, and the task
//! that hands each message arriving on the inbox to its call. A call is registered here
//! *before* anything that could be answered is published (see the module map), and unrouted
//! when its last [`Registration`] is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_nats::{Message, Subject};
use futures::channel::mpsc;
use futures::StreamExt as _;
use tokio::sync::oneshot;
use tracing::debug;

use crate::task::OwnedTask;

/// Where the demux task puts the messages of one open call.
struct OpenCall {
    /// `<inbox>.<n>`: the callee's accept (client side).
    accept: Option<oneshot::Sender<Message>>,
    /// `<inbox>.<n>.results` (client side) or `<inbox>.<n>.params` (server side).
    stream: mpsc::UnboundedSender<Message>,
    /// Server side: what the caller has done so far.
    served: Option<Arc<Served>>,
    /// Fired by the end of the stream (an empty message).
    ended: Option<oneshot::Sender<()>>,
}

/// What a served call's caller has done, shared by the demux (which sets `params_seen` at the
/// caller's first parameter message), the accept re-sender and the results writer.
#[derive(Default)]
pub(super) struct Served {
    /// The caller has sent parameters (or their end): it has the accept, and so it is
    /// subscribed to its results.
    pub(super) params_seen: AtomicBool,
    /// The accept was sent again: results sent before the caller's parameters may be lost.
    pub(super) accept_resent: AtomicBool,
}

type Routes = Arc<Mutex<HashMap<u64, OpenCall>>>;

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<u64, OpenCall>> {
    // The map stays consistent across a panic elsewhere; never poison every later call.
    routes.lock().unwrap_or_else(|e| e.into_inner())
}

/// One reply inbox on a NATS connection, and the open calls it routes to.
pub(super) struct Mux {
    pub(super) nats: async_nats::Client,
    inbox: String,
    next: AtomicU64,
    routes: Routes,
    _demux: OwnedTask,
}

impl Mux {
    pub(super) async fn new(nats: async_nats::Client) -> anyhow::Result<Arc<Self>> {
        let inbox = nats.new_inbox();
        let replies = nats
            .subscribe(format!("{inbox}.>"))
            .await
            .context("failed to subscribe to the reply inbox")?;
        let routes = Routes::default();
        let demux = OwnedTask::spawn({
            let routes = Arc::clone(&routes);
            let prefix = format!("{inbox}.");
            |cancel| async move {
                let mut replies = replies;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        message = replies.next() => match message {
                            Some(message) => route(&routes, &prefix, message),
                            None => return,
                        },
                    }
                }
            }
        });
        Ok(Arc::new(Self {
            nats,
            inbox,
            next: AtomicU64::new(0),
            routes,
            _demux: demux,
        }))
    }

    /// Registers a new call (client side); its replies are routed from now on, until the
    /// returned [`Registration`] (and every clone of it) is dropped.
    pub(super) fn register(&self) -> (Arc<Registration>, oneshot::Receiver<Message>, Stream) {
        let (accept_tx, accept) = oneshot::channel();
        let (stream_tx, stream) = mpsc::unbounded();
        let registration = self.insert(OpenCall {
            accept: Some(accept_tx),
            stream: stream_tx,
            served: None,
            ended: None,
        });
        (registration, accept, stream)
    }

    /// Registers a call to serve: like [`Mux::register`], and also tracks the caller's
    /// parameter stream (how the server knows its accept arrived) and signals its end.
    pub(super) fn register_served(
        &self,
    ) -> (
        Arc<Registration>,
        Stream,
        Arc<Served>,
        oneshot::Receiver<()>,
    ) {
        let (stream_tx, stream) = mpsc::unbounded();
        let (ended_tx, ended) = oneshot::channel();
        let served = Arc::new(Served::default());
        let registration = self.insert(OpenCall {
            accept: None,
            stream: stream_tx,
            served: Some(Arc::clone(&served)),
            ended: Some(ended_tx),
        });
        (registration, stream, served, ended)
    }

    fn insert(&self, route: OpenCall) -> Arc<Registration> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.routes).insert(id, route);
        Arc::new(Registration {
            id,
            subject: Subject::from(format!("{}.{id}", self.inbox)),
            routes: Arc::clone(&self.routes),
        })
    }

    pub(super) fn open_calls(&self) -> usize {
        lock(&self.routes).len()
    }
}

/// The messages routed to one call's incoming stream.
pub(super) type Stream = mpsc::UnboundedReceiver<Message>;

/// Hands one message to its call: `<inbox>.<n>` is an accept, `<inbox>.<n>.<stream>` a part
/// of the call's incoming stream.
fn route(routes: &Routes, prefix: &str, message: Message) {
    let Some(rest) = message.subject.as_str().strip_prefix(prefix) else {
        return;
    };
    let (id, stream) = match rest.split_once('.') {
        None => (rest, false),
        Some((id, "results" | "params")) => (id, true),
        Some(_) => {
            debug!(subject = %message.subject, "message on an unknown subject; dropped");
            return;
        }
    };
    let Ok(id) = id.parse::<u64>() else {
        return;
    };
    let mut routes = lock(routes);
    let Some(route) = routes.get_mut(&id) else {
        // Normal for an end-of-stream that arrives after its reader finished.
        debug!(call = id, "message for a call that has ended; dropped");
        return;
    };
    if stream {
        if let Some(served) = &route.served {
            served.params_seen.store(true, Ordering::Release);
        }
        if message.payload.is_empty() {
            if let Some(ended) = route.ended.take() {
                let _ = ended.send(());
            }
        }
        let _ = route.stream.unbounded_send(message);
    } else if let Some(accept) = route.accept.take() {
        let _ = accept.send(message);
    }
}

/// Removes a call's route once every holder has dropped it.
pub(super) struct Registration {
    id: u64,
    /// `<inbox>.<n>`: the subject the other side answers on.
    pub(super) subject: Subject,
    routes: Routes,
}

impl Registration {
    /// A registration in a map of its own, for tests of what holds one.
    #[cfg(test)]
    pub(super) fn unrouted(subject: &str) -> Arc<Self> {
        Arc::new(Self {
            id: 0,
            subject: Subject::from(subject),
            routes: Routes::default(),
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.id);
    }
}
