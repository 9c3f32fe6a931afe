//! End-to-end demo: NATS, an in-process wasmCloud host, the provider (from a PAR of the freshly
//! built binary), the `examples/echo` component, and a WebSocket server that talks to it.
//!
//! Run it with `./scripts/demo.sh` (or `cargo run --example demo` once `nats-server` is
//! installed). It prints every message that flows and exits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let started = Instant::now();
    let step = |what: &str| println!("[{:>5.1}s] {what}", started.elapsed().as_secs_f32());

    // The provider logs warnings and errors only: what follows is the story.
    common::QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
    step("starting nats-server, a wasmCloud host and the provider");
    let env = common::Env::start().await?;
    let mut server = common::ws::Server::start().await?;
    step(&format!("WebSocket server listening at {}", server.uri()));

    step("starting the echo component and linking it both ways");
    env.component("ws_echo", "echo").await?;
    env.config("echo-ws", &[("URI", &server.uri())]).await?;
    env.link_consumer("echo", "default", &[]).await?;
    env.link_handler("echo", "echo-handler", &["echo-ws"])
        .await?;

    let mut peer = server.accept().await?;
    step("the provider connected to the WebSocket server");

    for text in [
        "hello, wasmCloud",
        "a message from the WebSocket server",
        "bye",
    ] {
        println!("  server -> provider -> component : {text}");
        peer.send_text(text).await?;
        let reply = peer.recv_text().await?;
        println!("  component -> provider -> server : {reply}");
        ensure!(
            reply == format!("echo: {text}"),
            "unexpected reply {reply:?}"
        );
    }
    let binary: Vec<u8> = (0..=255u8).collect();
    peer.send_binary(binary.clone()).await?;
    match peer.next_message(Duration::from_secs(10)).await? {
        Message::Binary(data) if data.as_ref() == binary.as_slice() => {
            println!("  256 binary bytes went round unchanged")
        }
        other => anyhow::bail!("unexpected reply {other:?}"),
    }

    step("deleting the handler link: the provider closes the socket");
    env.unlink_handler("echo-handler").await?;
    match peer.next_message(Duration::from_secs(10)).await? {
        Message::Close(frame) => println!("  server received a close frame: {frame:?}"),
        other => anyhow::bail!("expected a close frame, got {other:?}"),
    }
    env.stop().await?;
    step("demo finished");
    Ok(())
}
