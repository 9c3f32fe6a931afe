//! The provider binary: the host starts it from a PAR and passes host data on stdin.
//!
//! One thread runs everything: on the two-core machines this provider is measured on, a
//! current-thread runtime spends far less time waking and switching threads than a
//! multi-threaded one (see BENCHMARKS.md), and mimalloc avoids glibc's arena locks.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    wasmcloud_provider_messaging_websocket::run().await?;
    eprintln!("WebSocket messaging provider exiting");
    Ok(())
}
