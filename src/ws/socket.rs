//! The life of one open WebSocket, client or server side: read and write concurrently until the
//! socket drops or the owner cancels.
//!
//! Inbound text and binary frames go to a [`FrameSink`] in order. Outbound frames come from a
//! bounded queue; the writer feeds every frame that is ready and flushes once, then acknowledges
//! each frame. Cancelling sends a close frame. Nothing here knows about wasmCloud.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
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

pub use crate::config::Keepalive;

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
    pub ack: Option<oneshot::Sender<Result<(), String>>>,
}

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

/// When the socket last heard anything, and last carried data, in ms since it opened.
struct Liveness {
    opened: Instant,
    last_seen: AtomicU64,
    last_data: AtomicU64,
}

impl Liveness {
    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn seen(&self, data: bool) {
        let now = self.now();
        self.last_seen.store(now, Ordering::Relaxed);
        if data {
            self.last_data.store(now, Ordering::Relaxed);
        }
    }
    fn silent_for(&self, last: &AtomicU64) -> Duration {
        Duration::from_millis(self.now().saturating_sub(last.load(Ordering::Relaxed)))
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
    let (mut writer, mut reader) = ws.split();
    sink.connected();
    let _open = OpenGuard(sink);
    let liveness = Liveness {
        opened: Instant::now(),
        last_seen: AtomicU64::new(0),
        last_data: AtomicU64::new(0),
    };
    let read = async {
        while let Some(next) = reader.next().await {
            liveness.seen(matches!(next, Ok(Message::Text(_) | Message::Binary(_))));
            match next {
                Ok(Message::Text(text)) => sink.frame(Bytes::from(text), true).await,
                Ok(Message::Binary(data)) => sink.frame(data, false).await,
                Ok(Message::Close(frame)) => {
                    return match frame {
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
                    }
                }
                Ok(_) => {}
                Err(tokio_tungstenite::tungstenite::Error::Capacity(e)) => {
                    return Closed {
                        code: 1009,
                        reason: format!("message too big: {e}"),
                    }
                }
                Err(e) => return Closed::abnormal(format!("read failed: {e}")),
            }
        }
        Closed::abnormal("connection closed".to_string())
    };
    let write = write_loop(&mut writer, outbound, keepalive, &liveness, sink);
    let result = tokio::select! {
        () = cancel.cancelled() => None,
        () = sink.kicked() => Some(Closed {
            code: 1008,
            reason: "slow consumer: the peer did not read its messages".to_string(),
        }),
        reason = read => Some(reason),
        reason = write => Some(reason),
    };
    match result {
        Some(closed) if matches!(closed.code, 1009 | 1001) => {
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
        Some(closed) => End::Dropped(closed),
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

/// Writes queued frames: feeds every frame that is ready, flushes once, then acknowledges.
/// After a close frame (a component closing the session) it gives the peer `CLOSE_GRACE` to
/// answer, then ends, so a peer that never answers cannot hold the connection open.
/// Between writes it sends keepalive pings and ends the socket when the peer is dead or idle.
async fn write_loop<W, S>(
    writer: &mut W,
    outbound: &mut mpsc::Receiver<Box<Outbound>>,
    keepalive: Keepalive,
    liveness: &Liveness,
    sink: &S,
) -> Closed
where
    W: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    S: FrameSink,
{
    let mut acks = Vec::with_capacity(WRITE_BATCH);
    let tick_every = [keepalive.ping_interval, keepalive.idle_timeout]
        .into_iter()
        .flatten()
        .min()
        .map(|d| d.min(Duration::from_secs(1)).max(Duration::from_millis(50)));
    let mut ticker = tick_every
        .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    let mut last_ping = Instant::now();
    loop {
        let next = match ticker.as_mut() {
            Some(ticker) => tokio::select! {
                item = outbound.recv() => Some(item),
                _ = ticker.tick() => None,
            },
            None => Some(outbound.recv().await),
        };
        let first = match next {
            Some(Some(first)) => first,
            Some(None) => return Closed::abnormal("send queue closed".to_string()),
            None => {
                if let Some(interval) = keepalive.ping_interval {
                    if liveness.silent_for(&liveness.last_seen) > interval + keepalive.pong_timeout
                    {
                        return Closed::abnormal(format!(
                            "peer did not answer pings for {} s",
                            (interval + keepalive.pong_timeout).as_secs()
                        ));
                    }
                    if last_ping.elapsed() >= interval {
                        last_ping = Instant::now();
                        if let Err(e) = writer.send(Message::Ping(Bytes::new())).await {
                            return Closed::abnormal(format!("ping failed: {e}"));
                        }
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
                continue;
            }
        };
        let mut next = Some(first);
        let mut result = Ok(());
        let mut closed = None;
        let (mut frames, mut bytes) = (0u64, 0u64);
        while let Some(item) = next.take() {
            let Outbound { message, ack } = *item;
            acks.extend(ack);
            if message.is_text() || message.is_binary() {
                frames += 1;
                bytes += message.len() as u64;
            }
            if let Message::Close(frame) = &message {
                closed = Some(frame.as_ref().map_or(1000, |f| u16::from(f.code)));
            }
            if let Err(e) = writer.feed(message).await {
                result = Err(format!("write failed: {e}"));
                break;
            }
            if acks.len() < WRITE_BATCH && closed.is_none() {
                next = outbound.try_recv().ok();
            }
        }
        if result.is_ok() {
            result = writer
                .flush()
                .await
                .map_err(|e| format!("write failed: {e}"));
        }
        if result.is_ok() && frames > 0 {
            sink.written(frames, bytes);
        }
        for ack in acks.drain(..) {
            let _ = ack.send(result.clone());
        }
        if let Err(e) = result {
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
