//! `P json` (issue 16): what recovery and acknowledgments cost per message against the plain
//! `FORMAT=json` path, measured in one run, the variants alternated round by round.
//!
//! The provider process of target P has two more server links to the stand-in
//! ([`standin::start_provider_json`]): `bench-json` (`FORMAT=json`) and `bench-recovery`
//! (`FORMAT=json`, `RECOVERY=true`: every message written to a session is numbered and stored
//! in a JetStream stream before the send returns). The stand-in publishes each body back to its
//! session, so an echo is an envelope. Variants:
//! - `json`: envelopes `{"subject":"bench","body":...}` to `bench-json`;
//! - `json+recovery`: the same to `bench-recovery`; the load generator skips the session frame
//!   and checks that the echoes' `seq` goes up by one (a gap counts as misordered);
//! - `json+ack`: to `bench-json`, every envelope with a unique `"id"` and `"ack": true`. A
//!   message is done when both its echo and its `{"ack": {"id", "ok": true}}` answer are back:
//!   its latency runs to the later of the two (the ack answer, written after `handle-message`
//!   returned, which is after the echo), and `ok: false` fails it.
//!
//! Scenarios: 1 session x 1 in flight (latency) and 100 x 1 (throughput, CPU per message, which
//! includes connecting the 100 sessions, as in the rest of the suite). Bodies are 64 bytes.

use std::time::{Duration, Instant};

use crate::load::{Pace, Sources, Target};
use crate::standin::JsonPorts;
use crate::{measure, median, summarize, Figures, Pids};

/// The name `--only` selects this part by.
pub const NAME: &str = "P json";

/// Sessions of the throughput scenario.
const SESSIONS: usize = 100;
const SIZE: usize = 64;

const VARIANTS: [&str; 3] = ["json", "json+recovery", "json+ack"];

fn target(variant: usize, ports: JsonPorts) -> Target {
    let (port, ack, recovery) = match variant {
        0 => (ports.json, false, false),
        1 => (ports.recovery, false, true),
        _ => (ports.json, true, false),
    };
    Target::Json {
        port,
        ack,
        recovery,
    }
}

/// One variant's figures in one round: 1x1 and 100x1.
#[derive(Clone)]
struct Round {
    lat: Figures,
    thr: Figures,
}

/// What the comparison measured.
pub struct Report {
    rounds: usize,
    duration: Duration,
    secs: f64,
    /// Per variant, per round.
    runs: [Vec<Round>; 3],
    /// Messages the recovery link's JetStream stream(s) took in all (their last sequence), and
    /// the recovery variant's messages (warm-ups included): the two should match.
    stored: Option<u64>,
    recovery_msgs: u64,
}

/// Runs `rounds` rounds; each measures every variant, starting with a different one each round.
pub async fn run(
    nats: &async_nats::Client,
    ports: JsonPorts,
    pids: Pids,
    rounds: usize,
    duration: Duration,
    latency_samples: u64,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut runs: [Vec<Round>; 3] = Default::default();
    for round in 0..rounds {
        eprintln!("{NAME}, round {} of {rounds}", round + 1);
        let sources = Sources::new(50 + round as u8);
        let mut order = [0, 1, 2];
        order.rotate_left(round % 3);
        for v in order {
            eprintln!("  {}", VARIANTS[v]);
            let target = target(v, ports);
            let lat = measure(&target, pids, &sources, 1, SIZE, || Pace::Closed {
                window: 1,
                count: Some(latency_samples),
                until: Instant::now() + Duration::from_secs(3600),
            })
            .await?;
            let until = Instant::now() + duration;
            let thr = measure(&target, pids, &sources, SESSIONS, SIZE, || Pace::Closed {
                window: 1,
                count: None,
                until,
            })
            .await?;
            runs[v].push(Round { lat, thr });
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // Every run opens its sessions with one warm-up message each.
    let recovery_msgs = runs[1]
        .iter()
        .map(|r| r.lat.msgs + r.thr.msgs + 1 + SESSIONS as u64)
        .sum();
    Ok(Report {
        rounds,
        duration,
        secs,
        runs,
        stored: stored(nats).await.ok(),
        recovery_msgs,
    })
}

/// The messages stored in the recovery history streams so far (`WSHISTORY_*`: the bench's
/// JetStream has no others), by their last sequence numbers.
async fn stored(nats: &async_nats::Client) -> anyhow::Result<u64> {
    use futures::TryStreamExt as _;
    let js = async_nats::jetstream::new(nats.clone());
    let names: Vec<String> = js.stream_names().try_collect().await?;
    let mut total = 0;
    for name in names.iter().filter(|n| n.starts_with("WSHISTORY_")) {
        total += js.get_stream(name).await?.info().await?.state.last_sequence;
    }
    Ok(total)
}

/// Provider plus nats-server CPU per message.
fn provider_nats(f: &Figures) -> Option<f64> {
    Some(f.cpu[0]? + f.cpu[2]?)
}

impl Report {
    fn summary(&self, v: usize) -> (Figures, Figures) {
        let lat: Vec<Figures> = self.runs[v].iter().map(|r| r.lat.clone()).collect();
        let thr: Vec<Figures> = self.runs[v].iter().map(|r| r.thr.clone()).collect();
        (summarize(&lat), summarize(&thr))
    }

    /// Echoes (or ack answers) lost (hung), failed and misordered, over both scenarios and all
    /// rounds.
    fn counts(&self, v: usize) -> (u64, u64, u64) {
        let (lat, thr) = self.summary(v);
        (
            lat.hung + thr.hung,
            lat.failed + thr.failed,
            lat.misordered + thr.misordered,
        )
    }

    pub fn print(&self) {
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "\n{NAME} (issue 16): FORMAT=json plain, +RECOVERY, +ack per message; medians of {} \
             alternated round(s), {:.0} s each at {SESSIONS}x1, 64 B bodies; this part took {:.0} s",
            self.rounds,
            self.duration.as_secs_f64(),
            self.secs
        );
        println!("\n| variant | 1x1 msg/s | 1x1 p50 us | 1x1 p99 us | {SESSIONS}x1 msg/s | {SESSIONS}x1 p50 us | {SESSIONS}x1 p99 us | CPU us/msg ({SESSIONS}x1): provider | stand-in | nats-server | load gen | provider + nats | lost | failed | misordered |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (v, name) in VARIANTS.iter().enumerate() {
            let (lat, thr) = self.summary(v);
            let (lost, failed, misordered) = self.counts(v);
            println!(
                "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {lost} | {failed} | {misordered} |",
                lat.rate,
                lat.p50,
                lat.p99,
                thr.rate,
                thr.p50,
                thr.p99,
                fmt(thr.cpu[0]),
                fmt(thr.cpu[1]),
                fmt(thr.cpu[2]),
                fmt(thr.cpu[3]),
                fmt(provider_nats(&thr)),
            );
        }
        let (plain_lat, plain_thr) = self.summary(0);
        println!("\n{NAME} ratios against plain json (of the medians; in brackets the lowest and highest of the per-round ratios):");
        for v in [1, 2] {
            let (lat, thr) = self.summary(v);
            let per_round = |g: fn(&Round, &Round) -> Option<f64>| {
                let r: Vec<f64> = self.runs[v]
                    .iter()
                    .zip(&self.runs[0])
                    .filter_map(|(x, p)| g(x, p))
                    .collect();
                let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if r.is_empty() {
                    String::new()
                } else {
                    format!(" [{lo:.2}-{hi:.2}]")
                }
            };
            let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?.max(1e-9));
            println!(
                "- {}/json: {SESSIONS}x1 throughput {}{}, 1x1 throughput {}{}, 1x1 p50 {}{}, provider+nats CPU per message {}{} (provider alone {}, nats-server alone {})",
                VARIANTS[v],
                fmt2(div(Some(thr.rate), Some(plain_thr.rate))),
                per_round(|x, p| Some(x.thr.rate / p.thr.rate.max(1e-9))),
                fmt2(div(Some(lat.rate), Some(plain_lat.rate))),
                per_round(|x, p| Some(x.lat.rate / p.lat.rate.max(1e-9))),
                fmt2(div(Some(lat.p50), Some(plain_lat.p50))),
                per_round(|x, p| Some(x.lat.p50 / p.lat.p50.max(1e-9))),
                fmt2(div(provider_nats(&thr), provider_nats(&plain_thr))),
                per_round(|x, p| Some(provider_nats(&x.thr)? / provider_nats(&p.thr)?.max(1e-9))),
                fmt2(div(thr.cpu[0], plain_thr.cpu[0])),
                fmt2(div(thr.cpu[2], plain_thr.cpu[2])),
            );
        }
        println!(
            "- messages stored in the recovery history (JetStream): {} (the json+recovery variant echoed {})",
            self.stored.map_or("-".to_string(), |n| n.to_string()),
            self.recovery_msgs
        );
        // Where the extra CPU goes.
        for v in [1, 2] {
            let (_, thr) = self.summary(v);
            let extra = |i: usize| Some(thr.cpu[i]? - plain_thr.cpu[i]?);
            println!(
                "- {} adds per message: provider {} us, nats-server {} us, stand-in {} us, load gen {} us",
                VARIANTS[v],
                fmt(extra(0)),
                fmt(extra(2)),
                fmt(extra(1)),
                fmt(extra(3)),
            );
        }
    }

    /// The smoke's gross-regression checks: recovery and acks keep at least a tenth of plain
    /// json's 100x1 throughput, and nothing is lost, failed or misordered.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let plain = median(self.runs[0].iter().map(|r| r.thr.rate).collect()).unwrap_or(0.0);
        for v in [1, 2] {
            let rate = median(self.runs[v].iter().map(|r| r.thr.rate).collect()).unwrap_or(0.0);
            let ratio = rate / plain.max(1e-9);
            if ratio < 0.1 {
                problems.push(format!(
                    "{NAME}: {} throughput is {ratio:.3} of plain json's (floor 0.1)",
                    VARIANTS[v]
                ));
            }
        }
        for (v, name) in VARIANTS.iter().enumerate() {
            let (lost, failed, misordered) = self.counts(v);
            if lost + failed + misordered > 0 {
                problems.push(format!(
                    "{NAME}: {name} lost {lost}, failed {failed}, misordered {misordered}"
                ));
            }
        }
        problems
    }
}

fn fmt2(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.2}"))
}
