//! wasmCloud capability provider for `wasmcloud:messaging@0.2.0` over WebSocket.
//!
//! Layers, each readable alone:
//! - [`ws`]: WebSocket transport (connect, reconnect, read, write); no wasmCloud types;
//! - [`sessions`]: the session registry, the only shared state;
//! - [`dispatch`]: inbound frames to a component's `handle-message`;
//! - [`provider`] and [`exports`]: the wasmCloud glue (links, health, shutdown, wRPC exports);
//! - [`wrpc`]: wRPC over NATS both ways: calls into components (`handle-message`) and the
//!   server for the provider's own exports;
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

/// Provider config key: how often OpenTelemetry metrics are exported, in milliseconds (the
/// OpenTelemetry SDK's own default is 60 s). The host clears the provider's environment, so the
/// standard `OTEL_METRIC_EXPORT_INTERVAL` variable can only come from here.
pub const METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";

/// Sets `OTEL_METRIC_EXPORT_INTERVAL` for the metrics exporter from the provider's config;
/// returns a warning for a value that is not a positive number of milliseconds.
fn export_interval_from_config() -> Option<String> {
    let host = wasmcloud_provider_sdk::provider::load_host_data().ok()?;
    let value = host
        .config
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(METRIC_EXPORT_INTERVAL))
        .map(|(_, v)| v.trim());
    match value {
        Some(ms) if ms.parse::<u64>().is_ok_and(|ms| ms > 0) => {
            // Before any other thread reads the environment: the runtime has one thread, and
            // the exporter is built after this.
            std::env::set_var(METRIC_EXPORT_INTERVAL, ms);
            None
        }
        Some(bad) => Some(format!(
            "{METRIC_EXPORT_INTERVAL}={bad:?} is not a positive number of milliseconds; using the default (60 s)"
        )),
        None => None,
    }
}

/// Runs the provider until the host shuts it down.
pub async fn run() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use wasmcloud_provider_sdk::{get_connection, run_provider};

    // wss:// uses rustls with ring; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let interval_warning = export_interval_from_config();
    wasmcloud_provider_sdk::initialize_observability!(
        PROVIDER_NAME,
        std::env::var_os("PROVIDER_MESSAGING_WEBSOCKET_FLAMEGRAPH_PATH")
    );
    if let Some(warning) = interval_warning {
        tracing::warn!("{warning}");
    }
    // After observability: its metrics instruments come from the meter provider set up there.
    let provider = WsProvider::default();
    let shutdown = run_provider(provider.clone(), PROVIDER_NAME)
        .await
        .context("failed to run provider")?;
    let connection = get_connection();
    // The exports are served on the SDK's lattice connection by our own server (`wrpc`), which
    // cannot lose a caller's parameters the way wrpc-transport-nats 0.29 can.
    let server = wrpc::Server::new(
        (*connection.nats).clone(),
        &connection.lattice,
        connection.provider_key(),
    )
    .await
    .context("failed to start serving exports")?;
    let invocations = bindings::serve(&server, provider)
        .await
        .context("failed to serve exports")?;
    wrpc::serve_exports(invocations, shutdown).await;
    Ok(())
}
