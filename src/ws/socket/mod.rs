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
//! [`serve`] runs three parts side by side and ends the socket with the close frame its end
//! calls for: the reader (`reader`: inbound frames to the sink), the writer (`writer`: the
//! outbound queue, batching, acknowledgements, oversize frames) and the watchdog (`liveness`:
//! pings, dead and idle peers, and who is to blame for a silence).

use std::future::Future;
use std::time::{Duration, SystemTime};

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

mod liveness;
mod reader;
mod writer;

use liveness::{watchdog, Liveness};
use reader::read_loop;
use writer::write_loop;

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

    /// The peer answered a ping.
    fn pong(&self) {}
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
    let read = read_loop(&mut reader, sink, &liveness);
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
    close(&mut writer, result, cancel_code).await
}

/// Ends the socket as [`serve`]'s select ended (`None`: cancelled; `true`: the peer sent a close
/// frame), each close step within [`CLOSE_GRACE`]: answers the peer's close, tells the peer why
/// on an oversize message (1009) or an idle socket (1001), or sends the owner's close frame.
async fn close<W>(writer: &mut W, result: Option<(Closed, bool)>, cancel_code: CloseCode) -> End
where
    W: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    match result {
        Some((closed, true)) => {
            // tungstenite queued the reply to the peer's close; write it out (with anything
            // still buffered) before the socket is dropped, so the peer sees a clean close.
            // A write cut short by the select may leave a frame in the split sink's slot, whose flush
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

#[cfg(test)]
mod tests {
    //! The socket loop against an in-memory peer (a duplex pipe with a small buffer, so a peer
    //! that does not read blocks the writer as a full TCP window would).
    use super::*;
    use std::sync::atomic::Ordering;
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
        let (queue, outbound) = mpsc::channel(64);
        let sink = std::sync::Arc::new(SlowSink {
            delay,
            frames: Default::default(),
        });
        let (cancel, ended) = super::duplex_tests::spawn_serve(
            ws,
            sink.clone(),
            outbound,
            CloseCode::Normal,
            keepalive,
        );
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
mod duplex_tests;
