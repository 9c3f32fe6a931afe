//! Fuzzes the JSON envelope decoder (`src/envelope.rs`): any bytes a peer sends must give an
//! envelope or an error, never a panic, and a decoded envelope must survive re-encoding.
#![no_main]

#[path = "../../src/envelope.rs"]
#[allow(dead_code)]
mod envelope;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A peer's frame is a message or an ack answer; either way, no panic.
    let _ = envelope::decode_frame(data);
    if let Ok(decoded) = envelope::decode(data) {
        let frame = match decoded.ack_id.as_deref() {
            Some(id) => envelope::encode_acked(
                &decoded.subject,
                &decoded.body,
                decoded.reply_to.as_deref(),
                id,
            ),
            None => envelope::encode(&decoded.subject, &decoded.body, decoded.reply_to.as_deref()),
        };
        let again = envelope::decode(frame.as_bytes()).expect("re-encoded envelopes decode");
        assert_eq!(again, decoded);
    }
    let _ = envelope::error_frame(&String::from_utf8_lossy(data));
});
