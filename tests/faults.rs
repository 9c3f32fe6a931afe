//! Faults and limits under a real host: dropped servers, oversize frames, dead and idle peers,
//! and ordering under volume.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use common::ws::{connect, Server};
use common::{free_port, Env};
use futures::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Waits until health reports handler link `link` as not connected.
async fn link_down(env: &Env, link: &str) -> Result<()> {
    common::eventually(Duration::from_secs(20), || async {
        let (_, message) = env.health().await?;
        let message = message.unwrap_or_default();
        ensure!(
            message.contains(&format!("{link:?}")),
            "health: {message:?}"
        );
        Ok(())
    })
    .await
}

/// Long enough for a late delivery to show (the deliveries it would follow take milliseconds).
const QUIET: Duration = Duration::from_secs(2);

async fn client_link(env: &Env, id: &str, server: &Server, extra: &[(&str, &str)]) -> Result<()> {
    // Spare instances: see `ten_thousand_numbered_frames_arrive_in_order`.
    env.component_scaled("test_echo", id, 32).await?;
    env.link_consumer(id, "default", &[]).await?;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_is_reconnected_when_it_comes_back() -> Result<()> {
    let env = Env::start().await?;
    let port = free_port()?;
    let mut server = Server::start_on(port).await?;
    client_link(&env, "phoenix", &server, &[]).await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("before").await?, "before");
    let before = peer.round_trip("!whoami").await?;

    // Kill the server and every connection it had; wait until the provider has seen it.
    drop(peer);
    drop(server);
    link_down(&env, "phoenix-handler").await?;
    let mut server = Server::start_on(port).await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("after").await?, "after");
    // The link's session ID survives the reconnect.
    assert_eq!(peer.round_trip("!whoami").await?, before);
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_frame_gets_close_1009_and_the_provider_stays_up() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    client_link(&env, "small", &server, &[("MAX_MESSAGE_BYTES", "1024")]).await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip(&"x".repeat(1000)).await?, "x".repeat(1000));
    peer.send_binary(vec![7u8; 64 * 1024]).await?;
    match peer.next_message(Duration::from_secs(10)).await? {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Size),
        other => bail!("expected close 1009, got {other:?}"),
    }
    // The provider is still up: the link reconnects and works.
    let mut again = server.accept().await?;
    assert_eq!(again.round_trip("fits").await?, "fits");
    let (healthy, _) = env.health().await?;
    ensure!(healthy);
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_never_answers_pings_is_detected_and_replaced() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    client_link(
        &env,
        "pinger",
        &server,
        &[("PING_INTERVAL_SEC", "1"), ("PONG_TIMEOUT_SEC", "1")],
    )
    .await?;
    // This peer never reads, so it never answers a ping.
    let silent = server.accept().await?;
    let started = Instant::now();
    let mut next = server.accept().await?;
    let detected = started.elapsed();
    ensure!(
        detected < Duration::from_secs(10),
        "dead peer detected only after {detected:?}"
    );
    drop(silent);
    assert_eq!(next.round_trip("alive").await?, "alive");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_server_session_is_closed() -> Result<()> {
    let env = Env::start().await?;
    env.component("test_echo", "idle").await?;
    env.link_consumer("idle", "default", &[]).await?;
    let address = format!("127.0.0.1:{}", free_port()?);
    env.config(
        "idle-cfg",
        &[
            ("MODE", "server"),
            ("LISTEN_ADDRESS", &address),
            // Long enough for a round trip through a busy host to count as activity.
            ("IDLE_TIMEOUT_SEC", "3"),
        ],
    )
    .await?;
    env.link_handler("idle", "idle-server", &["idle-cfg"])
        .await?;
    let url = format!("ws://{address}");
    let mut client = common::eventually(Duration::from_secs(15), || connect(&url, &[])).await?;
    assert_eq!(client.round_trip("talking").await?, "talking");
    match client.next_message(Duration::from_secs(30)).await? {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => bail!("expected close 1001, got {other:?}"),
    }
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_numbered_frames_arrive_in_order() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    // The default handler timeout: a shorter one, overrun on a busy machine, would let the
    // next call start while an abandoned one may still answer, out of order.
    client_link(&env, "order", &server, &[]).await?;
    let mut peer = server.accept().await?;
    let n: usize = std::env::var("ORDER_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    for i in 0..n {
        peer.ws.feed(Message::text(format!("{i}"))).await?;
    }
    peer.ws.flush().await?;
    for i in 0..n {
        let got = peer.next_message(Duration::from_secs(60)).await?;
        match got {
            Message::Text(text) if text.as_str() == i.to_string() => {}
            other => bail!("frame {i}: got {other:?}"),
        }
    }
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_during_a_gap_are_delivered_after_the_reconnect_or_reported() -> Result<()> {
    let env = Env::start().await?;
    let port = free_port()?;
    let mut target = Server::start_on(port).await?;
    let mut trigger = Server::start().await?;
    env.component_scaled("test_echo", "gap", 4).await?;
    env.link_consumer("gap", "default", &[]).await?;
    let uri = target.uri();
    env.config(
        "gap-target",
        &[
            ("URI", uri.as_str()),
            ("RECONNECT_MIN_MS", "50"),
            ("RECONNECT_MAX_MS", "200"),
            ("PUBLISH_WAIT_MS", "3000"),
        ],
    )
    .await?;
    env.config("gap-trigger", &[("URI", &trigger.uri())])
        .await?;
    env.link_handler("gap", "gap-target", &["gap-target"])
        .await?;
    env.link_handler("gap", "gap-trigger", &["gap-trigger"])
        .await?;
    let mut peer = target.accept().await?;
    let mut control = trigger.accept().await?;
    let subject = peer.round_trip("!whoami").await?;

    // The target goes away; a publish to it waits, and is written once the link is back.
    drop(peer);
    drop(target);
    link_down(&env, "gap-target").await?;
    control
        .send_text(&format!("!to {subject} sent during the gap"))
        .await?;
    // The gap itself (what this test is about, not a wait for a condition): the server stays
    // away a while after the publish was sent; the publish waits up to PUBLISH_WAIT_MS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut target = Server::start_on(port).await?;
    let mut peer = target.accept().await?;
    assert_eq!(peer.recv_text().await?, "sent during the gap");
    control.expect_silence(QUIET).await?;

    // If it does not come back in time, the component is told.
    drop(peer);
    drop(target);
    link_down(&env, "gap-target").await?;
    let answer = control
        .round_trip(&format!("!to {subject} nobody there"))
        .await?;
    ensure!(
        answer.contains("is not connected (waited 3000 ms"),
        "{answer}"
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_finishes_the_upgrade_hits_the_connect_timeout() -> Result<()> {
    let env = Env::start().await?;
    // Accepts TCP, reads the upgrade request, never answers.
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tarpit_uri = format!("ws://{}", tarpit.local_addr()?);
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = tarpit.accept().await {
            held.push(stream);
        }
    });
    env.component("test_echo", "stuck").await?;
    env.config(
        "stuck-cfg",
        &[("URI", &tarpit_uri), ("CONNECT_TIMEOUT_SEC", "1")],
    )
    .await?;
    env.link_handler("stuck", "stuck-handler", &["stuck-cfg"])
        .await?;
    let mut server = Server::start().await?;
    client_link(&env, "fine", &server, &[]).await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("unaffected").await?, "unaffected");

    let message = common::eventually(Duration::from_secs(15), || async {
        let (healthy, message) = env.health().await?;
        ensure!(healthy, "unhealthy");
        let message = message.unwrap_or_default();
        ensure!(message.contains("connect timed out after 1 s"), "{message}");
        Ok(message)
    })
    .await?;
    ensure!(
        message.contains("stuck-handler") && !message.contains("fine-handler"),
        "{message}"
    );
    assert_eq!(
        peer.round_trip("still unaffected").await?,
        "still unaffected"
    );
    held.abort();
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_provider_is_restarted_by_the_host_and_its_links_reconnect() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    client_link(&env, "survivor", &server, &[]).await?;
    let mut peer = server.accept().await?;
    assert_eq!(
        peer.round_trip("before the crash").await?,
        "before the crash"
    );

    let killed = env.kill_provider();
    ensure!(killed > 0, "no provider process found");
    // The host restarts the provider (after about 5 s) and replays the links.
    let mut again = tokio::time::timeout(Duration::from_secs(60), server.accept()).await??;
    assert_eq!(
        again.round_trip("after the crash").await?,
        "after the crash"
    );
    env.stop().await
}

/// A component with a target link (whose peer will stop reading) and a control link that
/// triggers a flood of publishes to the target and hears the outcome.
async fn flood_setup(
    env: &Env,
    id: &str,
    target: &Server,
    control: &Server,
    policy: &str,
) -> Result<()> {
    env.component_scaled("test_echo", id, 4).await?;
    env.link_consumer(id, "default", &[]).await?;
    let target_cfg = format!("{id}-target");
    let uri = target.uri();
    env.config(
        &target_cfg,
        &[
            ("URI", uri.as_str()),
            ("SLOW_CONSUMER", policy),
            ("WRITE_TIMEOUT_MS", "1000"),
            ("SEND_QUEUE_LEN", "8"),
        ],
    )
    .await?;
    let control_cfg = format!("{id}-control");
    env.config(&control_cfg, &[("URI", &control.uri())]).await?;
    env.link_handler(id, &target_cfg, &[&target_cfg]).await?;
    env.link_handler(id, &control_cfg, &[&control_cfg]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_stops_reading_is_closed_with_slow_consumer_close() -> Result<()> {
    let env = Env::start().await?;
    let (mut target, mut control) = (Server::start().await?, Server::start().await?);
    flood_setup(&env, "slowclose", &target, &control, "close").await?;
    let mut slow = target.accept().await?;
    let mut ctl = control.accept().await?;
    let subject = slow.round_trip("!whoami").await?;
    // From here on the target peer reads nothing.
    let answer = ctl
        .round_trip(&format!("!flood {subject} 4000 65536"))
        .await?;
    ensure!(
        answer.starts_with("FLOOD ") && answer.contains("ERR"),
        "{answer}"
    );
    ensure!(answer.contains("SLOW_CONSUMER=close"), "{answer}");
    // The slow socket was dropped; the link connects again and works.
    let mut fresh = target.accept().await?;
    assert_eq!(fresh.round_trip("caught up").await?, "caught up");
    drop(slow);
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_stops_reading_fails_publishes_with_slow_consumer_error() -> Result<()> {
    let env = Env::start().await?;
    let (mut target, mut control) = (Server::start().await?, Server::start().await?);
    flood_setup(&env, "slowerr", &target, &control, "error").await?;
    let mut slow = target.accept().await?;
    let mut ctl = control.accept().await?;
    let subject = slow.round_trip("!whoami").await?;
    let rss_before = env.provider_rss_kib().context("provider memory")?;
    ctl.send_text(&format!("!flood-all {subject} 300 262144"))
        .await?;
    let answer = match ctl.next_message(Duration::from_secs(120)).await? {
        Message::Text(text) => text.to_string(),
        other => bail!("expected the flood report, got {other:?}"),
    };
    let rss_after = env.provider_rss_kib().context("provider memory")?;
    eprintln!("flood report: {answer}; provider RSS {rss_before} KiB -> {rss_after} KiB");
    // Every one of the 300 publishes was either written or reported; 75 MiB were offered, and
    // only the bounded queue and write buffer were ever held.
    let words: Vec<&str> = answer.split_whitespace().collect();
    ensure!(words.first() == Some(&"FLOODALL"), "{answer}");
    let ok: usize = words.get(1).context("ok count")?.parse()?;
    let failed: usize = words.get(3).context("failed count")?.parse()?;
    ensure!(ok + failed == 300 && failed > 0, "{answer}");
    ensure!(
        rss_after.saturating_sub(rss_before) < 32 * 1024,
        "provider memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    ensure!(
        answer.contains("not reading") || answer.contains("is full"),
        "{answer}"
    );
    ensure!(!answer.contains("being closed"), "{answer}");
    // The socket stays: no reconnect, and the peer can still read what was written.
    target.expect_no_connection(Duration::from_secs(1)).await?;
    let first = slow.next_message(Duration::from_secs(10)).await?;
    ensure!(
        first.is_text() && first.len() == 262_144,
        "expected a flood frame of 256 KiB, got {} bytes",
        first.len()
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_resumes_after_nats_restarts_under_a_running_provider() -> Result<()> {
    let mut env = Env::start().await?;
    let mut server = Server::start().await?;
    client_link(&env, "natsy", &server, &[]).await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("before").await?, "before");

    env.nats.restart(Duration::from_secs(1)).await?;
    // The WebSocket stays up; once the host and provider are back on NATS, messages flow again.
    let mut answer = None;
    for _ in 0..30 {
        peer.send_text("after").await?;
        if let Ok(Message::Text(text)) = peer.next_message(Duration::from_secs(2)).await {
            answer = Some(text.to_string());
            break;
        }
    }
    assert_eq!(answer.as_deref(), Some("after"));
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_or_trapping_handler_does_not_stop_the_session() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    client_link(&env, "faulty", &server, &[]).await?;
    let mut peer = server.accept().await?;
    peer.send_text("!fail").await?;
    peer.send_text("!trap").await?;
    // Both are logged and counted by the provider; the next message is delivered as usual.
    assert_eq!(
        peer.round_trip("after the failures").await?,
        "after the failures"
    );
    peer.expect_silence(QUIET).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_session_whose_peer_never_answers_pings_is_closed() -> Result<()> {
    let env = Env::start().await?;
    env.component("test_echo", "pinged").await?;
    env.link_consumer("pinged", "default", &[]).await?;
    env.link_sessions("pinged").await?;
    let address = format!("127.0.0.1:{}", free_port()?);
    env.config(
        "pinged-cfg",
        &[
            ("MODE", "server"),
            ("LISTEN_ADDRESS", &address),
            ("PING_INTERVAL_SEC", "1"),
            // Generous: the watcher below shares this process with the host, whose component
            // compiles can keep it from answering a ping for a second or two under CI load.
            ("PONG_TIMEOUT_SEC", "4"),
        ],
    )
    .await?;
    env.link_handler("pinged", "pinged-server", &["pinged-cfg"])
        .await?;
    let url = format!("ws://{address}");
    let mut watcher = common::eventually(Duration::from_secs(15), || connect(&url, &[])).await?;
    // This client never reads again after the upgrade, so it never answers a ping.
    let _silent = connect(&url, &[]).await?;
    assert_eq!(
        watcher.round_trip("!list").await?.lines().next(),
        Some("LIST 2")
    );
    // The watcher reads (and so answers pings); the silent one is dropped within the bound.
    let mut last = String::new();
    for _ in 0..80 {
        last = watcher.round_trip("!list").await?;
        if last.starts_with("LIST 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(last.starts_with("LIST 1"), "{last}");
    env.stop().await
}

/// A link put that comes while the provider's process is starting reaches nobody (the host sends
/// it once; wadm deploys a provider and its links at the same moment). The provider applies the
/// links the host stored that it never received: the client link connects and its frames reach
/// the component, on one connection.
#[tokio::test(flavor = "multi_thread")]
async fn links_the_host_stored_but_never_delivered_are_applied() -> Result<()> {
    let env = Env::start_bare().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "late").await?;
    env.config(
        "late-cfg",
        &[("URI", &server.uri()), ("SUBJECT", "ws.late")],
    )
    .await?;
    env.link_consumer("late", "default", &[]).await?;
    env.link_handler("late", "late-handler", &["late-cfg"])
        .await?;
    // No provider ran when the links were put: the host delivered them to nobody.
    let _provider = env.start_provider_without_links().await?;
    let mut peer = server.accept().await?;
    assert_eq!(
        peer.round_trip("after a lost put").await?,
        "after a lost put"
    );
    // The echo's publish went through the caught-up consumer link, on the same socket.
    assert_eq!(peer.round_trip("!plain and back").await?, "and back");
    server.expect_no_connection(QUIET).await?;
    env.stop().await
}

/// The host's late put of a link the provider already applied from the host's store changes
/// nothing: a server link is not restarted under its clients. (With two handler links to one
/// component, the SDK's own duplicate check remembers only the last one applied.)
#[tokio::test(flavor = "multi_thread")]
async fn a_late_put_of_a_caught_up_server_link_does_not_restart_it() -> Result<()> {
    let env = Env::start_bare().await?;
    let mut server = Server::start().await?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let server_config = [("MODE", "server"), ("LISTEN_ADDRESS", listen.as_str())];
    env.component("test_echo", "late").await?;
    env.config("late-server", &server_config).await?;
    env.config("late-client", &[("URI", &server.uri())]).await?;
    env.link_consumer("late", "default", &[]).await?;
    // In this order the SDK's record of the component's links ends with the client link.
    env.link_handler("late", "late-server", &["late-server"])
        .await?;
    env.link_handler("late", "late-client", &["late-client"])
        .await?;
    let _provider = env.start_provider_without_links().await?;
    let url = format!("ws://{listen}/");
    common::wait_listening(&url).await?;
    let _client_link = server.accept().await?;
    let mut peer = connect(&url, &[]).await?;
    assert_eq!(peer.round_trip("before").await?, "before");

    // The host's put of the server link comes late, then a put of another link: the provider
    // applies puts in order, so once the other one listens, the late one was handled.
    let put = |name: &str, config: &[(&str, &str)]| -> Result<Vec<u8>> {
        let config: std::collections::HashMap<&str, &str> = config.iter().copied().collect();
        Ok(serde_json::to_vec(&serde_json::json!({
            "source_id": common::PROVIDER_ID, "target": "late", "name": name,
            "wit_namespace": "wasmcloud", "wit_package": "messaging", "interfaces": ["handler"],
            "source_config": config, "target_config": {}
        }))?)
    };
    let subject = format!(
        "wasmbus.rpc.{}.{}.linkdefs.put",
        common::LATTICE,
        common::PROVIDER_ID
    );
    env.client
        .publish(subject.clone(), put("late-server", &server_config)?.into())
        .await?;
    let other = format!("127.0.0.1:{}", free_port()?);
    env.client
        .publish(
            subject,
            put(
                "late-other",
                &[("MODE", "server"), ("LISTEN_ADDRESS", &other)],
            )?
            .into(),
        )
        .await?;
    common::wait_listening(&format!("ws://{other}/")).await?;

    // The first server link kept its client, and nothing closed it.
    assert_eq!(peer.round_trip("after").await?, "after");
    peer.expect_silence(QUIET).await?;
    env.stop().await
}
