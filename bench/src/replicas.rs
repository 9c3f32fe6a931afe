//! `--replicas`: the provider as two replicas (two processes with the host data of two hosts:
//! same provider ID and links, own host ID and port) on one NATS with JetStream, against one
//! replica, in the same run.
//!
//! - echo through replica A with one replica, then with two: the stand-in's publish back to the
//!   session reaches either replica (the queue group), so about half of them are forwarded to A;
//! - fan-out (`broadcast`) to idle sessions on one replica, then split over both;
//! - what the replicas counted (forwarded, served), from their health.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::StreamExt as _;

use crate::load::{self, Pace, Sources, Target};
use crate::{measure, procs, standin, Figures, Pids};

/// The health messages of the replicas that answer one request within a second.
async fn healths(client: &async_nats::Client) -> Result<Vec<String>> {
    let subject = format!(
        "wasmbus.rpc.{}.{}.health",
        standin::LATTICE,
        standin::PROVIDER_ID
    );
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject, inbox, "".into())
        .await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, answers.next()).await {
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        out.push(v["message"].as_str().unwrap_or_default().to_string());
    }
    Ok(out)
}

/// Waits until `n` replicas answer health and each knows of all `n`.
async fn wait_replicas(client: &async_nats::Client, n: usize) -> Result<Vec<String>> {
    for _ in 0..60 {
        let h = healths(client).await?;
        if h.len() == n && h.iter().all(|m| m.contains(&format!(" of {n};"))) {
            return Ok(h);
        }
    }
    bail!("the {n} replicas did not see each other")
}

fn counted(healths: &[String], what: &str) -> u64 {
    healths
        .iter()
        .filter_map(|h| {
            let at = h.find(&format!("{what} "))? + what.len() + 1;
            h[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// One broadcast from a trigger session on `ports[0]` to `n` idle sessions spread over `ports`:
/// (delivered, seconds to the last arrival).
async fn fanout(ports: &[u16], sources: &Sources, n: usize) -> Result<(u64, f64)> {
    let mut trigger = load::Trigger::open(ports[0], sources).await?;
    let mut idle = Vec::new();
    for &port in ports {
        idle.push(load::Idle::open(port, sources, n / ports.len(), 100).await?);
    }
    let expect = (n / ports.len() * ports.len()) as u64;
    let seen = |idle: &[load::Idle]| idle.iter().map(|i| i.arrivals().0).sum::<u64>();
    let last = |idle: &[load::Idle]| idle.iter().map(|i| i.arrivals().1).max();
    let before = seen(&idle);
    let (sent, answer) = trigger.command("!fanout all").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen(&idle) - before < expect && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if !answer.starts_with("done") {
        eprintln!("    fan-out: {answer}");
    }
    let got = seen(&idle) - before;
    let secs = last(&idle)
        .map(|l| l.saturating_duration_since(sent).as_secs_f64())
        .unwrap_or(0.0);
    for i in idle {
        i.close().await;
    }
    Ok((got, secs))
}

pub async fn run(
    provider_bin: &str,
    nats: &procs::Nats,
    standin_pid: Option<u32>,
    sessions: usize,
    samples: u64,
    duration: Duration,
    idle: usize,
) -> Result<()> {
    let client = async_nats::connect(nats.url.as_str()).await?;
    let me = std::process::id();
    let pids = |server: Option<u32>| Pids {
        server,
        standin: standin_pid,
        nats: nats.child.id(),
        me,
    };
    let (pa, pb) = (procs::free_port()?, procs::free_port()?);
    let mut a = standin::start_replica(provider_bin, &nats.url, pa, "bench-host-a").await?;
    procs::wait_port(pa).await?;
    wait_replicas(&client, 1).await?;
    let echo = |label: &'static str, round: u8| {
        let pids = pids(a.id());
        async move {
            let sources = Sources::new(200 + round);
            eprintln!("  {label}");
            let lat = measure(&Target::Ws(pa), pids, &sources, 1, 64, || Pace::Closed {
                window: 1,
                count: Some(samples),
                until: Instant::now() + Duration::from_secs(3600),
            })
            .await?;
            let until = Instant::now() + duration;
            let thr = measure(&Target::Ws(pa), pids, &sources, sessions, 64, || Pace::Closed {
                window: 1,
                count: None,
                until,
            })
            .await?;
            anyhow::Ok((lat, thr))
        }
    };
    eprintln!("replicas: one");
    let one = echo("one replica", 0).await?;
    let one_fan = fanout(&[pa], &Sources::new(210), idle).await?;
    eprintln!("replicas: two");
    let mut b = standin::start_replica(provider_bin, &nats.url, pb, "bench-host-b").await?;
    procs::wait_port(pb).await?;
    wait_replicas(&client, 2).await?;
    let counts_before = healths(&client).await?;
    let two = echo("two replicas", 1).await?;
    let counts_after = wait_replicas(&client, 2).await?;
    let forwarded =
        counted(&counts_after, "forwarded") - counted(&counts_before, "forwarded").min(counted(&counts_after, "forwarded"));
    let two_fan = fanout(&[pa, pb], &Sources::new(220), idle).await?;
    let _ = b.kill().await;
    let _ = a.kill().await;

    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    let row = |name: &str, scenario: String, f: &Figures| {
        println!(
            "| {name} | {scenario} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            f.rate,
            f.p50,
            f.p99,
            fmt(f.cpu[0]),
            f.hung,
            f.misordered
        );
    };
    println!("\n| replicas (echo through replica A) | scenario | msg/s | p50 us | p99 us | CPU us/msg: replica A | hung | misordered |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    row("one replica", "1x1 64B".into(), &one.0);
    row("one replica", format!("{sessions}x1 64B"), &one.1);
    row("two replicas", "1x1 64B".into(), &two.0);
    row("two replicas", format!("{sessions}x1 64B"), &two.1);
    let echoes = two.0.rate * 0.0 + (samples as f64) + two.1.rate * duration.as_secs_f64();
    println!(
        "- calls forwarded between the replicas during the two-replica echoes: {forwarded} (about {:.0}% of the echoes)",
        100.0 * forwarded as f64 / echoes.max(1.0)
    );
    println!(
        "- two replicas / one, {sessions}x1 throughput: {:.2}; 1x1 p50: {:.2}",
        two.1.rate / one.1.rate.max(1e-9),
        two.0.p50 / one.0.p50.max(1e-9)
    );
    println!("\n| fan-out (broadcast) | delivered | ms to last arrival | deliveries/s |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, (got, secs)) in [("one replica", one_fan), ("two replicas, sessions split", two_fan)] {
        println!(
            "| {name} | {got} | {:.2} | {:.0} |",
            secs * 1e3,
            got as f64 / secs.max(1e-9)
        );
    }
    let lost = [one_fan, two_fan]
        .iter()
        .filter(|(got, _)| *got < (idle / 2 * 2) as u64)
        .count();
    if one.1.hung + two.1.hung + one.0.hung + two.0.hung > 0 || lost > 0 {
        bail!("replicas: hung echoes or fan-outs that missed sessions");
    }
    Ok(())
}
