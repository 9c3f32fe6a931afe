//! Attacks on server-mode admission, against the provider under a real host: idle TCP
//! connections by the thousand, many from one address, handshakes that stall before or after
//! TLS, a handshake in flight when its link is deleted, and a browser-style `access_token` that
//! must not reach the component. The attackers are plain TCP (and TLS) peers written here; the
//! real clients are WebSocket clients. Figures (times, counts, limits) are printed.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use common::ws::{connect, Peer, Server};
use common::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a check that the server closed a connection waits (closes come at once).
const CLOSE_WAIT: Duration = Duration::from_secs(3);

fn address(url: &str) -> Result<SocketAddr> {
    let host = url.trim_start_matches("ws://").trim_start_matches("wss://");
    Ok(host.split('/').next().unwrap_or(host).parse()?)
}

/// A TCP connection to `target` from source address `from` (all of 127/8 is loopback).
async fn tcp_from(from: Ipv4Addr, target: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
        .await
        .context("TCP connect timed out")??;
    Ok(stream)
}

/// A WebSocket client connected from source address `from`.
async fn ws_from(from: Ipv4Addr, url: &str) -> Result<Peer> {
    let stream = tcp_from(from, address(url)?).await?;
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .context("upgrade timed out")??;
    Ok(Peer {
        headers: response.headers().clone(),
        path: String::new(),
        ws,
    })
}

/// True when the peer closed (EOF or reset) within `wait`; false when it stayed open. An
/// admission-stage connection gets no bytes from the server, so any data counts as open.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// How many of `streams` the server closed: each is watched for `wait`, all at once.
async fn count_closed(streams: Vec<TcpStream>, wait: Duration) -> (usize, Vec<TcpStream>) {
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        tasks.spawn(async move {
            let closed = closed_within(&mut stream, wait).await;
            (closed, stream)
        });
    }
    let (mut closed, mut open) = (0, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((true, _)) => closed += 1,
            Ok((false, stream)) => open.push(stream),
            Err(_) => closed += 1,
        }
    }
    (closed, open)
}

/// The provider process (a child of this test process whose command line names the host).
/// The "Max open files" soft and hard limits of a process (`self` or a PID).
fn open_files_limit(pid: &str) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((fields.next()?.to_string(), fields.next()?.to_string()))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_client_gets_in_while_2000_idle_connections_are_open() -> Result<()> {
    let env = Env::start().await?;
    let pid = env.provider_pid().context("no provider process found")?;
    common::figure(&format!(
        "provider pid {pid}: open files limit (soft, hard) {:?}",
        open_files_limit(&pid.to_string())
    ));
    // A usual descriptor limit for a service is 1024: give the provider that (it got this test
    // process's limit from the host), so a listener that keeps every idle connection runs out.
    let lowered = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:"])
        .status()
        .is_ok_and(|s| s.success());
    common::figure(&format!(
        "provider open files limit after prlimit (ok: {lowered}): {:?}",
        open_files_limit(&pid.to_string())
    ));
    let mut wanted = 2000;
    match open_files_limit("self").and_then(|(soft, _)| soft.parse::<usize>().ok()) {
        Some(soft) if soft < wanted + 300 => {
            wanted = soft.saturating_sub(300);
            common::figure(&format!(
                "this test process may open {soft} files: opening {wanted} idle connections"
            ));
        }
        other => common::figure(&format!("this test process's open files limit: {other:?}")),
    }

    // Long enough that no idle connection times out during the test: closes are evictions.
    let url = env
        .serve("crowd", "crowd-server", &[("HANDSHAKE_TIMEOUT_SEC", "120")])
        .await?;
    let target = address(&url)?;
    let mut regular = connect(&url, &[]).await?;
    assert_eq!(regular.round_trip("before").await?, "before");

    let started = Instant::now();
    let mut idle = Vec::with_capacity(wanted);
    let mut failed = 0;
    for i in 0..wanted {
        // 10 each from 127.0.0.2 ..= 127.0.0.201.
        let from = Ipv4Addr::new(127, 0, 0, 2 + (i / 10) as u8);
        match tcp_from(from, target).await {
            Ok(stream) => idle.push(stream),
            Err(_) => failed += 1,
        }
    }
    common::figure(&format!(
        "opened {} idle TCP connections ({failed} failed) in {:?}; provider holds {} descriptors",
        idle.len(),
        started.elapsed(),
        open_fds(pid)
    ));

    let started = Instant::now();
    let mut client = connect(&url, &[]).await?;
    let connected = started.elapsed();
    let reply = client.round_trip("through the crowd").await?;
    let round_trip = started.elapsed();
    common::figure(&format!(
        "a real client connected in {connected:?}, round trip done after {round_trip:?}"
    ));
    assert_eq!(reply, "through the crowd");
    ensure!(
        connected < Duration::from_secs(1),
        "connecting took {connected:?} behind idle connections"
    );

    let total = idle.len();
    let (closed, open) = count_closed(idle, CLOSE_WAIT).await;
    common::figure(&format!(
        "the server closed {closed} of {total} idle connections; {} still pending; provider \
         holds {} descriptors",
        open.len(),
        open_fds(pid)
    ));
    ensure!(
        open.len() <= 256,
        "{} idle connections still open, more than MAX_PENDING_HANDSHAKES (256)",
        open.len()
    );

    // The provider is healthy, the earlier client and NATS (every round trip crosses it) work.
    let (healthy, message) = env.health().await?;
    ensure!(healthy, "provider unhealthy: {message:?}");
    assert_eq!(regular.round_trip("after").await?, "after");
    assert_eq!(client.round_trip("again").await?, "again");
    drop(open);
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_gets_at_most_its_share_of_pending_handshakes() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve(
            "share",
            "share-server",
            // Pending handshakes do not take sessions' places: 2 is enough for both clients.
            &[("HANDSHAKE_TIMEOUT_SEC", "120"), ("MAX_CONNECTIONS", "2")],
        )
        .await?;
    let target = address(&url)?;
    let from = Ipv4Addr::new(127, 0, 0, 5);
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tcp_from(from, target).await?);
    }
    let started = Instant::now();
    let (closed, open) = count_closed(idle, CLOSE_WAIT).await;
    common::figure(&format!(
        "100 idle connections from {from}: {closed} closed by the server, {} open (checked \
         over {:?})",
        open.len(),
        started.elapsed()
    ));
    assert_eq!(
        open.len(),
        16,
        "MAX_HANDSHAKES_PER_ADDRESS is 16 by default"
    );
    // Another address is not affected (and the 16 pending do not count as connections), and
    // once the idle ones leave, this address gets in.
    let mut other = ws_from(Ipv4Addr::new(127, 0, 0, 6), &url).await?;
    assert_eq!(other.round_trip("other address").await?, "other address");
    drop(open);
    let mut client = common::eventually(Duration::from_secs(15), || ws_from(from, &url)).await?;
    assert_eq!(client.round_trip("my turn").await?, "my turn");
    env.stop().await
}

/// Writes a test CA and a `localhost` certificate signed by it; returns the CA certificate.
fn test_ca(dir: &std::path::Path) -> Result<rcgen::Certificate> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?
        .signed_by(&key, &ca, &ca_key)?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(ca)
}

/// Waits for the server to close `stream`; returns the time since `since`.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    since: Instant,
) -> Result<Duration> {
    let mut buf = [0u8; 256];
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .context("the server kept a stalled handshake open for 20 s")?;
    Ok(since.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_end_at_one_deadline_with_or_without_tls() -> Result<()> {
    let env = Env::start().await?;
    let timeout = Duration::from_secs(4);
    let plain = env
        .serve("stall", "stall-server", &[("HANDSHAKE_TIMEOUT_SEC", "4")])
        .await?;
    let dir = tempfile::tempdir()?;
    let ca = test_ca(dir.path())?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let secure = env
        .serve(
            "stall-tls",
            "stall-tls-server",
            &[
                ("HANDSHAKE_TIMEOUT_SEC", "4"),
                ("TLS_CERT_FILE", cert.to_str().context("path")?),
                ("TLS_KEY_FILE", key.to_str().context("path")?),
            ],
        )
        .await?;

    // Plain: connect, send nothing.
    let started = Instant::now();
    let mut idle = TcpStream::connect(address(&plain)?).await?;
    let plain_closed = closed_after(&mut idle, started).await?;
    common::figure(&format!(
        "an idle plain connection was closed after {plain_closed:?} (timeout {timeout:?})"
    ));

    // TLS: connect, wait half the deadline, complete TLS, then never send the HTTP request.
    // One deadline for both steps closes it at `timeout`; a deadline per step, at 1.5 x.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let started = Instant::now();
    let tcp = TcpStream::connect(address(&secure)?).await?;
    tokio::time::sleep(timeout / 2).await;
    let mut tls = connector
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake")?;
    let tls_done = started.elapsed();
    let tls_closed = closed_after(&mut tls, started).await?;
    common::figure(&format!(
        "a TLS connection that finished TLS after {tls_done:?} and then stalled was closed \
         after {tls_closed:?} (timeout {timeout:?})"
    ));

    for (what, closed) in [("plain", plain_closed), ("TLS", tls_closed)] {
        ensure!(
            closed >= timeout - Duration::from_millis(500),
            "{what}: closed after {closed:?}, before the {timeout:?} deadline"
        );
        ensure!(
            closed < timeout + Duration::from_millis(1500),
            "{what}: closed after {closed:?}, not at the {timeout:?} deadline"
        );
    }
    // The listener still admits real clients.
    let mut client = connect(&plain, &[]).await?;
    assert_eq!(client.round_trip("fine").await?, "fine");
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_link_cancels_a_handshake_in_flight() -> Result<()> {
    let env = Env::start().await?;
    // The component forwards lifecycle messages to its one client-mode connection: a monitor.
    let mut monitor_server = Server::start().await?;
    env.config("monitor-cfg", &[("URI", &monitor_server.uri())])
        .await?;
    let url = env
        .serve("gone", "gone-server", &[("LIFECYCLE_EVENTS", "true")])
        .await?;
    env.link_handler("gone", "gone-monitor", &["monitor-cfg"])
        .await?;
    let mut monitor = monitor_server.accept().await?;

    // Lifecycle messages do reach the monitor.
    let mut client = connect(&url, &[]).await?;
    let connected = monitor.recv_text().await?;
    ensure!(
        connected.starts_with("ws.lifecycle.connected "),
        "{connected}"
    );
    client.ws.close(None).await?;
    let disconnected = monitor.recv_text().await?;
    ensure!(
        disconnected.starts_with("ws.lifecycle.disconnected "),
        "{disconnected}"
    );

    // Half an upgrade request, then the link is deleted, then the rest.
    let target = address(&url)?;
    let mut half = TcpStream::connect(target).await?;
    half.write_all(
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\n").as_bytes(),
    )
    .await?;
    env.unlink_handler("gone-server").await?;
    // The provider has handled the delete once its listener refuses new connections.
    common::eventually(Duration::from_secs(15), || async move {
        match TcpStream::connect(target).await {
            Ok(_) => bail!("still listening"),
            Err(_) => Ok(()),
        }
    })
    .await?;
    let _ = half
        .write_all(
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), half.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    common::figure(&format!(
        "the half-upgraded client got {:?} after the link delete",
        answer
    ));
    ensure!(
        !answer.contains(" 101 "),
        "the upgrade was completed after the link was deleted: {answer}"
    );
    // Late deliveries would come within seconds: wait well past a handler round trip.
    monitor.expect_silence(Duration::from_secs(3)).await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_token_is_not_in_the_components_session_info() -> Result<()> {
    let env = Env::start().await?;
    let token = "s3cret-t0ken";
    let url = env
        .serve("tok", "tok-server", &[("AUTH_TOKEN", token)])
        .await?;
    let mut client = connect(&format!("{url}/?access_token={token}&room=7"), &[]).await?;
    let id = client.session_id().await?;
    let request = client.round_trip(&format!("!request-info {id}")).await?;
    common::figure(&format!("session info with a query token: {request}"));
    assert_eq!(request, "REQ /|room=7||");
    let info = client.round_trip(&format!("!get {id}")).await?;
    ensure!(!info.contains(token), "{info}");

    let mut bare = connect(&format!("{url}/?access_token={token}"), &[]).await?;
    let id = bare.session_id().await?;
    let request = bare.round_trip(&format!("!request-info {id}")).await?;
    assert_eq!(request, "REQ /|||");
    env.stop().await
}
