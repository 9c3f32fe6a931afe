//! The provider's exports (`wasmcloud:messaging/consumer`, the session API), served on the
//! SDK's lattice connection in place of the SDK's `serve_provider_exports`: each call is
//! registered before it is accepted, so the caller's parameters always find it, and each runs
//! in a task of its own. A caller that missed the accept (the host's 0.29 client can drop it)
//! gets it again, and the results it may have missed with it (see [`accept`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use async_nats::{Message, Subject};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, Stream, StreamExt as _};
use futures::FutureExt as _;
use tracing::{debug, warn};
use wasmcloud_provider_sdk::provider::invocation_context;
use wasmcloud_provider_sdk::Context;
use wrpc_transport_nats::{invocation_subject, result_subject};

use super::{Confirm, Deadline, Incoming, Mux, Served, Writer};
use crate::task::OwnedTask;

/// Serves functions of the provider under `<lattice>.<provider id>`, as one of a queue group
/// (so several instances of the provider would share the calls).
pub struct Server {
    mux: Arc<Mux>,
    prefix: Arc<str>,
    resender: Arc<Resender>,
}

impl Server {
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

impl wrpc_transport::Serve for Server {
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
        Ok(calls.then(move |call| accept(Arc::clone(&mux), Arc::clone(&resender), call)))
    }
}

/// The first re-send of an accept whose caller has sent nothing back; each later one waits
/// twice as long, up to [`ACCEPT_RESEND_MAX`].
pub const ACCEPT_RESEND_FIRST: Duration = Duration::from_millis(20);
pub const ACCEPT_RESEND_MAX: Duration = Duration::from_secs(1);
/// How long a call waits for its caller's parameters and their end. After that the call is
/// dropped (no results are sent) and its function goes on with later calls.
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
async fn accept(
    mux: Arc<Mux>,
    resender: Arc<Resender>,
    call: Message,
) -> anyhow::Result<(Option<Context>, Writer, Incoming)> {
    let reply = call.reply.context("the call named no reply subject")?;
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
    results.confirm = Some(Box::new(Confirm {
        served,
        ended: ended.fuse(),
        deadline: Deadline::at(deadline),
        sent: Vec::new(),
        replayed: 0,
        _call: Arc::clone(&registration),
    }));
    let params = Incoming {
        buffer: call.payload,
        stream: params,
        deadline: Some(Deadline::at(deadline)),
        _call: registration,
    };
    Ok((
        call.headers.as_ref().map(invocation_context),
        results,
        params,
    ))
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
