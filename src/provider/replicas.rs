//! This replica's part of the lattice ([`Cluster`]): started with the first link, or never when
//! JetStream is missing (then the provider runs alone and health says so).

use std::sync::Arc;

use tracing::warn;
use wasmcloud_provider_sdk::load_host_data;

use super::WsProvider;
use crate::cluster::{Cluster, Handler};

impl WsProvider {
    /// The lattice's replicas, joined on first use; `None`: this provider runs alone.
    pub(crate) async fn cluster(&self) -> Option<Cluster> {
        let joined = self
            .inner
            .cluster
            .get_or_init(|| async {
                let host = load_host_data().map_err(|e| format!("no host data: {e}"))?;
                let ttl = self
                    .inner
                    .defaults
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .lease_ttl()
                    .unwrap_or(crate::config::DEFAULT_LEASE_TTL);
                let nats = (*wasmcloud_provider_sdk::get_connection().nats).clone();
                let provider = self.clone();
                let handler: Handler = Arc::new(move |call| {
                    let provider = provider.clone();
                    Box::pin(async move { provider.serve_forwarded(call).await })
                });
                // A JetStream that is there but slow to answer gets a second try: running alone
                // beside other replicas would open their client sockets twice.
                let mut joined = Err(String::new());
                for _ in 0..2 {
                    joined = Cluster::start(
                        nats.clone(),
                        &host.lattice_rpc_prefix,
                        &host.provider_key,
                        &host.host_id,
                        ttl,
                        &self.inner.registry,
                        Arc::clone(&self.inner.metrics),
                        Arc::clone(&handler),
                    )
                    .await;
                    match &joined {
                        Err(e) if e.contains("did not answer") => continue,
                        _ => break,
                    }
                }
                if let Err(e) = &joined {
                    warn!(error = %e, "running alone: replicas on other hosts will not share sessions or client connections");
                }
                joined
            })
            .await;
        joined.as_ref().ok().cloned()
    }

    /// The cluster if it was joined already (never waits).
    pub(crate) fn cluster_now(&self) -> Option<&Cluster> {
        self.inner.cluster.get().and_then(|c| c.as_ref().ok())
    }

    /// Health's line on replicas.
    pub(super) fn replicas_summary(&self) -> Option<String> {
        match self.inner.cluster.get()? {
            Ok(cluster) => Some(cluster.summary()),
            Err(e) => Some(format!("running alone ({e})")),
        }
    }
}
