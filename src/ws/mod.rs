//! WebSocket transport: sockets, frames, reconnects and listeners. Nothing here knows about
//! wasmCloud.

pub mod client;
pub mod server;
pub mod socket;
