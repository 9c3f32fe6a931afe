//! The JSON envelope used when a link sets `FORMAT=json`. Pure functions, no I/O.
//!
//! Every frame is one JSON object:
//!
//! ```json
//! {"subject": "chat.room1", "body": "hello", "reply_to": "inbox.42"}
//! {"subject": "sensor.raw", "body_base64": "AAEC/w=="}
//! ```
//!
//! `subject` is a non-empty string; the body is either `body` (a UTF-8 string) or `body_base64`
//! (standard base64), never both, and may be absent (empty body); `reply_to` is optional (a
//! string or null). An envelope may carry an `id` (a string of 1 to [`MAX_ID_BYTES`] bytes) and
//! `"ack": true`: the provider then answers it with one ack frame ([`ack_frame`]). Other fields
//! are ignored. A frame that breaks these rules is answered with an error frame:
//! `{"error": {"code": "invalid_envelope", "message": "..."}}`.

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A decoded envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub subject: String,
    pub body: Bytes,
    pub reply_to: Option<String>,
    /// The peer's ID of this message, when it wants it acknowledged (`"ack": true`).
    pub ack_id: Option<String>,
}

/// The longest envelope `id`, in bytes.
pub const MAX_ID_BYTES: usize = 128;

#[derive(Deserialize)]
struct Wire {
    id: Option<serde_json::Value>,
    ack: Option<serde_json::Value>,
    subject: Option<serde_json::Value>,
    body: Option<serde_json::Value>,
    body_base64: Option<serde_json::Value>,
    reply_to: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct WireOut<'a> {
    subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
}

/// A peer's answer to an envelope the provider wrote with an `id` and `"ack": true`
/// (`send-acked`): `{"ack": {"id": ..., "ok": true}}`, or `ok: false` with an optional
/// `error: {"code", "message"}`. A missing `ok` means handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAck {
    pub id: String,
    pub outcome: Result<(), String>,
}

/// What one frame from a peer is: a message, or its answer to an acknowledged send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Envelope),
    Ack(PeerAck),
}

/// Decodes one frame's payload: a message or an ack answer.
pub fn decode_frame(payload: &[u8]) -> Result<Frame, String> {
    let wire = parse(payload)?;
    // An ack answer has no subject and an object under "ack"; everything else is a message.
    if let (None, Some(serde_json::Value::Object(ack))) = (&wire.subject, &wire.ack) {
        return peer_ack(ack).map(Frame::Ack);
    }
    message(wire).map(Frame::Message)
}

fn peer_ack(ack: &serde_json::Map<String, serde_json::Value>) -> Result<PeerAck, String> {
    let id = match ack.get("id") {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => s.clone(),
        _ => {
            return Err(format!(
                "ack.id must be a string of 1 to {MAX_ID_BYTES} bytes"
            ))
        }
    };
    let ok = match ack.get("ok") {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return Err("ack.ok must be true or false".to_string()),
    };
    if ok {
        return Ok(PeerAck {
            id,
            outcome: Ok(()),
        });
    }
    let error = ack.get("error");
    let text = |key: &str| {
        error
            .and_then(|e| e.get(key))
            .and_then(|v| v.as_str())
            .map(|s| s.chars().take(256).collect::<String>())
    };
    let reason = match (text("code"), text("message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(one), None) | (None, Some(one)) => one,
        (None, None) => "no reason given".to_string(),
    };
    Ok(PeerAck {
        id,
        outcome: Err(reason),
    })
}

/// Decodes one frame's payload. The error says what is wrong, never what the payload held.
pub fn decode(payload: &[u8]) -> Result<Envelope, String> {
    message(parse(payload)?)
}

fn parse(payload: &[u8]) -> Result<Wire, String> {
    serde_json::from_slice(payload).map_err(|e| {
        if e.is_data() {
            "envelope must be a JSON object".to_string()
        } else {
            format!("not valid JSON (line {}, column {})", e.line(), e.column())
        }
    })
}

/// The message a parsed frame holds.
fn message(wire: Wire) -> Result<Envelope, String> {
    let subject = match wire.subject {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(serde_json::Value::String(_)) => return Err("subject is empty".to_string()),
        Some(_) => return Err("subject must be a string".to_string()),
        None => return Err("subject is missing".to_string()),
    };
    let body = match (wire.body, wire.body_base64) {
        (Some(_), Some(_)) => return Err("give body or body_base64, not both".to_string()),
        (Some(serde_json::Value::String(s)), None) => Bytes::from(s),
        (Some(serde_json::Value::Null) | None, None) => Bytes::new(),
        (Some(_), None) => return Err("body must be a string".to_string()),
        (None, Some(serde_json::Value::String(s))) => B64
            .decode(s.as_bytes())
            .map(Bytes::from)
            .map_err(|_| "body_base64 is not valid base64".to_string())?,
        (None, Some(_)) => return Err("body_base64 must be a string".to_string()),
    };
    let reply_to = match wire.reply_to {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.is_empty() => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err("reply_to must be a string".to_string()),
    };
    let ack = match wire.ack {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => return Err("ack must be true or false".to_string()),
    };
    let id = match wire.id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Some(s),
        Some(serde_json::Value::String(_)) => {
            return Err(format!("id must be 1 to {MAX_ID_BYTES} bytes"))
        }
        Some(_) => return Err("id must be a string".to_string()),
    };
    if ack && id.is_none() {
        return Err("ack needs an id".to_string());
    }
    Ok(Envelope {
        subject,
        body,
        reply_to,
        ack_id: id.filter(|_| ack),
    })
}

/// Why an acknowledged envelope was not handled (the `code` of a failed ack).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotHandled {
    /// No handler link took the frame in time (`HANDLER_WAIT_MS`).
    NoHandler,
    /// `handle-message` returned an error, trapped, or the call failed.
    HandlerError,
    /// `handle-message` did not finish within the handler timeout.
    Timeout,
    /// The handler link it was queued for was deleted first.
    LinkDeleted,
    /// Refused under backpressure or the inbound budget, or the session ended before delivery.
    Refused,
}

impl NotHandled {
    pub fn code(self) -> &'static str {
        match self {
            Self::NoHandler => "no_handler",
            Self::HandlerError => "handler_error",
            Self::Timeout => "timeout",
            Self::LinkDeleted => "link_deleted",
            Self::Refused => "refused",
        }
    }
}

/// The answer to an acknowledged envelope: `{"ack": {"id", "ok": true}}`, or `ok: false` with
/// `error: {code, message}`.
pub fn ack_frame(id: &str, outcome: Result<(), (NotHandled, &str)>) -> String {
    match outcome {
        Ok(()) => serde_json::json!({"ack": {"id": id, "ok": true}}),
        Err((reason, message)) => serde_json::json!({"ack": {"id": id, "ok": false,
            "error": {"code": reason.code(), "message": message}}}),
    }
    .to_string()
}

/// Encodes an envelope: UTF-8 bodies as `body`, anything else as `body_base64`.
pub fn encode(subject: &str, body: &[u8], reply_to: Option<&str>) -> String {
    encode_with_id(subject, body, reply_to, None)
}

/// Encodes an envelope the peer is asked to acknowledge: with `id` and `"ack": true`.
pub fn encode_acked(subject: &str, body: &[u8], reply_to: Option<&str>, id: &str) -> String {
    encode_with_id(subject, body, reply_to, Some(id))
}

fn encode_with_id(subject: &str, body: &[u8], reply_to: Option<&str>, id: Option<&str>) -> String {
    let (text, b64) = match std::str::from_utf8(body) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(B64.encode(body))),
    };
    let out = WireOut {
        subject,
        id,
        ack: id.map(|_| true),
        body: text,
        body_base64: b64,
        reply_to,
    };
    // Serializing a struct of strings cannot fail.
    serde_json::to_string(&out).unwrap_or_default()
}

/// The error frame sent to a peer whose frame was not a valid envelope.
pub fn error_frame(message: &str) -> String {
    serde_json::json!({"error": {"code": "invalid_envelope", "message": message}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_binary_bodies_round_trip() {
        for body in [&b"hello"[..], &[0u8, 1, 2, 255, 254][..], &b""[..]] {
            let frame = encode("s.1", body, Some("inbox.1"));
            let env = decode(frame.as_bytes()).expect("decodes");
            assert_eq!(env.subject, "s.1");
            assert_eq!(env.body.as_ref(), body);
            assert_eq!(env.reply_to.as_deref(), Some("inbox.1"));
        }
        assert!(encode("s", b"hi", None).contains(r#""body":"hi""#));
        assert!(encode("s", &[255], None).contains("body_base64"));
    }

    #[test]
    fn malformed_envelopes_are_errors() {
        let cases: &[(&str, &str)] = &[
            ("{", "not valid JSON"),
            ("[1,2]", "JSON object"),
            ("\"str\"", "JSON object"),
            (r#"{"body":"x"}"#, "subject is missing"),
            (r#"{"subject":""}"#, "subject is empty"),
            (r#"{"subject":5}"#, "subject must be a string"),
            (r#"{"subject":"a","body":1}"#, "body must be a string"),
            (r#"{"subject":"a","body_base64":"!!"}"#, "not valid base64"),
            (
                r#"{"subject":"a","body":"x","body_base64":"eA=="}"#,
                "not both",
            ),
            (
                r#"{"subject":"a","reply_to":7}"#,
                "reply_to must be a string",
            ),
        ];
        for (input, expected) in cases {
            let e = decode(input.as_bytes()).expect_err(input);
            assert!(e.contains(expected), "{input}: {e}");
        }
    }

    #[test]
    fn errors_do_not_echo_the_payload() {
        let e = decode(br#"{"subject":"a","body_base64":"secret!!"}"#).expect_err("bad");
        assert!(!e.contains("secret"));
        assert!(error_frame(&e).contains("invalid_envelope"));
    }

    #[test]
    fn ids_are_checked_and_kept_only_when_an_ack_is_asked_for() {
        let env = decode(br#"{"subject":"a","id":"m1","ack":true}"#).expect("ok");
        assert_eq!(env.ack_id.as_deref(), Some("m1"));
        let env = decode(br#"{"subject":"a","id":"m1"}"#).expect("ok");
        assert_eq!(env.ack_id, None);
        let long = format!(r#"{{"subject":"a","id":"{}","ack":true}}"#, "x".repeat(129));
        assert!(decode(long.as_bytes())
            .expect_err("long")
            .contains("1 to 128"));
        let at_limit = format!(r#"{{"subject":"a","id":"{}","ack":true}}"#, "x".repeat(128));
        assert!(decode(at_limit.as_bytes()).is_ok());
        for (input, expected) in [
            (r#"{"subject":"a","ack":true}"#, "ack needs an id"),
            (r#"{"subject":"a","id":"","ack":true}"#, "1 to 128"),
            (
                r#"{"subject":"a","id":5,"ack":true}"#,
                "id must be a string",
            ),
            (r#"{"subject":"a","id":"x","ack":"yes"}"#, "ack must be"),
        ] {
            assert!(
                decode(input.as_bytes())
                    .expect_err(input)
                    .contains(expected),
                "{input}"
            );
        }
        let ok: serde_json::Value = serde_json::from_str(&ack_frame("m\"1", Ok(()))).expect("json");
        assert_eq!(ok, serde_json::json!({"ack": {"id": "m\"1", "ok": true}}));
        let failed: serde_json::Value =
            serde_json::from_str(&ack_frame("m2", Err((NotHandled::Timeout, "late"))))
                .expect("json");
        assert_eq!(failed["ack"]["ok"], false);
        assert_eq!(failed["ack"]["error"]["code"], "timeout");
        assert_eq!(failed["ack"]["error"]["message"], "late");
    }

    #[test]
    fn peer_acks_are_told_apart_from_messages() {
        let frame = |s: &str| decode_frame(s.as_bytes());
        assert_eq!(
            frame(r#"{"ack":{"id":"a1"}}"#),
            Ok(Frame::Ack(PeerAck {
                id: "a1".into(),
                outcome: Ok(())
            }))
        );
        assert_eq!(
            frame(r#"{"ack":{"id":"a1","ok":false,"error":{"code":"busy","message":"later"}}}"#),
            Ok(Frame::Ack(PeerAck {
                id: "a1".into(),
                outcome: Err("busy: later".into())
            }))
        );
        assert!(frame(r#"{"ack":{"ok":true}}"#)
            .expect_err("no id")
            .contains("ack.id"));
        assert!(frame(r#"{"ack":{"id":"a","ok":3}}"#).is_err());
        assert!(
            matches!(frame(r#"{"subject":"s","id":"m","ack":true}"#), Ok(Frame::Message(e)) if e.ack_id.as_deref() == Some("m"))
        );
        assert!(frame(r#"{"ack":true}"#)
            .expect_err("neither")
            .contains("subject is missing"));
        let acked = encode_acked("s", b"hi", None, "x1");
        assert_eq!(
            decode(acked.as_bytes()).expect("decodes").ack_id.as_deref(),
            Some("x1")
        );
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let env = decode(br#"{"subject":"a","body":null,"reply_to":null,"extra":1}"#).expect("ok");
        assert!(env.body.is_empty());
        assert_eq!(env.reply_to, None);
    }
}

#[cfg(test)]
mod robustness {
    //! Randomized inputs (a fixed seed, so failures reproduce): the decoder must answer every
    //! input with an envelope or an error, never a panic, and must round-trip what it encodes.
    use super::*;

    fn random_bytes(rng: &mut fastrand::Rng) -> Vec<u8> {
        let len = rng.usize(0..64);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    #[test]
    fn arbitrary_frames_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let pieces: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"subject\"",
            "\"body\"",
            "\"body_base64\"",
            "\"reply_to\"",
            "\"ack\"",
            "\"id\"",
            "\"ok\"",
            "\"error\"",
            "\"x\"",
            "null",
            "1",
            "-0.5e9",
            "true",
            "\"\\u0000\"",
            "\"AAEC\"",
            " ",
        ];
        for _ in 0..20_000 {
            let _ = decode(&random_bytes(&mut rng));
            let mut s = String::new();
            for _ in 0..rng.usize(1..24) {
                s.push_str(pieces[rng.usize(0..pieces.len())]);
            }
            let _ = decode(s.as_bytes());
            let _ = decode_frame(s.as_bytes());
        }
    }

    #[test]
    fn whatever_is_encoded_decodes_to_the_same_message() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..5_000 {
            let subject = format!("s.{}", rng.u32(..));
            let body = random_bytes(&mut rng);
            let reply = rng.bool().then(|| format!("r.{}", rng.u16(..)));
            let frame = encode(&subject, &body, reply.as_deref());
            let envelope = decode(frame.as_bytes()).expect("own envelopes decode");
            assert_eq!(envelope.subject, subject);
            assert_eq!(envelope.body.as_ref(), body.as_slice());
            assert_eq!(envelope.reply_to, reply);
        }
    }
}
