//! What replicas say to each other over NATS: a call (the caller component, an [`Op`], the
//! message body) and its answer. A call's payload is the length of its JSON head (4 bytes, big
//! endian), the head, then the body as it is.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What one replica asks of another (or of all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    // To the replica that holds one session (the call's subject names it).
    /// Write the body to the session (`frame_type`: 0 auto, 1 text, 2 binary).
    Publish {
        subject: String,
        reply_to: Option<String>,
        frame_type: Option<u8>,
    },
    /// A request to the session's peer; the answer is its reply.
    Request {
        subject: String,
        timeout_ms: u32,
        frame_type: Option<u8>,
    },
    /// Write the body as an envelope the peer is asked to acknowledge; the answer is its ack.
    SendAcked {
        subject: String,
        reply_to: Option<String>,
        timeout_ms: u32,
    },
    Get,
    SetMetadata {
        key: String,
        value: String,
    },
    GetMetadata {
        key: String,
    },
    RemoveMetadata {
        key: String,
    },
    Join {
        group: String,
    },
    Leave {
        group: String,
    },
    Close {
        code: u16,
        reason: String,
    },
    // To every replica.
    List,
    Broadcast {
        subject: String,
        reply_to: Option<String>,
    },
    Members {
        group: String,
    },
    SendGroup {
        group: String,
        subject: String,
        reply_to: Option<String>,
    },
    /// Which of `ids` the replica holds for the caller.
    Owned {
        ids: Vec<Uuid>,
    },
    SendMany {
        ids: Vec<Uuid>,
        subject: String,
        reply_to: Option<String>,
    },
    /// Write to every client of the caller's server link `link`.
    ServerLink {
        link: String,
        subject: String,
        reply_to: Option<String>,
        frame_type: Option<u8>,
    },
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    component: String,
    #[serde(default)]
    session: Option<Uuid>,
    timeout_ms: u64,
    #[serde(flatten)]
    op: Op,
}

/// One call as received.
#[derive(Debug, PartialEq, Eq)]
pub struct Call {
    /// The calling component (ownership is checked against it).
    pub component: String,
    /// The session it is for, when it is for one.
    pub session: Option<Uuid>,
    /// How long the caller waits.
    pub timeout_ms: u64,
    pub op: Op,
    pub body: Bytes,
}

/// A call's payload.
pub fn encode_call(
    component: &str,
    session: Option<Uuid>,
    timeout_ms: u64,
    op: &Op,
    body: &[u8],
) -> Bytes {
    let head = serde_json::to_vec(&Head {
        component: component.to_string(),
        session,
        timeout_ms,
        op: op.clone(),
    })
    .unwrap_or_default();
    let mut out = BytesMut::with_capacity(4 + head.len() + body.len());
    out.put_u32(u32::try_from(head.len()).unwrap_or(u32::MAX));
    out.put_slice(&head);
    out.put_slice(body);
    out.freeze()
}

/// Reads a call's payload; a malformed one is an error, never a panic.
pub fn decode_call(payload: &Bytes) -> Result<Call, String> {
    let len = payload
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("call too short")?;
    let head = payload.get(4..4 + len).ok_or("call head truncated")?;
    let head: Head = serde_json::from_slice(head).map_err(|e| format!("bad call head: {e}"))?;
    Ok(Call {
        component: head.component,
        session: head.session,
        timeout_ms: head.timeout_ms,
        op: head.op,
        body: payload.slice(4 + len..),
    })
}

/// A replica's answer to a call.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    /// The replica that answered.
    pub from: String,
    #[serde(default)]
    pub ok: Option<serde_json::Value>,
    #[serde(default)]
    pub err: Option<String>,
}

impl Answer {
    pub fn new(from: &str, result: Result<serde_json::Value, String>) -> Self {
        let (ok, err) = match result {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        Self {
            from: from.to_string(),
            ok,
            err,
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(payload: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(payload).map_err(|e| format!("bad answer from a replica: {e}"))
    }

    pub fn result(self) -> Result<serde_json::Value, String> {
        match (self.ok, self.err) {
            (_, Some(e)) => Err(e),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(serde_json::Value::Null),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_round_trips_with_its_body_untouched() {
        let op = Op::Publish {
            subject: "s".into(),
            reply_to: Some("r".into()),
            frame_type: Some(2),
        };
        let body = b"\x00\xffbinary\n{\"op\":1}";
        let id = Uuid::new_v4();
        let payload = encode_call("comp", Some(id), 250, &op, body);
        let call = decode_call(&payload).expect("decode");
        assert_eq!(call.component, "comp");
        assert_eq!((call.session, call.timeout_ms), (Some(id), 250));
        assert_eq!(call.op, op);
        assert_eq!(&call.body[..], body);
    }

    #[test]
    fn malformed_calls_are_errors() {
        for bad in [
            &b""[..],
            b"\x00\x00",
            b"\x00\x00\x00\x09{}",
            b"\x00\x00\x00\x02{}",
        ] {
            assert!(
                decode_call(&Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        let huge = Bytes::from_static(b"\xff\xff\xff\xff{}");
        assert!(decode_call(&huge).is_err());
    }
}
