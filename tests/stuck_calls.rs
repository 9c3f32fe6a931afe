//! Calls to the provider's exports are independent: a caller that stops half-way through its
//! parameters (a lost accept, a host that died mid-call) or sends too many of them holds up no
//! other call. Stuck and oversized calls are spoken as raw NATS messages; the calls that must
//! not wait are a real component's publishes (a real WebSocket peer -> the echo component ->
//! `consumer.publish` through the real host -> the provider -> the peer).

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use common::ws::{Peer, Server};
use common::{Env, LATTICE, PROVIDER_ID};
use futures::StreamExt as _;

/// How long an echo may take while calls are stuck (before the fix: `PARAMS_PATIENCE`, 30 s).
const ECHO_BOUND: Duration = Duration::from_secs(10);

/// The provider's `MAX_CALL_BYTES`.
const MAX_CALL_BYTES: usize = 64 * 1024 * 1024;

/// The echo component `id` with a client-mode handler link to `server`; its connected peer.
async fn echo_peer(env: &Env, id: &str, server: &mut Server) -> Result<Peer> {
    echo_peer_with(env, id, server, &[]).await
}

/// [`echo_peer`] with `extra` link config.
async fn echo_peer_with(
    env: &Env,
    id: &str,
    server: &mut Server,
    extra: &[(&str, &str)],
) -> Result<Peer> {
    env.component("test_echo", id).await?;
    env.link_consumer(id, "default", &[]).await?;
    let config = format!("{id}-cfg");
    let uri = server.uri();
    let mut pairs = vec![("URI", uri.as_str())];
    pairs.extend(extra.iter().copied());
    env.config(&config, &pairs).await?;
    env.link_handler(id, "h", &[&config]).await?;
    let mut peer = server.accept().await?;
    // Everything works before any call gets stuck.
    let answer = peer.round_trip("warm-up").await?;
    ensure!(answer == "warm-up", "{answer}");
    Ok(peer)
}

/// Sends `text` and waits for its echo within [`ECHO_BOUND`]; the time it took.
async fn timed_echo(peer: &mut Peer, text: &str) -> Result<Duration> {
    let started = Instant::now();
    peer.send_text(text).await?;
    let answer = peer
        .next_message(ECHO_BOUND)
        .await
        .with_context(|| format!("no echo of {text:?} within {ECHO_BOUND:?}"))?;
    let waited = started.elapsed();
    ensure!(
        answer.to_text().ok() == Some(text),
        "expected the echo of {text:?}, got {answer:?}"
    );
    Ok(waited)
}

/// The subject the provider serves `wasmcloud:messaging/consumer.<func>` on.
fn consumer_subject(func: &str) -> String {
    wrpc_transport_nats::invocation_subject(
        &format!("{LATTICE}.{PROVIDER_ID}"),
        "wasmcloud:messaging/consumer@0.2.0",
        func,
    )
}

/// The headers of a raw call, as the host sends them.
fn call_headers(source: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("source-id", source);
    headers.insert("link-name", "default");
    headers
}

/// The bytes NATS adds for `headers` (what a caller subtracts from its first message).
fn headers_len(headers: &async_nats::HeaderMap) -> usize {
    let mut len = b"NATS/1.0\r\n\r\n".len();
    for (key, values) in headers.iter() {
        let key: &[u8] = key.as_ref();
        for value in values {
            len += key.len() + b": \r\n".len() + value.as_str().len();
        }
    }
    len
}

fn leb128(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A raw `publish` call whose first message is as large as a caller may make it, holding the
/// start of a broker message whose body claims `body_len` bytes: as the host's
/// wrpc-transport-nats 0.29 client sends a call whose parameters do not fit, the rest to
/// follow the accept.
struct RawCall {
    /// The caller's reply subject `R`.
    reply: String,
    accepts: async_nats::Subscriber,
    results: async_nats::Subscriber,
}

impl RawCall {
    async fn start(nats: &async_nats::Client, body_len: u64) -> Result<Self> {
        let reply = nats.new_inbox();
        let accepts = nats.subscribe(reply.clone()).await?;
        let results = nats.subscribe(format!("{reply}.results")).await?;
        let headers = call_headers("stuck-caller");
        let budget = nats
            .server_info()
            .max_payload
            .saturating_sub(reply.len())
            .saturating_sub(headers_len(&headers));
        // broker-message { subject: "stuck", body: <body_len bytes>, reply-to: none }
        let mut payload = Vec::with_capacity(budget);
        leb128(5, &mut payload);
        payload.extend_from_slice(b"stuck");
        leb128(body_len, &mut payload);
        ensure!(body_len as usize > budget, "the body must not fit");
        payload.resize(budget, b'b');
        nats.publish_with_reply_and_headers(
            consumer_subject("publish"),
            reply.clone(),
            headers,
            payload.into(),
        )
        .await?;
        nats.flush().await?;
        Ok(Self {
            reply,
            accepts,
            results,
        })
    }

    /// Waits for the provider's accept; the subject to send the rest of the parameters to.
    async fn accepted(&mut self) -> Result<String> {
        let accept = tokio::time::timeout(Duration::from_secs(15), self.accepts.next())
            .await
            .with_context(|| format!("no accept for {}", self.reply))?
            .context("accept subscription ended")?;
        ensure!(accept.payload.is_empty(), "an accept is empty");
        let to = accept.reply.context("an accept names its subject")?;
        Ok(format!("{to}.params"))
    }

    /// Waits up to `wait` for the call's results; their first message and whether an empty
    /// end of results followed it.
    async fn result(&mut self, wait: Duration) -> Result<(bytes::Bytes, bool)> {
        let first = tokio::time::timeout(wait, self.results.next())
            .await
            .context("no results")?
            .context("results subscription ended")?;
        let end = tokio::time::timeout(Duration::from_secs(10), self.results.next())
            .await
            .ok()
            .flatten();
        Ok((first.payload, end.is_some_and(|m| m.payload.is_empty())))
    }
}

/// `result::err(string)`: the case (1), the length, the message.
fn error_of(payload: &[u8]) -> Option<String> {
    let (&case, rest) = payload.split_first()?;
    if case != 1 {
        return None;
    }
    let mut len = 0u64;
    let mut shift = 0;
    let mut at = 0;
    loop {
        let byte = *rest.get(at)?;
        at += 1;
        len |= u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let text = rest.get(at..at + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(text).into_owned())
}

/// A call whose parameters never finish (its first message as full as a caller may make it,
/// then nothing after the accept) does not hold up a component's publish: the echo through
/// the host's `consumer.publish` comes within seconds (before, it waited for the stuck call's
/// 30 s). The stuck call itself is dropped after `PARAMS_PATIENCE` (30 s) and its caller is
/// answered with an error result.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_call_does_not_hold_up_other_publishes_and_ends_with_an_error() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    let mut peer = echo_peer(&env, "stuck-one", &mut server).await?;

    let mut stuck = RawCall::start(&env.client, 4 * 1024 * 1024).await?;
    stuck.accepted().await?;
    let stuck_since = Instant::now();
    for n in 0..3 {
        let waited = timed_echo(&mut peer, &format!("echo-{n}")).await?;
        common::figure(&format!("echo {n} with one stuck call: {waited:?}"));
    }

    // The stuck call is given up after its 30 s, with an error for its caller.
    let (answer, ended) = stuck.result(Duration::from_secs(60)).await?;
    let error = error_of(&answer).with_context(|| format!("not an error result: {answer:?}"))?;
    common::figure(&format!(
        "the stuck call was answered after {:?}: {error}",
        stuck_since.elapsed()
    ));
    ensure!(error.contains("did not end"), "{error}");
    ensure!(
        ended,
        "the error result is followed by the end of the results"
    );
    ensure!(
        stuck_since.elapsed() >= Duration::from_secs(20),
        "given up too early: {:?}",
        stuck_since.elapsed()
    );
    let waited = timed_echo(&mut peer, "after").await?;
    common::figure(&format!("echo after the stuck call ended: {waited:?}"));
    env.stop().await
}

/// Twenty stuck calls at once hold up nothing either.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_stuck_calls_do_not_hold_up_other_publishes() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    let mut peer = echo_peer(&env, "stuck-many", &mut server).await?;

    let mut stuck = Vec::new();
    for _ in 0..20 {
        stuck.push(RawCall::start(&env.client, 4 * 1024 * 1024).await?);
    }
    for call in &mut stuck {
        call.accepted().await?;
    }
    let mut slowest = Duration::ZERO;
    for n in 0..5 {
        let waited = timed_echo(&mut peer, &format!("echo-{n}")).await?;
        common::figure(&format!("echo {n} with 20 stuck calls: {waited:?}"));
        slowest = slowest.max(waited);
    }
    common::figure(&format!("slowest echo with 20 stuck calls: {slowest:?}"));
    drop(stuck);
    env.stop().await
}

/// A call whose parameter stream goes past `MAX_CALL_BYTES` is dropped as soon as it does,
/// answered with an error result, and later calls work (before, it held its function until
/// the 30 s deadline and got no answer).
#[tokio::test(flavor = "multi_thread")]
async fn a_call_over_max_call_bytes_is_dropped_with_an_error_and_later_calls_work() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    let mut peer = echo_peer(&env, "too-big", &mut server).await?;
    let nats = &env.client;

    // A body that claims more than the limit, sent in full-size messages after the accept.
    let claimed = MAX_CALL_BYTES as u64 + 8 * 1024 * 1024;
    let mut call = RawCall::start(nats, claimed).await?;
    let params = call.accepted().await?;
    let chunk = bytes::Bytes::from(vec![b'b'; nats.server_info().max_payload]);
    let mut sent = nats.server_info().max_payload;
    let started = Instant::now();
    while sent <= MAX_CALL_BYTES {
        nats.publish(params.clone(), chunk.clone()).await?;
        // Paced by the server's acknowledgement, so nats-server's buffer for the provider's
        // connection never holds the whole stream at once.
        nats.flush().await?;
        sent += chunk.len();
    }
    nats.flush().await?;
    common::figure(&format!(
        "sent {sent} parameter bytes in {:?}",
        started.elapsed()
    ));

    let (answer, ended) = call.result(Duration::from_secs(20)).await?;
    common::figure(&format!(
        "the oversized call was answered {:?} after its first byte",
        started.elapsed()
    ));
    let error = error_of(&answer).with_context(|| format!("not an error result: {answer:?}"))?;
    ensure!(error.contains("MAX_CALL_BYTES"), "{error}");
    ensure!(
        ended,
        "the error result is followed by the end of the results"
    );

    // The rest of the oversized stream and its end change nothing; later calls work.
    nats.publish(params.clone(), chunk.clone()).await?;
    nats.publish(params, bytes::Bytes::new()).await?;
    for n in 0..3 {
        let waited = timed_echo(&mut peer, &format!("echo-{n}")).await?;
        common::figure(&format!("echo {n} after the oversized call: {waited:?}"));
    }
    env.stop().await
}

/// A component's publish too large for one NATS message (1.5 MB: the host's client sends the
/// rest after the accept) is gathered and delivered whole, while a stuck call waits and
/// small echoes go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_publish_through_the_host_is_gathered_whole_beside_a_stuck_call() -> Result<()> {
    let env = Env::start().await?;
    let mut server = Server::start().await?;
    let mut peer = echo_peer_with(
        &env,
        "large",
        &mut server,
        &[("MAX_MESSAGE_BYTES", "4194304")],
    )
    .await?;
    let mut stuck = RawCall::start(&env.client, 4 * 1024 * 1024).await?;
    stuck.accepted().await?;

    let large = "L".repeat(1_500_000);
    for n in 0..2 {
        let waited = timed_echo(&mut peer, &large).await?;
        common::figure(&format!("echo {n} of 1.5 MB with a stuck call: {waited:?}"));
        let waited = timed_echo(&mut peer, &format!("small-{n}")).await?;
        common::figure(&format!("small echo {n} after it: {waited:?}"));
    }
    drop(stuck);
    env.stop().await
}
