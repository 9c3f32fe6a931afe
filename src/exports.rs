//! wRPC exports: `wasmcloud:messaging/consumer@0.2.0`.
//!
//! The caller is the component named by the invocation's `source-id`; the link it called on is
//! the `link-name` header. Every failure a component can cause or fix (no link, not connected,
//! full queue, unknown session) is returned as `Ok(Err(reason))`, which the component sees as an
//! error value; `Err` would trap it and is never returned.

use tracing::debug;
use wasmcloud_provider_sdk::Context;

use crate::bindings::exports::wasmcloud::messaging::consumer::Handler;
use crate::bindings::wasmcloud::messaging::types::BrokerMessage;
use crate::provider::WsProvider;
use crate::stats::Stats;

fn caller(cx: &Option<Context>) -> Result<(&str, &str), String> {
    let cx = cx.as_ref().ok_or("invocation carries no context")?;
    let component = cx
        .component
        .as_deref()
        .ok_or("invocation names no source component")?;
    Ok((component, cx.link_name()))
}

impl Handler<Option<Context>> for WsProvider {
    async fn publish(
        &self,
        cx: Option<Context>,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<(), String>> {
        let result = async {
            let (component, link_name) = caller(&cx)?;
            let (session, frame_type) = self.route_publish(component, link_name, &msg.subject)?;
            debug!(component, link = link_name, session = %session.id, bytes = msg.body.len(), "publish");
            session.send(msg.body, frame_type).await
        }
        .await;
        match &result {
            Ok(()) => Stats::bump(&self.stats().published),
            Err(error) => {
                Stats::bump(&self.stats().publish_errors);
                debug!(%error, "publish refused");
            }
        }
        Ok(result)
    }

    async fn request(
        &self,
        _cx: Option<Context>,
        subject: String,
        _body: bytes::Bytes,
        _timeout_ms: u32,
    ) -> anyhow::Result<Result<BrokerMessage, String>> {
        Ok(Err(format!(
            "request to {subject:?} refused: request-reply needs FORMAT=json, which this version does not support yet"
        )))
    }
}
