//! Calls from the provider into components: a wRPC-over-NATS client that cannot lose a reply.
//!
//! The SDK's client is `wrpc-transport-nats` 0.29, which routes every reply through one demux
//! task that learns about each new call through a channel. Its unbiased `select!` can take the
//! reply off the wire before the call's registration and drop it; the call then hangs until a
//! timeout (fixed upstream only in 0.31, which the SDK cannot use). This client speaks the same
//! wire protocol but registers a call in a shared map *before* it publishes the call, so every
//! reply finds its call. It has its own NATS connection, so calls into components do not queue
//! behind the SDK's traffic, and it serves only what `handle-message` needs: parameters and
//! results without nested async streams.
//!
//! The client side of wRPC 0.0.1 over NATS, as spoken here:
//! 1. the parameters go to `<lattice>.<component>.wrpc.0.0.1.<instance>.<function>` with the
//!    reply subject `<inbox>.<n>` (what does not fit in one NATS message waits for step 3);
//! 2. the component's host accepts on `<inbox>.<n>`, naming its own subject `S` as reply;
//! 3. the rest of the parameters, then an empty end-of-stream message, go to `S.params`;
//! 4. the results arrive on `<inbox>.<n>.results`, ended by an empty message.
//!
//! A host that does not serve the component answers step 1 with NATS "no responders", which
//! fails the call at once. The caller bounds every call with its own timeout; dropping a call
//! unregisters it.

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use anyhow::{bail, ensure, Context as _};
use async_nats::{HeaderMap, Message, StatusCode, Subject};
use bytes::{Buf as _, Bytes, BytesMut};
use futures::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;
use wrpc_transport_nats::{invocation_subject, param_subject};

use crate::task::OwnedTask;

/// The open calls of one [`Invoker`], by call number.
type Calls = Arc<Mutex<HashMap<u64, Call>>>;

/// Where the demux task puts the messages of one call.
struct Call {
    accept: mpsc::UnboundedSender<Message>,
    results: mpsc::UnboundedSender<Message>,
}

fn lock(calls: &Calls) -> std::sync::MutexGuard<'_, HashMap<u64, Call>> {
    // The map stays consistent across a panic elsewhere; never poison every later call.
    calls.lock().unwrap_or_else(|e| e.into_inner())
}

/// One NATS connection and reply inbox for all calls into components.
#[derive(Clone)]
pub struct Invoker {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    inbox: String,
    lattice: String,
    provider_id: String,
    next: AtomicU64,
    calls: Calls,
    _demux: OwnedTask,
}

impl Invoker {
    /// Connects with the host's lattice settings (URL and, when set, JWT and seed).
    pub async fn connect(
        url: &str,
        jwt: &str,
        seed: &str,
        lattice: &str,
        provider_id: &str,
    ) -> anyhow::Result<Self> {
        let options = match (jwt.trim(), seed.trim()) {
            ("", "") => async_nats::ConnectOptions::new(),
            (jwt, seed) => {
                let key = Arc::new(
                    nkeys::KeyPair::from_seed(seed).context("the lattice RPC seed is invalid")?,
                );
                async_nats::ConnectOptions::with_jwt(jwt.to_string(), move |nonce| {
                    let key = Arc::clone(&key);
                    async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
                })
            }
        };
        let url = if url.is_empty() {
            "nats://127.0.0.1:4222"
        } else {
            url
        };
        let nats = options
            .name(format!("{provider_id} component calls"))
            .connect(url)
            .await
            .with_context(|| format!("failed to connect to NATS at {url}"))?;
        Self::new(nats, lattice, provider_id).await
    }

    /// Uses an existing NATS connection.
    pub async fn new(
        nats: async_nats::Client,
        lattice: &str,
        provider_id: &str,
    ) -> anyhow::Result<Self> {
        let inbox = nats.new_inbox();
        let replies = nats
            .subscribe(format!("{inbox}.>"))
            .await
            .context("failed to subscribe to the reply inbox")?;
        let calls = Calls::default();
        let demux = OwnedTask::spawn({
            let calls = Arc::clone(&calls);
            let prefix = format!("{inbox}.");
            |cancel| async move {
                let mut replies = replies;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        message = replies.next() => match message {
                            Some(message) => route(&calls, &prefix, message),
                            None => return,
                        },
                    }
                }
            }
        });
        Ok(Self {
            inner: Arc::new(Inner {
                nats,
                inbox,
                lattice: lattice.to_string(),
                provider_id: provider_id.to_string(),
                next: AtomicU64::new(0),
                calls,
                _demux: demux,
            }),
        })
    }

    /// A client for calls into `component`.
    pub fn component(&self, component: &str) -> ComponentClient {
        ComponentClient {
            invoker: self.clone(),
            target: Arc::from(component),
            prefix: Arc::from(format!("{}.{component}", self.inner.lattice)),
        }
    }

    /// Calls not finished (or not yet dropped by their callers).
    pub fn open_calls(&self) -> usize {
        lock(&self.inner.calls).len()
    }
}

/// Hands one reply to its call: `<inbox>.<n>` is the accept, `<inbox>.<n>.results` a result.
fn route(calls: &Calls, prefix: &str, message: Message) {
    let Some(rest) = message.subject.as_str().strip_prefix(prefix) else {
        return;
    };
    let (id, results) = match rest.split_once('.') {
        None => (rest, false),
        Some((id, "results")) => (id, true),
        Some(_) => {
            debug!(subject = %message.subject, "reply on an unknown subject; dropped");
            return;
        }
    };
    let Ok(id) = id.parse::<u64>() else {
        return;
    };
    let calls = lock(calls);
    let Some(call) = calls.get(&id) else {
        debug!(call = id, "reply for a call that has ended; dropped");
        return;
    };
    let channel = if results { &call.results } else { &call.accept };
    let _ = channel.send(message);
}

/// Removes a call from the map once both its halves are dropped.
struct Registration {
    id: u64,
    calls: Calls,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.calls).remove(&self.id);
    }
}

/// Calls into one component; cheap to clone.
#[derive(Clone)]
pub struct ComponentClient {
    invoker: Invoker,
    target: Arc<str>,
    prefix: Arc<str>,
}

/// The bytes NATS adds for `headers` in a message (counted against its maximum payload).
fn headers_len(headers: &HeaderMap) -> usize {
    let mut len = b"NATS/1.0\r\n\r\n".len();
    for (key, values) in headers.iter() {
        let key: &[u8] = key.as_ref();
        for value in values {
            len += key.len() + b": \r\n".len() + value.as_str().len();
        }
    }
    len
}

impl wrpc_transport::Invoke for ComponentClient {
    type Context = Option<HeaderMap>;
    type Outgoing = Outgoing;
    type Incoming = Incoming;

    async fn invoke<P: AsRef<[Option<usize>]> + Send + Sync>(
        &self,
        cx: Self::Context,
        instance: &str,
        func: &str,
        mut params: Bytes,
        paths: impl AsRef<[P]> + Send,
    ) -> anyhow::Result<(Self::Outgoing, Self::Incoming)> {
        ensure!(
            paths.as_ref().is_empty(),
            "calls with async result streams are not supported by this client"
        );
        let inner = &self.invoker.inner;
        let id = inner.next.fetch_add(1, Ordering::Relaxed);
        let (accept_tx, accept) = mpsc::unbounded_channel();
        let (results_tx, results) = mpsc::unbounded_channel();
        // Registered before anything is published: no reply can come before its call.
        lock(&inner.calls).insert(
            id,
            Call {
                accept: accept_tx,
                results: results_tx,
            },
        );
        let registration = Arc::new(Registration {
            id,
            calls: Arc::clone(&inner.calls),
        });

        let mut headers = cx.unwrap_or_default();
        headers.insert("source-id", inner.provider_id.as_str());
        headers.insert("target-id", &*self.target);
        let reply = format!("{}.{id}", inner.inbox);
        let max_payload = inner
            .nats
            .server_info()
            .max_payload
            .saturating_sub(reply.len())
            .saturating_sub(headers_len(&headers));
        let inline = params.split_to(max_payload.min(params.len()));
        inner
            .nats
            .publish_with_reply_and_headers(
                invocation_subject(&self.prefix, instance, func),
                Subject::from(reply),
                headers,
                inline,
            )
            .await
            .context("failed to publish the call")?;
        // Like the upstream client: after the accept, the rest of the parameters (if any)
        // and the end of the parameter stream, which a 0.29 server may wait for.
        let state = OutState::Handshaking {
            accept,
            buffer: BytesMut::from(params),
        };
        Ok((
            Outgoing {
                nats: inner.nats.clone(),
                state,
                _call: Arc::clone(&registration),
            },
            Incoming {
                results,
                buffer: Bytes::new(),
                _call: registration,
            },
        ))
    }
}

/// The parameter stream of a call: what did not fit in the first message, sent once the
/// component's host has accepted the call (at shutdown).
pub struct Outgoing {
    nats: async_nats::Client,
    state: OutState,
    _call: Arc<Registration>,
}

enum OutState {
    Handshaking {
        accept: mpsc::UnboundedReceiver<Message>,
        buffer: BytesMut,
    },
    Sending(JoinHandle<io::Result<()>>),
    Done,
}

/// The accept's reply subject, or why the call was refused.
fn accepted(message: Message) -> io::Result<Subject> {
    match message.status {
        Some(StatusCode::NO_RESPONDERS) => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "no host serves the component (NATS no responders)",
        )),
        Some(code) if !code.is_success() => Err(io::Error::other(format!(
            "the call was refused with NATS status {code}"
        ))),
        _ => message.reply.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the accept named no reply subject",
            )
        }),
    }
}

/// Sends the rest of the parameters in messages NATS accepts, then the end of the stream.
async fn send_params(
    nats: async_nats::Client,
    subject: Subject,
    mut rest: Bytes,
) -> io::Result<()> {
    let chunk = nats.server_info().max_payload.max(1);
    while !rest.is_empty() {
        let part = rest.split_to(chunk.min(rest.len()));
        nats.publish(subject.clone(), part)
            .await
            .map_err(io::Error::other)?;
    }
    nats.publish(subject, Bytes::new())
        .await
        .map_err(io::Error::other)
}

impl AsyncWrite for Outgoing {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().state {
            OutState::Handshaking { buffer, .. } => {
                buffer.extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
            _ => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                OutState::Handshaking { accept, buffer } => {
                    let Some(message) = ready!(accept.poll_recv(cx)) else {
                        return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                    };
                    let subject = Subject::from(param_subject(&accepted(message)?));
                    let rest = std::mem::take(buffer).freeze();
                    this.state = OutState::Sending(tokio::spawn(send_params(
                        this.nats.clone(),
                        subject,
                        rest,
                    )));
                }
                OutState::Sending(task) => {
                    let result = ready!(Pin::new(task).poll(cx))
                        .unwrap_or_else(|e| Err(io::Error::other(e)));
                    this.state = OutState::Done;
                    return Poll::Ready(result);
                }
                OutState::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl wrpc_transport::Index<Outgoing> for Outgoing {
    fn index(&self, _path: &[usize]) -> anyhow::Result<Outgoing> {
        bail!("async parameter streams are not supported by this client")
    }
}

/// The result stream of a call.
pub struct Incoming {
    results: mpsc::UnboundedReceiver<Message>,
    buffer: Bytes,
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
            match ready!(this.results.poll_recv(cx)) {
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

impl wrpc_transport::Index<Incoming> for Incoming {
    fn index(&self, _path: &[usize]) -> anyhow::Result<Incoming> {
        bail!("async result streams are not supported by this client")
    }
}
