//! The answer owed to a peer's acknowledged envelope (`"ack": true`): an [`AckTicket`] travels
//! with the message from the reader to the delivery task and is settled with the outcome of its
//! `handle-message` call. A ticket dropped unsettled (a queue closed with the session, a task
//! ended) answers `refused` when dropped, so every acknowledged envelope gets exactly one answer;
//! when the session's socket is gone by then, none can be written.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use crate::envelope::{self, NotHandled};
use crate::session::Session;

/// The longest error message an ack carries (a component's own error is cut there).
const MAX_ERROR_MESSAGE_BYTES: usize = 256;

pub struct AckTicket {
    session: Arc<Session>,
    id: String,
    settled: bool,
}

impl AckTicket {
    pub(super) fn new(session: Arc<Session>, id: String) -> Self {
        Self {
            session,
            id,
            settled: false,
        }
    }

    /// Answers the envelope: handled, or why not.
    pub fn settle(mut self, outcome: Result<(), (NotHandled, String)>) {
        self.answer(outcome);
    }

    fn answer(&mut self, outcome: Result<(), (NotHandled, String)>) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let outcome = outcome.map_err(|(reason, message)| (reason, cut(message)));
        let frame: Arc<str> = Arc::from(envelope::ack_frame(
            &self.id,
            outcome.as_ref().map_err(|(r, m)| (*r, m.as_str())).copied(),
        ));
        // A retry gets the same answer only if the component got the message.
        let times = match outcome {
            Ok(()) | Err((NotHandled::Timeout, _)) => {
                self.session.acks.finish(&self.id, Arc::clone(&frame))
            }
            Err(_) => self.session.acks.give_up(&self.id),
        };
        write_answer(&self.session, &frame, times);
    }
}

impl Drop for AckTicket {
    fn drop(&mut self) {
        self.answer(Err((
            NotHandled::Refused,
            "the message was not delivered: its session ended or the provider stopped first"
                .to_string(),
        )));
    }
}

/// Writes an ack answer `times` times: queued at once when there is room (in order with the
/// session's other frames), else by a task that waits for room up to the write timeout.
pub(super) fn write_answer(session: &Arc<Session>, frame: &Arc<str>, times: usize) {
    for _ in 0..times {
        let message = Message::text(frame.as_ref());
        if session.outbox.send_nowait(message).is_ok() || !session.outbox.is_connected() {
            continue;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = Arc::clone(session);
        let frame = Arc::clone(frame);
        runtime.spawn(async move {
            if let Err(error) = session.outbox.send(Message::text(frame.as_ref())).await {
                tracing::debug!(session = %session.id, %error, "ack answer not written");
            }
        });
    }
}

fn cut(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut end = MAX_ERROR_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::{mpsc, watch};

    use super::AckTicket;
    use crate::config::{Format, FrameType};
    use crate::session::acks::Begin;
    use crate::session::{Mode, Session, SessionOptions};
    use crate::ws::socket::{ConnState, Outbound};

    fn session() -> (
        Arc<Session>,
        mpsc::Receiver<Box<Outbound>>,
        watch::Sender<ConnState>,
    ) {
        let (state_tx, state) = watch::channel(ConnState::Connected {
            since: std::time::SystemTime::now(),
        });
        let (out, rx) = mpsc::channel(8);
        let options = SessionOptions {
            component_id: "c".into(),
            mode: Mode::Server,
            link_name: "l".into(),
            remote: "peer".into(),
            tracking: true,
            frame_type: FrameType::Auto,
            format: Format::Json,
            request: None,
            publish_wait: None,
            max_waiting: 1,
            write_timeout: std::time::Duration::from_secs(1),
            close_slow: false,
            recovery: None,
            keeper: None,
            max_frame_bytes: usize::MAX,
        };
        (Arc::new(Session::new(options, state, out)), rx, state_tx)
    }

    fn written(rx: &mut mpsc::Receiver<Box<Outbound>>) -> Vec<serde_json::Value> {
        let mut frames = Vec::new();
        while let Ok(out) = rx.try_recv() {
            let text = out.message.to_text().expect("text").to_string();
            frames.push(serde_json::from_str(&text).expect("json"));
        }
        frames
    }

    #[test]
    fn a_ticket_dropped_unsettled_answers_refused_once() {
        let (session, mut rx, _state) = session();
        assert_eq!(session.acks.begin("a"), Begin::New);
        drop(AckTicket::new(Arc::clone(&session), "a".into()));
        let frames = written(&mut rx);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["ack"]["id"], "a");
        assert_eq!(frames[0]["ack"]["error"]["code"], "refused");
        assert_eq!(
            session.acks.begin("a"),
            Begin::New,
            "not handled: delivered again"
        );
    }

    #[test]
    fn a_settled_ticket_answers_once_and_retries_get_the_same_answer() {
        let (session, mut rx, _state) = session();
        assert_eq!(session.acks.begin("b"), Begin::New);
        AckTicket::new(Arc::clone(&session), "b".into()).settle(Ok(()));
        assert_eq!(
            written(&mut rx),
            [serde_json::json!({"ack": {"id": "b", "ok": true}})]
        );
        assert!(matches!(session.acks.begin("b"), Begin::Repeat(_)));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let cut = super::cut("é".repeat(200));
        assert!(cut.len() <= 256 && cut.chars().all(|c| c == 'é'));
        assert_eq!(super::cut("short".into()), "short");
    }
}
