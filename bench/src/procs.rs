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

/// Target P-wasm: the `pwasm` example (a real wasmCloud host with the provider and a wasm echo
/// component) in its own process; it runs until its standard input closes ([`WasmHost::stop`]).
pub struct WasmHost {
    pub child: Child,
    /// The URL clients use: `ws://...` (the provider's listener) or `nats://...` (the NATS
    /// messaging provider's lattice).
    pub url: String,
    pub port: u16,
    /// The host's lattice, when the READY line names it (a fourth word).
    pub nats_url: Option<String>,
    /// The provider process (started by the host), and the host's own `nats-server`.
    pub provider: u32,
    pub nats: u32,
}

impl WasmHost {
    pub async fn start(example: &str) -> Result<Self> {
        Self::start_with(example, &[]).await
    }

    /// Starts the example with `env` (see `examples/pwasm.rs` for the variables it reads).
    pub async fn start_with(example: &str, env: &[(&str, String)]) -> Result<Self> {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = Command::new(example)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {example}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(300), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("READY ") {
                    return Ok::<_, anyhow::Error>(rest.to_string());
                }
            }
            bail!("{example} ended before it was ready")
        })
        .await
        .context("the wasm host was not ready in 300 s")??;
        let mut words = ready.split_whitespace();
        let (Some(url), Some(provider), Some(nats)) = (words.next(), words.next(), words.next())
        else {
            bail!("unexpected READY line: {ready}");
        };
        let port = url
            .rsplit_once(':')
            .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
            .with_context(|| format!("no port in {url}"))?;
        let nats_url = words.next().map(str::to_string);
        Ok(Self {
            child,
            url: url.to_string(),
            nats_url,
            port,
            provider: provider.parse()?,
            nats: nats.parse()?,
        })
    }
}

impl WasmHost {
    /// Closes the host's standard input and waits for it to stop its provider and its
    /// `nats-server` (killing it after 20 s): killed at once, it would leave them running.
    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
