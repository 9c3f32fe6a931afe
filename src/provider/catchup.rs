//! Links the host stored but never delivered. A wasmCloud 1.x host (0.27.1, frozen) sends a link
//! to a running provider once, on a NATS subject; a link put that arrives while the provider's
//! process is starting (after the host wrote its host data, before the SDK subscribed) reaches
//! nobody, and the link would never be applied: a client link would never connect, a server
//! link never listen, and nothing would say so. `wadm` deploys a provider and its links at the
//! same moment, so this is the deploy path of most users.
//!
//! So once the SDK is subscribed, the provider reads the links the host stored in the lattice's
//! `LATTICEDATA_<lattice>` bucket (one `COMPONENT_<id>` entry per source) and applies each link
//! of its own that it has not received, with the named config resolved as the host resolves it
//! (from `CONFIGDATA_<lattice>`, later names overriding earlier ones). A link whose config names
//! a secret cannot be resolved here (only the host can read secrets): it is reported in health,
//! and a re-put of the link delivers it.

use std::collections::HashMap;

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::Deserialize;
use tracing::{info, warn};
use wasmcloud_provider_sdk::core::InterfaceLinkDefinition;
use wasmcloud_provider_sdk::ProviderConnection;

use super::table::Direction;
use super::WsProvider;

/// The host's prefix of config names that refer to secrets.
const SECRET_PREFIX: &str = "SECRET_";

/// A component's stored specification, as far as links go.
#[derive(Deserialize)]
struct Spec {
    #[serde(default)]
    links: Vec<StoredLink>,
}

/// A link as the host stores it: config by name, unresolved.
#[derive(Deserialize)]
struct StoredLink {
    source_id: String,
    target: String,
    #[serde(default = "default_name")]
    name: String,
    wit_namespace: String,
    wit_package: String,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    source_config: Vec<String>,
    #[serde(default)]
    target_config: Vec<String>,
}

fn default_name() -> String {
    "default".to_string()
}

impl WsProvider {
    /// Applies the links of this provider that the host stored and the provider has not
    /// received (see the module). Returns how many it applied.
    pub async fn catch_up_links(&self, connection: &ProviderConnection) -> anyhow::Result<usize> {
        let provider_id = connection.provider_key();
        let js = async_nats::jetstream::new((*connection.nats).clone());
        let stored = stored_links(&js, &connection.lattice, provider_id).await?;
        let mut configs = None;
        let mut applied = 0;
        for link in stored {
            let as_source = link.source_id == provider_id;
            let (component, names, direction) = if as_source {
                (&link.target, &link.source_config, Direction::Handler)
            } else {
                (
                    &link.source_id,
                    &link.target_config,
                    Direction::of_target(&link.wit_namespace, &link.wit_package),
                )
            };
            let key = (component.clone(), link.name.clone());
            if self.knows_link(direction, &key)
                || connection
                    .is_linked(
                        &link.source_id,
                        &link.target,
                        &link.wit_namespace,
                        &link.wit_package,
                        &link.name,
                    )
                    .await
            {
                continue;
            }
            if names.iter().any(|n| n.starts_with(SECRET_PREFIX)) {
                self.record_error(
                    direction,
                    key,
                    "the host stored this link but never delivered it, and its config names a secret, which only the host can resolve: delete and put the link again".to_string(),
                );
                continue;
            }
            if configs.is_none() {
                configs = Some(
                    js.get_key_value(format!("CONFIGDATA_{}", connection.lattice))
                        .await
                        .context("cannot open the lattice's config bucket")?,
                );
            }
            let Some(store) = configs.as_ref() else {
                continue;
            };
            let config = match resolve(store, names).await {
                Ok(config) => config,
                Err(e) => {
                    self.record_error(
                        direction,
                        key,
                        format!("the host stored this link but never delivered it, and its config cannot be read: {e:#}"),
                    );
                    continue;
                }
            };
            let (source_config, target_config) = if as_source {
                (config, HashMap::new())
            } else {
                (HashMap::new(), config)
            };
            info!(component = %key.0, link = %key.1, direction = direction.as_str(),
                "applying a link the host stored but never delivered (its put came while the provider was starting)");
            let definition = InterfaceLinkDefinition {
                source_id: link.source_id,
                target: link.target,
                name: link.name,
                wit_namespace: link.wit_namespace,
                wit_package: link.wit_package,
                interfaces: link.interfaces,
                source_config,
                target_config,
                source_secrets: None,
                target_secrets: None,
            };
            // The SDK's own path: it applies the link and records it, so that a late put of
            // the same link is ignored as a duplicate.
            wasmcloud_provider_sdk::provider::receive_link_for_provider(
                self, connection, definition,
            )
            .await?;
            applied += 1;
        }
        Ok(applied)
    }

    /// Whether the provider holds (or refused) the link `key` in `direction`.
    fn knows_link(&self, direction: Direction, key: &super::table::LinkKey) -> bool {
        let links = self.links();
        links.errors.contains_key(&(direction, key.clone()))
            || match direction {
                Direction::Handler => {
                    links.handlers.contains_key(key) || links.servers.contains_key(key)
                }
                Direction::Consumer => links.consumers.contains_key(key),
                Direction::Sessions => links.sessions.contains_key(key),
            }
    }
}

/// The links the host stored with this provider as their source or target.
async fn stored_links(
    js: &async_nats::jetstream::Context,
    lattice: &str,
    provider_id: &str,
) -> anyhow::Result<Vec<StoredLink>> {
    let store = js
        .get_key_value(format!("LATTICEDATA_{lattice}"))
        .await
        .context("cannot open the lattice's data bucket")?;
    let mut keys = store
        .keys()
        .await
        .context("cannot list the lattice's data bucket")?;
    let mut links = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.context("cannot list the lattice's data bucket")?;
        if !key.starts_with("COMPONENT_") {
            continue;
        }
        let Some(bytes) = store
            .get(&key)
            .await
            .with_context(|| format!("cannot read {key}"))?
        else {
            continue;
        };
        match serde_json::from_slice::<Spec>(&bytes) {
            Ok(spec) => links.extend(
                spec.links
                    .into_iter()
                    .filter(|l| l.source_id == provider_id || l.target == provider_id),
            ),
            Err(e) => {
                warn!(%key, error = %e, "a stored component specification does not parse; its links are skipped")
            }
        }
    }
    Ok(links)
}

/// The named configs merged in order, as the host merges them (a later name overrides an
/// earlier one's keys; a name with no stored config adds nothing).
async fn resolve(
    store: &async_nats::jetstream::kv::Store,
    names: &[String],
) -> anyhow::Result<HashMap<String, String>> {
    let mut merged = HashMap::new();
    for name in names {
        if let Some(bytes) = store
            .get(name)
            .await
            .with_context(|| format!("cannot read config {name:?}"))?
        {
            let config: HashMap<String, String> = serde_json::from_slice(&bytes)
                .with_context(|| format!("config {name:?} is not a map of strings"))?;
            merged.extend(config);
        }
    }
    Ok(merged)
}
