//! The life of one open WebSocket, client or server side: read and write concurrently until the
//! socket drops or the owner cancels.
//!
//! Inbound text and binary frames go to a [`FrameSink`] in order; the next frame is read once
//! the sink is done with the last (that wait is the backpressure of a slow component). Outbound
//! frames come from a bounded queue; the writer feeds every frame that is ready and flushes
//! once, then acknowledges each frame. Cancelling sends a close frame; a peer's close frame is
//! answered (tungstenite queues the reply, flushed within [`CLOSE_GRACE`]) before the socket is
//! dropped. Nothing here knows about wasmCloud.
//!
//! Liveness. Three concurrent parts of [`serve`] share the `Liveness` atomics:
//! - the reader records when the peer was last heard (any frame, pongs included) and when a data
//!   frame last came in;
//! - the writer sends a ping every `PING_INTERVAL` when it can, and records when a data frame
//!   last went out; each of its write steps (ping, feed, flush) is bounded by ping interval +
//!   pong timeout when pings are on: a step that long without completing means the peer is not
//!   reading, and the socket ends;
//! - a watchdog (its own branch of `serve`'s select, so it fires while a write is blocked)
//!   ends the socket when the peer was silent for ping interval + pong timeout (dead, 1006), or
//!   no data frame went either way for the idle timeout (1001).
//!
//! Blame. While the reader waits for the sink, the socket is not read, so the peer's pongs and
//! frames wait in TCP: that silence is the component's doing, not the peer's. The watchdog
//! suspends both checks while the reader waits in [`FrameSink::frame`], and when the call
//! returns the peer counts as just seen (and the socket as just active). Reading stays paused:
//! only the blame changes.
//!
//! Oversize frames. tungstenite refuses a frame that does not fit its write buffer
//! (`max_write_buffer_size`, see [`ws_config`]). A frame larger than the whole buffer fails
//! alone: its acknowledgement gets an error naming both sizes, the socket stays up and the
//! frames after it are written. A frame that only did not fit behind buffered data is tried once
//! more after a flush.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Keepalive settings of one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    /// Send a ping this often; `None` sends none.
    pub ping_interval: Option<Duration>,
    /// A peer silent for `ping_interval + pong_timeout` (no pong, no frame) is dead.
    pub pong_timeout: Duration,
    /// Close (1001) a socket that carried no data frame for this long; `None` never does.
    pub idle_timeout: Option<Duration>,
}

/// How many ready frames the writer feeds before it flushes.
const WRITE_BATCH: usize = 64;
/// How long a close handshake may take.
pub const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// A frame to write, with an optional acknowledgement sent once it was flushed (or failed).
/// Queues hold it boxed: a tokio channel allocates room for 32 items up front, and an idle
/// session should pay for 32 pointers, not 32 frames.
#[derive(Debug)]
pub struct Outbound {
    pub message: Message,
    pub ack: Option<Ack>,
}

/// Tells the writer of a frame how its write ended.
pub type Ack = oneshot::Sender<Result<(), String>>;

/// Where inbound data frames go.
pub trait FrameSink: Send + Sync + 'static {
    /// Handles one text (`text == true`) or binary frame. The next frame is read after this ends.
    fn frame(&self, payload: Bytes, text: bool) -> impl Future<Output = ()> + Send;

    /// Resolves when the owner wants the socket dropped (a slow consumer); never by default.
    fn kicked(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// The socket is open (called before the first read).
    fn connected(&self) {}

    /// The socket is done (called once, after the last read and write).
    fn disconnected(&self) {}

    /// `frames` data frames with `bytes` of payload were written and flushed.
    fn written(&self, _frames: u64, _bytes: u64) {}

    /// A client connection came back after a drop.
    fn reconnected(&self) {}
}

/// The connection state that the owner can watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected { since: SystemTime },
    Disconnected { error: String },
}

/// The WebSocket settings of every socket: a small read buffer (memory per idle session), a
/// write buffer that batches frames until the flush, and size limits enforced while reading.
pub fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(max_message_bytes.saturating_mul(4).max(1 << 20))
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// How a socket ended: the close code (the peer's, ours, or 1006 when it just dropped) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Closed {
    fn abnormal(reason: String) -> Self {
        Self { code: 1006, reason }
    }
}

/// When the socket last heard anything, and last carried data (either way), in ms since it
/// opened; and whether the reader is waiting for the sink, when the peer is not to blame.
struct Liveness {
    opened: Instant,
    last_seen: AtomicU64,
    last_data: AtomicU64,
    delivering: AtomicBool,
}

impl Liveness {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_seen: AtomicU64::new(0),
            last_data: AtomicU64::new(0),
            delivering: AtomicBool::new(false),
        }
    }
    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn seen(&self, data: bool) {
        let now = self.now();
        self.last_seen.store(now, Ordering::SeqCst);
        if data {
            self.last_data.store(now, Ordering::SeqCst);
        }
    }
    /// A data frame was written to the peer.
    fn wrote_data(&self) {
        self.last_data.store(self.now(), Ordering::SeqCst);
    }
    fn silent_for(&self, last: &AtomicU64) -> Duration {
        Duration::from_millis(self.now().saturating_sub(last.load(Ordering::SeqCst)))
    }
    /// Runs the sink's `frame` with the peer out of blame: while the reader waits here the
    /// socket is not read, so pongs and frames queue up in TCP through no fault of the peer.
    /// When it returns the peer counts as just seen (it was: its frame is what we delivered).
    async fn delivering<F: Future<Output = ()>>(&self, frame: F) {
        self.delivering.store(true, Ordering::SeqCst);
        frame.await;
        self.seen(true);
        self.delivering.store(false, Ordering::SeqCst);
    }
    fn is_delivering(&self) -> bool {
        self.delivering.load(Ordering::SeqCst)
    }
}

/// Tells the sink the socket is done, on every way out of [`serve`].
struct OpenGuard<'a, S: FrameSink>(&'a S);

impl<S: FrameSink> Drop for OpenGuard<'_, S> {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

pub enum End {
    /// The owner cancelled; a close frame with the given code was sent.
    Cancelled,
    Dropped(Closed),
}

/// Serves one open socket until it drops (`End::Dropped`) or `cancel` fires (`End::Cancelled`,
/// after sending a close frame with `cancel_code`).
pub async fn serve<S, T>(
    ws: WebSocketStream<T>,
    sink: &S,
    outbound: &mut mpsc::Receiver<Box<Outbound>>,
    cancel: &CancellationToken,
    cancel_code: CloseCode,
    keepalive: Keepalive,
) -> End
where
    S: FrameSink,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let max_write_buffer = ws.get_config().max_write_buffer_size;
    let (mut writer, mut reader) = ws.split();
    sink.connected();
    let _open = OpenGuard(sink);
    let liveness = Liveness::new();
    // Ends with how the socket ended, and whether the peer sent a close frame (to be answered).
    let read = async {
        while let Some(next) = reader.next().await {
            liveness.seen(matches!(next, Ok(Message::Text(_) | Message::Binary(_))));
            match next {
                Ok(Message::Text(text)) => {
                    liveness
                        .delivering(sink.frame(Bytes::from(text), true))
                        .await;
                }
                Ok(Message::Binary(data)) => liveness.delivering(sink.frame(data, false)).await,
                Ok(Message::Close(frame)) => {
                    let closed = match frame {
                        Some(f) => Closed {
                            code: u16::from(f.code),
                            reason: format!(
                                "peer closed with code {} {:?}",
                                u16::from(f.code),
                                f.reason.as_str()
                            ),
                        },
                        None => Closed {
                            code: 1005,
                            reason: "peer closed".to_string(),
                        },
                    };
                    return (closed, true);
                }
                Ok(_) => {}
                Err(tokio_tungstenite::tungstenite::Error::Capacity(e)) => {
                    return (
                        Closed {
                            code: 1009,
                            reason: format!("message too big: {e}"),
                        },
                        false,
                    )
                }
                Err(e) => return (Closed::abnormal(format!("read failed: {e}")), false),
            }
        }
        (Closed::abnormal("connection closed".to_string()), false)
    };
    let write = write_loop(
        &mut writer,
        outbound,
        keepalive,
        &liveness,
        sink,
        max_write_buffer,
    );
    let result = tokio::select! {
        () = cancel.cancelled() => None,
        () = sink.kicked() => Some((Closed {
            code: 1008,
            reason: "slow consumer: the peer did not read its messages".to_string(),
        }, false)),
        reason = read => Some(reason),
        reason = write => Some((reason, false)),
        reason = watchdog(keepalive, &liveness) => Some((reason, false)),
    };
    match result {
        Some((closed, true)) => {
            // tungstenite queued the reply to the peer's close; write it out (with anything
            // still buffered) before the socket is dropped, so the peer sees a clean close.
            // A write cut short above may leave a frame in the split sink's slot, whose flush
            // then fails once; the second flush sends the reply.
            let reply = async {
                for _ in 0..2 {
                    if writer.flush().await.is_ok() {
                        return;
                    }
                }
            };
            if tokio::time::timeout(CLOSE_GRACE, reply).await.is_err() {
                debug!("close reply could not be written in time");
            }
            End::Dropped(closed)
        }
        Some((closed, _)) if matches!(closed.code, 1009 | 1001) => {
            // Tell the peer why: an oversize message (never buffered whole) or an idle socket.
            let close = Message::Close(Some(CloseFrame {
                code: CloseCode::from(closed.code),
                reason: if closed.code == 1009 {
                    "message too big"
                } else {
                    "idle timeout"
                }
                .into(),
            }));
            let _ = tokio::time::timeout(CLOSE_GRACE, writer.send(close)).await;
            End::Dropped(closed)
        }
        Some((closed, _)) => End::Dropped(closed),
        None => {
            let close = Message::Close(Some(CloseFrame {
                code: cancel_code,
                reason: "closed by the provider".into(),
            }));
            if tokio::time::timeout(CLOSE_GRACE, writer.send(close))
                .await
                .is_err()
            {
                debug!("close frame could not be written in time");
            }
            End::Cancelled
        }
    }
}

/// How long the peer may stay silent (no pong, no frame) before it counts as dead, and how long
/// one write may make no progress: ping interval + pong timeout, when pings are on.
fn dead_after(keepalive: Keepalive) -> Option<Duration> {
    keepalive
        .ping_interval
        .map(|interval| interval.saturating_add(keepalive.pong_timeout))
}

/// A tokio interval that first fires after `every`, and after a late tick waits a full `every`
/// again; `None` when `every` is too far off to schedule.
fn ticker(every: Duration) -> Option<tokio::time::Interval> {
    let start = tokio::time::Instant::now().checked_add(every)?;
    let mut ticker = tokio::time::interval_at(start, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(ticker)
}

/// Ends the socket when the peer is dead (silent for ping interval + pong timeout) or idle (no
/// data frame either way for the idle timeout). It only reads the [`Liveness`] atomics, so it
/// fires while a write is blocked; while the reader waits for the sink it blames nobody.
async fn watchdog(keepalive: Keepalive, liveness: &Liveness) -> Closed {
    let dead_after = dead_after(keepalive);
    let every = [keepalive.ping_interval, keepalive.idle_timeout]
        .into_iter()
        .flatten()
        .min()
        .map(|d| d.clamp(Duration::from_millis(50), Duration::from_secs(1)));
    let Some(mut ticker) = every.and_then(ticker) else {
        return std::future::pending().await;
    };
    loop {
        ticker.tick().await;
        if liveness.is_delivering() {
            continue;
        }
        if let Some(dead_after) = dead_after {
            if liveness.silent_for(&liveness.last_seen) > dead_after {
                return Closed::abnormal(format!(
                    "peer did not answer pings for {} s",
                    dead_after.as_secs()
                ));
            }
        }
        if let Some(idle) = keepalive.idle_timeout {
            if liveness.silent_for(&liveness.last_data) > idle {
                return Closed {
                    code: 1001,
                    reason: format!("idle for {} s", idle.as_secs()),
                };
            }
        }
    }
}

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
/// Between writes it sends keepalive pings; the [`watchdog`] decides when the peer is dead.
async fn write_loop<W, S>(
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
    let bound = dead_after(keepalive);
    // Each frame's acknowledgement, with the frame's own error if it alone failed.
    let mut acks: Vec<(Option<Ack>, Option<String>)> = Vec::with_capacity(WRITE_BATCH);
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
                let ping = bounded(bound, "ping", writer.send(Message::Ping(Bytes::new())));
                if let Err(WriteError::Socket(e) | WriteError::Frame(e)) = ping.await {
                    return Closed::abnormal(e);
                }
                continue;
            }
        };
        let mut next = Some(first);
        let mut failed = None;
        let mut closed = None;
        let (mut frames, mut bytes) = (0u64, 0u64);
        while let Some(item) = next.take() {
            let Outbound { message, ack } = *item;
            let data = message.is_text() || message.is_binary();
            let len = message.len() as u64;
            if let Message::Close(frame) = &message {
                closed = Some(frame.as_ref().map_or(1000, |f| u16::from(f.code)));
            }
            match feed_one(writer, message, bound, max_write_buffer).await {
                Ok(()) => {
                    if data {
                        frames += 1;
                        bytes += len;
                    }
                    acks.push((ack, None));
                }
                Err(WriteError::Frame(e)) => {
                    debug!(error = %e, "frame not written");
                    acks.push((ack, Some(e)));
                }
                Err(WriteError::Socket(e)) => {
                    acks.push((ack, None));
                    failed = Some(e);
                    break;
                }
            }
            if acks.len() < WRITE_BATCH && closed.is_none() {
                next = outbound.try_recv().ok();
            }
        }
        if failed.is_none() {
            if let Err(WriteError::Socket(e) | WriteError::Frame(e)) =
                bounded(bound, "flush", writer.flush()).await
            {
                failed = Some(e);
            }
        }
        if failed.is_none() && frames > 0 {
            sink.written(frames, bytes);
            liveness.wrote_data();
        }
        for (ack, own) in acks.drain(..) {
            let result = match (own, &failed) {
                (Some(own), _) => Err(own),
                (None, Some(failed)) => Err(failed.clone()),
                (None, None) => Ok(()),
            };
            if let Some(ack) = ack {
                let _ = ack.send(result);
            }
        }
        if let Some(e) = failed {
            return Closed::abnormal(e);
        }
        if let Some(code) = closed {
            tokio::time::sleep(CLOSE_GRACE).await;
            return Closed {
                code,
                reason: format!("closed by the component with code {code}"),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    //! The socket loop against an in-memory peer (a duplex pipe with a small buffer, so a peer
    //! that does not read blocks the writer as a full TCP window would).
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// Delivers nothing anywhere; each frame takes `delay`.
    struct SlowSink {
        delay: Duration,
        frames: std::sync::atomic::AtomicUsize,
    }

    impl FrameSink for SlowSink {
        async fn frame(&self, _payload: Bytes, _text: bool) {
            tokio::time::sleep(self.delay).await;
            self.frames.fetch_add(1, Ordering::SeqCst);
        }
    }

    type Pipe = tokio::io::DuplexStream;

    struct Running {
        peer: WebSocketStream<Pipe>,
        queue: mpsc::Sender<Box<Outbound>>,
        cancel: CancellationToken,
        sink: std::sync::Arc<SlowSink>,
        ended: tokio::task::JoinHandle<End>,
    }

    /// Serves the provider's end of a pipe whose kernel-buffer stand-in holds 4 KiB.
    async fn start(keepalive: Keepalive, delay: Duration) -> Running {
        let (ours, theirs) = tokio::io::duplex(4096);
        let ws = WebSocketStream::from_raw_socket(ours, Role::Server, Some(ws_config(1024))).await;
        let peer = WebSocketStream::from_raw_socket(theirs, Role::Client, None).await;
        let (queue, mut outbound) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let sink = std::sync::Arc::new(SlowSink {
            delay,
            frames: Default::default(),
        });
        let ended = tokio::spawn({
            let (cancel, sink) = (cancel.clone(), sink.clone());
            async move {
                serve(
                    ws,
                    sink.as_ref(),
                    &mut outbound,
                    &cancel,
                    CloseCode::Normal,
                    keepalive,
                )
                .await
            }
        });
        Running {
            peer,
            queue,
            cancel,
            sink,
            ended,
        }
    }

    fn keepalive(ping_ms: u64, pong_ms: u64, idle_ms: Option<u64>) -> Keepalive {
        Keepalive {
            ping_interval: Some(Duration::from_millis(ping_ms)),
            pong_timeout: Duration::from_millis(pong_ms),
            idle_timeout: idle_ms.map(Duration::from_millis),
        }
    }

    async fn send(
        queue: &mpsc::Sender<Box<Outbound>>,
        message: Message,
    ) -> oneshot::Receiver<Result<(), String>> {
        let (ack, done) = oneshot::channel();
        queue
            .send(Box::new(Outbound {
                message,
                ack: Some(ack),
            }))
            .await
            .expect("queue open");
        done
    }

    fn dropped(end: End) -> Closed {
        match end {
            End::Dropped(closed) => closed,
            End::Cancelled => panic!("cancelled, expected a drop"),
        }
    }

    #[tokio::test]
    async fn a_write_blocked_on_a_peer_that_stopped_reading_does_not_hide_it() {
        let mut run = start(keepalive(100, 200, None), Duration::ZERO).await;
        // The peer never reads: these fill the pipe and the write buffer, and the writer blocks.
        for _ in 0..8 {
            drop(send(&run.queue, Message::binary(vec![0u8; 256 * 1024])).await);
        }
        let end = tokio::time::timeout(Duration::from_secs(10), &mut run.ended)
            .await
            .expect("the dead peer was found while the write was blocked")
            .expect("serve did not panic");
        assert_eq!(dropped(end).code, 1006);
        drop(run.peer);
    }

    #[tokio::test]
    async fn a_slow_sink_does_not_get_a_reading_peer_blamed() {
        let run = start(keepalive(100, 300, Some(500)), Duration::from_millis(1000)).await;
        let (mut to_provider, mut from_provider) = run.peer.split();
        // The peer reads all along, so it answers every ping it gets.
        let reading = tokio::spawn(async move { while from_provider.next().await.is_some() {} });
        for i in 0..3 {
            to_provider
                .send(Message::text(format!("{i}")))
                .await
                .expect("send");
        }
        // 3 s of delivery, 7 times ping + pong: the socket stays, every frame is delivered.
        let delivered = tokio::time::timeout(Duration::from_secs(10), async {
            while run.sink.frames.load(Ordering::SeqCst) < 3 {
                assert!(!run.ended.is_finished(), "the socket was dropped");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(delivered.is_ok(), "not every frame was delivered");
        assert!(!run.ended.is_finished(), "the socket was dropped");
        run.cancel.cancel();
        assert!(matches!(run.ended.await.expect("no panic"), End::Cancelled));
        reading.abort();
    }

    #[tokio::test]
    async fn a_frame_too_big_for_the_write_buffer_fails_alone() {
        let mut run = start(Keepalive::default(), Duration::ZERO).await;
        let big = send(&run.queue, Message::text("x".repeat(2 * 1024 * 1024))).await;
        let small = send(&run.queue, Message::text("fits")).await;
        let error = big.await.expect("acked").expect_err("too big");
        assert!(
            error.contains("2097152") && error.contains("1048576"),
            "{error}"
        );
        assert_eq!(small.await.expect("acked"), Ok(()));
        let next = tokio::time::timeout(Duration::from_secs(5), run.peer.next())
            .await
            .expect("a frame");
        assert!(matches!(next, Some(Ok(Message::Text(t))) if t.as_str() == "fits"));
        assert!(!run.ended.is_finished());
        run.cancel.cancel();
    }

    #[tokio::test]
    async fn a_peer_close_gets_a_close_reply() {
        let mut run = start(Keepalive::default(), Duration::ZERO).await;
        run.peer
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })))
            .await
            .expect("close sent");
        let reply = tokio::time::timeout(Duration::from_secs(5), run.peer.next())
            .await
            .expect("a reply");
        assert!(
            matches!(&reply, Some(Ok(Message::Close(Some(f)))) if f.code == CloseCode::Normal),
            "{reply:?}"
        );
        let end = run.ended.await.expect("no panic");
        assert_eq!(dropped(end).code, 1000);
    }

    #[tokio::test]
    async fn written_data_frames_keep_a_socket_from_idling() {
        let run = start(
            Keepalive {
                idle_timeout: Some(Duration::from_millis(1000)),
                ..Keepalive::default()
            },
            Duration::ZERO,
        )
        .await;
        let (_to_provider, mut from_provider) = run.peer.split();
        let reading = tokio::spawn(async move {
            let mut last = None;
            while let Some(Ok(m)) = from_provider.next().await {
                last = Some(m);
            }
            last
        });
        for _ in 0..12 {
            let _ = send(&run.queue, Message::text("tick")).await.await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!run.ended.is_finished(), "closed as idle while writing");
        }
        // Nothing either way: idle, closed with 1001.
        let end = tokio::time::timeout(Duration::from_secs(5), run.ended)
            .await
            .expect("idle close")
            .expect("no panic");
        assert_eq!(dropped(end).code, 1001);
        let last = reading.await.expect("reader");
        assert!(
            matches!(&last, Some(Message::Close(Some(f))) if f.code == CloseCode::Away),
            "{last:?}"
        );
    }
}

#[cfg(test)]
#[path = "socket_tests.rs"]
mod duplex_tests;
