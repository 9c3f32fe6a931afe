//! A real browser: a page served on localhost, opened in headless Chromium, connects to a
//! server-mode link with the query-parameter token, sends a message and shows the reply; and the
//! README's resuming client (`examples/browser/resuming-socket.js`) keeps its session across a
//! network cut and gets every message it missed.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use common::{free_port, Blackhole, Env};
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
    let (_command, commands) = tokio::sync::watch::channel(String::new());
    http_server_with(listener, html, results, commands).await;
}

/// [`http_server`], also answering `/cmd` with the latest command for the page.
async fn http_server_with(
    listener: TcpListener,
    html: String,
    results: mpsc::UnboundedSender<String>,
    commands: tokio::sync::watch::Receiver<String>,
) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let html = html.clone();
        let results = results.clone();
        let command = commands.borrow().clone();
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
            } else if target == "/cmd" {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{command}",
                    command.len()
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
    let (_profile, _browser) = browser(&origin)?;

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

/// Headless Chromium opening `origin`/ with a fresh profile (kept until the browser is dropped).
fn browser(origin: &str) -> Result<(tempfile::TempDir, tokio::process::Child)> {
    let profile = tempfile::tempdir()?;
    let chromium = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into());
    let browser = tokio::process::Command::new(&chromium)
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
    Ok((profile, browser))
}

/// The README's resuming client, as a page: it reports its session frames and every message
/// (`i:seq:body`, i counting in arrival order), and follows the test's `/cmd`.
fn resuming_page(ws_url: &str) -> String {
    let client = include_str!("../examples/browser/resuming-socket.js");
    format!(
        r#"<!doctype html>
<html><body><script>{client}</script><script>
const report = (q) => fetch("/result?" + q);
let i = 0;
const client = resumingSocket("{ws_url}/", {{
  onSession: (s) => report("session=" + encodeURIComponent(JSON.stringify(s))),
  onMessage: (m) => report("message=" + encodeURIComponent(`${{i++}}:${{m.seq}}:${{m.body}}`)),
}});
async function poll() {{
  const command = await (await fetch("/cmd")).text();
  if (command.startsWith("reconnect ")) {{ client.reconnect(command.slice(10)); return; }}
  setTimeout(poll, 100);
}}
poll();
</script></body></html>"#
    )
}

/// Sends a command envelope and returns the body of the answer.
async fn command(peer: &mut common::ws::ClientPeer, text: &str) -> Result<String> {
    let answer = peer.command_envelope(text).await?;
    Ok(answer["body"].as_str().unwrap_or_default().to_string())
}

/// The page's reports, as they arrive. Each is a fetch of its own, so one may overtake another
/// (a message report may arrive before the session report sent just before it): a report of
/// another kind than the one awaited is kept for later, never dropped.
struct Reports {
    rx: mpsc::UnboundedReceiver<String>,
    pending: Vec<String>,
}

impl Reports {
    fn new(rx: mpsc::UnboundedReceiver<String>) -> Self {
        Self {
            rx,
            pending: Vec::new(),
        }
    }

    /// The next report that starts with `kind=`, URL-decoded.
    async fn next(&mut self, kind: &str) -> Result<String> {
        let prefix = format!("{kind}=");
        let report = match self.pending.iter().position(|r| r.starts_with(&prefix)) {
            Some(i) => self.pending.remove(i),
            None => loop {
                let report = tokio::time::timeout(Duration::from_secs(60), self.rx.recv())
                    .await
                    .with_context(|| format!("the page reported no {kind} within 60 s"))?
                    .context("result channel closed")?;
                if report.starts_with(&prefix) {
                    break report;
                }
                self.pending.push(report);
            },
        };
        let value = &report[prefix.len()..];
        Ok(url::form_urlencoded::parse(format!("v={value}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_client_in_a_browser_resumes_after_a_cut_and_misses_nothing() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve(
            "web-rec",
            "web-rec-server",
            &[("FORMAT", "json"), ("RECOVERY", "true")],
        )
        .await?;
    let proxy = Blackhole::start(&url).await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://127.0.0.1:{}", http.local_addr()?.port());
    let (results_tx, results) = mpsc::unbounded_channel();
    let mut reports = Reports::new(results);
    let (command_tx, commands) = tokio::sync::watch::channel(String::new());
    let server = tokio::spawn(http_server_with(
        http,
        resuming_page(&proxy.url),
        results_tx,
        commands,
    ));
    let (_profile, _browser) = browser(&origin)?;

    let session: serde_json::Value = serde_json::from_str(&reports.next("session").await?)?;
    ensure!(session["resumed"] == false, "{session}");
    let id = session["id"].as_str().context("session id")?.to_string();
    let mut controller = common::ws::connect(&format!("{url}/"), &[]).await?;
    assert_eq!(
        command(&mut controller, &format!("!join {id} room")).await?,
        "JOINED"
    );
    assert_eq!(
        command(&mut controller, &format!("!send {id} before")).await?,
        "SENT"
    );
    assert_eq!(reports.next("message").await?, "0:1:before");

    // The page's network drops (nothing passes, nothing closes); 100 messages meanwhile.
    proxy.cut();
    let expected = controller.send_direct_and_to_room(&id, 50).await?;
    // The network is back, by another route: the page resumes.
    command_tx.send_replace(format!("reconnect {url}"));
    let resumed: serde_json::Value = serde_json::from_str(&reports.next("session").await?)?;
    ensure!(resumed["id"] == id.as_str(), "{resumed}");
    ensure!(
        resumed["resumed"] == true && resumed["recovered"] == true,
        "{resumed}"
    );
    let mut got = Vec::new();
    for _ in 0..100 {
        match reports.next("message").await {
            Ok(report) => got.push(report),
            Err(e) => bail!("{e:#}; the page reported {} of 100: {got:?}", got.len()),
        }
    }
    // Reports are fetches and may arrive out of order: sort by the page's own count.
    got.sort_by_key(|r| r.split(':').next().and_then(|i| i.parse::<u32>().ok()));
    let want: Vec<String> = expected
        .iter()
        .enumerate()
        .map(|(i, body)| format!("{}:{}:{body}", i + 1, i + 2))
        .collect();
    assert_eq!(got, want, "every missed message, once, in order");
    // And nothing more (no message twice, no second resume): a negative check, so a short wait.
    let more = tokio::time::timeout(Duration::from_millis(700), reports.rx.recv()).await;
    ensure!(
        more.is_err() && reports.pending.is_empty(),
        "a report more: {more:?} {:?}",
        reports.pending
    );
    server.abort();
    env.stop().await
}
