//! The provider's exports (`wasmcloud:messaging/consumer`, the session API), served on the
//! SDK's lattice connection in place of the SDK's `serve_provider_exports`: each call is
//! registered before it is accepted, so the caller's parameters always find it, and each runs
//! in a task of its own.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;

use anyhow::{ensure, Context as _};
use async_nats::{Message, Subject};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, Stream, StreamExt as _};
use tracing::warn;
use wasmcloud_provider_sdk::provider::invocation_context;
use wasmcloud_provider_sdk::Context;
use wrpc_transport_nats::{invocation_subject, result_subject};

use super::{Incoming, Mux, Writer};

/// Serves functions of the provider under `<lattice>.<provider id>`, as one of a queue group
/// (so several instances of the provider would share the calls).
pub struct Server {
    mux: Arc<Mux>,
    prefix: Arc<str>,
}

impl Server {
    pub async fn new(
        nats: async_nats::Client,
        lattice: &str,
        provider_id: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
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
        let mux = Arc::clone(&self.mux);
        Ok(calls.then(move |call| accept(Arc::clone(&mux), call)))
    }
}

/// Registers a call, then accepts it: the caller sends the rest of its parameters (and their
/// end) to the registered subject, and reads the results from `<its reply>.results`.
async fn accept(
    mux: Arc<Mux>,
    call: Message,
) -> anyhow::Result<(Option<Context>, Writer, Incoming)> {
    let reply = call.reply.context("the call named no reply subject")?;
    let (registration, _, params) = mux.register();
    mux.nats
        .publish_with_reply(reply.clone(), registration.subject.clone(), Bytes::new())
        .await
        .context("failed to accept the call")?;
    let results = Writer::new(
        mux.nats.clone(),
        Subject::from(result_subject(&reply)),
        BytesMut::new(),
    );
    let params = Incoming {
        buffer: call.payload,
        stream: params,
        _call: registration,
    };
    Ok((
        call.headers.as_ref().map(invocation_context),
        results,
        params,
    ))
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
