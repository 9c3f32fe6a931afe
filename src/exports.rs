//! wRPC exports: `wasmcloud:messaging/consumer@0.2.0` and
//! `wasmcloud-websocket:provider/sessions@0.1.0`.
//!
//! The caller is the component named by the invocation's `source-id`; the link it called on is
//! the `link-name` header. Every failure a component can cause or fix (no link, not connected,
//! full queue, unknown session, timeout) is returned as `Ok(Err(reason))`, which the component
//! sees as an error value; `Err` would trap it and is never returned.

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use tracing::{debug, instrument, trace};
use uuid::Uuid;
use wasmcloud_provider_sdk::{propagate_trace_for_ctx, Context};

use crate::bindings::exports::wasmcloud::messaging::consumer;
use crate::bindings::exports::wasmcloud_websocket::provider::sessions::{
    self, RequestInfo, SessionInfo,
};
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::config::{Format, FrameType};
use crate::provider::WsProvider;
use crate::session::Session;

/// Writes `msg` to one session, as its format and the frame type say.
async fn send_to(
    session: &Session,
    subject: &str,
    msg: &BrokerMessage,
    frame_type: Option<FrameType>,
) -> Result<(), String> {
    session
        .outbox
        .send(frame_of(session, subject, msg, frame_type)?)
        .await
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
async fn send_all(
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

fn caller(cx: &Option<Context>) -> Result<(&str, &str), String> {
    let cx = cx.as_ref().ok_or("invocation carries no context")?;
    let component = cx
        .component
        .as_deref()
        .ok_or("invocation names no source component")?;
    Ok((component, cx.link_name()))
}

impl WsProvider {
    fn count_publish(&self, result: &Result<(), String>) {
        match result {
            Ok(()) => trace!("publish written"),
            Err(error) => {
                self.metrics().publish_refused();
                debug!(%error, "publish refused");
            }
        }
    }

    async fn publish_message(
        &self,
        cx: &Option<Context>,
        msg: BrokerMessage,
    ) -> Result<(), String> {
        let (component, link_name) = caller(cx)?;
        let target = self.route_publish(component, link_name, &msg.subject)?;
        debug!(
            component,
            link = link_name,
            sessions = target.sessions.len(),
            bytes = msg.body.len(),
            "publish"
        );
        match target.sessions.as_slice() {
            [session] => send_to(session, &target.subject, &msg, target.frame_type).await,
            sessions => {
                let results = send_all(
                    sessions,
                    &target.subject,
                    &msg,
                    target.frame_type,
                    target.fanout_timeout,
                )
                .await;
                let failed: Vec<&String> =
                    results.iter().filter_map(|r| r.as_ref().err()).collect();
                match failed.first() {
                    None => Ok(()),
                    Some(first) => Err(format!(
                        "{} of {} sessions did not get the message; first error: {first}",
                        failed.len(),
                        sessions.len()
                    )),
                }
            }
        }
    }

    async fn request_reply(
        &self,
        cx: &Option<Context>,
        subject: &str,
        body: Bytes,
        timeout_ms: u32,
    ) -> Result<BrokerMessage, String> {
        let (component, link_name) = caller(cx)?;
        let target = self.route_publish(component, link_name, subject)?;
        let [session] = target.sessions.as_slice() else {
            return Err(format!(
                "subject {subject:?} names {} sessions; a request goes to one session (use its session subject)",
                target.sessions.len()
            ));
        };
        if session.codec.format != Format::Json {
            return Err(format!(
                "request-reply needs FORMAT=json on the link of session {}; raw frames have no reply subject",
                session.id
            ));
        }
        let inbox = format!("_INBOX.{}", Uuid::new_v4().simple());
        let reply = session.replies.expect(inbox.clone())?;
        let frame = session
            .codec
            .encode(&target.subject, body, Some(&inbox), target.frame_type)?;
        if let Err(e) = session.outbox.send(frame).await {
            session.replies.forget(&inbox);
            return Err(e);
        }
        match tokio::time::timeout(Duration::from_millis(u64::from(timeout_ms)), reply).await {
            Ok(Ok(envelope)) => Ok(BrokerMessage {
                subject: envelope.subject,
                body: envelope.body,
                reply_to: envelope.reply_to,
            }),
            Ok(Err(_)) => Err(format!("session {} ended before the reply", session.id)),
            Err(_) => {
                session.replies.forget(&inbox);
                Err(format!(
                    "request to {subject:?} timed out after {timeout_ms} ms"
                ))
            }
        }
    }

    /// The fan-out deadline of a session-API call.
    fn fanout_of(&self, cx: &Option<Context>) -> Duration {
        caller(cx).map_or(
            crate::config::DEFAULT_FANOUT_TIMEOUT,
            |(component, link)| self.fanout_timeout(component, link),
        )
    }

    fn session_of(
        &self,
        cx: &Option<Context>,
        id: &str,
    ) -> Result<std::sync::Arc<Session>, String> {
        let (component, _) = caller(cx)?;
        self.owned_session(component, id)
    }
}

impl consumer::Handler<Option<Context>> for WsProvider {
    #[instrument(level = "debug", skip_all, fields(subject = %msg.subject))]
    async fn publish(
        &self,
        cx: Option<Context>,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<(), String>> {
        // Continue the caller's trace (the host sends its context with the invocation).
        propagate_trace_for_ctx!(cx);
        let result = self.publish_message(&cx, msg).await;
        self.count_publish(&result);
        Ok(result)
    }

    #[instrument(level = "debug", skip_all, fields(subject = %subject))]
    async fn request(
        &self,
        cx: Option<Context>,
        subject: String,
        body: Bytes,
        timeout_ms: u32,
    ) -> anyhow::Result<Result<BrokerMessage, String>> {
        propagate_trace_for_ctx!(cx);
        Ok(self.request_reply(&cx, &subject, body, timeout_ms).await)
    }
}

fn to_wit(info: crate::session::SessionInfo) -> SessionInfo {
    SessionInfo {
        id: info.id.to_string(),
        link_name: info.link_name,
        remote: info.remote,
        connected: info.connected,
        connected_since_ms: info.connected_since_ms,
        metadata: info.metadata,
        groups: info.groups,
        request: info.request.map(|r| RequestInfo {
            path: r.path,
            query: r.query,
            headers: r.headers,
            subprotocol: r.subprotocol,
        }),
    }
}

/// How many of `results` succeeded, counting each publish.
fn delivered(provider: &WsProvider, results: &[Result<(), String>]) -> u32 {
    for result in results {
        provider.count_publish(result);
    }
    u32::try_from(results.iter().filter(|r| r.is_ok()).count()).unwrap_or(u32::MAX)
}

impl sessions::Handler<Option<Context>> for WsProvider {
    async fn list_sessions(
        &self,
        cx: Option<Context>,
    ) -> anyhow::Result<Result<Vec<SessionInfo>, String>> {
        Ok(caller(&cx).map(|(component, _)| {
            self.owned_sessions(component)
                .iter()
                .map(|s| to_wit(self.registry().info(s)))
                .collect()
        }))
    }

    async fn get_session(
        &self,
        cx: Option<Context>,
        id: String,
    ) -> anyhow::Result<Result<SessionInfo, String>> {
        Ok(self
            .session_of(&cx, &id)
            .map(|s| to_wit(self.registry().info(&s))))
    }

    async fn send(
        &self,
        cx: Option<Context>,
        id: String,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<(), String>> {
        let result = match self.session_of(&cx, &id) {
            Ok(session) => send_to(&session, &msg.subject, &msg, None).await,
            Err(e) => Err(e),
        };
        self.count_publish(&result);
        Ok(result)
    }

    async fn broadcast(
        &self,
        cx: Option<Context>,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<u32, String>> {
        let (component, _) = match caller(&cx) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let sessions: Vec<_> = self
            .owned_sessions(component)
            .into_iter()
            .filter(|s| s.outbox.is_connected())
            .collect();
        let results = send_all(&sessions, &msg.subject, &msg, None, self.fanout_of(&cx)).await;
        Ok(Ok(delivered(self, &results)))
    }

    async fn send_many(
        &self,
        cx: Option<Context>,
        ids: Vec<String>,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<u32, String>> {
        // Every ID must be the caller's: nothing is sent when one is not.
        let sessions: Result<Vec<_>, String> =
            ids.iter().map(|id| self.session_of(&cx, id)).collect();
        let mut sessions = match sessions {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        sessions.sort_by_key(|s| s.id);
        sessions.dedup_by_key(|s| s.id);
        let results = send_all(&sessions, &msg.subject, &msg, None, self.fanout_of(&cx)).await;
        Ok(Ok(delivered(self, &results)))
    }

    async fn join_group(
        &self,
        cx: Option<Context>,
        id: String,
        group: String,
    ) -> anyhow::Result<Result<(), String>> {
        Ok(self
            .session_of(&cx, &id)
            .and_then(|s| self.registry().join(&s, &group)))
    }

    async fn leave_group(
        &self,
        cx: Option<Context>,
        id: String,
        group: String,
    ) -> anyhow::Result<Result<(), String>> {
        Ok(self
            .session_of(&cx, &id)
            .map(|s| self.registry().leave(&s, &group)))
    }

    async fn group_members(
        &self,
        cx: Option<Context>,
        group: String,
    ) -> anyhow::Result<Result<Vec<String>, String>> {
        Ok(caller(&cx).map(|(component, _)| {
            let mut ids: Vec<String> = self
                .registry()
                .group_members(component, &group)
                .iter()
                .map(|s| s.id.to_string())
                .collect();
            ids.sort();
            ids
        }))
    }

    async fn send_group(
        &self,
        cx: Option<Context>,
        group: String,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<u32, String>> {
        let (component, _) = match caller(&cx) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let members: Vec<_> = self
            .registry()
            .group_members(component, &group)
            .into_iter()
            .filter(|s| s.outbox.is_connected())
            .collect();
        let results = send_all(&members, &msg.subject, &msg, None, self.fanout_of(&cx)).await;
        Ok(Ok(delivered(self, &results)))
    }

    async fn set_metadata(
        &self,
        cx: Option<Context>,
        id: String,
        key: String,
        value: String,
    ) -> anyhow::Result<Result<(), String>> {
        Ok(self
            .session_of(&cx, &id)
            .and_then(|s| s.set_metadata(key, value)))
    }

    async fn get_metadata(
        &self,
        cx: Option<Context>,
        id: String,
        key: String,
    ) -> anyhow::Result<Result<Option<String>, String>> {
        Ok(self.session_of(&cx, &id).map(|s| s.get_metadata(&key)))
    }

    async fn remove_metadata(
        &self,
        cx: Option<Context>,
        id: String,
        key: String,
    ) -> anyhow::Result<Result<(), String>> {
        Ok(self.session_of(&cx, &id).map(|s| s.remove_metadata(&key)))
    }

    async fn close(
        &self,
        cx: Option<Context>,
        id: String,
        code: u16,
        reason: String,
    ) -> anyhow::Result<Result<(), String>> {
        let session = match self.session_of(&cx, &id) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        Ok(session.outbox.close(code, &reason).await)
    }
}
