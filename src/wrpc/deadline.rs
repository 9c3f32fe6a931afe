//! A point in time that a call's streams wait against (server side: the caller's parameters
//! and their end), with its timer made only if it is waited for.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A point in time, with its timer made the first time it is waited for.
pub(crate) struct Deadline {
    at: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    pub(crate) fn at(at: tokio::time::Instant) -> Self {
        Self { at, timer: None }
    }

    pub(super) fn instant(&self) -> tokio::time::Instant {
        self.at
    }

    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
    }
}
