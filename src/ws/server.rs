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
//! Before admission a connection is a pending handshake, bounded three ways: one deadline
//! (`HANDSHAKE_TIMEOUT_SEC`) covers TLS and the upgrade together from TCP accept; at most
//! `MAX_PENDING_HANDSHAKES` are pending at once, and a new connection beyond that drops the
//! oldest pending one (an idle attacker is always older than a real client, which finishes in
//! milliseconds); at most `MAX_HANDSHAKES_PER_ADDRESS` are pending from one remote IP, and a
//! connection beyond that is closed at once. Pending handshakes do not count against
//! `MAX_CONNECTIONS`. Cancelling the listener (link deleted) drops pending handshakes too, so no
//! session opens after it. The `access_token` query parameter never reaches [`PeerInfo`].
//!
//! This module knows nothing of wasmCloud or sessions.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use super::socket::{self, Closed, End, FrameSink, Keepalive, Outbound};
use super::Token;

/// The query parameter a browser uses to present the token (browsers cannot set headers).
pub const TOKEN_QUERY_PARAM: &str = "access_token";

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
}

/// What an admitted client's upgrade request said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub path: String,
    /// The request's query string without the `access_token` parameter; `None` when nothing
    /// else was in it.
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
        let admission = Arc::new(Admission::new(
            options.max_pending_handshakes,
            options.max_handshakes_per_address,
        ));
        info!(address = ?self.local_addr(), path = %self.options.path, "listening");
        // Reports the end of a burst of dropped handshakes (see `Admission::flush`).
        let mut report = tokio::time::interval(DROP_WARN_INTERVAL);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (stream, addr) = tokio::select! {
                () = cancel.cancelled() => break,
                _ = report.tick() => {
                    admission.flush();
                    continue;
                }
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // The deadline starts at accept and covers TLS and the upgrade together.
            let deadline = Instant::now() + options.handshake_timeout;
            let token = cancel.child_token();
            let Some(ticket) = admission.enter(addr, token.clone()) else {
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
}

/// Releases a connection slot when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection was dropped before admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dropped {
    /// Its remote address had `MAX_HANDSHAKES_PER_ADDRESS` pending already.
    PerAddress,
    /// `MAX_PENDING_HANDSHAKES` were pending and it was the oldest.
    Evicted,
    /// It did not finish TLS and the upgrade within `HANDSHAKE_TIMEOUT_SEC`.
    TimedOut,
}

/// Pending handshakes, oldest first, counted per remote IP. Generic over what each entry holds
/// (the listener keeps the connection's cancel token there) so the bookkeeping stands alone.
#[derive(Debug)]
struct Handshakes<T> {
    max_total: usize,
    max_per_address: usize,
    next_id: u64,
    /// By entry order: the first is the oldest.
    order: BTreeMap<u64, (IpAddr, T)>,
    per_address: HashMap<IpAddr, usize>,
}

/// The outcome of [`Handshakes::enter`].
#[derive(Debug, PartialEq, Eq)]
enum Entered<T> {
    /// The address is at its cap: the connection must be closed.
    Refused,
    /// Pending as `id`; `evicted` is the oldest entry's value when it was dropped to make room.
    Pending { id: u64, evicted: Option<T> },
}

impl<T> Handshakes<T> {
    fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            next_id: 0,
            order: BTreeMap::new(),
            per_address: HashMap::new(),
        }
    }

    fn enter(&mut self, ip: IpAddr, value: T) -> Entered<T> {
        if self.from(ip) >= self.max_per_address {
            return Entered::Refused;
        }
        let evicted = if self.order.len() >= self.max_total {
            self.order.pop_first().map(|(_, (old_ip, old))| {
                self.release(old_ip);
                old
            })
        } else {
            None
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.order.insert(id, (ip, value));
        *self.per_address.entry(ip).or_insert(0) += 1;
        Entered::Pending { id, evicted }
    }

    /// The handshake `id` ended (admitted, failed or timed out); false when it was evicted.
    fn leave(&mut self, id: u64) -> bool {
        match self.order.remove(&id) {
            Some((ip, _)) => {
                self.release(ip);
                true
            }
            None => false,
        }
    }

    fn release(&mut self, ip: IpAddr) {
        if let Some(count) = self.per_address.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_address.remove(&ip);
            }
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn from(&self, ip: IpAddr) -> usize {
        self.per_address.get(&ip).copied().unwrap_or(0)
    }
}

/// Connections dropped before admission since the last warning.
#[derive(Debug, Default)]
struct DropCounts {
    per_address: u64,
    evicted: u64,
    timed_out: u64,
    last_warn: Option<std::time::Instant>,
}

/// How often at most the listener warns about dropped handshakes (with counts).
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// One listener's pending handshakes and what it dropped.
struct Admission {
    pending: Mutex<Handshakes<CancellationToken>>,
    dropped: Mutex<DropCounts>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Admission {
    fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            pending: Mutex::new(Handshakes::new(max_total, max_per_address)),
            dropped: Mutex::new(DropCounts::default()),
        }
    }

    /// Registers a new connection from `addr`; `None` when it must be closed at once. Evicts
    /// (cancels) the oldest pending handshake when the listener is full.
    fn enter(self: &Arc<Self>, addr: SocketAddr, token: CancellationToken) -> Option<Ticket> {
        let ip = addr.ip().to_canonical();
        let entered = lock(&self.pending).enter(ip, token);
        match entered {
            Entered::Refused => {
                self.note(Dropped::PerAddress, addr);
                None
            }
            Entered::Pending { id, evicted } => {
                if let Some(oldest) = evicted {
                    oldest.cancel();
                    self.note(Dropped::Evicted, addr);
                }
                Some(Ticket {
                    admission: Arc::clone(self),
                    id,
                })
            }
        }
    }

    /// Counts a dropped handshake: logs it at debug, and warns at most once a second.
    fn note(&self, why: Dropped, addr: SocketAddr) {
        match why {
            Dropped::PerAddress => {
                debug!(%addr, "too many pending handshakes from this address; closed")
            }
            Dropped::Evicted => {
                debug!(%addr, "pending handshakes full; the oldest was dropped for this one")
            }
            Dropped::TimedOut => debug!(%addr, "handshake timed out"),
        }
        let mut counts = lock(&self.dropped);
        match why {
            Dropped::PerAddress => counts.per_address += 1,
            Dropped::Evicted => counts.evicted += 1,
            Dropped::TimedOut => counts.timed_out += 1,
        }
        self.warn_if_due(&mut counts);
    }

    /// Warns with the counts not yet reported, unless a warning went out less than a second ago.
    /// Also called once a second by the accept loop, so the end of a burst is reported too.
    fn flush(&self) {
        self.warn_if_due(&mut lock(&self.dropped));
    }

    fn warn_if_due(&self, counts: &mut DropCounts) {
        if counts.per_address + counts.evicted + counts.timed_out == 0 {
            return;
        }
        let now = std::time::Instant::now();
        if counts
            .last_warn
            .is_some_and(|last| now.duration_since(last) < DROP_WARN_INTERVAL)
        {
            return;
        }
        let pending = lock(&self.pending).len();
        warn!(
            refused_per_address = counts.per_address,
            evicted_oldest = counts.evicted,
            timed_out = counts.timed_out,
            pending,
            "connections dropped before admission (counts since the last warning)"
        );
        *counts = DropCounts {
            last_warn: Some(now),
            ..DropCounts::default()
        };
    }
}

/// A pending handshake's place; leaving the pending set when dropped.
struct Ticket {
    admission: Arc<Admission>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.admission.pending).leave(self.id);
    }
}

/// A connection not yet admitted: its peer, its one deadline and its pending place.
struct Handshake {
    addr: SocketAddr,
    deadline: Instant,
    ticket: Ticket,
}

/// Runs `step` until the handshake deadline; `None` (and the reason logged) when the deadline
/// passed or the connection was cancelled (link deleted, or evicted as the oldest pending).
async fn until_deadline<F: std::future::Future>(
    step: F,
    handshake: &Handshake,
    cancel: &CancellationToken,
) -> Option<F::Output> {
    tokio::select! {
        // Cancel first: once the link is deleted, bytes that arrive later finish no upgrade.
        biased;
        () = cancel.cancelled() => {
            debug!(addr = %handshake.addr, "handshake cancelled (link deleted or evicted)");
            None
        }
        result = tokio::time::timeout_at(handshake.deadline, step) => match result {
            Ok(output) => Some(output),
            Err(_) => {
                handshake.ticket.admission.note(Dropped::TimedOut, handshake.addr);
                None
            }
        },
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
        Some(tls) => {
            let Some(accepted) = until_deadline(tls.accept(stream), &handshake, &cancel).await
            else {
                return;
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(addr = %handshake.addr, error = %e, "TLS handshake failed");
                    return;
                }
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
    let mut ws = match upgraded {
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
    if cancel.is_cancelled() {
        // The link was deleted (or this connection evicted) as the upgrade finished: no session.
        let away = CloseFrame {
            code: CloseCode::Away,
            reason: "link deleted or provider shutting down".into(),
        };
        let _ = tokio::time::timeout(socket::CLOSE_GRACE, ws.close(Some(away))).await;
        return;
    }
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
    let uri = request.uri();
    if uri.path() != options.path {
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
    if let Some(allowed) = &options.allowed_origins {
        let origin = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !allowed.iter().any(|a| a == origin) {
            return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
        }
    }
    let subprotocol = if options.subprotocols.is_empty() {
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
        let chosen = options
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
    if previous >= options.max_connections {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections",
        ));
    }
    let headers = options
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
        query: strip_token(uri.query()),
        headers,
        subprotocol,
    };
    Ok((peer, slot, response))
}

/// The query string without the `access_token` parameter: the other parameters in order,
/// re-encoded, or `None` when nothing else is left. A query without the parameter is kept as is.
fn strip_token(query: Option<&str>) -> Option<String> {
    let query = query?;
    let pairs = form_urlencoded::parse(query.as_bytes());
    if !pairs.clone().any(|(k, _)| k == TOKEN_QUERY_PARAM) {
        return Some(query.to_string());
    }
    let kept: Vec<_> = pairs.filter(|(k, _)| k != TOKEN_QUERY_PARAM).collect();
    if kept.is_empty() {
        return None;
    }
    Some(
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(kept)
            .finish(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ServerOptions {
        ServerOptions {
            listen_address: "127.0.0.1:0".parse().expect("addr"),
            path: "/ws".into(),
            token: Some(Token::new("t0k")),
            allowed_origins: Some(vec!["https://ok.example".into()]),
            max_connections: 1,
            subprotocols: vec!["v2".into(), "v1".into()],
            tls: None,
            session_headers: vec!["user-agent".into()],
            handshake_timeout: Duration::from_secs(1),
            max_pending_handshakes: 4,
            max_handshakes_per_address: 2,
            max_message_bytes: 1024,
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
    fn the_access_token_never_reaches_the_query() {
        assert_eq!(
            strip_token(Some("access_token=t0k&room=7")).as_deref(),
            Some("room=7")
        );
        assert_eq!(
            strip_token(Some("a=1&access_token=t0k&b=x%20y&access_token=again")).as_deref(),
            Some("a=1&b=x+y")
        );
        // An encoded name is still the token parameter (admission decodes it the same way).
        assert_eq!(
            strip_token(Some("access%5Ftoken=t0k&z=1")).as_deref(),
            Some("z=1")
        );
        assert_eq!(strip_token(Some("access_token=t0k")), None);
        assert_eq!(strip_token(Some("access_token=")), None);
        assert_eq!(strip_token(None), None);
        // Without the parameter the query is kept exactly as sent.
        assert_eq!(
            strip_token(Some("flag&x=%41")).as_deref(),
            Some("flag&x=%41")
        );
        assert_eq!(
            strip_token(Some("access_tokens=1")).as_deref(),
            Some("access_tokens=1")
        );

        let o = options();
        let (peer, _slot, _) = admit(
            &request(
                "/ws?room=7&access_token=t0k",
                &[("origin", "https://ok.example")],
            ),
            Response::default(),
            "127.0.0.1:1".parse().expect("addr"),
            &o,
            &Arc::new(AtomicUsize::new(0)),
        )
        .expect("admitted with the query token");
        assert_eq!(peer.query.as_deref(), Some("room=7"));
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_oldest_pending_handshake_makes_room_and_one_address_is_capped() {
        let mut book = Handshakes::new(3, 2);
        let pending = |entered: Entered<&'static str>| match entered {
            Entered::Pending { id, evicted } => (id, evicted),
            Entered::Refused => panic!("refused"),
        };
        let (a, none) = pending(book.enter(ip(1), "a"));
        assert_eq!(none, None);
        let (_b, _) = pending(book.enter(ip(1), "b"));
        // A third from the same address is refused; nothing is evicted for it.
        assert_eq!(book.enter(ip(1), "refused"), Entered::Refused);
        assert_eq!((book.len(), book.from(ip(1))), (2, 2));
        let (_c, none) = pending(book.enter(ip(2), "c"));
        assert_eq!(none, None);
        // Full (3): the next connection evicts the oldest, "a", which frees a place of ip 1.
        let (_d, evicted) = pending(book.enter(ip(3), "d"));
        assert_eq!(evicted, Some("a"));
        assert_eq!(book.len(), 3);
        assert_eq!(book.from(ip(1)), 1);
        // The evicted handshake's own end is then a no-op.
        assert!(!book.leave(a));
        assert_eq!(book.len(), 3);
        // ip 1 has room again, and the oldest now is "b".
        let (e, evicted) = pending(book.enter(ip(1), "e"));
        assert_eq!(evicted, Some("b"));
        assert_eq!(book.from(ip(1)), 1);
        assert!(book.leave(e));
        assert_eq!((book.len(), book.from(ip(1))), (2, 0));
        assert!(
            !book.per_address.contains_key(&ip(1)),
            "no empty entries kept"
        );
    }

    #[tokio::test]
    async fn tickets_leave_the_pending_set_and_eviction_cancels_the_oldest() {
        let admission = Arc::new(Admission::new(2, 2));
        let addr = |port| SocketAddr::from(([10, 0, 0, 1], port));
        let (t1, t2, t3) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let first = admission.enter(addr(1), t1.clone()).expect("first");
        let second = admission.enter(addr(2), t2.clone()).expect("second");
        // The same address is at its cap of 2.
        assert!(admission.enter(addr(3), CancellationToken::new()).is_none());
        drop(second);
        let third = admission
            .enter(addr(3), t3.clone())
            .expect("room after a ticket ended");
        assert!(!t1.is_cancelled());
        // Full: a new address evicts the oldest (first), not the newer third.
        let v6 = "[::ffff:10.0.0.2]:9".parse().expect("addr");
        let fourth = admission
            .enter(v6, CancellationToken::new())
            .expect("fourth");
        assert!(t1.is_cancelled() && !t3.is_cancelled());
        drop(first);
        assert_eq!(lock(&admission.pending).len(), 2);
        assert_eq!(
            lock(&admission.pending).from(ip(2)),
            1,
            "v4-mapped counts as v4"
        );
        drop((third, fourth));
        assert_eq!(lock(&admission.pending).len(), 0);
        {
            // Refused (per address) and evicted, both within a second: one warning so far.
            let counts = lock(&admission.dropped);
            assert!(counts.last_warn.is_some());
            assert_eq!((counts.per_address, counts.evicted), (0, 1));
        }
        // Within the second a flush reports nothing; later it reports and resets the counts.
        admission.flush();
        assert_eq!(lock(&admission.dropped).evicted, 1);
        lock(&admission.dropped).last_warn =
            std::time::Instant::now().checked_sub(DROP_WARN_INTERVAL);
        admission.flush();
        assert_eq!(lock(&admission.dropped).evicted, 0);
    }

    #[test]
    fn token_comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
