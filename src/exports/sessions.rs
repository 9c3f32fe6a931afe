//! `wasmcloud-websocket:provider/sessions@0.1.0`: the session API, over the caller's own
//! sessions only, with the WIT conversions of session info.

use wasmcloud_provider_sdk::Context;

use std::time::Duration;

use bytes::Bytes;

use super::forwarded::{parse, FORWARD_TIMEOUT};
use super::{caller, send_to};
use crate::bindings::exports::wasmcloud_websocket::provider::sessions::{
    self, RequestInfo, SessionInfo,
};
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::cluster::wire::Op;
use crate::provider::WsProvider;

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

/// A lattice-wide list that some replicas did not answer for.
fn incomplete(unreached: usize, expected: usize, timeout: Duration) -> String {
    format!(
        "{unreached} of {expected} other provider replicas did not answer within {} ms; the answer would be incomplete",
        timeout.as_millis()
    )
}

impl WsProvider {
    /// A session call by the caller on its session `id`, wherever the session is.
    async fn call(
        &self,
        cx: &Option<Context>,
        id: &str,
        op: Op,
        body: Bytes,
    ) -> Result<serde_json::Value, String> {
        let (component, _) = caller(cx)?;
        self.session_call(component, id, op, body, FORWARD_TIMEOUT)
            .await
    }
}

impl sessions::Handler<Option<Context>> for WsProvider {
    async fn list_sessions(
        &self,
        cx: Option<Context>,
    ) -> anyhow::Result<Result<Vec<SessionInfo>, String>> {
        let (component, _) = match caller(&cx) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let timeout = self.fanout_of(&cx);
        let listed = self
            .all_call(component, Op::List, Bytes::new(), timeout)
            .await
            .and_then(|(values, unreached, expected)| {
                if unreached > 0 {
                    return Err(incomplete(unreached, expected, timeout));
                }
                let mut all = Vec::new();
                for v in values {
                    all.extend(parse::<Vec<crate::session::SessionInfo>>(v)?);
                }
                all.sort_by_key(|s| s.id);
                Ok(all.into_iter().map(to_wit).collect())
            });
        Ok(listed)
    }

    async fn get_session(
        &self,
        cx: Option<Context>,
        id: String,
    ) -> anyhow::Result<Result<SessionInfo, String>> {
        Ok(self
            .call(&cx, &id, Op::Get, Bytes::new())
            .await
            .and_then(parse)
            .map(to_wit))
    }

    async fn send(
        &self,
        cx: Option<Context>,
        id: String,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<(), String>> {
        let result = match self.session_of(&cx, &id) {
            Ok(session) => send_to(&session, &msg.subject, &msg, None).await,
            Err(unknown) => {
                let op = Op::Publish {
                    subject: msg.subject.clone(),
                    reply_to: msg.reply_to.clone(),
                    frame_type: None,
                };
                match caller(&cx) {
                    Ok((component, _)) => match self
                        .forward(component, &id, &op, &msg.body, FORWARD_TIMEOUT)
                        .await
                    {
                        Some(r) => r.map(drop),
                        None => Err(unknown),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        self.count_publish(&result);
        Ok(result)
    }

    async fn send_acked(
        &self,
        cx: Option<Context>,
        id: String,
        msg: BrokerMessage,
        timeout_ms: u32,
    ) -> anyhow::Result<Result<(), String>> {
        let op = Op::SendAcked {
            subject: msg.subject,
            reply_to: msg.reply_to,
            timeout_ms,
        };
        let result = match caller(&cx) {
            Ok((component, _)) => {
                let wait = Duration::from_millis(u64::from(timeout_ms)) + FORWARD_TIMEOUT;
                self.session_call(component, &id, op, msg.body, wait)
                    .await
                    .map(drop)
            }
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
        let op = Op::Broadcast {
            subject: msg.subject,
            reply_to: msg.reply_to,
        };
        Ok(self
            .all_write(component, op, msg.body, self.fanout_of(&cx))
            .await)
    }

    async fn send_many(
        &self,
        cx: Option<Context>,
        ids: Vec<String>,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<u32, String>> {
        let (component, _) = match caller(&cx) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let timeout = self.fanout_of(&cx);
        // Every ID must be the caller's, here or on another replica: nothing is sent when one is
        // not.
        let mut wanted = Vec::new();
        for id in &ids {
            match uuid::Uuid::parse_str(id) {
                Ok(uuid) => wanted.push(uuid),
                Err(_) => return Ok(Err(format!("unknown session {id}"))),
            }
        }
        wanted.sort();
        wanted.dedup();
        let elsewhere: Vec<uuid::Uuid> = wanted
            .iter()
            .filter(|id| self.registry().get_owned(component, id).is_none())
            .copied()
            .collect();
        if !elsewhere.is_empty() {
            let owned = Op::Owned {
                ids: elsewhere.clone(),
            };
            let found = match self.all_call(component, owned, Bytes::new(), timeout).await {
                Ok((values, 0, _)) => values,
                Ok((_, unreached, expected)) => {
                    return Ok(Err(incomplete(unreached, expected, timeout)))
                }
                Err(e) => return Ok(Err(e)),
            };
            let mut seen = Vec::new();
            for v in found {
                match parse::<Vec<uuid::Uuid>>(v) {
                    Ok(ids) => seen.extend(ids),
                    Err(e) => return Ok(Err(e)),
                }
            }
            if let Some(missing) = elsewhere.iter().find(|id| !seen.contains(id)) {
                return Ok(Err(format!("unknown session {missing}")));
            }
        }
        let op = Op::SendMany {
            ids: wanted,
            subject: msg.subject,
            reply_to: msg.reply_to,
        };
        Ok(self.all_write(component, op, msg.body, timeout).await)
    }

    async fn join_group(
        &self,
        cx: Option<Context>,
        id: String,
        group: String,
    ) -> anyhow::Result<Result<(), String>> {
        Ok(self
            .call(&cx, &id, Op::Join { group }, Bytes::new())
            .await
            .map(drop))
    }

    async fn leave_group(
        &self,
        cx: Option<Context>,
        id: String,
        group: String,
    ) -> anyhow::Result<Result<(), String>> {
        Ok(self
            .call(&cx, &id, Op::Leave { group }, Bytes::new())
            .await
            .map(drop))
    }

    async fn group_members(
        &self,
        cx: Option<Context>,
        group: String,
    ) -> anyhow::Result<Result<Vec<String>, String>> {
        let (component, _) = match caller(&cx) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let timeout = self.fanout_of(&cx);
        let members = self
            .all_call(component, Op::Members { group }, Bytes::new(), timeout)
            .await
            .and_then(|(values, unreached, expected)| {
                if unreached > 0 {
                    return Err(incomplete(unreached, expected, timeout));
                }
                let mut ids = Vec::new();
                for v in values {
                    ids.extend(parse::<Vec<uuid::Uuid>>(v)?);
                }
                let mut ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
                ids.sort();
                ids.dedup();
                Ok(ids)
            });
        Ok(members)
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
        let op = Op::SendGroup {
            group,
            subject: msg.subject,
            reply_to: msg.reply_to,
        };
        Ok(self
            .all_write(component, op, msg.body, self.fanout_of(&cx))
            .await)
    }

    async fn set_metadata(
        &self,
        cx: Option<Context>,
        id: String,
        key: String,
        value: String,
    ) -> anyhow::Result<Result<(), String>> {
        let op = Op::SetMetadata { key, value };
        Ok(self.call(&cx, &id, op, Bytes::new()).await.map(drop))
    }

    async fn get_metadata(
        &self,
        cx: Option<Context>,
        id: String,
        key: String,
    ) -> anyhow::Result<Result<Option<String>, String>> {
        let op = Op::GetMetadata { key };
        Ok(self.call(&cx, &id, op, Bytes::new()).await.and_then(parse))
    }

    async fn remove_metadata(
        &self,
        cx: Option<Context>,
        id: String,
        key: String,
    ) -> anyhow::Result<Result<(), String>> {
        let op = Op::RemoveMetadata { key };
        Ok(self.call(&cx, &id, op, Bytes::new()).await.map(drop))
    }

    async fn close(
        &self,
        cx: Option<Context>,
        id: String,
        code: u16,
        reason: String,
    ) -> anyhow::Result<Result<(), String>> {
        let op = Op::Close { code, reason };
        Ok(self.call(&cx, &id, op, Bytes::new()).await.map(drop))
    }
}
