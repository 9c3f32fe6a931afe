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
//! a secret (only the host can read secrets), or a config that is not stored (the host would
//! not deliver it either), is not applied: it is reported in health, and a delete and put of the
//! link delivers it. The buckets are read in the default JetStream domain.
//!
//! Link puts go one at a time through a gate ([`PutGate`]): the catch-up applies a link only if
//! no put got there first, and the host's late put of a link the catch-up applied with the same
//! config is not applied a second time (a server link would otherwise restart). A link deleted
//! while the catch-up read is removed again once the catch-up sees it gone.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::Deserialize;
use tracing::{info, warn};
use wasmcloud_provider_sdk::core::InterfaceLinkDefinition;
use wasmcloud_provider_sdk::ProviderConnection;

use super::table::{Direction, LinkKey, Links};
use super::WsProvider;

/// The host's prefix of config names that refer to secrets (`wasmcloud-secrets-types`).
const SECRET_PREFIX: &str = "SECRET";

tokio::task_local! {
    /// Set while the catch-up applies a link through the SDK's path.
    static CATCHING_UP: ();
}

/// Link puts one at a time, and the links the catch-up applied with their config's fingerprint.
#[derive(Default)]
pub(super) struct PutGate {
    turn: tokio::sync::Mutex<()>,
    caught_up: std::sync::Mutex<HashMap<(Direction, LinkKey), u64>>,
}

/// A fingerprint of a link's config (its pairs in key order).
fn fingerprint(config: &HashMap<String, String>) -> u64 {
    let mut pairs: Vec<_> = config.iter().collect();
    pairs.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pairs.hash(&mut hasher);
    hasher.finish()
}

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
    /// Admits a put of link `key` in `direction` with `config`: returns the turn to hold while
    /// it is applied, or `None` when it must not be applied (the catch-up's, when a put got
    /// there first; the host's, when it repeats what the catch-up applied).
    pub(super) async fn admit_put(
        &self,
        direction: Direction,
        key: &LinkKey,
        config: &HashMap<String, String>,
    ) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let turn = self.inner.puts.turn.lock().await;
        let print = fingerprint(config);
        let entry = (direction, key.clone());
        let catching_up = CATCHING_UP.try_with(|()| ()).is_ok();
        if catching_up && self.knows_link(direction, key) {
            return None;
        }
        let mut caught_up = self
            .inner
            .puts
            .caught_up
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if catching_up {
            caught_up.insert(entry, print);
        } else if caught_up.remove(&entry) == Some(print) {
            info!(component = %key.0, link = %key.1, direction = direction.as_str(),
                "the host's late put of a link applied at start-up; already applied");
            return None;
        }
        drop(caught_up);
        Some(turn)
    }

    /// Forgets that the catch-up applied link `key` (it was deleted).
    pub(super) fn forget_caught_up(&self, direction: Direction, key: &LinkKey) {
        self.inner
            .puts
            .caught_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(direction, key.clone()));
    }

    /// Applies the links of this provider that the host stored and the provider has not
    /// received (see the module). Returns how many it applied.
    pub async fn catch_up_links(&self, connection: &ProviderConnection) -> anyhow::Result<usize> {
        let provider_id = connection.provider_key();
        let js = async_nats::jetstream::new((*connection.nats).clone());
        let data = js
            .get_key_value(format!("LATTICEDATA_{}", connection.lattice))
            .await
            .context("cannot open the lattice's data bucket")?;
        let stored = stored_links(&data, provider_id).await?;
        let mut configs = None;
        let mut applied = Vec::new();
        for link in stored {
            if self.inner.stopping.load(Ordering::SeqCst) {
                break;
            }
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
            // Opened on the first link that needs it: most starts have none.
            let store = match configs {
                Some(ref store) => store,
                None => configs.insert(
                    js.get_key_value(format!("CONFIGDATA_{}", connection.lattice))
                        .await
                        .context("cannot open the lattice's config bucket")?,
                ),
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
                source_id: link.source_id.clone(),
                target: link.target.clone(),
                name: link.name.clone(),
                wit_namespace: link.wit_namespace.clone(),
                wit_package: link.wit_package.clone(),
                interfaces: link.interfaces.clone(),
                source_config,
                target_config,
                source_secrets: None,
                target_secrets: None,
            };
            // The SDK's own path: it applies the link (through `admit_put`) and records it.
            CATCHING_UP
                .scope(
                    (),
                    wasmcloud_provider_sdk::provider::receive_link_for_provider(
                        self, connection, definition,
                    ),
                )
                .await?;
            if self.holds_link(direction, &key) {
                applied.push((link, direction, key));
            }
        }
        // A link deleted after the read above: its delete found nothing to remove.
        let mut kept = 0;
        for (link, direction, key) in applied {
            match still_stored(&data, &link).await {
                Ok(false) => {
                    info!(component = %key.0, link = %key.1, direction = direction.as_str(),
                        "a link applied at start-up was deleted meanwhile; removed");
                    self.remove_link_as(direction, key).await;
                    connection.delete_link(&link.source_id, &link.target).await;
                }
                Ok(true) => kept += 1,
                Err(e) => {
                    warn!(component = %key.0, link = %key.1, error = %format!("{e:#}"),
                        "cannot check that a link applied at start-up is still stored");
                    kept += 1;
                }
            }
        }
        Ok(kept)
    }

    /// Whether the provider holds (or refused) the link `key` in `direction`.
    fn knows_link(&self, direction: Direction, key: &LinkKey) -> bool {
        let links = self.links();
        holds(&links, direction, key) || links.errors.contains_key(&(direction, key.clone()))
    }

    /// Whether the provider holds the link `key` in `direction`.
    fn holds_link(&self, direction: Direction, key: &LinkKey) -> bool {
        holds(&self.links(), direction, key)
    }
}

/// Whether `links` holds the link `key` in `direction`.
fn holds(links: &Links, direction: Direction, key: &LinkKey) -> bool {
    match direction {
        Direction::Handler => links.handlers.contains_key(key) || links.servers.contains_key(key),
        Direction::Consumer => links.consumers.contains_key(key),
        Direction::Sessions => links.sessions.contains_key(key),
    }
}

/// Whether the host still stores `link` (its source's entry still lists it).
async fn still_stored(
    data: &async_nats::jetstream::kv::Store,
    link: &StoredLink,
) -> anyhow::Result<bool> {
    let key = format!("COMPONENT_{}", link.source_id);
    let Some(bytes) = data
        .get(&key)
        .await
        .with_context(|| format!("cannot read {key}"))?
    else {
        return Ok(false);
    };
    let spec: Spec =
        serde_json::from_slice(&bytes).with_context(|| format!("{key} does not parse"))?;
    Ok(spec.links.iter().any(|l| {
        l.source_id == link.source_id
            && l.target == link.target
            && l.name == link.name
            && l.wit_namespace == link.wit_namespace
            && l.wit_package == link.wit_package
    }))
}

/// The links the host stored with this provider as their source or target.
async fn stored_links(
    store: &async_nats::jetstream::kv::Store,
    provider_id: &str,
) -> anyhow::Result<Vec<StoredLink>> {
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
/// earlier one's keys); a name with no stored config is an error, as it is for the host.
async fn resolve(
    store: &async_nats::jetstream::kv::Store,
    names: &[String],
) -> anyhow::Result<HashMap<String, String>> {
    let mut merged = HashMap::new();
    for name in names {
        let bytes = store
            .get(name)
            .await
            .with_context(|| format!("cannot read config {name:?}"))?
            .with_context(|| format!("config {name:?} is not stored"))?;
        let config: HashMap<String, String> = serde_json::from_slice(&bytes)
            .with_context(|| format!("config {name:?} is not a map of strings"))?;
        merged.extend(config);
    }
    Ok(merged)
}
