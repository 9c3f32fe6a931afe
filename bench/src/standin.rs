//! The native stand-in component and the provider it is linked with.
//!
//! The stand-in runs in a process of its own (so its CPU time is its own) and serves:
//! - component `standin`: `handle-message` that publishes each body back to its session through
//!   the provider's `consumer.publish`, or runs a fan-out command (`!fanout-prepare`,
//!   `!fanout <n|all>`) through the provider's session API;
//! - component `b3`: `handle-message` that returns at once (baseline B3, a raw wRPC call);
//! - NATS subject `bench.echo`: a plain request/reply responder (baseline B2);
//! - NATS subject `bench.standin.stats`: its hung and failed call counts, as JSON.
//!
//! It calls the provider with the provider's own race-free client and serves `handle-message`
//! with the provider's own server (`src/wrpc/`), so that P measures the provider, not
//! wrpc-transport-nats 0.29's lost replies in the caller.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use wasmcloud_provider_messaging_websocket::wrpc::{
    self, ComponentClient, ExportServer, InvocationContext as Context, Invoker,
};

mod bindings {
    wit_bindgen_wrpc::generate!({ world: "standin", path: "wit", generate_all });
}

use bindings::wasmcloud::messaging::consumer;
use bindings::wasmcloud::messaging::types::BrokerMessage;
use bindings::wasmcloud_websocket::provider::sessions;

pub const LATTICE: &str = "default";
pub const PROVIDER_ID: &str = "ws-messaging";
const STANDIN_ID: &str = "standin";
pub const B3_ID: &str = "b3";
/// The subject of the provider's server link: a publish to it reaches every client.
const LINK_SUBJECT: &str = "ws.bench";
/// Every call the stand-in makes is bounded by this; longer ones are counted as hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct StandIn {
    provider: ComponentClient,
    /// Session IDs for fan-out, from the last `!fanout-prepare`.
    targets: Arc<Mutex<Vec<String>>>,
    hung: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

fn headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("source-id", STANDIN_ID);
    headers.insert("link-name", "default");
    headers
}

impl StandIn {
    /// Runs one call into the provider with the timeout, counting hangs and failures.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = anyhow::Result<Result<T, String>>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            Ok(Err(e)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(format!("{e:#}"))
            }
            Err(_) => {
                self.hung.fetch_add(1, Ordering::Relaxed);
                Err("call hung".into())
            }
        }
    }

    async fn reply(&self, to: &str, body: impl Into<bytes::Bytes>) -> Result<(), String> {
        let out = BrokerMessage {
            subject: to.to_string(),
            body: body.into(),
            reply_to: None,
        };
        self.call(consumer::publish(&self.provider, Some(headers()), &out))
            .await
    }

    async fn fanout(&self, caller: &str, command: &str) -> Result<String, String> {
        if command == "prepare" {
            let sessions = self
                .call(sessions::list_sessions(&self.provider, Some(headers())))
                .await?;
            let ids: Vec<String> = sessions
                .into_iter()
                .map(|s| s.id)
                .filter(|id| id != caller)
                .collect();
            let n = ids.len();
            *self.targets.lock().unwrap_or_else(|e| e.into_inner()) = ids;
            return Ok(format!("ready {n}"));
        }
        let msg = |subject: &str| BrokerMessage {
            subject: subject.to_string(),
            body: bytes::Bytes::from_static(b"fan-out message, 32 bytes long.."),
            reply_to: None,
        };
        let delivered = if command == "all" {
            self.call(sessions::broadcast(
                &self.provider,
                Some(headers()),
                &msg(LINK_SUBJECT),
            ))
            .await?
        } else {
            let n: usize = command
                .parse()
                .map_err(|_| format!("bad fan-out count {command:?}"))?;
            let ids: Vec<String> = {
                let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
                targets.iter().take(n).cloned().collect()
            };
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            self.call(sessions::send_many(
                &self.provider,
                Some(headers()),
                &ids,
                &msg(LINK_SUBJECT),
            ))
            .await?
        };
        Ok(format!("done {delivered}"))
    }
}

impl bindings::exports::wasmcloud::messaging::handler::Handler<Option<Context>> for StandIn {
    async fn handle_message(
        &self,
        _cx: Option<Context>,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<(), String>> {
        let Some(reply_to) = msg.reply_to else {
            return Ok(Err("no reply_to".to_string()));
        };
        if let Some(command) = msg.body.strip_prefix(b"!fanout") {
            let caller = reply_to.strip_prefix("ws.session.").unwrap_or_default();
            let command = String::from_utf8_lossy(command).trim().to_string();
            let command = command.strip_prefix('-').unwrap_or(&command).to_string();
            let answer = match self.fanout(caller, &command).await {
                Ok(answer) => answer,
                Err(e) => format!("error {e}"),
            };
            return Ok(self.reply(&reply_to, answer).await);
        }
        Ok(self.reply(&reply_to, msg.body).await)
    }
}

/// Baseline B3's server: a `handle-message` that does nothing.
#[derive(Clone)]
struct Noop;

impl<C: Send + Sync + 'static> bindings::exports::wasmcloud::messaging::handler::Handler<C>
    for Noop
{
    async fn handle_message(
        &self,
        _cx: C,
        _msg: BrokerMessage,
    ) -> anyhow::Result<Result<(), String>> {
        Ok(Ok(()))
    }
}

/// Serves every invocation of `server`'s exports on its own task.
async fn serve_exports<S, H>(server: S, handler: H) -> Result<()>
where
    S: wrpc_transport::Serve + Send + 'static,
    H: bindings::exports::wasmcloud::messaging::handler::Handler<S::Context>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let invocations = bindings::serve(&server, handler).await?;
    tokio::spawn(async move {
        let _server = server;
        wrpc::serve_exports(invocations, std::future::pending()).await;
    });
    Ok(())
}

/// `--serve-standin NATS_URL`: runs the stand-in process until killed.
pub async fn serve(nats_url: &str) -> Result<()> {
    let nats = async_nats::connect(nats_url).await?;
    let server = |id: &str| {
        let prefix = format!("{LATTICE}.{id}");
        wrpc_transport_nats::Client::new(nats.clone(), prefix.clone(), Some(prefix.into()))
    };
    let provider = Invoker::new(nats.clone(), LATTICE, STANDIN_ID)
        .await?
        .component(PROVIDER_ID);
    let standin = StandIn {
        provider,
        targets: Arc::default(),
        hung: Arc::default(),
        failed: Arc::default(),
    };
    // The stand-in serves `handle-message` the way the provider serves its own exports (a
    // native component has no host in between); B3 keeps the stock 0.29 server and client.
    let own = ExportServer::new(nats.clone(), LATTICE, STANDIN_ID).await?;
    serve_exports(own, standin.clone()).await?;
    serve_exports(server(B3_ID).await?, Noop).await?;

    let mut echo = nats.subscribe("bench.echo").await?;
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(m) = echo.next().await {
            if let Some(reply) = m.reply {
                let _ = responder.publish(reply, m.payload).await;
            }
        }
    });
    let mut stats = nats.subscribe("bench.standin.stats").await?;
    while let Some(m) = stats.next().await {
        if let Some(reply) = m.reply {
            let body = serde_json::json!({
                "hung": standin.hung.load(Ordering::Relaxed),
                "failed": standin.failed.load(Ordering::Relaxed),
            });
            let _ = nats.publish(reply, body.to_string().into()).await;
        }
    }
    Ok(())
}

/// The stand-in's hung and failed call counts so far.
pub async fn stats(nats: &async_nats::Client) -> Result<(u64, u64)> {
    let reply = nats
        .request("bench.standin.stats", bytes::Bytes::new())
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    Ok((
        v["hung"].as_u64().unwrap_or(0),
        v["failed"].as_u64().unwrap_or(0),
    ))
}

/// Waits until the stand-in answers on NATS.
pub async fn wait_ready(nats: &async_nats::Client) -> Result<()> {
    for _ in 0..100 {
        if tokio::time::timeout(Duration::from_millis(500), stats(nats))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the stand-in did not start")
}

/// Starts the provider binary with host data naming its links: a server-mode handler link to
/// the stand-in on `port`, and the stand-in's consumer link.
pub async fn start_provider(bin: &str, nats_url: &str, port: u16) -> Result<tokio::process::Child> {
    start_replica(bin, nats_url, port, "bench-host").await
}

/// The ports of the `FORMAT=json` server links of [`start_provider_json`].
#[derive(Clone, Copy)]
pub struct JsonPorts {
    /// Link `bench-json`: `FORMAT=json`.
    pub json: u16,
    /// Link `bench-recovery`: `FORMAT=json`, `RECOVERY=true`.
    pub recovery: u16,
}

/// [`start_provider`] with two more server links to the stand-in for the cost of recovery and
/// acknowledgments (issue 16, `json.rs`): same settings as the first, but `FORMAT=json`, one of
/// them with `RECOVERY=true` (its history in the bench's JetStream).
pub async fn start_provider_json(
    bin: &str,
    nats_url: &str,
    port: u16,
    json: JsonPorts,
) -> Result<tokio::process::Child> {
    let links = [
        server_link("bench-json", json.json, &[("FORMAT", "json")]),
        server_link(
            "bench-recovery",
            json.recovery,
            &[("FORMAT", "json"), ("RECOVERY", "true")],
        ),
    ];
    start_with(bin, nats_url, port, "bench-host", &links).await
}

/// [`start_provider`] as if on host `host_id`: replicas differ only in their host and port.
pub async fn start_replica(
    bin: &str,
    nats_url: &str,
    port: u16,
    host_id: &str,
) -> Result<tokio::process::Child> {
    start_with(bin, nats_url, port, host_id, &[]).await
}

/// A server-mode handler link named `name` from the provider to the stand-in on `port`, with
/// `config` over the bench's settings.
fn server_link(name: &str, port: u16, config: &[(&str, &str)]) -> serde_json::Value {
    let mut source_config = serde_json::json!({
        "MODE": "server",
        "LISTEN_ADDRESS": format!("127.0.0.1:{port}"),
        "MAX_CONNECTIONS": "100000",
        // The load generator opens 100 handshakes at once from one address.
        "MAX_HANDSHAKES_PER_ADDRESS": "65536",
        "MAX_PENDING_HANDSHAKES": "65536",
    });
    for (k, v) in config {
        source_config[*k] = serde_json::Value::from(*v);
    }
    serde_json::json!({
        "source_id": PROVIDER_ID, "target": STANDIN_ID, "name": name,
        "wit_namespace": "wasmcloud", "wit_package": "messaging", "interfaces": ["handler"],
        "source_config": source_config,
        "target_config": {}
    })
}

async fn start_with(
    bin: &str,
    nats_url: &str,
    port: u16,
    host_id: &str,
    extra_links: &[serde_json::Value],
) -> Result<tokio::process::Child> {
    let mut host_data = serde_json::json!({
        "host_id": host_id,
        "lattice_rpc_prefix": LATTICE,
        "link_name": "default",
        "lattice_rpc_url": nats_url,
        "provider_key": PROVIDER_ID,
        "env_values": {},
        "instance_id": "bench",
        "link_definitions": [
            {
                "source_id": PROVIDER_ID, "target": STANDIN_ID, "name": "bench",
                "wit_namespace": "wasmcloud", "wit_package": "messaging", "interfaces": ["handler"],
                "source_config": {
                    "MODE": "server",
                    "LISTEN_ADDRESS": format!("127.0.0.1:{port}"),
                    "MAX_CONNECTIONS": "100000",
                    // The load generator opens 100 handshakes at once from one address.
                    "MAX_HANDSHAKES_PER_ADDRESS": "65536",
                    "MAX_PENDING_HANDSHAKES": "65536",
                    "FRAME_TYPE": "binary",
                },
                "target_config": {}
            },
            {
                "source_id": STANDIN_ID, "target": PROVIDER_ID, "name": "default",
                "wit_namespace": "wasmcloud", "wit_package": "messaging", "interfaces": ["consumer"],
                "source_config": {}, "target_config": {}
            },
            {
                "source_id": STANDIN_ID, "target": PROVIDER_ID, "name": "default",
                "wit_namespace": "wasmcloud-websocket", "wit_package": "provider", "interfaces": ["sessions"],
                "source_config": {}, "target_config": {}
            }
        ],
        "config": {},
        "secrets": {},
        "host_xkey_public_key": "",
        "provider_xkey_private_key": "",
        "structured_logging": false
    });
    if let Some(links) = host_data["link_definitions"].as_array_mut() {
        links.extend(extra_links.iter().cloned());
    }
    let line = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&host_data)?);
    let mut child = tokio::process::Command::new(bin)
        .env_clear()
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start the provider {bin}"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    stdin.write_all(line.as_bytes()).await?;
    stdin.write_all(b"\r\n").await?;
    drop(stdin);
    Ok(child)
}
