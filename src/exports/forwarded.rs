//! The session API and publishes across replicas: a call for a session another replica holds is
//! forwarded to it, lattice-wide views ask every replica once, and calls forwarded by other
//! replicas are served here against this replica's own sessions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use uuid::Uuid;

use super::{send_all, send_to};
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::cluster::wire::{Call, Op};
use crate::config::FrameType;
use crate::provider::WsProvider;
use crate::session::{Mode, Session, SessionInfo};

/// How long a call forwarded to a session's replica may take (a request: its own timeout, plus
/// this): above the default `PUBLISH_WAIT_MS` and `WRITE_TIMEOUT_MS` together, which a write
/// there may wait.
pub(super) const FORWARD_TIMEOUT: Duration = Duration::from_secs(16);

pub(super) fn frame_code(frame_type: Option<FrameType>) -> Option<u8> {
    frame_type.map(|f| match f {
        FrameType::Auto => 0,
        FrameType::Text => 1,
        FrameType::Binary => 2,
    })
}

fn frame_type(code: Option<u8>) -> Option<FrameType> {
    code.map(|c| match c {
        1 => FrameType::Text,
        2 => FrameType::Binary,
        _ => FrameType::Auto,
    })
}

fn json<T: serde::Serialize>(v: T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("bad answer from a replica: {e}"))
}

/// How many a fan-out reached, as the WIT functions return it; replicas that did not answer
/// make it an error that says how many sessions did get it.
pub(super) struct Reach {
    pub delivered: u32,
    pub unreached: usize,
    pub expected: usize,
    pub timeout: Duration,
}

impl Reach {
    pub(super) fn result(self) -> Result<u32, String> {
        if self.unreached == 0 {
            return Ok(self.delivered);
        }
        Err(format!(
            "delivered to {} sessions, but {} of {} other provider replicas did not answer within {} ms: their sessions may not have it",
            self.delivered,
            self.unreached,
            self.expected,
            self.timeout.as_millis()
        ))
    }
}

fn count(results: &[Result<(), String>]) -> u32 {
    u32::try_from(results.iter().filter(|r| r.is_ok()).count()).unwrap_or(u32::MAX)
}

impl WsProvider {
    /// Saves a client session's metadata and groups for the replica that may take it over.
    pub(super) async fn keep_state(&self, session: &Session) {
        if session.mode != Mode::Client {
            return;
        }
        if let Some(cluster) = self.cluster_now() {
            cluster.save_state(session, self.registry()).await;
        }
    }

    /// Runs a session call on a session held here.
    pub(super) async fn on_session(
        &self,
        session: Arc<Session>,
        op: &Op,
        body: Bytes,
    ) -> Result<Value, String> {
        match op {
            Op::Publish {
                subject,
                reply_to,
                frame_type: code,
            } => {
                let msg = BrokerMessage {
                    subject: subject.clone(),
                    body,
                    reply_to: reply_to.clone(),
                };
                send_to(&session, subject, &msg, frame_type(*code)).await?;
                Ok(Value::Null)
            }
            Op::Request {
                subject,
                timeout_ms,
                frame_type: code,
            } => {
                let reply = self
                    .request_on(&session, subject, body, *timeout_ms, frame_type(*code))
                    .await?;
                json((reply.subject, reply.reply_to, reply.body.to_vec()))
            }
            Op::SendAcked {
                subject,
                reply_to,
                timeout_ms,
            } => {
                super::send_acked(&session, subject, &body, reply_to.as_deref(), *timeout_ms)
                    .await?;
                Ok(Value::Null)
            }
            Op::Get => json(self.registry().info(&session)),
            Op::SetMetadata { key, value } => {
                session.set_metadata(key.clone(), value.clone())?;
                self.keep_state(&session).await;
                Ok(Value::Null)
            }
            Op::GetMetadata { key } => json(session.get_metadata(key)),
            Op::RemoveMetadata { key } => {
                session.remove_metadata(key);
                self.keep_state(&session).await;
                Ok(Value::Null)
            }
            Op::Join { group } => {
                self.registry().join(&session, group)?;
                self.keep_state(&session).await;
                Ok(Value::Null)
            }
            Op::Leave { group } => {
                self.registry().leave(&session, group);
                self.keep_state(&session).await;
                Ok(Value::Null)
            }
            Op::Close { code, reason } => {
                session.outbox.close(*code, reason).await?;
                Ok(Value::Null)
            }
            _ => Err("not a session call".into()),
        }
    }

    /// This replica's part of a lattice-wide call.
    async fn on_all(
        &self,
        component: &str,
        op: &Op,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Value, String> {
        let write = |sessions: Vec<Arc<Session>>, subject: &str, reply_to: &Option<String>, ft| {
            let msg = BrokerMessage {
                subject: subject.to_string(),
                body: body.clone(),
                reply_to: reply_to.clone(),
            };
            async move {
                let results = send_all(&sessions, &msg.subject, &msg, ft, timeout).await;
                for r in &results {
                    self.count_publish(r);
                }
                // (delivered, attempted)
                json((count(&results), results.len()))
            }
        };
        match op {
            Op::List => json(
                self.owned_sessions(component)
                    .iter()
                    .map(|s| self.registry().info(s))
                    .collect::<Vec<SessionInfo>>(),
            ),
            Op::Members { group } => json(
                self.registry()
                    .group_members(component, group)
                    .iter()
                    .map(|s| s.id)
                    .collect::<Vec<Uuid>>(),
            ),
            Op::Owned { ids } => json(
                ids.iter()
                    .filter(|id| self.registry().get_owned(component, id).is_some())
                    .collect::<Vec<&Uuid>>(),
            ),
            Op::Broadcast { subject, reply_to } => {
                let sessions = self
                    .owned_sessions(component)
                    .into_iter()
                    .filter(|s| s.outbox.reachable())
                    .collect();
                write(sessions, subject, reply_to, None).await
            }
            Op::SendGroup {
                group,
                subject,
                reply_to,
            } => {
                let sessions = self
                    .registry()
                    .group_members(component, group)
                    .into_iter()
                    .filter(|s| s.outbox.reachable())
                    .collect();
                write(sessions, subject, reply_to, None).await
            }
            Op::SendMany {
                ids,
                subject,
                reply_to,
            } => {
                let sessions = ids
                    .iter()
                    .filter_map(|id| self.registry().get_owned(component, id))
                    .collect();
                write(sessions, subject, reply_to, None).await
            }
            Op::ServerLink {
                link,
                subject,
                reply_to,
                frame_type: code,
            } => {
                let sessions = self.server_clients(component, link);
                write(sessions, subject, reply_to, frame_type(*code)).await
            }
            _ => Err("not a lattice-wide call".into()),
        }
    }

    /// Serves a call another replica forwarded: the same ownership rules as a local call.
    pub(crate) async fn serve_forwarded(&self, call: Call) -> Result<Value, String> {
        let timeout = Duration::from_millis(call.timeout_ms.min(600_000));
        match call.session {
            Some(id) => {
                let on_connection = matches!(call.op, Op::Publish { .. } | Op::Request { .. });
                let session = self
                    .registry()
                    .get_owned(&call.component, &id)
                    .or_else(|| {
                        // A publish on a link's own connection names it even when the link
                        // does not track sessions.
                        on_connection
                            .then(|| self.registry().connection_of(&call.component, &id))
                            .flatten()
                    })
                    .ok_or_else(|| format!("unknown session {id}"))?;
                self.on_session(session, &call.op, call.body).await
            }
            None => {
                self.on_all(&call.component, &call.op, call.body, timeout)
                    .await
            }
        }
    }

    /// Forwards a session call to the replica holding `id`, if replicas share sessions.
    pub(super) async fn forward(
        &self,
        component: &str,
        id: &str,
        op: &Op,
        body: &[u8],
        timeout: Duration,
    ) -> Option<Result<Value, String>> {
        let cluster = self.cluster_now()?;
        let id = Uuid::parse_str(id).ok()?;
        if self.registry().holds(&id) {
            // Here, but not the caller's (or not tracked): no other replica has it either.
            return None;
        }
        Some(
            cluster
                .call_session(&id, component, op, body, timeout)
                .await,
        )
    }

    /// A session call: served here when the session is here, else by the replica holding it.
    pub(super) async fn session_call(
        &self,
        component: &str,
        id: &str,
        op: Op,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Value, String> {
        match self.owned_session(component, id) {
            Ok(session) => self.on_session(session, &op, body).await,
            Err(unknown) => match self.forward(component, id, &op, &body, timeout).await {
                Some(result) => result,
                None => Err(unknown),
            },
        }
    }

    /// A lattice-wide call: this replica's answer and the others', gathered at once. The others
    /// get three quarters of `timeout` for their own part, so that their answers arrive within
    /// it.
    pub(super) async fn all_call(
        &self,
        component: &str,
        op: Op,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(Vec<Value>, usize, usize), String> {
        let local = self.on_all(component, &op, body.clone(), timeout);
        let Some(cluster) = self.cluster_now() else {
            return Ok((vec![local.await?], 0, 0));
        };
        let remote = cluster.call_all(component, &op, &body, timeout * 3 / 4, timeout);
        let (local, gathered) = futures::future::join(local, remote).await;
        let mut values = vec![local?];
        for answer in gathered.answers {
            values.push(answer?);
        }
        Ok((values, gathered.unreached, gathered.expected))
    }

    /// A lattice-wide write: how many sessions got it, across replicas.
    pub(super) async fn all_write(
        &self,
        component: &str,
        op: Op,
        body: Bytes,
        timeout: Duration,
    ) -> Result<u32, String> {
        self.all_write_counts(component, op, body, timeout)
            .await
            .and_then(|(reach, _)| reach.result())
    }

    /// A lattice-wide write: its reach and how many sessions it was written to.
    pub(super) async fn all_write_counts(
        &self,
        component: &str,
        op: Op,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(Reach, u32), String> {
        let (values, unreached, expected) = self.all_call(component, op, body, timeout).await?;
        let (mut delivered, mut attempted) = (0u32, 0u32);
        for v in values {
            let (d, a) = parse::<(u32, u32)>(v)?;
            delivered = delivered.saturating_add(d);
            attempted = attempted.saturating_add(a);
        }
        let reach = Reach {
            delivered,
            unreached,
            expected,
            timeout,
        };
        Ok((reach, attempted))
    }
}
