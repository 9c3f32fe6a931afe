//! Server mode: a listener that accepts WebSocket clients, one session each.
//!
//! Admission happens during the HTTP upgrade, before a session exists: the request path must
//! match (404), the token must match when one is configured (401; `Authorization: Bearer` or the
//! `access_token` query parameter for browsers, compared in constant time), the `Origin` must be
//! allowed (403), the link must have room (503), and an offered subprotocol must be one we speak
//! (400). TLS (`wss://`) wraps the TCP stream before the upgrade. Each admitted client is handed
//! to an [`Accept`] owner, which gives it a frame sink and an outbound queue; the socket is then
//! served by [`socket::serve`] until it drops or the listener is cancelled (close code 1001).
//!
//! This module knows nothing of wasmCloud or sessions.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use super::socket::{self, Closed, End, FrameSink, Keepalive, Outbound};
use crate::config::{Secret, ServerSettings};

/// The query parameter a browser uses to present the token (browsers cannot set headers).
pub const TOKEN_QUERY_PARAM: &str = "access_token";

/// What the listener needs besides the socket.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub settings: ServerSettings,
    pub token: Option<Secret>,
    pub max_message_bytes: usize,
    pub handshake_timeout: Duration,
    pub keepalive: Keepalive,
}

/// What an admitted client's upgrade request said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub path: String,
    pub query: Option<String>,
    /// The configured session headers the request carried (lower-case names).
    pub headers: Vec<(String, String)>,
    pub subprotocol: Option<String>,
}

/// The owner of a listener: turns admitted clients into sessions.
pub trait Accept: Send + Sync + 'static {
    type Sink: FrameSink;
    /// Kept while the connection lives, handed back to [`Accept::closed`].
    type Guard: Send + 'static;
    /// A client passed admission: returns where its frames go and the queue it is written from.
    fn open(&self, peer: PeerInfo)
        -> (Arc<Self::Sink>, mpsc::Receiver<Box<Outbound>>, Self::Guard);
    /// The connection ended.
    fn closed(&self, guard: Self::Guard, closed: Closed);
    /// Admission refused an upgrade request with this HTTP status.
    fn rejected(&self, _status: u16) {}
}

/// Loads a PEM certificate chain and private key for `wss://`.
pub fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read TLS_CERT_FILE {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS_CERT_FILE {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read TLS_KEY_FILE {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup failed: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("TLS certificate and key do not fit: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
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
        let tls = match &options.settings.tls {
            Some((cert, key)) => Some(load_tls(cert, key)?),
            None => None,
        };
        let address = options.settings.listen_address;
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
        info!(address = ?self.local_addr(), path = %self.options.settings.path, "listening");
        loop {
            let (stream, addr) = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            // Everything a connection logs names its peer (and the listener's span, its link).
            let span = tracing::info_span!("connection", peer = %addr);
            tracker.spawn(
                connection(
                    stream,
                    addr,
                    Arc::clone(&self.options),
                    self.tls.clone(),
                    Arc::clone(&acceptor),
                    cancel.child_token(),
                    Arc::clone(&active),
                )
                .instrument(span),
            );
        }
        drop(self.listener);
        tracker.close();
        let _ = tokio::time::timeout(socket::CLOSE_GRACE * 2, tracker.wait()).await;
    }
}

/// Releases a connection slot when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection<A: Accept>(
    stream: TcpStream,
    addr: SocketAddr,
    options: Arc<ServerOptions>,
    tls: Option<TlsAcceptor>,
    acceptor: Arc<A>,
    cancel: CancellationToken,
    active: Arc<AtomicUsize>,
) {
    let timeout = options.handshake_timeout;
    match tls {
        Some(tls) => {
            let Ok(Ok(stream)) = tokio::time::timeout(timeout, tls.accept(stream)).await else {
                debug!(%addr, "TLS handshake failed or timed out");
                return;
            };
            // Boxed: a TLS session is large, and plain connections should not carry its size.
            Box::pin(upgrade(
                stream, addr, &options, &*acceptor, &cancel, &active,
            ))
            .await;
        }
        None => upgrade(stream, addr, &options, &*acceptor, &cancel, &active).await,
    }
}

async fn upgrade<T, A>(
    stream: T,
    addr: SocketAddr,
    options: &ServerOptions,
    acceptor: &A,
    cancel: &CancellationToken,
    active: &Arc<AtomicUsize>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    A: Accept,
{
    let mut admitted = None;
    let mut refused = None;
    let callback = |request: &Request, response: Response| {
        let (peer, slot, response) = admit(request, response, addr, options, active)
            .inspect_err(|refusal| refused = Some(refusal.status().as_u16()))?;
        admitted = Some((peer, slot));
        Ok(response)
    };
    let config = socket::ws_config(options.max_message_bytes);
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let ws = match tokio::time::timeout(options.handshake_timeout, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "upgrade refused or failed");
            if let Some(status) = refused {
                acceptor.rejected(status);
            }
            return;
        }
        Err(_) => {
            debug!(%addr, "upgrade timed out");
            return;
        }
    };
    let Some((peer, _slot)) = admitted else {
        return;
    };
    let (sink, mut outbound, guard) = acceptor.open(peer);
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

fn refuse(status: StatusCode, message: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(message.to_string()));
    *response.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks one upgrade request; on success returns the peer's info, its slot and the response.
#[allow(clippy::result_large_err)]
fn admit(
    request: &Request,
    mut response: Response,
    addr: SocketAddr,
    options: &ServerOptions,
    active: &Arc<AtomicUsize>,
) -> Result<(PeerInfo, Slot, Response), ErrorResponse> {
    let settings = &options.settings;
    let uri = request.uri();
    if uri.path() != settings.path {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "no WebSocket endpoint at this path",
        ));
    }
    if let Some(token) = &options.token {
        let from_header = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let from_query = uri.query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == TOKEN_QUERY_PARAM)
                .map(|(_, v)| v.into_owned())
        });
        let presented = from_header.or(from_query).unwrap_or_default();
        if !constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) {
            return Err(refuse(StatusCode::UNAUTHORIZED, "missing or wrong token"));
        }
    }
    if let Some(allowed) = &settings.allowed_origins {
        let origin = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !allowed.iter().any(|a| a == origin) {
            return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
        }
    }
    let subprotocol = if settings.subprotocols.is_empty() {
        None
    } else {
        let offered: Vec<&str> = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let chosen = settings
            .subprotocols
            .iter()
            .find(|ours| offered.contains(&ours.as_str()))
            .cloned();
        match (&chosen, offered.is_empty()) {
            (Some(p), _) => {
                let value = HeaderValue::from_str(p)
                    .map_err(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "bad subprotocol"))?;
                response
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
            }
            (None, false) => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "none of the offered subprotocols is supported",
                ))
            }
            (None, true) => {}
        }
        chosen
    };
    let previous = active.fetch_add(1, Ordering::AcqRel);
    let slot = Slot(Arc::clone(active));
    if previous >= settings.max_connections {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections",
        ));
    }
    let headers = settings
        .session_headers
        .iter()
        .filter_map(|name| {
            request
                .headers()
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(|v| (name.clone(), v.to_string()))
        })
        .collect();
    let peer = PeerInfo {
        addr,
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        headers,
        subprotocol,
    };
    Ok((peer, slot, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ServerOptions {
        ServerOptions {
            settings: ServerSettings {
                listen_address: "127.0.0.1:0".parse().expect("addr"),
                path: "/ws".into(),
                allowed_origins: Some(vec!["https://ok.example".into()]),
                max_connections: 1,
                subprotocols: vec!["v2".into(), "v1".into()],
                tls: None,
                lifecycle_events: false,
                session_headers: vec!["user-agent".into()],
            },
            token: Some(Secret::new("t0k")),
            max_message_bytes: 1024,
            handshake_timeout: Duration::from_secs(1),
            keepalive: Keepalive::default(),
        }
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request")
    }

    fn status(result: Result<(PeerInfo, Slot, Response), ErrorResponse>) -> u16 {
        match result {
            Ok(_) => 101,
            Err(e) => e.status().as_u16(),
        }
    }

    #[test]
    fn admission_checks_path_token_origin_subprotocol_and_capacity() {
        let o = options();
        let addr = "127.0.0.1:1".parse().expect("addr");
        let active = Arc::new(AtomicUsize::new(0));
        let good = [
            ("origin", "https://ok.example"),
            ("authorization", "Bearer t0k"),
        ];
        let check = |uri: &str, headers: &[(&str, &str)]| {
            status(admit(
                &request(uri, headers),
                Response::default(),
                addr,
                &o,
                &active,
            ))
        };
        assert_eq!(check("/other", &good), 404);
        assert_eq!(check("/ws", &[("origin", "https://ok.example")]), 401);
        assert_eq!(
            check(
                "/ws",
                &[
                    ("origin", "https://ok.example"),
                    ("authorization", "Bearer nope")
                ]
            ),
            401
        );
        assert_eq!(
            check(
                "/ws",
                &[
                    ("authorization", "Bearer t0k"),
                    ("origin", "https://evil.example")
                ]
            ),
            403
        );
        assert_eq!(
            check("/ws", &[good[0], good[1], ("sec-websocket-protocol", "v9")]),
            400
        );
        assert_eq!(check("/ws?access_token=t0k", &[good[0]]), 101);

        let (peer, slot, response) = admit(
            &request(
                "/ws?x=1",
                &[
                    good[0],
                    good[1],
                    ("sec-websocket-protocol", "v1, v2"),
                    ("user-agent", "ua"),
                ],
            ),
            Response::default(),
            addr,
            &o,
            &active,
        )
        .expect("admitted");
        assert_eq!(peer.subprotocol.as_deref(), Some("v2"));
        assert_eq!(response.headers()["sec-websocket-protocol"], "v2");
        assert_eq!(peer.query.as_deref(), Some("x=1"));
        assert_eq!(peer.headers, [("user-agent".to_string(), "ua".to_string())]);
        // The one slot is taken: the next client is turned away until it is released.
        assert_eq!(check("/ws", &good), 503);
        drop(slot);
        assert_eq!(check("/ws", &good), 101);
    }

    #[test]
    fn token_comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
