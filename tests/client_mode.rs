//! Client mode under a real host: links open WebSocket connections, inbound frames reach the
//! component's `handle-message`, and its publishes come back out on the right socket.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::ws::Server;
use common::{eventually, Env};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SILENCE: Duration = Duration::from_millis(700);

/// The manifest shape most users write: a consumer link named `default` with no config, and a
/// handler link of its own name carrying `URI`.
async fn echo_on(env: &Env, server: &Server, component: &str, link: &str) -> Result<()> {
    env.component("test_echo", component).await?;
    let config = format!("{link}-cfg");
    env.config(&config, &[("URI", &server.uri())]).await?;
    env.link_consumer(component, "default", &[]).await?;
    env.link_handler(component, link, &[&config]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn text_round_trip_and_link_level_publish_use_the_same_socket() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    echo_on(&env, &server, "echo", "echo-handler").await?;
    let mut peer = server.accept().await?;

    assert_eq!(peer.round_trip("hello").await?, "hello");
    // A publish to a plain (non-session) subject goes out on the component's only connection.
    assert_eq!(peer.round_trip("!plain to everyone").await?, "to everyone");
    // Order is kept.
    for i in 0..20 {
        peer.send_text(&format!("n{i}")).await?;
    }
    for i in 0..20 {
        assert_eq!(peer.recv_text().await?, format!("n{i}"));
    }
    server.expect_no_connection(SILENCE).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_request_carries_token_and_headers() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "hdr").await?;
    let uri = format!("{}/feed?x=1", server.uri());
    env.config(
        "hdr-cfg",
        &[
            ("uri", &uri),
            ("auth_token", "s3cret-token"),
            ("HEADER_X-Tenant", "acme"),
            ("header_x-trace-id", "abc123"),
        ],
    )
    .await?;
    env.link_consumer("hdr", "default", &[]).await?;
    env.link_handler("hdr", "hdr-handler", &["hdr-cfg"]).await?;

    let mut peer = server.accept().await?;
    assert_eq!(peer.headers["authorization"], "Bearer s3cret-token");
    assert_eq!(peer.headers["x-tenant"], "acme");
    assert_eq!(peer.headers["x-trace-id"], "abc123");
    assert_eq!(peer.path, "/feed");
    assert_eq!(peer.round_trip("with headers").await?, "with headers");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_payload_with_every_byte_value_survives_both_ways() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    echo_on(&env, &server, "bin", "bin-handler").await?;
    let mut peer = server.accept().await?;

    let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    peer.send_binary(all.clone()).await?;
    match peer.next_message(Duration::from_secs(15)).await? {
        Message::Binary(data) => assert_eq!(data.as_ref(), all.as_slice()),
        other => anyhow::bail!("expected a binary frame, got {other:?}"),
    }
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_components_each_get_only_their_own_traffic() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    echo_on(&env, &server, "alice", "alice-handler").await?;
    let mut a = server.accept().await?;
    echo_on(&env, &server, "bob", "bob-handler").await?;
    let mut b = server.accept().await?;

    assert_eq!(a.round_trip("for alice").await?, "for alice");
    assert_eq!(b.round_trip("for bob").await?, "for bob");
    b.expect_silence(SILENCE).await?;
    a.expect_silence(SILENCE).await?;
    assert_eq!(a.round_trip("!plain alice plain").await?, "alice plain");
    b.expect_silence(SILENCE).await?;

    // Alice may not write to Bob's session: the publish fails and Bob sees nothing.
    let bob_session = b.round_trip("!whoami").await?;
    ensure!(bob_session.starts_with("ws.session."), "{bob_session}");
    let answer = a
        .round_trip(&format!("!to {bob_session} intrusion"))
        .await?;
    ensure!(answer.starts_with("ERR unknown session"), "{answer}");
    b.expect_silence(SILENCE).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn equal_config_in_both_directions_opens_one_socket() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "shared").await?;
    env.config(
        "shared-cfg",
        &[("URI", &server.uri()), ("HEADER_X-Id", "1")],
    )
    .await?;
    env.link_consumer("shared", "default", &["shared-cfg"])
        .await?;
    env.link_handler("shared", "shared-handler", &["shared-cfg"])
        .await?;

    let mut peer = server.accept().await?;
    assert_eq!(
        peer.round_trip("!plain over the shared socket").await?,
        "over the shared socket"
    );
    assert_eq!(peer.round_trip("echo").await?, "echo");
    server.expect_no_connection(Duration::from_secs(2)).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_link_with_its_own_uri_publishes_on_its_own_socket() -> Result<()> {
    let env = Env::start().await?;
    let mut inbound = Server::start().await?;
    let mut outbound = Server::start().await?;
    env.component("test_echo", "split").await?;
    env.config("split-in", &[("URI", &inbound.uri())]).await?;
    env.config("split-out", &[("URI", &outbound.uri())]).await?;
    env.link_consumer("split", "default", &["split-out"])
        .await?;
    env.link_handler("split", "split-handler", &["split-in"])
        .await?;

    let mut in_peer = inbound.accept().await?;
    let mut out_peer = outbound.accept().await?;
    in_peer.send_text("!plain via the consumer link").await?;
    assert_eq!(out_peer.recv_text().await?, "via the consumer link");
    in_peer.expect_silence(SILENCE).await?;
    // A reply to the session still goes back where the message came from.
    assert_eq!(in_peer.round_trip("reply here").await?, "reply here");
    out_peer.expect_silence(SILENCE).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_links_closes_the_socket_with_a_close_frame() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "bye").await?;
    env.config("bye-cfg", &[("URI", &server.uri())]).await?;
    env.link_consumer("bye", "default", &["bye-cfg"]).await?;
    env.link_handler("bye", "bye-handler", &["bye-cfg"]).await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("before").await?, "before");

    // One link still uses the socket: it stays open.
    env.unlink_handler("bye-handler").await?;
    peer.expect_silence(Duration::from_secs(1)).await?;
    env.unlink_consumer("bye", "default").await?;
    match peer.next_message(Duration::from_secs(10)).await? {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => anyhow::bail!("expected a close frame, got {other:?}"),
    }
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_uri_leaves_the_provider_healthy_and_other_links_working() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    env.component("test_echo", "good").await?;
    env.component("test_echo", "bad").await?;
    env.component("test_echo", "gone").await?;
    env.config("bad-cfg", &[("URI", "not a uri at all")])
        .await?;
    env.config(
        "gone-cfg",
        &[
            ("URI", "ws://127.0.0.1:1/nobody"),
            ("reconnect_max_ms", "500"),
        ],
    )
    .await?;
    env.link_handler("bad", "bad-handler", &["bad-cfg"]).await?;
    env.link_handler("gone", "gone-handler", &["gone-cfg"])
        .await?;
    echo_on(&env, &server, "good", "good-handler").await?;
    let mut peer = server.accept().await?;
    assert_eq!(peer.round_trip("still fine").await?, "still fine");

    let message = eventually(Duration::from_secs(10), || async {
        let (healthy, message) = env.health().await?;
        ensure!(healthy, "provider reported unhealthy");
        let message = message.unwrap_or_default();
        ensure!(
            message.contains("bad-handler") && message.contains("gone-handler"),
            "{message}"
        );
        Ok(message)
    })
    .await?;
    ensure!(message.contains("invalid config URI"), "{message}");
    ensure!(!message.contains("good-handler"), "{message}");
    assert_eq!(
        peer.round_trip("after the health check").await?,
        "after the health check"
    );

    // Removing the broken links clears the report.
    env.unlink_handler("bad-handler").await?;
    env.unlink_handler("gone-handler").await?;
    eventually(Duration::from_secs(10), || async {
        // Health still names this replica and the connection it holds, and no problem.
        let (healthy, message) = env.health().await?;
        let message = message.unwrap_or_default();
        ensure!(
            healthy
                && !message.contains("-handler")
                && message.contains("holds 1 client connection"),
            "{message:?}"
        );
        Ok(())
    })
    .await?;
    env.stop().await
}
