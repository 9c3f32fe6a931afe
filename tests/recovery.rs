//! Recovery under a real host (`RECOVERY=true`, `FORMAT=json`): every message to a session is
//! numbered and kept in JetStream; a client cut off the network (TCP dropped, not closed) comes
//! back with its resume token and last `seq` and gets what it missed, in order, then live
//! messages, under the same session with its metadata and groups; after expiry it gets a new
//! session and `recovered: false`; a forged, reused or concurrently used token is refused.

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use common::ws::{connect, ClientPeer, Server};
use common::{eventually, Blackhole, Env};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The first frame of a connection: `{"session": {...}}`.
async fn welcome(peer: &mut ClientPeer) -> Result<Value> {
    let frame = peer.recv_json().await?;
    frame
        .get("session")
        .cloned()
        .with_context(|| format!("the first frame is not the session frame: {frame}"))
}

/// Connects to `url` and reads the session frame: the peer, its session ID and resume token.
async fn open_session(url: &str) -> Result<(ClientPeer, Value, String, String)> {
    let mut peer = connect(&format!("{url}/"), &[]).await?;
    let first = welcome(&mut peer).await?;
    let id = first["id"].as_str().context("session id")?.to_string();
    let token = first["token"].as_str().context("token")?.to_string();
    Ok((peer, first, id, token))
}

/// Sends a command envelope and returns the body of the answer (and checks its `seq`).
async fn command(peer: &mut ClientPeer, text: &str) -> Result<String> {
    let answer = peer.command_envelope(text).await?;
    ensure!(answer["seq"].is_u64(), "a message without seq: {answer}");
    Ok(answer["body"].as_str().unwrap_or_default().to_string())
}

/// Connects with `query` and expects the refusal: an error frame, then a close frame.
async fn refused(url: &str, query: &str) -> Result<(String, u16)> {
    let mut peer = connect(&format!("{url}/?{query}"), &[]).await?;
    let error = peer.recv_json().await?;
    let code = error["error"]["code"]
        .as_str()
        .with_context(|| format!("not an error frame: {error}"))?
        .to_string();
    match peer.next_message(Duration::from_secs(10)).await? {
        Message::Close(Some(close)) => Ok((code, u16::from(close.code))),
        other => bail!("expected a close frame, got {other:?}"),
    }
}

/// Reads the monitor's lifecycle lines until one with `subject` about `session`.
async fn lifecycle(monitor: &mut common::ws::Peer, subject: &str, session: &str) -> Result<Value> {
    loop {
        let line = monitor.recv_text().await?;
        let Some(body) = line.strip_prefix(&format!("{subject} ")) else {
            continue;
        };
        let event: Value = serde_json::from_str(body)?;
        if event["session"] == session {
            return Ok(event);
        }
    }
}

/// A server link with recovery, lifecycle events reported to a monitor connection.
async fn recovering_link(
    env: &Env,
    id: &str,
    extra: &[(&str, &str)],
) -> Result<(String, common::ws::Peer)> {
    let mut monitor_server = Server::start().await?;
    env.config(
        &format!("{id}-monitor-cfg"),
        &[("URI", &monitor_server.uri())],
    )
    .await?;
    let mut pairs = vec![
        ("FORMAT", "json"),
        ("RECOVERY", "true"),
        ("LIFECYCLE_EVENTS", "true"),
    ];
    pairs.extend_from_slice(extra);
    let url = env.serve(id, &format!("{id}-server"), &pairs).await?;
    env.link_handler(
        id,
        &format!("{id}-monitor"),
        &[&format!("{id}-monitor-cfg")],
    )
    .await?;
    let monitor = monitor_server.accept().await?;
    Ok((url, monitor))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_client_resumes_and_gets_every_missed_message_in_order() -> Result<()> {
    let env = Env::start().await?;
    let (url, mut monitor) = recovering_link(&env, "rec", &[("HISTORY_SIZE", "100")]).await?;
    let proxy = Blackhole::start(&url).await?;

    let (mut victim, first, id, token) = open_session(&proxy.url).await?;
    assert_eq!(
        (first["seq"].clone(), first["resumed"].clone()),
        (json!(0), json!(false))
    );
    let connected = lifecycle(&mut monitor, "ws.lifecycle.connected", &id).await?;
    assert_eq!(connected["resumed"], false);

    let mut controller = connect(&format!("{url}/"), &[]).await?;
    welcome(&mut controller).await?;
    assert_eq!(
        command(&mut controller, &format!("!join {id} room")).await?,
        "JOINED"
    );
    assert_eq!(
        command(&mut controller, &format!("!meta-set {id} name alice")).await?,
        "OK"
    );
    // One message before the cut: the victim has seen seq 1.
    victim
        .send_json(json!({"subject": "chat", "body": "before"}))
        .await?;
    let echo = victim.recv_json().await?;
    assert_eq!(
        (echo["seq"].clone(), echo["body"].clone()),
        (json!(1), json!("before"))
    );

    // The network drops: nothing passes, nothing is closed. 100 messages are sent meanwhile,
    // to the session and to its group, and each send succeeds.
    proxy.cut();
    let expected = controller.send_direct_and_to_room(&id, 50).await?;

    // The client comes back (another route) with its token and the last seq it saw.
    let mut resumed = connect(&format!("{url}/?resume={token}&last_seq=1"), &[]).await?;
    let again = welcome(&mut resumed).await?;
    assert_eq!(again["id"], id.as_str(), "the same session: {again}");
    assert_eq!(again["resumed"], true, "{again}");
    assert_eq!(again["recovered"], true, "{again}");
    assert_eq!(again["missed"], 100, "{again}");
    assert_eq!(again["seq"], 101, "{again}");
    let token2 = again["token"].as_str().context("new token")?.to_string();
    ensure!(token2 != token, "each connection gets a new token");
    for (i, body) in expected.iter().enumerate() {
        let message = resumed.recv_json().await?;
        assert_eq!(message["seq"], json!(i as u64 + 2), "{message}");
        assert_eq!(message["body"], body.as_str(), "{message}");
    }
    let event = lifecycle(&mut monitor, "ws.lifecycle.connected", &id).await?;
    assert_eq!(
        (event["resumed"].clone(), event["recovered"].clone()),
        (json!(true), json!(true))
    );

    // Then live messages, numbered on; the session kept its metadata and its group.
    assert_eq!(
        command(&mut controller, &format!("!send {id} live")).await?,
        "SENT"
    );
    let live = resumed.recv_json().await?;
    assert_eq!(
        (live["seq"].clone(), live["body"].clone()),
        (json!(102), json!("live"))
    );
    let info = command(&mut controller, &format!("!get {id}")).await?;
    ensure!(
        info.starts_with(&format!("INFO {id}|rec-server|")),
        "{info}"
    );
    ensure!(info.ends_with("|true|name=alice"), "{info}");
    let members = command(&mut controller, "!members room").await?;
    assert_eq!(members, format!("MEMBERS {id}"));
    resumed.expect_silence(Duration::from_millis(500)).await?;

    // The used token, a forged one and one for another link are refused.
    let (code, close) = refused(&url, &format!("resume={token}&last_seq=0")).await?;
    assert_eq!((code.as_str(), close), ("resume_refused", 4403));
    let mut forged = token2.clone().into_bytes();
    let last = forged.len() - 3;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged)?;
    let (code, close) = refused(&url, &format!("resume={forged}&last_seq=0")).await?;
    assert_eq!((code.as_str(), close), ("resume_refused", 4403));
    let (code, _) = refused(&url, "resume=not-a-token").await?;
    assert_eq!(code, "resume_refused");

    // The current token, presented while its client is connected (and answers pings): refused,
    // so that two clients never hold one session.
    let stolen_query = format!("resume={token2}&last_seq=0");
    let (stolen, quiet) = tokio::join!(
        refused(&url, &stolen_query),
        resumed.expect_silence(Duration::from_secs(6)),
    );
    assert_eq!(stolen?, ("session_in_use".to_string(), 4409));
    quiet?;
    assert_eq!(
        command(&mut controller, &format!("!send {id} still here")).await?,
        "SENT"
    );
    assert_eq!(resumed.recv_json().await?["body"], "still here");

    // A client that has missed more than HISTORY_SIZE gets its session back, told that the
    // gap could not be filled. (The connected client stops reading: it no longer answers.)
    let mut behind = connect(&format!("{url}/?resume={token2}&last_seq=0"), &[]).await?;
    let gap = welcome(&mut behind).await?;
    assert_eq!(gap["id"], id.as_str(), "{gap}");
    assert_eq!(
        (gap["resumed"].clone(), gap["recovered"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(gap["reason"], "too_long", "{gap}");
    assert_eq!(
        command(&mut controller, &format!("!send {id} after the gap")).await?,
        "SENT"
    );
    let next = behind.recv_json().await?;
    assert_eq!(
        (next["seq"].clone(), next["body"].clone()),
        (json!(104), json!("after the gap"))
    );
    drop(resumed);
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn after_expiry_a_token_gives_a_new_session_told_it_was_not_recovered() -> Result<()> {
    let env = Env::start().await?;
    // The provider notices the dead peer after about 2 s, then waits 2 s for it to come back.
    let (url, mut monitor) = recovering_link(
        &env,
        "exp",
        &[
            ("HISTORY_TTL_SEC", "2"),
            ("PING_INTERVAL_SEC", "1"),
            ("PONG_TIMEOUT_SEC", "1"),
        ],
    )
    .await?;
    let proxy = Blackhole::start(&url).await?;
    let (_victim, _, id, token) = open_session(&proxy.url).await?;

    proxy.cut();
    let dropped = lifecycle(&mut monitor, "ws.lifecycle.disconnected", &id).await?;
    assert_eq!(dropped["resumable"], true, "{dropped}");
    // While it waits for its client, a send to it is kept, not refused. (Controllers connect
    // when needed: a test client answers the 1 s pings only while it is read.)
    let mut controller = connect(&format!("{url}/"), &[]).await?;
    welcome(&mut controller).await?;
    assert_eq!(
        command(&mut controller, &format!("!send {id} kept")).await?,
        "SENT"
    );
    drop(controller);
    lifecycle(&mut monitor, "ws.lifecycle.expired", &id).await?;
    // The expired event is the session's farewell: it is gone by then.
    let mut controller = connect(&format!("{url}/"), &[]).await?;
    welcome(&mut controller).await?;
    let answer = command(&mut controller, &format!("!get {id}")).await?;
    ensure!(answer.contains("unknown session"), "{answer}");

    let mut late = connect(&format!("{url}/?resume={token}&last_seq=0"), &[]).await?;
    let fresh = welcome(&mut late).await?;
    ensure!(fresh["id"] != id.as_str(), "a new session: {fresh}");
    assert_eq!(fresh["resumed"], false, "{fresh}");
    assert_eq!(fresh["recovered"], false, "{fresh}");
    assert_eq!(fresh["reason"], "expired", "{fresh}");
    assert_eq!(fresh["seq"], 0, "{fresh}");
    let new_id = fresh["id"].as_str().context("id")?.to_string();
    // The echo first: this client answers the 1 s pings only while it is read.
    late.send_json(json!({"subject": "chat", "body": "hello again"}))
        .await?;
    let echo = late.recv_json().await?;
    assert_eq!(
        (echo["seq"].clone(), echo["body"].clone()),
        (json!(1), json!("hello again"))
    );
    let connected = lifecycle(&mut monitor, "ws.lifecycle.connected", &new_id).await?;
    assert_eq!(
        (connected["resumed"].clone(), connected["recovered"].clone()),
        (json!(false), json!(false))
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_closes_ends_its_session_and_recovery_needs_json() -> Result<()> {
    let env = Env::start().await?;
    let (url, mut monitor) = recovering_link(&env, "bye", &[]).await?;
    let (mut client, _, id, token) = open_session(&url).await?;
    client.ws.close(None).await?;
    let gone = lifecycle(&mut monitor, "ws.lifecycle.disconnected", &id).await?;
    assert_eq!(gone["resumable"], false, "{gone}");
    // A clean close ends the session: its token finds nothing to resume.
    let mut again = connect(&format!("{url}/?resume={token}&last_seq=0"), &[]).await?;
    let fresh = welcome(&mut again).await?;
    assert_eq!(
        (fresh["resumed"].clone(), fresh["reason"].clone()),
        (json!(false), json!("expired"))
    );

    // A session closed through the session API ends too, even with the code a moving client
    // uses (4000): its client answers the close, and nothing waits for a resume.
    let other = fresh["id"].as_str().context("session id")?.to_string();
    let mut controller = connect(&format!("{url}/"), &[]).await?;
    welcome(&mut controller).await?;
    assert_eq!(
        command(&mut controller, &format!("!close {other} 4000 moving")).await?,
        "CLOSED"
    );
    match again.next_message(Duration::from_secs(10)).await? {
        Message::Close(Some(close)) => assert_eq!(u16::from(close.code), 4000),
        other => bail!("expected a close frame, got {other:?}"),
    }
    let ended = lifecycle(&mut monitor, "ws.lifecycle.disconnected", &other).await?;
    assert_eq!(ended["resumable"], false, "{ended}");

    // RECOVERY without FORMAT=json is refused, naming the key (health says so).
    env.config(
        "raw-cfg",
        &[
            ("MODE", "server"),
            (
                "LISTEN_ADDRESS",
                &format!("127.0.0.1:{}", common::free_port()?),
            ),
            ("RECOVERY", "true"),
        ],
    )
    .await?;
    env.link_handler("bye", "raw-server", &["raw-cfg"]).await?;
    eventually(Duration::from_secs(15), || async {
        let (_, message) = env.health().await?;
        let message = message.unwrap_or_default();
        ensure!(
            message.contains("RECOVERY") && message.contains("FORMAT=json"),
            "{message}"
        );
        Ok(())
    })
    .await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_link_keeps_what_is_published_while_it_is_down_and_writes_it_in_order(
) -> Result<()> {
    let env = Env::start().await?;
    let port = common::free_port()?;
    let mut target = Server::start_on(port).await?;
    let mut trigger = Server::start().await?;
    env.component_scaled("test_echo", "keep", 4).await?;
    env.link_consumer("keep", "default", &[]).await?;
    let uri = target.uri();
    env.config(
        "keep-target",
        &[
            ("URI", uri.as_str()),
            ("FORMAT", "json"),
            ("RECOVERY", "true"),
            ("HISTORY_SIZE", "50"),
            ("RECONNECT_MIN_MS", "50"),
            ("RECONNECT_MAX_MS", "200"),
            ("PUBLISH_WAIT_MS", "100"),
        ],
    )
    .await?;
    env.config("keep-trigger", &[("URI", &trigger.uri())])
        .await?;
    env.link_handler("keep", "keep-target", &["keep-target"])
        .await?;
    env.link_handler("keep", "keep-trigger", &["keep-trigger"])
        .await?;
    let mut peer = target.accept().await?;
    let mut control = trigger.accept().await?;
    peer.send_json(json!({"subject": "who", "body": "!whoami"}))
        .await?;
    let subject = peer.recv_json().await?["body"]
        .as_str()
        .context("whoami")?
        .to_string();

    // The server goes away: publishes are kept (not failed after PUBLISH_WAIT_MS), up to
    // HISTORY_SIZE; beyond it each one fails with an error that says so.
    drop(peer);
    drop(target);
    eventually(Duration::from_secs(20), || async {
        let (_, message) = env.health().await?;
        let message = message.unwrap_or_default();
        ensure!(message.contains("\"keep-target\""), "health: {message:?}");
        Ok(())
    })
    .await?;
    for i in 0..55 {
        control.send_text(&format!("!to {subject} k{i}")).await?;
    }
    // Handled in order (one call at a time): `!whoami` answers after the 55 publishes.
    control.send_text("!whoami").await?;
    let mut errors = Vec::new();
    loop {
        let line = control.recv_text().await?;
        if line.starts_with("ws.session.") {
            break;
        }
        errors.push(line);
    }
    assert_eq!(errors.len(), 5, "the 5 over HISTORY_SIZE fail: {errors:?}");
    for e in &errors {
        ensure!(e.contains("HISTORY_SIZE (50)"), "{e}");
    }

    // Back: the 50 kept messages arrive in order, then live ones.
    let mut target = Server::start_on(port).await?;
    let mut peer = target.accept().await?;
    for i in 0..50 {
        let message = peer.recv_json().await?;
        assert_eq!(message["body"], format!("k{i}"), "{message}");
        assert_eq!(message["subject"], subject.as_str(), "{message}");
    }
    control.send_text(&format!("!to {subject} live")).await?;
    assert_eq!(peer.recv_json().await?["body"], "live");
    peer.expect_silence(Duration::from_millis(700)).await?;
    control.expect_silence(Duration::from_millis(200)).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_closed_and_resumes_without_a_gap() -> Result<()> {
    let env = Env::start().await?;
    let (url, mut monitor) = recovering_link(&env, "slow", &[("SEND_QUEUE_LEN", "8")]).await?;
    let proxy = Blackhole::start(&url).await?;
    let (_victim, _, id, token) = open_session(&proxy.url).await?;

    // Nothing is read any more: 300 messages of 16 KiB fill the socket's buffers and its queue
    // of 8. Every publish succeeds (written or kept), and the socket is closed as slow.
    proxy.cut();
    let mut controller = connect(&format!("{url}/"), &[]).await?;
    welcome(&mut controller).await?;
    let flood = command(
        &mut controller,
        &format!("!flood ws.session.{id} 300 16384"),
    )
    .await?;
    assert_eq!(flood, "FLOOD 300 OK");
    let dropped = lifecycle(&mut monitor, "ws.lifecycle.disconnected", &id).await?;
    assert_eq!(
        (dropped["code"].clone(), dropped["resumable"].clone()),
        (json!(1008), json!(true))
    );

    let mut resumed = connect(&format!("{url}/?resume={token}&last_seq=0"), &[]).await?;
    let again = welcome(&mut resumed).await?;
    assert_eq!(again["id"], id.as_str(), "{again}");
    assert_eq!(
        (again["recovered"].clone(), again["missed"].clone()),
        (json!(true), json!(300))
    );
    for seq in 1..=300u64 {
        let message = resumed.recv_json().await?;
        assert_eq!(message["seq"], json!(seq), "every message once, in order");
        assert_eq!(message["body"].as_str().map(str::len), Some(16384));
    }
    resumed.expect_silence(Duration::from_millis(500)).await?;
    env.stop().await
}
