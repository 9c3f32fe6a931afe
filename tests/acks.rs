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
    peer.send_json(json!({"subject": "in", "body": "!fail", "id": "m2", "ack": true}))
        .await?;
    assert_eq!(
        peer.recv_json().await?["ack"]["error"]["code"],
        "handler_error"
    );
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
