//! The life of one open WebSocket, client or server side: read and write concurrently until the
//! socket drops or the owner cancels.
//!
//! Inbound text and binary frames go to a [`FrameSink`] in order. Outbound frames come from a
//! bounded queue; the writer feeds every frame that is ready and flushes once, then acknowledges
//! each frame. Cancelling sends a close frame. Nothing here knows about wasmCloud.

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How many ready frames the writer feeds before it flushes.
const WRITE_BATCH: usize = 64;
/// How long a close handshake may take.
pub const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// A frame to write, with an optional acknowledgement sent once it was flushed (or failed).
#[derive(Debug)]
pub struct Outbound {
    pub message: Message,
    pub ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// Where inbound data frames go.
pub trait FrameSink: Send + Sync + 'static {
    /// Handles one text (`text == true`) or binary frame. The next frame is read after this ends.
    fn frame(&self, payload: Bytes, text: bool) -> impl Future<Output = ()> + Send;
}

/// The connection state that the owner can watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected { since: SystemTime },
    Disconnected { error: String },
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
    outbound: &mut mpsc::Receiver<Outbound>,
    cancel: &CancellationToken,
    cancel_code: CloseCode,
) -> End
where
    S: FrameSink,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut writer, mut reader) = ws.split();
    let read = async {
        while let Some(next) = reader.next().await {
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
    let write = write_loop(&mut writer, outbound);
    let result = tokio::select! {
        () = cancel.cancelled() => None,
        reason = read => Some(reason),
        reason = write => Some(reason),
    };
    match result {
        Some(closed) if closed.code == 1009 => {
            // Tell the peer why: the oversize message was never buffered whole.
            let close = Message::Close(Some(CloseFrame {
                code: CloseCode::Size,
                reason: "message too big".into(),
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
async fn write_loop<W>(writer: &mut W, outbound: &mut mpsc::Receiver<Outbound>) -> Closed
where
    W: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let mut acks = Vec::with_capacity(WRITE_BATCH);
    loop {
        let Some(first) = outbound.recv().await else {
            return Closed::abnormal("send queue closed".to_string());
        };
        let mut next = Some(first);
        let mut result = Ok(());
        let mut closed = None;
        while let Some(item) = next.take() {
            acks.extend(item.ack);
            if let Message::Close(frame) = &item.message {
                closed = Some(frame.as_ref().map_or(1000, |f| u16::from(f.code)));
            }
            if let Err(e) = writer.feed(item.message).await {
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
