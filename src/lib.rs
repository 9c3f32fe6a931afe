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

/// Provider config key: how many threads run the provider. 1 is a current-thread runtime;
/// more is a multi-threaded runtime with that many workers.
pub const RUNTIME_THREADS: &str = "RUNTIME_THREADS";
/// The most threads `RUNTIME_THREADS` may ask for.
pub const MAX_RUNTIME_THREADS: usize = 64;

/// One value of the provider's own config (named config given at start), case-insensitive.
fn provider_config(key: &str) -> Option<String> {
    let host = wasmcloud_provider_sdk::provider::load_host_data().ok()?;
    host.config
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.trim().to_string())
}

/// The default of `RUNTIME_THREADS` on a machine with `cores` cores: one thread up to two
/// cores (the host and nats-server want the rest; one thread spends the least CPU per
/// message), then half the cores, at most 8.
pub fn default_runtime_threads(cores: usize) -> usize {
    if cores <= 2 {
        1
    } else {
        (cores / 2).clamp(2, 8)
    }
}

/// What the provider's process needs before its runtime starts, from its config: the metrics
/// export interval (set as the standard environment variable, while no other thread exists)
/// and the runtime's thread count. Returns the thread count and warnings to log once logging
/// is up.
pub fn prepare() -> (usize, Vec<String>) {
    let mut warnings = Vec::new();
    match provider_config(METRIC_EXPORT_INTERVAL) {
        Some(ms) if ms.parse::<u64>().is_ok_and(|ms| ms > 0) => {
            // Before any other thread exists: the runtime is built after this.
            std::env::set_var(METRIC_EXPORT_INTERVAL, ms);
        }
        Some(bad) => warnings.push(format!(
            "{METRIC_EXPORT_INTERVAL}={bad:?} is not a positive number of milliseconds; using the default (60 s)"
        )),
        None => {}
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let default = default_runtime_threads(cores);
    let threads = match provider_config(RUNTIME_THREADS) {
        None => default,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_RUNTIME_THREADS).contains(&n) => n,
            _ => {
                warnings.push(format!(
                    "{RUNTIME_THREADS}={v:?} is not a whole number from 1 to {MAX_RUNTIME_THREADS}; using {default}"
                ));
                default
            }
        },
    };
    (threads, warnings)
}

/// Builds the runtime `prepare` asked for.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Runs the provider until the host shuts it down; `warnings` (from [`prepare`]) are logged
/// once logging is up.
pub async fn run(threads: usize, warnings: Vec<String>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use wasmcloud_provider_sdk::{get_connection, run_provider};

    // wss:// uses rustls with ring; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    wasmcloud_provider_sdk::initialize_observability!(
        PROVIDER_NAME,
        std::env::var_os("PROVIDER_MESSAGING_WEBSOCKET_FLAMEGRAPH_PATH")
    );
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(threads, "runtime started");
    // After observability: its metrics instruments come from the meter provider set up there.
    let provider = WsProvider::default();
    let shutdown = run_provider(provider.clone(), PROVIDER_NAME)
        .await
        .context("failed to run provider")?;
    let connection = get_connection();
    if let Err(error) = provider
        .watch_link_deletes(
            (*connection.nats).clone(),
            &connection.lattice,
            connection.provider_key(),
        )
        .await
    {
        tracing::warn!(error = %format!("{error:#}"), "cannot follow link deletes; a consumer and a sessions link of the same name may be confused");
    }
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
