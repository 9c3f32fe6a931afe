//! Server mode under a real host: real WebSocket clients connect to the provider, one session
//! each, and reach the component.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use common::ws::{connect, connect_with, upgrade_status, Server};
use common::Env;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const SILENCE: Duration = Duration::from_millis(700);

#[tokio::test(flavor = "multi_thread")]
async fn three_clients_get_their_own_echo_and_plain_publishes_reach_all() -> Result<()> {
    let env = Env::start().await?;
    let url = env.serve("room", "room-server", &[]).await?;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&url, &[("user-agent", "test-client")]).await?);
    }
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            client.round_trip(&format!("I am {i}")).await?,
            format!("I am {i}")
        );
    }
    for client in clients.iter_mut() {
        client.expect_silence(SILENCE).await?;
    }
    // The link's plain subject (ws.<link name>) reaches every client of the link.
    clients[0]
        .send_text("!to ws.room-server hello everyone")
        .await?;
    for client in clients.iter_mut() {
        assert_eq!(client.recv_text().await?, "hello everyone");
    }
    // Session info carries the peer address and the request.
    let id = clients[1].session_id().await?;
    let info = clients[1].round_trip(&format!("!get {id}")).await?;
    ensure!(
        info.starts_with(&format!("INFO {id}|room-server|127.0.0.1:")),
        "{info}"
    );
    let request = clients[1]
        .round_trip(&format!("!request-info {id}"))
        .await?;
    assert_eq!(request, "REQ /||user-agent=test-client|");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_publish_reaches_only_members() -> Result<()> {
    let env = Env::start().await?;
    let url = env.serve("groups", "groups-server", &[]).await?;
    let (mut a, mut b, mut c) = (
        connect(&url, &[]).await?,
        connect(&url, &[]).await?,
        connect(&url, &[]).await?,
    );
    let (ida, idb) = (a.session_id().await?, b.session_id().await?);
    assert_eq!(a.round_trip(&format!("!join {ida} lobby")).await?, "JOINED");
    assert_eq!(a.round_trip(&format!("!join {idb} lobby")).await?, "JOINED");
    let members = c.round_trip("!members lobby").await?;
    let mut expected = [ida.clone(), idb.clone()];
    expected.sort();
    assert_eq!(members, format!("MEMBERS {}", expected.join(",")));

    c.send_text("!group-send lobby hi lobby").await?;
    assert_eq!(a.recv_text().await?, "hi lobby");
    assert_eq!(b.recv_text().await?, "hi lobby");
    assert_eq!(c.recv_text().await?, "GROUP 2");
    c.expect_silence(SILENCE).await?;

    assert_eq!(b.round_trip(&format!("!leave {idb} lobby")).await?, "LEFT");
    c.send_text("!group-send lobby again").await?;
    assert_eq!(a.recv_text().await?, "again");
    assert_eq!(c.recv_text().await?, "GROUP 1");
    b.expect_silence(SILENCE).await?;

    // A member that disconnects leaves its groups.
    a.ws.close(None).await?;
    let mut answer = String::new();
    for _ in 0..50 {
        answer = c.round_trip("!members lobby").await?;
        if answer == "MEMBERS " {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer, "MEMBERS ");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_messages_arrive_in_order() -> Result<()> {
    let env = Env::start().await?;
    // The component forwards lifecycle messages to its one client-mode connection: a monitor.
    let mut monitor_server = Server::start().await?;
    env.config("monitor-cfg", &[("URI", &monitor_server.uri())])
        .await?;
    let url = env
        .serve("life", "life-server", &[("LIFECYCLE_EVENTS", "true")])
        .await?;
    env.link_handler("life", "life-monitor", &["monitor-cfg"])
        .await?;
    let mut monitor = monitor_server.accept().await?;

    let mut client = connect(&format!("{url}/"), &[]).await?;
    let connected = monitor.recv_text().await?;
    let id = client.session_id().await?;
    ensure!(
        connected.starts_with("ws.lifecycle.connected "),
        "{connected}"
    );
    let event: serde_json::Value =
        serde_json::from_str(&connected["ws.lifecycle.connected ".len()..])?;
    assert_eq!(event["session"], id.as_str());
    assert_eq!(event["link"], "life-server");
    assert_eq!(client.round_trip("between").await?, "between");
    client
        .ws
        .close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "leaving".into(),
        }))
        .await?;
    let disconnected = monitor.recv_text().await?;
    ensure!(
        disconnected.starts_with("ws.lifecycle.disconnected "),
        "{disconnected}"
    );
    let event: serde_json::Value =
        serde_json::from_str(&disconnected["ws.lifecycle.disconnected ".len()..])?;
    assert_eq!(event["session"], id.as_str());
    assert_eq!(event["code"], 4000);
    monitor.expect_silence(SILENCE).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn admission_refuses_bad_tokens_foreign_origins_and_too_many_clients() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve(
            "gate",
            "gate-server",
            &[
                ("AUTH_TOKEN", "letmein"),
                ("ALLOWED_ORIGINS", "https://app.example"),
                ("MAX_CONNECTIONS", "2"),
                ("PATH", "/chat"),
                ("SUBPROTOCOLS", "chat.v2,chat.v1"),
            ],
        )
        .await?;
    let chat = format!("{url}/chat");
    let origin = ("origin", "https://app.example");
    let bearer = ("authorization", "Bearer letmein");
    assert_eq!(upgrade_status(&chat, &[origin]).await?, 401);
    assert_eq!(
        upgrade_status(&chat, &[origin, ("authorization", "Bearer nope")]).await?,
        401
    );
    assert_eq!(
        upgrade_status(&format!("{chat}?access_token=nope"), &[origin]).await?,
        401
    );
    assert_eq!(
        upgrade_status(&chat, &[bearer, ("origin", "https://evil.example")]).await?,
        403
    );
    assert_eq!(
        upgrade_status(&format!("{url}/elsewhere"), &[origin, bearer]).await?,
        404
    );

    let mut first = connect(
        &chat,
        &[
            origin,
            bearer,
            ("sec-websocket-protocol", "chat.v1, chat.v2"),
        ],
    )
    .await?;
    assert_eq!(first.headers["sec-websocket-protocol"], "chat.v2");
    let mut second = connect(&format!("{chat}?access_token=letmein"), &[origin]).await?;
    assert_eq!(upgrade_status(&chat, &[origin, bearer]).await?, 503);
    assert_eq!(first.round_trip("one").await?, "one");
    assert_eq!(second.round_trip("two").await?, "two");
    // A slot frees up when a client leaves.
    second.ws.close(None).await?;
    let mut third = None;
    for _ in 0..50 {
        if let Ok(peer) = connect(&chat, &[origin, bearer]).await {
            third = Some(peer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut third = third.context("no slot freed after a client left")?;
    assert_eq!(third.round_trip("three").await?, "three");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wss_client_trusting_a_test_ca_completes_a_round_trip() -> Result<()> {
    let env = Env::start().await?;
    let dir = tempfile::tempdir()?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?
        .signed_by(&key, &ca, &ca_key)?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;

    let url = env
        .serve(
            "secure",
            "secure-server",
            &[
                ("TLS_CERT_FILE", cert_path.to_str().context("path")?),
                ("TLS_KEY_FILE", key_path.to_str().context("path")?),
            ],
        )
        .await?;
    let port = url.rsplit(':').next().context("port")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(config));
    let mut client =
        connect_with(&format!("wss://localhost:{port}/"), &[], Some(connector)).await?;
    assert_eq!(client.round_trip("over TLS").await?, "over TLS");
    // A plain ws:// client cannot talk to the TLS listener.
    ensure!(
        connect(&url, &[]).await.is_err(),
        "plain ws:// must fail against wss://"
    );
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_link_closes_every_client_and_a_taken_address_fails_clearly() -> Result<()> {
    let env = Env::start().await?;
    let url = env.serve("first", "first-server", &[]).await?;
    let mut clients = [connect(&url, &[]).await?, connect(&url, &[]).await?];

    // A second link asking for the same address is refused; the first keeps working.
    let address = url.trim_start_matches("ws://").to_string();
    env.component("test_echo", "second").await?;
    env.config(
        "second-cfg",
        &[("MODE", "server"), ("LISTEN_ADDRESS", &address)],
    )
    .await?;
    env.link_handler("second", "second-server", &["second-cfg"])
        .await?;
    let message = common::eventually(Duration::from_secs(10), || async {
        let (healthy, message) = env.health().await?;
        ensure!(healthy, "unhealthy");
        let message = message.unwrap_or_default();
        ensure!(message.contains("second-server"), "{message}");
        Ok(message)
    })
    .await?;
    ensure!(
        message.contains(&format!("cannot listen on {address}")),
        "{message}"
    );
    assert_eq!(clients[0].round_trip("still here").await?, "still here");

    env.unlink_handler("first-server").await?;
    for client in clients.iter_mut() {
        match client.next_message(Duration::from_secs(10)).await? {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
            other => bail!("expected a close frame, got {other:?}"),
        }
    }
    ensure!(
        connect(&url, &[]).await.is_err(),
        "the listener must be gone"
    );
    env.stop().await
}
