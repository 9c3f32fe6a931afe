//! Calls from the provider into components (`handle-message`), bounded by their callers'
//! timeouts. A host that does not serve the component answers the call with NATS "no
//! responders", which fails the call at once; dropping a call unregisters it.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use anyhow::{bail, ensure, Context as _};
use async_nats::{HeaderMap, Message, StatusCode, Subject};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;
use wrpc_transport_nats::{invocation_subject, param_subject};

use super::mux::{Mux, Registration};
use super::{Incoming, Writer};

/// One reply inbox for all calls into components, on one NATS connection.
#[derive(Clone)]
pub struct Invoker {
    mux: Arc<Mux>,
    lattice: Arc<str>,
    provider_id: Arc<str>,
}

impl Invoker {
    /// Uses an existing NATS connection.
    pub async fn new(
        nats: async_nats::Client,
        lattice: &str,
        provider_id: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            mux: Mux::new(nats).await?,
            lattice: Arc::from(lattice),
            provider_id: Arc::from(provider_id),
        })
    }

    /// A client for calls into `component`.
    pub fn component(&self, component: &str) -> ComponentClient {
        ComponentClient {
            invoker: self.clone(),
            target: Arc::from(component),
            prefix: Arc::from(format!("{}.{component}", self.lattice)),
        }
    }

    /// Calls not finished (or not yet dropped by their callers).
    pub fn open_calls(&self) -> usize {
        self.mux.open_calls()
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
pub(super) fn headers_len(headers: &HeaderMap) -> usize {
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
        let invoker = &self.invoker;
        let nats = &invoker.mux.nats;
        // Registered before anything is published: no reply can come before its call.
        let (registration, accept, results) = invoker.mux.register();
        let mut headers = cx.unwrap_or_default();
        headers.insert("source-id", &*invoker.provider_id);
        headers.insert("target-id", &*self.target);
        let max_payload = nats
            .server_info()
            .max_payload
            .saturating_sub(registration.subject.len())
            .saturating_sub(headers_len(&headers));
        let inline = params.split_to(max_payload.min(params.len()));
        nats.publish_with_reply_and_headers(
            invocation_subject(&self.prefix, instance, func),
            registration.subject.clone(),
            headers,
            inline,
        )
        .await
        .context("failed to publish the call")?;
        // Like the upstream client: after the accept, the rest of the parameters (if any)
        // and the end of the parameter stream, which a 0.29 server may wait for.
        Ok((
            Outgoing {
                state: OutState::Handshaking {
                    nats: nats.clone(),
                    accept,
                    buffer: BytesMut::from(params),
                },
                _call: Arc::clone(&registration),
            },
            Incoming {
                buffer: Bytes::new(),
                parts: Default::default(),
                ended: false,
                stream: results,
                deadline: None,
                room: None,
                _call: registration,
            },
        ))
    }
}

/// The parameter stream of a call: what did not fit in the first message, sent once the
/// component's host has accepted the call, then the end of the stream.
pub struct Outgoing {
    state: OutState,
    _call: Arc<Registration>,
}

enum OutState {
    Handshaking {
        nats: async_nats::Client,
        accept: oneshot::Receiver<Message>,
        buffer: BytesMut,
    },
    /// Accepted, with parameters left over: they wait [`PAUSE_BEFORE_REST`] (see there).
    Pausing(Option<Writer>, Pin<Box<tokio::time::Sleep>>),
    Sending(Writer),
    /// The call was refused or its accept never came.
    Failed,
}

/// How long the rest of a call's parameters (what did not fit in its first message) waits
/// after the accept. A host on wrpc-transport-nats 0.29 subscribes to a call's parameter
/// stream through a command to its demux task and then publishes the accept; the demux may
/// still route a message that arrives at once before it applies the command, and drop it. A
/// dropped end of stream is harmless (such a server decodes parameters that came whole in the
/// first message without waiting for it), but a dropped part of the parameters would hang the
/// call on the host, so parameters that need more messages (over about 1 MiB) give the demux
/// this head start. Messages that fit in one NATS message never wait.
pub const PAUSE_BEFORE_REST: std::time::Duration = std::time::Duration::from_millis(5);

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

impl AsyncWrite for Outgoing {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().state {
            OutState::Handshaking { buffer, .. } => {
                buffer.extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
            OutState::Pausing(Some(writer), _) | OutState::Sending(writer) => {
                Pin::new(writer).poll_write(cx, buf)
            }
            OutState::Pausing(None, _) | OutState::Failed => {
                Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            // Parameters wait for the accept (and the pause); they go out at shutdown.
            OutState::Handshaking { .. } | OutState::Pausing(..) => Poll::Ready(Ok(())),
            OutState::Sending(writer) => Pin::new(writer).poll_flush(cx),
            OutState::Failed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let OutState::Handshaking {
            nats,
            accept,
            buffer,
        } = &mut this.state
        {
            let accept = ready!(Pin::new(accept).poll(cx))
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
                .and_then(accepted);
            match accept {
                Ok(reply) => {
                    let subject = Subject::from(param_subject(&reply));
                    let rest = std::mem::take(buffer);
                    let pause = !rest.is_empty();
                    let writer = Writer::new(nats.clone(), subject, rest);
                    this.state = if pause {
                        let sleep = Box::pin(tokio::time::sleep(PAUSE_BEFORE_REST));
                        OutState::Pausing(Some(writer), sleep)
                    } else {
                        OutState::Sending(writer)
                    };
                }
                Err(e) => {
                    this.state = OutState::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        if let OutState::Pausing(writer, sleep) = &mut this.state {
            ready!(sleep.as_mut().poll(cx));
            match writer.take() {
                Some(writer) => this.state = OutState::Sending(writer),
                None => this.state = OutState::Failed,
            }
        }
        match &mut this.state {
            OutState::Sending(writer) => Pin::new(writer).poll_shutdown(cx),
            _ => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
}

impl wrpc_transport::Index<Outgoing> for Outgoing {
    fn index(&self, _path: &[usize]) -> anyhow::Result<Outgoing> {
        bail!("async parameter streams are not supported by this client")
    }
}
