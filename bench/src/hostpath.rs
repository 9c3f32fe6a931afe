//! The host path: what a wasmCloud user runs. The provider under a real wasmCloud host (the
//! `pwasm` example) with the wasm echo component, in several configurations, beside the
//! first-party NATS messaging provider (`wasmcloud-provider-messaging-nats` 0.27.0, wrapped in
//! `bench/nats-provider`) under the same host with the same component, driven over NATS.
//!
//! Scenarios, each on a fresh host:
//! - `1x1`: 1,000 sequential 64 B round trips on one session (latency);
//! - `100x1`: 100 sessions, one message in flight each, for the run's duration;
//! - `burst`: one session, 20,000 frames sent flat out, until the last echo;
//! - `1000x5`: 1,000 sessions (connected first), each sending 5 frames at once.
//!
//! Counted per scenario: echoes lost (not back 10 s after the last arrival), stalled sessions
//! (a session with no echo for over 1 s while it had frames outstanding), echoes out of order
//! (order is promised only with `MAX_IN_FLIGHT=1`; the NATS provider promises none), CPU per
//! echo of the provider, the host process and nats-server, and the provider's peak RSS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;

use crate::load::{self, Pace, Sources, Target};
use crate::procs::WasmHost;
use crate::{measure, Figures, Pids};

/// A gap this long between echoes of a session with frames outstanding is a stall.
const STALL: Duration = Duration::from_secs(1);
/// Frames in the single-socket burst.
pub const BURST: u64 = 20_000;

/// One configuration of the host path.
pub struct Variant {
    pub label: &'static str,
    /// Environment for the `pwasm` process (link and provider config, or the NATS provider).
    pub env: Vec<(&'static str, String)>,
    /// Driven over NATS (the NATS messaging provider) rather than WebSocket.
    pub nats: bool,
}

/// The configurations measured: ours at the default (strict order), ours with 64 calls in
/// flight per session on 1 and 2 runtime threads, and the NATS messaging provider.
pub fn variants(nats_provider: Option<&str>) -> Vec<Variant> {
    let mut v = Vec::new();
    // BENCH_BASELINE_PROVIDER=<binary>: an earlier build of ours first, at its defaults, to
    // compare before and after in one run.
    if let Ok(path) = std::env::var("BENCH_BASELINE_PROVIDER") {
        v.push(Variant {
            label: "ws, baseline build, defaults",
            env: vec![("PWASM_PROVIDER_BINARY", path)],
            nats: false,
        });
    }
    v.extend([
        Variant {
            label: "ws, defaults (MAX_IN_FLIGHT=1)",
            env: vec![],
            nats: false,
        },
        Variant {
            label: "ws, MAX_IN_FLIGHT=64",
            env: vec![("PWASM_LINK_CONFIG", "MAX_IN_FLIGHT=64".into())],
            nats: false,
        },
        Variant {
            label: "ws, MAX_IN_FLIGHT=64, RUNTIME_THREADS=2",
            env: vec![
                ("PWASM_LINK_CONFIG", "MAX_IN_FLIGHT=64".into()),
                ("PWASM_PROVIDER_CONFIG", "RUNTIME_THREADS=2".into()),
            ],
            nats: false,
        },
    ]);
    if let Some(path) = nats_provider {
        v.push(Variant {
            label: "nats provider 0.27 (unordered)",
            env: vec![("PWASM_NATS_PROVIDER", path.to_string())],
            nats: true,
        });
    }
    v
}

/// The figures of one scenario of one variant.
#[derive(Clone, Default)]
pub struct Row {
    pub variant: &'static str,
    pub scenario: &'static str,
    pub rate: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// CPU microseconds per echo: provider, host process, nats-server.
    pub cpu: [Option<f64>; 3],
    pub lost: u64,
    pub stalled: u64,
    pub misordered: u64,
    pub peak_rss_mib: Option<f64>,
}

/// The provider process's peak resident memory (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// What a burst or many-clients run saw.
#[derive(Default)]
struct Counts {
    echoes: AtomicU64,
    lost: AtomicU64,
    stalled: AtomicU64,
    misordered: AtomicU64,
}

/// Where one session's echoes come from.
enum Echoes {
    Ws(load::Rx),
    Nats(async_nats::Subscriber),
}

impl Echoes {
    /// The sequence number of the next echo.
    async fn next(&mut self) -> Result<u64> {
        match self {
            Echoes::Ws(rx) => rx.next().await,
            Echoes::Nats(sub) => {
                let m = sub.next().await.context("subscription ended")?;
                load::seq_of(&m.payload).context("short echo")
            }
        }
    }
}

/// Receives `expect` echoes on one session, counting order, stalls and losses.
async fn receive(expect: u64, counts: &Counts, echoes: &mut Echoes) {
    let mut last_seq = None;
    let mut last_arrival = Instant::now();
    let mut stalled = false;
    let mut got = 0;
    while got < expect {
        match tokio::time::timeout(load::HUNG_AFTER, echoes.next()).await {
            Ok(Ok(seq)) => {
                let now = Instant::now();
                if now - last_arrival > STALL {
                    stalled = true;
                }
                last_arrival = now;
                if last_seq.is_some_and(|l| seq < l) {
                    counts.misordered.fetch_add(1, Ordering::Relaxed);
                }
                last_seq = Some(seq);
                got += 1;
                counts.echoes.fetch_add(1, Ordering::Relaxed);
            }
            // Nothing for 10 s (or the session failed): what is missing is lost.
            _ => {
                stalled = true;
                break;
            }
        }
    }
    counts.lost.fetch_add(expect - got, Ordering::Relaxed);
    if stalled {
        counts.stalled.fetch_add(1, Ordering::Relaxed);
    }
}

/// `sessions` sessions each sending `frames` at once (WebSocket) or as concurrent requests
/// (NATS), connected before the clock starts; returns echoes per second.
async fn many(
    target: &Target,
    sources: &Sources,
    sessions: usize,
    frames: u64,
) -> Result<(f64, Counts)> {
    let counts = Arc::new(Counts::default());
    let started;
    let mut tasks = Vec::with_capacity(sessions);
    match target {
        Target::Ws(_) => {
            let mut streams = Vec::with_capacity(sessions);
            for _ in 0..sessions {
                streams.push(load::open_stream(target, sources, 64).await?);
            }
            started = Instant::now();
            for (mut tx, rx) in streams {
                let counts = Arc::clone(&counts);
                tasks.push(tokio::spawn(async move {
                    let sender = async {
                        for seq in 0..frames {
                            tx.feed(load::frame(seq, 64)).await?;
                            if seq % 64 == 63 {
                                tx.flush().await?;
                            }
                        }
                        tx.flush().await?;
                        anyhow::Ok(tx)
                    };
                    let mut echoes = Echoes::Ws(rx);
                    let receiver = receive(frames, &counts, &mut echoes);
                    let (sent, ()) = futures::join!(sender, receiver);
                    drop(sent);
                }));
            }
        }
        Target::Nats(url) => {
            let client = async_nats::connect(url.as_str()).await?;
            started = Instant::now();
            for _ in 0..sessions {
                let (client, counts) = (client.clone(), Arc::clone(&counts));
                tasks.push(tokio::spawn(async move {
                    let inbox = async_nats::Subject::from(client.new_inbox());
                    let Ok(sub) = client.subscribe(inbox.clone()).await else {
                        counts.lost.fetch_add(frames, Ordering::Relaxed);
                        return;
                    };
                    for seq in 0..frames {
                        if client
                            .publish_with_reply(
                                "bench.echo",
                                inbox.clone(),
                                load::frame(seq, 64).into(),
                            )
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    receive(frames, &counts, &mut Echoes::Nats(sub)).await;
                }));
            }
        }
        _ => anyhow::bail!("the host path is WebSocket or NATS"),
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let counts = Arc::try_unwrap(counts).unwrap_or_default();
    Ok((
        counts.echoes.load(Ordering::Relaxed) as f64 / secs.max(1e-9),
        counts,
    ))
}

/// Runs every scenario of `variant` on a fresh host; `duration` is the 100x1 run's length.
pub async fn run_variant(
    pwasm: &str,
    variant: &Variant,
    sources_block: u8,
    duration: Duration,
) -> Result<Vec<Row>> {
    let host = WasmHost::start_with(pwasm, &variant.env).await?;
    let target = if variant.nats {
        Target::Nats(host.url.clone())
    } else {
        Target::Ws(host.port)
    };
    let pids = Pids {
        server: Some(host.provider),
        standin: host.child.id(),
        nats: Some(host.nats),
        me: std::process::id(),
    };
    let sources = Sources::new(sources_block);
    let mut rows = Vec::new();
    let row = |scenario: &'static str, f: &Figures| Row {
        variant: variant.label,
        scenario,
        rate: f.rate,
        p50: Some(f.p50),
        p99: Some(f.p99),
        cpu: [f.cpu[0], f.cpu[1], f.cpu[2]],
        lost: f.hung + f.failed,
        stalled: 0,
        misordered: f.misordered,
        peak_rss_mib: None,
    };
    // Warm-up (the host's first calls set up its connections and instances), not counted.
    let sequential = |count| {
        move || Pace::Closed {
            window: 1,
            count: Some(count),
            until: Instant::now() + Duration::from_secs(3600),
        }
    };
    measure(&target, pids, &sources, 1, 64, sequential(300)).await?;
    let lat = measure(&target, pids, &sources, 1, 64, sequential(1000)).await?;
    rows.push(row("1x1", &lat));
    let until = Instant::now() + duration;
    let thr = measure(&target, pids, &sources, 100, 64, || Pace::Closed {
        window: 1,
        count: None,
        until,
    })
    .await?;
    rows.push(row("100x1", &thr));
    for (scenario, sessions, frames) in [("burst 1x20000", 1, BURST), ("1000x5", 1000, 5)] {
        let before = pids.cpu();
        let (rate, counts) = many(&target, &sources, sessions, frames).await?;
        let after = pids.cpu();
        let echoes = counts.echoes.load(Ordering::Relaxed);
        let per = |i: usize| match (before[i], after[i]) {
            (Some(a), Some(b)) if echoes > 0 => Some((b - a) as f64 / echoes as f64),
            _ => None,
        };
        rows.push(Row {
            variant: variant.label,
            scenario,
            rate,
            p50: None,
            p99: None,
            cpu: [per(0), per(1), per(2)],
            lost: counts.lost.load(Ordering::Relaxed),
            stalled: counts.stalled.load(Ordering::Relaxed),
            misordered: counts.misordered.load(Ordering::Relaxed),
            peak_rss_mib: None,
        });
    }
    let peak = peak_rss_mib(host.provider);
    for r in &mut rows {
        r.peak_rss_mib = peak;
    }
    host.stop().await;
    Ok(rows)
}

/// Prints the host-path table and the ratios the issue asks for; returns the lost echoes.
pub fn report(rows: &[Row]) -> u64 {
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
    println!("\n### Host path: real wasmCloud host, wasm echo component\n");
    println!("| provider, config | scenario | echoes/s | p50 us | p99 us | CPU us/echo: provider | host | nats-server | lost | stalled sessions | out of order | provider peak RSS MiB |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.variant,
            r.scenario,
            r.rate,
            fmt(r.p50),
            fmt(r.p99),
            fmt(r.cpu[0]),
            fmt(r.cpu[1]),
            fmt(r.cpu[2]),
            r.lost,
            r.stalled,
            r.misordered,
            fmt(r.peak_rss_mib),
        );
    }
    let get = |variant: &str, scenario: &str| {
        rows.iter()
            .find(|r| r.variant.starts_with(variant) && r.scenario == scenario)
    };
    let check = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\nhost-path targets (issue 12), ratios from this run:");
    let lost: u64 = rows.iter().map(|r| r.lost).sum();
    let ws_lost: u64 = rows
        .iter()
        .filter(|r| r.variant.starts_with("ws") && !r.variant.starts_with("ws, baseline"))
        .map(|r| r.lost)
        .sum();
    println!(
        "- zero lost echoes through the host (this build, every variant): {ws_lost} -> {}",
        check(ws_lost == 0)
    );
    if let (Some(one), Some(wide)) = (
        get("ws, defaults", "burst 1x20000"),
        get("ws, MAX_IN_FLIGHT=64", "burst 1x20000"),
    ) {
        let x = wide.rate / one.rate.max(1e-9);
        println!(
            "- one socket, 20,000 frames: MAX_IN_FLIGHT=64 >= 3x the default: {:.0} vs {:.0} echoes/s = {x:.2}x -> {}",
            wide.rate,
            one.rate,
            check(x >= 3.0)
        );
    }
    // "Today": the baseline build measured in this run when given, else BENCHMARKS.md's figure
    // for the previous release (1,460/s, 100x1).
    for scenario in ["1x1", "100x1", "burst 1x20000", "1000x5"] {
        if let (Some(now), Some(before)) =
            (get("ws, defaults", scenario), get("ws, baseline", scenario))
        {
            println!(
                "- defaults vs the baseline build, {scenario}: {:.0} vs {:.0} echoes/s = {:.2}x; lost {} vs {}; stalled sessions {} vs {}",
                now.rate,
                before.rate,
                now.rate / before.rate.max(1e-9),
                now.lost,
                before.lost,
                now.stalled,
                before.stalled
            );
        }
    }
    if let Some(r) = get("ws, defaults", "100x1") {
        let (base, from) = match get("ws, baseline", "100x1") {
            Some(b) => (b.rate, "the baseline build in this run"),
            None => (1460.0, "BENCHMARKS.md's previous ~1,460/s"),
        };
        println!(
            "- 100 sessions x 1 >= 3x {from}: {:.0} vs {base:.0}/s = {:.2}x -> {}",
            r.rate,
            r.rate / base.max(1e-9),
            check(r.rate >= 3.0 * base)
        );
    }
    for (ours_label, ours_name) in [
        ("ws, defaults", "defaults, order kept"),
        ("ws, MAX_IN_FLIGHT=64", "MAX_IN_FLIGHT=64"),
    ] {
        for scenario in ["1x1", "100x1", "burst 1x20000", "1000x5"] {
            if let (Some(ours), Some(theirs)) =
                (get(ours_label, scenario), get("nats provider", scenario))
            {
                let rate = ours.rate / theirs.rate.max(1e-9);
                let cpu = match (ours.cpu[0], theirs.cpu[0]) {
                    (Some(a), Some(b)) => Some(a / b.max(1e-9)),
                    _ => None,
                };
                let rss = match (ours.peak_rss_mib, theirs.peak_rss_mib) {
                    (Some(a), Some(b)) => Some(a / b.max(1e-9)),
                    _ => None,
                };
                let beaten =
                    rate >= 1.0 && cpu.is_some_and(|c| c <= 1.0) && rss.is_some_and(|m| m <= 1.0);
                println!(
                    "- vs the NATS provider ({ours_name}), {scenario}: rate {rate:.2}, provider CPU {}, peak RSS {} -> {}",
                    cpu.map_or("-".into(), |c| format!("{c:.2}")),
                    rss.map_or("-".into(), |m| format!("{m:.2}")),
                    if beaten { "beaten" } else { "NOT beaten" }
                );
            }
        }
    }
    lost
}

/// The whole host path: every variant, one after another, each on its own host.
pub async fn run(pwasm: &str, nats_provider: Option<&str>, duration: Duration) -> Result<u64> {
    let mut rows = Vec::new();
    // BENCH_VARIANTS=0,3: only these variants (by position), for quick comparisons.
    let only: Option<Vec<usize>> = std::env::var("BENCH_VARIANTS")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    for (i, variant) in variants(nats_provider).iter().enumerate() {
        if only.as_ref().is_some_and(|only| !only.contains(&i)) {
            continue;
        }
        eprintln!("host path: {}", variant.label);
        match run_variant(pwasm, variant, 200 + i as u8, duration).await {
            Ok(r) => rows.extend(r),
            Err(e) => eprintln!("  failed: {e:#}"),
        }
    }
    Ok(report(&rows))
}

/// One NATS message seen by the sniffer.
struct Seen {
    at: Duration,
    subject: String,
    reply: Option<String>,
    payload: bytes::Bytes,
}

/// `--sniff-host`: one echo's path hop by hop through the real host. Runs `100x1` on the
/// default variant while a subscriber on `>` records every NATS message, then follows each
/// echo: the provider's `handle-message` call, the host's accept, our end of parameters, the
/// component's `publish` call, our accept, the host's end of parameters, our results, the
/// host's results. Prints the median and p90 of each step's wait, so the slow hop shows.
pub async fn sniff(pwasm: &str, variant: &Variant, duration: Duration) -> Result<()> {
    let host = WasmHost::start_with(pwasm, &variant.env).await?;
    let nats_url = host
        .nats_url
        .clone()
        .context("the READY line named no NATS URL")?;
    let client = async_nats::connect(nats_url.as_str()).await?;
    let mut all = client.subscribe(">").await?;
    client.flush().await?;
    let t0 = Instant::now();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Seen>::new()));
    let recorder = tokio::spawn({
        let seen = Arc::clone(&seen);
        async move {
            while let Some(m) = all.next().await {
                let s = Seen {
                    at: t0.elapsed(),
                    subject: m.subject.to_string(),
                    reply: m.reply.map(|r| r.to_string()),
                    payload: m.payload,
                };
                if let Ok(mut v) = seen.lock() {
                    v.push(s);
                }
            }
        }
    });
    let sources = Sources::new(250);
    let until = Instant::now() + duration;
    let pids = Pids {
        server: Some(host.provider),
        standin: host.child.id(),
        nats: Some(host.nats),
        me: std::process::id(),
    };
    let f = measure(&Target::Ws(host.port), pids, &sources, 100, 64, || {
        Pace::Closed {
            window: 1,
            count: None,
            until,
        }
    })
    .await?;
    recorder.abort();
    host.stop().await;
    let seen = std::mem::take(&mut *seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    println!(
        "\nsniffed {} NATS messages during 100x1 ({:.0} echoes/s, p50 {:.0} us)",
        seen.len(),
        f.rate,
        f.p50
    );
    timeline(&seen);
    Ok(())
}

/// (session ID, sequence bytes) of the echo a wRPC call's parameters carry.
fn echo_key(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    const SESSION: &[u8] = b"ws.session.";
    let at = payload.windows(SESSION.len()).position(|w| w == SESSION)? + SESSION.len();
    let id = payload.get(at..at + 36)?;
    let body = payload.iter().position(|&b| b == b'#')?;
    Some((id, payload.get(body + 1..body + 9)?))
}

/// Follows every echo through the recorded messages and prints each hop's wait.
fn timeline(seen: &[Seen]) {
    use std::collections::HashMap;
    // First arrival per subject (accepts and results come on the caller's inbox).
    let mut first: HashMap<&str, (Duration, Option<&str>)> = HashMap::new();
    for s in seen {
        first
            .entry(s.subject.as_str())
            .or_insert((s.at, s.reply.as_deref()));
    }
    // The component's publish calls, by echo: the session ID and the frame's sequence number
    // are in both calls (as `reply_to` and subject, and in the body).
    let mut publishes: HashMap<(&[u8], &[u8]), &Seen> = HashMap::new();
    for s in seen {
        if s.subject.ends_with("consumer@0.2.0.publish") {
            if let Some(key) = echo_key(&s.payload) {
                publishes.entry(key).or_insert(s);
            }
        }
    }
    let steps = [
        "provider -> host: handle-message call .. host's accept",
        "host's accept .. provider's end of parameters",
        "provider's end of parameters .. component's publish call",
        "publish call .. provider's accept",
        "provider's accept .. host's end of parameters",
        "host's end of parameters .. provider's results",
        "provider's results .. host's handle-message results",
    ];
    let mut waits: Vec<Vec<u64>> = vec![Vec::new(); steps.len()];
    let mut followed = 0;
    let mut slowest: Option<(u64, Vec<u64>)> = None;
    // Calls that stopped at a hop: the hop's index (0: no accept from the host, ...).
    let mut stuck = vec![0u32; steps.len()];
    for s in seen {
        if !s.subject.ends_with("handler@0.2.0.handle-message") {
            continue;
        }
        let Some(r1) = s.reply.as_deref() else {
            continue;
        };
        let Some(key) = echo_key(&s.payload) else {
            continue;
        };
        let accept = first.get(r1).copied();
        let eos = accept
            .and_then(|(_, s1)| s1)
            .and_then(|s1| first.get(format!("{s1}.params").as_str()).copied());
        let publish = publishes.get(&key).copied();
        let r2 = publish.and_then(|p| p.reply.as_deref());
        let accept2 = r2.and_then(|r2| first.get(r2).copied());
        let eos2 = accept2
            .and_then(|(_, s2)| s2)
            .and_then(|s2| first.get(format!("{s2}.params").as_str()).copied());
        let res2 = r2.and_then(|r2| first.get(format!("{r2}.results").as_str()).copied());
        let res1 = first.get(format!("{r1}.results").as_str()).copied();
        let steps_at = [
            accept.map(|a| a.0),
            eos.map(|e| e.0),
            publish.map(|p| p.at),
            accept2.map(|a| a.0),
            eos2.map(|e| e.0),
            res2.map(|r| r.0),
            res1.map(|r| r.0),
        ];
        if let Some(missing) = steps_at.iter().position(Option::is_none) {
            stuck[missing] += 1;
            continue;
        }
        let times: Vec<Duration> = std::iter::once(s.at)
            .chain(steps_at.iter().flatten().copied())
            .collect();
        let hops: Vec<u64> = times
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]).as_micros() as u64)
            .collect();
        for (k, w) in hops.iter().enumerate() {
            waits[k].push(*w);
        }
        let total = hops.iter().sum::<u64>();
        if slowest.as_ref().is_none_or(|(t, _)| total > *t) {
            slowest = Some((total, hops));
        }
        followed += 1;
    }
    println!("followed {followed} echoes hop by hop:\n");
    for (step, n) in steps.iter().zip(&stuck) {
        if *n > 0 {
            println!("- {n} calls never got past: {step}");
        }
    }
    println!("\n| hop | p50 us | p90 us | p99 us | slowest echo, us |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (k, (step, mut w)) in steps.iter().zip(waits).enumerate() {
        w.sort_unstable();
        let q = |p: f64| {
            w.get(((w.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(0)
        };
        let slow = slowest
            .as_ref()
            .and_then(|(_, h)| h.get(k))
            .copied()
            .unwrap_or(0);
        println!(
            "| {step} | {} | {} | {} | {slow} |",
            q(0.5),
            q(0.9),
            q(0.99)
        );
    }
}
