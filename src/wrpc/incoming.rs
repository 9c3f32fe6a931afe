//! The incoming byte stream of a call, as the wRPC decoder reads it: the callee's results
//! (client side) or the caller's parameters (server side), from the messages the demux routes
//! to the call.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, Bytes};
use futures::StreamExt as _;
use tokio::io::{AsyncRead, ReadBuf};

use super::mux::{Registration, Stream};
use super::Deadline;

/// An incoming byte stream: what came inline with the call (server side), then the messages
/// routed to the call, up to an empty one (the end of the stream).
pub struct Incoming {
    pub(super) buffer: Bytes,
    /// Server side: parts of a call's parameters already read from `stream` by the server
    /// (see [`super::gather`]), read after `buffer`.
    pub(super) parts: VecDeque<Bytes>,
    /// The end of the stream has been read from `stream` (into `parts`): nothing follows.
    pub(super) ended: bool,
    pub(super) stream: Stream,
    /// Server side: the caller must have sent its whole parameter stream by then (a timer is
    /// made only if the stream has to be waited for).
    pub(super) deadline: Option<Deadline>,
    /// Server side: the share of the gathering budget that `parts` hold (see
    /// [`super::gather`]).
    pub(super) room: Option<tokio::sync::SemaphorePermit<'static>>,
    pub(super) _call: Arc<Registration>,
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

impl wrpc_transport::Index<Incoming> for Incoming {
    fn index(&self, _path: &[usize]) -> anyhow::Result<Incoming> {
        anyhow::bail!("nested async streams are not supported")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use tokio::io::AsyncReadExt as _;

    /// A call whose parameters were gathered reads its first message, then the gathered
    /// parts, then ends, without waiting on its (still open) stream.
    #[tokio::test]
    async fn gathered_parameters_are_read_in_order_and_end_without_the_stream() {
        let (_sender, stream) = mpsc::unbounded();
        let mut incoming = Incoming {
            buffer: Bytes::from_static(b"ab"),
            parts: [Bytes::from_static(b"cd"), Bytes::from_static(b"ef")].into(),
            ended: true,
            stream,
            deadline: None,
            room: None,
            _call: Registration::unrouted("x"),
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
