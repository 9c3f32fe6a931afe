//! Pending handshakes. Before admission a connection is a pending handshake, bounded three
//! ways: one deadline (`HANDSHAKE_TIMEOUT_SEC`) covers TLS and the upgrade together from TCP
//! accept; at most `MAX_PENDING_HANDSHAKES` are pending at once, and a new connection beyond
//! that drops the oldest pending one (an idle attacker is always older than a real client, which
//! finishes in milliseconds); at most `MAX_HANDSHAKES_PER_ADDRESS` are pending from one remote
//! IP, and a connection beyond that is closed at once. Pending handshakes do not count against
//! `MAX_CONNECTIONS`. Cancelling the listener (link deleted) drops pending handshakes too, so no
//! session opens after it.
//!
//! Dropped handshakes are logged at debug one by one, and counted in a warning at most once a
//! second ([`DROP_WARN_INTERVAL`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Why a connection was dropped before admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dropped {
    /// Its remote address had `MAX_HANDSHAKES_PER_ADDRESS` pending already.
    PerAddress,
    /// `MAX_PENDING_HANDSHAKES` were pending and it was the oldest.
    Evicted,
    /// It did not finish TLS and the upgrade within `HANDSHAKE_TIMEOUT_SEC`.
    TimedOut,
}

/// Pending handshakes, oldest first, counted per remote IP. Generic over what each entry holds
/// (the listener keeps the connection's cancel token there) so the bookkeeping stands alone.
#[derive(Debug)]
struct Handshakes<T> {
    max_total: usize,
    max_per_address: usize,
    next_id: u64,
    /// By entry order: the first is the oldest.
    order: BTreeMap<u64, (IpAddr, T)>,
    per_address: HashMap<IpAddr, usize>,
}

/// The outcome of [`Handshakes::enter`].
#[derive(Debug, PartialEq, Eq)]
enum Entered<T> {
    /// The address is at its cap: the connection must be closed.
    Refused,
    /// Pending as `id`; `evicted` is the oldest entry's value when it was dropped to make room.
    Pending { id: u64, evicted: Option<T> },
}

impl<T> Handshakes<T> {
    fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            next_id: 0,
            order: BTreeMap::new(),
            per_address: HashMap::new(),
        }
    }

    fn enter(&mut self, ip: IpAddr, value: T) -> Entered<T> {
        if self.from(ip) >= self.max_per_address {
            return Entered::Refused;
        }
        let evicted = if self.order.len() >= self.max_total {
            self.order.pop_first().map(|(_, (old_ip, old))| {
                self.release(old_ip);
                old
            })
        } else {
            None
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.order.insert(id, (ip, value));
        *self.per_address.entry(ip).or_insert(0) += 1;
        Entered::Pending { id, evicted }
    }

    /// The handshake `id` ended (admitted, failed or timed out); false when it was evicted.
    fn leave(&mut self, id: u64) -> bool {
        match self.order.remove(&id) {
            Some((ip, _)) => {
                self.release(ip);
                true
            }
            None => false,
        }
    }

    fn release(&mut self, ip: IpAddr) {
        if let Some(count) = self.per_address.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_address.remove(&ip);
            }
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn from(&self, ip: IpAddr) -> usize {
        self.per_address.get(&ip).copied().unwrap_or(0)
    }
}

/// Connections dropped before admission since the last warning.
#[derive(Debug, Default)]
struct DropCounts {
    per_address: u64,
    evicted: u64,
    timed_out: u64,
    last_warn: Option<std::time::Instant>,
}

/// How often at most the listener warns about dropped handshakes (with counts).
pub(super) const DROP_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// One listener's pending handshakes and what it dropped.
pub(super) struct Pending {
    handshakes: Mutex<Handshakes<CancellationToken>>,
    dropped: Mutex<DropCounts>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pending {
    pub(super) fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            handshakes: Mutex::new(Handshakes::new(max_total, max_per_address)),
            dropped: Mutex::new(DropCounts::default()),
        }
    }

    /// Registers a new connection from `addr`; `None` when it must be closed at once. Evicts
    /// (cancels) the oldest pending handshake when the listener is full.
    pub(super) fn enter(
        self: &Arc<Self>,
        addr: SocketAddr,
        token: CancellationToken,
    ) -> Option<Ticket> {
        let ip = addr.ip().to_canonical();
        let entered = lock(&self.handshakes).enter(ip, token);
        match entered {
            Entered::Refused => {
                self.note(Dropped::PerAddress, addr);
                None
            }
            Entered::Pending { id, evicted } => {
                if let Some(oldest) = evicted {
                    oldest.cancel();
                    self.note(Dropped::Evicted, addr);
                }
                Some(Ticket {
                    pending: Arc::clone(self),
                    id,
                })
            }
        }
    }

    /// Counts a dropped handshake: logs it at debug, and warns at most once a second.
    fn note(&self, why: Dropped, addr: SocketAddr) {
        match why {
            Dropped::PerAddress => {
                debug!(%addr, "too many pending handshakes from this address; closed")
            }
            Dropped::Evicted => {
                debug!(%addr, "pending handshakes full; the oldest was dropped for this one")
            }
            Dropped::TimedOut => debug!(%addr, "handshake timed out"),
        }
        let mut counts = lock(&self.dropped);
        match why {
            Dropped::PerAddress => counts.per_address += 1,
            Dropped::Evicted => counts.evicted += 1,
            Dropped::TimedOut => counts.timed_out += 1,
        }
        self.warn_if_due(&mut counts);
    }

    /// Warns with the counts not yet reported, unless a warning went out less than a second ago.
    /// Also called once a second by the accept loop, so the end of a burst is reported too.
    pub(super) fn flush(&self) {
        self.warn_if_due(&mut lock(&self.dropped));
    }

    fn warn_if_due(&self, counts: &mut DropCounts) {
        if counts.per_address + counts.evicted + counts.timed_out == 0 {
            return;
        }
        let now = std::time::Instant::now();
        if counts
            .last_warn
            .is_some_and(|last| now.duration_since(last) < DROP_WARN_INTERVAL)
        {
            return;
        }
        let pending = lock(&self.handshakes).len();
        warn!(
            refused_per_address = counts.per_address,
            evicted_oldest = counts.evicted,
            timed_out = counts.timed_out,
            pending,
            "connections dropped before admission (counts since the last warning)"
        );
        *counts = DropCounts {
            last_warn: Some(now),
            ..DropCounts::default()
        };
    }
}

/// A pending handshake's place; leaving the pending set when dropped.
pub(super) struct Ticket {
    pending: Arc<Pending>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.pending.handshakes).leave(self.id);
    }
}

/// A connection not yet admitted: its peer, its one deadline and its pending place.
pub(super) struct Handshake {
    pub(super) addr: SocketAddr,
    pub(super) deadline: Instant,
    pub(super) ticket: Ticket,
}

/// Runs `step` until the handshake deadline; `None` (and the reason logged) when the deadline
/// passed or the connection was cancelled (link deleted, or evicted as the oldest pending).
pub(super) async fn until_deadline<F: std::future::Future>(
    step: F,
    handshake: &Handshake,
    cancel: &CancellationToken,
) -> Option<F::Output> {
    tokio::select! {
        // Cancel first: once the link is deleted, bytes that arrive later finish no upgrade.
        biased;
        () = cancel.cancelled() => {
            debug!(addr = %handshake.addr, "handshake cancelled (link deleted or evicted)");
            None
        }
        result = tokio::time::timeout_at(handshake.deadline, step) => match result {
            Ok(output) => Some(output),
            Err(_) => {
                handshake.ticket.pending.note(Dropped::TimedOut, handshake.addr);
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_oldest_pending_handshake_makes_room_and_one_address_is_capped() {
        let mut book = Handshakes::new(3, 2);
        let pending = |entered: Entered<&'static str>| match entered {
            Entered::Pending { id, evicted } => (id, evicted),
            Entered::Refused => panic!("refused"),
        };
        let (a, none) = pending(book.enter(ip(1), "a"));
        assert_eq!(none, None);
        let (_b, _) = pending(book.enter(ip(1), "b"));
        // A third from the same address is refused; nothing is evicted for it.
        assert_eq!(book.enter(ip(1), "refused"), Entered::Refused);
        assert_eq!((book.len(), book.from(ip(1))), (2, 2));
        let (_c, none) = pending(book.enter(ip(2), "c"));
        assert_eq!(none, None);
        // Full (3): the next connection evicts the oldest, "a", which frees a place of ip 1.
        let (_d, evicted) = pending(book.enter(ip(3), "d"));
        assert_eq!(evicted, Some("a"));
        assert_eq!(book.len(), 3);
        assert_eq!(book.from(ip(1)), 1);
        // The evicted handshake's own end is then a no-op.
        assert!(!book.leave(a));
        assert_eq!(book.len(), 3);
        // ip 1 has room again, and the oldest now is "b".
        let (e, evicted) = pending(book.enter(ip(1), "e"));
        assert_eq!(evicted, Some("b"));
        assert_eq!(book.from(ip(1)), 1);
        assert!(book.leave(e));
        assert_eq!((book.len(), book.from(ip(1))), (2, 0));
        assert!(
            !book.per_address.contains_key(&ip(1)),
            "no empty entries kept"
        );
    }

    #[tokio::test]
    async fn tickets_leave_the_pending_set_and_eviction_cancels_the_oldest() {
        let pending = Arc::new(Pending::new(2, 2));
        let addr = |port| SocketAddr::from(([10, 0, 0, 1], port));
        let (t1, t2, t3) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let first = pending.enter(addr(1), t1.clone()).expect("first");
        let second = pending.enter(addr(2), t2.clone()).expect("second");
        // The same address is at its cap of 2.
        assert!(pending.enter(addr(3), CancellationToken::new()).is_none());
        drop(second);
        let third = pending
            .enter(addr(3), t3.clone())
            .expect("room after a ticket ended");
        assert!(!t1.is_cancelled());
        // Full: a new address evicts the oldest (first), not the newer third.
        let v6 = "[::ffff:10.0.0.2]:9".parse().expect("addr");
        let fourth = pending.enter(v6, CancellationToken::new()).expect("fourth");
        assert!(t1.is_cancelled() && !t3.is_cancelled());
        drop(first);
        assert_eq!(lock(&pending.handshakes).len(), 2);
        assert_eq!(
            lock(&pending.handshakes).from(ip(2)),
            1,
            "v4-mapped counts as v4"
        );
        drop((third, fourth));
        assert_eq!(lock(&pending.handshakes).len(), 0);
        {
            // Refused (per address) and evicted, both within a second: one warning so far.
            let counts = lock(&pending.dropped);
            assert!(counts.last_warn.is_some());
            assert_eq!((counts.per_address, counts.evicted), (0, 1));
        }
        // Within the second a flush reports nothing; later it reports and resets the counts.
        pending.flush();
        assert_eq!(lock(&pending.dropped).evicted, 1);
        lock(&pending.dropped).last_warn =
            std::time::Instant::now().checked_sub(DROP_WARN_INTERVAL);
        pending.flush();
        assert_eq!(lock(&pending.dropped).evicted, 0);
    }
}
