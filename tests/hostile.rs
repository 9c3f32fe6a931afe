//! Hostile and slow peers, odd link sequences and bad config under a real host: none of them may
//! hurt other sessions, other components or lose data silently. Attack tests print their
//! figures (RSS under churn, another component's latency under a slow one, another session's
//! latency under a flood of bad frames).

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use common::ws::{connect, Server};
use common::{eventually, free_port, Env};
use futures::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// Long enough that a late delivery would have shown up (the calls it would follow took
/// milliseconds); negative checks shorter than a second cannot catch late deliveries.
const QUIET: Duration = Duration::from_secs(3);

/// Reads text frames until one satisfies `done`; returns it (other frames are skipped).
async fn until_text<S>(
    peer: &mut common::ws::Peer<S>,
    wait: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.next_message(left).await? {
            Message::Text(t) if done(t.as_str()) => return Ok(t.to_string()),
            _ => {}
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// 1. Frames the server sends before the handler link attaches wait, unread, and arrive.
#[tokio::test(flavor = "multi_thread")]
async fn frames_sent_before_the_handler_link_attaches_are_delivered_in_order() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "early").await?;
    env.config("early-cfg", &[("URI", &server.uri())]).await?;
    // The consumer link sets URI: the socket opens now, with no handler link yet.
    env.link_consumer("early", "default", &["early-cfg"])
        .await?;
    let mut peer = server.accept().await?;
    for text in ["one", "two", "three"] {
        peer.send_text(text).await?;
    }
    // The provider has read (at most) the first of them by now; the handler link comes later.
    env.link_handler("early", "early-handler", &["early-cfg"])
        .await?;
    for text in ["one", "two", "three"] {
        assert_eq!(peer.recv_text().await?, text);
    }
    server.expect_no_connection(Duration::from_secs(1)).await?;
    env.stop().await
}

// 17. Frames queued for a handler link are not delivered after the link is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn frames_queued_for_a_deleted_handler_link_are_dropped() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "gone").await?;
    env.config("gone-cfg", &[("URI", &server.uri())]).await?;
    // Equal config: one socket, kept open by the consumer link after the handler link goes.
    env.link_consumer("gone", "default", &["gone-cfg"]).await?;
    env.link_handler("gone", "gone-handler", &["gone-cfg"])
        .await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("ready").await?, "ready");
    // The first call sleeps; the next frames wait in the session's queue meanwhile. The
    // component says when it is running, so the delete cannot reach the provider before the
    // call has started (which would drop it too); 5 s leaves a busy machine time to deliver
    // the delete before the call ends.
    peer.send_text("!announce-sleep 5000").await?;
    assert_eq!(peer.recv_text().await?, "SLEEPING 5000");
    for i in 0..5 {
        peer.send_text(&format!("!plain queued {i}")).await?;
    }
    env.unlink_handler("gone-handler").await?;
    // The call already running finishes; the queued ones are not delivered.
    assert_eq!(peer.recv_text().await?, "SLEPT 5000");
    peer.expect_silence(QUIET).await?;
    env.stop().await
}

// 6. One component's slow handler does not take another component's call slots.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_component_with_300_clients_does_not_slow_another_component() -> Result<()> {
    let env = Env::start().await?;
    let slow_url = env.serve("slowpoke", "slow-server", &[]).await?;
    let fast_url = env.serve("speedy", "fast-server", &[]).await?;
    let mut fast = connect(&fast_url, &[]).await?;
    assert_eq!(fast.round_trip("warm").await?, "warm");
    let mut slow_clients = Vec::new();
    for _ in 0..300 {
        let mut client = connect(&slow_url, &[]).await?;
        client.send_text("!sleep 8000").await?;
        slow_clients.push(client);
    }
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let started = Instant::now();
        let text = format!("fast {i}");
        assert_eq!(fast.round_trip(&text).await?, text);
        worst = worst.max(started.elapsed());
    }
    common::figure(&format!("the other component's slowest echo of 10 while one component sleeps in 300 calls: {worst:?}"));
    ensure!(
        worst < Duration::from_secs(1),
        "an echo of the other component took {worst:?}"
    );
    drop(slow_clients);
    env.stop().await
}

// 3. Connect, send 17 x 1 MiB to a slow handler, close, repeat: memory stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn churning_clients_with_big_frames_keep_memory_within_the_inbound_budget() -> Result<()> {
    const BUDGET_MIB: u64 = 16;
    let budget = (BUDGET_MIB * 1024 * 1024).to_string();
    let env = Env::start_with(
        wasmcloud_core::OtelConfig::default(),
        &[("MAX_INBOUND_BYTES", budget.as_str())],
    )
    .await?;
    let url = env
        .serve_scaled(
            "hoarder",
            "hoard-server",
            &[("HANDLER_TIMEOUT_MS", "60000")],
            1,
        )
        .await?;
    let mut probe = connect(&url, &[]).await?;
    assert_eq!(probe.round_trip("alive").await?, "alive");
    drop(probe);
    // Another component, whose clients must not wait for the hoarder's share of the budget.
    let bystander_url = env.serve("bystander", "bystander-server", &[]).await?;
    let mut bystander = connect(&bystander_url, &[]).await?;
    assert_eq!(bystander.round_trip("before").await?, "before");
    let baseline = env.provider_rss_kib().context("provider RSS")?;
    let mut frame = b"!sleep 1000 ".to_vec();
    frame.resize(1024 * 1024 - 64, b'x');
    let mut peak = baseline;
    let rounds = 30;
    for _ in 0..rounds {
        let mut client = connect(&url, &[]).await?;
        // Sending stops when the provider stops reading (the budget is full): give up then.
        let _ = tokio::time::timeout(Duration::from_millis(800), async {
            for _ in 0..17 {
                client.ws.feed(Message::binary(frame.clone())).await?;
            }
            client.ws.flush().await
        })
        .await;
        drop(client);
        peak = peak.max(env.provider_rss_kib().unwrap_or(0));
    }
    let grew_mib = peak.saturating_sub(baseline) / 1024;
    common::figure(&format!(
        "provider RSS {} MiB before, peak {} MiB over {rounds} rounds of 17 x 1 MiB to a slow handler (budget {BUDGET_MIB} MiB), growth {grew_mib} MiB",
        baseline / 1024,
        peak / 1024
    ));
    // The budget, one unread frame per open socket, and the allocator's slack.
    ensure!(
        grew_mib < BUDGET_MIB + 96,
        "provider memory grew by {grew_mib} MiB"
    );
    // The hoarder's share is full (its handler takes a second a frame): the other component's
    // client is still read and answered at once.
    let started = Instant::now();
    assert_eq!(bystander.round_trip("during").await?, "during");
    let took = started.elapsed();
    common::figure(&format!(
        "another component's echo while the hoarder's share of the budget is full: {took:?}"
    ));
    ensure!(
        took < Duration::from_secs(5),
        "the other component waited {took:?}"
    );
    // The provider still serves new clients.
    let mut after = connect(&url, &[]).await?;
    after.send_text("still here").await?;
    let (healthy, _) = env.health().await?;
    ensure!(healthy);
    env.stop().await
}

/// Puts one link of the triad (0 consumer with its own URI, 1 sessions, 2 handler).
async fn put_link(env: &Env, id: &str, which: usize) -> Result<()> {
    match which {
        0 => {
            env.link_consumer(id, "default", &[&format!("{id}-out")])
                .await
        }
        1 => env.link_sessions(id).await,
        _ => {
            env.link_handler(id, &format!("{id}-h"), &[&format!("{id}-in")])
                .await
        }
    }
}

async fn delete_link(env: &Env, id: &str, which: usize) -> Result<()> {
    match which {
        0 => env.unlink_consumer(id, "default").await,
        1 => env.unlink_sessions(id).await,
        _ => env.unlink_handler(&format!("{id}-h")).await,
    }
}

// 8. Consumer, sessions and handler links of one component, put in every order and each deleted:
// no link's put or delete touches another's state.
#[tokio::test(flavor = "multi_thread")]
async fn consumer_sessions_and_handler_links_in_every_order_keep_their_own_state() -> Result<()> {
    let env = Env::start().await?;
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for (n, order) in orders.iter().enumerate() {
        let id = format!("triad{n}");
        let mut inbound = Server::start().await?;
        let mut outbound = Server::start().await?;
        env.component("test_echo", &id).await?;
        env.config(&format!("{id}-in"), &[("URI", &inbound.uri())])
            .await?;
        env.config(&format!("{id}-out"), &[("URI", &outbound.uri())])
            .await?;
        for which in order {
            put_link(&env, &id, *which).await?;
        }
        let mut peer_in = inbound.accept().await?;
        let mut peer_out = outbound.accept().await?;
        // All three work: echo (handler + consumer), the consumer's own socket, the session API.
        assert_eq!(peer_in.round_trip("echo").await?, "echo", "order {order:?}");
        peer_in.send_text("!plain out").await?;
        assert_eq!(peer_out.recv_text().await?, "out", "order {order:?}");
        let list = peer_in.round_trip("!list").await?;
        ensure!(list.starts_with("LIST 2"), "order {order:?}: {list}");
        // Delete one (each order deletes a different one, twice each over the six orders).
        let gone = order[n % 3];
        delete_link(&env, &id, gone).await?;
        match gone {
            0 => {
                // The consumer link's own socket closes; the handler's stays up.
                match peer_out.next_message(Duration::from_secs(10)).await? {
                    Message::Close(_) => {}
                    other => bail!("order {order:?}: expected a close, got {other:?}"),
                }
                peer_in.expect_silence(Duration::from_secs(1)).await?;
            }
            1 => {
                // The consumer link's socket is untouched and still carries publishes.
                peer_in.send_text("!plain still out").await?;
                assert_eq!(peer_out.recv_text().await?, "still out", "order {order:?}");
                assert_eq!(peer_in.round_trip("echo 2").await?, "echo 2");
            }
            _ => {
                // The handler's socket closes; the consumer's socket stays and is not reopened.
                match peer_in.next_message(Duration::from_secs(10)).await? {
                    Message::Close(_) => {}
                    other => bail!("order {order:?}: expected a close, got {other:?}"),
                }
                peer_out.expect_silence(Duration::from_secs(1)).await?;
            }
        }
        // Put it back: everything works again, on the sockets still open.
        put_link(&env, &id, gone).await?;
        if gone == 0 {
            peer_out = outbound.accept().await?;
        }
        if gone == 2 {
            peer_in = inbound.accept().await?;
        }
        assert_eq!(
            peer_in.round_trip("again").await?,
            "again",
            "order {order:?}"
        );
        peer_in.send_text("!plain out again").await?;
        assert_eq!(peer_out.recv_text().await?, "out again", "order {order:?}");
        inbound
            .expect_no_connection(Duration::from_millis(500))
            .await?;
        outbound
            .expect_no_connection(Duration::from_millis(500))
            .await?;
    }
    env.stop().await
}

// 8. A server link deleted and put again listens on its own address with the new token.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_link_put_again_listens_on_its_address_with_the_new_token() -> Result<()> {
    let env = Env::start().await?;
    env.component("test_echo", "reput").await?;
    env.link_consumer("reput", "default", &[]).await?;
    let address = format!("127.0.0.1:{}", free_port()?);
    let url = format!("ws://{address}");
    env.config(
        "reput-1",
        &[
            ("MODE", "server"),
            ("LISTEN_ADDRESS", &address),
            ("AUTH_TOKEN", "old-token"),
        ],
    )
    .await?;
    env.config(
        "reput-2",
        &[
            ("MODE", "server"),
            ("LISTEN_ADDRESS", &address),
            ("AUTH_TOKEN", "new-token"),
        ],
    )
    .await?;
    env.link_handler("reput", "reput-server", &["reput-1"])
        .await?;
    common::wait_listening(&url).await?;
    let mut old = connect(&format!("{url}/?access_token=old-token"), &[]).await?;
    assert_eq!(old.round_trip("old").await?, "old");
    env.unlink_handler("reput-server").await?;
    env.link_handler("reput", "reput-server", &["reput-2"])
        .await?;
    let new_url = format!("{url}/?access_token=new-token");
    let mut new = eventually(Duration::from_secs(15), || connect(&new_url, &[])).await?;
    assert_eq!(new.round_trip("new").await?, "new");
    let status = common::ws::upgrade_status(&format!("{url}/?access_token=old-token"), &[]).await?;
    assert_eq!(status, 401, "the old token no longer works");
    let (_, message) = env.health().await?;
    ensure!(
        !message.unwrap_or_default().contains("cannot listen"),
        "the re-put failed on its own address"
    );
    env.stop().await
}

// 9. With session tracking off, the link subject still reaches every client of a server link.
#[tokio::test(flavor = "multi_thread")]
async fn untracked_server_clients_get_link_subject_publishes() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve(
            "untracked",
            "quiet-server",
            &[("ENABLE_SESSION_TRACKING", "false")],
        )
        .await?;
    let mut a = connect(&url, &[]).await?;
    let mut b = connect(&url, &[]).await?;
    // Both are connected before the publish (the provider reads a's frame after b's upgrade).
    a.send_text("!to ws.quiet-server to all").await?;
    assert_eq!(a.recv_text().await?, "to all");
    assert_eq!(b.recv_text().await?, "to all");
    env.stop().await
}

// 12. An empty AUTH_TOKEN is refused, not taken as "everyone may connect".
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_auth_token_is_refused_and_nobody_is_admitted() -> Result<()> {
    let env = Env::start().await?;
    env.component("test_echo", "open-door").await?;
    env.link_consumer("open-door", "default", &[]).await?;
    let address = format!("127.0.0.1:{}", free_port()?);
    env.config(
        "open-door-cfg",
        &[
            ("MODE", "server"),
            ("LISTEN_ADDRESS", &address),
            ("AUTH_TOKEN", ""),
        ],
    )
    .await?;
    env.link_handler("open-door", "door", &["open-door-cfg"])
        .await?;
    let message = eventually(Duration::from_secs(15), || async {
        let (_, message) = env.health().await?;
        let message = message.unwrap_or_default();
        ensure!(message.contains("AUTH_TOKEN"), "health: {message:?}");
        Ok(message)
    })
    .await?;
    println!("health: {message}");
    ensure!(
        tokio::net::TcpStream::connect(&address).await.is_err(),
        "the link listens although its token is empty"
    );
    env.stop().await
}

// 12. Credentials in a client link's URI never reach a component or health.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_a_uri_reach_neither_components_nor_health() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "creds").await?;
    env.link_consumer("creds", "default", &[]).await?;
    env.link_sessions("creds").await?;
    let uri = format!(
        "ws://agent:hunter2@127.0.0.1:{}/feed?api_key=sekrit",
        server.port
    );
    env.config(
        "creds-cfg",
        &[
            ("URI", &uri),
            ("RECONNECT_MIN_MS", "50"),
            ("RECONNECT_MAX_MS", "200"),
        ],
    )
    .await?;
    env.link_handler("creds", "creds-handler", &["creds-cfg"])
        .await?;
    let mut peer = server.accept().await?;
    let list = peer.round_trip("!list").await?;
    ensure!(list.starts_with("LIST 1"), "{list}");
    ensure!(
        !list.contains("hunter2") && !list.contains("sekrit"),
        "a component saw credentials: {list}"
    );
    ensure!(list.contains("<redacted>"), "{list}");
    // Health while the server is gone names the connection without its credentials.
    drop(peer);
    drop(server);
    let message = eventually(Duration::from_secs(15), || async {
        let (_, message) = env.health().await?;
        let message = message.unwrap_or_default();
        ensure!(message.contains("creds-handler"), "health: {message:?}");
        Ok(message)
    })
    .await?;
    ensure!(
        !message.contains("hunter2") && !message.contains("sekrit"),
        "health shows credentials: {message}"
    );
    env.stop().await
}

// 13. A peer cannot forge the provider's own lifecycle or session messages.
#[tokio::test(flavor = "multi_thread")]
async fn envelopes_with_the_providers_own_subjects_are_refused() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve("forger", "forge-server", &[("FORMAT", "json")])
        .await?;
    let mut peer = connect(&url, &[]).await?;
    for subject in [
        "ws.lifecycle.connected",
        "ws.lifecycle.disconnected",
        "ws.session.x",
    ] {
        peer.send_json(serde_json::json!({"subject": subject, "body": "{\"session\":\"forged\"}"}))
            .await?;
        let answer = peer.recv_json().await?;
        assert_eq!(
            answer["error"]["code"], "invalid_envelope",
            "{subject}: {answer}"
        );
    }
    // A normal envelope is still served.
    peer.send_json(serde_json::json!({"subject": "chat", "body": "hi"}))
        .await?;
    let answer = peer.recv_json().await?;
    assert_eq!(answer["body"], "hi", "{answer}");
    env.stop().await
}

// 14. A flood of invalid envelopes on one session does not slow another session down.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_invalid_envelopes_does_not_slow_another_session() -> Result<()> {
    const BAD_FRAMES: usize = 500_000;
    let env = Env::start().await?;
    let url = env
        .serve("flooded", "flood-server", &[("FORMAT", "json")])
        .await?;
    let mut victim = connect(&url, &[]).await?;
    let mut attacker = connect(&url, &[]).await?;
    victim
        .send_json(serde_json::json!({"subject": "warm", "body": "up"}))
        .await?;
    victim.recv_json().await?;
    // The victim's echo latency without the flood, measured on this machine in this run: the
    // flood may not make it much worse (a starved session waits for seconds).
    let mut quiet = Vec::new();
    for i in 0..50 {
        let started = Instant::now();
        victim
            .send_json(serde_json::json!({"subject": "quiet", "body": i.to_string()}))
            .await?;
        let answer = victim.recv_json().await?;
        ensure!(
            answer["body"].as_str() == Some(i.to_string().as_str()),
            "{answer}"
        );
        quiet.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    quiet.sort();
    let quiet_p99 = percentile(&quiet, 0.99);
    // The frames are encoded once, by hand (masked text frames, as a client sends them), and
    // written raw: the test's own CPU goes to the provider's work, not to encoding frames.
    const MASK: [u8; 4] = [0x1f, 0x2e, 0x3d, 0x4c];
    let payload = b"not json";
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    let flood_bytes = frame.repeat(BAD_FRAMES);
    let flood = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let started = Instant::now();
        let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = attacker.ws.get_mut() else {
            bail!("expected a plain TCP stream");
        };
        tcp.write_all(&flood_bytes).await?;
        tcp.flush().await?;
        anyhow::Ok((started.elapsed(), attacker))
    });
    let mut latencies = Vec::new();
    while !flood.is_finished() {
        let started = Instant::now();
        victim
            .send_json(serde_json::json!({"subject": "ping", "body": latencies.len().to_string()}))
            .await?;
        let answer = victim.recv_json().await?;
        let expected = latencies.len().to_string();
        ensure!(
            answer["body"].as_str() == Some(expected.as_str()),
            "{answer}"
        );
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (took, _attacker) = flood.await??;
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    common::figure(&format!(
        "{BAD_FRAMES} invalid envelopes sent in {took:?}; the other session's echo over {} round trips meanwhile: p50 {p50:?}, p99 {p99:?}, max {:?} (p99 without the flood: {quiet_p99:?})",
        latencies.len(),
        latencies.last().copied().unwrap_or_default()
    ));
    ensure!(latencies.len() >= 10, "too few round trips to judge");
    // A ratio to the quiet latency of the same run, plus room for the flood's own share of two
    // busy cores: a starved session would wait for the whole flood (seconds).
    let bound = quiet_p99 * 4 + Duration::from_millis(100);
    ensure!(
        p99 < bound,
        "p99 {p99:?} with the flood, {quiet_p99:?} without it (bound {bound:?})"
    );
    let (healthy, _) = env.health().await?;
    ensure!(healthy);
    env.stop().await
}

// 16. A request fails as soon as its session is gone, not at its timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_to_a_session_that_closes_fails_at_once() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve("asker", "ask-server", &[("FORMAT", "json")])
        .await?;
    let mut asker = connect(&url, &[]).await?;
    let mut mute = connect(&url, &[]).await?;
    asker
        .send_json(serde_json::json!({"subject": "x", "body": "!whoami"}))
        .await?;
    let _ = asker.recv_json().await?;
    mute.send_json(serde_json::json!({"subject": "x", "body": "!whoami"}))
        .await?;
    let mute_subject = mute.recv_json().await?["body"]
        .as_str()
        .context("whoami")?
        .to_string();
    let started = Instant::now();
    asker
        .send_json(serde_json::json!({"subject": "x", "body": format!("!request {mute_subject} 30000 hello?")}))
        .await?;
    // The request reached the mute peer; it closes instead of answering.
    let request = mute.recv_json().await?;
    ensure!(request["reply_to"].is_string(), "{request}");
    mute.ws.close(None).await?;
    let answer = asker.recv_json().await?;
    let body = answer["body"].as_str().unwrap_or_default().to_string();
    ensure!(body.starts_with("ERR"), "{answer}");
    let took = started.elapsed();
    common::figure(&format!(
        "the request failed {took:?} after it was sent (its timeout was 30 s)"
    ));
    ensure!(
        took < Duration::from_secs(10),
        "the request waited {took:?}"
    );
    env.stop().await
}

// 16. A slow-consumer kick is for the socket being served; the next connection is not killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_consumer_kick_does_not_kill_the_next_connection() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component_scaled("test_echo", "kicked", 4).await?;
    env.link_consumer("kicked", "default", &[]).await?;
    env.config(
        "kicked-cfg",
        &[
            ("URI", &server.uri()),
            ("SLOW_CONSUMER", "close"),
            ("WRITE_TIMEOUT_MS", "200"),
            ("SEND_QUEUE_LEN", "4"),
            ("RECONNECT_MIN_MS", "50"),
            ("RECONNECT_MAX_MS", "200"),
        ],
    )
    .await?;
    env.link_handler("kicked", "kicked-handler", &["kicked-cfg"])
        .await?;
    let mut first = server.accept().await?;
    let me = first.round_trip("!whoami").await?;
    // Four floods at once, each failing on the full queue: several kicks while one socket lives.
    for _ in 0..4 {
        first
            .send_text(&format!("!flood-all {me} 200 65536"))
            .await?;
    }
    // The first socket is not read any more; it is closed, and the link reconnects.
    let mut second = server.accept().await?;
    drop(first);
    // What is left of the floods may arrive here first: skip it.
    second.send_text("after the kick").await?;
    until_text(&mut second, Duration::from_secs(60), |t| {
        t == "after the kick"
    })
    .await?;
    // The new connection stays: no stale kick closes it.
    server.expect_no_connection(QUIET).await?;
    second.send_text("still up").await?;
    until_text(&mut second, Duration::from_secs(30), |t| t == "still up").await?;
    env.stop().await
}

// 5. A fan-out has one deadline: a peer that does not read cannot hold it for WRITE_TIMEOUT_MS.
#[tokio::test(flavor = "multi_thread")]
async fn a_broadcast_is_not_held_by_a_peer_that_stops_reading() -> Result<()> {
    let env = Env::start().await?;
    let url = env.serve("fanout", "fan-server", &[]).await?;
    let mut speaker = connect(&url, &[]).await?;
    let mut listener = connect(&url, &[]).await?;
    let silent = connect(&url, &[]).await?; // never read again
    assert_eq!(listener.round_trip("hi").await?, "hi");
    let body = "b".repeat(64 * 1024);
    let mut reached_all = 0;
    for round in 0..400 {
        let started = Instant::now();
        speaker.send_text(&format!("!broadcast {body}")).await?;
        let answer = until_text(&mut speaker, Duration::from_secs(30), |t| {
            t.starts_with("BROADCAST")
        })
        .await?;
        let took = started.elapsed();
        // The listener reads every broadcast.
        let got = listener.recv_text().await?;
        ensure!(got.len() == body.len(), "listener got {} bytes", got.len());
        match answer.as_str() {
            "BROADCAST 3" => reached_all += 1,
            "BROADCAST 2" => {
                common::figure(&format!("after {round} broadcasts of 64 KiB the silent peer's socket was full; that broadcast took {took:?} and reached 2 of 3"));
                ensure!(
                    took < Duration::from_secs(5),
                    "a broadcast waited {took:?} for a silent peer"
                );
                // And the next one is as quick.
                let started = Instant::now();
                speaker.send_text("!broadcast small").await?;
                let answer = until_text(&mut speaker, Duration::from_secs(30), |t| {
                    t.starts_with("BROADCAST")
                })
                .await?;
                assert_eq!(answer, "BROADCAST 2");
                ensure!(started.elapsed() < Duration::from_secs(5));
                drop(silent);
                return env.stop().await;
            }
            other => bail!("unexpected answer {other}"),
        }
    }
    bail!("the silent peer took all {reached_all} broadcasts")
}
