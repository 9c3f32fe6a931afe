//! Acknowledgments under a real host (`FORMAT=json`): a peer's envelope with an `id` and
//! `"ack": true` gets exactly one `{"ack": ...}` answer saying whether `handle-message` handled
//! it, and a retried ID is answered again without a second delivery.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use common::ws::{connect, ClientPeer};
use common::Env;
use serde_json::{json, Value};

const SILENCE: Duration = Duration::from_millis(700);

/// Reads frames until `acks` ack answers have arrived; returns them by ID (each ID's answers, in
/// order) and the other frames' bodies, in order.
async fn collect(
    peer: &mut ClientPeer,
    acks: usize,
) -> Result<(BTreeMap<String, Vec<Value>>, Vec<String>)> {
    let (mut answers, mut others) = (BTreeMap::<String, Vec<Value>>::new(), Vec::new());
    let mut seen = 0;
    while seen < acks {
        let frame = peer.recv_json().await?;
        if let Some(ack) = frame.get("ack") {
            let id = ack["id"].as_str().context("ack without id")?.to_string();
            answers.entry(id).or_default().push(ack.clone());
            seen += 1;
        } else {
            others.push(frame["body"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok((answers, others))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acked_envelope_gets_one_answer_with_the_handlers_outcome() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve(
            "acker",
            "ack-server",
            &[("FORMAT", "json"), ("HANDLER_TIMEOUT_MS", "3000")],
        )
        .await?;
    let mut peer = connect(&url, &[]).await?;

    // Every third message makes the component's handle-message return an error.
    for i in 0..12 {
        let body = if i % 3 == 2 {
            "!fail".to_string()
        } else {
            format!("hello {i}")
        };
        peer.send_json(json!({"subject": "in", "body": body, "id": format!("m{i}"), "ack": true}))
            .await?;
    }
    let (answers, echoes) = collect(&mut peer, 12).await?;
    for i in 0..12 {
        let id = format!("m{i}");
        let got = answers
            .get(&id)
            .with_context(|| format!("no answer for {id}"))?;
        ensure!(
            got.len() == 1,
            "{id} was answered {} times: {got:?}",
            got.len()
        );
        let ack = &got[0];
        if i % 3 == 2 {
            ensure!(ack["ok"] == json!(false), "{id}: {ack}");
            ensure!(ack["error"]["code"] == "handler_error", "{id}: {ack}");
            ensure!(ack["error"]["message"] == "asked to fail", "{id}: {ack}");
        } else {
            ensure!(ack == &json!({"id": id, "ok": true}), "{id}: {ack}");
        }
    }
    // The echoes of the handled ones may come before or after the last ack: read what is left.
    let mut echoes = echoes;
    while echoes.len() < 8 {
        echoes.push(
            peer.recv_json().await?["body"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let expected: Vec<String> = (0..12)
        .filter(|i| i % 3 != 2)
        .map(|i| format!("hello {i}"))
        .collect();
    assert_eq!(
        echoes, expected,
        "each handled message was delivered once, in order"
    );
    peer.expect_silence(SILENCE).await?;

    // A retry of an answered ID is answered again, the same way, and not delivered again.
    peer.send_json(json!({"subject": "in", "body": "hello 0", "id": "m0", "ack": true}))
        .await?;
    assert_eq!(
        peer.recv_json().await?,
        json!({"ack": {"id": "m0", "ok": true}})
    );
    peer.expect_silence(SILENCE).await?;
    // A message that was not handled is delivered again when retried.
    peer.send_json(json!({"subject": "in", "body": "hello again", "id": "m2", "ack": true}))
        .await?;
    let (answers, others) = collect(&mut peer, 1).await?;
    ensure!(answers["m2"][0]["ok"] == json!(true), "{answers:?}");
    if others.is_empty() {
        assert_eq!(peer.recv_json().await?["body"], "hello again");
    } else {
        assert_eq!(others, ["hello again"]);
    }
    peer.expect_silence(SILENCE).await?;

    // A retry while the first is still being handled: one delivery, two answers.
    peer.send_json(json!({"subject": "in", "body": "!sleep 300", "id": "slow", "ack": true}))
        .await?;
    peer.send_json(json!({"subject": "in", "body": "!sleep 300", "id": "slow", "ack": true}))
        .await?;
    let (answers, others) = collect(&mut peer, 2).await?;
    ensure!(
        answers["slow"].iter().all(|a| a["ok"] == json!(true)),
        "{answers:?}"
    );
    let mut others = others;
    if others.is_empty() {
        others.push(
            peer.recv_json().await?["body"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(others, vec!["SLEPT 300".to_string()]);
    peer.expect_silence(SILENCE).await?;

    // A call that outlives the handler timeout is answered as a timeout.
    peer.send_json(json!({"subject": "in", "body": "!sleep 6000", "id": "late", "ack": true}))
        .await?;
    let (answers, _) = collect(&mut peer, 1).await?;
    ensure!(
        answers["late"][0]["error"]["code"] == "timeout",
        "{answers:?}"
    );

    // Without "ack": true no answer is written; a bad id is an invalid envelope.
    peer.send_json(json!({"subject": "in", "body": "quiet", "id": "q"}))
        .await?;
    assert_eq!(peer.recv_json().await?["body"], "quiet");
    peer.send_json(json!({"subject": "in", "body": "x", "id": "x".repeat(129), "ack": true}))
        .await?;
    let error = peer.recv_json().await?;
    ensure!(error["error"]["code"] == "invalid_envelope", "{error}");
    ensure!(
        error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("1 to 128 bytes"),
        "{error}"
    );
    peer.expect_silence(SILENCE).await?;
    env.stop().await
}

/// The session ID of a JSON peer, as the component sees it.
async fn json_session_id(peer: &mut ClientPeer) -> Result<String> {
    peer.send_json(json!({"subject": "x", "body": "!whoami"}))
        .await?;
    let subject = peer.recv_json().await?["body"]
        .as_str()
        .context("whoami")?
        .to_string();
    Ok(subject
        .strip_prefix("ws.session.")
        .context("a session subject")?
        .to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn send_acked_returns_with_the_peers_answer_and_many_wait_at_once() -> Result<()> {
    let env = Env::start().await?;
    let url = env
        .serve(
            "sender",
            "send-server",
            &[("FORMAT", "json"), ("MAX_IN_FLIGHT", "4")],
        )
        .await?;
    let mut peer = connect(&url, &[]).await?;
    let id = json_session_id(&mut peer).await?;

    // Three acknowledged sends wait at once; the peer answers them in reverse order.
    for text in ["p1", "p2", "p3"] {
        peer.send_json(json!({"subject": "x", "body": format!("!send-acked {id} 30000 {text}")}))
            .await?;
    }
    let mut written = Vec::new();
    for _ in 0..3 {
        let frame = peer.recv_json().await?;
        ensure!(
            frame["ack"] == json!(true) && frame["subject"] == "direct",
            "{frame}"
        );
        let msg_id = frame["id"].as_str().context("an id")?.to_string();
        written.push((
            frame["body"].as_str().unwrap_or_default().to_string(),
            msg_id,
        ));
    }
    written.sort();
    let bodies: Vec<&str> = written.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(bodies, ["p1", "p2", "p3"]);
    peer.expect_silence(SILENCE).await?;
    let mut answered = Vec::new();
    for (body, msg_id) in written.iter().rev() {
        peer.send_json(json!({"ack": {"id": msg_id, "ok": true}}))
            .await?;
        answered.push(
            peer.recv_json().await?["body"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        assert_eq!(
            answered.last().map(String::as_str),
            Some(format!("ACKED {body}").as_str())
        );
    }

    // A refusal is the call's error, with the peer's reason; so is silence past the timeout.
    peer.send_json(json!({"subject": "x", "body": format!("!send-acked {id} 30000 no")}))
        .await?;
    let frame = peer.recv_json().await?;
    let msg_id = frame["id"].as_str().context("an id")?.to_string();
    peer.send_json(
        json!({"ack": {"id": msg_id, "ok": false, "error": {"code": "busy", "message": "later"}}}),
    )
    .await?;
    let answer = peer.recv_json().await?["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        answer.starts_with("ERR") && answer.contains("busy: later"),
        "{answer}"
    );
    peer.send_json(json!({"subject": "x", "body": format!("!send-acked {id} 800 lost")}))
        .await?;
    let frame = peer.recv_json().await?;
    ensure!(frame["body"] == "lost", "{frame}");
    let answer = peer.recv_json().await?["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        answer.contains("did not acknowledge") && answer.contains("800 ms"),
        "{answer}"
    );
    // A late answer to the send that timed out is ignored.
    peer.send_json(json!({"ack": {"id": frame["id"]}})).await?;
    peer.expect_silence(SILENCE).await?;

    // A send waiting on a session that ends fails at once, not at its timeout.
    let mut other = connect(&url, &[]).await?;
    let other_id = json_session_id(&mut other).await?;
    peer.send_json(json!({"subject": "x", "body": format!("!send-acked {other_id} 60000 bye")}))
        .await?;
    let frame = other.recv_json().await?;
    ensure!(frame["body"] == "bye", "{frame}");
    let started = std::time::Instant::now();
    other.ws.close(None).await?;
    let answer = peer.recv_json().await?["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        answer.contains("ended before its peer acknowledged"),
        "{answer}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?}",
        started.elapsed()
    );
    env.stop().await
}
