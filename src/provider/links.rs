//! Link puts and deletes: a handler link attaches to a (shared) client connection or starts a
//! listener; a consumer link may open its own connection; a sessions link holds settings only.

use std::sync::Arc;

use tracing::{error, info};
use wasmcloud_provider_sdk::LinkConfig;

use super::table::{ConsumerLink, Direction, HandlerLink, LinkKey, ServerLink, SessionsLink};
use super::{WsProvider, SHUTDOWN_GRACE};
use crate::config::LinkSettings;
use crate::link::client::ClientSocket;
use crate::link::server::Listener;
use crate::session::Route;

impl WsProvider {
    /// Finds or opens the connection of `component` for `settings`.
    pub(super) async fn connection(
        &self,
        component: &str,
        link_name: &str,
        settings: &LinkSettings,
    ) -> anyhow::Result<Arc<ClientSocket>> {
        let Some(client) = settings.client() else {
            anyhow::bail!("a server-mode link has no connection");
        };
        if let Some(conn) = self.links().connection_for(component, &client.endpoint) {
            return Ok(conn);
        }
        let wrpc = self.wrpc_for(component).await?;
        let shared = self.shared_connection(component, &client.endpoint).await?;
        // Messages published while the connection is down wait in a stream of its own.
        let history = match settings.recovery {
            Some(recovery) => Some(
                self.history(
                    component,
                    &format!("client {}", client.endpoint.uri),
                    recovery,
                )
                .await
                .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let mut links = self.links();
        // Another link may have opened it while the wRPC client was created.
        if let Some(conn) = links.connection_for(component, &client.endpoint) {
            return Ok(conn);
        }
        let conn = ClientSocket::open(
            component,
            link_name,
            settings,
            client,
            wrpc,
            Arc::clone(&self.inner.registry),
            Arc::clone(&self.inner.metrics),
            shared,
            history,
        );
        links.prune_pool();
        links.pool.insert(
            (component.to_string(), client.endpoint.clone()),
            Arc::downgrade(&conn),
        );
        info!(component, session = %conn.session.id, uri = %client.endpoint.redacted_uri(), "opened connection");
        Ok(conn)
    }

    /// With other replicas possible: the connection's lease key and the session ID every
    /// replica uses for it. `None`: this replica runs alone (the connection is its own).
    async fn shared_connection(
        &self,
        component: &str,
        endpoint: &crate::config::Endpoint,
    ) -> anyhow::Result<Option<crate::link::client::Shared>> {
        let Some(cluster) = self.cluster().await else {
            return Ok(None);
        };
        let headers: Vec<String> = endpoint
            .headers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let token = endpoint
            .auth_token
            .as_ref()
            .map_or(String::new(), |t| t.expose().to_string());
        let (component_id, uri) = (component.to_string(), endpoint.uri.clone());
        let secret = [token, headers.join("\n")];
        let key = tokio::task::spawn_blocking(move || {
            crate::cluster::lease::key(&component_id, &uri, &[&secret[0], &secret[1]])
        })
        .await
        .map_err(|e| anyhow::anyhow!("lease key: {e}"))?;
        match cluster.connection_id(&key).await {
            Ok(id) => Ok(Some(crate::link::client::Shared { cluster, key, id })),
            // Connecting without the lease could open a second socket beside another
            // replica's: refuse the link instead (health says why; a re-put retries).
            Err(e) => Err(anyhow::anyhow!(
                "cannot share the connection with the other replicas: {e}"
            )),
        }
    }

    /// Parses a link's settings; a bad config is recorded for health and returned.
    pub(super) fn settings_or_record(
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

    pub(super) fn record_error(&self, direction: Direction, key: LinkKey, error: String) {
        error!(direction = direction.as_str(), component = %key.0, link = %key.1, %error, "link refused");
        self.links().errors.insert((direction, key), error);
    }

    pub(super) async fn put_handler_link(
        &self,
        component: &str,
        link_name: &str,
        link: &LinkConfig<'_>,
    ) -> anyhow::Result<()> {
        let key = (component.to_string(), link_name.to_string());
        // Replicas find each other before the link's first session exists.
        let _ = self.cluster().await;
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

    pub(super) async fn put_server_link(
        &self,
        key: LinkKey,
        settings: &LinkSettings,
    ) -> anyhow::Result<()> {
        let (component, link_name) = (&key.0, &key.1);
        let wrpc = self.wrpc_for(component).await?;
        // A re-put replaces the link: the old listener lets go of its address first.
        self.stop_handler_link(&key).await;
        let history = match settings.recovery {
            Some(recovery) => match self.history(component, link_name, recovery).await {
                Ok(history) => Some(history),
                Err(e) => {
                    self.record_error(Direction::Handler, key, e.clone());
                    anyhow::bail!(e);
                }
            },
            None => None,
        };
        let listener = match Listener::start(
            component,
            link_name,
            settings,
            wrpc,
            Arc::clone(&self.inner.registry),
            Arc::clone(&self.inner.metrics),
            history.clone(),
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
        links.servers.insert(
            key,
            ServerLink {
                listener,
                subject,
                history,
            },
        );
        Ok(())
    }

    /// The history of a link with `RECOVERY=true` (or of a client connection: `link_name` is
    /// then its endpoint), in the lattice's JetStream.
    async fn history(
        &self,
        component: &str,
        link_name: &str,
        recovery: crate::config::Recovery,
    ) -> Result<Arc<crate::recovery::History>, String> {
        let host =
            wasmcloud_provider_sdk::load_host_data().map_err(|e| format!("no host data: {e}"))?;
        let nats = (*wasmcloud_provider_sdk::get_connection().nats).clone();
        crate::recovery::History::open(
            nats,
            &host.lattice_rpc_prefix,
            &host.provider_key,
            crate::recovery::link_tag(component, link_name),
            recovery,
        )
        .await
        .map(Arc::new)
    }

    pub(super) async fn put_consumer_link(
        &self,
        component: &str,
        link_name: &str,
        link: &LinkConfig<'_>,
    ) -> anyhow::Result<()> {
        let key = (component.to_string(), link_name.to_string());
        let (namespace, package, _) = link.wit_metadata;
        let direction = Direction::of_target(namespace, package);
        self.forget_delete_hints(&key);
        let _ = self.cluster().await;
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
    pub(super) async fn stop_handler_link(&self, key: &LinkKey) {
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
    pub(super) async fn stop_server_link(
        &self,
        component: &str,
        link_name: &str,
        server: ServerLink,
    ) {
        for session in self.inner.registry.clients_of_link(component, link_name) {
            session.remove_route(link_name);
        }
        server.listener.close(SHUTDOWN_GRACE).await;
        if let Some(history) = server.history {
            history.delete().await;
        }
    }

    pub(super) async fn remove_link(&self, direction: Direction, component: &str, link_name: &str) {
        let key = (component.to_string(), link_name.to_string());
        let direction = match direction {
            Direction::Handler => Direction::Handler,
            _ => match self.deleted_target(&key).await {
                Some(direction) => direction,
                None => return,
            },
        };
        self.remove_link_as(direction, key).await;
    }

    /// Removes link `key` of `direction` (which must be known) and stops what it runs.
    pub(super) async fn remove_link_as(&self, direction: Direction, key: LinkKey) {
        self.forget_caught_up(direction, &key);
        let (component, link_name) = (key.0.as_str(), key.1.as_str());
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
}
