//! The reader of [`serve`]: inbound text and binary frames go to the [`FrameSink`] in order; the
//! next frame is read once the sink is done with the last (that wait is the backpressure of a
//! slow component, during which the peer is not blamed: see the `liveness` module). It ends
//! with the peer's close frame, an oversize message (1009), a read error or the end of the
//! stream.
//!
//! [`serve`]: super::serve

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::liveness::Liveness;
use super::{Closed, FrameSink};

/// Reads until the socket ends: returns how it ended, and whether the peer sent a close frame
/// (to be answered).
pub(super) async fn read_loop<R, S>(reader: &mut R, sink: &S, liveness: &Liveness) -> (Closed, bool)
where
    R: Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    S: FrameSink,
{
    while let Some(next) = reader.next().await {
        liveness.seen(matches!(next, Ok(Message::Text(_) | Message::Binary(_))));
        match next {
            Ok(Message::Text(text)) => {
                liveness
                    .delivering(sink.frame(Bytes::from(text), true))
                    .await;
            }
            Ok(Message::Binary(data)) => liveness.delivering(sink.frame(data, false)).await,
            Ok(Message::Close(frame)) => return (peer_closed(frame), true),
            Ok(Message::Pong(_)) => sink.pong(),
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
}

/// How the peer's close frame (or its absence of one) ended the socket.
fn peer_closed(frame: Option<CloseFrame>) -> Closed {
    match frame {
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
