//! Process-wide counters, read by health reports and logs.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Frames delivered to a component's `handle-message` without error.
    pub delivered: AtomicU64,
    /// Frames that arrived on a socket with no handler link to deliver them to.
    pub undeliverable: AtomicU64,
    /// `handle-message` calls that returned an error or failed in transport.
    pub handler_errors: AtomicU64,
    /// `handle-message` calls that did not finish within the handler timeout (hung calls).
    pub handler_timeouts: AtomicU64,
    /// Frames that were not valid JSON envelopes (answered with an error frame).
    pub invalid_envelopes: AtomicU64,
    /// Frames written to sockets by `publish`.
    pub published: AtomicU64,
    /// Publishes refused with an error returned to the component.
    pub publish_errors: AtomicU64,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
