//! Test component: answers every inbound WebSocket message through the provider.
//!
//! - `!plain <text>`: publishes `<text>` to the plain subject `out` (link-level publish);
//! - `!whoami`: publishes its own `reply_to` (the session subject) back to the session;
//! - `!to <subject> <text>`: publishes `<text>` to `<subject>`; on error it publishes
//!   `ERR <error>` back to its own session;
//! - anything else: publishes the body unchanged to `reply_to` (an echo).

wit_bindgen::generate!({
    inline: "
        package test:echo;
        world echo {
            import wasmcloud:messaging/consumer@0.2.0;
            export wasmcloud:messaging/handler@0.2.0;
        }
    ",
    path: "../../../wit/deps/messaging",
    generate_all,
});

use exports::wasmcloud::messaging::handler::Guest;
use wasmcloud::messaging::consumer;
use wasmcloud::messaging::types::BrokerMessage;

struct Echo;

fn publish(subject: &str, body: Vec<u8>) -> Result<(), String> {
    consumer::publish(&BrokerMessage {
        subject: subject.to_string(),
        body,
        reply_to: None,
    })
}

impl Guest for Echo {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        let reply_to = msg.reply_to.clone();
        let reply = |body: Vec<u8>| match &reply_to {
            Some(to) => publish(to, body),
            None => publish("out", body),
        };
        if let Some(rest) = msg.body.strip_prefix(b"!plain ") {
            return publish("out", rest.to_vec());
        }
        if msg.body == b"!whoami" {
            return reply(reply_to.clone().unwrap_or_default().into_bytes());
        }
        if let Some(rest) = msg.body.strip_prefix(b"!to ") {
            let rest = String::from_utf8_lossy(rest).to_string();
            let (subject, text) = rest.split_once(' ').unwrap_or((rest.as_str(), ""));
            return match publish(subject, text.as_bytes().to_vec()) {
                Ok(()) => Ok(()),
                Err(e) => reply(format!("ERR {e}").into_bytes()),
            };
        }
        reply(msg.body)
    }
}

export!(Echo);
