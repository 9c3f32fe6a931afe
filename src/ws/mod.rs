//! WebSocket transport: sockets, frames and reconnects. Nothing here knows about wasmCloud.

pub mod client;
