//! The wasmCloud user's path: each example's wadm manifest, parsed and deployed through wadm
//! (in process, as `wash app deploy` would deploy it) onto an in-process host, then messages
//! flow end to end over real WebSocket peers.
//!
//! The manifests are used as written, except for what only this machine knows: the image paths
//! of the freshly built component and provider archive, and free ports.

mod common;
#[path = "common/wadm.rs"]
mod lattice;

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use common::ws::{connect, Server};
use lattice::{deploy, wait_deployed, DevLattice};

/// Reads an example manifest and points it at this build: `(from, to)` replacements, each of
/// which must apply.
fn manifest(path: &str, replacements: &[(&str, String)]) -> Result<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text =
        std::fs::read_to_string(root.join(path)).with_context(|| format!("read {path}"))?;
    for (from, to) in replacements {
        ensure!(text.contains(from), "{path} no longer contains {from:?}");
        text = text.replace(from, to);
    }
    Ok(text)
}

const PROVIDER_IMAGE: &str = "file://../../build/messaging-websocket-provider.par.gz";

/// A deployed example: NATS, the host and wadm, and the provider archive the host started.
struct Deployed {
    dev: DevLattice,
    _nats: common::Nats,
    _par_dir: tempfile::TempDir,
}

/// Starts NATS, a host and wadm; points `examples/<example>/wadm.yaml` at this build (the
/// component `wasm` and a fresh provider archive) and at `extra`; deploys it through wadm and
/// waits until wadm reports it deployed.
async fn deploy_example(example: &str, wasm: &str, extra: &[(&str, String)]) -> Result<Deployed> {
    let nats = common::Nats::start().await?;
    let dev = DevLattice::start(&nats.url).await?;
    let client = async_nats::connect(&nats.url).await?;
    let par_dir = tempfile::tempdir()?;
    let par = common::provider_par(par_dir.path()).await?;
    let image = format!("file://./target/wasm32-wasip2/release/{wasm}.wasm");
    let mut replacements = vec![
        (
            image.as_str(),
            format!("file://{}", common::component(wasm)?.display()),
        ),
        (PROVIDER_IMAGE, format!("file://{}", par.display())),
    ];
    replacements.extend(extra.iter().cloned());
    let text = manifest(&format!("examples/{example}/wadm.yaml"), &replacements)?;
    let name = deploy(&client, &text).await?;
    // wadm reports `deployed` once every scaler saw its effect; on two busy cores, with two hosts
    // compiling components in a debug build, that took over a minute (a missed event waits for
    // the host's next 30 s health check to be reconciled again).
    wait_deployed(&client, &name, Duration::from_secs(180)).await?;
    Ok(Deployed {
        dev,
        _nats: nats,
        _par_dir: par_dir,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_example_deploys_through_wadm_and_echoes() -> Result<()> {
    let mut server = Server::start().await?;
    let deployed =
        deploy_example("echo", "ws_echo", &[("ws://127.0.0.1:8080/", server.uri())]).await?;

    // The provider connects to our server for the echo component; what we send comes back.
    let mut peer = server.accept().await?;
    for text in ["hello, wadm", "second message"] {
        peer.send_text(text).await?;
        assert_eq!(peer.recv_text().await?, format!("echo: {text}"));
    }
    deployed.dev.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_example_deploys_through_wadm_and_clients_chat() -> Result<()> {
    let address = format!("127.0.0.1:{}", common::free_port()?);
    let deployed =
        deploy_example("chat", "ws_chat", &[("127.0.0.1:8090", address.clone())]).await?;
    let url = format!("ws://{address}/chat");
    common::wait_listening(&url).await?;
    // Two people join the room: each is welcomed, and the first sees the second arrive.
    let mut ann = connect(&url, &[]).await?;
    let welcome = ann.recv_text().await?;
    ensure!(welcome.starts_with("welcome, "), "{welcome}");
    ensure!(ann.recv_text().await?.ends_with(" joined"));
    ann.send_text("/nick ann").await?;
    ensure!(ann.recv_text().await?.ends_with(" is now ann"));

    let mut bob = connect(&url, &[]).await?;
    let bob_welcome = bob.recv_text().await?;
    let bob_was = bob_welcome
        .strip_prefix("welcome, ")
        .context("no welcome for bob")?
        .to_string();
    assert_eq!(bob.recv_text().await?, format!("* {bob_was} joined"));
    assert_eq!(ann.recv_text().await?, format!("* {bob_was} joined"));
    bob.send_text("/nick bob").await?;
    for peer in [&mut ann, &mut bob] {
        assert_eq!(peer.recv_text().await?, format!("* {bob_was} is now bob"));
    }

    // One line from each reaches the whole room, in order, and nothing else arrives.
    ann.send_text("hi bob").await?;
    for peer in [&mut ann, &mut bob] {
        assert_eq!(peer.recv_text().await?, "ann: hi bob");
    }
    bob.send_text("hi ann").await?;
    for peer in [&mut ann, &mut bob] {
        assert_eq!(peer.recv_text().await?, "bob: hi ann");
    }
    ann.expect_silence(Duration::from_millis(500)).await?;

    // Bob leaves; the room hears of it.
    drop(bob);
    assert_eq!(ann.recv_text().await?, format!("* {bob_was} left"));
    deployed.dev.stop().await
}
