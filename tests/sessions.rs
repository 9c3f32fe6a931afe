//! The session API, the JSON envelope and request-reply, under a real host with real peers.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use common::ws::{Peer, Server};
use common::{Env, LATTICE, PROVIDER_ID};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SILENCE: Duration = Duration::from_millis(700);

mod client {
    wit_bindgen_wrpc::generate!({ world: "client", path: "tests/wit", generate_all });
}

/// One handler link: its name, the server it connects to, and extra config pairs.
type LinkSpec<'a> = (&'a str, &'a mut Server, &'a [(&'a str, &'a str)]);

/// Starts the test component `id` with the session API linked and one handler link per
/// `(link name, server, extra config)`; returns one connected peer per link, in order.
async fn component_with_links(
    env: &Env,
    id: &str,
    links: &mut [LinkSpec<'_>],
) -> Result<Vec<Peer>> {
    env.component("test_echo", id).await?;
    env.link_consumer(id, "default", &[]).await?;
    env.link_sessions(id).await?;
    let mut peers = Vec::new();
    for (link, server, extra) in links.iter_mut() {
        let config = format!("{link}-cfg");
        let uri = server.uri();
        let mut pairs = vec![("URI", uri.as_str())];
        pairs.extend(extra.iter().copied());
        env.config(&config, &pairs).await?;
        env.link_handler(id, link, &[&config]).await?;
        peers.push(server.accept().await?);
    }
    Ok(peers)
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_sending_and_broadcast_see_only_the_callers_sessions() -> Result<()> {
    let env = Env::start().await?;
    let (mut s1, mut s2, mut s3) = (
        Server::start().await?,
        Server::start().await?,
        Server::start().await?,
    );
    let mut owner = component_with_links(
        &env,
        "owner",
        &mut [("owner-a", &mut s1, &[]), ("owner-b", &mut s2, &[])],
    )
    .await?;
    let mut other = component_with_links(&env, "other", &mut [("other-a", &mut s3, &[])]).await?;
    let (a, b) = (owner[0].session_id().await?, owner[1].session_id().await?);
    let c = other[0].session_id().await?;

    let listing = owner[0].round_trip("!list").await?;
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines[0], "LIST 2", "{listing}");
    let mut expected = vec![
        format!("{a}|owner-a|{}|true|", s1.uri()),
        format!("{b}|owner-b|{}|true|", s2.uri()),
    ];
    expected.sort();
    assert_eq!(lines[1..].to_vec(), expected);
    assert_eq!(
        other[0].round_trip("!list").await?,
        format!("LIST 1\n{c}|other-a|{}|true|", s3.uri())
    );

    // send-to-session reaches only that socket.
    assert_eq!(
        owner[0]
            .round_trip(&format!("!send {b} just for b"))
            .await?,
        "SENT"
    );
    assert_eq!(owner[1].recv_text().await?, "just for b");
    other[0].expect_silence(SILENCE).await?;

    // broadcast reaches every session of the caller, and no other.
    owner[1].send_text("!broadcast to all of owner").await?;
    let mut got_b = vec![owner[1].recv_text().await?, owner[1].recv_text().await?];
    got_b.sort();
    assert_eq!(got_b, ["BROADCAST 2", "to all of owner"]);
    assert_eq!(owner[0].recv_text().await?, "to all of owner");
    other[0].expect_silence(SILENCE).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn another_component_cannot_see_send_to_tag_or_close_a_session() -> Result<()> {
    let env = Env::start().await?;
    let (mut s1, mut s2) = (Server::start().await?, Server::start().await?);
    let mut owner = component_with_links(&env, "victim", &mut [("victim-h", &mut s1, &[])]).await?;
    let mut intruder =
        component_with_links(&env, "intruder", &mut [("intruder-h", &mut s2, &[])]).await?;
    let id = owner[0].session_id().await?;
    let unknown = format!("ERR unknown session {id}");

    for command in [
        format!("!get {id}"),
        format!("!send {id} hello"),
        format!("!meta-set {id} k v"),
        format!("!meta-get {id} k"),
        format!("!meta-del {id} k"),
        format!("!close {id} 4000 bye"),
        format!("!to ws.session.{id} hello"),
    ] {
        assert_eq!(
            intruder[0].round_trip(&command).await?,
            unknown,
            "{command}"
        );
    }
    // A made-up ID gets the very same answer.
    let made_up = "00000000-0000-4000-8000-000000000000";
    assert_eq!(
        intruder[0].round_trip(&format!("!get {made_up}")).await?,
        format!("ERR unknown session {made_up}")
    );
    owner[0].expect_silence(SILENCE).await?;
    assert_eq!(
        owner[0].round_trip(&format!("!meta-get {id} k")).await?,
        "META none"
    );
    assert_eq!(owner[0].round_trip("still open").await?, "still open");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_round_trips_and_disappears_with_the_session() -> Result<()> {
    let env = Env::start().await?;
    let (mut s1, mut s2) = (Server::start().await?, Server::start().await?);
    let mut peers = component_with_links(
        &env,
        "meta",
        &mut [("meta-a", &mut s1, &[]), ("meta-b", &mut s2, &[])],
    )
    .await?;
    let b = peers[1].session_id().await?;
    let a = &mut peers[0];
    assert_eq!(
        a.round_trip(&format!("!meta-set {b} user ada")).await?,
        "OK"
    );
    assert_eq!(
        a.round_trip(&format!("!meta-set {b} room lobby")).await?,
        "OK"
    );
    assert_eq!(
        a.round_trip(&format!("!meta-get {b} user")).await?,
        "META ada"
    );
    assert_eq!(
        a.round_trip(&format!("!get {b}")).await?,
        format!("INFO {b}|meta-b|{}|true|room=lobby,user=ada", s2.uri())
    );
    assert_eq!(a.round_trip(&format!("!meta-del {b} user")).await?, "OK");
    assert_eq!(
        a.round_trip(&format!("!meta-get {b} user")).await?,
        "META none"
    );
    let too_big = "x".repeat(5000);
    let answer = a
        .round_trip(&format!("!meta-set {b} big {too_big}"))
        .await?;
    ensure!(
        answer.starts_with("ERR metadata values must be at most 4096 bytes"),
        "{answer}"
    );

    // Deleting the link ends the session; its metadata goes with it.
    env.unlink_handler("meta-b").await?;
    let gone = format!("ERR unknown session {b}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = peers[0].round_trip(&format!("!meta-get {b} room")).await?;
        if answer == gone {
            break;
        }
        ensure!(Instant::now() < deadline, "session still there: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn close_delivers_code_and_reason_and_the_link_reconnects_under_the_same_id() -> Result<()> {
    let env = Env::start().await?;
    let (mut s1, mut s2) = (Server::start().await?, Server::start().await?);
    let mut peers = component_with_links(
        &env,
        "closer",
        &mut [
            ("closer-a", &mut s1, &[]),
            ("closer-b", &mut s2, &[("RECONNECT_MIN_MS", "50")]),
        ],
    )
    .await?;
    let b = peers[1].session_id().await?;
    let answer = peers[0].round_trip("!close nope 4000 x").await?;
    ensure!(answer.starts_with("ERR unknown session"), "{answer}");
    let answer = peers[0].round_trip(&format!("!close {b} 1006 x")).await?;
    ensure!(
        answer.starts_with("ERR close code 1006 is not allowed"),
        "{answer}"
    );

    assert_eq!(
        peers[0]
            .round_trip(&format!("!close {b} 4001 see you later"))
            .await?,
        "CLOSED"
    );
    match peers[1].next_message(Duration::from_secs(10)).await? {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4001);
            assert_eq!(frame.reason.as_str(), "see you later");
        }
        other => bail!("expected a close frame, got {other:?}"),
    }
    // The link still exists, so the provider connects again, keeping the session ID.
    let mut again = s2.accept().await?;
    assert_eq!(again.session_id().await?, b);
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn without_session_tracking_sessions_are_not_listed_or_addressable() -> Result<()> {
    let env = Env::start().await?;
    let mut s1 = Server::start().await?;
    let mut peers = component_with_links(
        &env,
        "untracked",
        &mut [(
            "untracked-h",
            &mut s1,
            &[("ENABLE_SESSION_TRACKING", "false")],
        )],
    )
    .await?;
    let peer = &mut peers[0];
    // No reply_to: the component answers on the plain subject, which still reaches the socket.
    assert_eq!(peer.round_trip("!whoami").await?, "");
    assert_eq!(peer.round_trip("!list").await?, "LIST 0");
    assert_eq!(
        peer.round_trip("link-level publish works").await?,
        "link-level publish works"
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn json_envelopes_carry_subject_reply_to_and_binary_bodies() -> Result<()> {
    let env = Env::start().await?;
    let mut s1 = Server::start().await?;
    let mut peers = component_with_links(
        &env,
        "json",
        &mut [("json-h", &mut s1, &[("FORMAT", "json")])],
    )
    .await?;
    let peer = &mut peers[0];

    // The peer's subject reaches the component.
    peer.send_json(json!({"subject": "chat.room1", "body": "!subject", "reply_to": "inbox.1"}))
        .await?;
    assert_eq!(
        peer.recv_json().await?,
        json!({"subject": "inbox.1", "body": "chat.room1"})
    );
    // The peer's reply_to reaches the component scoped to its session; a publish to it comes
    // back to this peer with the peer's own subject.
    peer.send_json(json!({"subject": "q", "body": "!whoami", "reply_to": "inbox.2"}))
        .await?;
    let answer = peer.recv_json().await?;
    assert_eq!(answer["subject"], "inbox.2");
    let scoped = answer["body"].as_str().context("body")?.to_string();
    ensure!(
        scoped.starts_with("ws.session.") && scoped.ends_with(".inbox.2"),
        "{scoped}"
    );
    // Binary bodies travel as base64 both ways.
    peer.send_json(json!({"subject": "bin", "body_base64": "AAEC/w==", "reply_to": "r"}))
        .await?;
    assert_eq!(
        peer.recv_json().await?,
        json!({"subject": "r", "body_base64": "AAEC/w=="})
    );
    // Without reply_to the answer goes to the session subject.
    peer.send_json(json!({"subject": "s", "body": "plain"}))
        .await?;
    let answer = peer.recv_json().await?;
    assert_eq!(answer["body"], "plain");
    ensure!(
        answer["subject"]
            .as_str()
            .is_some_and(|s| s.starts_with("ws.session.")),
        "{answer}"
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_envelopes_get_an_error_frame_and_the_session_keeps_working() -> Result<()> {
    let env = Env::start().await?;
    let (_server, mut peer) = json_peer(&env, "strict", &[]).await?;
    let peer = &mut peer;
    let cases = [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        (r#"{"body": "no subject"}"#, "subject is missing"),
        (
            r#"{"subject": 42, "body": "x"}"#,
            "subject must be a string",
        ),
        (
            r#"{"subject": "a", "body_base64": "%%%"}"#,
            "not valid base64",
        ),
        (r#"{"subject": "a", "body": 7}"#, "body must be a string"),
    ];
    for (frame, expected) in cases {
        peer.send_text(frame).await?;
        let error = peer.recv_json().await?;
        assert_eq!(error["error"]["code"], "invalid_envelope", "{frame}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        ensure!(message.contains(expected), "{frame}: {message}");
    }
    // A binary frame that is not JSON is refused the same way.
    peer.send_binary(vec![0xff, 0x00]).await?;
    assert_eq!(peer.recv_json().await?["error"]["code"], "invalid_envelope");
    peer.send_json(json!({"subject": "ok", "body": "after the errors", "reply_to": "r"}))
        .await?;
    assert_eq!(
        peer.recv_json().await?,
        json!({"subject": "r", "body": "after the errors"})
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_request_gets_the_peers_reply() -> Result<()> {
    let env = Env::start().await?;
    let (mut s1, mut s2) = (Server::start().await?, Server::start().await?);
    let mut peers = component_with_links(
        &env,
        "asker",
        &mut [("asker-h", &mut s1, &[("FORMAT", "json")])],
    )
    .await?;
    let peer = &mut peers[0];
    peer.send_json(json!({"subject": "go", "body": "!request time.now 5000 what time is it", "reply_to": "out"}))
        .await?;
    // The request arrives as an envelope with a fresh inbox...
    let request = peer.recv_json().await?;
    assert_eq!(request["subject"], "time.now");
    assert_eq!(request["body"], "what time is it");
    let inbox = request["reply_to"]
        .as_str()
        .context("reply_to")?
        .to_string();
    ensure!(inbox.starts_with("_INBOX."), "{inbox}");
    // ...and the peer's answer to that inbox is the component's reply.
    peer.send_json(json!({"subject": inbox, "body": "noon"}))
        .await?;
    assert_eq!(
        peer.recv_json().await?,
        json!({"subject": "out", "body": format!("REPLY {inbox} noon")})
    );

    // In raw mode, request-reply is refused with a clear error.
    let mut raw = component_with_links(&env, "raw-asker", &mut [("raw-h", &mut s2, &[])]).await?;
    let answer = raw[0].round_trip("!request x 1000 hi").await?;
    ensure!(
        answer.contains("request-reply needs FORMAT=json"),
        "{answer}"
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_requests_resolve_independently_and_silence_times_out() -> Result<()> {
    use futures::{SinkExt, StreamExt};

    let env = Env::start().await?;
    let mut s1 = Server::start().await?;
    let peers = component_with_links(
        &env,
        "many",
        &mut [("many-h", &mut s1, &[("FORMAT", "json")])],
    )
    .await?;
    let peer = peers.into_iter().next().context("peer")?;

    // The peer answers each request with its own body reversed, in reverse arrival order, so
    // replies arrive in a different order from the requests.
    let responder = tokio::spawn(async move {
        let (mut tx, mut rx) = peer.ws.split();
        let mut pending = Vec::new();
        while let Some(Ok(Message::Text(text))) = rx.next().await {
            let request: serde_json::Value = serde_json::from_str(&text)?;
            if request["body"] == "nobody answers" {
                continue;
            }
            pending.push(request);
            if pending.len() == 100 {
                for request in pending.drain(..).rev() {
                    let body: String = request["body"]
                        .as_str()
                        .unwrap_or_default()
                        .chars()
                        .rev()
                        .collect();
                    let reply = json!({"subject": request["reply_to"], "body": body});
                    tx.send(Message::text(reply.to_string())).await?;
                }
            }
        }
        anyhow::Ok(())
    });

    // Call the provider's export over wRPC as the component `many` (the caller's source ID),
    // through the provider's own race-free client: the stock wrpc-transport-nats 0.29 client
    // can lose a reply under load, which would fail this test for a reason not its own.
    let invoker = wasmcloud_provider_messaging_websocket::wrpc::Invoker::new(
        env.client.clone(),
        LATTICE,
        "many",
    )
    .await?;
    let wrpc = invoker.component(PROVIDER_ID);
    let call = |body: String, timeout_ms: u32| {
        let wrpc = wrpc.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("link-name", "default");
            let body = bytes::Bytes::from(body);
            let request = client::wasmcloud::messaging::consumer::request(
                &wrpc,
                Some(headers),
                "calc",
                &body,
                timeout_ms,
            );
            // Bound the whole call, so a hang fails the test instead of stalling it.
            tokio::time::timeout(
                Duration::from_millis(u64::from(timeout_ms) + 10_000),
                request,
            )
            .await
            .map_err(|_| anyhow::anyhow!("wRPC call hung"))?
        }
    };
    let requests = (0..100).map(|i| call(format!("request-{i:03}"), 20_000));
    let replies = futures::future::join_all(requests).await;
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply?.map_err(|e| anyhow::anyhow!("request {i} failed: {e}"))?;
        let expected: String = format!("request-{i:03}").chars().rev().collect();
        assert_eq!(
            String::from_utf8_lossy(&reply.body),
            expected,
            "request {i}"
        );
        ensure!(reply.subject.starts_with("_INBOX."), "{}", reply.subject);
    }

    let started = Instant::now();
    let unanswered = call("nobody answers".into(), 1_000).await?;
    let waited = started.elapsed();
    let error = unanswered
        .err()
        .context("an unanswered request must fail")?;
    ensure!(error.contains("timed out after 1000 ms"), "{error}");
    ensure!(
        waited >= Duration::from_millis(1_000),
        "returned early: {waited:?}"
    );
    ensure!(waited < Duration::from_secs(6), "returned late: {waited:?}");
    responder.abort();
    env.stop().await
}

/// The provider's own wRPC client (`src/wrpc/client.rs`) calling the provider's own export
/// server (`src/wrpc/server.rs`) in a real provider over a real nats-server: a call without
/// parameters, a call with them, one whose parameters the server must collect after its accept
/// (1.5 MB), and a call to a component nobody serves, which fails at once (NATS "no
/// responders") instead of hanging.
#[tokio::test(flavor = "multi_thread")]
async fn race_free_client_calls_with_and_without_parameters_and_fails_fast_without_a_server(
) -> Result<()> {
    use client::wasmcloud::messaging::consumer;
    use client::wasmcloud::messaging::types::BrokerMessage;
    use client::wasmcloud_websocket::provider::sessions;
    use wasmcloud_provider_messaging_websocket::wrpc::Invoker;

    let env = Env::start().await?;
    let invoker = Invoker::new(env.client.clone(), LATTICE, "caller").await?;
    let provider = invoker.component(PROVIDER_ID);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("link-name", "default");
    let bound = Duration::from_secs(10);

    // No parameter bytes at all: the end of the parameter stream is still sent.
    let listed = tokio::time::timeout(
        bound,
        sessions::list_sessions(&provider, Some(headers.clone())),
    )
    .await
    .context("list-sessions hung")??;
    assert_eq!(
        listed.map(|l| l.len()),
        Ok(0),
        "the caller owns no sessions"
    );

    // Parameters that fit in the first message: the provider's answer (this caller has no
    // connection to publish on).
    let msg = BrokerMessage {
        subject: "nowhere.at.all".into(),
        body: "x".into(),
        reply_to: None,
    };
    let published = tokio::time::timeout(
        bound,
        consumer::publish(&provider, Some(headers.clone()), &msg),
    )
    .await
    .context("publish hung")??;
    let error = published.expect_err("a caller with no connection is refused");
    ensure!(error.contains("no WebSocket connection"), "{error}");

    // Parameters larger than one NATS message (1 MiB): the rest follows the accept.
    let big = BrokerMessage {
        subject: "nowhere.at.all".into(),
        body: vec![b'x'; 1_500_000].into(),
        reply_to: None,
    };
    let published = tokio::time::timeout(bound, consumer::publish(&provider, Some(headers), &big))
        .await
        .context("publish of 1.5 MB hung")??;
    let error = published.expect_err("a caller with no connection is refused");
    ensure!(error.contains("no WebSocket connection"), "{error}");

    // Nobody serves this component: the call fails in well under the bound.
    let nobody = invoker.component("nobody-runs-this");
    let started = Instant::now();
    let result = tokio::time::timeout(bound, consumer::publish(&nobody, None, &msg))
        .await
        .context("a call to a missing component hung")?;
    let error = format!("{:#}", result.expect_err("no one answers"));
    ensure!(error.contains("no responders"), "{error}");
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // Every finished call is unregistered.
    assert_eq!(invoker.open_calls(), 0);
    env.stop().await
}

/// A JSON-envelope client link for the test component `id` with `extra` config; its peer.
async fn json_peer(env: &Env, id: &str, extra: &[(&str, &str)]) -> Result<(Server, Peer)> {
    let mut server = Server::start().await?;
    let link = format!("{id}-h");
    let mut config = vec![("FORMAT", "json")];
    config.extend(extra.iter().copied());
    let mut peers = component_with_links(env, id, &mut [(&link, &mut server, &config)]).await?;
    let peer = peers.pop().context("one peer")?;
    Ok((server, peer))
}

/// Sends `!request <subject> 60000 <subject>` envelopes, one per subject, to the component.
async fn send_requests(peer: &mut Peer, subjects: &[&str]) -> Result<()> {
    for subject in subjects {
        peer.send_json(json!({"subject": "go", "body": format!("!request {subject} 60000 {subject}"), "reply_to": "out"}))
            .await?;
    }
    Ok(())
}

/// Answers a request frame the component wrote (its body is its subject) with `<body>!`.
async fn answer(peer: &mut Peer, request: &serde_json::Value) -> Result<()> {
    let inbox = request["reply_to"].as_str().context("reply_to")?;
    let body = format!("{}!", request["body"].as_str().context("body")?);
    peer.send_json(json!({"subject": inbox, "body": body}))
        .await
}

/// What the component answers when its request got `answer`'s reply.
fn reply_of(request: &serde_json::Value) -> serde_json::Value {
    json!({"subject": "out", "body": format!("REPLY {} {}!",
        request["reply_to"].as_str().unwrap_or_default(), request["body"].as_str().unwrap_or_default())})
}

/// `MAX_IN_FLIGHT` left at its default (1): a session's `handle-message` calls run one at a
/// time in arrival order. Each message here makes the component send a request to the peer and
/// wait for the answer, so the frames on the socket show it: the second request is written
/// only after the first call has finished (its `REPLY` came first).
#[tokio::test(flavor = "multi_thread")]
async fn by_default_each_call_finishes_before_the_next_starts() -> Result<()> {
    let env = Env::start().await?;
    let mut s1 = Server::start().await?;
    let mut peers = component_with_links(
        &env,
        "strict",
        &mut [("strict-h", &mut s1, &[("FORMAT", "json")])],
    )
    .await?;
    let peer = &mut peers[0];
    send_requests(peer, &["first", "second"]).await?;
    let first = peer.recv_json().await?;
    assert_eq!(first["subject"], "first");
    answer(peer, &first).await?;
    assert_eq!(peer.recv_json().await?, reply_of(&first));
    let second = peer.recv_json().await?;
    assert_eq!(
        second["subject"], "second",
        "the second call started only now"
    );
    answer(peer, &second).await?;
    assert_eq!(peer.recv_json().await?, reply_of(&second));
    // Echoes stay in order too.
    for i in 0..50 {
        peer.send_json(json!({"subject": "go", "body": format!("echo-{i}"), "reply_to": "out"}))
            .await?;
    }
    for i in 0..50 {
        assert_eq!(
            peer.recv_json().await?,
            json!({"subject": "out", "body": format!("echo-{i}")})
        );
    }
    env.stop().await
}

/// `MAX_IN_FLIGHT=3`: three calls of one session run at once (all three requests reach the
/// peer before it answers any), a fourth waits for a free slot, and calls finish in whatever
/// order their work does (here, the order the peer answers in).
#[tokio::test(flavor = "multi_thread")]
async fn max_in_flight_runs_calls_of_one_session_at_once_up_to_the_limit() -> Result<()> {
    let env = Env::start().await?;
    let (_server, mut peer) = json_peer(&env, "wide", &[("MAX_IN_FLIGHT", "3")]).await?;
    let peer = &mut peer;
    send_requests(peer, &["q1", "q2", "q3", "q4"]).await?;
    // Calls start in arrival order and at most 3 run: the first three requests are q1-q3
    // (in any order: three component instances run them side by side).
    let mut running = Vec::new();
    for _ in 0..3 {
        running.push(peer.recv_json().await?);
    }
    let mut subjects: Vec<String> = running
        .iter()
        .map(|r| r["subject"].as_str().unwrap_or_default().to_string())
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["q1", "q2", "q3"]);
    // Answer the last one to arrive: its call finishes first, and q4 takes its slot.
    let done = running.pop().context("three requests")?;
    answer(peer, &done).await?;
    let mut next = [peer.recv_json().await?, peer.recv_json().await?];
    next.sort_by_key(|v| v["subject"].as_str().unwrap_or_default().to_string());
    assert_eq!(next[0], reply_of(&done));
    assert_eq!(next[1]["subject"], "q4");
    running.push(next[1].clone());
    // The rest finish in the order they are answered.
    for request in running.iter().rev() {
        answer(peer, request).await?;
        assert_eq!(peer.recv_json().await?, reply_of(request));
    }
    env.stop().await
}

/// With `MAX_IN_FLIGHT=2`, a call that never finishes (a request nobody answers) holds one
/// slot, and the session's later messages go on through the other, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_call_holds_one_slot_and_does_not_stall_the_session() -> Result<()> {
    let env = Env::start().await?;
    let (_server, mut peer) = json_peer(&env, "unstuck", &[("MAX_IN_FLIGHT", "2")]).await?;
    let peer = &mut peer;
    send_requests(peer, &["never-answered"]).await?;
    let hung = peer.recv_json().await?;
    assert_eq!(hung["subject"], "never-answered");
    for i in 0..20 {
        peer.send_json(json!({"subject": "go", "body": format!("after-{i}"), "reply_to": "out"}))
            .await?;
    }
    for i in 0..20 {
        assert_eq!(
            peer.recv_json().await?,
            json!({"subject": "out", "body": format!("after-{i}")}),
            "message {i} behind a hung call"
        );
    }
    env.stop().await
}

/// The next message of `sub`, within 10 s.
async fn next_of(sub: &mut async_nats::Subscriber, what: &str) -> Result<async_nats::Message> {
    use futures::StreamExt as _;
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .with_context(|| format!("{what} did not come"))?
        .with_context(|| format!("subscription ended before {what}"))
}

/// The subject the provider serves `<instance>.<func>` on.
fn export_subject(func: &str) -> String {
    wrpc_transport_nats::invocation_subject(
        &format!("{LATTICE}.{PROVIDER_ID}"),
        "wasmcloud-websocket:provider/sessions@0.1.0",
        func,
    )
}

/// A caller that misses the provider's accept (as a host on wrpc-transport-nats 0.29 may, when
/// its demux task drops the accept before it has subscribed) is not left waiting: the provider
/// sends the accept again, at growing intervals, until the caller's parameters arrive. The
/// results go out at once, but their end waits for the caller's end of parameters, and a
/// caller that subscribed to its results late (and so lost them) gets them again before that
/// end. Spoken as raw NATS messages.
#[tokio::test(flavor = "multi_thread")]
async fn a_missed_accept_is_sent_again_and_missed_results_are_sent_again() -> Result<()> {
    use futures::{FutureExt as _, StreamExt as _};
    let env = Env::start().await?;
    let nats = &env.client;
    let reply = nats.new_inbox();
    let mut accepts = nats.subscribe(reply.clone()).await?;
    // An observer that was subscribed to the results all along.
    let mut early = nats.subscribe(format!("{reply}.results")).await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("source-id", "raw-caller");
    headers.insert("link-name", "default");
    // get-session("nope"): every parameter byte is in the call itself, so the provider runs
    // the function at once.
    let params = bytes::Bytes::from_static(b"\x04nope");
    nats.publish_with_reply_and_headers(
        export_subject("get-session"),
        reply.clone(),
        headers,
        params,
    )
    .await?;
    let mut params_subject = None;
    for n in 1..=3 {
        let accept = next_of(&mut accepts, "an accept").await?;
        ensure!(accept.payload.is_empty(), "accept {n} is empty");
        let to = accept
            .reply
            .context("an accept names the parameter subject")?;
        if let Some(seen) = &params_subject {
            assert_eq!(seen, &to, "every accept names the same call");
        }
        params_subject = Some(to);
    }
    // result<session-info, string>: 1 = err, then the message.
    let is_answer = |m: &async_nats::Message| {
        m.payload.first() == Some(&1u8)
            && String::from_utf8_lossy(&m.payload).contains("unknown session nope")
    };
    let first = next_of(&mut early, "the results").await?;
    ensure!(is_answer(&first), "{:?}", first.payload);
    ensure!(
        early.next().now_or_never().is_none(),
        "the results ended before the caller ended its parameters"
    );
    // A caller whose results subscription comes only now, with its end of parameters.
    let mut late = nats.subscribe(format!("{reply}.results")).await?;
    let params_subject = params_subject.context("accepted")?;
    nats.publish(format!("{params_subject}.params"), bytes::Bytes::new())
        .await?;
    for sub in [&mut late, &mut early] {
        let again = next_of(sub, "the results again").await?;
        ensure!(is_answer(&again), "{:?}", again.payload);
        let end = next_of(sub, "the end of the results").await?;
        ensure!(end.payload.is_empty(), "results end with an empty message");
    }
    env.stop().await
}

/// The host's own client (wrpc-transport-nats 0.29, stock) given the accept twice: a caller
/// that is slow to read its accept sees the provider send it again (and its results twice,
/// since they may have been lost with the first accept). Both are harmless: the call's value
/// is read once and right, and the client's demux task (which a second accept could block
/// while the first is unread) goes on serving later calls.
#[tokio::test(flavor = "multi_thread")]
async fn the_stock_0_29_client_completes_once_when_it_gets_the_accept_twice() -> Result<()> {
    use client::wasmcloud_websocket::provider::sessions;
    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use wrpc_transport::Invoke as _;

    let env = Env::start().await?;
    let nats = &env.client;
    let stock =
        wrpc_transport_nats::Client::new(nats.clone(), format!("{LATTICE}.{PROVIDER_ID}"), None)
            .await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("source-id", "stock-caller");
    headers.insert("link-name", "default");
    // Every accept sent to any inbox: ours is the one that comes twice.
    let mut inboxes = nats.subscribe("_INBOX.>").await?;
    let paths: &[&[Option<usize>]] = &[];
    let (mut params, mut results) = stock
        .invoke(
            Some(headers.clone()),
            "wasmcloud-websocket:provider/sessions@0.1.0",
            "list-sessions",
            bytes::Bytes::new(),
            paths,
        )
        .await?;
    // Do not read the accept until the provider has sent it a second time.
    let mut seen = std::collections::HashMap::<String, u32>::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = inboxes.next().await {
            if message.payload.is_empty() && message.reply.is_some() {
                let count = seen.entry(message.subject.to_string()).or_default();
                *count += 1;
                if *count >= 2 {
                    return Ok(());
                }
            }
        }
        bail!("inbox subscription ended")
    })
    .await
    .context("the accept was not sent again")??;
    let bound = Duration::from_secs(10);
    tokio::time::timeout(bound, params.shutdown())
        .await
        .context("the parameter stream did not end")??;
    // result<list<session-info>, string>: ok (0), an empty list (0); a decoder reads this
    // one value and stops.
    let mut value = [9u8; 2];
    tokio::time::timeout(bound, results.read_exact(&mut value))
        .await
        .context("the results did not come")??;
    assert_eq!(value, [0u8, 0], "the call's value");
    // What follows before the end of the results is the same value again, or nothing.
    let mut rest = Vec::new();
    tokio::time::timeout(bound, results.read_to_end(&mut rest))
        .await
        .context("the results did not end")??;
    ensure!(rest.is_empty() || rest == [0u8, 0], "{rest:?}");
    drop((params, results));
    // The same client goes on: its demux is not stuck on the repeated accept.
    for _ in 0..20 {
        let listed = tokio::time::timeout(
            bound,
            sessions::list_sessions(&stock, Some(headers.clone())),
        )
        .await
        .context("a later call hung")??;
        assert_eq!(listed.map(|l| l.len()), Ok(0));
    }
    env.stop().await
}
