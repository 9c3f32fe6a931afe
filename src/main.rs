//! The provider binary: the host starts it from a PAR and passes host data on stdin.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wasmcloud_provider_messaging_websocket::run().await?;
    eprintln!("WebSocket messaging provider exiting");
    Ok(())
}
