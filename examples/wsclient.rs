//! A tiny WebSocket client for trying the provider by hand: connects to a URL, sends each
//! argument as a text frame, and prints every frame it receives until it has been quiet for
//! two seconds. `cargo run --example wsclient -- ws://127.0.0.1:8090/chat "/nick ann" "hello"`

use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .context("usage: wsclient <ws://...> [text...]")?;
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    println!("connected to {url}");
    let mut lines = args.collect::<Vec<_>>().into_iter();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => println!("< {text}"),
            Ok(Some(Ok(Message::Binary(data)))) => println!("< ({} bytes)", data.len()),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => break,
            Err(_) => match lines.next() {
                // Quiet: send the next line, or finish.
                Some(line) => {
                    println!("> {line}");
                    ws.send(Message::text(line)).await?;
                }
                None => break,
            },
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
