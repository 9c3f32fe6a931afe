//! wasmCloud capability provider for `wasmcloud:messaging@0.2.0` over WebSocket.
//!
//! Layers, each readable alone:
//! - [`ws`]: WebSocket transport (connect, reconnect, read, write); no wasmCloud types;
//! - [`sessions`]: the session registry, the only shared state;
//! - [`dispatch`]: inbound frames to a component's `handle-message`;
//! - [`provider`] and [`exports`]: the wasmCloud glue (links, health, shutdown, wRPC exports);
//! - [`wrpc`]: the client for calls into components (`handle-message`);
//! - [`config`]: typed, case-insensitive link configuration.

pub mod config;
pub mod connection;
pub mod dispatch;
pub mod envelope;
pub mod exports;
pub mod listener;
pub mod provider;
pub mod sessions;
pub mod stats;
pub mod task;
pub mod wrpc;
pub mod ws;

pub use provider::WsProvider;

/// Generated wRPC bindings for the provider's world (`wit/provider.wit`).
pub mod bindings {
    wit_bindgen_wrpc::generate!({
        world: "provider",
        with: {
            "wasmcloud:messaging/consumer@0.2.0": generate,
            "wasmcloud:messaging/handler@0.2.0": generate,
            "wasmcloud:messaging/types@0.2.0": generate,
            "wasmcloud-websocket:provider/sessions@0.1.0": generate,
        }
    });
}

/// The name the provider reports to the host and in logs.
pub const PROVIDER_NAME: &str = "messaging-websocket-provider";

/// Runs the provider until the host shuts it down.
pub async fn run() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use wasmcloud_provider_sdk::{get_connection, run_provider, serve_provider_exports};

    // wss:// uses rustls with ring; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    wasmcloud_provider_sdk::initialize_observability!(
        PROVIDER_NAME,
        std::env::var_os("PROVIDER_MESSAGING_WEBSOCKET_FLAMEGRAPH_PATH")
    );
    let provider = WsProvider::default();
    let shutdown = run_provider(provider.clone(), PROVIDER_NAME)
        .await
        .context("failed to run provider")?;
    let connection = get_connection();
    let wrpc = connection
        .get_wrpc_client(connection.provider_key())
        .await
        .context("failed to create the wRPC client for exports")?;
    serve_provider_exports(&wrpc, provider, shutdown, bindings::serve)
        .await
        .context("failed to serve exports")
}
