//! Several replicas of the provider, one per host of one lattice, acting as one provider: two
//! in-process hosts on one `nats-server -js`, each running the provider from the same PAR under
//! the same provider ID, the component scaled on both.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use common::ws::{connect, Server};
use common::{eventually, free_port, wait_listening, Env, OtherHost};

/// The lease time the tests give the replicas (`LEASE_TTL_MS`): takeover comes within it plus
/// a poll and a connect.
const LEASE_TTL_MS: u64 = 4000;

async fn two_replicas(first: &[(&str, &str)], second: &[(&str, &str)]) -> Result<(Env, OtherHost)> {
    let ttl = LEASE_TTL_MS.to_string();
    let env = Env::start_bare().await?;
    let mut one = vec![("LEASE_TTL_MS", ttl.as_str())];
    one.extend_from_slice(first);
    env.config("replica-1", &one).await?;
    let mut two = vec![("LEASE_TTL_MS", ttl.as_str())];
    two.extend_from_slice(second);
    env.config("replica-2", &two).await?;
    env.start_provider(&["replica-1"]).await?;
    let other = env.add_host(&["replica-2"]).await?;
    Ok((env, other))
}

/// Waits until both replicas have heard of each other (health says "of 2").
async fn see_each_other(env: &Env) -> Result<Vec<String>> {
    eventually(Duration::from_secs(30), || async {
        let healths = env.replica_healths(2).await?;
        ensure!(healths.iter().all(|h| h.contains(" of 2;")), "{healths:?}");
        Ok(healths)
    })
    .await
}

/// The session ID in a `!whoami` answer (`ws.session.<id>`).
fn id_of(whoami: &str) -> String {
    whoami.trim_start_matches("ws.session.").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_link_has_one_socket_across_replicas_and_moves_when_its_holder_dies() -> Result<()>
{
    let (env, other) = two_replicas(&[], &[]).await?;
    env.component("test_echo", "echo").await?;
    env.component_on(&other.host_id, "test_echo", "echo")
        .await?;
    let mut server = Server::start().await?;
    env.config("echo-cfg", &[("URI", &server.uri())]).await?;
    env.link_consumer("echo", "default", &[]).await?;
    env.link_sessions("echo").await?;
    env.link_handler("echo", "echo-handler", &["echo-cfg"])
        .await?;
    let mut peer = server.accept().await?;
    let id = id_of(&peer.round_trip("!whoami").await?);
    see_each_other(&env).await?;
    assert_eq!(
        peer.round_trip(&format!("!meta-set {id} room blue"))
            .await?,
        "OK"
    );
    assert_eq!(
        peer.round_trip(&format!("!join {id} lobby")).await?,
        "JOINED"
    );
    assert_eq!(
        peer.round_trip("!members lobby").await?,
        format!("MEMBERS {id}")
    );

    // Every frame reaches the component once: each echo comes back once, in order.
    for i in 0..1000 {
        peer.send_text(&format!("n{i}")).await?;
    }
    for i in 0..1000 {
        assert_eq!(peer.recv_text().await?, format!("n{i}"));
    }
    peer.expect_silence(Duration::from_millis(1000)).await?;
    server
        .expect_no_connection(Duration::from_millis(500))
        .await
        .context("a second replica opened a socket to the same server")?;

    // Exactly one replica holds it; kill that one's provider process.
    let healths = see_each_other(&env).await?;
    let holders: Vec<&String> = healths
        .iter()
        .filter(|h| h.contains("holds 1 client connection"))
        .collect();
    ensure!(holders.len() == 1, "{healths:?}");
    let killed_other = holders[0].contains(&other.host_id);
    let killed_at = Instant::now();
    let killed = if killed_other {
        other.kill_provider()
    } else {
        env.kill_provider()
    };
    ensure!(killed == 1, "killed {killed} provider processes");

    // Another replica takes over within the lease time (plus a poll and a connect), under the
    // same session ID, with its metadata and groups: the host restarts the killed provider, and
    // the new replica on the holder's host takes the lease at once (a host runs one replica), or
    // the other replica does after the lease time.
    let mut taken = server.accept().await?;
    let took = killed_at.elapsed();
    common::figure(&format!(
        "client connection back after SIGKILL of its holder: {} ms (lease {LEASE_TTL_MS} ms; the host restarts its provider, whose new replica takes a lease of its own host at once)",
        took.as_millis()
    ));
    ensure!(
        took < Duration::from_millis(LEASE_TTL_MS * 2 + 5000),
        "takeover took {took:?}"
    );
    assert_eq!(id_of(&taken.round_trip("!whoami").await?), id);
    assert_eq!(
        taken.round_trip(&format!("!meta-get {id} room")).await?,
        "META blue"
    );
    assert_eq!(
        taken.round_trip("!members lobby").await?,
        format!("MEMBERS {id}")
    );
    for i in 0..50 {
        taken.send_text(&format!("after{i}")).await?;
    }
    for i in 0..50 {
        assert_eq!(taken.recv_text().await?, format!("after{i}"));
    }
    taken.expect_silence(Duration::from_millis(1000)).await?;
    drop(other);
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn server_mode_clients_on_two_hosts_are_one_components_sessions() -> Result<()> {
    let a_address = format!("127.0.0.1:{}", free_port()?);
    let b_address = format!("127.0.0.1:{}", free_port()?);
    // Each replica listens on its own host: here, its own port from its provider config.
    let (env, other) = two_replicas(
        &[("LISTEN_ADDRESS", &a_address)],
        &[("LISTEN_ADDRESS", &b_address)],
    )
    .await?;
    for host in [env.host_id.clone(), other.host_id.clone()] {
        env.component_on(&host, "test_echo", "chat").await?;
    }
    env.link_consumer("chat", "default", &[]).await?;
    env.link_sessions("chat").await?;
    env.config("chat-cfg", &[("MODE", "server")]).await?;
    env.link_handler("chat", "chat-handler", &["chat-cfg"])
        .await?;
    let (a_url, b_url) = (format!("ws://{a_address}"), format!("ws://{b_address}"));
    wait_listening(&a_url).await?;
    wait_listening(&b_url).await?;
    let mut a = connect(&a_url, &[]).await?;
    let mut b = connect(&b_url, &[]).await?;
    let a_id = id_of(&a.round_trip("!whoami").await?);
    let b_id = id_of(&b.round_trip("!whoami").await?);
    see_each_other(&env).await?;

    // A send to B's session from A's call, whichever replica serves it, arrives.
    assert_eq!(
        a.round_trip(&format!("!send {b_id} hello b")).await?,
        "SENT"
    );
    assert_eq!(b.recv_text().await?, "hello b");
    assert_eq!(
        b.round_trip(&format!("!send {a_id} hello a")).await?,
        "SENT"
    );
    assert_eq!(a.recv_text().await?, "hello a");

    // Both are listed; a group spans both hosts.
    let list = a.round_trip("!list").await?;
    ensure!(list.starts_with("LIST 2"), "{list}");
    ensure!(list.contains(&a_id) && list.contains(&b_id), "{list}");
    assert_eq!(a.round_trip(&format!("!join {a_id} room")).await?, "JOINED");
    assert_eq!(a.round_trip(&format!("!join {b_id} room")).await?, "JOINED");
    let mut members = vec![a_id.clone(), b_id.clone()];
    members.sort();
    assert_eq!(
        b.round_trip("!members room").await?,
        format!("MEMBERS {}", members.join(","))
    );
    a.send_text("!group-send room to the room").await?;
    let mut got_a = vec![a.recv_text().await?, a.recv_text().await?];
    got_a.sort();
    assert_eq!(got_a, ["GROUP 2", "to the room"]);
    assert_eq!(b.recv_text().await?, "to the room");
    b.send_text("!broadcast to all").await?;
    let mut got_b = vec![b.recv_text().await?, b.recv_text().await?];
    got_b.sort();
    assert_eq!(got_b, ["BROADCAST 2", "to all"]);
    assert_eq!(a.recv_text().await?, "to all");
    assert_eq!(
        a.round_trip(&format!("!meta-set {b_id} name bea")).await?,
        "OK"
    );
    assert_eq!(
        b.round_trip(&format!("!meta-get {b_id} name")).await?,
        "META bea"
    );

    // Another component sees and touches neither, on either replica.
    let mut spy_server = Server::start().await?;
    for host in [env.host_id.clone(), other.host_id.clone()] {
        env.component_on(&host, "test_echo", "spy").await?;
    }
    env.config("spy-cfg", &[("URI", &spy_server.uri())]).await?;
    env.link_consumer("spy", "default", &[]).await?;
    env.link_sessions("spy").await?;
    env.link_handler("spy", "spy-handler", &["spy-cfg"]).await?;
    let mut spy = spy_server.accept().await?;
    for id in [&a_id, &b_id] {
        assert_eq!(
            spy.round_trip(&format!("!send {id} psst")).await?,
            format!("ERR unknown session {id}")
        );
        assert_eq!(
            spy.round_trip(&format!("!get {id}")).await?,
            format!("ERR unknown session {id}")
        );
    }
    ensure!(spy.round_trip("!list").await?.starts_with("LIST 1"));
    a.expect_silence(Duration::from_millis(500)).await?;
    b.expect_silence(Duration::from_millis(500)).await?;
    other.stop().await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_from_nats_stops_reading_before_another_takes_over() -> Result<()> {
    let env = Env::start_bare().await?;
    let ttl = LEASE_TTL_MS.to_string();
    env.config("replica", &[("LEASE_TTL_MS", &ttl)]).await?;
    // NATS sees the replica's connections end; the replica sees only silence.
    let upstream = env.nats.url.trim_start_matches("nats://");
    let partition = common::Blackhole::start_with("nats", upstream, true).await?;
    // The replica behind the proxy is the only one when the link comes: it holds the connection.
    let cut_off = env.add_host_on(&partition.url, &["replica"]).await?;
    env.component_on(&cut_off.host_id, "test_echo", "echo")
        .await?;
    env.component("test_echo", "echo").await?;
    let mut server = Server::start().await?;
    env.config("echo-cfg", &[("URI", &server.uri())]).await?;
    env.link_consumer("echo", "default", &[]).await?;
    env.link_handler("echo", "echo-handler", &["echo-cfg"])
        .await?;
    let mut first = server.accept().await?;
    let id = id_of(&first.round_trip("!whoami").await?);
    env.start_replica(&env.host_id, &["replica"], 2).await?;
    see_each_other(&env).await?;

    partition.cut();
    let cut_at = Instant::now();
    // The cut-off replica cannot renew its lease: it closes its socket, and only then does the
    // other replica connect, under the same session ID.
    let mut closed_at = None;
    let mut second = loop {
        tokio::select! {
            biased;
            m = first.next_message(Duration::from_secs(120)), if closed_at.is_none() => match m {
                Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => {
                    closed_at = Some(Instant::now());
                }
                Ok(_) => {}
            },
            peer = server.accept() => {
                let peer = peer?;
                ensure!(closed_at.is_some(), "the other replica connected before the cut-off one closed its socket");
                break peer;
            }
        }
    };
    let accepted_at = Instant::now();
    let closed_at = closed_at.context("closed")?;
    common::figure(&format!(
        "partitioned holder closed its socket {} ms after the cut; the other replica connected {} ms after the cut (lease {LEASE_TTL_MS} ms)",
        (closed_at - cut_at).as_millis(),
        (accepted_at - cut_at).as_millis()
    ));
    assert_eq!(id_of(&second.round_trip("!whoami").await?), id);
    for i in 0..20 {
        assert_eq!(second.round_trip(&format!("p{i}")).await?, format!("p{i}"));
    }
    server
        .expect_no_connection(Duration::from_millis(500))
        .await?;
    drop(cut_off);
    env.stop().await
}
