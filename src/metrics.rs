//! The provider's OpenTelemetry metrics, and nothing else: no counters of its own.
//!
//! The metrics go to the meter provider the SDK installs when the host enables OpenTelemetry
//! metrics (`initialize_observability!`); without one they are no-ops. Instruments (all under
//! `websocket.`):
//!
//! | name | kind | attributes |
//! | --- | --- | --- |
//! | `websocket.sessions.open` | up-down counter | `mode` (client, server) |
//! | `websocket.messages.in` / `websocket.bytes.in` | counter | `mode` |
//! | `websocket.messages.out` / `websocket.bytes.out` | counter | `mode` |
//! | `websocket.handle_message.duration` | histogram, seconds | `outcome` (ok, error, timeout) |
//! | `websocket.reconnects` | counter | |
//! | `websocket.connections.rejected` | counter | `status` (the HTTP status of the refusal) |
//! | `websocket.publishes.refused` | counter | |
//! | `websocket.frames.undeliverable` | counter | `reason` (invalid_envelope, no_handler, budget, link_deleted) |
//! | `websocket.replicas.events` | counter | `event` (forwarded: a call sent to another replica; served: one served for another; takeover: a client connection taken from a replica that stopped renewing it; lease_lost: one this replica had to let go) |
//! | `websocket.tasks` | gauge | (tasks alive in the provider's runtime; back to its level before a link once the link is deleted) |

use std::time::Duration;

use wasmcloud_provider_sdk::wasmcloud_tracing::{
    global, Counter, Histogram, KeyValue, Meter, ObservableGauge, UpDownCounter,
};

/// Whether a session's socket was opened by the provider (client mode) or accepted by one of
/// its listeners (server mode).
/// (Kept here, a leaf, so that every layer can name it; `session` re-exports it.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Client,
    Server,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Client => "client",
            Mode::Server => "server",
        }
    }
}

/// How a `handle-message` call ended (the `outcome` attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
}

/// Why an inbound frame reached no component (the `reason` attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not a valid JSON envelope (answered with an error frame).
    InvalidEnvelope,
    /// No handler link attached within `HANDLER_WAIT_MS`.
    NoHandler,
    /// The component's share of `MAX_INBOUND_BYTES` was used up (lifecycle messages).
    Budget,
    /// Its handler link was deleted while it waited.
    LinkDeleted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidEnvelope => "invalid_envelope",
            Reason::NoHandler => "no_handler",
            Reason::Budget => "budget",
            Reason::LinkDeleted => "link_deleted",
        }
    }
}

/// The instruments. Cheap to share (`Arc`); every method records at once.
#[derive(Debug)]
pub struct Metrics {
    sessions_open: UpDownCounter<i64>,
    messages_in: Counter<u64>,
    bytes_in: Counter<u64>,
    messages_out: Counter<u64>,
    bytes_out: Counter<u64>,
    handler_duration: Histogram<f64>,
    reconnects: Counter<u64>,
    rejected: Counter<u64>,
    publishes_refused: Counter<u64>,
    undeliverable: Counter<u64>,
    replica_events: Counter<u64>,
    /// Observed at each export: the tasks alive in the provider's runtime.
    _tasks: ObservableGauge<i64>,
}

impl Default for Metrics {
    /// Creates the instruments from the global meter provider: build `Metrics` after
    /// observability is initialized, or its metrics go nowhere.
    fn default() -> Self {
        let meter = global::meter(crate::bindings::PROVIDER_NAME);
        Self {
            sessions_open: meter
                .i64_up_down_counter("websocket.sessions.open")
                .with_description("WebSocket sessions with an open socket")
                .build(),
            messages_in: meter
                .u64_counter("websocket.messages.in")
                .with_description("Data frames read from sockets")
                .build(),
            bytes_in: meter
                .u64_counter("websocket.bytes.in")
                .with_unit("By")
                .with_description("Payload bytes of data frames read from sockets")
                .build(),
            messages_out: meter
                .u64_counter("websocket.messages.out")
                .with_description("Data frames written to sockets")
                .build(),
            bytes_out: meter
                .u64_counter("websocket.bytes.out")
                .with_unit("By")
                .with_description("Payload bytes of data frames written to sockets")
                .build(),
            handler_duration: meter
                .f64_histogram("websocket.handle_message.duration")
                .with_unit("s")
                .with_description("Duration of handle-message calls into components")
                .build(),
            reconnects: meter
                .u64_counter("websocket.reconnects")
                .with_description("Client connections re-established after a drop")
                .build(),
            rejected: meter
                .u64_counter("websocket.connections.rejected")
                .with_description("Upgrade requests refused by server-mode admission")
                .build(),
            publishes_refused: meter
                .u64_counter("websocket.publishes.refused")
                .with_description("Publishes and sends refused with an error to the component")
                .build(),
            undeliverable: meter
                .u64_counter("websocket.frames.undeliverable")
                .with_description("Inbound frames not delivered to a component")
                .build(),
            replica_events: meter
                .u64_counter("websocket.replicas.events")
                .with_description(
                    "Calls forwarded between provider replicas, takeovers and lost leases",
                )
                .build(),
            _tasks: tasks_gauge(&meter),
        }
    }
}

/// The gauge of tasks alive in the runtime the metrics are built in (the provider's, in
/// `app::run`).
fn tasks_gauge(meter: &Meter) -> ObservableGauge<i64> {
    let runtime = tokio::runtime::Handle::try_current().ok();
    meter
        .i64_observable_gauge("websocket.tasks")
        .with_description(
            "Tasks alive in the provider's runtime (all of them: the SDK's, NATS's and the provider's)",
        )
        .with_callback(move |observer| {
            if let Some(runtime) = &runtime {
                let alive = runtime.metrics().num_alive_tasks();
                observer.observe(i64::try_from(alive).unwrap_or(i64::MAX), &[]);
            }
        })
        .build()
}

fn mode(mode: Mode) -> [KeyValue; 1] {
    [KeyValue::new("mode", mode.as_str())]
}

impl Metrics {
    pub fn session_opened(&self, m: Mode) {
        self.sessions_open.add(1, &mode(m));
    }

    pub fn session_closed(&self, m: Mode) {
        self.sessions_open.add(-1, &mode(m));
    }

    pub fn frame_in(&self, m: Mode, bytes: usize) {
        self.messages_in.add(1, &mode(m));
        self.bytes_in.add(bytes as u64, &mode(m));
    }

    pub fn frames_out(&self, m: Mode, frames: u64, bytes: u64) {
        self.messages_out.add(frames, &mode(m));
        self.bytes_out.add(bytes, &mode(m));
    }

    /// One finished (or abandoned) `handle-message` call.
    pub fn handled(&self, took: Duration, outcome: Outcome) {
        self.handler_duration.record(
            took.as_secs_f64(),
            &[KeyValue::new("outcome", outcome.as_str())],
        );
    }

    pub fn reconnected(&self) {
        self.reconnects.add(1, &[]);
    }

    pub fn rejected(&self, status: u16) {
        self.rejected
            .add(1, &[KeyValue::new("status", i64::from(status))]);
    }

    /// A publish or send refused with an error returned to the component.
    pub fn publish_refused(&self) {
        self.publishes_refused.add(1, &[]);
    }

    /// Something between replicas: `forwarded`, `served`, `takeover` or `lease_lost`.
    pub fn replica_event(&self, event: &'static str) {
        self.replica_events.add(1, &[KeyValue::new("event", event)]);
    }

    /// An inbound frame that no component got.
    pub fn undelivered(&self, reason: Reason) {
        self.undeliverable
            .add(1, &[KeyValue::new("reason", reason.as_str())]);
    }
}
