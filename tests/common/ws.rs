//! A real WebSocket server peer for the provider's client connections.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::WebSocketStream;

/// One connection: on the server side, the upgrade request's headers and path; on the client
/// side, the upgrade response's headers.
pub struct Peer<S = TcpStream> {
    pub headers: HeaderMap,
    pub path: String,
    pub ws: WebSocketStream<S>,
}

pub type ClientPeer = Peer<MaybeTlsStream<TcpStream>>;

/// Connects to the provider's listener as a WebSocket client would, with extra headers.
pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<ClientPeer> {
    connect_with(url, headers, None).await
}

/// Like [`connect`], with a TLS connector (for `wss://` with a test CA).
pub async fn connect_with(
    url: &str,
    headers: &[(&str, &str)],
    connector: Option<tokio_tungstenite::Connector>,
) -> Result<ClientPeer> {
    let mut request = url.into_client_request()?;
    for (k, v) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes())?,
            HeaderValue::from_str(v)?,
        );
    }
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector),
    )
    .await
    .context("connect timed out")??;
    Ok(Peer {
        headers: response.headers().clone(),
        path: String::new(),
        ws,
    })
}

/// Tries to connect and returns the HTTP status of a refused upgrade (101 when accepted).
pub async fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> Result<u16> {
    match connect(url, headers).await {
        Ok(_) => Ok(101),
        Err(e) => match e.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            Some(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Ok(response.status().as_u16())
            }
            _ => Err(e),
        },
    }
}

/// A listening WebSocket server; each accepted upgrade arrives on `accept()`.
pub struct Server {
    pub port: u16,
    peers: mpsc::UnboundedReceiver<Peer>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start() -> Result<Self> {
        Self::start_on(0).await
    }

    pub async fn start_on(port: u16) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let (tx, peers) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut seen = None;
                    let callback = |req: &Request, resp: Response| {
                        seen = Some((req.headers().clone(), req.uri().path().to_string()));
                        Ok(resp)
                    };
                    if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await {
                        if let Some((headers, path)) = seen {
                            let _ = tx.send(Peer { headers, path, ws });
                        }
                    }
                });
            }
        });
        Ok(Self { port, peers, task })
    }

    pub fn uri(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Waits for the next client connection.
    pub async fn accept(&mut self) -> Result<Peer> {
        tokio::time::timeout(Duration::from_secs(30), self.peers.recv())
            .await
            .context("no connection from the provider within 30 s")?
            .context("server stopped")
    }

    /// Asserts that no further connection arrives within `wait`.
    pub async fn expect_no_connection(&mut self, wait: Duration) -> Result<()> {
        match tokio::time::timeout(wait, self.peers.recv()).await {
            Ok(Some(_)) => bail!("an unexpected second connection arrived"),
            _ => Ok(()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Peer<S> {
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) -> Result<()> {
        self.ws.send(Message::binary(data)).await?;
        Ok(())
    }

    /// The next text, binary or close message (pings and pongs are skipped).
    pub async fn next_message(&mut self, wait: Duration) -> Result<Message> {
        tokio::time::timeout(wait, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => return Ok(m),
                    Some(Err(e)) => bail!("read failed: {e}"),
                    None => bail!("socket closed without a close frame"),
                }
            }
        })
        .await
        .context("no message within the wait")?
    }

    /// The next message, which must be a text frame.
    pub async fn recv_text(&mut self) -> Result<String> {
        match self.next_message(Duration::from_secs(15)).await? {
            Message::Text(t) => Ok(t.to_string()),
            other => bail!("expected a text frame, got {other:?}"),
        }
    }

    /// Asserts that no data frame arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) -> Result<()> {
        match self.next_message(wait).await {
            Ok(m) => bail!("unexpected message: {m:?}"),
            Err(_) => Ok(()),
        }
    }

    /// Sends one JSON envelope (or any JSON value) as a text frame.
    pub async fn send_json(&mut self, value: serde_json::Value) -> Result<()> {
        self.send_text(&value.to_string()).await
    }

    /// The next message, which must be a text frame holding JSON.
    pub async fn recv_json(&mut self) -> Result<serde_json::Value> {
        let text = self.recv_text().await?;
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    }

    /// Sends the test component a command as an envelope (`FORMAT=json`) and returns the
    /// envelope of its answer (a session frame of `RECOVERY=true` before it is skipped).
    pub async fn command_envelope(&mut self, text: &str) -> Result<serde_json::Value> {
        self.send_json(serde_json::json!({"subject": "cmd", "body": text}))
            .await?;
        loop {
            let answer = self.recv_json().await?;
            if answer.get("session").is_none() {
                return Ok(answer);
            }
        }
    }

    /// Through the test component (`FORMAT=json`), sends session `id` `n` direct messages
    /// (`d0`, `d1`, ...) and `n` to its group `room` (`g0`, ...), alternately, each send
    /// checked; returns the bodies in the order sent.
    pub async fn send_direct_and_to_room(&mut self, id: &str, n: usize) -> Result<Vec<String>> {
        let mut sent = Vec::with_capacity(2 * n);
        for i in 0..n {
            for (command, body, answer) in [
                (format!("!send {id} d{i}"), format!("d{i}"), "SENT"),
                (format!("!group-send room g{i}"), format!("g{i}"), "GROUP 1"),
            ] {
                let reply = self.command_envelope(&command).await?;
                anyhow::ensure!(reply["body"] == answer, "{command}: {reply}");
                sent.push(body);
            }
        }
        Ok(sent)
    }

    /// The session ID of this connection, as the test component sees it.
    pub async fn session_id(&mut self) -> Result<String> {
        let subject = self.round_trip("!whoami").await?;
        subject
            .strip_prefix("ws.session.")
            .map(str::to_string)
            .with_context(|| format!("not a session subject: {subject}"))
    }

    /// Sends `text` and returns the text the component sends back.
    pub async fn round_trip(&mut self, text: &str) -> Result<String> {
        self.send_text(text).await?;
        self.recv_text().await
    }
}
