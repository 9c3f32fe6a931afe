//! Example component for the WebSocket messaging provider (client mode).
//!
//! Every message that arrives from a WebSocket server is answered on the same socket: the
//! provider sets `reply_to` to the session's subject, and publishing there writes one frame back
//! to that session. Text is answered as `echo: <text>`; binary data is sent back unchanged.

wit_bindgen::generate!({
    inline: "
        package example:echo;
        world echo {
            import wasmcloud:messaging/consumer@0.2.0;
            export wasmcloud:messaging/handler@0.2.0;
        }
    ",
    path: "../../wit/deps/messaging",
    generate_all,
});

use exports::wasmcloud::messaging::handler::Guest;
use wasmcloud::messaging::consumer;
use wasmcloud::messaging::types::BrokerMessage;

struct Echo;

impl Guest for Echo {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        let Some(reply_to) = msg.reply_to else {
            return Err("message has no reply_to: enable session tracking".to_string());
        };
        let body = match String::from_utf8(msg.body) {
            Ok(text) => format!("echo: {text}").into_bytes(),
            Err(binary) => binary.into_bytes(),
        };
        consumer::publish(&BrokerMessage {
            subject: reply_to,
            body,
            reply_to: None,
        })
    }
}

export!(Echo);
