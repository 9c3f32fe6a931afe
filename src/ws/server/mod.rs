//! Server mode: a listener that accepts WebSocket clients, one session each.
//!
//! Each accepted TCP connection is a pending handshake (`pending`: one deadline, eviction of the
//! oldest, a cap per remote address) until it passes admission during the HTTP upgrade
//! (`admission`: path, token, origin, subprotocol and capacity checks). TLS (`wss://`, `tls`)
//! wraps the TCP stream before the upgrade. Each admitted client is handed to an [`Accept`]
//! owner, which gives it a frame sink and an outbound queue; the socket is then served by
//! [`socket::serve`] until it drops or the listener is cancelled (close code 1001).
//!
//! This module knows nothing of wasmCloud or sessions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use super::socket::{self, Closed, End, FrameSink, Keepalive, Outbound};
use super::Token;

mod admission;
mod pending;
mod tls;

pub use tls::load_tls;

use admission::admit;
use pending::{until_deadline, Handshake, Pending, DROP_WARN_INTERVAL};

/// The query parameter a browser uses to present the token (browsers cannot set headers).
pub const TOKEN_QUERY_PARAM: &str = "access_token";
/// The query parameters of a client that resumes: its resume token and the last sequence
/// number it saw (browsers cannot set headers either).
pub const RESUME_QUERY_PARAM: &str = "resume";
pub const LAST_SEQ_QUERY_PARAM: &str = "last_seq";

/// What the listener needs besides the socket.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub listen_address: SocketAddr,
    /// The request path clients must use.
    pub path: String,
    /// The token clients must present; `None` admits clients without one.
    pub token: Option<Token>,
    /// Allowed `Origin` values; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
    pub max_connections: usize,
    /// Subprotocols the server accepts, in order of preference.
    pub subprotocols: Vec<String>,
    /// PEM certificate chain and private key for `wss://`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Request headers (lower-case names) handed on in [`PeerInfo`].
    pub session_headers: Vec<String>,
    /// One deadline for a client's TLS handshake and HTTP upgrade together, from TCP accept.
    pub handshake_timeout: Duration,
    /// Connections accepted but not yet admitted; when full, the oldest one is dropped.
    pub max_pending_handshakes: usize,
    /// Pending handshakes from one remote IP; a connection beyond it is closed at once.
    pub max_handshakes_per_address: usize,
    pub max_message_bytes: usize,
    pub keepalive: Keepalive,
    /// Read (and remove from the query) the `resume` and `last_seq` parameters.
    pub resume: bool,
}

/// What an admitted client's upgrade request said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub path: String,
    /// The `resume` and `last_seq` query parameters, when the client asks to resume.
    pub resume: Option<Resume>,
    /// The request's query string without the `access_token`, `resume` and `last_seq`
    /// parameters; `None` when nothing else was in it.
    pub query: Option<String>,
    /// The configured session headers the request carried (lower-case names).
    pub headers: Vec<(String, String)>,
    pub subprotocol: Option<String>,
}

/// A client's request to resume: `?resume=<token>&last_seq=<n>` (`last_seq` 0 when absent).
#[derive(Clone, PartialEq, Eq)]
pub struct Resume {
    pub token: String,
    pub last_seq: u64,
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never in a log.
        f.debug_struct("Resume")
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

/// What the owner makes of an admitted client.
pub enum Opened<S, G> {
    /// Serve it: where its frames go, the queue it is written from, and the guard.
    Serve(Arc<S>, mpsc::Receiver<Box<Outbound>>, G),
    /// Refuse it after the upgrade (a browser cannot read an HTTP status): `frame` is written,
    /// then the socket is closed with `code` and `reason`.
    Refuse {
        code: u16,
        reason: String,
        frame: Option<String>,
    },
}

/// The owner of a listener: turns admitted clients into sessions.
pub trait Accept: Send + Sync + 'static {
    type Sink: FrameSink;
    /// Kept while the connection lives, handed back to [`Accept::closed`].
    type Guard: Send + 'static;
    /// A client passed admission: returns where its frames go and the queue it is written from,
    /// or a refusal. `cancel` ends this connection (code 1001) when the owner fires it.
    fn open(
        &self,
        peer: PeerInfo,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = Opened<Self::Sink, Self::Guard>> + Send;
    /// The connection ended.
    fn closed(&self, guard: Self::Guard, closed: Closed);
    /// Admission refused an upgrade request with this HTTP status.
    fn rejected(&self, _status: u16) {}
}

/// A bound listener, ready to [`Server::run`].
pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    options: Arc<ServerOptions>,
}

impl Server {
    /// Binds the address and loads TLS material; fails clearly (address in use, bad files).
    pub async fn bind(options: ServerOptions) -> Result<Self, String> {
        let tls = match &options.tls {
            Some((cert, key)) => Some(load_tls(cert, key)?),
            None => None,
        };
        let address = options.listen_address;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen on {address}: {e}"))?;
        Ok(Self {
            listener,
            tls,
            options: Arc::new(options),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts clients until `cancel` fires, then closes every connection (code 1001) and
    /// returns once they are done or after the close grace.
    pub async fn run<A: Accept>(self, acceptor: Arc<A>, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        let active = Arc::new(AtomicUsize::new(0));
        let options = &self.options;
        let pending = Arc::new(Pending::new(
            options.max_pending_handshakes,
            options.max_handshakes_per_address,
        ));
        info!(address = ?self.local_addr(), path = %self.options.path, "listening");
        // Reports the end of a burst of dropped handshakes (see `Pending::flush`).
        let mut report = tokio::time::interval(DROP_WARN_INTERVAL);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while let Some((stream, addr)) = self.next_client(&cancel, &mut report, &pending).await {
            // The deadline starts at accept and covers TLS and the upgrade together.
            let deadline = Instant::now() + options.handshake_timeout;
            let token = cancel.child_token();
            let Some(ticket) = pending.enter(addr, token.clone()) else {
                // Over the per-address cap: closed at once, before any byte is read.
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            // Everything a connection logs names its peer (and the listener's span, its link).
            let span = tracing::info_span!("connection", peer = %addr);
            tracker.spawn(
                connection(
                    stream,
                    Handshake {
                        addr,
                        deadline,
                        ticket,
                    },
                    Arc::clone(&self.options),
                    self.tls.clone(),
                    Arc::clone(&acceptor),
                    token,
                    Arc::clone(&active),
                )
                .instrument(span),
            );
        }
        drop(self.listener);
        tracker.close();
        let _ = tokio::time::timeout(socket::CLOSE_GRACE * 2, tracker.wait()).await;
    }

    /// The next accepted client, or `None` once `cancel` fires. Meanwhile it reports dropped
    /// handshakes on every tick of `report`, and waits a little after a failed accept.
    async fn next_client(
        &self,
        cancel: &CancellationToken,
        report: &mut Interval,
        pending: &Pending,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return None,
                _ = report.tick() => pending.flush(),
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => return Some(accepted),
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }
}

async fn connection<A: Accept>(
    stream: TcpStream,
    handshake: Handshake,
    options: Arc<ServerOptions>,
    tls: Option<TlsAcceptor>,
    acceptor: Arc<A>,
    cancel: CancellationToken,
    active: Arc<AtomicUsize>,
) {
    match tls {
        Some(tls_acceptor) => {
            let Some(stream) = tls::handshake(&tls_acceptor, stream, &handshake, &cancel).await
            else {
                return;
            };
            // Boxed: a TLS session is large, and plain connections should not carry its size.
            Box::pin(upgrade(
                stream, handshake, &options, &*acceptor, &cancel, &active,
            ))
            .await;
        }
        None => upgrade(stream, handshake, &options, &*acceptor, &cancel, &active).await,
    }
}

/// Runs the HTTP upgrade with [`admit`] as its check, within the handshake's deadline, then
/// serves the socket if it was admitted (holding its slot until it ends).
async fn upgrade<T, A>(
    stream: T,
    handshake: Handshake,
    options: &ServerOptions,
    acceptor: &A,
    cancel: &CancellationToken,
    active: &Arc<AtomicUsize>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    A: Accept,
{
    let addr = handshake.addr;
    let mut admitted = None;
    let mut refused = None;
    let callback = |request: &Request, response: Response| {
        let (peer, slot, response) = admit(request, response, addr, options, active)
            .inspect_err(|refusal| refused = Some(refusal.status().as_u16()))?;
        admitted = Some((peer, slot));
        Ok(response)
    };
    let config = socket::ws_config(options.max_message_bytes);
    let upgrading = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let Some(upgraded) = until_deadline(upgrading, &handshake, cancel).await else {
        return;
    };
    let ws = match upgraded {
        Ok(ws) => ws,
        Err(e) => {
            debug!(%addr, error = %e, "upgrade refused or failed");
            if let Some(status) = refused {
                acceptor.rejected(status);
            }
            return;
        }
    };
    // Admitted: no longer pending, so it can no longer be evicted.
    drop(handshake);
    let Some((peer, _slot)) = admitted else {
        return;
    };
    serve_admitted(ws, peer, options, acceptor, cancel).await;
}

/// Serves an admitted client as the acceptor's until the socket drops or the listener is
/// cancelled (close code 1001); a client admitted just as the listener was cancelled gets a
/// close frame and no session.
async fn serve_admitted<T, A>(
    mut ws: WebSocketStream<T>,
    peer: PeerInfo,
    options: &ServerOptions,
    acceptor: &A,
    cancel: &CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    A: Accept,
{
    if cancel.is_cancelled() {
        // The link was deleted (or this connection evicted) as the upgrade finished: no session.
        let away = CloseFrame {
            code: CloseCode::Away,
            reason: "link deleted or provider shutting down".into(),
        };
        let _ = tokio::time::timeout(socket::CLOSE_GRACE, ws.close(Some(away))).await;
        return;
    }
    let (sink, mut outbound, guard) = match acceptor.open(peer, cancel.clone()).await {
        Opened::Serve(sink, outbound, guard) => (sink, outbound, guard),
        Opened::Refuse {
            code,
            reason,
            frame,
        } => {
            let refuse = async {
                if let Some(frame) = frame {
                    ws.feed(Message::text(frame)).await?;
                }
                let close = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                ws.close(Some(close)).await
            };
            let _ = tokio::time::timeout(socket::CLOSE_GRACE, refuse).await;
            return;
        }
    };
    let closed = match socket::serve(
        ws,
        sink.as_ref(),
        &mut outbound,
        cancel,
        CloseCode::Away,
        options.keepalive,
    )
    .await
    {
        End::Dropped(closed) => closed,
        End::Cancelled => Closed {
            code: 1001,
            reason: "link deleted or provider shutting down".to_string(),
        },
    };
    acceptor.closed(guard, closed);
}
