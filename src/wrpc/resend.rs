//! Server side: sending a call's accept again until its caller shows it has it. The host's
//! 0.29 client can drop our accept (see the module map), and would then wait forever; one
//! task for the whole server watches every call from its accept until the caller's first
//! parameter message arrives, the call ends or [`PARAMS_PATIENCE`] has passed.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tracing::{debug, warn};

use super::mux::Served;
use super::server::PARAMS_PATIENCE;
use crate::task::OwnedTask;

/// The first re-send of an accept whose caller has sent nothing back; each later one waits
/// twice as long, up to [`ACCEPT_RESEND_MAX`].
pub const ACCEPT_RESEND_FIRST: Duration = Duration::from_millis(20);
pub const ACCEPT_RESEND_MAX: Duration = Duration::from_secs(1);

/// A call whose accept may have to be sent again.
struct Pending {
    due: tokio::time::Instant,
    delay: Duration,
    give_up: tokio::time::Instant,
    sent: u32,
    reply: Subject,
    subject: Subject,
    /// Gone with the call (its route and results).
    served: Weak<Served>,
}

/// One task for the whole server that sends accepts again: each call is watched from its
/// accept until its caller's first parameter message arrives, the call ends or
/// [`PARAMS_PATIENCE`] has passed. Every call first waits [`ACCEPT_RESEND_FIRST`], so calls
/// become due in the order they came and wait in a queue; the few sent again wait in a list.
pub(super) struct Resender {
    calls: tokio::sync::mpsc::UnboundedSender<Pending>,
    _task: OwnedTask,
}

impl Resender {
    pub(super) fn start(nats: async_nats::Client) -> Self {
        let (calls, mut incoming) = tokio::sync::mpsc::unbounded_channel::<Pending>();
        let task = OwnedTask::spawn(|cancel| async move {
            let mut first: VecDeque<Pending> = VecDeque::new();
            let mut again: Vec<Pending> = Vec::new();
            let timer = tokio::time::sleep(Duration::from_secs(3600));
            tokio::pin!(timer);
            loop {
                let next = first.front().map(|p| p.due).into_iter();
                let next = next.chain(again.iter().map(|p| p.due)).min();
                if let Some(due) = next {
                    if timer.deadline() != due || timer.is_elapsed() {
                        timer.as_mut().reset(due);
                    }
                }
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    () = &mut timer, if next.is_some() => {
                        let now = tokio::time::Instant::now();
                        let mut due = Vec::new();
                        while first.front().is_some_and(|p| p.due <= now) {
                            due.extend(first.pop_front());
                        }
                        let (now_due, later): (Vec<_>, Vec<_>) =
                            again.drain(..).partition(|p| p.due <= now);
                        again = later;
                        due.extend(now_due);
                        for call in due {
                            if let Some(call) = resend(&nats, call, now).await {
                                again.push(call);
                            }
                        }
                    }
                    // After the timer: a steady stream of new calls must not hold back the
                    // ones that are due.
                    call = incoming.recv() => match call {
                        Some(call) => first.push_back(call),
                        None => return,
                    },
                }
            }
        });
        Self { calls, _task: task }
    }

    /// Watches a call whose accept (to `reply`, naming `subject`) was sent at `now`.
    pub(super) fn watch(
        &self,
        reply: Subject,
        subject: Subject,
        served: &Arc<Served>,
        now: tokio::time::Instant,
    ) {
        let call = Pending {
            due: now + ACCEPT_RESEND_FIRST,
            delay: ACCEPT_RESEND_FIRST,
            give_up: now + PARAMS_PATIENCE,
            sent: 0,
            reply,
            subject,
            served: Arc::downgrade(served),
        };
        let _ = self.calls.send(call);
    }
}

/// Sends `call`'s accept again if its caller has still sent nothing; returns it to wait for
/// the next time, or `None` when it needs no more watching.
async fn resend(
    nats: &async_nats::Client,
    mut call: Pending,
    now: tokio::time::Instant,
) -> Option<Pending> {
    let served = call.served.upgrade()?;
    if served.params_seen.load(Ordering::Acquire) {
        return None;
    }
    if now >= call.give_up {
        warn!(reply = %call.reply, sent = call.sent,
            "the caller never answered the accept of its call; gave up");
        return None;
    }
    served.accept_resent.store(true, Ordering::Release);
    drop(served);
    call.sent += 1;
    debug!(reply = %call.reply, sent = call.sent, "no parameters yet: accept sent again");
    nats.publish_with_reply(call.reply.clone(), call.subject.clone(), Bytes::new())
        .await
        .ok()?;
    call.delay = (call.delay * 2).min(ACCEPT_RESEND_MAX);
    call.due = now + call.delay;
    Some(call)
}
