//! The benchmark's P-wasm target: a real wasmCloud host in this process (on its own
//! `nats-server`), the provider started from a PAR of the release binary, and the real test
//! component (`tests/components/echo`, built for `wasm32-wasip2`) answering every frame through
//! the provider, on a server-mode link.
//!
//! Prints `READY <ws url> <provider pid> <nats pid>` once the listener accepts connections, then
//! runs until its standard input closes (the benchmark holds the other end), and stops the host.
//!
//! Build: `cargo build --release --example pwasm` (after the provider binary, which it packs).
//! `./scripts/bench.sh` builds and runs it; it is not meant to be run by hand.

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{Context as _, Result};
use tokio::io::AsyncReadExt as _;

/// Instances of the component that may run at once (one per concurrent `handle-message`).
const INSTANCES: u32 = 100;

/// The provider process the host started: the child of this process that is not `nats`.
fn provider_pid(nats: u32) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
        let (_comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == me && pid != nats).then_some(pid)
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let env = common::Env::start().await?;
    let url = env.serve_scaled("pwasm", "bench", &[], INSTANCES).await?;
    let nats = env.nats.pid().context("nats-server has no pid")?;
    let provider = provider_pid(nats).context("the host started no provider process")?;
    println!("READY {url} {provider} {nats}");
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    env.stop().await
}
