//! A development lattice in one process: a wasmCloud host and wadm (the `wadm` library's
//! `start_wadm`) on one NATS server, driven through wadm's NATS API exactly as `wash app deploy`
//! drives it. Used by `tests/wadm.rs` and the `devhost` example.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::common::{start_host, HostShutdown, LATTICE};

/// A host and wadm, running until dropped (wadm) or shut down (the host).
pub struct DevLattice {
    pub host_id: String,
    host: Option<HostShutdown>,
    _wadm: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl DevLattice {
    /// Starts both on `nats_url` (which must have JetStream on).
    pub async fn start(nats_url: &str) -> Result<Self> {
        // wadm first: it learns of a lattice from its events, and the host's start is one.
        let server = nats_url.trim_start_matches("nats://").to_string();
        let wadm = wadm::start_wadm(wadm::config::WadmConfig {
            nats_server: server,
            ..Default::default()
        })
        .await
        .context("failed to start wadm")?;
        let (host_id, host) = start_host(nats_url, wasmcloud_core::OtelConfig::default()).await?;
        Ok(Self {
            host_id,
            host: Some(host),
            _wadm: wadm,
        })
    }

    /// Stops the host (and with it the provider and components it runs).
    pub async fn stop(mut self) -> Result<()> {
        if let Some(host) = self.host.take() {
            host.await?;
        }
        Ok(())
    }
}

impl Drop for DevLattice {
    fn drop(&mut self) {
        // As in `Env`: the host's extracted provider binaries stay behind otherwise.
        let cache = std::env::temp_dir()
            .join("wasmcloudcache")
            .join(&self.host_id);
        let _ = std::fs::remove_dir_all(cache);
    }
}

/// Asks wadm on subject `wadm.api.<lattice>.model.<operation>`; returns its JSON answer.
async fn ask(
    nats: &async_nats::Client,
    operation: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value> {
    let subject = format!("wadm.api.{LATTICE}.model.{operation}");
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        nats.request(subject.clone(), body.into()),
    )
    .await
    .with_context(|| format!("wadm did not answer on {subject}"))??;
    serde_json::from_slice(&reply.payload).with_context(|| format!("bad answer on {subject}"))
}

/// Stores the manifest (YAML) and deploys it, as `wash app deploy` does; returns its name.
pub async fn deploy(nats: &async_nats::Client, manifest: &str) -> Result<String> {
    // The manifest is parsed by wadm's own types first, so a bad one fails here clearly.
    let parsed: wadm_types::Manifest =
        serde_yaml::from_str(manifest).context("the manifest does not parse")?;
    let name = parsed.metadata.name.clone();
    let put = ask(nats, "put", manifest.as_bytes().to_vec()).await?;
    if put["result"] == "error" {
        bail!("wadm refused the manifest: {put}");
    }
    let deployed = ask(nats, &format!("deploy.{name}"), Vec::new()).await?;
    if deployed["result"] == "error" {
        bail!("wadm did not deploy {name}: {deployed}");
    }
    Ok(name)
}

/// Waits until wadm reports the application deployed (every trait reconciled).
pub async fn wait_deployed(nats: &async_nats::Client, name: &str, within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = ask(nats, &format!("status.{name}"), Vec::new()).await?;
        let info = &status["status"]["status"];
        let state = info["type"]
            .as_str()
            .or_else(|| info.as_str())
            .unwrap_or_default();
        if state.eq_ignore_ascii_case("deployed") {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{name} is not deployed: {status}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
