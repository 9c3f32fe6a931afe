//! wRPC exports: `wasmcloud:messaging/consumer@0.2.0` and
//! `wasmcloud-websocket:provider/sessions@0.1.0`.
//!
//! The caller is the component named by the invocation's `source-id`; the link it called on is
//! the `link-name` header. Every failure a component can cause or fix (no link, not connected,
//! full queue, unknown session, timeout) is returned as `Ok(Err(reason))`, which the component
//! sees as an error value; `Err` would trap it and is never returned.

//!
//! [`consumer`] serves `publish` and `request`, [`sessions`] the session API; both find their
//! sessions through the provider (routing, ownership) and write through the sessions' outboxes.

mod consumer;
mod forwarded;
mod sessions;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tracing::{debug, trace};
use wasmcloud_provider_sdk::Context;

use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::config::FrameType;
use crate::provider::WsProvider;
use crate::session::Session;

/// Writes `msg` to one session, as its format and the frame type say.
pub(super) async fn send_to(
    session: &Session,
    subject: &str,
    msg: &BrokerMessage,
    frame_type: Option<FrameType>,
) -> Result<(), String> {
    session
        .outbox
        .publish(frame_of(session, subject, msg, frame_type)?)
        .await
}

/// Writes `body` to one session as an envelope with a fresh `id` and `"ack": true`, and waits
/// up to `timeout_ms` for the peer's answer (`send-acked`).
pub(super) async fn send_acked(
    session: &Session,
    subject: &str,
    body: &[u8],
    reply_to: Option<&str>,
    timeout_ms: u32,
) -> Result<(), String> {
    if session.codec.format != crate::config::Format::Json {
        return Err(format!(
            "send-acked needs FORMAT=json on the link of session {}; raw frames carry no id",
            session.id
        ));
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let answer = session.replies.expect_ack(id.clone())?;
    let frame = tokio_tungstenite::tungstenite::Message::text(crate::envelope::encode_acked(
        subject, body, reply_to, &id,
    ));
    if let Err(e) = session.outbox.publish(frame).await {
        session.replies.forget_ack(&id);
        return Err(e);
    }
    match tokio::time::timeout(Duration::from_millis(u64::from(timeout_ms)), answer).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(reason))) => Err(format!(
            "the peer of session {} did not handle the message: {reason}",
            session.id
        )),
        Ok(Err(_)) => Err(format!(
            "session {} ended before its peer acknowledged the message",
            session.id
        )),
        Err(_) => {
            session.replies.forget_ack(&id);
            Err(format!(
                "the peer of session {} did not acknowledge the message within {timeout_ms} ms",
                session.id
            ))
        }
    }
}

/// The frame `msg` becomes on `session`, as its format and the frame type say.
fn frame_of(
    session: &Session,
    subject: &str,
    msg: &BrokerMessage,
    frame_type: Option<FrameType>,
) -> Result<tokio_tungstenite::tungstenite::Message, String> {
    session.codec.encode(
        subject,
        msg.body.clone(),
        msg.reply_to.as_deref(),
        frame_type,
    )
}

/// Writes `msg` to every session at once, with one deadline for all of them (`FANOUT_TIMEOUT_MS`
/// of the caller's link): a silent peer cannot hold the call longer. One result per session.
pub(super) async fn send_all(
    sessions: &[Arc<Session>],
    subject: &str,
    msg: &BrokerMessage,
    frame_type: Option<FrameType>,
    timeout: Duration,
) -> Vec<Result<(), String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    join_all(sessions.iter().map(|session| async move {
        let frame = frame_of(session, subject, msg, frame_type)?;
        session.outbox.send_fanout(frame, deadline).await
    }))
    .await
}

pub(super) fn caller(cx: &Option<Context>) -> Result<(&str, &str), String> {
    let cx = cx.as_ref().ok_or("invocation carries no context")?;
    let component = cx
        .component
        .as_deref()
        .ok_or("invocation names no source component")?;
    Ok((component, cx.link_name()))
}
impl WsProvider {
    pub(super) fn count_publish(&self, result: &Result<(), String>) {
        match result {
            Ok(()) => trace!("publish written"),
            Err(error) => {
                self.metrics().publish_refused();
                debug!(%error, "publish refused");
            }
        }
    }
    /// The fan-out deadline of a session-API call.
    pub(super) fn fanout_of(&self, cx: &Option<Context>) -> Duration {
        caller(cx).map_or(
            crate::config::DEFAULT_FANOUT_TIMEOUT,
            |(component, link)| self.fanout_timeout(component, link),
        )
    }

    pub(super) fn session_of(
        &self,
        cx: &Option<Context>,
        id: &str,
    ) -> Result<std::sync::Arc<Session>, String> {
        let (component, _) = caller(cx)?;
        self.owned_session(component, id)
    }
}
