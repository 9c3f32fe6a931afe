//! The processes of a run and what `/proc` says about them: CPU time and resident memory.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// User + system CPU time of `pid`, in microseconds.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000) // USER_HZ is 100 on Linux
}

/// Anonymous resident memory of `pid` (heap and stacks, not the mapped binary), in KiB.
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Percentage of idle CPU time over `window`, from /proc/stat.
pub async fn idle_percent(window: Duration) -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu = stat.lines().next()?;
        let v: Vec<u64> = cpu
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((idle, v.iter().sum()))
    }
    let (i0, t0) = sample()?;
    tokio::time::sleep(window).await;
    let (i1, t1) = sample()?;
    Some(100.0 * (i1 - i0) as f64 / (t1 - t0).max(1) as f64)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn wait_port(port: u16) -> Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on port {port}")
}

/// A nats-server with JetStream in a temporary directory, on a free port.
pub struct Nats {
    pub child: Child,
    pub url: String,
    _store: tempfile::TempDir,
}

impl Nats {
    pub async fn start() -> Result<Self> {
        let port = free_port()?;
        let store = tempfile::tempdir()?;
        let bin = std::env::var("TEST_NATS_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start nats-server (run ./scripts/setup.sh)")?;
        wait_port(port).await?;
        Ok(Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        })
    }
}

/// This benchmark binary again, in one of its serving roles.
pub fn spawn_self(args: &[&str]) -> Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args(args)
        .kill_on_drop(true)
        .spawn()?)
}
