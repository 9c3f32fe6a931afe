//! Benchmark P's moving parts: the provider binary, started by hand the way a host starts it
//! (host data as one base64 JSON line on stdin, links included), and a native stand-in component
//! that serves `handle-message` over wRPC and publishes each body back to its session.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

mod bindings {
    wit_bindgen_wrpc::generate!({ world: "standin", path: "wit", generate_all });
}

use bindings::wasmcloud::messaging::consumer;
use wasmcloud_provider_messaging_websocket::wrpc::{ComponentClient, Invoker};
use bindings::wasmcloud::messaging::types::BrokerMessage;

const LATTICE: &str = "default";
const PROVIDER_ID: &str = "ws-messaging";
const STANDIN_ID: &str = "standin";

/// The stand-in's shared state: the wRPC client that calls the provider, and hung-call counts.
/// It calls with the provider's own race-free client (`src/wrpc.rs`), so that what the bench
/// measures is the provider, not wrpc-transport-nats 0.29's lost replies in the caller.
#[derive(Clone)]
pub struct StandIn {
    provider: ComponentClient,
    pub hung: Arc<AtomicU64>,
}

impl bindings::exports::wasmcloud::messaging::handler::Handler<Option<async_nats::HeaderMap>> for StandIn {
    async fn handle_message(
        &self,
        _cx: Option<async_nats::HeaderMap>,
        msg: BrokerMessage,
    ) -> anyhow::Result<Result<(), String>> {
        let Some(reply_to) = msg.reply_to else {
            return Ok(Err("no reply_to".to_string()));
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("source-id", STANDIN_ID);
        headers.insert("link-name", "default");
        let out = BrokerMessage {
            subject: reply_to,
            body: msg.body,
            reply_to: None,
        };
        // Bound the whole call: wrpc-transport-nats 0.29 can lose a reply under load.
        match tokio::time::timeout(Duration::from_secs(10), consumer::publish(&self.provider, Some(headers), &out)).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Ok(Err(format!("{e:#}"))),
            Err(_) => {
                self.hung.fetch_add(1, Ordering::Relaxed);
                Ok(Err("publish hung".to_string()))
            }
        }
    }
}

/// Starts serving the stand-in's `handle-message` on NATS.
pub async fn start(nats_url: &str) -> Result<StandIn> {
    let nats = async_nats::connect(nats_url).await?;
    let prefix = format!("{LATTICE}.{STANDIN_ID}");
    let server = wrpc_transport_nats::Client::new(nats.clone(), prefix.clone(), Some(prefix.into())).await?;
    let provider = Invoker::new(nats, LATTICE, STANDIN_ID).await?.component(PROVIDER_ID);
    let standin = StandIn {
        provider,
        hung: Arc::default(),
    };
    let invocations = bindings::serve(&server, standin.clone()).await?;
    let mut invocations = futures::stream::select_all(invocations.into_iter().map(|(_, _, s)| s));
    tokio::spawn(async move {
        let _server = server;
        while let Some(invocation) = invocations.next().await {
            if let Ok(fut) = invocation {
                tokio::spawn(fut);
            }
        }
    });
    Ok(standin)
}

/// Starts the provider binary with host data naming its links: a server-mode handler link to
/// the stand-in on `port`, and the stand-in's consumer link.
pub async fn start_provider(bin: &str, nats_url: &str, port: u16) -> Result<tokio::process::Child> {
    let host_data = serde_json::json!({
        "host_id": "bench-host",
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
                },
                "target_config": {}
            },
            {
                "source_id": STANDIN_ID, "target": PROVIDER_ID, "name": "default",
                "wit_namespace": "wasmcloud", "wit_package": "messaging", "interfaces": ["consumer"],
                "source_config": {}, "target_config": {}
            }
        ],
        "config": {},
        "secrets": {},
        "host_xkey_public_key": "",
        "provider_xkey_private_key": "",
        "structured_logging": false
    });
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
