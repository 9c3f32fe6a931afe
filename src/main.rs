//! The provider binary: the host starts it from a PAR and passes host data on stdin.
//!
//! The runtime's thread count comes from the provider's config (`RUNTIME_THREADS`); by
//! default one thread on up to two cores, where a current-thread runtime spends far less CPU
//! waking and switching threads than a multi-threaded one (see BENCHMARKS.md). mimalloc avoids
//! glibc's arena locks.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use wasmcloud_provider_messaging_websocket as provider;

fn main() -> anyhow::Result<()> {
    let (threads, warnings) = provider::prepare();
    provider::runtime(threads)?.block_on(provider::run(threads, warnings))?;
    eprintln!("WebSocket messaging provider exiting");
    Ok(())
}
