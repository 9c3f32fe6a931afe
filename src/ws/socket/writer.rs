//! The writer of [`serve`]: frames from the bounded outbound queue. It feeds every frame that is
//! ready (up to [`WRITE_BATCH`]) and flushes once, then acknowledges each frame; between writes
//! it sends keepalive pings. Every write step (ping, feed, flush) is bounded by ping interval +
//! pong timeout when pings are on (see the `liveness` module).
//!
//! Oversize frames. tungstenite refuses a frame that does not fit its write buffer
//! (`max_write_buffer_size`, see [`ws_config`]). A frame larger than the whole buffer fails
//! alone: its acknowledgement gets an error naming both sizes, the socket stays up and the
//! frames after it are written. A frame that only did not fit behind buffered data is tried once
//! more after a flush.
//!
//! [`serve`]: super::serve
//! [`ws_config`]: super::ws_config

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

use super::liveness::{dead_after, ticker, Liveness};
use super::{Ack, Closed, FrameSink, Keepalive, Outbound, CLOSE_GRACE};

/// How many ready frames the writer feeds before it flushes.
pub(super) const WRITE_BATCH: usize = 64;

/// Why one frame was not written.
enum WriteError {
    /// The socket is unusable (write failed, or made no progress in time).
    Socket(String),
    /// Only this frame: it does not fit the write buffer.
    Frame(String),
}

/// Runs one write step, bounded by `bound` when there is one.
async fn bounded<F>(bound: Option<Duration>, what: &str, step: F) -> Result<(), WriteError>
where
    F: Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
{
    let result = match bound {
        Some(bound) => match tokio::time::timeout(bound, step).await {
            Ok(result) => result,
            Err(_) => {
                return Err(WriteError::Socket(format!(
                    "{what} made no progress for {} s: the peer is not reading",
                    bound.as_secs()
                )))
            }
        },
        None => step.await,
    };
    result.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::WriteBufferFull(_) => {
            WriteError::Frame("write buffer full".to_string())
        }
        e => WriteError::Socket(format!("{what} failed: {e}")),
    })
}

/// Hands one frame to tungstenite's write buffer. A split sink only stores the frame in its
/// slot on `feed`; `poll_ready` passes it on, which is where tungstenite refuses a frame that
/// does not fit (`WriteBufferFull`): so the error is this frame's, not the next one's.
async fn push<W>(
    writer: &mut W,
    message: Message,
    bound: Option<Duration>,
) -> Result<(), WriteError>
where
    W: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    bounded(bound, "write", async {
        writer.feed(message).await?;
        futures::future::poll_fn(|cx| writer.poll_ready_unpin(cx)).await
    })
    .await
}

/// Feeds one frame. tungstenite refuses a frame when it and what is buffered exceed
/// `max_write_buffer`: then the buffer is written out and the frame tried once more; a frame
/// that does not fit an empty buffer fails alone (`WriteError::Frame`), the socket stays.
async fn feed_one<W>(
    writer: &mut W,
    message: Message,
    bound: Option<Duration>,
    max_write_buffer: usize,
) -> Result<(), WriteError>
where
    W: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let len = message.len();
    let too_big = || {
        WriteError::Frame(format!(
            "a frame of {len} bytes does not fit the socket's write buffer of \
             {max_write_buffer} bytes (the larger of 4 x MAX_MESSAGE_BYTES and 1 MiB); not sent"
        ))
    };
    if len > max_write_buffer {
        return Err(too_big());
    }
    let retry = message.clone();
    match push(writer, message, bound).await {
        Err(WriteError::Frame(_)) => {}
        done => return done,
    }
    bounded(bound, "flush", writer.flush()).await?;
    match push(writer, retry, bound).await {
        Err(WriteError::Frame(_)) => Err(too_big()),
        done => done,
    }
}

/// Writes queued frames: feeds every frame that is ready, flushes once, then acknowledges each
/// frame (with its own error if it alone failed, or the socket's). Every write step (ping,
/// feed, flush) is bounded by ping interval + pong timeout when pings are on: a step that takes
/// longer means the peer is not reading, and the socket ends.
/// After a close frame (a component closing the session) it gives the peer `CLOSE_GRACE` to
/// answer, then ends, so a peer that never answers cannot hold the connection open.
/// Between writes it sends keepalive pings; the watchdog decides when the peer is dead.
pub(super) async fn write_loop<W, S>(
    writer: &mut W,
    outbound: &mut mpsc::Receiver<Box<Outbound>>,
    keepalive: Keepalive,
    liveness: &Liveness,
    sink: &S,
    max_write_buffer: usize,
) -> Closed
where
    W: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    S: FrameSink,
{
    let mut writer = Writer {
        writer,
        sink,
        liveness,
        bound: dead_after(keepalive),
        max_write_buffer,
        acks: Vec::with_capacity(WRITE_BATCH),
    };
    let mut pings = keepalive.ping_interval.and_then(ticker);
    loop {
        let next = match pings.as_mut() {
            Some(pings) => tokio::select! {
                item = outbound.recv() => Some(item),
                _ = pings.tick() => None,
            },
            None => Some(outbound.recv().await),
        };
        let first = match next {
            Some(Some(first)) => first,
            Some(None) => return Closed::abnormal("send queue closed".to_string()),
            None => {
                if let Err(e) = writer.ping().await {
                    return Closed::abnormal(e);
                }
                continue;
            }
        };
        let batch = writer.feed_batch(first, outbound).await;
        if let Some(closed) = writer.finish(batch).await {
            return closed;
        }
    }
}

/// The writer's side of one socket, for its whole life.
struct Writer<'a, W, S> {
    writer: &'a mut W,
    sink: &'a S,
    liveness: &'a Liveness,
    /// The bound of every write step (see [`dead_after`]).
    bound: Option<Duration>,
    max_write_buffer: usize,
    /// Each frame's acknowledgement, with the frame's own error if it alone failed.
    acks: Vec<(Option<Ack>, Option<String>)>,
}

/// One batch of frames fed: the data frames and their bytes, the code of a close frame among
/// them, and the socket's error if a write failed.
#[derive(Default)]
struct Batch {
    frames: u64,
    bytes: u64,
    closed: Option<u16>,
    failed: Option<String>,
}

impl<W, S> Writer<'_, W, S>
where
    W: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    S: FrameSink,
{
    /// Sends a keepalive ping; the error is the socket's.
    async fn ping(&mut self) -> Result<(), String> {
        let ping = bounded(
            self.bound,
            "ping",
            self.writer.send(Message::Ping(Bytes::new())),
        );
        match ping.await {
            Err(WriteError::Socket(e) | WriteError::Frame(e)) => Err(e),
            Ok(()) => Ok(()),
        }
    }

    /// Feeds `first` and the frames ready behind it, up to [`WRITE_BATCH`] or a close frame;
    /// stops at the first write that leaves the socket unusable.
    async fn feed_batch(
        &mut self,
        first: Box<Outbound>,
        outbound: &mut mpsc::Receiver<Box<Outbound>>,
    ) -> Batch {
        let mut batch = Batch::default();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let Outbound { message, ack } = *item;
            let data = message.is_text() || message.is_binary();
            let len = message.len() as u64;
            if let Message::Close(frame) = &message {
                batch.closed = Some(frame.as_ref().map_or(1000, |f| u16::from(f.code)));
            }
            match feed_one(self.writer, message, self.bound, self.max_write_buffer).await {
                Ok(()) => {
                    if data {
                        batch.frames += 1;
                        batch.bytes += len;
                    }
                    self.acks.push((ack, None));
                }
                Err(WriteError::Frame(e)) => {
                    debug!(error = %e, "frame not written");
                    self.acks.push((ack, Some(e)));
                }
                Err(WriteError::Socket(e)) => {
                    self.acks.push((ack, None));
                    batch.failed = Some(e);
                    break;
                }
            }
            if self.acks.len() < WRITE_BATCH && batch.closed.is_none() {
                next = outbound.try_recv().ok();
            }
        }
        batch
    }

    /// Flushes a fed batch and acknowledges its frames; returns how the socket ended when the
    /// batch ended it (a failed write, or a close frame after [`CLOSE_GRACE`]).
    async fn finish(&mut self, mut batch: Batch) -> Option<Closed> {
        if batch.failed.is_none() {
            if let Err(WriteError::Socket(e) | WriteError::Frame(e)) =
                bounded(self.bound, "flush", self.writer.flush()).await
            {
                batch.failed = Some(e);
            }
        }
        if batch.failed.is_none() && batch.frames > 0 {
            self.sink.written(batch.frames, batch.bytes);
            self.liveness.wrote_data();
        }
        for (ack, own) in self.acks.drain(..) {
            let result = match (own, &batch.failed) {
                (Some(own), _) => Err(own),
                (None, Some(failed)) => Err(failed.clone()),
                (None, None) => Ok(()),
            };
            if let Some(ack) = ack {
                let _ = ack.send(result);
            }
        }
        if let Some(e) = batch.failed {
            return Some(Closed::abnormal(e));
        }
        let code = batch.closed?;
        tokio::time::sleep(CLOSE_GRACE).await;
        Some(Closed {
            code,
            reason: format!("closed by the component with code {code}"),
        })
    }
}
