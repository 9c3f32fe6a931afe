//! Test component: answers every inbound WebSocket message through the provider, and drives the
//! session API on command. Answers go to the message's `reply_to` (its session), or to the plain
//! subject `out` when there is none.
//!
//! - `!plain <text>`: publishes `<text>` to the plain subject `out` (link-level publish);
//! - `!whoami`: answers its own `reply_to`; `!subject`: answers the message's subject;
//! - `!to <subject> <text>`: publishes `<text>` to `<subject>`;
//! - `!list`: answers `LIST <n>` and one line `id|link|remote|connected|k=v,...` per session;
//! - `!get <id>`, `!send <id> <text>`, `!send-acked <id> <timeout ms> <text>` (`ACKED <text>`),
//!   `!broadcast <text>`, `!close <id> <code> <reason>`;
//! - `!meta-set <id> <key> <value>`, `!meta-get <id> <key>`, `!meta-del <id> <key>`;
//! - `!request <subject> <timeout-ms> <text>`: answers `REPLY <subject> <body>`;
//! - `!join <id> <group>`, `!leave <id> <group>`, `!members <group>`, `!group-send <group> <text>`,
//!   `!send-many <id,id,...> <text>`, `!request-info <id>`;
//! - `!flood-all <subject> <count> <size>`: the same, going on past failures, answering
//!   `FLOODALL <ok> OK <failed> ERR <first error>`;
//! - `!fail`: returns an error from `handle-message` (nothing is answered); `!trap`: traps;
//! - `!sleep <ms>[ <anything>]`: sleeps, then answers `SLEPT <ms>` (a slow handler; the rest of
//!   the body, e.g. padding, is ignored; a body that is not UTF-8 after the number is fine too);
//! - `!flood <subject> <count> <size>`: publishes `count` bodies of `size` bytes, answering
//!   `FLOOD <count> OK` or `FLOOD <sent> ERR <error>` at the first failure;
//! - a lifecycle message (`ws.lifecycle.*`) is forwarded as `<subject> <body>` to `out`;
//! - anything else: answers the body unchanged (an echo).
//!
//! A failing call answers `ERR <error>`.

wit_bindgen::generate!({
    inline: "
        package test:echo;
        world echo {
            import wasmcloud:messaging/consumer@0.2.0;
            import wasmcloud-websocket:provider/sessions@0.1.0;
            export wasmcloud:messaging/handler@0.2.0;
        }
    ",
    path: "../../../wit",
    world: "test:echo/echo",
    generate_all,
});

use exports::wasmcloud::messaging::handler::Guest;
use wasmcloud::messaging::consumer;
use wasmcloud::messaging::types::BrokerMessage;
use wasmcloud_websocket::provider::sessions::{self, SessionInfo};

struct Echo;

fn message(subject: &str, body: impl Into<Vec<u8>>) -> BrokerMessage {
    BrokerMessage {
        subject: subject.to_string(),
        body: body.into(),
        reply_to: None,
    }
}

fn describe(s: &SessionInfo) -> String {
    let meta: Vec<String> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}|{}|{}|{}|{}",
        s.id,
        s.link_name,
        s.remote,
        s.connected,
        meta.join(",")
    )
}

/// Runs one command; `Ok(Some(text))` is answered, `Err(e)` is answered as `ERR e`.
fn command(msg: &BrokerMessage, text: &str) -> Result<Option<String>, String> {
    let mut words = text.splitn(2, ' ');
    let verb = words.next().unwrap_or_default();
    let rest = words.next().unwrap_or_default();
    let mut args = rest.splitn(3, ' ');
    let mut arg = || args.next().unwrap_or_default().to_string();
    Ok(match verb {
        "!plain" => {
            consumer::publish(&message("out", rest))?;
            None
        }
        "!whoami" => Some(msg.reply_to.clone().unwrap_or_default()),
        "!subject" => Some(msg.subject.clone()),
        "!to" => {
            let (subject, body) = rest.split_once(' ').unwrap_or((rest, ""));
            consumer::publish(&message(subject, body))?;
            None
        }
        "!list" => {
            let list = sessions::list_sessions()?;
            let mut out = format!("LIST {}", list.len());
            for s in &list {
                out.push('\n');
                out.push_str(&describe(s));
            }
            Some(out)
        }
        "!get" => Some(format!("INFO {}", describe(&sessions::get_session(&arg())?))),
        "!send" => {
            let (id, body) = rest.split_once(' ').unwrap_or((rest, ""));
            sessions::send(id, &message("direct", body))?;
            Some("SENT".to_string())
        }
        "!send-acked" => {
            let (id, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (timeout, body) = rest.split_once(' ').unwrap_or((rest, ""));
            let timeout = timeout.parse().map_err(|_| "timeout must be a number".to_string())?;
            sessions::send_acked(id, &message("direct", body), timeout)?;
            Some(format!("ACKED {body}"))
        }
        "!broadcast" => Some(format!(
            "BROADCAST {}",
            sessions::broadcast(&message("all", rest))?
        )),
        "!meta-set" => {
            let (id, key, value) = (arg(), arg(), arg());
            sessions::set_metadata(&id, &key, &value)?;
            Some("OK".to_string())
        }
        "!meta-get" => {
            let (id, key) = (arg(), arg());
            Some(match sessions::get_metadata(&id, &key)? {
                Some(v) => format!("META {v}"),
                None => "META none".to_string(),
            })
        }
        "!meta-del" => {
            let (id, key) = (arg(), arg());
            sessions::remove_metadata(&id, &key)?;
            Some("OK".to_string())
        }
        "!close" => {
            let (id, code, reason) = (arg(), arg(), arg());
            let code = code.parse::<u16>().map_err(|e| e.to_string())?;
            sessions::close(&id, code, &reason)?;
            Some("CLOSED".to_string())
        }
        "!request" => {
            let (subject, timeout, body) = (arg(), arg(), arg());
            let timeout = timeout.parse::<u32>().map_err(|e| e.to_string())?;
            let reply = consumer::request(&subject, &body.into_bytes(), timeout)?;
            Some(format!(
                "REPLY {} {}",
                reply.subject,
                String::from_utf8_lossy(&reply.body)
            ))
        }
        "!flood" => {
            let (subject, count, size) = (arg(), arg(), arg());
            let count = count.parse::<usize>().map_err(|e| e.to_string())?;
            let size = size.parse::<usize>().map_err(|e| e.to_string())?;
            for sent in 0..count {
                if let Err(e) = consumer::publish(&message(&subject, vec![b'f'; size])) {
                    return Ok(Some(format!("FLOOD {sent} ERR {e}")));
                }
            }
            Some(format!("FLOOD {count} OK"))
        }
        "!trap" => panic!("asked to trap"),
        "!flood-all" => {
            let (subject, count, size) = (arg(), arg(), arg());
            let count = count.parse::<usize>().map_err(|e| e.to_string())?;
            let size = size.parse::<usize>().map_err(|e| e.to_string())?;
            let (mut ok, mut first_error) = (0, None);
            for _ in 0..count {
                match consumer::publish(&message(&subject, vec![b'f'; size])) {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Some(format!("FLOODALL {ok} OK {} ERR {}", count - ok, first_error.unwrap_or_default()))
        }
        "!join" => {
            let (id, group) = (arg(), arg());
            sessions::join_group(&id, &group)?;
            Some("JOINED".to_string())
        }
        "!leave" => {
            let (id, group) = (arg(), arg());
            sessions::leave_group(&id, &group)?;
            Some("LEFT".to_string())
        }
        "!members" => Some(format!("MEMBERS {}", sessions::group_members(&arg())?.join(","))),
        "!group-send" => {
            let (group, body) = rest.split_once(' ').unwrap_or((rest, ""));
            Some(format!("GROUP {}", sessions::send_group(group, &message("group", body))?))
        }
        "!send-many" => {
            let (ids, body) = rest.split_once(' ').unwrap_or((rest, ""));
            let ids: Vec<String> = ids.split(',').map(str::to_string).collect();
            Some(format!("MANY {}", sessions::send_many(&ids, &message("many", body))?))
        }
        "!request-info" => {
            let info = sessions::get_session(&arg())?;
            let r = info.request.ok_or("no request info")?;
            let headers: Vec<String> = r.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
            Some(format!(
                "REQ {}|{}|{}|{}",
                r.path,
                r.query.unwrap_or_default(),
                headers.join(","),
                r.subprotocol.unwrap_or_default()
            ))
        }
        _ => return Err("not a command".to_string()),
    })
}

impl Guest for Echo {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        if msg.subject.starts_with("ws.lifecycle.") {
            let mut body = format!("{} ", msg.subject).into_bytes();
            body.extend_from_slice(&msg.body);
            return consumer::publish(&message("out", body));
        }
        let answer_to = msg.reply_to.clone().unwrap_or_else(|| "out".to_string());
        let answer = |body: Vec<u8>| consumer::publish(&message(&answer_to, body));
        // `!announce-sleep <ms>`: says "SLEEPING <ms>" at once, then sleeps like `!sleep`, so a
        // test knows the call is running before it changes anything.
        let (announce, sleep) = match msg.body.strip_prefix(b"!announce-sleep ") {
            Some(rest) => (true, Some(rest)),
            None => (false, msg.body.strip_prefix(b"!sleep ")),
        };
        if let Some(rest) = sleep {
            let digits: Vec<u8> = rest.iter().copied().take_while(u8::is_ascii_digit).collect();
            let ms: u64 = std::str::from_utf8(&digits).ok().and_then(|d| d.parse().ok()).unwrap_or(0);
            if announce {
                answer(format!("SLEEPING {ms}").into_bytes())?;
            }
            std::thread::sleep(std::time::Duration::from_millis(ms));
            return answer(format!("SLEPT {ms}").into_bytes());
        }
        match std::str::from_utf8(&msg.body) {
            Ok("!fail") => Err("asked to fail".to_string()),
            Ok(text) if text.starts_with('!') => match command(&msg, text) {
                Ok(Some(reply)) => answer(reply.into_bytes()),
                Ok(None) => Ok(()),
                // The session may be gone (e.g. closed by the command itself): ignore that error.
                Err(e) => answer(format!("ERR {e}").into_bytes()).or(Ok(())),
            },
            _ => answer(msg.body.clone()),
        }
    }
}

export!(Echo);
