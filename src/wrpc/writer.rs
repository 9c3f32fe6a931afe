//! The outgoing byte stream of a call, as the wRPC encoder writes it: the caller's parameters
//! after the accept (client side) or the callee's results (server side), published in
//! messages NATS accepts. Server side, it also holds back the end of the results until the
//! caller is known to have them, and sends again what the caller may have missed
//! ([`Confirm`]).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use async_nats::{PublishMessage, Subject};
use bytes::{Bytes, BytesMut};
use futures::{FutureExt as _, Sink as _};
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;
use tracing::debug;

use super::mux::{Registration, Served};
use super::Deadline;

/// An outgoing byte stream to one subject: written bytes are buffered, a flush publishes them
/// in messages NATS accepts, and shutdown publishes the end of the stream.
pub struct Writer {
    nats: async_nats::Client,
    pub(super) subject: Subject,
    buffer: BytesMut,
    ended: bool,
    /// Server side: holds the end of the results until the caller is known to have them.
    pub(super) confirm: Option<Box<Confirm>>,
}

/// A caller on wrpc-transport-nats 0.29 whose accept was lost (see [`super::server`]) is not yet
/// subscribed to its results, and loses what arrives before it is. So a server's results go
/// out at once (the caller decodes them as soon as they arrive), but their end waits until the
/// caller has ended its parameters, which it does only once it has the accept, and so its
/// results subscription; if the accept had to be sent again, the results sent before the
/// caller's parameters are sent again first. A caller that got the first copy has its value
/// and drops the second. Results that need more than one message wait for the caller's
/// parameters before any is sent (a caller must never see the second part without the first).
pub(super) struct Confirm {
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
    /// Holds the end of a served call's results until `ended` fires (the caller's end of
    /// parameters) or `deadline` passes; `call` keeps the call's route until then.
    pub(super) fn new(
        served: Arc<Served>,
        ended: oneshot::Receiver<()>,
        deadline: Deadline,
        call: Arc<Registration>,
    ) -> Self {
        Self {
            served,
            ended: ended.fuse(),
            deadline,
            sent: Vec::new(),
            replayed: 0,
            _call: call,
        }
    }

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
    pub(super) fn new(nats: async_nats::Client, subject: Subject, buffer: BytesMut) -> Self {
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
