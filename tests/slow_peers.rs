//! Slow and stalled peers under a real host: a peer that stops reading is found while a write to
//! it is blocked; a slow component does not get a healthy peer blamed; a frame too big for the
//! write buffer fails only its own publish; a peer's close is answered; writes count as
//! activity for the idle timeout.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use common::ws::{connect, Server};
use common::Env;
use futures::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A client-mode handler link of component `id` (its own consumer link included) to `server`.
async fn client_link(env: &Env, id: &str, server: &Server, extra: &[(&str, &str)]) -> Result<()> {
    let uri = server.uri();
    let mut pairs = vec![
        ("URI", uri.as_str()),
        ("RECONNECT_MIN_MS", "50"),
        ("RECONNECT_MAX_MS", "500"),
    ];
    pairs.extend(extra.iter().copied());
    let config = format!("{id}-cfg");
    env.config(&config, &pairs).await?;
    env.link_handler(id, &format!("{id}-handler"), &[&config])
        .await
}

/// A component `id` with a target link (configured with `extra`) and a control link whose
/// peer drives the component; returns both servers.
async fn target_and_control(
    env: &Env,
    id: &str,
    extra: &[(&str, &str)],
) -> Result<(Server, Server)> {
    env.component_scaled("test_echo", id, 4).await?;
    env.link_consumer(id, "default", &[]).await?;
    let (target, control) = (Server::start().await?, Server::start().await?);
    client_link(env, id, &target, extra).await?;
    let control_cfg = format!("{id}-control");
    env.config(&control_cfg, &[("URI", &control.uri())]).await?;
    env.link_handler(id, &control_cfg, &[&control_cfg]).await?;
    Ok((target, control))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_stops_reading_is_found_dead_while_a_write_to_it_is_blocked() -> Result<()> {
    let env = Env::start().await?;
    // `error`, and a long write timeout: nothing but the keepalive can drop this socket.
    let (mut target, mut control) = target_and_control(
        &env,
        "stalled",
        &[
            ("PING_INTERVAL_SEC", "1"),
            ("PONG_TIMEOUT_SEC", "3"),
            ("SLOW_CONSUMER", "error"),
            ("WRITE_TIMEOUT_MS", "120000"),
        ],
    )
    .await?;
    let mut stalled = target.accept().await?;
    let mut ctl = control.accept().await?;
    let subject = stalled.round_trip("!whoami").await?;
    // From here on the target peer reads nothing (its TCP socket is held, never read), and a
    // flood of 50 MiB fills the kernel buffers, so the provider's write to it blocks.
    ctl.send_text(&format!("!flood {subject} 200 262144"))
        .await?;
    let started = Instant::now();
    let mut fresh = target.accept().await?;
    let detected = started.elapsed();
    common::figure(&format!(
        "stalled peer detected and replaced after {detected:?} (ping 1 s + pong 3 s)"
    ));
    ensure!(
        detected < Duration::from_secs(25),
        "dead peer detected only after {detected:?}"
    );
    // The write really was blocked: the flood ended with a publish that the dead socket lost.
    let answer = ctl.recv_text().await?;
    common::figure(&format!("flood report: {answer}"));
    ensure!(
        answer.starts_with("FLOOD ") && answer.contains("ERR"),
        "{answer}"
    );
    drop(stalled);
    assert_eq!(fresh.round_trip("back").await?, "back");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_component_does_not_get_a_healthy_peer_closed() -> Result<()> {
    let env = Env::start().await?;
    env.component_scaled("test_echo", "patient", 4).await?;
    env.link_consumer("patient", "default", &[]).await?;
    let mut server = Server::start().await?;
    // One call at a time: while the first frame's handler sleeps 8 s, the delivery queue fills
    // and the reader waits, twice ping + pong (4 s).
    client_link(
        &env,
        "patient",
        &server,
        &[
            ("PING_INTERVAL_SEC", "1"),
            ("PONG_TIMEOUT_SEC", "3"),
            ("MAX_IN_FLIGHT", "1"),
            ("HANDLER_TIMEOUT_MS", "30000"),
        ],
    )
    .await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("ready").await?, "ready");
    let started = Instant::now();
    peer.ws.feed(Message::text("!sleep 8000")).await?;
    const FAST: usize = 24;
    for i in 0..FAST {
        peer.ws.feed(Message::text(format!("n{i}"))).await?;
    }
    peer.ws.flush().await?;
    // The peer reads all along (and so answers pings); every frame is answered, in order.
    match peer.next_message(Duration::from_secs(30)).await? {
        Message::Text(t) if t.as_str() == "SLEPT 8000" => {}
        other => bail!("expected SLEPT 8000, got {other:?}"),
    }
    for i in 0..FAST {
        match peer.next_message(Duration::from_secs(30)).await? {
            Message::Text(t) if t.as_str() == format!("n{i}") => {}
            other => bail!("frame n{i}: got {other:?}"),
        }
    }
    common::figure(&format!(
        "{} frames answered after {:?} behind an 8 s handler",
        FAST + 1,
        started.elapsed()
    ));
    // The socket stayed up: no reconnect (the peer reads meanwhile, so it answers pings), and it
    // still carries an echo.
    let (no_reconnect, silence) = tokio::join!(
        server.expect_no_connection(Duration::from_secs(3)),
        peer.expect_silence(Duration::from_secs(3)),
    );
    no_reconnect?;
    silence?;
    assert_eq!(peer.round_trip("still here").await?, "still here");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_larger_than_the_write_buffer_fails_only_its_publish() -> Result<()> {
    let env = Env::start().await?;
    env.component_scaled("test_echo", "bulky", 4).await?;
    env.link_consumer("bulky", "default", &[]).await?;
    let mut server = Server::start().await?;
    // The write buffer holds max(4 x 1024, 1 MiB) = 1 MiB.
    client_link(&env, "bulky", &server, &[("MAX_MESSAGE_BYTES", "1024")]).await?;
    let mut peer = server.accept().await?;
    let subject = peer.round_trip("!whoami").await?;
    let answer = peer
        .round_trip(&format!("!flood {subject} 1 2097152"))
        .await?;
    common::figure(&format!("oversize publish: {answer}"));
    ensure!(answer.starts_with("FLOOD 0 ERR"), "{answer}");
    ensure!(
        answer.contains("2097152") && answer.contains("1048576"),
        "the error names the sizes: {answer}"
    );
    // The same socket carries the next frames: one that fits, and the echo.
    let answer = peer.round_trip(&format!("!flood {subject} 1 1000")).await?;
    ensure!(
        answer == "f".repeat(1000),
        "expected the 1000-byte frame, got {answer:.40}"
    );
    assert_eq!(peer.recv_text().await?, "FLOOD 1 OK");
    assert_eq!(peer.round_trip("after").await?, "after");
    server.expect_no_connection(Duration::from_secs(1)).await?;
    env.stop().await
}

/// Sends a close frame and expects the provider's close reply before the socket ends.
async fn close_and_expect_reply<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await?;
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return Ok(frame),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("read failed before a close reply: {e}"),
                None => bail!("socket ended without a close reply"),
            }
        }
    })
    .await
    .context("no close reply within 10 s")??;
    let code = reply.map(|f| f.code);
    ensure!(code == Some(CloseCode::Normal), "close reply {code:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_close_is_answered_with_a_close_frame() -> Result<()> {
    let env = Env::start().await?;
    // Client mode: the test server closes.
    env.component_scaled("test_echo", "polite", 4).await?;
    env.link_consumer("polite", "default", &[]).await?;
    let mut server = Server::start().await?;
    client_link(&env, "polite", &server, &[]).await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("hello").await?, "hello");
    close_and_expect_reply(&mut peer.ws)
        .await
        .context("client mode")?;

    // Server mode: a browser-like client closes.
    let url = env.serve("courteous", "courteous-server", &[]).await?;
    let mut client = common::eventually(Duration::from_secs(15), || connect(&url, &[])).await?;
    assert_eq!(client.round_trip("hello").await?, "hello");
    close_and_expect_reply(&mut client.ws)
        .await
        .context("server mode")?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_idle_timeout_counts_written_frames_too() -> Result<()> {
    let env = Env::start().await?;
    let (mut target, mut control) =
        target_and_control(&env, "listener", &[("IDLE_TIMEOUT_SEC", "3")]).await?;
    let mut quiet = target.accept().await?;
    let mut ctl = control.accept().await?;
    let subject = quiet.round_trip("!whoami").await?;
    // The target peer only receives from here on: a frame every 500 ms for 7 s, more than twice
    // the idle timeout.
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(7) {
        tick.tick().await;
        ctl.send_text(&format!("!to {subject} tick{i}")).await?;
        match quiet.next_message(Duration::from_secs(15)).await? {
            Message::Text(t) if t.as_str() == format!("tick{i}") => {}
            other => bail!("tick{i} after {:?}: got {other:?}", started.elapsed()),
        }
        i += 1;
    }
    common::figure(&format!(
        "{i} frames written over {:?} without an idle close",
        started.elapsed()
    ));
    // No data either way now: closed as idle (1001).
    let silent_since = Instant::now();
    match quiet.next_message(Duration::from_secs(20)).await? {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => bail!("expected close 1001, got {other:?}"),
    }
    common::figure(&format!(
        "idle close after {:?} of silence",
        silent_since.elapsed()
    ));
    env.stop().await
}
