//! One client-mode WebSocket connection, kept up for as long as its owner wants it.
//!
//! [`run`] connects (with the upgrade headers and a connect timeout), then reads and writes
//! concurrently until the socket drops, and reconnects with exponential backoff and full jitter.
//! The open socket is served by [`serve`]: frames go to a [`FrameSink`] in order, and reading
//! waits while the sink does, so a slow component slows the socket instead of growing a queue
//! (without the server being taken for dead meanwhile: see the blame rules of the socket's
//! `liveness` module).
//! A server that stops answering pings, or stops taking writes, for ping interval + pong timeout
//! is dropped and connected again, even while a write to it is blocked.
//! Cancelling the token sends a close frame and ends the task.
//!
//! This module knows nothing of wasmCloud or sessions.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::socket::{serve, ws_config, ConnState, End, FrameSink, Keepalive, Outbound};
use super::Token;

/// A connection that stayed up this long resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// Everything needed to open and keep one client connection.
#[derive(Clone)]
pub struct ClientOptions {
    pub uri: String,
    /// `uri` as logs may show it: the owner removes credentials (user info, query).
    pub shown_uri: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<Token>,
    /// Extra upgrade-request headers.
    pub headers: BTreeMap<String, String>,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub max_message_bytes: usize,
    pub keepalive: Keepalive,
}

/// Shows the URI as `shown_uri` and headers by name only: either may hold a credential.
impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("uri", &self.shown_uri)
            .field("token", &self.token)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

/// Builds the upgrade request: URI, extra headers and `Authorization: Bearer`.
fn upgrade_request(
    options: &ClientOptions,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    let mut request = options
        .uri
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad URI {:?}: {e}", options.shown_uri))?;
    let headers = request.headers_mut();
    for (name, value) in &options.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("bad header name {name:?}"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("bad value for header {name}"))?;
        headers.insert(name, value);
    }
    if let Some(token) = &options.token {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| "AUTH_TOKEN is not a valid header value".to_string())?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    Ok(request)
}

/// Exponential backoff with full jitter: each delay is uniform in `[0, min(max, min * 2^n)]`.
struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=ceiling_ms))
    }
}

/// Waits until `allowed` says true; false if it can never say so again.
async fn until_allowed(allowed: &mut watch::Receiver<bool>) -> bool {
    allowed.wait_for(|a| *a).await.is_ok()
}

/// Waits until `allowed` says false (or its sender is gone).
async fn until_denied(allowed: &mut watch::Receiver<bool>) {
    let _ = allowed.wait_for(|a| !*a).await;
}

/// Runs the connection until `cancel` fires. Never returns early on errors: it reconnects.
///
/// It connects only while `allowed` says true (the lease of a connection that several provider
/// replicas share): when it turns false the socket is closed at once, before it reads another
/// frame, and the task waits for it to turn true again.
pub async fn run<S: FrameSink>(
    options: ClientOptions,
    sink: Arc<S>,
    mut outbound: mpsc::Receiver<Box<Outbound>>,
    state: watch::Sender<ConnState>,
    mut allowed: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff {
        min: options.reconnect_min,
        max: options.reconnect_max,
        attempt: 0,
    };
    let mut ever_connected = false;
    loop {
        if !*allowed.borrow() {
            tokio::select! {
                () = cancel.cancelled() => return,
                ok = until_allowed(&mut allowed) => if !ok { return },
            }
        }
        state.send_replace(ConnState::Connecting);
        let attempt = tokio::select! {
            () = cancel.cancelled() => return,
            () = until_denied(&mut allowed) => continue,
            r = connect(&options) => r,
        };
        let error = match attempt {
            Ok(ws) => {
                let up_at = Instant::now();
                connected(&options, sink.as_ref(), &state, &mut ever_connected);
                let this_socket = cancel.child_token();
                let end = {
                    let serving = serve(
                        ws,
                        sink.as_ref(),
                        &mut outbound,
                        &this_socket,
                        CloseCode::Normal,
                        options.keepalive,
                    );
                    tokio::pin!(serving);
                    let mut fenced = false;
                    loop {
                        tokio::select! {
                            biased;
                            () = until_denied(&mut allowed), if !fenced => {
                                fenced = true;
                                this_socket.cancel();
                            }
                            end = &mut serving => break end,
                        }
                    }
                };
                match end {
                    End::Cancelled if cancel.is_cancelled() => return,
                    End::Cancelled => {
                        info!(uri = %options.shown_uri, "this replica let go of the connection's lease (another replica took it, or NATS was unreachable); socket closed");
                        disconnected(
                            &state,
                            &mut outbound,
                            "this replica lost the connection's lease",
                        );
                        continue;
                    }
                    End::Dropped(closed) => {
                        if up_at.elapsed() >= STABLE_AFTER {
                            backoff.attempt = 0;
                        }
                        closed.reason
                    }
                }
            }
            Err(e) => e,
        };
        disconnected(&state, &mut outbound, &error);
        let delay = backoff.next();
        warn!(uri = %options.shown_uri, %error, ?delay, "websocket disconnected; will reconnect");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Reports a new connection: logged, counted as a reconnect after the first, and in the state.
fn connected<S: FrameSink>(
    options: &ClientOptions,
    sink: &S,
    state: &watch::Sender<ConnState>,
    ever_connected: &mut bool,
) {
    info!(uri = %options.shown_uri, "websocket connected");
    if std::mem::replace(ever_connected, true) {
        sink.reconnected();
    }
    state.send_replace(ConnState::Connected {
        since: SystemTime::now(),
    });
}

/// Reports a lost (or never made) connection: the state says why, and every frame queued for
/// the dead socket is failed with that reason, not silently kept or lost.
fn disconnected(
    state: &watch::Sender<ConnState>,
    outbound: &mut mpsc::Receiver<Box<Outbound>>,
    error: &str,
) {
    state.send_replace(ConnState::Disconnected {
        error: error.to_string(),
    });
    while let Ok(pending) = outbound.try_recv() {
        if let Some(ack) = pending.ack {
            let _ = ack.send(Err(format!("connection lost: {error}")));
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and upgrades within the connect timeout.
async fn connect(options: &ClientOptions) -> Result<Ws, String> {
    match tokio::time::timeout(options.connect_timeout, upgrade(options)).await {
        Ok(upgraded) => upgraded,
        Err(_) => Err(format!(
            "connect timed out after {} s",
            options.connect_timeout.as_secs()
        )),
    }
}

async fn upgrade(options: &ClientOptions) -> Result<Ws, String> {
    let request = upgrade_request(options)?;
    let (ws, _response) = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(ws_config(options.max_message_bytes)),
        true,
        None,
    )
    .await
    .map_err(|e| format!("connect failed: {e}"))?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_ceiling() {
        let mut b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            attempt: 0,
        };
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let d = b.next();
            assert!(d <= Duration::from_millis(ceiling), "{d:?} > {ceiling}");
        }
    }

    fn options(uri: &str) -> ClientOptions {
        ClientOptions {
            uri: uri.into(),
            shown_uri: "ws://127.0.0.1:1/x?<redacted>".into(),
            token: Some(Token::new("t0k")),
            headers: [("x-one".to_string(), "s3cret-header".to_string())].into(),
            connect_timeout: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(1),
            reconnect_max: Duration::from_millis(2),
            max_message_bytes: 1024,
            keepalive: Keepalive::default(),
        }
    }

    #[test]
    fn upgrade_request_carries_headers_and_token() {
        let req = upgrade_request(&options("ws://127.0.0.1:1/x")).expect("request");
        assert_eq!(req.headers()["authorization"], "Bearer t0k");
        assert!(req.headers()["authorization"].is_sensitive());
        assert_eq!(req.headers()["x-one"], "s3cret-header");
    }

    #[test]
    fn options_show_no_credentials() {
        let options = options("ws://127.0.0.1:1/x?access_token=qu3ry");
        let shown = format!("{options:?}");
        for secret in ["t0k", "s3cret", "qu3ry"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let e = upgrade_request(&ClientOptions {
            uri: "ws://h/?access_token=qu3ry bad".into(),
            ..options
        })
        .expect_err("bad URI");
        assert!(!e.contains("qu3ry"), "{e}");
    }
}
