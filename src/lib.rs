//! wasmCloud capability provider for `wasmcloud:messaging@0.2.0` over WebSocket.
//!
//! The module list below is the map; `ARCHITECTURE.md` has the layers, the path of an inbound
//! frame and of a publish file by file, and where state lives. Dependencies point down only:
//!
//! - [`app`]: the process: config read before the runtime, observability, the SDK loop, the
//!   export server;
//! - [`provider`] and [`exports`]: the wasmCloud glue (links, health, shutdown, wRPC exports);
//! - [`link`]: opening a link's sessions, once for both modes: client sockets, server
//!   listeners;
//! - [`cluster`]: several replicas as one provider: forwarding to the replica holding a
//!   session, lattice-wide fan-out, client connection leases (NATS, JetStream);
//! - [`routing`]: where a publish goes, a pure function of the caller's links;
//! - [`delivery`]: inbound frames to a component's `handle-message`;
//! - [`recovery`]: sequence numbers, history (JetStream) and resume tokens of `RECOVERY=true`;
//! - [`session`]: a session, its outbox and replies, and the registry (the only shared
//!   state);
//! - [`codec`]: frames <-> messages (raw or JSON envelope), decided once per session;
//! - [`envelope`]: the JSON envelope, pure;
//! - [`metrics`]: the OpenTelemetry instruments;
//! - [`config`]: typed, case-insensitive link configuration;
//! - [`ws`]: WebSocket transport (connect, reconnect, read, write); no wasmCloud types;
//! - [`wrpc`]: wRPC over NATS both ways: calls into components (`handle-message`) and the
//!   server for the provider's own exports;
//! - [`bindings`]: the generated wRPC bindings and the provider's name (a leaf).

pub mod app;
pub mod bindings;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod exports;
pub mod link;
pub mod metrics;
pub mod provider;
pub mod recovery;
pub mod routing;
pub mod session;
pub mod task;
pub mod wrpc;
pub mod ws;

pub use app::{default_runtime_threads, prepare, run, runtime};
pub use bindings::PROVIDER_NAME;
pub use provider::WsProvider;
