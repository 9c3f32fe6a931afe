//! The socket loop ([`serve`]) driven over `tokio::io::duplex`, with no NATS and no host. The
//! loop gets one end of the pipe as client.rs and server.rs give it a socket (wrapped with
//! [`ws_config`]); the other end is the peer: a tungstenite socket, or the raw pipe where the
//! test needs a peer that never answers. Every test asserts what the peer observes (frames,
//! their order and bytes, close codes and reasons) and what the loop reports (`End`, `Closed`,
//! acknowledgements, the sink's callbacks).
//!
//! Timers are real but short (tens of milliseconds): the socket's clock is `std::time::Instant`,
//! so tokio's paused time would not move it. Tests wait on conditions under [`WAIT`]; where a
//! bound matters (a dead peer is found after ping interval + pong timeout, not before), the
//! elapsed time is asserted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::writer::WRITE_BATCH;
use super::{serve, ws_config, Closed, End, FrameSink, Keepalive, Outbound};

/// The loop's MAX_MESSAGE_BYTES. Its write buffer is then 1 MiB (the floor of `ws_config`).
const MAX_MESSAGE_BYTES: usize = 1024;
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// The pipe's capacity, the stand-in for the kernel's socket buffers.
const PIPE: usize = 64 * 1024;
/// The longest any condition may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

type Peer = WebSocketStream<DuplexStream>;
type Queue = mpsc::Sender<Box<Outbound>>;

/// Records what the loop hands its sink.
struct Recorder {
    frames: mpsc::UnboundedSender<(Bytes, bool)>,
    written: Mutex<Vec<(u64, u64)>>,
    connected: AtomicUsize,
    disconnected: AtomicUsize,
    kick: CancellationToken,
}

impl FrameSink for Recorder {
    async fn frame(&self, payload: Bytes, text: bool) {
        self.frames
            .send((payload, text))
            .expect("the test holds the receiver");
    }

    async fn kicked(&self) {
        self.kick.cancelled().await;
    }

    fn connected(&self) {
        self.connected.fetch_add(1, Ordering::SeqCst);
    }

    fn disconnected(&self) {
        self.disconnected.fetch_add(1, Ordering::SeqCst);
    }

    fn written(&self, frames: u64, bytes: u64) {
        self.written.lock().expect("lock").push((frames, bytes));
    }
}

/// How the loop is started.
struct Options {
    /// The loop's side: `Server` as in server.rs, `Client` as in client.rs.
    role: Role,
    keepalive: Keepalive,
    cancel_code: CloseCode,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            role: Role::Server,
            keepalive: keepalive(None, Duration::ZERO, None),
            cancel_code: CloseCode::Normal,
        }
    }
}

/// The one place that builds a [`Keepalive`].
fn keepalive(ping: Option<Duration>, pong: Duration, idle: Option<Duration>) -> Keepalive {
    Keepalive {
        ping_interval: ping,
        pong_timeout: pong,
        idle_timeout: idle,
    }
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A running loop and the handles a test needs on it.
struct Run {
    queue: Queue,
    cancel: CancellationToken,
    sink: Arc<Recorder>,
    /// What the sink got: payload and text flag, in order.
    frames: mpsc::UnboundedReceiver<(Bytes, bool)>,
    ended: JoinHandle<End>,
}

impl Run {
    async fn end(&mut self) -> End {
        timeout(WAIT, &mut self.ended)
            .await
            .expect("the loop ended in time")
            .expect("the loop did not panic")
    }

    async fn next_frame(&mut self) -> (Bytes, bool) {
        timeout(WAIT, self.frames.recv())
            .await
            .expect("a frame in time")
            .expect("the sink is alive")
    }

    fn count(&self, which: fn(&Recorder) -> &AtomicUsize) -> usize {
        which(&self.sink).load(Ordering::SeqCst)
    }

    fn written(&self) -> Vec<(u64, u64)> {
        self.sink.written.lock().expect("lock").clone()
    }
}

/// Spawns the loop over `ws` (shared with the tests in mod.rs); the token cancels it.
pub(super) fn spawn_serve<S: FrameSink, T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    ws: WebSocketStream<T>,
    sink: Arc<S>,
    mut outbound: mpsc::Receiver<Box<Outbound>>,
    cancel_code: CloseCode,
    keepalive: Keepalive,
) -> (CancellationToken, JoinHandle<End>) {
    let cancel = CancellationToken::new();
    let ended = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            serve(
                ws,
                sink.as_ref(),
                &mut outbound,
                &cancel,
                cancel_code,
                keepalive,
            )
            .await
        }
    });
    (cancel, ended)
}

/// Starts the loop on one end of a pipe and returns the other end, raw. `before` may queue
/// frames before the loop runs, so that they are all ready at its first read of the queue.
async fn start_raw(options: Options, before: impl FnOnce(&Queue)) -> (Run, DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let ws =
        WebSocketStream::from_raw_socket(ours, options.role, Some(ws_config(MAX_MESSAGE_BYTES)))
            .await;
    let (queue, outbound) = mpsc::channel(256);
    before(&queue);
    let (frames_in, frames) = mpsc::unbounded_channel();
    let sink = Arc::new(Recorder {
        frames: frames_in,
        written: Mutex::default(),
        connected: AtomicUsize::new(0),
        disconnected: AtomicUsize::new(0),
        kick: CancellationToken::new(),
    });
    let (cancel, ended) = spawn_serve(
        ws,
        sink.clone(),
        outbound,
        options.cancel_code,
        options.keepalive,
    );
    let run = Run {
        queue,
        cancel,
        sink,
        frames,
        ended,
    };
    (run, theirs)
}

/// Starts the loop with a tungstenite peer (default settings) on the other end.
async fn start(options: Options, before: impl FnOnce(&Queue)) -> (Run, Peer) {
    let peer_role = match options.role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    };
    let (run, theirs) = start_raw(options, before).await;
    let peer = WebSocketStream::from_raw_socket(theirs, peer_role, None).await;
    (run, peer)
}

/// Queues a frame with an acknowledgement.
fn queue(queue: &Queue, message: Message) -> oneshot::Receiver<Result<(), String>> {
    let (ack, acked) = oneshot::channel();
    queue
        .try_send(Box::new(Outbound {
            message,
            ack: Some(ack),
        }))
        .expect("room in the queue");
    acked
}

async fn acked(acked: oneshot::Receiver<Result<(), String>>) -> Result<(), String> {
    timeout(WAIT, acked)
        .await
        .expect("acknowledged in time")
        .expect("acknowledged, not dropped")
}

/// The next message the peer reads.
async fn next(peer: &mut Peer) -> Message {
    match timeout(WAIT, peer.next()).await {
        Ok(Some(Ok(message))) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn dropped(end: End) -> Closed {
    match end {
        End::Dropped(closed) => closed,
        End::Cancelled => panic!("cancelled, expected a drop"),
    }
}

fn cancelled(end: End) {
    if let End::Dropped(closed) = end {
        panic!("dropped ({closed:?}), expected a cancel");
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

fn sum_of_data(messages: &[Message]) -> (u64, u64) {
    let data = messages.iter().filter(|m| m.is_text() || m.is_binary());
    data.fold((0, 0), |(frames, bytes), m| {
        (frames + 1, bytes + m.len() as u64)
    })
}

#[tokio::test]
async fn inbound_frames_reach_the_sink_in_order_text_and_binary_apart() {
    for role in [Role::Server, Role::Client] {
        let (mut run, mut peer) = start(
            Options {
                role,
                ..Options::default()
            },
            |_| {},
        )
        .await;
        let mut sent = vec![(Bytes::new(), true), (Bytes::new(), false)];
        sent.extend((0..40u8).map(|i| match i % 3 {
            0 => (Bytes::from(vec![i; usize::from(i) + 1]), false),
            _ => (Bytes::from(format!("text {i} ü")), true),
        }));
        sent.push((Bytes::from(vec![7u8; MAX_MESSAGE_BYTES]), false));
        for (payload, text) in &sent {
            let message = if *text {
                Message::text(String::from_utf8(payload.to_vec()).expect("utf-8"))
            } else {
                Message::binary(payload.clone())
            };
            peer.feed(message).await.expect("peer feeds");
        }
        peer.flush().await.expect("peer flushes");
        let mut got = Vec::new();
        while got.len() < sent.len() {
            got.push(run.next_frame().await);
        }
        assert_eq!(got, sent, "loop as {role:?}");
        assert_eq!(run.count(|s| &s.connected), 1);
        assert_eq!(run.count(|s| &s.disconnected), 0);
        run.cancel.cancel();
        cancelled(run.end().await);
        assert!(run.frames.try_recv().is_err(), "nothing more was delivered");
        assert_eq!(run.count(|s| &s.disconnected), 1);
    }
}

#[tokio::test]
async fn queued_frames_are_written_in_order_and_flushed_in_batches() {
    let mut messages: Vec<Message> = (0..WRITE_BATCH + 36)
        .map(|i| match i % 2 {
            0 => Message::text(format!("out {i}")),
            _ => Message::binary(vec![i as u8; i % 5 + 1]),
        })
        .collect();
    // A control frame goes out in order but is no data frame for `written`.
    messages[10] = Message::Ping(Bytes::from_static(b"component ping"));
    let mut acks = Vec::new();
    let (run, mut peer) = start(Options::default(), |q| {
        acks.extend(messages.iter().map(|m| queue(q, m.clone())));
    })
    .await;
    for expected in &messages {
        assert_eq!(&next(&mut peer).await, expected);
    }
    for ack in acks {
        assert_eq!(acked(ack).await, Ok(()));
    }
    // All were ready at once: one flush per WRITE_BATCH frames, counted per flush.
    let first = sum_of_data(&messages[..WRITE_BATCH]);
    let second = sum_of_data(&messages[WRITE_BATCH..]);
    assert_eq!(first.0, WRITE_BATCH as u64 - 1);
    assert_eq!(run.written(), vec![first, second]);
    // A frame queued alone later is a batch of its own.
    let late = queue(&run.queue, Message::text("late"));
    assert_eq!(next(&mut peer).await, Message::text("late"));
    assert_eq!(acked(late).await, Ok(()));
    assert_eq!(run.written(), vec![first, second, (1, 4)]);
    assert!(!run.ended.is_finished());
    run.cancel.cancel();
}

#[tokio::test]
async fn cancelling_sends_a_close_frame_with_the_owners_code() {
    // client.rs cancels with 1000, server.rs with 1001.
    for code in [CloseCode::Normal, CloseCode::Away] {
        let (mut run, mut peer) = start(
            Options {
                cancel_code: code,
                ..Options::default()
            },
            |_| {},
        )
        .await;
        run.cancel.cancel();
        assert_eq!(
            next(&mut peer).await,
            close(code.into(), "closed by the provider")
        );
        cancelled(run.end().await);
        assert_eq!(run.count(|s| &s.disconnected), 1);
    }
}

#[tokio::test]
async fn a_peer_close_is_answered_and_ends_the_loop_with_its_code() {
    let cases = [
        (
            close(4000, "bye"),
            Closed {
                code: 4000,
                reason: r#"peer closed with code 4000 "bye""#.to_string(),
            },
        ),
        (
            Message::Close(None),
            Closed {
                code: 1005,
                reason: "peer closed".to_string(),
            },
        ),
    ];
    for (sent, expected) in cases {
        let (mut run, mut peer) = start(Options::default(), |_| {}).await;
        peer.send(sent.clone()).await.expect("close sent");
        // tungstenite's reply echoes the peer's frame; the loop flushes it before it drops.
        assert_eq!(next(&mut peer).await, sent);
        assert_eq!(dropped(run.end().await), expected);
        assert!(run.frames.try_recv().is_err());
        assert_eq!(run.count(|s| &s.disconnected), 1);
    }
}

#[tokio::test]
async fn a_close_frame_from_the_component_goes_out_and_ends_the_loop() {
    let (mut last, mut close_ack, mut after) = (None, None, None);
    let (mut run, mut peer) = start(Options::default(), |q| {
        last = Some(queue(q, Message::text("last")));
        close_ack = Some(queue(q, close(4001, "done")));
        after = Some(queue(q, Message::text("after the close")));
    })
    .await;
    assert_eq!(next(&mut peer).await, Message::text("last"));
    assert_eq!(next(&mut peer).await, close(4001, "done"));
    assert_eq!(acked(last.expect("queued")).await, Ok(()));
    assert_eq!(acked(close_ack.expect("queued")).await, Ok(()));
    // The peer does not answer (it reads no more): the loop waits CLOSE_GRACE, then ends.
    let closed = dropped(run.end().await);
    assert_eq!(
        closed,
        Closed {
            code: 4001,
            reason: "closed by the component with code 4001".to_string(),
        }
    );
    // The frame behind the close was never taken from the queue; its ack is dropped with it.
    let after = timeout(WAIT, after.expect("queued"))
        .await
        .expect("resolved");
    assert!(after.is_err(), "{after:?}");
    assert!(!matches!(peer.next().await, Some(Ok(Message::Text(_)))));
}

#[tokio::test]
async fn an_oversize_inbound_frame_closes_with_1009_undelivered() {
    let (mut run, mut peer) = start(Options::default(), |_| {}).await;
    let fits = Bytes::from(vec![1u8; MAX_MESSAGE_BYTES]);
    peer.feed(Message::binary(fits.clone()))
        .await
        .expect("feed");
    peer.feed(Message::binary(vec![2u8; MAX_MESSAGE_BYTES + 1]))
        .await
        .expect("feed");
    peer.feed(Message::text("after")).await.expect("feed");
    peer.flush().await.expect("flush");
    assert_eq!(next(&mut peer).await, close(1009, "message too big"));
    let closed = dropped(run.end().await);
    assert_eq!(
        closed,
        Closed {
            code: 1009,
            reason: "message too big: Message too long: 1025 > 1024".to_string(),
        }
    );
    assert_eq!(run.next_frame().await, (fits, false));
    assert!(run.frames.try_recv().is_err(), "only the frame that fits");
    assert_eq!(run.count(|s| &s.disconnected), 1);
}

#[tokio::test]
async fn an_outbound_frame_over_the_write_buffer_fails_only_its_own_ack() {
    let (mut a, mut big, mut b) = (None, None, None);
    let (mut run, mut peer) = start(Options::default(), |q| {
        a = Some(queue(q, Message::text("a")));
        big = Some(queue(q, Message::binary(vec![0u8; MAX_WRITE_BUFFER + 1])));
        b = Some(queue(q, Message::text("b")));
    })
    .await;
    assert_eq!(next(&mut peer).await, Message::text("a"));
    assert_eq!(next(&mut peer).await, Message::text("b"));
    assert_eq!(acked(a.expect("queued")).await, Ok(()));
    assert_eq!(
        acked(big.expect("queued")).await,
        Err(format!(
            "a frame of {} bytes does not fit the socket's write buffer of {MAX_WRITE_BUFFER} \
             bytes (the larger of 4 x MAX_MESSAGE_BYTES and 1 MiB); not sent",
            MAX_WRITE_BUFFER + 1
        ))
    );
    assert_eq!(acked(b.expect("queued")).await, Ok(()));
    assert_eq!(run.written(), vec![(2, 2)]);
    // The socket stays up and takes more.
    let c = queue(&run.queue, Message::text("c"));
    assert_eq!(next(&mut peer).await, Message::text("c"));
    assert_eq!(acked(c).await, Ok(()));
    run.cancel.cancel();
    cancelled(run.end().await);
}

#[tokio::test]
async fn a_frame_that_fits_only_behind_a_flush_is_written_after_one() {
    // 10 KiB stay in tungstenite's buffer (under its 16 KiB write-out mark); the next frame
    // fits the 1 MiB buffer alone but not behind them: refused once, then sent after a flush.
    let messages = [
        Message::text("x".repeat(10 * 1024)),
        Message::binary(vec![9u8; MAX_WRITE_BUFFER - 4 * 1024]),
        Message::text("tail"),
    ];
    let mut acks = Vec::new();
    let (run, peer) = start(Options::default(), |q| {
        acks.extend(messages.iter().map(|m| queue(q, m.clone())));
    })
    .await;
    // The peer reads as it comes: a megabyte does not fit the pipe.
    let reading = tokio::spawn(async move {
        let mut peer = peer;
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(next(&mut peer).await);
        }
        got
    });
    for ack in acks {
        assert_eq!(acked(ack).await, Ok(()));
    }
    let got = timeout(WAIT, reading)
        .await
        .expect("read in time")
        .expect("no panic");
    assert!(got == messages, "the peer got other frames");
    let written = run.written();
    let total = written
        .iter()
        .fold((0, 0), |(f, b), (frames, bytes)| (f + frames, b + bytes));
    assert_eq!(total, sum_of_data(&messages));
    run.cancel.cancel();
}

#[tokio::test]
async fn the_peer_gets_a_ping_each_interval_and_answering_keeps_the_socket() {
    // Dead after 100 + 500 ms of silence (room for a busy machine to run the peer); the peer
    // answers (tungstenite pongs as it reads).
    let options = Options {
        keepalive: keepalive(Some(ms(100)), ms(500), None),
        ..Options::default()
    };
    let started = Instant::now();
    let (mut run, mut peer) = start(options, |_| {}).await;
    let mut pings = 0;
    while pings < 14 {
        assert_eq!(next(&mut peer).await, Message::Ping(Bytes::new()));
        pings += 1;
    }
    // 14 intervals, over twice ping + pong: the answering peer is still connected.
    assert!(started.elapsed() >= ms(14 * 100), "pings came too fast");
    assert!(!run.ended.is_finished(), "an answering peer was dropped");
    run.cancel.cancel();
    loop {
        match next(&mut peer).await {
            Message::Ping(p) if p.is_empty() => {}
            other => {
                assert_eq!(other, close(1000, "closed by the provider"));
                break;
            }
        }
    }
    cancelled(run.end().await);
}

#[tokio::test]
async fn a_peer_that_never_pongs_is_dead_after_ping_plus_pong_timeout() {
    // Two peers that never write: one reads everything raw, one does not read at all.
    for reads in [true, false] {
        let options = Options {
            keepalive: keepalive(Some(ms(50)), ms(100), None),
            ..Options::default()
        };
        let started = Instant::now();
        let (mut run, mut raw) = start_raw(options, |_| {}).await;
        let (reading, _unread) = if reads {
            let reading = tokio::spawn(async move {
                let mut bytes = Vec::new();
                raw.read_to_end(&mut bytes).await.expect("read");
                bytes
            });
            (Some(reading), None)
        } else {
            (None, Some(raw))
        };
        let closed = dropped(run.end().await);
        let elapsed = started.elapsed();
        assert_eq!(closed.code, 1006, "{closed:?}");
        assert!(
            closed.reason.starts_with("peer did not answer pings"),
            "{closed:?}"
        );
        assert!(elapsed > ms(150), "dead too soon: {elapsed:?}");
        if let Some(reading) = reading {
            // It saw pings (unmasked from the server side: 0x89 0x00), then the end of the pipe,
            // and nothing else (no close frame: a dead peer is just dropped).
            let bytes = timeout(WAIT, reading)
                .await
                .expect("eof")
                .expect("no panic");
            assert!(bytes.len() >= 4, "fewer than 2 pings: {bytes:?}");
            assert!(
                bytes.chunks(2).all(|c| c == [0x89, 0x00]),
                "not only empty pings: {bytes:?}"
            );
        }
        assert_eq!(run.count(|s| &s.disconnected), 1);
    }
}

#[tokio::test]
async fn a_peers_ping_is_answered_with_its_payload() {
    let (mut run, mut peer) = start(Options::default(), |_| {}).await;
    for payload in [&b"are you there"[..], b"", b"again"] {
        peer.send(Message::Ping(Bytes::copy_from_slice(payload)))
            .await
            .expect("ping sent");
        assert_eq!(
            next(&mut peer).await,
            Message::Pong(Bytes::copy_from_slice(payload))
        );
    }
    assert!(run.frames.try_recv().is_err(), "a ping is no data frame");
    run.cancel.cancel();
    cancelled(run.end().await);
}

#[tokio::test]
async fn an_idle_socket_is_closed_with_1001_and_inbound_data_defers_it() {
    let options = Options {
        keepalive: keepalive(None, Duration::ZERO, Some(ms(800))),
        ..Options::default()
    };
    let (mut run, mut peer) = start(options, |_| {}).await;
    // Frames from the peer, 100 ms apart for 1.9 s (over twice the idle timeout; a busy machine
    // may stretch a gap, not by 800 ms), keep it open.
    let mut last_sent = Instant::now();
    for i in 0..20 {
        if i > 0 {
            tokio::time::sleep(ms(100)).await;
        }
        last_sent = Instant::now();
        peer.send(Message::text(format!("{i}")))
            .await
            .expect("send");
        assert_eq!(run.next_frame().await, (Bytes::from(format!("{i}")), true));
        assert!(!run.ended.is_finished(), "closed as idle while receiving");
    }
    // Then nothing either way: closed once the last frame is 800 ms old, and told why.
    assert_eq!(next(&mut peer).await, close(1001, "idle timeout"));
    assert!(last_sent.elapsed() >= ms(800), "idle too soon");
    assert_eq!(dropped(run.end().await).code, 1001);
}

#[tokio::test]
async fn a_kicked_sink_ends_the_loop_with_1008() {
    let (mut run, _peer) = start(Options::default(), |_| {}).await;
    run.sink.kick.cancel();
    assert_eq!(
        dropped(run.end().await),
        Closed {
            code: 1008,
            reason: "slow consumer: the peer did not read its messages".to_string(),
        }
    );
    assert_eq!(run.count(|s| &s.disconnected), 1);
}

#[tokio::test]
async fn a_peer_that_drops_the_connection_ends_the_loop_with_1006() {
    let (mut run, peer) = start(Options::default(), |_| {}).await;
    drop(peer);
    let closed = dropped(run.end().await);
    assert_eq!(closed.code, 1006, "{closed:?}");
    assert_eq!(
        closed.reason,
        "read failed: WebSocket protocol error: Connection reset without closing handshake"
    );
}

#[tokio::test]
async fn a_closed_send_queue_ends_the_loop() {
    let (mut run, _peer) = start(Options::default(), |_| {}).await;
    run.queue = mpsc::channel(1).0; // drops the only sender of the loop's queue
    assert_eq!(
        dropped(run.end().await),
        Closed {
            code: 1006,
            reason: "send queue closed".to_string(),
        }
    );
}
