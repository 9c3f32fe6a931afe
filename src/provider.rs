//! The wasmCloud glue: links become connections, and health and shutdown report on them.
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::join_all;
use tracing::{error, info, instrument, warn};
use wasmcloud_provider_sdk::core::secrets::SecretValue;
use wasmcloud_provider_sdk::{
    load_host_data, HealthCheckRequest, HealthCheckResponse, LinkConfig, LinkDeleteInfo, Provider,
    ProviderInitConfig,
};

use crate::config::{Endpoint, FrameType, LinkSettings, ProviderDefaults};
use crate::connection::Connection;
use crate::listener::Listener;
use crate::sessions::{parse_session_subject, Registry, Route, Session};
use crate::stats::Stats;
use crate::wrpc::{ComponentClient, Invoker};
use crate::ws::socket::ConnState;

/// Where a publish goes: the sessions, the frame type chosen by the consumer link (if it set
/// one), the subject written in an envelope, and the deadline of a fan-out.
pub struct Target {
    pub sessions: Vec<Arc<Session>>,
    pub frame_type: Option<FrameType>,
    pub subject: String,
    pub fanout_timeout: Duration,
}

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

/// (component ID, link name)
type LinkKey = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Direction {
    Handler,
    Consumer,
    Sessions,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Handler => "handler",
            Direction::Consumer => "consumer",
            Direction::Sessions => "sessions",
        }
    }

    /// The component->provider interface a link's WIT namespace and package name.
    fn of_target(namespace: &str, package: &str) -> Self {
        if namespace == "wasmcloud-websocket" && package == "provider" {
            Direction::Sessions
        } else {
            Direction::Consumer
        }
    }
}

/// How long a delete of a component->provider link waits for the host's delete message to
/// say which interface it was, when a consumer and a sessions link share the name.
const DELETE_HINT_WAIT: Duration = Duration::from_secs(2);
/// How long a delete message's hint stays usable.
const DELETE_HINT_FRESH: Duration = Duration::from_secs(5);

/// A provider->component link: its connection, whose frames it receives.
struct HandlerLink {
    conn: Arc<Connection>,
    link_name: String,
}

impl Drop for HandlerLink {
    fn drop(&mut self) {
        self.conn.session.remove_route(&self.link_name);
    }
}

/// A component->provider link: its own connection, if its config set `URI`.
struct ConsumerLink {
    conn: Option<Arc<Connection>>,
    frame_type: Option<FrameType>,
    fanout_timeout: Duration,
}

/// A component->provider link to the session API.
struct SessionsLink {
    fanout_timeout: Duration,
}

/// A provider->component link in server mode: its listener and the subject of its clients.
struct ServerLink {
    listener: Arc<Listener>,
    subject: String,
}

#[derive(Default)]
struct Links {
    handlers: HashMap<LinkKey, HandlerLink>,
    servers: HashMap<LinkKey, ServerLink>,
    consumers: HashMap<LinkKey, ConsumerLink>,
    sessions: HashMap<LinkKey, SessionsLink>,
    pool: HashMap<(String, Endpoint), Weak<Connection>>,
    /// Links whose config was refused, with the reason (reported by health).
    errors: HashMap<(Direction, LinkKey), String>,
}

impl Links {
    fn connection_for(&self, component: &str, endpoint: &Endpoint) -> Option<Arc<Connection>> {
        self.pool
            .get(&(component.to_string(), endpoint.clone()))
            .and_then(Weak::upgrade)
    }

    fn prune_pool(&mut self) {
        self.pool.retain(|_, conn| conn.strong_count() > 0);
    }
}

struct Inner {
    defaults: RwLock<ProviderDefaults>,
    registry: Arc<Registry>,
    stats: Arc<Stats>,
    links: Mutex<Links>,
    /// The client for calls into components, connected on first use.
    invoker: tokio::sync::OnceCell<Invoker>,
    /// Component->provider links the host said it deleted (from its delete messages), with
    /// their interface, until the SDK's delete callback takes them.
    deleted: Mutex<Vec<(LinkKey, Direction, std::time::Instant)>>,
    deleted_seen: tokio::sync::Notify,
    /// Problems with the provider's own config, for health.
    config_problems: Mutex<Vec<String>>,
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
                stats: Arc::default(),
                links: Mutex::default(),
                invoker: tokio::sync::OnceCell::new(),
                deleted: Mutex::default(),
                deleted_seen: tokio::sync::Notify::new(),
                config_problems: Mutex::default(),
            }),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
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

    /// Finds or opens the connection of `component` for `settings`.
    async fn connection(
        &self,
        component: &str,
        link_name: &str,
        settings: &LinkSettings,
    ) -> anyhow::Result<Arc<Connection>> {
        let Some(client) = settings.client() else {
            anyhow::bail!("a server-mode link has no connection");
        };
        if let Some(conn) = self.links().connection_for(component, &client.endpoint) {
            return Ok(conn);
        }
        let wrpc = self.wrpc_for(component).await?;
        let mut links = self.links();
        // Another link may have opened it while the wRPC client was created.
        if let Some(conn) = links.connection_for(component, &client.endpoint) {
            return Ok(conn);
        }
        let conn = Connection::open(
            component,
            link_name,
            settings,
            client,
            wrpc,
            Arc::clone(&self.inner.registry),
            Arc::clone(&self.inner.stats),
        );
        links.prune_pool();
        links.pool.insert(
            (component.to_string(), client.endpoint.clone()),
            Arc::downgrade(&conn),
        );
        info!(component, session = %conn.session.id, uri = %client.endpoint.redacted_uri(), "opened connection");
        Ok(conn)
    }

    /// Parses a link's settings; a bad config is recorded for health and returned.
    fn settings_or_record(
        &self,
        direction: Direction,
        key: &LinkKey,
        link: &LinkConfig<'_>,
    ) -> anyhow::Result<LinkSettings> {
        self.settings(link).map_err(|e| {
            self.record_error(direction, key.clone(), e.to_string());
            e.into()
        })
    }

    fn record_error(&self, direction: Direction, key: LinkKey, error: String) {
        error!(direction = direction.as_str(), component = %key.0, link = %key.1, %error, "link refused");
        self.links().errors.insert((direction, key), error);
    }

    async fn put_handler_link(
        &self,
        component: &str,
        link_name: &str,
        link: &LinkConfig<'_>,
    ) -> anyhow::Result<()> {
        let key = (component.to_string(), link_name.to_string());
        let settings = self.settings_or_record(Direction::Handler, &key, link)?;
        if settings.server().is_some() {
            return self.put_server_link(key, &settings).await;
        }
        let conn = self.connection(component, link_name, &settings).await?;
        // A re-put replaces the link: its old state goes first, then the new route attaches.
        self.stop_handler_link(&key).await;
        conn.session.add_route(Route {
            link_name: link_name.to_string(),
            subject: settings.inbound_subject(link_name),
        });
        let mut links = self.links();
        links.errors.remove(&(Direction::Handler, key.clone()));
        links.handlers.insert(
            key,
            HandlerLink {
                conn,
                link_name: link_name.to_string(),
            },
        );
        links.prune_pool();
        Ok(())
    }

    async fn put_server_link(&self, key: LinkKey, settings: &LinkSettings) -> anyhow::Result<()> {
        let (component, link_name) = (&key.0, &key.1);
        let wrpc = self.wrpc_for(component).await?;
        // A re-put replaces the link: the old listener lets go of its address first.
        self.stop_handler_link(&key).await;
        let listener = match Listener::start(
            component,
            link_name,
            settings,
            wrpc,
            Arc::clone(&self.inner.registry),
            Arc::clone(&self.inner.stats),
        )
        .await
        {
            Ok(listener) => listener,
            Err(e) => {
                self.record_error(Direction::Handler, key, e.clone());
                anyhow::bail!(e);
            }
        };
        info!(component = %component, link = %link_name, address = ?listener.address, "server link listening");
        let subject = settings.inbound_subject(link_name);
        let mut links = self.links();
        links.errors.remove(&(Direction::Handler, key.clone()));
        links.servers.insert(key, ServerLink { listener, subject });
        Ok(())
    }

    async fn put_consumer_link(
        &self,
        component: &str,
        link_name: &str,
        link: &LinkConfig<'_>,
    ) -> anyhow::Result<()> {
        let key = (component.to_string(), link_name.to_string());
        let (namespace, package, _) = link.wit_metadata;
        let direction = Direction::of_target(namespace, package);
        self.forget_delete_hints(&key);
        let settings = self.settings_or_record(direction, &key, link)?;
        if direction == Direction::Sessions {
            let mut links = self.links();
            links.errors.remove(&(direction, key.clone()));
            links.sessions.insert(
                key,
                SessionsLink {
                    fanout_timeout: settings.fanout_timeout,
                },
            );
            return Ok(());
        }
        if settings.server().is_some() {
            let e = "MODE=server belongs on the handler link (provider -> component), not the consumer link".to_string();
            self.record_error(Direction::Consumer, key, e.clone());
            anyhow::bail!(e);
        }
        let conn = if settings.client().is_some_and(|c| c.uri_set_on_link) {
            Some(self.connection(component, link_name, &settings).await?)
        } else {
            None
        };
        let frame_type = link
            .config
            .keys()
            .any(|k| k.eq_ignore_ascii_case(crate::config::FRAME_TYPE))
            .then_some(settings.frame_type);
        let mut links = self.links();
        links.errors.remove(&(Direction::Consumer, key.clone()));
        links.consumers.insert(
            key,
            ConsumerLink {
                conn,
                frame_type,
                fanout_timeout: settings.fanout_timeout,
            },
        );
        links.prune_pool();
        Ok(())
    }

    /// Removes handler link `key`'s state, client or server mode, before it is put again: a
    /// client link's `Drop` detaches its route; a server link is stopped.
    async fn stop_handler_link(&self, key: &LinkKey) {
        let (old, old_server) = {
            let mut links = self.links();
            (links.handlers.remove(key), links.servers.remove(key))
        };
        drop(old);
        if let Some(server) = old_server {
            self.stop_server_link(&key.0, &key.1, server).await;
        }
    }

    /// Stops a server link: its clients' queued frames are dropped (their link is gone), then
    /// the listener lets go of its address and closes every client (1001).
    async fn stop_server_link(&self, component: &str, link_name: &str, server: ServerLink) {
        for session in self.inner.registry.clients_of_link(component, link_name) {
            session.remove_route(link_name);
        }
        server.listener.close(SHUTDOWN_GRACE).await;
    }

    /// Which component->provider link of `key` the host deleted: the only one there is, or
    /// (when a consumer and a sessions link share the name) the one its delete message named.
    async fn deleted_target(&self, key: &LinkKey) -> Option<Direction> {
        let (consumer, sessions) = {
            let links = self.links();
            (
                links.consumers.contains_key(key)
                    || links
                        .errors
                        .contains_key(&(Direction::Consumer, key.clone())),
                links.sessions.contains_key(key)
                    || links
                        .errors
                        .contains_key(&(Direction::Sessions, key.clone())),
            )
        };
        match (consumer, sessions) {
            (true, false) => {
                self.forget_delete_hints(key);
                return Some(Direction::Consumer);
            }
            (false, true) => {
                self.forget_delete_hints(key);
                return Some(Direction::Sessions);
            }
            (false, false) => return None,
            (true, true) => {}
        }
        let deadline = tokio::time::Instant::now() + DELETE_HINT_WAIT;
        loop {
            let seen = self.inner.deleted_seen.notified();
            {
                let mut deleted = self.inner.deleted.lock().unwrap_or_else(|e| e.into_inner());
                // The newest hint for the key is this delete's; older ones are stale.
                // A hint arrives within milliseconds of its delete: older ones are stale.
                deleted.retain(|(_, _, at)| at.elapsed() < DELETE_HINT_FRESH);
                if let Some(i) = deleted.iter().rposition(|(k, _, _)| k == key) {
                    let direction = deleted.remove(i).1;
                    deleted.retain(|(k, _, _)| k != key);
                    return Some(direction);
                }
            }
            if tokio::time::timeout_at(deadline, seen).await.is_err() {
                warn!(component = %key.0, link = %key.1,
                    "a consumer and a sessions link share this name, and the host's delete message did not say which one went; both kept");
                return None;
            }
        }
    }

    /// Drops the delete hints of `key` (a put or an unambiguous delete makes them stale).
    fn forget_delete_hints(&self, key: &LinkKey) {
        self.inner
            .deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(k, _, _)| k != key);
    }

    /// Follows the host's link-delete messages for this provider, so that a delete of one of
    /// two component->provider links with the same name removes the right one.
    pub async fn watch_link_deletes(
        &self,
        nats: async_nats::Client,
        lattice: &str,
        provider_id: &str,
    ) -> anyhow::Result<()> {
        #[derive(serde::Deserialize)]
        struct Deleted {
            source_id: String,
            target: String,
            #[serde(default)]
            name: Option<String>,
            wit_namespace: String,
            wit_package: String,
        }
        let subject = format!("wasmbus.rpc.{lattice}.{provider_id}.linkdefs.del");
        let mut deletes = nats
            .subscribe(subject)
            .await
            .context("failed to follow link deletes")?;
        let provider_id = provider_id.to_string();
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(message) = deletes.next().await {
                let Ok(deleted) = serde_json::from_slice::<Deleted>(&message.payload) else {
                    continue;
                };
                if deleted.target != provider_id {
                    continue;
                }
                let Some(inner) = inner.upgrade() else { return };
                let key = (
                    deleted.source_id,
                    deleted.name.unwrap_or_else(|| "default".to_string()),
                );
                let direction = Direction::of_target(&deleted.wit_namespace, &deleted.wit_package);
                let mut list = inner.deleted.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|(_, _, at)| at.elapsed() < DELETE_HINT_FRESH);
                list.push((key, direction, std::time::Instant::now()));
                drop(list);
                inner.deleted_seen.notify_waiters();
            }
        });
        Ok(())
    }

    async fn remove_link(&self, direction: Direction, component: &str, link_name: &str) {
        let key = (component.to_string(), link_name.to_string());
        let direction = match direction {
            Direction::Handler => Direction::Handler,
            _ => match self.deleted_target(&key).await {
                Some(direction) => direction,
                None => return,
            },
        };
        let removed_any;
        let server;
        {
            let mut links = self.links();
            links.errors.remove(&(direction, key.clone()));
            server = match direction {
                Direction::Handler => links.servers.remove(&key),
                _ => None,
            };
            removed_any = match direction {
                Direction::Handler => links.handlers.remove(&key).is_some() | server.is_some(),
                Direction::Consumer => links.consumers.remove(&key).is_some(),
                Direction::Sessions => links.sessions.remove(&key).is_some(),
            };
            links.prune_pool();
        }
        if let Some(server) = server {
            self.stop_server_link(component, link_name, server).await;
        }
        info!(
            direction = direction.as_str(),
            component,
            link = link_name,
            removed_any,
            "link deleted"
        );
    }

    /// Chooses the sessions a component's publish or request goes to.
    ///
    /// A session subject names one session (only the caller's own). The subject of one of the
    /// caller's server-mode links names every client of that link. Any other subject goes out on
    /// the consumer link's own connection, else on the component's only client connection.
    pub fn route_publish(
        &self,
        component: &str,
        link_name: &str,
        subject: &str,
    ) -> Result<Target, String> {
        let links = self.links();
        let consumer = links
            .consumers
            .get(&(component.to_string(), link_name.to_string()));
        let frame_type = consumer.and_then(|c| c.frame_type);
        let fanout_timeout = self.fanout_timeout_of(&links, component, link_name);
        let target = |sessions: Vec<Arc<Session>>, subject: &str| Target {
            sessions,
            frame_type,
            subject: subject.to_string(),
            fanout_timeout,
        };
        if let Some(named) = parse_session_subject(subject) {
            let session = self
                .inner
                .registry
                .get_owned(component, &named.id)
                .ok_or_else(|| format!("unknown session {}", named.id))?;
            return Ok(target(vec![session], named.peer_subject.unwrap_or(subject)));
        }
        let server_link = links
            .servers
            .iter()
            .filter(|((c, _), server)| c == component && server.subject == subject)
            .map(|((_, link), _)| link.clone())
            .min();
        if let Some(server_link) = server_link {
            return Ok(target(
                self.server_clients(component, &server_link),
                subject,
            ));
        }
        if let Some(conn) = consumer.and_then(|c| c.conn.as_ref()) {
            return Ok(target(vec![Arc::clone(&conn.session)], subject));
        }
        let mut sessions: Vec<Arc<Session>> = links
            .handlers
            .iter()
            .filter(|((c, _), _)| c == component)
            .map(|(_, h)| Arc::clone(&h.conn.session))
            .collect();
        sessions.sort_by_key(|s| s.id);
        sessions.dedup_by_key(|s| s.id);
        match sessions.len() {
            0 if links.servers.keys().any(|(c, _)| c == component) => Err(format!(
                "subject {subject:?} names no session or server link of {component}: publish to a session subject, or to a server link's subject to reach all its clients"
            )),
            0 => Err(format!(
                "component {component} has no WebSocket connection: link a handler with URI, or set URI on the consumer link {link_name:?}"
            )),
            1 => Ok(target(sessions, subject)),
            n => Err(format!(
                "component {component} has {n} WebSocket connections; publish to a session subject (the reply_to of an inbound message) to choose one"
            )),
        }
    }

    /// The deadline of one fan-out made on `component`'s link `link_name`: the consumer link's
    /// `FANOUT_TIMEOUT_MS`, else the sessions link's, else the default.
    fn fanout_timeout_of(&self, links: &Links, component: &str, link_name: &str) -> Duration {
        let key = (component.to_string(), link_name.to_string());
        links
            .consumers
            .get(&key)
            .map(|c| c.fanout_timeout)
            .or_else(|| links.sessions.get(&key).map(|s| s.fanout_timeout))
            .unwrap_or(crate::config::DEFAULT_FANOUT_TIMEOUT)
    }

    /// The deadline of one fan-out of the session API called on `link_name`.
    pub fn fanout_timeout(&self, component: &str, link_name: &str) -> Duration {
        self.fanout_timeout_of(&self.links(), component, link_name)
    }

    /// The clients of one of `component`'s server-mode links, tracked or not: the link's
    /// subject names all of them.
    fn server_clients(&self, component: &str, link_name: &str) -> Vec<Arc<Session>> {
        self.inner.registry.clients_of_link(component, link_name)
    }

    /// The caller's own tracked session `id` (a UUID string).
    pub fn owned_session(&self, component: &str, id: &str) -> Result<Arc<Session>, String> {
        uuid::Uuid::parse_str(id)
            .ok()
            .and_then(|uuid| self.inner.registry.get_owned(component, &uuid))
            .ok_or_else(|| format!("unknown session {id}"))
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The caller's tracked sessions.
    pub fn owned_sessions(&self, component: &str) -> Vec<Arc<Session>> {
        self.inner.registry.owned_by(component)
    }

    /// Counts of links, connections and listeners, for health reports.
    fn summary(&self) -> String {
        let links = self.links();
        let conns: Vec<&Arc<Connection>> = links
            .handlers
            .values()
            .map(|h| &h.conn)
            .chain(links.consumers.values().filter_map(|c| c.conn.as_ref()))
            .collect();
        let connected = conns.iter().filter(|c| c.session.is_connected()).count();
        let clients: usize = links
            .servers
            .keys()
            .map(|(component, link)| self.server_clients(component, link).len())
            .sum();
        format!(
            "links: {} handler, {} consumer, {} refused; connections: {} connected, {} reconnecting; listeners: {} with {} clients",
            links.handlers.len() + links.servers.len(),
            links.consumers.len(),
            links.errors.len(),
            connected,
            conns.len() - connected,
            links.servers.len(),
            clients
        )
    }

    /// One line per link that is not connected or was refused; empty when all is well.
    fn problems(&self) -> Vec<String> {
        let links = self.links();
        let mut problems: Vec<String> = links
            .errors
            .iter()
            .map(|((dir, (component, link)), e)| {
                format!("{} link {link:?} of {component}: {e}", dir.as_str())
            })
            .collect();
        problems.extend(
            self.inner
                .config_problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|p| format!("provider config: {p}")),
        );
        let conns =
            links
                .handlers
                .iter()
                .map(|(k, h)| (Direction::Handler, k, &h.conn))
                .chain(links.consumers.iter().filter_map(|(k, c)| {
                    c.conn.as_ref().map(|conn| (Direction::Consumer, k, conn))
                }));
        for (dir, (component, link), conn) in conns {
            match conn.session.state() {
                ConnState::Connected { .. } => {}
                ConnState::Connecting => problems.push(format!(
                    "{} link {link:?} of {component}: connecting to {}",
                    dir.as_str(),
                    conn.session.remote
                )),
                ConnState::Disconnected { error } => problems.push(format!(
                    "{} link {link:?} of {component}: {error}",
                    dir.as_str()
                )),
            }
        }
        problems.sort();
        problems
    }
}

impl Provider for WsProvider {
    async fn init(&self, init: impl ProviderInitConfig) -> anyhow::Result<()> {
        let defaults =
            ProviderDefaults::new(init.get_config(), &secret_strings(init.get_secrets()));
        match defaults.inbound_budget() {
            Ok(bytes) => crate::dispatch::set_inbound_budget(bytes),
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
        self.put_handler_link(link.target_id, link.link_name, &link)
            .await
    }

    #[instrument(level = "debug", skip_all, fields(component = link.source_id, link = link.link_name))]
    async fn receive_link_config_as_target(&self, link: LinkConfig<'_>) -> anyhow::Result<()> {
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
        if problems.is_empty() {
            return Ok(HealthCheckResponse {
                healthy: true,
                message: None,
            });
        }
        warn!(?problems, "health: some links are not connected");
        Ok(HealthCheckResponse {
            healthy: true,
            message: Some(format!("{}; {}", self.summary(), problems.join("; "))),
        })
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
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
        let mut conns: Vec<Arc<Connection>> = handlers
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
        info!("websocket messaging provider shut down");
        Ok(())
    }
}
