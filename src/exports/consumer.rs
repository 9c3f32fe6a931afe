//! `wasmcloud:messaging/consumer@0.2.0`: `publish` (to the sessions routing picks) and
//! `request` (one session, `FORMAT=json`, waiting for the peer's reply).

use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, instrument};
use uuid::Uuid;
use wasmcloud_provider_sdk::{propagate_trace_for_ctx, Context};

use super::forwarded::{frame_code, parse, FORWARD_TIMEOUT};
use super::{caller, send_all, send_to};
use crate::bindings::exports::wasmcloud::messaging::consumer;
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::cluster::wire::Op;
use crate::config::Format;
use crate::provider::Remote;
use crate::provider::WsProvider;
use crate::session::Session;

/// A publish on a link's own connection that no replica holds now: said so, not as an unknown
/// session (the subject named none).
fn not_held(error: String, id: &uuid::Uuid) -> String {
    if error == format!("unknown session {id}") {
        "the link's connection is not held by any provider replica now (a takeover may be under way)".to_string()
    } else {
        error
    }
}

impl WsProvider {
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
        match &target.remote {
            Remote::None => {}
            Remote::Connection(id) | Remote::Session(id) => {
                let op = Op::Publish {
                    subject: target.subject.clone(),
                    reply_to: msg.reply_to.clone(),
                    frame_type: frame_code(target.frame_type),
                };
                let sent = self
                    .session_call(component, &id.to_string(), op, msg.body, FORWARD_TIMEOUT)
                    .await
                    .map(drop);
                return match target.remote {
                    Remote::Connection(_) => sent.map_err(|e| not_held(e, id)),
                    _ => sent,
                };
            }
            Remote::ServerLink(link) => {
                let op = Op::ServerLink {
                    link: link.clone(),
                    subject: target.subject.clone(),
                    reply_to: msg.reply_to.clone(),
                    frame_type: frame_code(target.frame_type),
                };
                let (reach, attempted) = self
                    .all_write_counts(component, op, msg.body, target.fanout_timeout)
                    .await?;
                let delivered = reach.result()?;
                return match attempted - delivered.min(attempted) {
                    0 => Ok(()),
                    failed => Err(format!(
                        "{failed} of {attempted} sessions did not get the message"
                    )),
                };
            }
        }
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
        if let Remote::Session(id) | Remote::Connection(id) = target.remote {
            let op = Op::Request {
                subject: target.subject.clone(),
                timeout_ms,
                frame_type: frame_code(target.frame_type),
            };
            let wait = Duration::from_millis(u64::from(timeout_ms)) + FORWARD_TIMEOUT;
            let reply = self
                .session_call(component, &id.to_string(), op, body, wait)
                .await?;
            let (subject, reply_to, body): (String, Option<String>, Vec<u8>) = parse(reply)?;
            return Ok(BrokerMessage {
                subject,
                body: Bytes::from(body),
                reply_to,
            });
        }
        let [session] = target.sessions.as_slice() else {
            return Err(format!(
                "subject {subject:?} names {} sessions; a request goes to one session (use its session subject)",
                target.sessions.len()
            ));
        };
        self.request_on(
            session,
            &target.subject,
            body,
            timeout_ms,
            target.frame_type,
        )
        .await
    }

    /// A request to the peer of a session held here.
    pub(super) async fn request_on(
        &self,
        session: &Session,
        subject: &str,
        body: Bytes,
        timeout_ms: u32,
        frame_type: Option<crate::config::FrameType>,
    ) -> Result<BrokerMessage, String> {
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
            .encode(subject, body, Some(&inbox), frame_type)?;
        if let Err(e) = session.outbox.publish(frame).await {
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
