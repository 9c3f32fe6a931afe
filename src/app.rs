//! The provider process: its config read before the runtime starts, the runtime, and [`run`]:
//! the TLS provider, observability, the SDK's command loop and the export server.

use crate::bindings::{self, PROVIDER_NAME};
use crate::provider::WsProvider;
use crate::wrpc;

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
///
/// One start-up and one shutdown path: the SDK's command loop (links, health, shutdown) and the
/// export server run until the provider's `shutdown` has run once. Then the loop is no longer
/// polled: after a shutdown the SDK closes its command channels, and a loop polled past that
/// point logs "failed to handle ..., shutdown" and shuts the provider down a second time.
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
    let commands = run_provider(provider.clone(), PROVIDER_NAME)
        .await
        .context("failed to run provider")?;
    let connection = get_connection();
    follow_link_deletes(&provider, connection).await;
    // The exports are served on the SDK's lattice connection by our own server (`wrpc`), which
    // cannot lose a caller's parameters the way wrpc-transport-nats 0.29 can.
    let server = wrpc::ExportServer::new(
        (*connection.nats).clone(),
        &connection.lattice,
        connection.provider_key(),
    )
    .await
    .context("failed to start serving exports")?;
    let invocations = bindings::serve(&server, provider.clone())
        .await
        .context("failed to serve exports")?;
    catch_up_links(&provider);
    let until_stopped = async {
        tokio::select! {
            // Checked first on every wake-up, so the loop is not polled after the shutdown.
            biased;
            () = provider.stopped() => {}
            () = commands => {}
        }
    };
    wrpc::serve_exports(invocations, until_stopped).await;
    // The SDK acknowledges the shutdown to the host from a task of its own, woken as the
    // provider's shutdown returned: let it run, then flush what it published.
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, connection.nats.flush()).await;
    Ok(())
}

/// Starts following the host's link-delete messages (see `provider::deletes`); without them
/// the provider still runs, and says what it cannot tell apart.
async fn follow_link_deletes(
    provider: &WsProvider,
    connection: &wasmcloud_provider_sdk::ProviderConnection,
) {
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
}

/// Applies, in a task of its own, the links the host stored but never delivered (see
/// `provider::catchup`); the SDK is subscribed by now, so a put from here on arrives, and the
/// exports are served, so a component the link reaches can publish back.
fn catch_up_links(provider: &WsProvider) {
    let provider = provider.clone();
    tokio::spawn(async move {
        match provider
            .catch_up_links(wasmcloud_provider_sdk::get_connection())
            .await
        {
            Ok(0) => {}
            Ok(applied) => tracing::info!(applied, "applied links the host never delivered"),
            Err(error) => tracing::warn!(
                error = %format!("{error:#}"),
                "cannot read the links the host stored; a link put while the provider was starting may be missing"
            ),
        }
    });
}

/// How long the last flush of the lattice connection may take at shutdown.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_millis(50);
