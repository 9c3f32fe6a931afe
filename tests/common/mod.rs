//! Test harness: a real `nats-server`, a real in-process wasmCloud host, the provider started from
//! a PAR of the freshly built binary, real `wasm32-wasip2` test components, and real WebSocket
//! peers (tokio-tungstenite servers in the test process).
#![allow(dead_code)]

pub mod ws;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use wasmcloud_test_util::control_interface::{Client as CtlClient, ClientBuilder};
use wasmcloud_test_util::lattice::link::{assert_advertise_link, assert_remove_link};
use wasmcloud_test_util::provider::StartProviderArgs;
use wasmcloud_test_util::{assert_config_put, assert_scale_component, assert_start_provider};

pub const LATTICE: &str = "default";
pub const PROVIDER_ID: &str = "ws-messaging";

/// A `nats-server` child process with JetStream, on its own port and store; killed on drop.
pub struct Nats {
    pub url: String,
    pub port: u16,
    child: tokio::process::Child,
    _store: tempfile::TempDir,
}

pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl Nats {
    pub async fn start() -> Result<Self> {
        Self::start_on(free_port()?).await
    }

    pub async fn start_on(port: u16) -> Result<Self> {
        let store = tempfile::tempdir()?;
        let child = Self::spawn(port, store.path()).await?;
        Ok(Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            child,
            _store: store,
        })
    }

    async fn spawn(port: u16, store: &Path) -> Result<tokio::process::Child> {
        let bin = std::env::var("TEST_NATS_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = tokio::process::Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("failed to start {bin}: install nats-server (apt-get install nats-server)")
            })?;
        // Up to 30 s: on a machine whose cores are busy, the server can take several seconds.
        let url = format!("nats://127.0.0.1:{port}");
        eventually(Duration::from_secs(30), || async {
            async_nats::connect(&url).await?;
            Ok(())
        })
        .await
        .context("nats-server did not come up")?;
        Ok(child)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the server and starts it again on the same port with the same store.
    pub async fn restart(&mut self, down_for: Duration) -> Result<()> {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        tokio::time::sleep(down_for).await;
        self.child = Self::spawn(self.port, self._store.path()).await?;
        Ok(())
    }
}

/// Builds the test component once per test binary and returns the `.wasm` path.
pub fn component(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_components().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))?;
    let path = dir.join(format!("{name}.wasm"));
    ensure!(path.exists(), "no component at {}", path.display());
    Ok(path)
}

/// Cargo's profile directory (`target/debug`), found from this executable's path
/// (`target/debug/deps/<test>` or `target/debug/examples/<example>`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("cannot find the target directory")
}

/// The freshly built provider binary.
pub fn provider_binary() -> Result<PathBuf> {
    match option_env!("CARGO_BIN_EXE_messaging-websocket-provider") {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(profile_dir()?.join("messaging-websocket-provider")),
    }
}

/// Crates built for `wasm32-wasip2` by [`component`].
const COMPONENT_CRATES: &[&str] = &["tests/components/echo", "examples/echo", "examples/chat"];

fn build_components() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = profile_dir()?.join("components");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for crate_dir in COMPONENT_CRATES {
        let status = std::process::Command::new(&cargo)
            .current_dir(root.join(crate_dir))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
            ])
            .arg(&target_dir)
            .status()
            .with_context(|| format!("failed to run cargo for {crate_dir}"))?;
        ensure!(
            status.success(),
            "building {crate_dir} for wasm32-wasip2 failed"
        );
    }
    Ok(target_dir.join("wasm32-wasip2").join("release"))
}

/// Writes a PAR holding the freshly built provider binary.
pub async fn provider_par(dir: &Path) -> Result<PathBuf> {
    par_of(&provider_binary()?, dir).await
}

/// Writes a PAR holding the provider binary `binary`.
pub async fn par_of(binary: &Path, dir: &Path) -> Result<PathBuf> {
    let bin = std::fs::read(binary)
        .with_context(|| format!("failed to read the provider binary {}", binary.display()))?;
    let mut par = provider_archive::ProviderArchive::new("messaging-websocket", "test", None, None);
    par.add_library(
        &format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        &bin,
    )
    .map_err(|e| anyhow!("{e}"))?;
    let path = dir.join("provider.par");
    par.write(
        &path,
        &nkeys::KeyPair::new_account(),
        &nkeys::KeyPair::new_service(),
        false,
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    Ok(path)
}

/// One complete environment: NATS, host, provider. Tests add components, config and links.
pub struct Env {
    pub nats: Nats,
    host: Option<HostShutdown>,
    pub ctl: CtlClient,
    pub client: async_nats::Client,
    pub host_id: String,
    tmp: tempfile::TempDir,
}

impl Env {
    pub async fn start() -> Result<Self> {
        Self::start_with(wasmcloud_core::OtelConfig::default(), &[]).await
    }

    /// Starts an environment whose host hands `otel` to the provider (as `wasmcloud
    /// --enable-metrics` and friends would), and whose provider starts with `provider_config`
    /// as its named config.
    pub async fn start_with(
        otel: wasmcloud_core::OtelConfig,
        provider_config: &[(&str, &str)],
    ) -> Result<Self> {
        let env = Self::start_bare_with(otel).await?;
        if provider_config.is_empty() {
            env.start_provider(&[]).await?;
        } else {
            env.config("provider-config", provider_config).await?;
            env.start_provider(&["provider-config"]).await?;
        }
        Ok(env)
    }

    /// NATS and a host, with no provider yet.
    pub async fn start_bare() -> Result<Self> {
        Self::start_bare_with(wasmcloud_core::OtelConfig::default()).await
    }

    async fn start_bare_with(otel: wasmcloud_core::OtelConfig) -> Result<Self> {
        let nats = Nats::start().await?;
        let tmp = tempfile::tempdir()?;
        let (host_id, shutdown) = start_host(&nats.url, otel).await?;
        let client = async_nats::connect(&nats.url).await?;
        // The control client's default of 2 s for an acknowledgement is too short for a host
        // on a machine whose cores are busy (a component scale timed out that way).
        let ctl = ClientBuilder::new(client.clone())
            .lattice(LATTICE.to_string())
            .timeout(Duration::from_secs(30))
            .build();
        Ok(Self {
            nats,
            host: Some(shutdown),
            ctl,
            client,
            host_id,
            tmp,
        })
    }

    /// Starts another provider binary under this environment's provider ID, with the named
    /// config.
    pub async fn start_provider_binary(&self, binary: &Path, config: &[&str]) -> Result<()> {
        let par = par_of(binary, self.tmp.path()).await?;
        self.start_par(&par, config).await
    }

    pub async fn start_provider(&self, config: &[&str]) -> Result<()> {
        let par = provider_par(self.tmp.path()).await?;
        self.start_par(&par, config).await
    }

    async fn start_par(&self, par: &Path, config: &[&str]) -> Result<()> {
        let url = url::Url::from_file_path(par).map_err(|()| anyhow!("bad PAR path"))?;
        assert_start_provider(StartProviderArgs {
            client: &self.ctl,
            host_id: &self.host_id,
            provider_id: PROVIDER_ID,
            provider_ref: url.as_str(),
            config: config.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .context("provider did not start healthy")
    }

    /// Starts test component `name` under the ID `id`, with up to 4 instances at once (tests
    /// with `MAX_IN_FLIGHT` up to 4 run that many calls side by side). Messages of one session
    /// still arrive one at a time, in order, at the default `MAX_IN_FLIGHT=1`.
    pub async fn component(&self, name: &str, id: &str) -> Result<()> {
        self.component_scaled(name, id, 4).await
    }

    /// Starts test component `name` under the ID `id`, with up to `count` instances at once.
    pub async fn component_scaled(&self, name: &str, id: &str, count: u32) -> Result<()> {
        self.component_scaled_on(&self.host_id, name, id, count)
            .await
    }

    /// [`Env::component_scaled`] on host `host_id` (this one or another of the lattice).
    pub async fn component_scaled_on(
        &self,
        host_id: &str,
        name: &str,
        id: &str,
        count: u32,
    ) -> Result<()> {
        let path = component(name)?;
        assert_scale_component(
            &self.ctl,
            host_id,
            format!("file://{}", path.display()),
            id,
            None,
            count,
            vec![],
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("failed to scale component {id} on {host_id}"))
    }

    pub async fn config(&self, name: &str, pairs: &[(&str, &str)]) -> Result<()> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_config_put(&self.ctl, name, map).await
    }

    /// Links provider -> component on `handler`, with the named source config.
    pub async fn link_handler(&self, component: &str, link: &str, config: &[&str]) -> Result<()> {
        let resp = assert_advertise_link(
            &self.ctl,
            PROVIDER_ID,
            component,
            link,
            "wasmcloud",
            "messaging",
            vec!["handler".into()],
            config.iter().map(|s| s.to_string()).collect(),
            vec![],
        )
        .await?;
        ensure!(
            resp.succeeded(),
            "handler link put failed: {}",
            resp.message()
        );
        Ok(())
    }

    /// Links component -> provider on `consumer`, with the named target config.
    pub async fn link_consumer(&self, component: &str, link: &str, config: &[&str]) -> Result<()> {
        let resp = assert_advertise_link(
            &self.ctl,
            component,
            PROVIDER_ID,
            link,
            "wasmcloud",
            "messaging",
            vec!["consumer".into()],
            vec![],
            config.iter().map(|s| s.to_string()).collect(),
        )
        .await?;
        ensure!(
            resp.succeeded(),
            "consumer link put failed: {}",
            resp.message()
        );
        Ok(())
    }

    /// Links component -> provider on the session API (`wasmcloud-websocket:provider/sessions`).
    pub async fn link_sessions(&self, component: &str) -> Result<()> {
        let resp = assert_advertise_link(
            &self.ctl,
            component,
            PROVIDER_ID,
            "default",
            "wasmcloud-websocket",
            "provider",
            vec!["sessions".into()],
            vec![],
            vec![],
        )
        .await?;
        ensure!(
            resp.succeeded(),
            "sessions link put failed: {}",
            resp.message()
        );
        Ok(())
    }

    pub async fn unlink_handler(&self, link: &str) -> Result<()> {
        assert_remove_link(&self.ctl, PROVIDER_ID, "wasmcloud", "messaging", link).await
    }

    pub async fn unlink_consumer(&self, component: &str, link: &str) -> Result<()> {
        assert_remove_link(&self.ctl, component, "wasmcloud", "messaging", link).await
    }

    /// Deletes the component's session-API link (named `default`, as [`Env::link_sessions`]).
    pub async fn unlink_sessions(&self, component: &str) -> Result<()> {
        assert_remove_link(
            &self.ctl,
            component,
            "wasmcloud-websocket",
            "provider",
            "default",
        )
        .await
    }

    /// Asks the provider for its health, as the host does.
    pub async fn health(&self) -> Result<(bool, Option<String>)> {
        let subject = format!("wasmbus.rpc.{LATTICE}.{PROVIDER_ID}.health");
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            self.client.request(subject, "".into()),
        )
        .await
        .context("health request timed out")??;
        let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
        let healthy = value["healthy"].as_bool().context("no healthy field")?;
        Ok((healthy, value["message"].as_str().map(str::to_string)))
    }

    /// Stops the provider (so the host does not restart it), then the host.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.ctl.stop_provider(&self.host_id, PROVIDER_ID).await;
        let _ = eventually(Duration::from_secs(5), || async {
            let running = std::fs::read_dir("/proc")?.flatten().any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&self.host_id))
            });
            ensure!(!running, "provider still running");
            Ok(())
        })
        .await;
        if let Some(shutdown) = self.host.take() {
            // Bounded: once (in one clean-clone run) the in-process host's shutdown spun in its
            // component-export loop (wasmcloud-host's `SelectAll` of invocation streams) after
            // the test's assertions had passed; the test binary then never ended.
            match tokio::time::timeout(Duration::from_secs(60), shutdown).await {
                Ok(done) => done?,
                Err(_) => eprintln!("warning: the host did not shut down within 60 s"),
            }
        }
        Ok(())
    }
}

impl Env {
    /// The provider process's ID (a child of this test process started by its host).
    pub fn provider_pid(&self) -> Option<u32> {
        child_pids_matching(&self.host_id)
            .into_iter()
            .next()
            .and_then(|pid| pid.parse().ok())
    }

    /// The provider process's resident memory in KiB (its `VmRSS`).
    pub fn provider_rss_kib(&self) -> Option<u64> {
        let pid = self.provider_pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Kills the provider process the way a crash would (SIGKILL); returns how many it killed.
    pub fn kill_provider(&self) -> usize {
        kill_children_matching(&self.host_id)
    }
}

impl Env {
    /// Starts the fresh provider binary as the host starts it (host data as one base64 JSON line
    /// on stdin, an empty environment, this environment's lattice and provider ID), but by
    /// itself and with no links in its host data: as if every link put had come while its
    /// process was starting, and been lost (which the host's 0.27.1 start-up order allows, and
    /// no other way reproduces at will). Killed when the returned child is dropped.
    pub async fn start_provider_without_links(&self) -> Result<tokio::process::Child> {
        use base64::Engine as _;
        use tokio::io::AsyncWriteExt as _;
        let host_data = serde_json::json!({
            "host_id": self.host_id,
            "lattice_rpc_prefix": LATTICE,
            "link_name": "default",
            "lattice_rpc_url": self.nats.url,
            "provider_key": PROVIDER_ID,
            "env_values": {},
            "instance_id": "started-without-links",
            "link_definitions": [],
            "config": {},
            "secrets": {},
            "host_xkey_public_key": "",
            "provider_xkey_private_key": "",
            "log_level": "info",
            "structured_logging": false
        });
        let line =
            base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&host_data)?);
        let mut child = tokio::process::Command::new(provider_binary()?)
            .env_clear()
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start the provider binary")?;
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin.write_all(line.as_bytes()).await?;
        stdin.write_all(b"\r\n").await?;
        drop(stdin);
        Ok(child)
    }
}

/// Another host of the same lattice, running the same provider (a replica) from the same PAR.
pub struct OtherHost {
    pub host_id: String,
    shutdown: Option<HostShutdown>,
}

impl OtherHost {
    /// Kills this host's provider process (SIGKILL); returns how many it killed.
    pub fn kill_provider(&self) -> usize {
        kill_children_matching(&self.host_id)
    }

    /// Stops the host (its provider gets its shutdown).
    pub async fn stop(mut self) -> Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            shutdown.await?;
        }
        Ok(())
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        clean_up_host(&self.host_id);
    }
}

impl Env {
    /// Starts another host on this lattice with the provider (same ID, same PAR) and the named
    /// provider config.
    pub async fn add_host(&self, config: &[&str]) -> Result<OtherHost> {
        self.add_host_on(&self.nats.url.clone(), config).await
    }

    /// [`Env::add_host`] with the host (and so its provider) reaching NATS at `nats_url`.
    pub async fn add_host_on(&self, nats_url: &str, config: &[&str]) -> Result<OtherHost> {
        let (host_id, shutdown) =
            start_host(nats_url, wasmcloud_core::OtelConfig::default()).await?;
        let other = OtherHost {
            host_id,
            shutdown: Some(shutdown),
        };
        let par = provider_par(self.tmp.path()).await?;
        let url = url::Url::from_file_path(&par).map_err(|()| anyhow!("bad PAR path"))?;
        assert_start_provider(StartProviderArgs {
            client: &self.ctl,
            host_id: &other.host_id,
            provider_id: PROVIDER_ID,
            provider_ref: url.as_str(),
            config: config.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .context("the second replica did not start healthy")?;
        Ok(other)
    }

    /// Starts the provider on `host_id` as replica number `replicas` of the lattice: done when
    /// that many replicas answer health (test-util's start insists on an empty health message,
    /// which replicas with links do not give).
    pub async fn start_replica(
        &self,
        host_id: &str,
        config: &[&str],
        replicas: usize,
    ) -> Result<()> {
        let par = provider_par(self.tmp.path()).await?;
        let url = url::Url::from_file_path(&par).map_err(|()| anyhow!("bad PAR path"))?;
        let resp = self
            .ctl
            .start_provider(
                host_id,
                url.as_str(),
                PROVIDER_ID,
                None,
                config.iter().map(|s| s.to_string()).collect(),
            )
            .await
            .map_err(|e| anyhow!("failed to start the provider: {e}"))?;
        ensure!(resp.succeeded(), "the host refused to start the provider");
        eventually(Duration::from_secs(60), || async {
            self.replica_healths(replicas).await.map(drop)
        })
        .await
    }

    /// Starts test component `name` as `id` on host `host_id` (another host of the lattice).
    pub async fn component_on(&self, host_id: &str, name: &str, id: &str) -> Result<()> {
        self.component_scaled_on(host_id, name, id, 4).await
    }

    /// The health messages of `replicas` replicas: one health request, answered by each.
    pub async fn replica_healths(&self, replicas: usize) -> Result<Vec<String>> {
        use futures::StreamExt as _;
        let subject = format!("wasmbus.rpc.{LATTICE}.{PROVIDER_ID}.health");
        let inbox = self.client.new_inbox();
        let mut answers = self.client.subscribe(inbox.clone()).await?;
        self.client
            .publish_with_reply(subject, inbox, "".into())
            .await?;
        let mut messages = Vec::new();
        while messages.len() < replicas {
            let reply = tokio::time::timeout(Duration::from_secs(10), answers.next())
                .await
                .context("a replica did not answer its health request")?
                .context("inbox closed")?;
            let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            messages.push(value["message"].as_str().unwrap_or_default().to_string());
        }
        Ok(messages)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        clean_up_host(&self.host_id);
    }
}

/// What a host leaves behind: a test that failed may not have stopped it, so the provider
/// processes it started are killed (they would otherwise outlive the test and keep reconnecting
/// to NATS); and the host extracts the provider binary from the PAR into a per-host cache it
/// never removes (about 100 MiB per test, which fills a disk over a few runs).
fn clean_up_host(host_id: &str) {
    kill_children_matching(host_id);
    let cache = std::env::temp_dir().join("wasmcloudcache").join(host_id);
    let _ = std::fs::remove_dir_all(cache);
}

/// Kills child processes of this test process whose command line mentions `needle`.
fn kill_children_matching(needle: &str) -> usize {
    let pids = child_pids_matching(needle);
    for pid in &pids {
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
    }
    pids.len()
}

/// Child processes of this test process whose command line mentions `needle`.
fn child_pids_matching(needle: &str) -> Vec<String> {
    let mut pids = Vec::new();
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if pid.parse::<u32>().is_err() {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Field 4 (after the parenthesised command) is the parent PID.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
        if ppid.as_deref() != Some(me.as_str()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Prints a measured figure and appends it to `<target>/tmp/figures.txt`, which `.ci/run`
/// shows at the end (cargo captures the output of tests that pass).
pub fn figure(line: &str) {
    use std::io::Write as _;
    println!("figure: {line}");
    let Some(dir) = option_env!("CARGO_TARGET_TMPDIR") else {
        return; // an example, not a test
    };
    let path = Path::new(dir).join("figures.txt");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}

/// Waits until `check` passes, polling, or fails with the last error after `timeout`.
pub async fn eventually<F, Fut, T>(timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                bail!("condition not met within {timeout:?}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

impl Env {
    /// Starts the test component `id` with the session API and a server-mode handler link named
    /// `link` listening on a free port; returns the `ws://` base URL.
    pub async fn serve(&self, id: &str, link: &str, extra: &[(&str, &str)]) -> Result<String> {
        self.serve_scaled(id, link, extra, 4).await
    }

    /// [`Env::serve`] with up to `instances` instances of the component at once.
    pub async fn serve_scaled(
        &self,
        id: &str,
        link: &str,
        extra: &[(&str, &str)],
        instances: u32,
    ) -> Result<String> {
        self.component_scaled("test_echo", id, instances).await?;
        self.link_consumer(id, "default", &[]).await?;
        self.link_sessions(id).await?;
        let address = format!("127.0.0.1:{}", free_port()?);
        let mut pairs = vec![("MODE", "server"), ("LISTEN_ADDRESS", address.as_str())];
        pairs.extend(extra.iter().copied());
        let config = format!("{link}-cfg");
        self.config(&config, &pairs).await?;
        self.link_handler(id, link, &[&config]).await?;
        let url = format!("ws://{address}");
        wait_listening(&url).await?;
        Ok(url)
    }
}

/// Waits until the listener of a `ws://` URL accepts TCP connections.
pub async fn wait_listening(url: &str) -> Result<()> {
    let address = url.trim_start_matches("ws://").trim_start_matches("wss://");
    let address = address.split('/').next().unwrap_or(address).to_string();
    eventually(Duration::from_secs(15), || {
        let address = address.clone();
        async move {
            tokio::net::TcpStream::connect(&address).await?;
            Ok(())
        }
    })
    .await
}

/// Set (by the demo) before a host starts: the host tells its providers to log warnings and
/// errors only, so that what the demo prints is the story.
#[allow(dead_code)]
pub static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The in-process host's shutdown: the host runs until it is awaited.
pub type HostShutdown = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>;

/// Starts a wasmCloud host in this process on `nats_url` (lattice `default`), configured as
/// wasmcloud-test-util's test host is, plus `otel`; returns its ID and its shutdown.
pub async fn start_host(
    nats_url: &str,
    otel: wasmcloud_core::OtelConfig,
) -> Result<(String, HostShutdown)> {
    use wasmcloud_host::wasmbus::{Features, Host, HostConfig};
    let nats_url = url::Url::parse(nats_url)?;
    let host_key = std::sync::Arc::new(nkeys::KeyPair::new_server());
    let host_id = host_key.public_key();
    let (_host, shutdown) = Host::new(HostConfig {
        ctl_nats_url: nats_url.clone(),
        rpc_nats_url: nats_url,
        lattice: LATTICE.into(),
        host_key: Some(host_key),
        provider_shutdown_delay: Some(Duration::from_millis(300)),
        allow_file_load: true,
        experimental_features: Features::new()
            .enable_builtin_http_client()
            .enable_builtin_http_server()
            .enable_builtin_messaging_nats()
            .enable_wasmcloud_messaging_v3(),
        otel_config: otel,
        log_level: if QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            wasmcloud_core::logging::Level::Warn
        } else {
            wasmcloud_core::logging::Level::Info
        },
        ..Default::default()
    })
    .await
    .context("failed to start the wasmCloud host")?;
    Ok((host_id, Box::pin(shutdown)))
}

/// A TCP proxy that can cut its clients off the way a dropped network does: after
/// [`Blackhole::cut`] no byte passes either way and the client side is not closed (it sees only
/// silence); the upstream side stays open too, or is closed (a partition as the server sees
/// it). A client that connects after the cut gets silence.
#[allow(dead_code)]
pub struct Blackhole {
    /// `<scheme>://<address>` of the proxy.
    pub url: String,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[allow(dead_code)]
impl Blackhole {
    /// A proxy to the `ws://` URL `upstream`, keeping both sides open on a cut.
    pub async fn start(upstream: &str) -> Result<Self> {
        let address = upstream.trim_start_matches("ws://");
        let address = address.split('/').next().unwrap_or_default();
        Self::start_with("ws", address, false).await
    }

    /// A proxy to `upstream` (`host:port`) whose URL has `scheme`; `close_upstream`: a cut
    /// closes the upstream side.
    pub async fn start_with(scheme: &str, upstream: &str, close_upstream: bool) -> Result<Self> {
        let upstream = upstream.to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("{scheme}://{}", listener.local_addr()?);
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let (mut dr, mut dw) = down.into_split();
                    let mut kept = None;
                    if !*cut_rx.borrow() {
                        let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (mut ur, mut uw) = up.into_split();
                        tokio::select! {
                            _ = tokio::io::copy(&mut dr, &mut uw) => return,
                            _ = tokio::io::copy(&mut ur, &mut dw) => return,
                            _ = cut_rx.wait_for(|cut| *cut) => {}
                        }
                        if !close_upstream {
                            kept = Some((ur, uw));
                        }
                    }
                    // Cut: silent until the proxy's runtime ends.
                    std::future::pending::<()>().await;
                    drop((dr, dw, kept));
                });
            }
        });
        Ok(Self { url, cut, task })
    }

    /// From now on nothing passes.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
