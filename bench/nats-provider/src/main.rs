//! The first-party NATS messaging provider as a binary: `wasmcloud-provider-messaging-nats`
//! 0.27.0 is published as a library (its `main` lives in the wasmCloud repository), so this is
//! that `main`: the host starts it from a PAR, as it starts ours.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wasmcloud_provider_messaging_nats::run().await?;
    eprintln!("NATS messaging provider exiting");
    Ok(())
}
