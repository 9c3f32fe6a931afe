//! Development host: a real wasmCloud host (`wasmcloud-host`, configured as wasmcloud-test-util
//! configures it) and wadm (the `wadm` library's `start_wadm`), in this one process, on a local
//! `nats-server -js`. `wash` 0.43 drives it as it drives an official host: `wash get inventory`,
//! `wash start provider`, `wash link put`, `wash app deploy`.
//!
//! Run: `nats-server -js &` then `cargo run --example devhost [-- --nats nats://127.0.0.1:4222]`.
//! (`wash app deploy` resolves the manifests' relative file:// paths itself.)
//! Ctrl-C (or SIGTERM) stops the host and everything it runs. Needs nats-server 2.10+ (wadm), see
//! `scripts/setup.sh`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/wadm.rs"]
#[allow(dead_code)]
mod lattice;

use anyhow::Result;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let nats = args
        .iter()
        .position(|a| a == "--nats")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var("NATS_URL").ok())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string());
    let dev = lattice::DevLattice::start(&nats).await?;
    println!(
        "wasmCloud host {} and wadm are running on {nats}, lattice {}; Ctrl-C stops them",
        dev.host_id,
        common::LATTICE
    );
    // Ctrl-C or SIGTERM: stop the host properly, so it stops the providers it started.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = terminate.recv() => {}
    }
    println!("stopping");
    dev.stop().await
}
