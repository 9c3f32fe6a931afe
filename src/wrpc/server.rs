//! The provider's exports (`wasmcloud:messaging/consumer`, the session API), served on the
//! SDK's lattice connection in place of the SDK's `serve_provider_exports`: each call is
//! registered before it is accepted, so the caller's parameters always find it, and each runs
//! in a task of its own. A caller that missed the accept (the host's 0.29 client can drop it)
//! gets it again, and the results it may have missed with it (see [`accept`]).
//!
//! This module subscribes, accepts and runs the calls; the rest of the server side is
//! [`super::resend`] (the accept sent again), [`super::gather`] (parameters that follow the
//! accept) and the results' [`Confirm`] in [`super::writer`].
//!
//! Calls are independent: one whose parameters fit in its first message (nearly all) is
//! handed on at once; one whose parameters follow its accept is handed on only once they have
//! all arrived, so a caller that stops half-way holds up no other call (see [`Gathering`]).
//! Limits: a call's parameters may be at most
//! [`MAX_CALL_BYTES`](super::gather::MAX_CALL_BYTES) (64 MiB) and must end within
//! [`PARAMS_PATIENCE`] (30 s) of its accept; otherwise the call is dropped and its caller gets
//! an error result.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use async_nats::{Message, Subject};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, Stream, StreamExt as _};
use tracing::warn;
use wasmcloud_provider_sdk::provider::invocation_context;
use wasmcloud_provider_sdk::Context;
use wrpc_transport_nats::{invocation_subject, result_subject};

use super::gather::{complete_inline, Gathering};
use super::mux::Mux;
use super::resend::Resender;
use super::writer::Confirm;
use super::{Deadline, Incoming, Writer};

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
        Ok(Gathering::new(
            accepted.boxed(),
            self.mux.nats.clone(),
            Arc::from(format!("{instance}.{func}")),
        ))
    }
}

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
/// would wait forever. So the accept is sent again, after
/// [`ACCEPT_RESEND_FIRST`](super::resend::ACCEPT_RESEND_FIRST) and then at
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
    resender.watch(reply.clone(), registration.subject.clone(), &served, now);
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
pub(super) type Call = (Option<Context>, Writer, Incoming);

/// A call just accepted, and whether its first message held all its parameters.
pub(super) struct Accepted {
    pub(super) call: Call,
    pub(super) complete: bool,
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
