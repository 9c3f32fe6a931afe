//! The benchmark's P-wasm target: a real wasmCloud host in this process (on its own
//! `nats-server`), the provider started from a PAR of the release binary, and the real test
//! component (`tests/components/echo`, built for `wasm32-wasip2`) answering every frame through
//! the provider, on a server-mode link.
//!
//! Prints `READY <ws url> <provider pid> <nats pid> <nats url>` once the listener accepts connections, then
//! runs until its standard input closes (the benchmark holds the other end), and stops the host.
//!
//! Environment (set by the benchmark):
//! - `PWASM_LINK_CONFIG=KEY=VALUE,...`: more config on the server-mode link (`MAX_IN_FLIGHT=64`);
//! - `PWASM_PROVIDER_CONFIG=KEY=VALUE,...`: the provider's own config (`RUNTIME_THREADS=2`);
//! - `PWASM_PROVIDER_BINARY=<binary>`: start that build of our provider (an earlier commit's,
//!   to compare in one run) instead of the one next to this example;
//! - `PWASM_NATS_PROVIDER=<binary>`: run that binary (the first-party NATS messaging provider,
//!   `bench/nats-provider`) in place of ours, the same component linked to it, subscribed to
//!   `bench.echo`; the READY line then names the `nats://` URL to send requests to.
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

/// `KEY=VALUE,KEY=VALUE` from the environment variable `name`.
fn pairs(name: &str) -> Vec<(String, String)> {
    std::env::var(name)
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn refs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The NATS messaging provider under the same host, with the same component, answering
/// requests on `bench.echo` (its link keys are read in lower case only).
async fn nats_provider(env: &common::Env, binary: &str) -> Result<String> {
    env.start_provider_binary(std::path::Path::new(binary), &[])
        .await?;
    env.component_scaled("test_echo", "bench", INSTANCES)
        .await?;
    let cluster = env.nats.url.clone();
    env.config(
        "nats-sub",
        &[("subscriptions", "bench.echo"), ("cluster_uris", &cluster)],
    )
    .await?;
    env.config("nats-pub", &[("cluster_uris", &cluster)])
        .await?;
    env.link_consumer("bench", "default", &["nats-pub"]).await?;
    env.link_handler("bench", "pwasm", &["nats-sub"]).await?;
    // Ready once a request is answered (the subscription is made after the link is applied).
    let client = async_nats::connect(&cluster).await?;
    common::eventually(std::time::Duration::from_secs(60), || async {
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            client.request("bench.echo", "#ready".into()),
        )
        .await??;
        anyhow::ensure!(&reply.payload[..] == b"#ready", "unexpected reply");
        Ok(())
    })
    .await?;
    Ok(cluster)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let provider_config = pairs("PWASM_PROVIDER_CONFIG");
    let nats_binary = std::env::var("PWASM_NATS_PROVIDER").ok();
    let other_build = std::env::var("PWASM_PROVIDER_BINARY").ok();
    let env = if nats_binary.is_some() {
        common::Env::start_bare().await?
    } else if let Some(binary) = &other_build {
        let env = common::Env::start_bare().await?;
        let mut config = Vec::new();
        if !provider_config.is_empty() {
            env.config("provider-config", &refs(&provider_config))
                .await?;
            config.push("provider-config");
        }
        env.start_provider_binary(std::path::Path::new(binary), &config)
            .await?;
        env
    } else {
        common::Env::start_with(Default::default(), &refs(&provider_config)).await?
    };
    let url = match &nats_binary {
        Some(binary) => nats_provider(&env, binary).await?,
        None => {
            // The load generator opens many handshakes at once from one address: admission's
            // per-address cap is not what is measured here.
            let mut link = vec![(
                "MAX_HANDSHAKES_PER_ADDRESS".to_string(),
                "65536".to_string(),
            )];
            link.extend(pairs("PWASM_LINK_CONFIG"));
            env.serve_scaled("pwasm", "bench", &refs(&link), INSTANCES)
                .await?
        }
    };
    let nats = env.nats.pid().context("nats-server has no pid")?;
    let provider = provider_pid(nats).context("the host started no provider process")?;
    println!("READY {url} {provider} {nats} {}", env.nats.url);
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    env.stop().await
}
