//! The load generator: closed loop with a window of messages in flight per session, open loop at
//! a fixed rate, and many idle sessions that receive fan-out.
//!
//! Every message carries its sequence number after a marker byte (on a `FORMAT=json` target, in
//! hex at the start of the envelope's text body); a session's echoes must come back in order. Closed loop records each round trip from its send; open loop records it from
//! the moment the schedule meant to send it, so a stall shows up in the percentiles instead of
//! slowing the sender (no coordinated omission). Any echo that takes over 10 s counts as hung
//! and ends its session.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::standin::{B3_ID, LATTICE};

/// How long one echo may take before it counts as hung.
pub const HUNG_AFTER: Duration = Duration::from_secs(10);

/// The provider's WebSocket settings (src/ws/socket.rs: `ws_config`), used by baseline B1.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(4 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// What the load is sent to.
#[derive(Clone)]
pub enum Target {
    /// B0: a TCP echo server.
    Tcp(u16),
    /// B1 and P: a WebSocket endpoint that echoes.
    Ws(u16),
    /// A `FORMAT=json` server link of P: envelopes out, envelopes back (see [`JsonRx`]); with
    /// `ack`, every envelope asks for an acknowledgment and a message is done when both its echo
    /// and its `{"ack": ...}` answer are back; with `recovery` (`RECOVERY=true`), every
    /// connection opens with a session frame and every echo carries the next `seq`.
    Json {
        port: u16,
        ack: bool,
        recovery: bool,
    },
    /// B2: NATS request/reply to `bench.echo`.
    Nats(String),
    /// B3: a wRPC `handle-message` call to the stand-in's no-op server.
    Wrpc(String),
}

/// What one load run saw.
pub struct Run {
    pub msgs: u64,
    pub secs: f64,
    pub hist: Histogram<u64>,
    pub hung: u64,
    pub failed: u64,
    pub misordered: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

/// How each session paces its sends.
#[derive(Clone, Copy)]
pub enum Pace {
    /// Up to `window` messages in flight; `count` per session, or until `until`.
    Closed {
        window: usize,
        count: Option<u64>,
        until: Instant,
    },
    /// One message every `interval`, whatever the echoes do, until `until`.
    Open { interval: Duration, until: Instant },
}

impl Pace {
    fn done(&self, sent: u64) -> bool {
        match *self {
            Pace::Closed { count: Some(n), .. } => sent >= n,
            Pace::Closed { until, .. } | Pace::Open { until, .. } => Instant::now() >= until,
        }
    }
}

/// Source addresses for client sockets: spreading them over 127.0.x.y keeps each run clear of
/// the TIME_WAIT sockets of the last one and of the 28k-port range per address.
pub struct Sources {
    base: [u8; 2],
    next: AtomicU64,
}

impl Sources {
    pub fn new(block: u8) -> Self {
        Self {
            base: [127, block.max(1)],
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> Ipv4Addr {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // 10,000 connections per source address.
        let host = (n / 10_000) as u8;
        Ipv4Addr::new(self.base[0], 0, self.base[1], host.saturating_add(2))
    }

    pub async fn connect(&self, port: u16) -> Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((self.next(), 0)))?;
        let stream = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

pub type Ws = WebSocketStream<TcpStream>;

pub async fn ws_connect(sources: &Sources, port: u16) -> Result<Ws> {
    let stream = sources.connect(port).await?;
    let url = format!("ws://127.0.0.1:{port}/");
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
    Ok(ws)
}

/// The shortest message: a marker byte, then the sequence number.
const HEADER: usize = 9;

/// A message: `#` (so a component never mistakes it for a `!command`), the sequence number
/// (8 bytes, little-endian), then filler up to `size`.
pub(crate) fn frame(seq: u64, size: usize) -> Vec<u8> {
    let mut f = vec![b'x'; size.max(HEADER)];
    f[0] = b'#';
    f[1..HEADER].copy_from_slice(&seq.to_le_bytes());
    f
}

pub(crate) fn seq_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(1..HEADER)?.try_into().ok()?))
}

/// The body of a JSON message: `#`, the sequence number in 16 hex digits, then filler up to
/// `size` (text, so that it travels as the envelope's `body`).
fn json_body(seq: u64, size: usize) -> String {
    let mut b = format!("#{seq:016x}");
    let n = size.saturating_sub(b.len());
    b.extend(std::iter::repeat_n('x', n));
    b
}

fn json_seq_of(body: &str) -> Option<u64> {
    u64::from_str_radix(body.get(1..17)?, 16).ok()
}

/// Message `seq` as an envelope; with `ack` (the session's tag) it asks for an acknowledgment,
/// its ID `<tag>-<seq>`.
fn envelope(seq: u64, size: usize, ack: Option<u64>) -> String {
    let body = json_body(seq, size);
    match ack {
        Some(tag) => {
            format!(r#"{{"subject":"bench","body":"{body}","id":"{tag}-{seq}","ack":true}}"#)
        }
        None => format!(r#"{{"subject":"bench","body":"{body}"}}"#),
    }
}

/// Tells the sessions' acknowledgment IDs apart (an ID is `<session>-<seq>`).
static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// What an echo that does not match what was sent returns (never a sequence number sent in a
/// measured run): an ack answer for another message, a gap in the recovery numbering.
const MISMATCH: u64 = u64::MAX - 1;

pub(crate) enum Tx {
    Tcp(OwnedWriteHalf),
    Ws(SplitSink<Ws, Message>),
    /// `FORMAT=json`: `Some(session tag)` when every envelope asks for an ack.
    Json(SplitSink<Ws, Message>, Option<u64>),
}

pub(crate) enum Rx {
    Tcp(OwnedReadHalf, Vec<u8>),
    Ws(SplitStream<Ws>),
    Json(Box<JsonRx>),
}

impl Tx {
    pub(crate) async fn feed(&mut self, f: Vec<u8>) -> Result<()> {
        match self {
            Tx::Tcp(w) => w.write_all(&f).await?,
            Tx::Ws(w) => w.feed(Message::binary(f)).await?,
            Tx::Json(w, ack) => {
                let seq = seq_of(&f).context("short frame")?;
                w.feed(Message::text(envelope(seq, f.len(), *ack))).await?;
            }
        }
        Ok(())
    }

    /// Feeds message `seq` of `size` bytes: a [`frame`], or for `FORMAT=json` an envelope
    /// `{"subject":"bench","body":"<json_body>"}` (with `"id"` and `"ack":true` when acked).
    pub(crate) async fn message(&mut self, seq: u64, size: usize) -> Result<()> {
        match self {
            Tx::Json(w, ack) => {
                w.feed(Message::text(envelope(seq, size, *ack))).await?;
                Ok(())
            }
            _ => self.feed(frame(seq, size)).await,
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<()> {
        match self {
            Tx::Tcp(w) => w.flush().await?,
            Tx::Ws(w) | Tx::Json(w, _) => w.flush().await?,
        }
        Ok(())
    }
}

/// The receiving half of a `FORMAT=json` session. With `RECOVERY=true` it checks that the first
/// frame is a session frame (and skips it) and that the `seq` of the echoes goes up by one from
/// the session frame's (a gap makes the echo count as misordered); without, a session frame is
/// an error. An error frame or an ack answer with `ok: false` fails the session.
pub(crate) struct JsonRx {
    ws: SplitStream<Ws>,
    ack: bool,
    recovery: bool,
    /// Whether a frame came already.
    opened: bool,
    /// The last recovery `seq` seen.
    numbered: u64,
    /// Echoes and ack answers that arrived and were not yet paired.
    echoes: std::collections::VecDeque<u64>,
    acks: std::collections::VecDeque<u64>,
}

impl JsonRx {
    async fn next(&mut self) -> Result<u64> {
        loop {
            if self.ack {
                if !self.echoes.is_empty() && !self.acks.is_empty() {
                    let (echo, ack) = (self.echoes.pop_front(), self.acks.pop_front());
                    return Ok(if echo == ack {
                        echo.unwrap_or(MISMATCH)
                    } else {
                        MISMATCH
                    });
                }
            } else if let Some(echo) = self.echoes.pop_front() {
                return Ok(echo);
            }
            let data = match self.ws.next().await {
                Some(Ok(m)) if m.is_binary() || m.is_text() => m.into_data(),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("connection closed"),
            };
            let v: serde_json::Value = serde_json::from_slice(&data).context("not JSON")?;
            let first = !std::mem::replace(&mut self.opened, true);
            if let Some(session) = v.get("session") {
                if !(self.recovery && first) {
                    bail!("unexpected session frame: {session}");
                }
                self.numbered = session["seq"]
                    .as_u64()
                    .context("a session frame without seq")?;
            } else if first && self.recovery {
                bail!("the first frame is not a session frame: {v}");
            } else if let Some(error) = v.get("error") {
                bail!("error frame: {error}");
            } else if let Some(ack) = v.get("ack") {
                if ack["ok"] != serde_json::Value::Bool(true) {
                    bail!("ack answer not ok: {ack}");
                }
                let id = ack["id"].as_str().and_then(|id| id.rsplit_once('-'));
                let seq = id.and_then(|(_, s)| s.parse().ok()).unwrap_or(MISMATCH);
                self.acks.push_back(seq);
            } else {
                let body = v["body"].as_str().context("an echo without a text body")?;
                let mut seq = json_seq_of(body).context("short echo")?;
                if self.recovery {
                    let numbered = v["seq"].as_u64();
                    if numbered != Some(self.numbered + 1) {
                        seq = MISMATCH;
                    }
                    self.numbered = numbered.unwrap_or(self.numbered + 1);
                }
                self.echoes.push_back(seq);
            }
        }
    }
}

impl Rx {
    /// The sequence number of the next echo.
    pub(crate) async fn next(&mut self) -> Result<u64> {
        match self {
            Rx::Tcp(r, buf) => {
                r.read_exact(buf).await?;
                seq_of(buf).context("short echo")
            }
            Rx::Ws(r) => loop {
                match r.next().await {
                    Some(Ok(m)) if m.is_binary() || m.is_text() => {
                        return seq_of(&m.into_data()).context("short echo");
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("connection closed"),
                }
            },
            Rx::Json(r) => r.next().await,
        }
    }
}

/// Ends a `FORMAT=json` session with a close frame (1000) and waits briefly for the provider's
/// close: with `RECOVERY=true` a connection that just drops leaves its session waiting for a
/// resume (`HISTORY_TTL_SEC`), a clean close ends it. Other streams are just dropped.
pub(crate) async fn close_stream(tx: Tx, rx: Rx) {
    if let (Tx::Json(mut w, _), Rx::Json(mut r)) = (tx, rx) {
        use tokio_tungstenite::tungstenite::protocol::frame::{coding::CloseCode, CloseFrame};
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        };
        let _ = w.send(Message::Close(Some(normal))).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = r.ws.next().await {}
        })
        .await;
    }
}

pub(crate) async fn open_stream(
    target: &Target,
    sources: &Sources,
    size: usize,
) -> Result<(Tx, Rx)> {
    Ok(match target {
        Target::Tcp(port) => {
            let (r, w) = sources.connect(*port).await?.into_split();
            (Tx::Tcp(w), Rx::Tcp(r, vec![0; size.max(HEADER)]))
        }
        Target::Ws(port) => {
            let (w, r) = ws_connect(sources, *port).await?.split();
            (Tx::Ws(w), Rx::Ws(r))
        }
        Target::Json {
            port,
            ack,
            recovery,
        } => {
            let (w, r) = ws_connect(sources, *port).await?.split();
            let tag = ack.then(|| SESSIONS.fetch_add(1, Ordering::Relaxed));
            let rx = JsonRx {
                ws: r,
                ack: *ack,
                recovery: *recovery,
                opened: false,
                numbered: 0,
                echoes: Default::default(),
                acks: Default::default(),
            };
            (Tx::Json(w, tag), Rx::Json(Box::new(rx)))
        }
        _ => bail!("not a stream target"),
    })
}

#[derive(Default)]
struct Counts {
    done: AtomicU64,
    hung: AtomicU64,
    failed: AtomicU64,
    misordered: AtomicU64,
}

impl Counts {
    /// Counts an echo that failed (`hung == false`) or took longer than [`HUNG_AFTER`].
    fn lost(&self, hung: bool) {
        let counter = if hung { &self.hung } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a session's task returns: its latencies, and its stream if it is one (closed by
/// [`finish`] once the clock has stopped).
type Ended = (Histogram<u64>, Option<(Tx, Rx)>);

/// One stream session: a sender paced by `pace`, and a receiver that checks order and timing.
async fn stream_session(
    mut tx: Tx,
    mut rx: Rx,
    pace: Pace,
    size: usize,
    counts: Arc<Counts>,
) -> Ended {
    let window = match pace {
        Pace::Closed { window, .. } => window,
        Pace::Open { .. } => 100_000,
    };
    let permits = Arc::new(Semaphore::new(window));
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let sender = {
        let permits = Arc::clone(&permits);
        async move {
            let start = Instant::now();
            let mut seq = 0u64;
            while !pace.done(seq) {
                let scheduled = match pace {
                    Pace::Open { interval, .. } => {
                        let at = start + interval * seq as u32;
                        tokio::time::sleep_until(at.into()).await;
                        Some(at)
                    }
                    Pace::Closed { .. } => None,
                };
                // Take what the window allows now, feed those frames, flush once.
                let Ok(p) = permits.acquire().await else {
                    return tx;
                };
                p.forget();
                // Closed loop: a round trip starts when its frame goes out, not while the
                // sender waits for room in the window (that counted the previous echo too).
                let at = scheduled.unwrap_or_else(Instant::now);
                let mut batch = 1;
                if matches!(pace, Pace::Closed { .. }) {
                    while batch < 32 && !pace.done(seq + batch) {
                        match permits.try_acquire() {
                            Ok(p) => {
                                p.forget();
                                batch += 1;
                            }
                            Err(_) => break,
                        }
                    }
                }
                for _ in 0..batch {
                    let _ = sent_tx.send((seq, at));
                    if tx.message(seq, size).await.is_err() {
                        return tx;
                    }
                    seq += 1;
                }
                if tx.flush().await.is_err() {
                    return tx;
                }
            }
            tx
        }
    };
    let receiver = async move {
        let mut hist = histogram();
        while let Some((seq, at)) = sent_rx.recv().await {
            match tokio::time::timeout(HUNG_AFTER, rx.next()).await {
                // `Err`: hung; `Ok(Err)`: failed.
                Ok(Ok(got)) => {
                    let _ = hist.record(at.elapsed().as_micros() as u64);
                    if got != seq {
                        counts.misordered.fetch_add(1, Ordering::Relaxed);
                    }
                    counts.done.fetch_add(1, Ordering::Relaxed);
                    permits.add_permits(1);
                }
                lost => {
                    counts.lost(lost.is_err());
                    break;
                }
            }
        }
        // Stops a sender waiting for the window after a failure.
        permits.close();
        (hist, rx)
    };
    // The receiver ends when the sender is done and everything sent has come back (or hung).
    let (tx, (hist, rx)) = tokio::join!(sender, receiver);
    (hist, Some((tx, rx)))
}

/// One request/reply session (B2, B3): `window` callers, each one request at a time.
async fn call_session(
    target: Target,
    window: usize,
    pace: Pace,
    size: usize,
    counts: Arc<Counts>,
) -> Result<Histogram<u64>> {
    let (nats_url, wrpc) = match &target {
        Target::Nats(url) => (url.clone(), false),
        Target::Wrpc(url) => (url.clone(), true),
        _ => bail!("not a request target"),
    };
    let nats = async_nats::connect(nats_url.as_str()).await?;
    let client = if wrpc {
        Some(
            wrpc_transport_nats::Client::new(nats.clone(), format!("{LATTICE}.{B3_ID}"), None)
                .await?,
        )
    } else {
        None
    };
    let callers = (0..window).map(|_| {
        let (nats, client, counts) = (nats.clone(), client.clone(), Arc::clone(&counts));
        async move {
            let mut hist = histogram();
            let mut seq = 0u64;
            while !pace.done(seq) {
                let body = Bytes::from(frame(seq, size));
                let t = Instant::now();
                let call = async {
                    match &client {
                        Some(client) => {
                            let msg = crate::b3::BrokerMessage {
                                subject: "bench".into(),
                                body,
                                reply_to: None,
                            };
                            crate::b3::handler::handle_message(client, None, &msg)
                                .await?
                                .map_err(anyhow::Error::msg)
                        }
                        None => nats
                            .request("bench.echo", body)
                            .await
                            .map(|_| ())
                            .map_err(Into::into),
                    }
                };
                match tokio::time::timeout(HUNG_AFTER, call).await {
                    Ok(Ok(())) => {
                        let _ = hist.record(t.elapsed().as_micros() as u64);
                        counts.done.fetch_add(1, Ordering::Relaxed);
                    }
                    lost => {
                        counts.lost(lost.is_err());
                        break;
                    }
                }
                seq += 1;
            }
            hist
        }
    });
    let mut hist = histogram();
    for h in futures::future::join_all(callers).await {
        hist.add(h)?;
    }
    Ok(hist)
}

/// Opens `sessions` sessions to `target`, runs one echo on each to warm up, then drives them
/// all with `pace` for the measured part.
pub async fn run(
    target: &Target,
    sources: &Sources,
    sessions: usize,
    size: usize,
    pace: impl Fn() -> Pace,
) -> Result<Run> {
    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::with_capacity(sessions);
    match target {
        Target::Tcp(_) | Target::Ws(_) | Target::Json { .. } => {
            let mut streams = Vec::with_capacity(sessions);
            for _ in 0..sessions {
                let (mut tx, mut rx) = open_stream(target, sources, size).await?;
                tx.message(u64::MAX, size).await?;
                tx.flush().await?;
                tokio::time::timeout(HUNG_AFTER, rx.next())
                    .await
                    .context("warm-up echo hung")??;
                streams.push((tx, rx));
            }
            let started = Instant::now();
            for (tx, rx) in streams {
                tasks.push(tokio::spawn(stream_session(
                    tx,
                    rx,
                    pace(),
                    size,
                    Arc::clone(&counts),
                )));
            }
            finish(tasks, started, counts).await
        }
        Target::Nats(_) | Target::Wrpc(_) => {
            let window = match pace() {
                Pace::Closed { window, .. } => window,
                Pace::Open { .. } => bail!("open loop is for stream targets"),
            };
            let started = Instant::now();
            for _ in 0..sessions {
                let (target, counts) = (target.clone(), Arc::clone(&counts));
                let pace = pace();
                tasks.push(tokio::spawn(async move {
                    let hist = call_session(target, window, pace, size, counts)
                        .await
                        .unwrap_or_else(|_| histogram());
                    (hist, None)
                }));
            }
            finish(tasks, started, counts).await
        }
    }
}

async fn finish(
    tasks: Vec<tokio::task::JoinHandle<Ended>>,
    started: Instant,
    counts: Arc<Counts>,
) -> Result<Run> {
    let mut hist = histogram();
    let mut streams = Vec::new();
    for t in tasks {
        let (h, stream) = t.await?;
        hist.add(h)?;
        streams.extend(stream);
    }
    let secs = started.elapsed().as_secs_f64();
    futures::future::join_all(streams.into_iter().map(|(tx, rx)| close_stream(tx, rx))).await;
    Ok(Run {
        msgs: counts.done.load(Ordering::Relaxed),
        secs,
        hist,
        hung: counts.hung.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
        misordered: counts.misordered.load(Ordering::Relaxed),
    })
}

/// Idle sessions that count what arrives on them (for fan-out).
pub struct Idle {
    pub handshakes_per_sec: f64,
    arrivals: Arc<AtomicU64>,
    /// Nanoseconds from `base` to the latest arrival.
    last: Arc<AtomicU64>,
    base: Instant,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
    _close: tokio::sync::watch::Sender<bool>,
}

impl Idle {
    /// Opens `n` sessions, `concurrency` handshakes at a time.
    pub async fn open(port: u16, sources: &Sources, n: usize, concurrency: usize) -> Result<Self> {
        let started = Instant::now();
        let sockets: Vec<Ws> = futures::stream::iter(0..n)
            .map(|_| ws_connect(sources, port))
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        let handshakes_per_sec = n as f64 / started.elapsed().as_secs_f64();
        let (close, closed) = tokio::sync::watch::channel(false);
        let arrivals = Arc::new(AtomicU64::new(0));
        let last = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let tasks = sockets
            .into_iter()
            .map(|mut ws| {
                let (arrivals, last, mut closed) = (Arc::clone(&arrivals), Arc::clone(&last), closed.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            m = ws.next() => match m {
                                Some(Ok(m)) if m.is_binary() || m.is_text() => {
                                    last.fetch_max(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                                    arrivals.fetch_add(1, Ordering::Relaxed);
                                }
                                Some(Ok(_)) => {}
                                _ => return,
                            },
                            _ = closed.changed() => {
                                let _ = ws.close(None).await;
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        Ok(Self {
            handshakes_per_sec,
            arrivals,
            last,
            base,
            _tasks: tasks,
            _close: close,
        })
    }

    /// Messages received so far, and the time of the last one.
    pub fn arrivals(&self) -> (u64, Instant) {
        let last = self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed));
        (self.arrivals.load(Ordering::Relaxed), last)
    }

    /// Closes every session and waits (briefly) for the closes to go out.
    pub async fn close(self) {
        let _ = self._close.send(true);
        for t in self._tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// A session that sends fan-out commands to the stand-in and reads its answers.
pub struct Trigger {
    ws: Ws,
}

impl Trigger {
    pub async fn open(port: u16, sources: &Sources) -> Result<Self> {
        Ok(Self {
            ws: ws_connect(sources, port).await?,
        })
    }

    /// Sends `command`; returns the instant it was sent and the stand-in's answer, skipping
    /// fan-out messages that reach this session too.
    pub async fn command(&mut self, command: &str) -> Result<(Instant, String)> {
        let sent = Instant::now();
        self.ws
            .send(Message::binary(command.as_bytes().to_vec()))
            .await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .context("no answer from the stand-in")?
                .context("trigger session closed")??;
            let text = String::from_utf8_lossy(&m.into_data()).to_string();
            if text.starts_with("ready") || text.starts_with("done") || text.starts_with("error") {
                return Ok((sent, text));
            }
        }
    }
}
