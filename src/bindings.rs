//! Generated wRPC bindings of the provider's world (`wit/provider.wit`) and the provider's name:
//! a leaf that every layer may use and that uses nothing of the crate.

wit_bindgen_wrpc::generate!({
    world: "provider",
    with: {
        "wasmcloud:messaging/consumer@0.2.0": generate,
        "wasmcloud:messaging/handler@0.2.0": generate,
        "wasmcloud:messaging/types@0.2.0": generate,
        "wasmcloud-websocket:provider/sessions@0.1.0": generate,
    }
});

/// The name the provider reports to the host, in logs and as its metrics' meter.
pub const PROVIDER_NAME: &str = "messaging-websocket-provider";
