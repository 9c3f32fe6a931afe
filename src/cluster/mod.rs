//! Several provider replicas (one per host of a lattice) acting as one provider, over NATS and
//! JetStream:
//! - each replica answers on `<base>.s.<session ID>` for every session it holds, so any
//!   replica reaches any session by a NATS request (no responders: the session is gone);
//! - every replica answers on `<base>.all`, for the lattice-wide views (one message per replica);
//! - replicas announce themselves on `<base>.presence`, so a fan-out knows whom to wait for;
//! - a client connection is held by one replica at a time, by a lease in a JetStream key-value
//!   bucket ([`lease`]); its session's metadata and groups are kept there too.
//!
//! `<base>` is `wasmcloud-websocket.<lattice>.<provider ID>`. Without JetStream the provider
//! runs alone, as a single replica would, and says so in health.

pub mod lease;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{SelectAll, StreamExt as _};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::recovery::history::token;
use crate::session::Registry;
use crate::task::OwnedTask;
use wire::{Answer, Call, Op};

/// How long joining waits for JetStream to create (or open) the bucket.
const JETSTREAM_WAIT: Duration = Duration::from_secs(20);

/// How often a replica says it is alive; a replica not heard for 3 of these is gone.
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(2);

/// The lease time of a client connection by default (`LEASE_TTL_MS`): its holder renews it
/// every quarter of it and stops reading at three fifths of it without a renewal; another
/// replica takes it over once it has seen no renewal for all of it.
pub use crate::config::DEFAULT_LEASE_TTL;

/// Serves calls forwarded by other replicas (the provider's side of [`Cluster`]).
pub type Handler =
    Arc<dyn Fn(Call) -> BoxFuture<'static, Result<serde_json::Value, String>> + Send + Sync>;

/// What a fan-out to every replica brought back.
pub struct Gathered {
    /// The answers of the other replicas (each `Ok` or its error).
    pub answers: Vec<Result<serde_json::Value, String>>,
    /// Replicas known to be alive that did not answer in time.
    pub unreached: usize,
    /// Replicas known to be alive, besides this one.
    pub expected: usize,
}

struct Peer {
    seen: Instant,
    held: usize,
    host: String,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    served: AtomicU64,
    takeovers: AtomicU64,
    lost: AtomicU64,
}

struct Inner {
    replica: String,
    /// The host this replica runs on (for health).
    host: String,
    base: String,
    nats: async_nats::Client,
    kv: kv::Store,
    lease_ttl: Duration,
    peers: Mutex<HashMap<String, Peer>>,
    /// Client connections this replica holds: lease key -> (shown URI, holder's token).
    held: Mutex<BTreeMap<String, (String, u64)>>,
    counters: Counters,
    metrics: Arc<crate::metrics::Metrics>,
    tasks: Mutex<Vec<OwnedTask>>,
}

/// A cheap handle over this replica's part of the lattice.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Joins the lattice's replicas of `provider`: creates (or opens) the bucket, subscribes, and
    /// starts announcing. `Err` (JetStream missing, say) means: run alone.
    pub async fn start(
        nats: async_nats::Client,
        lattice: &str,
        provider: &str,
        host: &str,
        lease_ttl: Duration,
        registry: &Registry,
        metrics: Arc<crate::metrics::Metrics>,
        handler: Handler,
    ) -> Result<Self, String> {
        let js = async_nats::jetstream::new(nats.clone());
        let bucket = format!("WEBSOCKET_{}_{}", token(lattice), token(provider));
        let config = kv::Config {
            bucket: bucket.clone(),
            description:
                "wasmcloud-provider-messaging-websocket: client connection leases and session state"
                    .into(),
            history: 1,
            // File storage: leases and session state survive a restart of NATS.
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        // Creating a file-backed stream can take seconds on a busy server: wait for it, then
        // look for the bucket (another replica may have made it meanwhile).
        let created = tokio::time::timeout(JETSTREAM_WAIT, js.create_key_value(config)).await;
        let kv = match created {
            Ok(Ok(kv)) => kv,
            Ok(Err(create)) => match js.get_key_value(&bucket).await {
                Ok(kv) => kv,
                Err(_) => return Err(format!("no JetStream key-value bucket ({create})")),
            },
            Err(_) => match js.get_key_value(&bucket).await {
                Ok(kv) => kv,
                Err(_) => {
                    return Err(format!(
                        "JetStream did not answer within {} s",
                        JETSTREAM_WAIT.as_secs()
                    ))
                }
            },
        };
        let base = format!("wasmcloud-websocket.{}.{}", token(lattice), token(provider));
        let inner = Arc::new(Inner {
            replica: Uuid::new_v4().simple().to_string(),
            host: host.to_string(),
            base,
            nats,
            kv,
            lease_ttl,
            peers: Mutex::default(),
            held: Mutex::default(),
            counters: Counters::default(),
            metrics,
            tasks: Mutex::default(),
        });
        let cluster = Self { inner };
        let all = cluster
            .inner
            .nats
            .subscribe(format!("{}.all", cluster.inner.base))
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        let presence = cluster
            .inner
            .nats
            .subscribe(format!("{}.presence", cluster.inner.base))
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        registry.observe(tx);
        let serving = {
            let cluster = cluster.clone();
            OwnedTask::spawn(move |cancel| cluster.serve(all, presence, rx, handler, cancel))
        };
        lock(&cluster.inner.tasks).push(serving);
        cluster.announce(true, false).await;
        info!(replica = %cluster.inner.replica, "joined the lattice's provider replicas");
        Ok(cluster)
    }

    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    pub fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl
    }

    pub(crate) fn kv(&self) -> &kv::Store {
        &self.inner.kv
    }

    fn session_subject(&self, id: &Uuid) -> String {
        format!("{}.s.{}", self.inner.base, id.simple())
    }

    /// The other replicas heard from lately.
    pub fn peers(&self) -> Vec<String> {
        let mut peers = lock(&self.inner.peers);
        peers.retain(|_, p| p.seen.elapsed() < PRESENCE_INTERVAL * 3);
        let mut ids: Vec<String> = peers.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether any other replica is alive: without one, lattice-wide views are local.
    pub fn alone(&self) -> bool {
        self.peers().is_empty()
    }

    /// Tells the other replicas this one is alive (`hello`: answer at once) or leaving.
    async fn announce(&self, hello: bool, bye: bool) {
        let held = lock(&self.inner.held).len();
        let payload = serde_json::json!({
            "replica": self.inner.replica, "host": self.inner.host, "held": held, "hello": hello, "bye": bye,
        });
        let _ = self
            .inner
            .nats
            .publish(
                format!("{}.presence", self.inner.base),
                Bytes::from(payload.to_string()),
            )
            .await;
    }

    fn heard(&self, payload: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        let Some(replica) = v.get("replica").and_then(|r| r.as_str()) else {
            return false;
        };
        if replica == self.inner.replica {
            return false;
        }
        let mut peers = lock(&self.inner.peers);
        if v.get("bye").and_then(serde_json::Value::as_bool) == Some(true) {
            peers.remove(replica);
            return false;
        }
        let held = v
            .get("held")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let host = v
            .get("host")
            .and_then(|h| h.as_str())
            .unwrap_or_default()
            .to_string();
        // A host runs one replica: an earlier one on the same host is gone (a restart).
        if !host.is_empty() {
            peers.retain(|id, p| id == replica || p.host != host);
        }
        let new = peers
            .insert(
                replica.to_string(),
                Peer {
                    seen: Instant::now(),
                    held: usize::try_from(held).unwrap_or(usize::MAX),
                    host,
                },
            )
            .is_none();
        if new {
            info!(peer = replica, "another provider replica joined");
        }
        v.get("hello").and_then(serde_json::Value::as_bool) == Some(true)
    }

    /// The one task that owns this replica's subscriptions: a session's subject while the
    /// session is here, the fan-out subject, presence.
    async fn serve(
        self,
        mut all: async_nats::Subscriber,
        mut presence: async_nats::Subscriber,
        mut sessions: mpsc::UnboundedReceiver<(Uuid, bool)>,
        handler: Handler,
        cancel: CancellationToken,
    ) {
        type Sub = std::pin::Pin<Box<dyn Stream<Item = async_nats::Message> + Send>>;
        let mut subscribed: SelectAll<Sub> = SelectAll::new();
        let mut stops: HashMap<Uuid, CancellationToken> = HashMap::new();
        let mut tick = tokio::time::interval(PRESENCE_INTERVAL);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                change = sessions.recv() => match change {
                    None => break,
                    Some((id, true)) => {
                        match self.inner.nats.subscribe(self.session_subject(&id)).await {
                            Ok(sub) => {
                                let stop = CancellationToken::new();
                                subscribed.push(Box::pin(sub.take_until(stop.clone().cancelled_owned())));
                                if let Some(old) = stops.insert(id, stop) {
                                    old.cancel();
                                }
                            }
                            Err(e) => warn!(session = %id, error = %e, "cannot answer for a session"),
                        }
                    }
                    Some((id, false)) => {
                        if let Some(stop) = stops.remove(&id) {
                            stop.cancel();
                        }
                    }
                },
                Some(msg) = subscribed.next(), if !subscribed.is_empty() => self.answer(msg, &handler, false),
                Some(msg) = all.next() => self.answer(msg, &handler, true),
                Some(msg) = presence.next() => {
                    if self.heard(&msg.payload) {
                        self.announce(false, false).await;
                    }
                }
                _ = tick.tick() => self.announce(false, false).await,
            }
        }
    }

    /// Serves one call from another replica, in a task of its own (writes may wait).
    /// A fan-out (`all`) also reaches its sender, which answers for itself without it.
    fn answer(&self, msg: async_nats::Message, handler: &Handler, fan_out: bool) {
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        let call = match wire::decode_call(&msg.payload) {
            Ok(call) => call,
            Err(e) => {
                debug!(error = %e, "malformed call from a replica");
                return;
            }
        };
        let from_self = fan_out
            && msg
                .headers
                .as_ref()
                .and_then(|h| h.get("ws-replica"))
                .is_some_and(|r| r.as_str() == self.inner.replica);
        if from_self {
            return;
        }
        self.inner.counters.served.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.replica_event("served");
        let handler = Arc::clone(handler);
        let cluster = self.clone();
        tokio::spawn(async move {
            let result = handler(call).await;
            let answer = Answer::new(&cluster.inner.replica, result).encode();
            let _ = cluster.inner.nats.publish(reply, answer).await;
        });
    }

    fn headers(&self) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("ws-replica", self.inner.replica.as_str());
        headers
    }

    /// Forwards `op` to the replica that holds session `id`. No replica holds it: `unknown
    /// session <id>`, as for a local one.
    pub async fn call_session(
        &self,
        id: &Uuid,
        component: &str,
        op: &Op,
        body: &[u8],
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        use async_nats::client::RequestErrorKind;
        self.inner
            .counters
            .forwarded
            .fetch_add(1, Ordering::Relaxed);
        let request = async_nats::Request::new()
            .headers(self.headers())
            .payload(wire::encode_call(
                component,
                Some(*id),
                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                op,
                body,
            ))
            .timeout(Some(timeout));
        match self
            .inner
            .nats
            .send_request(self.session_subject(id), request)
            .await
        {
            Ok(msg) => Answer::decode(&msg.payload)?.result(),
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => Err(format!("unknown session {id}")),
                RequestErrorKind::TimedOut => Err(format!(
                    "the replica holding session {id} did not answer within {} ms",
                    timeout.as_millis()
                )),
                RequestErrorKind::Other => Err(format!("cannot reach session {id}: {e}")),
            },
        }
    }

    /// Sends `op` to every other replica (each has `budget` for its part) and gathers their
    /// answers until all known ones answered or `timeout` passed.
    pub async fn call_all(
        &self,
        component: &str,
        op: &Op,
        body: &[u8],
        budget: Duration,
        timeout: Duration,
    ) -> Gathered {
        let peers = self.peers();
        if peers.is_empty() {
            return Gathered {
                answers: Vec::new(),
                unreached: 0,
                expected: 0,
            };
        }
        self.inner
            .counters
            .forwarded
            .fetch_add(1, Ordering::Relaxed);
        let inbox = self.inner.nats.new_inbox();
        let mut replies = match self.inner.nats.subscribe(inbox.clone()).await {
            Ok(sub) => sub,
            Err(_) => {
                return Gathered {
                    answers: Vec::new(),
                    unreached: peers.len(),
                    expected: peers.len(),
                }
            }
        };
        let sent = self
            .inner
            .nats
            .publish_with_reply_and_headers(
                format!("{}.all", self.inner.base),
                inbox,
                self.headers(),
                wire::encode_call(
                    component,
                    None,
                    u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
                    op,
                    body,
                ),
            )
            .await;
        let mut answers = Vec::new();
        let mut answered: Vec<String> = Vec::new();
        if sent.is_ok() {
            let deadline = tokio::time::Instant::now() + timeout;
            while !peers.iter().all(|p| answered.contains(p)) {
                match tokio::time::timeout_at(deadline, replies.next()).await {
                    Ok(Some(msg)) => match Answer::decode(&msg.payload) {
                        Ok(answer) => {
                            if !answered.contains(&answer.from) {
                                answered.push(answer.from.clone());
                                answers.push(answer.result());
                            }
                        }
                        Err(e) => debug!(error = %e, "malformed answer"),
                    },
                    _ => break,
                }
            }
        }
        let unreached = peers.iter().filter(|p| !answered.contains(p)).count();
        if unreached > 0 {
            warn!(
                unreached,
                expected = peers.len(),
                "replicas did not answer a fan-out in time"
            );
        }
        Gathered {
            answers,
            unreached,
            expected: peers.len(),
        }
    }

    pub(crate) fn hold(&self, key: &str, shown: &str, token: u64) {
        lock(&self.inner.held).insert(key.to_string(), (shown.to_string(), token));
    }

    pub(crate) fn release(&self, key: &str, token: u64) {
        let mut held = lock(&self.inner.held);
        if held.get(key).is_some_and(|(_, t)| *t == token) {
            held.remove(key);
        }
    }

    /// The host this replica runs on.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// A replica that stopped renewing a lease is gone: fan-outs stop waiting for it now.
    pub(crate) fn gone(&self, replica: &str) {
        lock(&self.inner.peers).remove(replica);
    }

    pub(crate) fn counted_takeover(&self) {
        self.inner
            .counters
            .takeovers
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn counted_loss(&self) {
        self.inner.counters.lost.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.replica_event("lease_lost");
    }

    /// Forwarded calls, calls served for others, takeovers and lease losses so far.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let c = &self.inner.counters;
        (
            c.forwarded.load(Ordering::Relaxed),
            c.served.load(Ordering::Relaxed),
            c.takeovers.load(Ordering::Relaxed),
            c.lost.load(Ordering::Relaxed),
        )
    }

    /// The health text: this replica, the others seen, the connections this one holds.
    pub fn summary(&self) -> String {
        let peers = self.peers();
        let held: Vec<String> = lock(&self.inner.held)
            .values()
            .map(|(shown, _)| shown.clone())
            .collect();
        let others: Vec<String> = {
            let p = lock(&self.inner.peers);
            peers
                .iter()
                .map(|id| format!("{id} (holds {})", p.get(id).map_or(0, |p| p.held)))
                .collect()
        };
        let (forwarded, served, takeovers, lost) = self.counts();
        format!(
            "replica {} on host {} of {}; other replicas: [{}]; holds {} client connection(s): [{}]; forwarded {forwarded}, served {served}, takeovers {takeovers}, leases lost {lost}",
            self.inner.replica,
            self.inner.host,
            peers.len() + 1,
            others.join(", "),
            held.len(),
            held.join(", ")
        )
    }

    /// Leaves the lattice: the others stop waiting for this replica at once.
    pub async fn leave(&self) {
        self.announce(false, true).await;
        lock(&self.inner.tasks).clear();
    }
}
