//! The provider's exports (`wasmcloud:messaging/consumer`, the session API), served on the
//! SDK's lattice connection in place of the SDK's `serve_provider_exports`: each call is
//! registered before it is accepted, so the caller's parameters always find it, and each runs
//! in a task of its own. A caller that missed the accept (the host's 0.29 client can drop it)
//! gets it again, and the results it may have missed with it (see [`accept`]).
//!
//! Calls are independent: one whose parameters fit in its first message (nearly all) is
//! handed on at once; one whose parameters follow its accept is handed on only once they have
//! all arrived, so a caller that stops half-way holds up no other call (see [`Gathering`]).
//! Limits: a call's parameters may be at most [`MAX_CALL_BYTES`] (64 MiB) and must end within
//! [`PARAMS_PATIENCE`] (30 s) of its accept; otherwise the call is dropped and its caller gets
//! an error result.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use async_nats::{Message, Subject};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, FuturesUnordered, Stream, StreamExt as _};
use futures::FutureExt as _;
use tracing::{debug, warn};
use wasmcloud_provider_sdk::provider::invocation_context;
use wasmcloud_provider_sdk::Context;
use wrpc_transport_nats::{invocation_subject, result_subject};

use super::client::headers_len;
use super::mux::{Mux, Served};
use super::writer::Confirm;
use super::{Deadline, Incoming, Writer};
use crate::task::OwnedTask;

/// Serves functions of the provider under `<lattice>.<provider id>`, as one of a queue group
/// (so several instances of the provider would share the calls).
pub struct ExportServer {
    mux: Arc<Mux>,
    prefix: Arc<str>,
    resender: Arc<Resender>,
}

impl ExportServer {
    pub async fn new(
        nats: async_nats::Client,
        lattice: &str,
        provider_id: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            resender: Arc::new(Resender::start(nats.clone())),
            mux: Mux::new(nats).await?,
            prefix: Arc::from(format!("{lattice}.{provider_id}")),
        })
    }
}

impl wrpc_transport::Serve for ExportServer {
    type Context = Option<Context>;
    type Outgoing = Writer;
    type Incoming = Incoming;

    async fn serve(
        &self,
        instance: &str,
        func: &str,
        paths: impl Into<Arc<[Box<[Option<usize>]>]>> + Send,
    ) -> anyhow::Result<
        impl Stream<Item = anyhow::Result<(Self::Context, Self::Outgoing, Self::Incoming)>>
            + Send
            + 'static,
    > {
        let paths: Arc<[Box<[Option<usize>]>]> = paths.into();
        ensure!(
            paths.is_empty(),
            "{instance}.{func} has nested async streams, which are not served"
        );
        let calls = self
            .mux
            .nats
            .queue_subscribe(
                invocation_subject(&self.prefix, instance, func),
                self.prefix.to_string(),
            )
            .await
            .with_context(|| format!("failed to subscribe for {instance}.{func}"))?;
        let (mux, resender) = (Arc::clone(&self.mux), Arc::clone(&self.resender));
        let accepted =
            calls.then(move |call| accept(Arc::clone(&mux), Arc::clone(&resender), call));
        Ok(Gathering {
            accepted: Some(accepted.boxed()),
            gathering: FuturesUnordered::new(),
            nats: self.mux.nats.clone(),
            function: Arc::from(format!("{instance}.{func}")),
        })
    }
}

/// The first re-send of an accept whose caller has sent nothing back; each later one waits
/// twice as long, up to [`ACCEPT_RESEND_MAX`].
pub const ACCEPT_RESEND_FIRST: Duration = Duration::from_millis(20);
pub const ACCEPT_RESEND_MAX: Duration = Duration::from_secs(1);
/// How long a call waits for its caller's parameters and their end. After that the call is
/// dropped (the caller gets an error result if its parameters were still being gathered, see
/// [`Gathering`]). Other calls never wait for it.
pub const PARAMS_PATIENCE: Duration = Duration::from_secs(30);

/// Registers a call, then accepts it: the caller sends the rest of its parameters (and their
/// end) to the registered subject, and reads the results from `<its reply>.results`.
///
/// A caller on the host's wrpc-transport-nats 0.29 subscribes to the accept and the results
/// through a command to its demux task *after* publishing the call, and the demux may take our
/// accept off the wire before it applies that command: the accept is dropped and the caller
/// would wait forever. So the accept is sent again, after [`ACCEPT_RESEND_FIRST`] and then at
/// growing intervals, until the first of the caller's parameter messages arrives (which proves
/// it has the accept). Results sent before that may have been dropped the same way: the end of
/// the results waits for the caller's end of parameters, and results it may have missed are
/// sent again before it (see [`Confirm`]). A repeated accept that reaches a caller which already
/// has one is dropped by it (its handshake subscription is gone or closed).
async fn accept(mux: Arc<Mux>, resender: Arc<Resender>, call: Message) -> anyhow::Result<Accepted> {
    let reply = call.reply.context("the call named no reply subject")?;
    let complete = complete_inline(&mux.nats, &reply, call.headers.as_ref(), call.payload.len());
    let (registration, params, served, ended) = mux.register_served();
    mux.nats
        .publish_with_reply(reply.clone(), registration.subject.clone(), Bytes::new())
        .await
        .context("failed to accept the call")?;
    let now = tokio::time::Instant::now();
    resender.watch(Pending {
        due: now + ACCEPT_RESEND_FIRST,
        delay: ACCEPT_RESEND_FIRST,
        give_up: now + PARAMS_PATIENCE,
        sent: 0,
        reply: reply.clone(),
        subject: registration.subject.clone(),
        served: Arc::downgrade(&served),
    });
    let deadline = now + PARAMS_PATIENCE;
    let mut results = Writer::new(
        mux.nats.clone(),
        Subject::from(result_subject(&reply)),
        BytesMut::new(),
    );
    results.confirm = Some(Box::new(Confirm::new(
        served,
        ended,
        Deadline::at(deadline),
        Arc::clone(&registration),
    )));
    let params = Incoming {
        buffer: call.payload,
        parts: VecDeque::new(),
        ended: false,
        stream: params,
        deadline: Some(Deadline::at(deadline)),
        room: None,
        _call: registration,
    };
    Ok(Accepted {
        call: (
            call.headers.as_ref().map(invocation_context),
            results,
            params,
        ),
        complete,
    })
}

/// One call of a function, as [`ExportServer::serve`] yields it.
type Call = (Option<Context>, Writer, Incoming);

/// A call just accepted, and whether its first message held all its parameters.
struct Accepted {
    call: Call,
    complete: bool,
}

/// The most parameter bytes one call may send (in its first message and after its accept,
/// together). A call that sends more is dropped, answered with an error (see [`Gathering`]).
pub const MAX_CALL_BYTES: usize = 64 * 1024 * 1024;
/// Bytes all calls being gathered may hold at once; a call that would go over it is dropped
/// and answered with an error, like one over [`MAX_CALL_BYTES`].
pub const MAX_GATHERING_BYTES: usize = 256 * 1024 * 1024;
/// The gathering budget counts in units of this many bytes.
const GATHER_UNIT: usize = 64 * 1024;
static GATHER_ROOM: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_GATHERING_BYTES / GATHER_UNIT);

/// How far below the caller's budget for its first message (see [`complete_inline`]) a call's
/// payload must be to count as complete: room for a caller that counts its headers a little
/// differently. A complete call within it is only gathered (one message later), never lost.
const INLINE_SLACK: usize = 1024;

/// Whether a call whose first message holds `payload` bytes holds all its parameters.
///
/// A caller (wrpc-transport-nats 0.29, as the host uses it, and [`super::client`]) puts as
/// much of its parameters into the call's message as NATS allows: the server's `max_payload`
/// less the reply subject and the headers. Only parameters that do not fit follow the accept.
/// So a payload clearly below that budget is the whole of them.
fn complete_inline(
    nats: &async_nats::Client,
    reply: &Subject,
    headers: Option<&async_nats::HeaderMap>,
    payload: usize,
) -> bool {
    let budget = nats
        .server_info()
        .max_payload
        .saturating_sub(reply.len())
        .saturating_sub(headers.map_or(0, headers_len));
    payload.saturating_add(INLINE_SLACK) < budget
}

/// The calls of one function, each independent of the others: a call complete in its first
/// message (see [`complete_inline`]) is yielded at once, in arrival order, with no extra wait;
/// any other call's parameters are gathered in a future of their own, up to the end of their
/// stream, and the call is yielded once they are all there. So the decoder that reads calls
/// one after another (`ServeExt::serve_values`) never waits on a caller: calls are yielded in
/// the order they became complete, and a call whose caller stops half-way (a lost accept, a
/// host that died) holds nothing but itself. A call whose parameters exceed
/// [`MAX_CALL_BYTES`], or do not end within [`PARAMS_PATIENCE`] of its accept, is dropped with
/// a warning and answered with an error result (`result::err(string)`, the error type of
/// every function the provider serves).
struct Gathering {
    /// Calls as they are accepted; `None` once the subscription has ended.
    accepted: Option<BoxStream<'static, anyhow::Result<Accepted>>>,
    /// Calls whose parameters are being gathered; each ends with the call, or `None` when it
    /// was dropped.
    gathering: FuturesUnordered<BoxFuture<'static, Option<Call>>>,
    nats: async_nats::Client,
    /// `<instance>.<function>`, for the log.
    function: Arc<str>,
}

/// How many calls [`Gathering`] takes in one poll before it lets other tasks run.
const CALLS_PER_POLL: usize = 64;

impl Stream for Gathering {
    type Item = anyhow::Result<Call>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..CALLS_PER_POLL {
            if let Poll::Ready(Some(gathered)) = this.gathering.poll_next_unpin(cx) {
                match gathered {
                    Some(call) => return Poll::Ready(Some(Ok(call))),
                    None => continue,
                }
            }
            let Some(accepted) = &mut this.accepted else {
                return if this.gathering.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            };
            match accepted.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Accepted {
                    call,
                    complete: true,
                }))) => return Poll::Ready(Some(Ok(call))),
                Poll::Ready(Some(Ok(Accepted { call, .. }))) => {
                    let gather = gather(this.nats.clone(), Arc::clone(&this.function), call);
                    this.gathering.push(gather.boxed());
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => this.accepted = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Reads the rest of `call`'s parameters, up to their end, into its [`Incoming`]; `None`
/// (after answering the caller with an error) when they exceed [`MAX_CALL_BYTES`] or do not
/// end before the call's deadline.
async fn gather(nats: async_nats::Client, function: Arc<str>, call: Call) -> Option<Call> {
    let (cx, results, mut params) = call;
    let deadline = params.deadline.as_ref().map_or_else(
        || tokio::time::Instant::now() + PARAMS_PATIENCE,
        Deadline::instant,
    );
    let timer = tokio::time::sleep_until(deadline);
    let mut timer = pin!(timer);
    let mut total = params.buffer.len();
    let error = loop {
        tokio::select! {
            biased;
            message = params.stream.next() => match message {
                Some(message) if !message.payload.is_empty() => {
                    total = total.saturating_add(message.payload.len());
                    if total > MAX_CALL_BYTES {
                        warn!(function = %function, bytes = total, limit = MAX_CALL_BYTES,
                            "a call's parameters exceed MAX_CALL_BYTES; call dropped");
                        break format!(
                            "the call's parameters exceed {MAX_CALL_BYTES} bytes (MAX_CALL_BYTES); call dropped"
                        );
                    }
                    let units = message.payload.len().div_ceil(GATHER_UNIT).max(1);
                    let Some(room) = u32::try_from(units)
                        .ok()
                        .and_then(|units| GATHER_ROOM.try_acquire_many(units).ok())
                    else {
                        warn!(function = %function, bytes = total, limit = MAX_GATHERING_BYTES,
                            "calls being gathered hold MAX_GATHERING_BYTES; call dropped");
                        break format!(
                            "the provider is gathering {MAX_GATHERING_BYTES} bytes of call parameters already (MAX_GATHERING_BYTES); call dropped"
                        );
                    };
                    match &mut params.room {
                        Some(held) => held.merge(room),
                        None => params.room = Some(room),
                    }
                    params.parts.push_back(message.payload);
                }
                // The end of the parameters (or of the call's route).
                _ => {
                    params.ended = true;
                    return Some((cx, results, params));
                }
            },
            () = &mut timer => {
                warn!(function = %function, bytes = total, patience = ?PARAMS_PATIENCE,
                    "a call's parameters did not end in time; call dropped");
                break format!(
                    "the call's parameters did not end within {} s; call dropped",
                    PARAMS_PATIENCE.as_secs()
                );
            }
        }
    };
    // Unroute the call before answering: the rest of its parameters is dropped as it comes.
    let subject = results.subject.clone();
    drop((params, results));
    let answer = error_result(&error);
    if nats.publish(subject.clone(), answer).await.is_ok() {
        let _ = nats.publish(subject, Bytes::new()).await;
    }
    None
}

/// `result::err(message)` as wRPC encodes it: the case (1), then the string's length (LEB128)
/// and bytes.
fn error_result(message: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(message.len() + 6);
    out.extend_from_slice(&[1]);
    let mut len = message.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.extend_from_slice(&[byte]);
            break;
        }
        out.extend_from_slice(&[byte | 0x80]);
    }
    out.extend_from_slice(message.as_bytes());
    out.freeze()
}

/// A call whose accept may have to be sent again.
struct Pending {
    due: tokio::time::Instant,
    delay: Duration,
    give_up: tokio::time::Instant,
    sent: u32,
    reply: Subject,
    subject: Subject,
    /// Gone with the call (its route and results).
    served: Weak<Served>,
}

/// One task for the whole server that sends accepts again: each call is watched from its
/// accept until its caller's first parameter message arrives, the call ends or
/// [`PARAMS_PATIENCE`] has passed. Every call first waits [`ACCEPT_RESEND_FIRST`], so calls
/// become due in the order they came and wait in a queue; the few sent again wait in a list.
struct Resender {
    calls: tokio::sync::mpsc::UnboundedSender<Pending>,
    _task: OwnedTask,
}

impl Resender {
    fn start(nats: async_nats::Client) -> Self {
        let (calls, mut incoming) = tokio::sync::mpsc::unbounded_channel::<Pending>();
        let task = OwnedTask::spawn(|cancel| async move {
            let mut first: VecDeque<Pending> = VecDeque::new();
            let mut again: Vec<Pending> = Vec::new();
            let timer = tokio::time::sleep(Duration::from_secs(3600));
            tokio::pin!(timer);
            loop {
                let next = first.front().map(|p| p.due).into_iter();
                let next = next.chain(again.iter().map(|p| p.due)).min();
                if let Some(due) = next {
                    if timer.deadline() != due || timer.is_elapsed() {
                        timer.as_mut().reset(due);
                    }
                }
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    () = &mut timer, if next.is_some() => {
                        let now = tokio::time::Instant::now();
                        let mut due = Vec::new();
                        while first.front().is_some_and(|p| p.due <= now) {
                            due.extend(first.pop_front());
                        }
                        let (now_due, later): (Vec<_>, Vec<_>) =
                            again.drain(..).partition(|p| p.due <= now);
                        again = later;
                        due.extend(now_due);
                        for call in due {
                            if let Some(call) = resend(&nats, call, now).await {
                                again.push(call);
                            }
                        }
                    }
                    // After the timer: a steady stream of new calls must not hold back the
                    // ones that are due.
                    call = incoming.recv() => match call {
                        Some(call) => first.push_back(call),
                        None => return,
                    },
                }
            }
        });
        Self { calls, _task: task }
    }

    fn watch(&self, call: Pending) {
        let _ = self.calls.send(call);
    }
}

/// Sends `call`'s accept again if its caller has still sent nothing; returns it to wait for
/// the next time, or `None` when it needs no more watching.
async fn resend(
    nats: &async_nats::Client,
    mut call: Pending,
    now: tokio::time::Instant,
) -> Option<Pending> {
    let served = call.served.upgrade()?;
    if served.params_seen.load(Ordering::Acquire) {
        return None;
    }
    if now >= call.give_up {
        warn!(reply = %call.reply, sent = call.sent,
            "the caller never answered the accept of its call; gave up");
        return None;
    }
    served.accept_resent.store(true, Ordering::Release);
    drop(served);
    call.sent += 1;
    debug!(reply = %call.reply, sent = call.sent, "no parameters yet: accept sent again");
    nats.publish_with_reply(call.reply.clone(), call.subject.clone(), Bytes::new())
        .await
        .ok()?;
    call.delay = (call.delay * 2).min(ACCEPT_RESEND_MAX);
    call.due = now + call.delay;
    Some(call)
}

/// What `wit-bindgen-wrpc`'s generated `serve` returns: per function, its calls, each a future
/// that runs the call and sends its results.
pub type Invocations = Vec<(
    &'static str,
    &'static str,
    Pin<
        Box<
            dyn Stream<
                    Item = anyhow::Result<Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>>,
                > + Send,
        >,
    >,
)>;

/// Runs every call of `invocations` in a task of its own until `shutdown` completes.
pub async fn serve_exports(invocations: Invocations, shutdown: impl Future<Output = ()>) {
    let mut calls = stream::select_all(
        invocations
            .into_iter()
            .map(|(instance, name, calls)| calls.map(move |call| (instance, name, call))),
    );
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            next = calls.next() => match next {
                Some((instance, name, Ok(call))) => {
                    tokio::spawn(async move {
                        if let Err(error) = call.await {
                            warn!(instance, name, error = %format!("{error:#}"), "failed to serve a call");
                        }
                    });
                }
                Some((instance, name, Err(error))) => {
                    warn!(instance, name, error = %format!("{error:#}"), "failed to accept a call");
                }
                // Every subscription ended: the connection is gone for good.
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_result_is_the_err_case_with_a_leb128_length() {
        assert_eq!(&error_result("no")[..], b"\x01\x02no");
        let long = "x".repeat(200);
        let encoded = error_result(&long);
        assert_eq!(&encoded[..3], &[1, 0xc8, 0x01]);
        assert_eq!(&encoded[3..], long.as_bytes());
        assert_eq!(&error_result("")[..], &[1, 0]);
    }
}
