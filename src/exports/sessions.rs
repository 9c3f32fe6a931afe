//! `wasmcloud-websocket:provider/sessions@0.1.0`: the session API, over the caller's own
//! sessions only, with the WIT conversions of session info.

use wasmcloud_provider_sdk::Context;

use super::{caller, send_all, send_to};
use crate::bindings::exports::wasmcloud_websocket::provider::sessions::{
    self, RequestInfo, SessionInfo,
};
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
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
