//! wRPC 0.0.1 over NATS, both ways, without wrpc-transport-nats 0.29's lost replies.
//!
//! The SDK's transport (`wrpc-transport-nats` 0.29) routes every reply through one demux task
//! that learns about each new call through a channel; its unbiased `select!` can take a reply
//! off the wire before the call's registration and drop it, and the call then hangs (fixed
//! upstream only in 0.31, which the SDK cannot use). Here each call is registered in a shared
//! map *before* anything that could be answered is published, so every reply finds its call:
//! - [`client`]: calls from the provider into components (`handle-message`);
//! - [`server`]: the provider's own exports (`consumer`, the session API), served in place of
//!   the SDK's `serve_provider_exports`, on the SDK's lattice connection.
//!
//! The same race sits on the *host's* side, which we cannot change: its 0.29 client asks its
//! demux task to subscribe to a call's accept and results and then publishes the call, and its
//! 0.29 server asks it to subscribe to a call's parameters and then publishes the accept; the
//! demux may route what arrives before it applies the request, and drop it. So our server sends
//! its accept again until the caller's parameters arrive, and ends its results only after the
//! caller's parameters have ended (sending again what the caller may have missed); our client
//! gives a host a head start before sending parameters that did not fit in the call's first
//! message (see the modules).
//!
//! Only what these interfaces need is spoken: parameters and results without nested async
//! streams (a function with one is refused when it is served or called).
//!
//! The protocol, for a call of `<instance>.<function>` on `<lattice>.<id>`:
//! 1. the caller publishes the parameters to `<lattice>.<id>.wrpc.0.0.1.<instance>.<function>`
//!    with reply subject `R` (what does not fit in one NATS message waits for step 3);
//! 2. the callee accepts by publishing an empty message to `R` with its own reply subject `S`;
//! 3. the caller sends the rest of the parameters, then an empty end-of-stream message, to
//!    `S.params`;
//! 4. the callee sends the results to `R.results`, then an empty end-of-stream message.

mod client;
mod server;

pub use client::{ComponentClient, Invoker, Outgoing};
pub use server::{serve_exports, ExportServer, Invocations};
/// The invocation context the server hands to export handlers (the SDK's).
pub use wasmcloud_provider_sdk::Context as InvocationContext;

use std::collections::{HashMap, VecDeque};
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use anyhow::Context as _;
use async_nats::{Message, PublishMessage, Subject};
use bytes::{Buf as _, Bytes, BytesMut};
use futures::channel::mpsc;
use futures::{Sink as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
struct Served {
    /// The caller has sent parameters (or their end): it has the accept, and so it is
    /// subscribed to its results.
    params_seen: AtomicBool,
    /// The accept was sent again: results sent before the caller's parameters may be lost.
    accept_resent: AtomicBool,
}

type Routes = Arc<Mutex<HashMap<u64, OpenCall>>>;

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<u64, OpenCall>> {
    // The map stays consistent across a panic elsewhere; never poison every later call.
    routes.lock().unwrap_or_else(|e| e.into_inner())
}

/// One reply inbox on a NATS connection, and the open calls it routes to.
struct Mux {
    nats: async_nats::Client,
    inbox: String,
    next: AtomicU64,
    routes: Routes,
    _demux: OwnedTask,
}

impl Mux {
    async fn new(nats: async_nats::Client) -> anyhow::Result<Arc<Self>> {
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
    fn register(&self) -> (Arc<Registration>, oneshot::Receiver<Message>, Stream) {
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
    fn register_served(
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

    fn open_calls(&self) -> usize {
        lock(&self.routes).len()
    }
}

type Stream = mpsc::UnboundedReceiver<Message>;

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
struct Registration {
    id: u64,
    /// `<inbox>.<n>`: the subject the other side answers on.
    subject: Subject,
    routes: Routes,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.id);
    }
}

/// An incoming byte stream: what came inline with the call (server side), then the messages
/// routed to the call, up to an empty one (the end of the stream).
pub struct Incoming {
    buffer: Bytes,
    /// Server side: parts of a call's parameters already read from `stream` by the server
    /// (see [`server`]), read after `buffer`.
    parts: VecDeque<Bytes>,
    /// The end of the stream has been read from `stream` (into `parts`): nothing follows.
    ended: bool,
    stream: Stream,
    /// Server side: the caller must have sent its whole parameter stream by then (a timer is
    /// made only if the stream has to be waited for).
    deadline: Option<Deadline>,
    /// Server side: the share of the gathering budget that `parts` hold (see [`server`]).
    room: Option<tokio::sync::SemaphorePermit<'static>>,
    _call: Arc<Registration>,
}

impl AsyncRead for Incoming {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.buffer.is_empty() {
            if let Some(part) = this.parts.pop_front() {
                this.buffer = part;
            } else if this.ended {
                return Poll::Ready(Ok(()));
            }
        }
        if this.buffer.is_empty() {
            let next = match this.stream.poll_next_unpin(cx) {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    if let Some(deadline) = &mut this.deadline {
                        ready!(deadline.poll(cx));
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the caller did not finish its parameters in time",
                        )));
                    }
                    return Poll::Pending;
                }
            };
            match next {
                // An empty message ends the stream; so does a closed channel.
                Some(message) if !message.payload.is_empty() => this.buffer = message.payload,
                _ => return Poll::Ready(Ok(())),
            }
        }
        let n = this.buffer.len().min(buf.remaining());
        buf.put_slice(&this.buffer[..n]);
        this.buffer.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// A point in time, with its timer made the first time it is waited for.
pub(crate) struct Deadline {
    at: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    pub(crate) fn at(at: tokio::time::Instant) -> Self {
        Self { at, timer: None }
    }

    fn instant(&self) -> tokio::time::Instant {
        self.at
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
    }
}

impl wrpc_transport::Index<Incoming> for Incoming {
    fn index(&self, _path: &[usize]) -> anyhow::Result<Incoming> {
        anyhow::bail!("nested async streams are not supported")
    }
}

/// An outgoing byte stream to one subject: written bytes are buffered, a flush publishes them
/// in messages NATS accepts, and shutdown publishes the end of the stream.
pub struct Writer {
    nats: async_nats::Client,
    subject: Subject,
    buffer: BytesMut,
    ended: bool,
    /// Server side: holds the end of the results until the caller is known to have them.
    confirm: Option<Box<Confirm>>,
}

/// A caller on wrpc-transport-nats 0.29 whose accept was lost (see [`server`]) is not yet
/// subscribed to its results, and loses what arrives before it is. So a server's results go
/// out at once (the caller decodes them as soon as they arrive), but their end waits until the
/// caller has ended its parameters, which it does only once it has the accept, and so its
/// results subscription; if the accept had to be sent again, the results sent before the
/// caller's parameters are sent again first. A caller that got the first copy has its value
/// and drops the second. Results that need more than one message wait for the caller's
/// parameters before any is sent (a caller must never see the second part without the first).
struct Confirm {
    served: Arc<Served>,
    ended: futures::future::Fuse<oneshot::Receiver<()>>,
    deadline: Deadline,
    /// Published before the caller's parameters were seen, in order.
    sent: Vec<Bytes>,
    /// How many of `sent` have been published again.
    replayed: usize,
    /// Keeps the call's route (and so the end-of-stream signal) alive until then.
    _call: Arc<Registration>,
}

impl Confirm {
    /// Waits for the caller's end of parameters; `Err` once the deadline has passed.
    fn poll_ended(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A dropped sender cannot happen while `_call` holds the route; it counts as ended.
        if Pin::new(&mut self.ended).poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.deadline.poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the caller did not end its parameters in time; the end of the results not sent",
        )))
    }

    fn params_seen(&self) -> bool {
        self.served.params_seen.load(Ordering::Acquire)
    }
}

impl Writer {
    fn new(nats: async_nats::Client, subject: Subject, buffer: BytesMut) -> Self {
        Self {
            nats,
            subject,
            buffer,
            ended: false,
            confirm: None,
        }
    }

    /// Before the end of the results: waits for the caller's end of parameters and publishes
    /// again what it may have missed (see [`Confirm`]).
    fn poll_confirm(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(confirm) = &mut self.confirm else {
            return Poll::Ready(Ok(()));
        };
        ready!(confirm.poll_ended(cx))?;
        if confirm.served.accept_resent.load(Ordering::Acquire) {
            while confirm.replayed < confirm.sent.len() {
                ready!(Pin::new(&mut self.nats).poll_ready(cx)).map_err(io::Error::other)?;
                let message = PublishMessage {
                    subject: self.subject.clone(),
                    payload: confirm.sent[confirm.replayed].clone(),
                    reply: None,
                    headers: None,
                };
                Pin::new(&mut self.nats)
                    .start_send(message)
                    .map_err(io::Error::other)?;
                confirm.replayed += 1;
            }
            if !confirm.sent.is_empty() {
                debug!(subject = %self.subject, messages = confirm.sent.len(),
                    "results sent again after a re-sent accept");
            }
        }
        self.confirm = None;
        Poll::Ready(Ok(()))
    }

    /// Publishes one message (after waiting for room in the connection's queue).
    fn poll_publish(
        &mut self,
        cx: &mut Context<'_>,
        payload: impl FnOnce(&mut BytesMut) -> Bytes,
    ) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.nats).poll_ready(cx)).map_err(io::Error::other)?;
        let payload = payload(&mut self.buffer);
        if let Some(confirm) = &mut self.confirm {
            if !payload.is_empty() && !confirm.params_seen() {
                confirm.sent.push(payload.clone());
            }
        }
        let message = PublishMessage {
            subject: self.subject.clone(),
            payload,
            reply: None,
            headers: None,
        };
        Pin::new(&mut self.nats)
            .start_send(message)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.buffer.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffer.is_empty() {
            return Poll::Ready(Ok(()));
        }
        // `server_info` copies the whole server description: once per flush, not per message.
        let chunk = this.nats.server_info().max_payload.max(1);
        if let Some(confirm) = &mut this.confirm {
            if this.buffer.len() > chunk && !confirm.params_seen() {
                ready!(confirm.poll_ended(cx))?;
            }
        }
        while !this.buffer.is_empty() {
            ready!(this.poll_publish(cx, |b| b.split_to(chunk.min(b.len())).freeze()))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        let this = self.get_mut();
        ready!(this.poll_confirm(cx))?;
        if !this.ended {
            ready!(this.poll_publish(cx, |_| Bytes::new()))?;
            this.ended = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl wrpc_transport::Index<Writer> for Writer {
    fn index(&self, _path: &[usize]) -> anyhow::Result<Writer> {
        anyhow::bail!("nested async streams are not supported")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// A call whose parameters were gathered reads its first message, then the gathered
    /// parts, then ends, without waiting on its (still open) stream.
    #[tokio::test]
    async fn gathered_parameters_are_read_in_order_and_end_without_the_stream() {
        let routes = Routes::default();
        let (_sender, stream) = mpsc::unbounded();
        let mut incoming = Incoming {
            buffer: Bytes::from_static(b"ab"),
            parts: [Bytes::from_static(b"cd"), Bytes::from_static(b"ef")].into(),
            ended: true,
            stream,
            deadline: None,
            room: None,
            _call: Arc::new(Registration {
                id: 0,
                subject: Subject::from("x"),
                routes,
            }),
        };
        let mut read = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            incoming.read_to_end(&mut read),
        )
        .await
        .expect("the read must not wait on the stream")
        .expect("read");
        assert_eq!(read, b"abcdef");
    }
}
