//! Settings every link has, whatever its mode: the inbound subject and session tracking, how
//! frames map to messages (`FRAME_TYPE`, `FORMAT`), the `handle-message` deliveries (timeout,
//! calls in flight, the wait for a handler link), socket limits and keepalive, and what a
//! publish does with a slow peer.

use std::time::Duration;

use super::keys::*;
use super::{err, ConfigError, LinkSettings, Mode};

/// Which WebSocket frame type `publish` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum FrameType {
    /// Text when the body is valid UTF-8, binary otherwise.
    #[default]
    Auto,
    Text,
    Binary,
}

/// How frames map to messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Format {
    /// A frame's payload is the message body.
    #[default]
    Raw,
    /// Every frame is a JSON envelope with subject, body and reply_to (see `envelope`).
    Json,
}

/// `RECOVERY=true`: what a session's history keeps (see the `recovery` module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Messages kept per session (`HISTORY_SIZE`).
    pub history_size: usize,
    /// How long a message is kept, and how long a dropped session waits for its client to
    /// resume it (`HISTORY_TTL_SEC`).
    pub history_ttl: Duration,
}

/// Keepalive settings of one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    /// Send a ping this often; `None` sends none.
    pub ping_interval: Option<Duration>,
    /// A peer silent for `ping_interval + pong_timeout` (no pong, no frame) is dead.
    pub pong_timeout: Duration,
    /// Close (1001) a socket that carried no data frame for this long; `None` never does.
    pub idle_timeout: Option<Duration>,
}

/// The settings of a link in `mode`: the mode's own part plus every common key.
pub(super) fn parse(values: &Values<'_>, mode: Mode) -> Result<LinkSettings, ConfigError> {
    Ok(LinkSettings {
        mode,
        session_tracking: values.flag(ENABLE_SESSION_TRACKING, true)?,
        subject: values.get(SUBJECT).map(str::to_string),
        frame_type: frame_type(values)?,
        format: format(values)?,
        handler_timeout: values.millis(HANDLER_TIMEOUT_MS, DEFAULT_HANDLER_TIMEOUT)?,
        max_message_bytes: values.count(MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES)?,
        max_in_flight: values.count(MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT)?,
        send_queue_len: values.count(SEND_QUEUE_LEN, DEFAULT_SEND_QUEUE_LEN)?,
        keepalive: keepalive(values)?,
        write_timeout: values.millis(WRITE_TIMEOUT_MS, DEFAULT_WRITE_TIMEOUT)?,
        fanout_timeout: values.millis(FANOUT_TIMEOUT_MS, DEFAULT_FANOUT_TIMEOUT)?,
        handler_wait: values.millis(HANDLER_WAIT_MS, DEFAULT_HANDLER_WAIT)?,
        close_slow_consumers: close_slow_consumers(values)?,
        recovery: recovery(values)?,
    })
}

/// `RECOVERY`, `HISTORY_SIZE` and `HISTORY_TTL_SEC`; recovery needs `FORMAT=json` (a message's
/// sequence number travels in its envelope).
fn recovery(values: &Values<'_>) -> Result<Option<Recovery>, ConfigError> {
    let history_size = values.count(HISTORY_SIZE, DEFAULT_HISTORY_SIZE)?;
    let history_ttl = values.seconds(HISTORY_TTL_SEC, DEFAULT_HISTORY_TTL)?;
    if !values.flag(RECOVERY, false)? {
        return Ok(None);
    }
    if format(values)? != Format::Json {
        return Err(err(
            RECOVERY,
            "needs FORMAT=json: sequence numbers and resume tokens travel in JSON envelopes",
        ));
    }
    Ok(Some(Recovery {
        history_size,
        history_ttl,
    }))
}

fn frame_type(values: &Values<'_>) -> Result<FrameType, ConfigError> {
    match values.choice(FRAME_TYPE).as_deref() {
        None | Some("auto") => Ok(FrameType::Auto),
        Some("text") => Ok(FrameType::Text),
        Some("binary") => Ok(FrameType::Binary),
        Some(other) => Err(err(
            FRAME_TYPE,
            format!("expected auto, text or binary, got {other:?}"),
        )),
    }
}

fn format(values: &Values<'_>) -> Result<Format, ConfigError> {
    match values.choice(FORMAT).as_deref() {
        None | Some("raw") => Ok(Format::Raw),
        Some("json") => Ok(Format::Json),
        Some(other) => Err(err(FORMAT, format!("expected raw or json, got {other:?}"))),
    }
}

/// Ping interval and idle timeout in seconds, 0 turning them off; the pong timeout.
fn keepalive(values: &Values<'_>) -> Result<Keepalive, ConfigError> {
    Ok(Keepalive {
        ping_interval: values.seconds_or_off(PING_INTERVAL_SEC, Some(DEFAULT_PING_INTERVAL))?,
        pong_timeout: values.seconds(PONG_TIMEOUT_SEC, DEFAULT_PONG_TIMEOUT)?,
        idle_timeout: values.seconds_or_off(IDLE_TIMEOUT_SEC, None)?,
    })
}

/// `SLOW_CONSUMER=close` closes a peer that does not read; `error` (the default) fails the
/// publishes to it.
fn close_slow_consumers(values: &Values<'_>) -> Result<bool, ConfigError> {
    match values.choice(SLOW_CONSUMER).as_deref() {
        None | Some("error") => Ok(false),
        Some("close") => Ok(true),
        Some(other) => Err(err(
            SLOW_CONSUMER,
            format!("expected error or close, got {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn common_defaults() {
        let s = parse(&[], &[]).expect("defaults parse");
        assert!(s.session_tracking);
        assert_eq!(s.inbound_subject("chat"), "ws.chat");
        assert_eq!((s.frame_type, s.format), (FrameType::Auto, Format::Raw));
        assert_eq!(s.handler_timeout, DEFAULT_HANDLER_TIMEOUT);
        assert_eq!(s.max_in_flight, 1);
        assert_eq!(s.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(s.send_queue_len, DEFAULT_SEND_QUEUE_LEN);
        assert_eq!(
            s.keepalive,
            Keepalive {
                ping_interval: Some(Duration::from_secs(30)),
                pong_timeout: Duration::from_secs(10),
                idle_timeout: None,
            }
        );
        assert!(!s.close_slow_consumers);
        assert_eq!(s.write_timeout, DEFAULT_WRITE_TIMEOUT);
        assert_eq!(s.fanout_timeout, DEFAULT_FANOUT_TIMEOUT);
        assert_eq!(s.handler_wait, DEFAULT_HANDLER_WAIT);
        assert_eq!(s.recovery, None);
    }

    #[test]
    fn recovery_needs_json_and_bounded_history() {
        let r = parse(&[], &[("recovery", "true"), ("format", "json")]).expect("parse");
        assert_eq!(
            r.recovery,
            Some(Recovery {
                history_size: DEFAULT_HISTORY_SIZE,
                history_ttl: DEFAULT_HISTORY_TTL
            })
        );
        let r = parse(
            &[],
            &[
                ("RECOVERY", "on"),
                ("FORMAT", "json"),
                ("HISTORY_SIZE", "5"),
                ("HISTORY_TTL_SEC", "2"),
            ],
        )
        .expect("parse");
        assert_eq!(
            r.recovery,
            Some(Recovery {
                history_size: 5,
                history_ttl: Duration::from_secs(2)
            })
        );
        let e = parse(&[], &[("RECOVERY", "true")]).expect_err("raw");
        assert!(e.to_string().contains("FORMAT=json"), "{e}");
        for (key, bad) in [
            (HISTORY_SIZE, "0"),
            (HISTORY_SIZE, "100001"),
            (HISTORY_TTL_SEC, "0"),
            (RECOVERY, "maybe"),
        ] {
            let e =
                parse(&[], &[("FORMAT", "json"), (RECOVERY, "true"), (key, bad)]).expect_err(bad);
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn common_keys_are_read_in_either_mode() {
        let common = [
            ("subject", "in"),
            ("frame_type", "Binary"),
            ("format", "JSON"),
            ("ping_interval_sec", "0"),
            ("idle_timeout_sec", "60"),
            ("slow_consumer", "close"),
            ("handler_wait_ms", "0"),
        ];
        let server = [("MODE", "server"), ("LISTEN_ADDRESS", "127.0.0.1:1")];
        for mode in [&[][..], &server[..]] {
            let pairs: Vec<_> = common.iter().chain(mode).copied().collect();
            let s = parse(&[], &pairs).expect("parse");
            assert_eq!(s.inbound_subject("x"), "in");
            assert_eq!((s.frame_type, s.format), (FrameType::Binary, Format::Json));
            assert_eq!(s.keepalive.ping_interval, None);
            assert_eq!(s.keepalive.idle_timeout, Some(Duration::from_secs(60)));
            assert!(s.close_slow_consumers);
            assert_eq!(s.handler_wait, Duration::ZERO);
        }
    }

    #[test]
    fn max_in_flight_defaults_to_strict_order_and_is_bounded() {
        assert_eq!(parse(&[], &[]).expect("defaults").max_in_flight, 1);
        let n = parse(&[], &[("max_in_flight", "64")]).expect("64");
        assert_eq!(n.max_in_flight, 64);
        for bad in ["0", "257", "-1", "many"] {
            let e = parse(&[], &[("MAX_IN_FLIGHT", bad)]).expect_err(bad);
            assert!(e.to_string().contains("MAX_IN_FLIGHT"), "{e}");
        }
    }
}
