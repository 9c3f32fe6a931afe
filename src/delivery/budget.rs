//! What inbound messages may hold while they wait for components: each component's call slots
//! ([`MAX_CONCURRENT_HANDLERS`]), and the provider-wide budget of inbound bytes
//! (`MAX_INBOUND_BYTES`), of which one component holds at most half.

use std::sync::{Arc, LazyLock, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `handle-message` calls in flight across all sessions of one component. When all are taken,
/// that component's delivery waits, its session queues fill, and its readers stop reading;
/// other components have slots of their own.
pub const MAX_CONCURRENT_HANDLERS: usize = 256;
static HANDLER_SLOTS: LazyLock<dashmap::DashMap<String, Arc<Semaphore>>> =
    LazyLock::new(dashmap::DashMap::new);

/// The call slots of `component`.
pub(super) fn handler_slots(component: &str) -> Arc<Semaphore> {
    if let Some(slots) = HANDLER_SLOTS.get(component) {
        return Arc::clone(&slots);
    }
    Arc::clone(
        &HANDLER_SLOTS
            .entry(component.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONCURRENT_HANDLERS))),
    )
}

/// The budget of inbound bytes is counted in units of this many bytes.
const BUDGET_UNIT: u64 = 1024;

/// The provider-wide budget of inbound bytes waiting for components.
struct Budget {
    room: Arc<Semaphore>,
    /// All of it, in units: a frame larger than the budget takes all of it.
    total: u32,
}

impl Budget {
    /// A component's share: half of the budget.
    fn share_units(&self) -> u32 {
        (self.total / 2).max(1)
    }

    /// The units a frame of `len` bytes takes: at least one, at most a whole share.
    fn units_for(&self, len: usize) -> u32 {
        let units = (len as u64).div_ceil(BUDGET_UNIT).max(1);
        u32::try_from(units)
            .unwrap_or(u32::MAX)
            .min(self.share_units())
    }
}

static INBOUND_BUDGET: OnceLock<Budget> = OnceLock::new();

fn budget_of(bytes: u64) -> Budget {
    let units = (bytes / BUDGET_UNIT).clamp(1, u64::from(u32::MAX));
    let total = u32::try_from(units).unwrap_or(u32::MAX);
    Budget {
        room: Arc::new(Semaphore::new(total as usize)),
        total,
    }
}

/// Sets the provider-wide budget of inbound bytes waiting for components (`MAX_INBOUND_BYTES`);
/// only the first call counts (the provider's init). Without a call, the default applies.
pub fn set_inbound_budget(bytes: u64) {
    let _ = INBOUND_BUDGET.set(budget_of(bytes));
}

fn inbound_budget() -> &'static Budget {
    INBOUND_BUDGET.get_or_init(|| budget_of(crate::config::DEFAULT_MAX_INBOUND_BYTES))
}

/// One component's share of the inbound budget: at most half of it, so one slow or attacked
/// component cannot stop every other component's sockets.
static COMPONENT_SHARES: LazyLock<dashmap::DashMap<String, Arc<Semaphore>>> =
    LazyLock::new(dashmap::DashMap::new);

pub(super) fn component_share(component: &str) -> Arc<Semaphore> {
    if let Some(share) = COMPONENT_SHARES.get(component) {
        return Arc::clone(&share);
    }
    let half = inbound_budget().share_units() as usize;
    Arc::clone(
        &COMPONENT_SHARES
            .entry(component.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(half))),
    )
}

/// Room for one queued frame: in its component's share, and in the provider-wide budget.
pub struct Reserved {
    _share: OwnedSemaphorePermit,
    _budget: OwnedSemaphorePermit,
}

/// Takes room for a frame of `len` bytes in its component's `share` and in the inbound budget,
/// waiting while either is full. A frame larger than a share takes all of it.
pub(super) async fn reserve(share: &Arc<Semaphore>, len: usize) -> Option<Reserved> {
    let budget = inbound_budget();
    let want = budget.units_for(len);
    let share = Arc::clone(share).acquire_many_owned(want).await.ok()?;
    let budget = Arc::clone(&budget.room)
        .acquire_many_owned(want)
        .await
        .ok()?;
    Some(Reserved {
        _share: share,
        _budget: budget,
    })
}

/// [`reserve`] without waiting: `None` when the share or the budget is used up.
pub(super) fn try_reserve(share: &Arc<Semaphore>, len: usize) -> Option<Reserved> {
    let budget = inbound_budget();
    let want = budget.units_for(len);
    let share = Arc::clone(share).try_acquire_many_owned(want).ok()?;
    let budget = Arc::clone(&budget.room).try_acquire_many_owned(want).ok()?;
    Some(Reserved {
        _share: share,
        _budget: budget,
    })
}
