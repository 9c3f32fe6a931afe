//! The SDK's `Provider`: links become connections and listeners, health and shutdown report on
//! them. The link table is in [`table`], link puts and deletes in [`links`], the host's delete
//! messages in [`deletes`], links the host stored but never delivered in [`catchup`], publish
//! routing in [`route`], the health text in [`health`].
//!
//! Link state is keyed by (component ID, link name) and interface:
//! - a provider->component `handler` link always uses a connection (or a listener, in server
//!   mode), and asks for its frames;
//! - a component->provider `consumer` link opens a connection only when its own config sets
//!   `URI`; otherwise the component's publishes use its handler-link connection;
//! - a component->provider `sessions` link (the session API) holds no connection; it may set
//!   `FANOUT_TIMEOUT_MS` for the session API's fan-outs.
//!
//! A consumer and a sessions link of one component often share a name (`default`), and the
//! SDK's delete callback does not say which interface went; when both exist, the provider's
//! own subscription to the host's link-delete messages tells (see [`WsProvider::watch_link_deletes`]).
//!
//! Links of one component whose endpoints (URI, token, headers) are equal share one connection
//! through a pool of weak references; the connection closes when its last link is deleted.

mod catchup;
mod deletes;
mod health;
mod links;
mod replicas;
mod route;
mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::join_all;
use tracing::{error, info, instrument, warn};
use wasmcloud_provider_sdk::core::secrets::SecretValue;
use wasmcloud_provider_sdk::{
    load_host_data, HealthCheckRequest, HealthCheckResponse, LinkConfig, LinkDeleteInfo, Provider,
    ProviderInitConfig,
};

use crate::config::{LinkSettings, ProviderDefaults};
use crate::link::client::ClientSocket;
use crate::metrics::Metrics;
use crate::session::Registry;
use crate::wrpc::{ComponentClient, Invoker};

pub use route::{Remote, Target};
use table::{Direction, LinkKey, Links};

/// The SDK's secret values as strings; a secret whose bytes are not UTF-8 is left out (with a
/// warning that names the key, never the value).
fn secret_strings(secrets: &HashMap<String, SecretValue>) -> crate::config::Secrets {
    secrets
        .iter()
        .filter_map(|(key, value)| match value {
            SecretValue::String(s) => Some((key.clone(), s.clone())),
            SecretValue::Bytes(b) => match String::from_utf8(b.clone()) {
                Ok(s) => Some((key.clone(), s)),
                Err(_) => {
                    warn!(secret = %key, "secret is not UTF-8 text; ignored");
                    None
                }
            },
        })
        .collect()
}

/// How long `shutdown` waits for close frames: the host kills the process after ~300 ms.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

struct Inner {
    defaults: RwLock<ProviderDefaults>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    links: Mutex<Links>,
    /// The client for calls into components, connected on first use.
    invoker: tokio::sync::OnceCell<Invoker>,
    /// Component->provider links the host said it deleted (from its delete messages), with
    /// their interface, until the SDK's delete callback takes them.
    deleted: Mutex<Vec<(LinkKey, Direction, std::time::Instant)>>,
    deleted_seen: tokio::sync::Notify,
    /// Problems with the provider's own config, for health.
    config_problems: Mutex<Vec<String>>,
    /// The task following the host's link-delete messages.
    delete_watch: Mutex<Option<crate::task::OwnedTask>>,
    /// This replica's part of the lattice (`Err`: running alone, and why).
    cluster: tokio::sync::OnceCell<Result<crate::cluster::Cluster, String>>,
    /// Link puts one at a time, and the links applied at start-up from the host's store.
    puts: catchup::PutGate,
    /// Set when `shutdown` starts: it runs once.
    stopping: std::sync::atomic::AtomicBool,
    /// Cancelled when `shutdown` has finished.
    stopped: tokio_util::sync::CancellationToken,
}

/// The WebSocket messaging provider. Cheap to clone: all state is shared.
#[derive(Clone)]
pub struct WsProvider {
    inner: Arc<Inner>,
}

impl Default for WsProvider {
    fn default() -> Self {
        Self::new(ProviderDefaults::default())
    }
}

impl WsProvider {
    pub fn new(defaults: ProviderDefaults) -> Self {
        Self {
            inner: Arc::new(Inner {
                defaults: RwLock::new(defaults),
                registry: Arc::default(),
                metrics: Arc::default(),
                links: Mutex::default(),
                invoker: tokio::sync::OnceCell::new(),
                deleted: Mutex::default(),
                deleted_seen: tokio::sync::Notify::new(),
                config_problems: Mutex::default(),
                delete_watch: Mutex::default(),
                cluster: tokio::sync::OnceCell::new(),
                puts: catchup::PutGate::default(),
                stopping: std::sync::atomic::AtomicBool::new(false),
                stopped: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Ready once the provider's `shutdown` has run.
    pub async fn stopped(&self) {
        self.inner.stopped.cancelled().await;
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than stopping; recover the guard rather than poisoning every later call.
        self.inner.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn settings(&self, link: &LinkConfig<'_>) -> Result<LinkSettings, crate::config::ConfigError> {
        let defaults = self
            .inner
            .defaults
            .read()
            .unwrap_or_else(|e| e.into_inner());
        defaults.link_settings(link.config, &secret_strings(link.secrets))
    }

    /// A client for calls into `component`, on the SDK's lattice connection (one connection
    /// carries the provider's calls and its exports, so their messages share system calls).
    async fn wrpc_for(&self, component: &str) -> anyhow::Result<ComponentClient> {
        let invoker = self
            .inner
            .invoker
            .get_or_try_init(|| async {
                let host = load_host_data().context("no host data")?;
                // Set by `run_provider` before it hands the provider any link.
                let nats = (*wasmcloud_provider_sdk::get_connection().nats).clone();
                Invoker::new(nats, &host.lattice_rpc_prefix, &host.provider_key).await
            })
            .await?;
        Ok(invoker.component(component))
    }
}

impl Provider for WsProvider {
    async fn init(&self, init: impl ProviderInitConfig) -> anyhow::Result<()> {
        let defaults =
            ProviderDefaults::new(init.get_config(), &secret_strings(init.get_secrets()));
        match defaults.inbound_budget() {
            Ok(bytes) => crate::delivery::set_inbound_budget(bytes),
            Err(e) => {
                error!(error = %e, "provider config refused; using the default");
                self.inner
                    .config_problems
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.to_string());
            }
        }
        *self
            .inner
            .defaults
            .write()
            .unwrap_or_else(|e| e.into_inner()) = defaults;
        info!(
            provider = init.get_provider_id(),
            "websocket messaging provider initialized"
        );
        Ok(())
    }

    #[instrument(level = "debug", skip_all, fields(component = link.target_id, link = link.link_name))]
    async fn receive_link_config_as_source(&self, link: LinkConfig<'_>) -> anyhow::Result<()> {
        let key = (link.target_id.to_string(), link.link_name.to_string());
        let Some(_turn) = self.admit_put(Direction::Handler, &key, link.config).await else {
            return Ok(());
        };
        self.put_handler_link(link.target_id, link.link_name, &link)
            .await
    }

    #[instrument(level = "debug", skip_all, fields(component = link.source_id, link = link.link_name))]
    async fn receive_link_config_as_target(&self, link: LinkConfig<'_>) -> anyhow::Result<()> {
        let key = (link.source_id.to_string(), link.link_name.to_string());
        let (namespace, package, _) = link.wit_metadata;
        let direction = Direction::of_target(namespace, package);
        let Some(_turn) = self.admit_put(direction, &key, link.config).await else {
            return Ok(());
        };
        self.put_consumer_link(link.source_id, link.link_name, &link)
            .await
    }

    async fn delete_link_as_source(&self, info: impl LinkDeleteInfo) -> anyhow::Result<()> {
        self.remove_link(
            Direction::Handler,
            info.get_target_id(),
            info.get_link_name(),
        )
        .await;
        Ok(())
    }

    async fn delete_link_as_target(&self, info: impl LinkDeleteInfo) -> anyhow::Result<()> {
        self.remove_link(
            Direction::Consumer,
            info.get_source_id(),
            info.get_link_name(),
        )
        .await;
        Ok(())
    }

    async fn health_request(&self, _: &HealthCheckRequest) -> anyhow::Result<HealthCheckResponse> {
        let problems = self.problems();
        let replicas = self.replicas_summary();
        if problems.is_empty() {
            return Ok(HealthCheckResponse {
                healthy: true,
                message: replicas,
            });
        }
        warn!(?problems, "health: some links are not connected");
        let mut message = format!("{}; {}", self.summary(), problems.join("; "));
        if let Some(replicas) = replicas {
            message = format!("{message}; {replicas}");
        }
        Ok(HealthCheckResponse {
            healthy: true,
            message: Some(message),
        })
    }

    /// Closes every link's sockets and listeners, once: the SDK may call it again as it stops.
    async fn shutdown(&self) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        if self.inner.stopping.swap(true, Ordering::SeqCst) {
            self.inner.stopped.cancelled().await;
            return Ok(());
        }
        let (handlers, consumers, servers) = {
            let mut links = self.links();
            links.pool.clear();
            links.errors.clear();
            links.sessions.clear();
            (
                std::mem::take(&mut links.handlers),
                std::mem::take(&mut links.consumers),
                std::mem::take(&mut links.servers),
            )
        };
        let mut conns: Vec<Arc<ClientSocket>> = handlers
            .values()
            .map(|h| Arc::clone(&h.conn))
            .chain(consumers.values().filter_map(|c| c.conn.clone()))
            .collect();
        conns.sort_by_key(|c| c.session.id);
        conns.dedup_by_key(|c| c.session.id);
        let closing = conns.iter().map(|c| c.close(SHUTDOWN_GRACE));
        let stopping = servers.values().map(|s| s.listener.close(SHUTDOWN_GRACE));
        futures::future::join(join_all(closing), join_all(stopping)).await;
        drop((handlers, consumers, servers));
        if let Some(cluster) = self.cluster_now() {
            cluster.leave().await;
        }
        let delete_watch = self
            .inner
            .delete_watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(delete_watch);
        info!("websocket messaging provider shut down");
        self.inner.stopped.cancel();
        Ok(())
    }
}
