//! Example component for the WebSocket messaging provider (server mode): a chat room.
//!
//! Browsers connect to the provider's listener; with `LIFECYCLE_EVENTS=true` the component hears
//! of every arrival and departure. Each session joins the group `lobby` when it connects, and
//! every line a session sends goes to the whole group (one `send-group` call, however many are
//! in the room). `/nick <name>` sets a display name, kept in the session's metadata.
//!
//! What a member sees: `welcome, <name>` on arrival; `* <name> joined` / `* <name> left`;
//! `<name>: <text>` for every line; `* <old> is now <new>` after a rename.

wit_bindgen::generate!({
    inline: "
        package example:chat;
        world chat {
            import wasmcloud:messaging/consumer@0.2.0;
            import wasmcloud-websocket:provider/sessions@0.1.0;
            export wasmcloud:messaging/handler@0.2.0;
        }
    ",
    path: "../../wit",
    world: "example:chat/chat",
    generate_all,
});

use exports::wasmcloud::messaging::handler::Guest;
use wasmcloud::messaging::types::BrokerMessage;
use wasmcloud_websocket::provider::sessions;

const ROOM: &str = "lobby";
const NICK: &str = "nick";

struct Chat;

/// The session ID named by a lifecycle message's JSON body (`{"session":"<id>",...}`).
fn lifecycle_session(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("\"session\":\"")? + "\"session\":\"".len();
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_string())
}

/// A session's display name: its nick, or the first 8 characters of its ID.
fn name_of(id: &str) -> String {
    match sessions::get_metadata(id, NICK) {
        Ok(Some(nick)) => nick,
        _ => id.chars().take(8).collect(),
    }
}

fn line(text: String) -> BrokerMessage {
    BrokerMessage {
        subject: "chat".to_string(),
        body: text.into_bytes(),
        reply_to: None,
    }
}

fn to_room(text: String) -> Result<(), String> {
    sessions::send_group(ROOM, &line(text)).map(|_| ())
}

impl Guest for Chat {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        match msg.subject.as_str() {
            "ws.lifecycle.connected" => {
                let id = lifecycle_session(&msg.body).ok_or("lifecycle message without session")?;
                sessions::join_group(&id, ROOM)?;
                let name = name_of(&id);
                sessions::send(&id, &line(format!("welcome, {name}")))?;
                to_room(format!("* {name} joined"))
            }
            "ws.lifecycle.disconnected" => {
                let id = lifecycle_session(&msg.body).ok_or("lifecycle message without session")?;
                // The session is gone (and out of the group); its metadata went with it.
                to_room(format!("* {} left", id.chars().take(8).collect::<String>()))
            }
            _ => {
                let id = msg
                    .reply_to
                    .as_deref()
                    .and_then(|r| r.strip_prefix("ws.session."))
                    .ok_or("message without a session: enable session tracking")?
                    .to_string();
                let text = String::from_utf8_lossy(&msg.body).trim().to_string();
                if let Some(nick) = text.strip_prefix("/nick ") {
                    let nick = nick.trim();
                    if nick.is_empty() || nick.len() > 32 {
                        return sessions::send(&id, &line("* a nick is 1 to 32 characters".into()));
                    }
                    let old = name_of(&id);
                    sessions::set_metadata(&id, NICK, nick)?;
                    return to_room(format!("* {old} is now {nick}"));
                }
                to_room(format!("{}: {text}", name_of(&id)))
            }
        }
    }
}

export!(Chat);
