//! Process-wide counters, read by health reports and logs, and the provider's OpenTelemetry
//! metrics.
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
//! | `websocket.frames.undeliverable` | counter | `reason` (invalid_envelope, no_handler) |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use wasmcloud_provider_sdk::wasmcloud_tracing::{
    global, Counter, Histogram, KeyValue, UpDownCounter,
};

/// `mode` attribute values.
pub const CLIENT: &str = "client";
pub const SERVER: &str = "server";

#[derive(Debug)]
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
    otel: Instruments,
}

#[derive(Debug)]
struct Instruments {
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
}

impl Default for Stats {
    /// Creates the instruments from the global meter provider: build `Stats` after
    /// observability is initialized, or its metrics go nowhere.
    fn default() -> Self {
        let meter = global::meter(crate::PROVIDER_NAME);
        let otel = Instruments {
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
        };
        Self {
            delivered: AtomicU64::default(),
            undeliverable: AtomicU64::default(),
            handler_errors: AtomicU64::default(),
            handler_timeouts: AtomicU64::default(),
            invalid_envelopes: AtomicU64::default(),
            published: AtomicU64::default(),
            publish_errors: AtomicU64::default(),
            otel,
        }
    }
}

fn mode(mode: &'static str) -> [KeyValue; 1] {
    [KeyValue::new("mode", mode)]
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_opened(&self, m: &'static str) {
        self.otel.sessions_open.add(1, &mode(m));
    }

    pub fn session_closed(&self, m: &'static str) {
        self.otel.sessions_open.add(-1, &mode(m));
    }

    pub fn frame_in(&self, m: &'static str, bytes: usize) {
        self.otel.messages_in.add(1, &mode(m));
        self.otel.bytes_in.add(bytes as u64, &mode(m));
    }

    pub fn frames_out(&self, m: &'static str, frames: u64, bytes: u64) {
        self.otel.messages_out.add(frames, &mode(m));
        self.otel.bytes_out.add(bytes, &mode(m));
    }

    /// One finished (or abandoned) `handle-message` call: `outcome` is ok, error or timeout.
    pub fn handled(&self, took: Duration, outcome: &'static str) {
        let counter = match outcome {
            "ok" => &self.delivered,
            "timeout" => &self.handler_timeouts,
            _ => &self.handler_errors,
        };
        Self::bump(counter);
        self.otel
            .handler_duration
            .record(took.as_secs_f64(), &[KeyValue::new("outcome", outcome)]);
    }

    pub fn reconnected(&self) {
        self.otel.reconnects.add(1, &[]);
    }

    pub fn rejected(&self, status: u16) {
        self.otel
            .rejected
            .add(1, &[KeyValue::new("status", i64::from(status))]);
    }

    pub fn publish(&self, ok: bool) {
        if ok {
            Self::bump(&self.published);
        } else {
            Self::bump(&self.publish_errors);
            self.otel.publishes_refused.add(1, &[]);
        }
    }

    /// An inbound frame that no component got: `invalid_envelope` or `no_handler`.
    pub fn undelivered(&self, reason: &'static str) {
        Self::bump(if reason == "invalid_envelope" {
            &self.invalid_envelopes
        } else {
            &self.undeliverable
        });
        self.otel
            .undeliverable
            .add(1, &[KeyValue::new("reason", reason)]);
    }
}
