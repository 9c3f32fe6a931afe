//! Benchmarks for the WebSocket messaging provider, with baselines measured in the same run.
//!
//! Targets, each in its own process(es), all over loopback:
//! - B0: raw TCP echo (tokio);
//! - B1: raw tokio-tungstenite echo with the provider's WebSocket settings;
//! - B2: raw NATS request/reply (a responder in the stand-in process);
//! - B3: a raw wRPC `handle-message` call over NATS (stock wrpc-transport-nats 0.29 client, the
//!   stand-in's no-op server);
//! - P: the provider binary in server mode, started the way a host starts it, with a native
//!   stand-in component (its own process) that publishes each body back to its session;
//! - P-wasm (`--pwasm <examples/pwasm binary>`, not in `--quick`): the provider under a real
//!   wasmCloud host with the real wasm echo component (1x1 and 100x1 only).
//!
//! Scenarios: 1 session x 1 in flight (latency floor); 100 x 1 at 64 B and 1 KiB (throughput,
//! CPU per message); 10 x 32 (pipelining, order checked); open loop at 50% of the 100 x 1
//! maximum (stream targets); N idle sessions (memory per session, handshakes per second) and
//! fan-out of one component call to 1, 100, 1,000 and all of them (P). Rounds repeat with the
//! targets in a different order each time; tables show medians, counts are summed.
//!
//! - R (`replicas.rs`): the provider as two replicas against one, in the same run: echo through
//!   one replica while the other serves about half of the calls back, and fan-out to sessions
//!   split over both.
//! - `P json` (`json.rs`, issue 16): P's provider with `FORMAT=json`, plain against
//!   `RECOVERY=true` (every message numbered and stored in JetStream) and against an ack asked for
//!   every message, alternated over 5 rounds (in `--quick` too, about 20 s): 1x1 and 100x1
//!   msg/s, latency, provider and nats-server CPU per message, and the ratios to plain. On its
//!   own: `--only "P json"` (with `--quick` for short rounds).
//!
//! Run: `./scripts/bench.sh` (full, a few minutes) or `./scripts/bench.sh --quick` (the CI smoke,
//! which fails only on gross regressions, by ratio). For hot-path work: `--focus` (B1, B3, P
//! and P-wasm at 1x1 and 100x1, one round), `--only NAME[,NAME]`, `--idle N`; `BENCH_SNIFF=1`
//! prints the NATS messages of a few P echoes with their times; `BENCH_FANOUT_REPEAT=N` fans
//! out to all N more times (to profile that path).

mod hostpath;
mod json;
mod load;
mod procs;
mod replicas;
mod standin;

/// Bindings for baseline B3's caller.
mod b3 {
    wit_bindgen_wrpc::generate!({ world: "b3-client", path: "wit", generate_all });
    pub use self::wasmcloud::messaging::handler;
    pub use self::wasmcloud::messaging::types::BrokerMessage;
}

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use load::{Pace, Sources, Target};

struct Options {
    quick: bool,
    /// `--focus`: only B1, B3 and P, only 1x1 and 100x1 64 B, no idle sessions (for hot-path work).
    focus: bool,
    rounds: usize,
    duration: Duration,
    latency_samples: u64,
    sessions: usize,
    idle: usize,
}

/// `--serve-tcp PORT` / `--serve-ws PORT`: the baseline echo servers (B0, B1).
async fn serve_baseline(ws: bool, port: u16) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            if ws {
                let Ok(ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(load::ws_config()))
                        .await
                else {
                    return;
                };
                // Echo what is ready, flush once: the provider's own write policy.
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(m)) = rx.next().await {
                    if (m.is_text() || m.is_binary()) && tx.feed(m).await.is_err() {
                        return;
                    }
                    while let Some(Some(Ok(m))) = futures::FutureExt::now_or_never(rx.next()) {
                        if (m.is_text() || m.is_binary()) && tx.feed(m).await.is_err() {
                            return;
                        }
                    }
                    if tx.flush().await.is_err() {
                        return;
                    }
                }
            } else {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// The figures of one target in one scenario in one round.
#[derive(Clone, Default)]
struct Figures {
    /// Messages done (summed over rounds in a summary).
    msgs: u64,
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    /// CPU microseconds per message: serving process, stand-in, nats-server, load generator.
    cpu: [Option<f64>; 4],
    hung: u64,
    failed: u64,
    misordered: u64,
}

/// Process IDs whose CPU time is charged per message.
#[derive(Clone, Copy)]
struct Pids {
    server: Option<u32>,
    standin: Option<u32>,
    nats: Option<u32>,
    me: u32,
}

impl Pids {
    fn cpu(&self) -> [Option<u64>; 4] {
        [self.server, self.standin, self.nats, Some(self.me)].map(|p| p.and_then(procs::cpu_us))
    }
}

async fn measure(
    target: &Target,
    pids: Pids,
    sources: &Sources,
    sessions: usize,
    size: usize,
    pace: impl Fn() -> Pace,
) -> Result<Figures> {
    let before = pids.cpu();
    let run = load::run(target, sources, sessions, size, pace).await?;
    let after = pids.cpu();
    let per_msg = |i: usize| match (before[i], after[i]) {
        (Some(a), Some(b)) if run.msgs > 0 => Some((b - a) as f64 / run.msgs as f64),
        _ => None,
    };
    Ok(Figures {
        msgs: run.msgs,
        rate: run.msgs as f64 / run.secs.max(1e-9),
        p50: run.hist.value_at_quantile(0.5) as f64,
        p99: run.hist.value_at_quantile(0.99) as f64,
        p999: run.hist.value_at_quantile(0.999) as f64,
        cpu: [per_msg(0), per_msg(1), per_msg(2), per_msg(3)],
        hung: run.hung,
        failed: run.failed,
        misordered: run.misordered,
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

/// Medians (rates, latencies, CPU) and sums (counts) over rounds.
fn summarize(f: &[Figures]) -> Figures {
    let m = |g: fn(&Figures) -> f64| median(f.iter().map(g).collect()).unwrap_or(0.0);
    let cpu = |i: usize| median(f.iter().filter_map(|x| x.cpu[i]).collect());
    Figures {
        msgs: f.iter().map(|x| x.msgs).sum(),
        rate: m(|x| x.rate),
        p50: m(|x| x.p50),
        p99: m(|x| x.p99),
        p999: m(|x| x.p999),
        cpu: [cpu(0), cpu(1), cpu(2), cpu(3)],
        hung: f.iter().map(|x| x.hung).sum(),
        failed: f.iter().map(|x| x.failed).sum(),
        misordered: f.iter().map(|x| x.misordered).sum(),
    }
}

/// One idle-sessions measurement (and, for P, fan-out over them).
#[derive(Default, Clone)]
struct IdleFigures {
    sessions: usize,
    handshakes_per_sec: f64,
    kib_per_session: f64,
    growth_kib_per_session: Option<f64>,
    /// (targets, delivered, seconds from the trigger to the last arrival, provider CPU
    /// microseconds per delivery)
    fanout: Vec<(String, u64, f64, Option<f64>)>,
}

/// Opens `n` idle sessions on `port`, samples the server's memory, and (for P) runs fan-out.
async fn idle_and_fanout(
    port: u16,
    server: u32,
    sources: &Sources,
    n: usize,
    fanout: bool,
) -> Result<IdleFigures> {
    let mut trigger = if fanout {
        Some(load::Trigger::open(port, sources).await?)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = procs::rss_anon_kib(server).context("no RSS")?;
    let idle = load::Idle::open(port, sources, n, 100).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = procs::rss_anon_kib(server).context("no RSS")?;
    let mut figures = IdleFigures {
        sessions: n,
        handshakes_per_sec: idle.handshakes_per_sec,
        kib_per_session: during.saturating_sub(before) as f64 / n as f64,
        ..Default::default()
    };
    if let Some(trigger) = trigger.as_mut() {
        let (_, ready) = trigger.command("!fanout-prepare").await?;
        if !ready.starts_with("ready") {
            bail!("fan-out prepare failed: {ready}");
        }
        let mut counts: Vec<(String, u64)> = [1usize, 100, 1000]
            .into_iter()
            .filter(|&k| k < n)
            .map(|k| (k.to_string(), k as u64))
            .collect();
        counts.push(("all".to_string(), n as u64));
        // BENCH_FANOUT_REPEAT=N: fan out to all N more times (to profile the fan-out path).
        let repeat = std::env::var("BENCH_FANOUT_REPEAT")
            .ok()
            .and_then(|r| r.parse::<usize>().ok())
            .unwrap_or(0);
        counts.extend(std::iter::repeat_n(("all".to_string(), n as u64), repeat));
        for (command, expect) in counts {
            let (seen_before, _) = idle.arrivals();
            let cpu_before = procs::cpu_us(server);
            let (sent, answer) = trigger.command(&format!("!fanout {command}")).await?;
            // Wait for every expected arrival (or give up after 30 s and report what came).
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (seen, _) = idle.arrivals();
                if seen - seen_before >= expect || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let (seen, last) = idle.arrivals();
            let got = seen - seen_before;
            let secs = last.saturating_duration_since(sent).as_secs_f64();
            let cpu = match (cpu_before, procs::cpu_us(server)) {
                (Some(a), Some(b)) if got > 0 => Some((b - a) as f64 / got as f64),
                _ => None,
            };
            if !answer.starts_with("done") {
                eprintln!("    fan-out {command}: {answer}");
            }
            figures.fanout.push((command, got, secs, cpu));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = procs::rss_anon_kib(server).context("no RSS")?;
        figures.growth_kib_per_session = Some(after.saturating_sub(during) as f64 / n as f64);
    }
    idle.close().await;
    drop(trigger);
    Ok(figures)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(port) = arg("--serve-tcp") {
        return serve_baseline(false, port.parse()?).await;
    }
    if let Some(port) = arg("--serve-ws") {
        return serve_baseline(true, port.parse()?).await;
    }
    if let Some(url) = arg("--serve-standin") {
        return standin::serve(&url).await;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let focus = args.iter().any(|a| a == "--focus");
    // `--only NAME[,NAME]`: only these targets (e.g. `--only P-wasm`).
    let only = arg("--only");
    let provider_bin = arg("--provider")
        .context("--provider <path to messaging-websocket-provider> is required")?;
    let idle = arg("--idle").and_then(|n| n.parse().ok());
    let opts = if quick || idle.is_some() {
        // `--quick` (the CI smoke) or `--idle N` (one short round with N idle sessions, for
        // memory work).
        Options {
            quick,
            focus,
            rounds: 1,
            duration: Duration::from_secs(1),
            latency_samples: 300,
            sessions: 20,
            idle: idle.unwrap_or(1000),
        }
    } else {
        // The full run, or `--focus`: one round and no idle sessions.
        Options {
            quick,
            focus,
            rounds: if focus { 1 } else { 3 },
            duration: Duration::from_secs(4),
            latency_samples: 2000,
            sessions: 100,
            idle: if focus { 0 } else { 19_000 },
        }
    };
    // The host path (real host, wasm component; ours in several configurations beside the
    // NATS messaging provider): `--host-path` runs only that; the full suite runs it last.
    let nats_provider = arg("--nats-provider");
    if args.iter().any(|a| a == "--sniff-host") {
        let pwasm = arg("--pwasm").context("--sniff-host needs --pwasm")?;
        let variants = hostpath::variants(None);
        let which = arg("--variant")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let variant = variants.get(which).context("no such variant")?;
        return hostpath::sniff(&pwasm, variant, opts.duration).await;
    }
    if args.iter().any(|a| a == "--host-path") {
        let pwasm = arg("--pwasm").context("--host-path needs --pwasm")?;
        hostpath::run(&pwasm, nats_provider.as_deref(), opts.duration).await?;
        return Ok(());
    }
    let idle_before = procs::idle_percent(Duration::from_secs(1))
        .await
        .unwrap_or(0.0);

    let nats = procs::Nats::start().await?;
    let (tcp_port, ws_port, provider_port) = (
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
    );
    let tcp_server = procs::spawn_self(&["--serve-tcp", &tcp_port.to_string()])?;
    let ws_server = procs::spawn_self(&["--serve-ws", &ws_port.to_string()])?;
    let standin_proc = procs::spawn_self(&["--serve-standin", &nats.url])?;
    procs::wait_port(tcp_port).await?;
    procs::wait_port(ws_port).await?;
    let client = async_nats::connect(nats.url.as_str()).await?;
    standin::wait_ready(&client).await?;
    // `P json` (issue 16): by default, and with `--only` naming it; its links are on P's
    // provider process (a second process would be a replica of the first).
    let json_wanted = match &only {
        Some(only) => only.split(',').any(|o| o == json::NAME),
        None => !focus,
    };
    let json_ports = standin::JsonPorts {
        json: procs::free_port()?,
        recovery: procs::free_port()?,
    };
    let mut provider = if json_wanted {
        standin::start_provider_json(&provider_bin, &nats.url, provider_port, json_ports).await?
    } else {
        standin::start_provider(&provider_bin, &nats.url, provider_port).await?
    };
    procs::wait_port(provider_port).await?;
    if json_wanted {
        procs::wait_port(json_ports.json).await?;
        procs::wait_port(json_ports.recovery).await?;
    }

    let me = std::process::id();
    let (nats_pid, standin_pid) = (nats.child.id(), standin_proc.id());
    let pids = |server: Option<u32>| Pids {
        server,
        standin: standin_pid,
        nats: nats_pid,
        me,
    };
    let mut targets: Vec<(&str, Target, Pids)> = vec![
        ("B0 tcp", Target::Tcp(tcp_port), pids(tcp_server.id())),
        ("B1 ws", Target::Ws(ws_port), pids(ws_server.id())),
        ("B2 nats", Target::Nats(nats.url.clone()), pids(standin_pid)),
        ("B3 wrpc", Target::Wrpc(nats.url.clone()), pids(standin_pid)),
        ("P provider", Target::Ws(provider_port), pids(provider.id())),
    ];
    // P-wasm: the real host and a wasm component, when its binary is given (not in --quick:
    // the host's release build takes many minutes). Its "stand-in" column is the host process.
    let wasm_host = match arg("--pwasm") {
        Some(path) if !quick => {
            eprintln!("starting the wasm host (P-wasm)");
            let host = procs::WasmHost::start(&path).await?;
            targets.push((
                "P-wasm",
                Target::Ws(host.port),
                Pids {
                    server: Some(host.provider),
                    standin: host.child.id(),
                    nats: Some(host.nats),
                    me,
                },
            ));
            Some(host)
        }
        _ => None,
    };
    let n = opts.sessions;
    let scenarios = [
        "1x1 64B".to_string(),
        format!("{n}x1 64B"),
        format!("{n}x1 1KiB"),
        "10x32 64B".to_string(),
        format!("{n} open 50% 64B"),
    ];
    let mut results: BTreeMap<(usize, usize), Vec<Figures>> = BTreeMap::new();
    let mut idle_results: BTreeMap<&str, Vec<IdleFigures>> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..opts.rounds {
        eprintln!("round {} of {}", round + 1, opts.rounds);
        // A fresh block of source addresses per round keeps clear of TIME_WAIT.
        let sources = Sources::new(round as u8 + 1);
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.rotate_left(round % targets.len());
        for &t in &order {
            let (name, target, pids) = &targets[t];
            if opts.focus && !matches!(*name, "B1 ws" | "B3 wrpc" | "P provider" | "P-wasm") {
                continue;
            }
            if only
                .as_ref()
                .is_some_and(|only| !only.split(',').any(|o| o == *name))
            {
                continue;
            }
            eprintln!("  {name}");
            let until = || Instant::now() + opts.duration;
            let samples = opts.latency_samples;
            // BENCH_SNIFF=1: print every NATS message (time, subject, size) for a few 1x1
            // echoes through P, to see where one round trip spends its time.
            let sniff = if *name == "P provider" && std::env::var_os("BENCH_SNIFF").is_some() {
                let c = async_nats::connect(nats.url.as_str()).await?;
                let mut sub = c.subscribe(">").await?;
                c.flush().await?;
                Some(tokio::spawn(async move {
                    let t0 = Instant::now();
                    let mut last = t0;
                    let mut n = 0;
                    while let Some(m) = sub.next().await {
                        let now = Instant::now();
                        n += 1;
                        if (200..260).contains(&n) {
                            eprintln!(
                                "{:>8} us (+{:>5}) {} reply={:?} {} B",
                                (now - t0).as_micros(),
                                (now - last).as_micros(),
                                m.subject,
                                m.reply,
                                m.payload.len()
                            );
                        }
                        last = now;
                    }
                }))
            } else {
                None
            };
            let lat = measure(target, *pids, &sources, 1, 64, || Pace::Closed {
                window: 1,
                count: Some(samples),
                until: Instant::now() + Duration::from_secs(3600),
            })
            .await?;
            if let Some(sniff) = sniff {
                sniff.abort();
            }
            // Closed loop with `window` in flight, for the run's duration from now.
            let closed = |window: usize| {
                let until = until();
                move || Pace::Closed {
                    window,
                    count: None,
                    until,
                }
            };
            let thr = measure(target, *pids, &sources, n, 64, closed(1)).await?;
            if opts.focus || *name == "P-wasm" {
                results.entry((t, 0)).or_default().push(lat);
                results.entry((t, 1)).or_default().push(thr);
                continue;
            }
            let thr_1k = measure(target, *pids, &sources, n, 1024, closed(1)).await?;
            let pipe = measure(target, *pids, &sources, 10, 64, closed(32)).await?;
            let stream = matches!(target, Target::Tcp(_) | Target::Ws(_));
            let open = if stream && thr.rate > 0.0 {
                // Half the measured maximum, spread evenly over the sessions.
                let interval = Duration::from_secs_f64(n as f64 / (thr.rate * 0.5));
                let deadline = until();
                Some(
                    measure(target, *pids, &sources, n, 64, || Pace::Open {
                        interval,
                        until: deadline,
                    })
                    .await?,
                )
            } else {
                None
            };
            for (s, f) in [Some(lat), Some(thr), Some(thr_1k), Some(pipe), open]
                .into_iter()
                .enumerate()
            {
                if let Some(f) = f {
                    results.entry((t, s)).or_default().push(f);
                }
            }
        }
    }
    // Recovery and acknowledgments against plain json (issue 16), on P's provider process: 5
    // rounds even in `--quick` (its variants alternate, their ratios are the point).
    let json_report = if json_wanted {
        Some(
            json::run(
                &client,
                json_ports,
                pids(provider.id()),
                opts.rounds.max(5),
                opts.duration,
                opts.latency_samples,
            )
            .await?,
        )
    } else {
        None
    };
    // Idle sessions and fan-out, on fresh server processes each round: memory freed by earlier
    // scenarios would otherwise be reused and hide the cost of a session. Not when `--only`
    // names just `P json`.
    let idle_wanted = !only
        .as_ref()
        .is_some_and(|only| only.split(',').all(|o| o == json::NAME));
    for round in 0..opts.rounds {
        if opts.focus || !idle_wanted {
            break;
        }
        eprintln!("idle sessions, round {} of {}", round + 1, opts.rounds);
        let sources = Sources::new(100 + round as u8);
        let port = procs::free_port()?;
        let mut server = procs::spawn_self(&["--serve-ws", &port.to_string()])?;
        procs::wait_port(port).await?;
        let pid = server.id().context("no pid")?;
        let idle = idle_and_fanout(port, pid, &sources, opts.idle, false).await?;
        idle_results.entry("B1 ws").or_default().push(idle);
        let _ = server.kill().await;

        let port = procs::free_port()?;
        let _ = provider.kill().await;
        let _ = provider.wait().await;
        provider = standin::start_provider(&provider_bin, &nats.url, port).await?;
        procs::wait_port(port).await?;
        let pid = provider.id().context("no pid")?;
        let sources = Sources::new(150 + round as u8);
        let idle = idle_and_fanout(port, pid, &sources, opts.idle, true).await?;
        idle_results.entry("P provider").or_default().push(idle);
    }
    let (standin_hung, standin_failed) = standin::stats(&client).await.unwrap_or((0, 0));
    let elapsed = started.elapsed();
    // The two-replica case runs last, with its own tables (not with `--focus` or `--only`).
    let replicas = !opts.focus && only.is_none();

    // The tables.
    println!(
        "\nmachine idle before the run: {idle_before:.0}%; run took {:.0} s; {} round(s)",
        elapsed.as_secs_f64(),
        opts.rounds
    );
    println!("\n| target | scenario | msg/s | p50 us | p99 us | p99.9 us | CPU us/msg: server | stand-in | nats-server | load gen | hung | failed | misordered |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut summary: BTreeMap<(usize, usize), Figures> = BTreeMap::new();
    for ((t, s), figures) in &results {
        let sum = summarize(figures);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            targets[*t].0,
            scenarios[*s],
            sum.rate,
            sum.p50,
            sum.p99,
            sum.p999,
            fmt(sum.cpu[0]),
            fmt(sum.cpu[1]),
            fmt(sum.cpu[2]),
            fmt(sum.cpu[3]),
            sum.hung,
            sum.failed,
            sum.misordered
        );
        summary.insert((*t, *s), sum);
    }
    println!("\n| target | idle sessions | handshakes/s | KiB per idle session | growth after a burst, KiB per session |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, runs) in &idle_results {
        let m = |g: fn(&IdleFigures) -> f64| median(runs.iter().map(g).collect()).unwrap_or(0.0);
        let growth = median(
            runs.iter()
                .filter_map(|r| r.growth_kib_per_session)
                .collect(),
        );
        println!(
            "| {name} | {} | {:.0} | {:.1} | {} |",
            runs[0].sessions,
            m(|r| r.handshakes_per_sec),
            m(|r| r.kib_per_session),
            fmt(growth)
        );
    }
    let fanouts: Vec<(String, u64, f64, Option<f64>)> = idle_results
        .get("P provider")
        .map(|r| r.iter().flat_map(|x| x.fanout.clone()).collect())
        .unwrap_or_default();
    println!(
        "\n| fan-out (P, one component call) | delivered | ms to last arrival | deliveries/s | provider CPU us/delivery |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut labels: Vec<String> = Vec::new();
    for (label, ..) in &fanouts {
        if !labels.contains(label) {
            labels.push(label.clone());
        }
    }
    let mut fanout_all_rate = 0.0;
    let mut fanout_missing = 0;
    for label in &labels {
        let runs: Vec<_> = fanouts.iter().filter(|f| &f.0 == label).collect();
        let cpu = median(runs.iter().filter_map(|f| f.3).collect());
        let secs = median(runs.iter().map(|f| f.2).collect()).unwrap_or(0.0);
        let delivered = runs.iter().map(|f| f.1).min().unwrap_or(0);
        let expected = if label == "all" {
            opts.idle as u64
        } else {
            label.parse().unwrap_or(0)
        };
        fanout_missing += runs.iter().filter(|f| f.1 < expected).count();
        let rate = delivered as f64 / secs.max(1e-9);
        if label == "all" {
            fanout_all_rate = rate;
        }
        println!(
            "| {label} | {delivered} | {:.2} | {:.0} | {} |",
            secs * 1e3,
            rate,
            fmt(cpu)
        );
    }

    // Ratios from the same run.
    let get = |t: &str, s: usize| {
        targets
            .iter()
            .position(|x| x.0 == t)
            .and_then(|i| summary.get(&(i, s)))
    };
    let (p_thr, b1_thr) = (get("P provider", 1), get("B1 ws", 1));
    let (p_lat, b1_lat, b2_lat, b3_lat) = (
        get("P provider", 0),
        get("B1 ws", 0),
        get("B2 nats", 0),
        get("B3 wrpc", 0),
    );
    let ratio = match (p_thr, b1_thr) {
        (Some(p), Some(b)) => p.rate / b.rate.max(1e-9),
        _ => 0.0,
    };
    let added = match (p_lat, b1_lat, b3_lat) {
        (Some(p), Some(b1), Some(b3)) => p.p50 - (b1.p50 + b3.p50),
        _ => 0.0,
    };
    let cpu_ratio = match (p_thr.and_then(|p| p.cpu[0]), b1_thr.and_then(|b| b.cpu[0])) {
        (Some(p), Some(b)) => p / b.max(1e-9),
        _ => 0.0,
    };
    let wrpc_tax = match (b3_lat, b2_lat) {
        (Some(b3), Some(b2)) => b3.p50 / b2.p50.max(1e-9),
        _ => 0.0,
    };
    // Echoes that never came back (the load generator's bound), over all scenarios.
    let hung_on = |name: &str| -> u64 {
        targets
            .iter()
            .position(|x| x.0 == name)
            .map(|i| {
                (0..scenarios.len())
                    .filter_map(|s| summary.get(&(i, s)))
                    .map(|s| s.hung)
                    .sum()
            })
            .unwrap_or(0)
    };
    let p_hung = hung_on("P provider");
    let misordered: u64 = summary.values().map(|s| s.misordered).sum();
    println!(
        "\nratios (medians of {} round(s), {n}x1 64B unless noted):",
        opts.rounds
    );
    println!("- P/B1 throughput: {ratio:.3}");
    println!("- provider-added p50 latency (1x1), P - (B1 + B3): {added:.0} us (an echo through P is one B1 hop and two wRPC calls)");
    println!("- provider CPU per message / B1 server's: {cpu_ratio:.2}");
    println!("- wRPC tax, B3/B2 p50 (1x1): {wrpc_tax:.2}");
    println!("- hung calls: load generator on P {p_hung}; stand-in's calls into the provider {standin_hung} (failed {standin_failed})");
    if wasm_host.is_some() {
        // The host's own wRPC client (wrpc-transport-nats 0.29) can lose a component's call.
        println!(
            "- hung echoes through the real host (P-wasm): {}",
            hung_on("P-wasm")
        );
    }

    // Against the targets.
    println!("\ntargets (issue 6):");
    let check = |ok: bool| if ok { "met" } else { "MISSED" };
    if let (Some(p), Some(pl)) = (p_thr, p_lat) {
        println!(
            "- echo {n}x1 64B >= 25,000 msg/s and >= 25% of B1: {:.0} msg/s, {:.1}% -> {}",
            p.rate,
            ratio * 100.0,
            check(p.rate >= 25_000.0 && ratio >= 0.25)
        );
        println!(
            "- provider CPU <= 20 us per echo: {} -> {}",
            fmt(p.cpu[0]),
            check(p.cpu[0].is_some_and(|c| c <= 20.0))
        );
        println!(
            "- 1x1 p50 <= 300 us, p99 <= 1 ms: {:.0} / {:.0} us -> {}",
            pl.p50,
            pl.p99,
            check(pl.p50 <= 300.0 && pl.p99 <= 1000.0)
        );
        println!(
            "- provider-added p50 <= 50 us: {added:.0} us -> {}",
            check(added <= 50.0)
        );
    }
    if let Some(runs) = idle_results.get("P provider") {
        let kib = median(runs.iter().map(|r| r.kib_per_session).collect()).unwrap_or(0.0);
        let growth = median(
            runs.iter()
                .filter_map(|r| r.growth_kib_per_session)
                .collect(),
        )
        .unwrap_or(0.0);
        println!("- {} idle sessions at <= 16 KiB each, growth after a burst <= 2 KiB: {kib:.1} / {growth:.1} KiB -> {}", opts.idle, check(kib <= 16.0 && growth <= 2.0));
    }
    if let Some(w) = get("P-wasm", 0) {
        println!(
            "- P-wasm (real host, wasm component) 1x1 p50 <= 1 ms: {:.0} us -> {}",
            w.p50,
            check(w.p50 <= 1000.0)
        );
    }
    println!(
        "- fan-out to all at >= 75,000 deliveries/s: {fanout_all_rate:.0}/s -> {}",
        check(fanout_all_rate >= 75_000.0)
    );
    println!(
        "- zero hung calls: {} -> {}",
        p_hung + standin_hung,
        check(p_hung + standin_hung == 0)
    );

    if let Some(report) = &json_report {
        report.print();
    }

    if let Some(host) = wasm_host {
        host.stop().await;
    }
    if replicas {
        let _ = provider.kill().await;
        let _ = provider.wait().await;
        replicas::run(
            &provider_bin,
            &nats,
            standin_pid,
            n,
            opts.latency_samples,
            opts.duration,
            opts.idle.clamp(1000, 10_000),
        )
        .await?;
    }
    drop((provider, tcp_server, ws_server, standin_proc, nats));
    if !opts.quick && !opts.focus && only.is_none() {
        if let Some(pwasm) = arg("--pwasm") {
            hostpath::run(&pwasm, nats_provider.as_deref(), opts.duration).await?;
        }
    }
    if opts.quick {
        // The CI smoke fails only on gross regressions, by ratio or by lost/misordered messages,
        // never by absolute time.
        if p_thr.is_some() && b1_thr.is_some() && ratio < 0.03 {
            bail!("P/B1 throughput ratio {ratio:.3} is below the smoke floor 0.03");
        }
        let problems: Vec<String> = json_report.iter().flat_map(|r| r.problems()).collect();
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        if misordered > 0 {
            bail!("{misordered} echoes came back out of order");
        }
        if p_hung + standin_hung > 0 {
            bail!("{} calls hung in the smoke run", p_hung + standin_hung);
        }
        if fanout_missing > 0 {
            bail!("{fanout_missing} fan-out runs did not reach every session");
        }
    }
    Ok(())
}
