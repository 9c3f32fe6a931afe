//! Liveness. Three concurrent parts of [`serve`] share the `Liveness` atomics:
//! - the reader records when the peer was last heard (any frame, pongs included) and when a data
//!   frame last came in;
//! - the writer sends a ping every `PING_INTERVAL` when it can, and records when a data frame
//!   last went out; each of its write steps (ping, feed, flush) is bounded by ping interval +
//!   pong timeout when pings are on: a step that long without completing means the peer is not
//!   reading, and the socket ends;
//! - a watchdog (its own branch of `serve`'s select, so it fires while a write is blocked)
//!   ends the socket when the peer was silent for ping interval + pong timeout (dead, 1006), or
//!   no data frame went either way for the idle timeout (1001).
//!
//! Blame. While the reader waits for the sink, the socket is not read, so the peer's pongs and
//! frames wait in TCP: that silence is the component's doing, not the peer's. The watchdog
//! suspends both checks while the reader waits in [`FrameSink::frame`], and when the call
//! returns the peer counts as just seen (and the socket as just active). Reading stays paused:
//! only the blame changes.
//!
//! [`serve`]: super::serve
//! [`FrameSink::frame`]: super::FrameSink::frame

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Closed, Keepalive};

/// When the socket last heard anything, and last carried data (either way), in ms since it
/// opened; and whether the reader is waiting for the sink, when the peer is not to blame.
pub(super) struct Liveness {
    opened: Instant,
    last_seen: AtomicU64,
    last_data: AtomicU64,
    delivering: AtomicBool,
}

impl Liveness {
    pub(super) fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_seen: AtomicU64::new(0),
            last_data: AtomicU64::new(0),
            delivering: AtomicBool::new(false),
        }
    }
    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    pub(super) fn seen(&self, data: bool) {
        let now = self.now();
        self.last_seen.store(now, Ordering::SeqCst);
        if data {
            self.last_data.store(now, Ordering::SeqCst);
        }
    }
    /// A data frame was written to the peer.
    pub(super) fn wrote_data(&self) {
        self.last_data.store(self.now(), Ordering::SeqCst);
    }
    fn silent_for(&self, last: &AtomicU64) -> Duration {
        Duration::from_millis(self.now().saturating_sub(last.load(Ordering::SeqCst)))
    }
    /// Runs the sink's `frame` with the peer out of blame: while the reader waits here the
    /// socket is not read, so pongs and frames queue up in TCP through no fault of the peer.
    /// When it returns the peer counts as just seen (it was: its frame is what we delivered).
    pub(super) async fn delivering<F: Future<Output = ()>>(&self, frame: F) {
        self.delivering.store(true, Ordering::SeqCst);
        frame.await;
        self.seen(true);
        self.delivering.store(false, Ordering::SeqCst);
    }
    fn is_delivering(&self) -> bool {
        self.delivering.load(Ordering::SeqCst)
    }
}

/// How long the peer may stay silent (no pong, no frame) before it counts as dead, and how long
/// one write may make no progress: ping interval + pong timeout, when pings are on.
pub(super) fn dead_after(keepalive: Keepalive) -> Option<Duration> {
    keepalive
        .ping_interval
        .map(|interval| interval.saturating_add(keepalive.pong_timeout))
}

/// A tokio interval that first fires after `every`, and after a late tick waits a full `every`
/// again; `None` when `every` is too far off to schedule.
pub(super) fn ticker(every: Duration) -> Option<tokio::time::Interval> {
    let start = tokio::time::Instant::now().checked_add(every)?;
    let mut ticker = tokio::time::interval_at(start, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(ticker)
}

/// Ends the socket when the peer is dead (silent for ping interval + pong timeout) or idle (no
/// data frame either way for the idle timeout). It only reads the [`Liveness`] atomics, so it
/// fires while a write is blocked; while the reader waits for the sink it blames nobody.
pub(super) async fn watchdog(keepalive: Keepalive, liveness: &Liveness) -> Closed {
    let dead_after = dead_after(keepalive);
    let every = [keepalive.ping_interval, keepalive.idle_timeout]
        .into_iter()
        .flatten()
        .min()
        .map(|d| d.clamp(Duration::from_millis(50), Duration::from_secs(1)));
    let Some(mut ticker) = every.and_then(ticker) else {
        return std::future::pending().await;
    };
    loop {
        ticker.tick().await;
        if liveness.is_delivering() {
            continue;
        }
        if let Some(dead_after) = dead_after {
            if liveness.silent_for(&liveness.last_seen) > dead_after {
                return Closed::abnormal(format!(
                    "peer did not answer pings for {} s",
                    dead_after.as_secs()
                ));
            }
        }
        if let Some(idle) = keepalive.idle_timeout {
            if liveness.silent_for(&liveness.last_data) > idle {
                return Closed {
                    code: 1001,
                    reason: format!("idle for {} s", idle.as_secs()),
                };
            }
        }
    }
}
