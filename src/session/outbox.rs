//! A session's way out: its bounded queue to the socket task, the slow-consumer policy, and
//! the wait for a client connection to come back. With recovery, a message is numbered and
//! kept in the history as it is queued ([`Outbox::publish`]), and a server session's queue is
//! replaced by each resumed connection's ([`Outbox::attach`]).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::recovery::{with_seq, Keeper, Sequencer};
use crate::ws::socket::{ConnState, Outbound};

/// The sending half of one session's socket, and the state the socket task reports.
pub struct Outbox {
    id: Uuid,
    state: watch::Receiver<ConnState>,
    /// Replaced when a recoverable session's client resumes on a new socket.
    outbound: Mutex<mpsc::Sender<Box<Outbound>>>,
    /// `RECOVERY=true`: numbers and keeps every message ([`Outbox::publish`]).
    recovery: Option<Arc<Sequencer>>,
    /// `RECOVERY=true` in client mode: keeps what is published while the connection is down.
    keeper: Option<Arc<Keeper>>,
    /// Woken by every pong of the peer (see [`Outbox::probe`]).
    pongs: Notify,
    /// The session API closed the socket (recovery: the session ends with it).
    closing: std::sync::atomic::AtomicBool,
    /// The largest frame the socket can write.
    max_frame_bytes: usize,
    /// Client sessions reconnect: a publish while disconnected waits this long (`None`: it
    /// fails at once).
    publish_wait: Option<std::time::Duration>,
    waiting: Semaphore,
    write_timeout: std::time::Duration,
    close_slow: bool,
    kick: Notify,
}

impl Outbox {
    pub(super) fn new(
        id: Uuid,
        options: &super::SessionOptions,
        state: watch::Receiver<ConnState>,
        outbound: mpsc::Sender<Box<Outbound>>,
    ) -> Self {
        Self {
            id,
            state,
            outbound: Mutex::new(outbound),
            recovery: options.recovery.clone(),
            keeper: options.keeper.clone(),
            pongs: Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            max_frame_bytes: options.max_frame_bytes,
            publish_wait: options.publish_wait,
            waiting: Semaphore::new(options.max_waiting),
            write_timeout: options.write_timeout,
            close_slow: options.close_slow,
            kick: Notify::new(),
        }
    }

    fn sender(&self) -> mpsc::Sender<Box<Outbound>> {
        self.outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The session's numbering, when its link has `RECOVERY=true`.
    pub fn recovery(&self) -> Option<&Arc<Sequencer>> {
        self.recovery.as_ref()
    }

    /// Writes from now on go to `outbound` (a resumed client's new socket).
    pub fn attach(&self, outbound: mpsc::Sender<Box<Outbound>>) {
        *self.outbound.lock().unwrap_or_else(|e| e.into_inner()) = outbound;
        self.closing
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Writes from now on find no socket (a recoverable session waiting for its client).
    pub fn detach(&self) {
        let (closed, _) = mpsc::channel(1);
        self.attach(closed);
    }

    /// Whether the session API closed the socket (recovery: not a drop to resume from).
    pub fn closed_by_provider(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The peer answered a ping.
    pub fn ponged(&self) {
        self.pongs.notify_waiters();
    }

    /// Whether the peer answers a ping within `wait`: a socket whose peer vanished without a
    /// close (TCP cut) looks open until its keepalive notices.
    pub async fn probe(&self, wait: std::time::Duration) -> bool {
        use tokio_tungstenite::tungstenite::Bytes;
        let pong = self.pongs.notified();
        tokio::pin!(pong);
        pong.as_mut().enable();
        let ping = Message::Ping(Bytes::from_static(b"probe"));
        if self
            .sender()
            .try_send(Box::new(Outbound {
                message: ping,
                ack: None,
            }))
            .is_err()
        {
            return false;
        }
        tokio::time::timeout(wait, pong).await.is_ok()
    }

    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    pub fn is_connected(&self) -> bool {
        matches!(*self.state.borrow(), ConnState::Connected { .. })
    }

    /// Whether a message sent now reaches the peer: its socket is connected, or (recovery) the
    /// message is kept for its resume.
    pub fn reachable(&self) -> bool {
        self.recovery.is_some() || self.keeper.is_some() || self.is_connected()
    }

    /// Since when the socket has been connected, in milliseconds since the Unix epoch.
    pub fn connected_since_ms(&self) -> Option<u64> {
        match *self.state.borrow() {
            ConnState::Connected { since } => since
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_millis()).ok()),
            _ => None,
        }
    }

    /// Writes one message (an envelope, or a raw frame) and waits until it was flushed to the
    /// socket. With recovery it is numbered and kept, and it succeeds once written or kept for
    /// the client's resume (see [`Outbox::publish_kept`]).
    pub async fn publish(&self, message: Message) -> Result<(), String> {
        let deadline = || tokio::time::Instant::now() + self.write_timeout;
        match (&self.recovery, &self.keeper) {
            (Some(recovery), _) => self.publish_kept(recovery, message, deadline(), true).await,
            (None, Some(keeper)) => self.publish_or_keep(keeper, message, deadline()).await,
            (None, None) => self.send(message).await,
        }
    }

    /// Client mode with recovery: queued when the connection is up and nothing kept waits
    /// before it; kept in the history otherwise (at most `HISTORY_SIZE`), to be written by
    /// [`Outbox::flush_kept`] once the connection is back.
    async fn publish_or_keep(
        &self,
        keeper: &Keeper,
        message: Message,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let mut kept = keeper.hold_until(deadline).await.ok_or_else(|| {
            format!(
                "session {}: the message was not sent within its deadline (the messages kept while the connection was down are being written)",
                self.id
            )
        })?;
        if kept.pending == 0 && self.is_connected() {
            // Queued under the hold: a flush cannot slip in between the check and the queue.
            let done = self.queue(message)?;
            drop(kept);
            return self.written(done, deadline, true).await;
        }
        let limit = keeper.history.settings.history_size;
        if kept.pending >= limit {
            return Err(format!(
                "session {} is not connected and HISTORY_SIZE ({limit}) messages already wait for it",
                self.id
            ));
        }
        let Message::Text(text) = message else {
            return Err("with RECOVERY=true only JSON envelopes are written".to_string());
        };
        let seq = kept.last + 1;
        let stored = keeper
            .history
            .append(self.id, seq, text.as_bytes().to_vec().into())
            .await
            .map_err(|e| format!("session {} is not connected and {e}", self.id))?;
        stored
            .await
            .map_err(|e| format!("session {} is not connected and {e}", self.id))?;
        kept.last = seq;
        kept.pending += 1;
        Ok(())
    }

    /// Client mode with recovery: writes what was kept while the connection was down, in
    /// order and before anything newer, each write confirmed before the next page is read.
    /// Returns `false` when it could not finish (the history did not answer, the socket went):
    /// what was not confirmed stays kept, to be written by the next call (at least once).
    pub async fn flush_kept(&self) -> bool {
        let Some(keeper) = &self.keeper else {
            return true;
        };
        let mut kept = keeper.hold().await;
        let sender = self.sender();
        let mut found = 0;
        loop {
            let frames = match keeper.history.read_page(self.id, kept.flushed).await {
                Ok(frames) => frames,
                Err(e) => {
                    tracing::warn!(session = %self.id, error = %e,
                        "kept messages not read yet: tried again while the connection is up");
                    return false;
                }
            };
            if frames.is_empty() {
                break;
            }
            let mut writes = Vec::with_capacity(frames.len());
            for (seq, frame) in frames {
                let Ok(text) = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(frame) else {
                    continue;
                };
                let (ack, done) = oneshot::channel();
                let out = Box::new(Outbound {
                    message: Message::Text(text),
                    ack: Some(ack),
                });
                // Waits for room: the socket is up and draining the queue (a socket that
                // goes empties it).
                let queued = tokio::time::timeout(self.write_timeout, sender.send(out)).await;
                if !matches!(queued, Ok(Ok(()))) {
                    return false;
                }
                writes.push((seq, done));
            }
            for (seq, done) in writes {
                match tokio::time::timeout(self.write_timeout, done).await {
                    Ok(Ok(Ok(()))) => {
                        kept.flushed = seq;
                        kept.pending = kept.pending.saturating_sub(1);
                        found += 1;
                    }
                    _ => return false,
                }
            }
        }
        if found == 0 && kept.pending == 0 {
            return true;
        }
        keeper.history.forget(self.id).await;
        if kept.pending > 0 {
            tracing::warn!(session = %self.id, lost = kept.pending,
                "messages kept while disconnected expired (HISTORY_TTL_SEC) before the reconnect");
        }
        tracing::info!(session = %self.id, written = found, "messages kept while disconnected written");
        kept.pending = 0;
        true
    }

    /// A receiver of the connection state (client mode: it changes with every reconnect).
    pub fn watch_state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// Whether publishes wait in the history while the connection is down (client mode).
    pub fn keeps(&self) -> bool {
        self.keeper.is_some()
    }

    /// A message numbered and kept: queued for the socket when there is one (a full queue, or
    /// with `slow_on_timeout` a write not done by `deadline`, closes the socket: the client
    /// resumes and gets it from the history), and stored in the history meanwhile. Succeeds once written or stored; an
    /// error means neither.
    async fn publish_kept(
        &self,
        recovery: &Sequencer,
        message: Message,
        deadline: tokio::time::Instant,
        slow_on_timeout: bool,
    ) -> Result<(), String> {
        let Message::Text(text) = message else {
            return Err("with RECOVERY=true only JSON envelopes are written".to_string());
        };
        // A frame the socket cannot write would be missing from every resume's replay too.
        if text.len().saturating_add(32) > self.max_frame_bytes {
            return Err(format!(
                "a message of {} bytes does not fit the socket's write buffer of {} bytes (the larger of 4 x MAX_MESSAGE_BYTES and 1 MiB); not sent",
                text.len(),
                self.max_frame_bytes
            ));
        }
        let busy = || {
            format!(
                "session {}: the message was not sent within its deadline (a resume of the session holds its numbering, or JetStream is slow)",
                self.id
            )
        };
        let (written, stored, storing) = {
            let mut last = recovery.hold_until(deadline).await.ok_or_else(busy)?;
            let seq = *last + 1;
            let frame = with_seq(text.as_str(), seq);
            let appended = tokio::time::timeout_at(
                deadline,
                recovery.history.append(self.id, seq, frame.clone().into()),
            )
            .await
            .map_err(|_| busy())?;
            let stored =
                appended.map_err(|e| format!("session {}: message not sent: {e}", self.id))?;
            *last = seq;
            let storing = recovery.begin();
            let (ack, done) = oneshot::channel();
            let queued = self.sender().try_send(Box::new(Outbound {
                message: Message::text(frame),
                ack: Some(ack),
            }));
            let written = match queued {
                Ok(()) => Some(done),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The peer does not keep up. No later message may reach this socket past
                    // this one: from here they are only kept, the socket is closed, and the
                    // client resumes and reads them from the history.
                    self.detach();
                    self.kick.notify_waiters();
                    None
                }
                // No socket now: kept for the client's resume.
                Err(mpsc::error::TrySendError::Closed(_)) => None,
            };
            (written, stored, storing)
        };
        // The write and the storing run side by side: the call takes the longer of the two.
        let write = async {
            match written {
                Some(done) => match tokio::time::timeout_at(deadline, done).await {
                    Ok(Ok(Ok(()))) => true,
                    Ok(_) => {
                        // The socket failed: its client resumes (and sees a gap if a later
                        // message was written before it went).
                        self.kick.notify_waiters();
                        false
                    }
                    Err(_) => {
                        if slow_on_timeout {
                            self.kick.notify_waiters();
                        }
                        false
                    }
                },
                None => false,
            }
        };
        let store = async move {
            let stored = tokio::time::timeout_at(deadline, stored)
                .await
                .unwrap_or_else(|_| Err("history: not confirmed in time".to_string()));
            drop(storing);
            stored
        };
        let (stored, written) = tokio::join!(store, write);
        match stored {
            Ok(()) => Ok(()),
            Err(e) if written => {
                tracing::warn!(session = %self.id, error = %e,
                    "message written but not kept: a resume across it reports recovered: false");
                Ok(())
            }
            Err(e) => Err(format!(
                "session {}: the message was neither written nor kept: {e}",
                self.id
            )),
        }
    }

    /// Writes one frame and waits until it was flushed to the socket.
    /// Every failure is returned as a message for the caller; nothing is dropped silently.
    pub async fn send(&self, message: Message) -> Result<(), String> {
        if !self.is_connected() {
            self.wait_connected().await?;
        }
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        self.send_until(message, deadline, true).await
    }

    /// One frame of a fan-out: queued at once (a disconnected session fails at once), and
    /// waited for until the fan-out's one `deadline`. A session that has not written it by
    /// then counts as not reached (the frame may still be written); only a full queue counts
    /// as a slow consumer.
    pub async fn send_fanout(
        &self,
        message: Message,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        if let Some(recovery) = &self.recovery {
            // A write not done by the fan-out's deadline is no slow consumer: it is kept.
            return self.publish_kept(recovery, message, deadline, false).await;
        }
        if let Some(keeper) = &self.keeper {
            return self.publish_or_keep(keeper, message, deadline).await;
        }
        if !self.is_connected() {
            return Err(format!("session {} is not connected", self.id));
        }
        self.send_until(message, deadline, false).await
    }

    async fn send_until(
        &self,
        message: Message,
        deadline: tokio::time::Instant,
        slow_on_timeout: bool,
    ) -> Result<(), String> {
        let done = self.queue(message)?;
        self.written(done, deadline, slow_on_timeout).await
    }

    /// Queues one frame; the receiver says how its write ended.
    fn queue(&self, message: Message) -> Result<oneshot::Receiver<Result<(), String>>, String> {
        let (ack, done) = oneshot::channel();
        self.sender()
            .try_send(Box::new(Outbound {
                message,
                ack: Some(ack),
            }))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.slow_consumer(format!("send queue of session {} is full", self.id))
                }
                mpsc::error::TrySendError::Closed(_) => format!("session {} is closed", self.id),
            })?;
        Ok(done)
    }

    /// Waits until `deadline` for the write of a queued frame.
    async fn written(
        &self,
        done: oneshot::Receiver<Result<(), String>>,
        deadline: tokio::time::Instant,
        slow_on_timeout: bool,
    ) -> Result<(), String> {
        match tokio::time::timeout_at(deadline, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(format!("session {} closed before the write", self.id)),
            Err(_) if slow_on_timeout => Err(self.slow_consumer(format!(
                "session {} did not take the frame within {} ms: the peer is not reading (the frame may still be written)",
                self.id,
                self.write_timeout.as_millis()
            ))),
            Err(_) => Err(format!(
                "session {} did not take the frame before the fan-out's deadline (it may still be written)",
                self.id
            )),
        }
    }

    /// Applies the slow-consumer policy and returns the error for the publisher.
    fn slow_consumer(&self, error: String) -> String {
        if self.close_slow {
            // Only the socket being served now is kicked: no permit is stored for a later one.
            self.kick.notify_waiters();
            format!("{error}; the session is being closed (SLOW_CONSUMER=close)")
        } else {
            error
        }
    }

    /// Resolves when the slow-consumer policy wants this session's socket dropped.
    pub async fn kicked(&self) {
        self.kick.notified().await;
    }

    /// Waits (bounded in time and in number of waiters) for a client session to reconnect.
    async fn wait_connected(&self) -> Result<(), String> {
        let not_connected = || format!("session {} is not connected", self.id);
        let wait = self.publish_wait.ok_or_else(not_connected)?;
        let _permit = self.waiting.try_acquire().map_err(|_| {
            format!(
                "session {} is not connected and too many publishes are already waiting",
                self.id
            )
        })?;
        let mut state = self.state.clone();
        let waited = tokio::time::timeout(wait, async {
            state
                .wait_for(|s| matches!(s, ConnState::Connected { .. }))
                .await
                .is_ok()
        })
        .await;
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("session {} is closed", self.id)),
            Err(_) => Err(format!(
                "session {} is not connected (waited {} ms for a reconnect)",
                self.id,
                wait.as_millis()
            )),
        }
    }

    /// Queues one frame without waiting for the write (error frames); fails when the queue is full.
    pub fn send_nowait(&self, message: Message) -> Result<(), String> {
        self.sender()
            .try_send(Box::new(Outbound { message, ack: None }))
            .map_err(|_| format!("send queue of session {} is full or closed", self.id))
    }

    /// Closes the socket with `code` and `reason`, waiting until the close frame was written.
    pub async fn close(&self, code: u16, reason: &str) -> Result<(), String> {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        if !(code == 1000 || (3000..=4999).contains(&code)) {
            return Err(format!(
                "close code {code} is not allowed: use 1000 or 3000-4999"
            ));
        }
        if reason.len() > 123 {
            return Err("close reason must be at most 123 bytes".to_string());
        }
        if self.recovery.is_some() {
            if !self.is_connected() {
                return Err(format!(
                    "session {} is waiting for its client to resume it: it ends by itself after HISTORY_TTL_SEC",
                    self.id
                ));
            }
            // Its end is the session's end, whatever code the peer answers with.
            self.closing
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        })))
        .await
    }
}
