//! A real browser: a page served on localhost, opened in headless Chromium, connects to a
//! server-mode link with the query-parameter token, sends a message and shows the reply.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use common::{free_port, Env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const TOKEN: &str = "browser-secret";

fn page(ws_port: u16) -> String {
    format!(
        r#"<!doctype html>
<html><body><p id="out">waiting</p><script>
const ws = new WebSocket("ws://127.0.0.1:{ws_port}/?access_token={TOKEN}");
ws.onopen = () => ws.send("hello from the browser");
ws.onmessage = (e) => {{
  document.getElementById("out").textContent = e.data;
  fetch("/result?" + encodeURIComponent(document.getElementById("out").textContent));
}};
ws.onerror = () => fetch("/result?ERROR");
</script></body></html>"#
    )
}

/// Serves the page and reports the query of each `/result?...` request.
async fn http_server(listener: TcpListener, html: String, results: mpsc::UnboundedSender<String>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let html = html.clone();
        let results = results.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let target = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let response = if target == "/" {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                    html.len()
                )
            } else if let Some(query) = target.strip_prefix("/result?") {
                let _ = results.send(query.to_string());
                "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n".to_string()
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_page_connects_with_the_query_token_and_shows_the_reply() -> Result<()> {
    let env = Env::start().await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let http_port = http.local_addr()?.port();
    let ws_port = free_port()?;
    let listen = format!("127.0.0.1:{ws_port}");
    let origin = format!("http://127.0.0.1:{http_port}");

    env.component("test_echo", "web").await?;
    env.link_consumer("web", "default", &[]).await?;
    env.config(
        "web-cfg",
        &[
            ("MODE", "server"),
            ("LISTEN_ADDRESS", &listen),
            ("AUTH_TOKEN", TOKEN),
            ("ALLOWED_ORIGINS", &origin),
        ],
    )
    .await?;
    env.link_handler("web", "web-server", &["web-cfg"]).await?;
    common::eventually(Duration::from_secs(15), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", ws_port)).await?;
        Ok(())
    })
    .await?;

    let (results_tx, mut results) = mpsc::unbounded_channel();
    let server = tokio::spawn(http_server(http, page(ws_port), results_tx));
    let profile = tempfile::tempdir()?;
    let chromium = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into());
    let _browser = tokio::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{origin}/"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!("failed to start {chromium}: install Debian's chromium package")
        })?;

    let shown = tokio::time::timeout(Duration::from_secs(60), results.recv())
        .await
        .context("the page reported nothing within 60 s")?
        .context("result channel closed")?;
    ensure!(
        shown == "hello%20from%20the%20browser",
        "the page shows {shown:?}"
    );
    server.abort();
    env.stop().await
}
