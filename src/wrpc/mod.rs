//! wRPC 0.0.1 over NATS, both ways, without wrpc-transport-nats 0.29's lost replies.
//!
//! The SDK's transport (`wrpc-transport-nats` 0.29) routes every reply through one demux task
//! that learns about each new call through a channel; its unbiased `select!` can take a reply
//! off the wire before the call's registration and drop it, and the call then hangs (fixed
//! upstream only in 0.31, which the SDK cannot use). Here each call is registered in a shared
//! map *before* anything that could be answered is published, so every reply finds its call:
//! - [`client`]: calls from the provider into components (`handle-message`);
//! - [`server`]: the provider's own exports (`consumer`, the session API), served in place of
//!   the SDK's `serve_provider_exports`, on the SDK's lattice connection.
//!
//! The same race sits on the *host's* side, which we cannot change: its 0.29 client asks its
//! demux task to subscribe to a call's accept and results and then publishes the call, and its
//! 0.29 server asks it to subscribe to a call's parameters and then publishes the accept; the
//! demux may route what arrives before it applies the request, and drop it. So our server sends
//! its accept again until the caller's parameters arrive, and ends its results only after the
//! caller's parameters have ended (sending again what the caller may have missed); our client
//! gives a host a head start before sending parameters that did not fit in the call's first
//! message (see the modules).
//!
//! Only what these interfaces need is spoken: parameters and results without nested async
//! streams (a function with one is refused when it is served or called).
//!
//! The protocol, for a call of `<instance>.<function>` on `<lattice>.<id>`:
//! 1. the caller publishes the parameters to `<lattice>.<id>.wrpc.0.0.1.<instance>.<function>`
//!    with reply subject `R` (what does not fit in one NATS message waits for step 3);
//! 2. the callee accepts by publishing an empty message to `R` with its own reply subject `S`;
//! 3. the caller sends the rest of the parameters, then an empty end-of-stream message, to
//!    `S.params`;
//! 4. the callee sends the results to `R.results`, then an empty end-of-stream message.
//!
//! The module map:
//! - [`mux`]: the reply inbox of a connection, its open calls and the demux task;
//! - [`incoming`] and [`writer`]: a call's incoming and outgoing byte streams;
//! - [`deadline`]: the point in time a served call's streams wait against;
//! - [`client`] and [`server`]: the two sides, built on these; the server's accept re-sending
//!   is [`resend`], its gathering of parameters that follow the accept (and their limits)
//!   [`gather`].

mod client;
mod deadline;
mod gather;
mod incoming;
mod mux;
mod resend;
mod server;
mod writer;

pub use client::{ComponentClient, Invoker, Outgoing};
pub(crate) use deadline::Deadline;
pub use incoming::Incoming;
pub use server::{serve_exports, ExportServer, Invocations};
/// The invocation context the server hands to export handlers (the SDK's).
pub use wasmcloud_provider_sdk::Context as InvocationContext;
pub use writer::Writer;
