//! Frames <-> messages, decided once per session by its link's `FORMAT` and `FRAME_TYPE`: raw
//! (a frame's payload is the body) or JSON envelopes ([`crate::envelope`]). Pure functions.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Message;

use crate::config::{Format, FrameType};
use crate::envelope::{self, Envelope};

/// Subjects of the provider's own messages, which a peer's envelope may not use.
pub const RESERVED_SUBJECT_PREFIXES: &[&str] = &["ws.lifecycle.", "ws.session."];

fn is_reserved(subject: &str) -> bool {
    RESERVED_SUBJECT_PREFIXES
        .iter()
        .any(|p| subject.starts_with(p) || subject == p.trim_end_matches('.'))
}

/// How one session's frames map to messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Codec {
    pub format: Format,
    /// The frame type a raw message is written as, unless a publish's link chose another.
    pub frame_type: FrameType,
}

/// What an inbound frame says: a raw frame has no subject (the handler link's applies) and no
/// reply subject of its own.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Raw(Bytes),
    Envelope(Envelope),
    /// The peer's answer to an acknowledged send.
    Ack(envelope::PeerAck),
}

impl Codec {
    /// The frame a message becomes: the body itself (raw, as `frame_type` or the session's
    /// own type says) or an envelope (always a text frame).
    pub fn encode(
        &self,
        subject: &str,
        body: Bytes,
        reply_to: Option<&str>,
        frame_type: Option<FrameType>,
    ) -> Result<Message, String> {
        match self.format {
            Format::Raw => encode_raw(body, frame_type.unwrap_or(self.frame_type)),
            Format::Json => Ok(Message::text(envelope::encode(subject, &body, reply_to))),
        }
    }

    /// What a frame's payload says; an error (for the peer's error frame) when it is not a
    /// valid envelope or uses one of the provider's own subjects.
    pub fn decode(&self, payload: Bytes) -> Result<Inbound, String> {
        match self.format {
            Format::Raw => Ok(Inbound::Raw(payload)),
            Format::Json => {
                let envelope = match envelope::decode_frame(&payload)? {
                    envelope::Frame::Message(envelope) => envelope,
                    envelope::Frame::Ack(ack) => return Ok(Inbound::Ack(ack)),
                };
                if is_reserved(&envelope.subject) {
                    return Err(format!(
                        "subject {:?} is reserved for the provider's own messages",
                        envelope.subject
                    ));
                }
                Ok(Inbound::Envelope(envelope))
            }
        }
    }
}

/// Turns a body into a frame of the requested type.
pub fn encode_raw(body: Bytes, frame_type: FrameType) -> Result<Message, String> {
    match frame_type {
        FrameType::Binary => Ok(Message::Binary(body)),
        FrameType::Text => body
            .try_into()
            .map(Message::Text)
            .map_err(|_| "body is not valid UTF-8, but FRAME_TYPE is text".to_string()),
        FrameType::Auto => Ok(match body.clone().try_into() {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(body),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW: Codec = Codec {
        format: Format::Raw,
        frame_type: FrameType::Auto,
    };
    const JSON: Codec = Codec {
        format: Format::Json,
        frame_type: FrameType::Auto,
    };

    #[test]
    fn auto_frames_pick_text_for_utf8_only() {
        assert!(matches!(
            encode_raw(Bytes::from_static(b"hi"), FrameType::Auto),
            Ok(Message::Text(_))
        ));
        assert!(matches!(
            encode_raw(Bytes::from_static(&[0xff]), FrameType::Auto),
            Ok(Message::Binary(_))
        ));
        assert!(encode_raw(Bytes::from_static(&[0xff]), FrameType::Text).is_err());
        assert!(matches!(
            encode_raw(Bytes::from_static(b"hi"), FrameType::Binary),
            Ok(Message::Binary(_))
        ));
    }

    #[test]
    fn a_publishs_frame_type_overrides_the_sessions_in_raw_mode_only() {
        let body = Bytes::from_static(b"hi");
        assert!(matches!(
            RAW.encode("s", body.clone(), None, Some(FrameType::Binary)),
            Ok(Message::Binary(b)) if b == body
        ));
        assert!(matches!(
            RAW.encode("s", body.clone(), None, None),
            Ok(Message::Text(t)) if t.as_str() == "hi"
        ));
        let Ok(Message::Text(t)) = JSON.encode("s", body, Some("r"), Some(FrameType::Binary))
        else {
            panic!("an envelope is a text frame");
        };
        assert_eq!(
            envelope::decode(t.as_bytes()),
            Ok(Envelope {
                subject: "s".into(),
                body: Bytes::from_static(b"hi"),
                reply_to: Some("r".into()),
                ack_id: None,
            })
        );
    }

    #[test]
    fn raw_frames_pass_through_and_envelopes_are_checked() {
        let payload = Bytes::from_static(b"{\"subject\":\"a\"}");
        assert_eq!(
            RAW.decode(payload.clone()),
            Ok(Inbound::Raw(payload.clone()))
        );
        assert!(matches!(JSON.decode(payload), Ok(Inbound::Envelope(e)) if e.subject == "a"));
        assert!(JSON.decode(Bytes::from_static(b"not json")).is_err());
        for reserved in [
            "ws.lifecycle.connected",
            "ws.session.x",
            "ws.session",
            "ws.lifecycle",
        ] {
            let frame = format!("{{\"subject\":\"{reserved}\"}}");
            let e = JSON.decode(Bytes::from(frame)).expect_err("reserved");
            assert!(e.contains("reserved"), "{e}");
        }
        assert!(JSON
            .decode(Bytes::from_static(b"{\"subject\":\"ws.sessions\"}"))
            .is_ok());
    }
}
