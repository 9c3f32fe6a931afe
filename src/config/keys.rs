//! Every config key in one place: its name, its default, and (for numbers) its range in
//! [`RANGES`]; plus [`Values`], the merged view of one link's config that every mode's parser
//! reads typed values from. A value that cannot be used is a [`ConfigError`] naming the key.

use std::collections::HashMap;
use std::time::Duration;

use super::{err, ConfigError};

// Client mode.
pub const URI: &str = "URI";
pub const CONNECT_TIMEOUT_SEC: &str = "CONNECT_TIMEOUT_SEC";
pub const HEADER_PREFIX: &str = "HEADER_";
pub const RECONNECT_MIN_MS: &str = "RECONNECT_MIN_MS";
pub const RECONNECT_MAX_MS: &str = "RECONNECT_MAX_MS";
pub const PUBLISH_WAIT_MS: &str = "PUBLISH_WAIT_MS";
/// Both modes: the token a client sends, or the token a server's clients must present.
pub const AUTH_TOKEN: &str = "AUTH_TOKEN";

// Every mode.
pub const ENABLE_SESSION_TRACKING: &str = "ENABLE_SESSION_TRACKING";
pub const SUBJECT: &str = "SUBJECT";
pub const FRAME_TYPE: &str = "FRAME_TYPE";
pub const FORMAT: &str = "FORMAT";
pub const MODE: &str = "MODE";
pub const PING_INTERVAL_SEC: &str = "PING_INTERVAL_SEC";
pub const PONG_TIMEOUT_SEC: &str = "PONG_TIMEOUT_SEC";
pub const IDLE_TIMEOUT_SEC: &str = "IDLE_TIMEOUT_SEC";
pub const SLOW_CONSUMER: &str = "SLOW_CONSUMER";
pub const WRITE_TIMEOUT_MS: &str = "WRITE_TIMEOUT_MS";
pub const HANDLER_TIMEOUT_MS: &str = "HANDLER_TIMEOUT_MS";
pub const MAX_MESSAGE_BYTES: &str = "MAX_MESSAGE_BYTES";
pub const SEND_QUEUE_LEN: &str = "SEND_QUEUE_LEN";
pub const MAX_IN_FLIGHT: &str = "MAX_IN_FLIGHT";
pub const FANOUT_TIMEOUT_MS: &str = "FANOUT_TIMEOUT_MS";
pub const HANDLER_WAIT_MS: &str = "HANDLER_WAIT_MS";
/// `FORMAT=json` only: sequence numbers, history and resume tokens (server mode), messages kept
/// across a reconnect (client mode).
pub const RECOVERY: &str = "RECOVERY";
pub const HISTORY_SIZE: &str = "HISTORY_SIZE";
pub const HISTORY_TTL_SEC: &str = "HISTORY_TTL_SEC";

// Server mode.
pub const LISTEN_ADDRESS: &str = "LISTEN_ADDRESS";
pub const PATH: &str = "PATH";
pub const ALLOWED_ORIGINS: &str = "ALLOWED_ORIGINS";
pub const MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
pub const SUBPROTOCOLS: &str = "SUBPROTOCOLS";
pub const TLS_CERT_FILE: &str = "TLS_CERT_FILE";
pub const TLS_KEY_FILE: &str = "TLS_KEY_FILE";
pub const LIFECYCLE_EVENTS: &str = "LIFECYCLE_EVENTS";
pub const SESSION_HEADERS: &str = "SESSION_HEADERS";
pub const HANDSHAKE_TIMEOUT_SEC: &str = "HANDSHAKE_TIMEOUT_SEC";
pub const MAX_PENDING_HANDSHAKES: &str = "MAX_PENDING_HANDSHAKES";
pub const MAX_HANDSHAKES_PER_ADDRESS: &str = "MAX_HANDSHAKES_PER_ADDRESS";

/// Provider config only: the provider-wide budget of inbound bytes waiting for components.
pub const MAX_INBOUND_BYTES: &str = "MAX_INBOUND_BYTES";
/// Provider config only: the lease time of a client connection shared by several replicas.
pub const LEASE_TTL_MS: &str = "LEASE_TTL_MS";

pub const DEFAULT_URI: &str = "ws://127.0.0.1:8080";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(250);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_SEND_QUEUE_LEN: usize = 1024;
/// One `handle-message` call at a time per session: strict order.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1;
/// The most calls one session may have running (the provider runs at most 256 in all).
pub const MAX_MAX_IN_FLIGHT: usize = 256;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_PUBLISH_WAIT: Duration = Duration::from_secs(5);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SESSION_HEADERS: &str = "origin,user-agent";
/// One deadline for a whole fan-out (broadcast, group, several sessions, a link subject).
pub const DEFAULT_FANOUT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a socket with no handler link waits (unread) for one before frames are dropped.
pub const DEFAULT_HANDLER_WAIT: Duration = Duration::from_secs(30);
/// Inbound bytes that may wait for components across the whole provider.
pub const DEFAULT_MAX_INBOUND_BYTES: u64 = 256 * 1024 * 1024;
/// A replica that stopped renewing a client connection's lease loses it after this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Messages kept per session with `RECOVERY=true` (`HISTORY_SIZE`).
pub const DEFAULT_HISTORY_SIZE: usize = 1000;
/// How long they are kept, and how long a dropped session waits to be resumed (`HISTORY_TTL_SEC`).
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(120);
/// Default of `HANDSHAKE_TIMEOUT_SEC`; range 1..=300.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `MAX_PENDING_HANDSHAKES`; range 1..=65536.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 256;
/// Default of `MAX_HANDSHAKES_PER_ADDRESS`; range 1..=65536.
pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

/// The documented range of each numeric key: `(key, least, most)`. A value outside it is
/// refused with an error naming the key, so no setting can overflow a timer or a queue.
pub const RANGES: &[(&str, u64, u64)] = &[
    (CONNECT_TIMEOUT_SEC, 1, 3_600),
    (HANDLER_TIMEOUT_MS, 1, 3_600_000),
    (RECONNECT_MIN_MS, 1, 3_600_000),
    (RECONNECT_MAX_MS, 1, 86_400_000),
    (MAX_MESSAGE_BYTES, 1, 256 * 1024 * 1024),
    (MAX_IN_FLIGHT, 1, MAX_MAX_IN_FLIGHT as u64),
    (SEND_QUEUE_LEN, 1, 1_000_000),
    (PING_INTERVAL_SEC, 0, 86_400),
    (PONG_TIMEOUT_SEC, 1, 3_600),
    (IDLE_TIMEOUT_SEC, 0, 604_800),
    (PUBLISH_WAIT_MS, 1, 3_600_000),
    (WRITE_TIMEOUT_MS, 1, 3_600_000),
    (FANOUT_TIMEOUT_MS, 1, 3_600_000),
    (HANDLER_WAIT_MS, 0, 3_600_000),
    (MAX_INBOUND_BYTES, 1024 * 1024, 1 << 40),
    (LEASE_TTL_MS, 1000, 600_000),
    (MAX_CONNECTIONS, 1, 1_000_000),
    (HANDSHAKE_TIMEOUT_SEC, 1, 300),
    (MAX_PENDING_HANDSHAKES, 1, 65_536),
    (MAX_HANDSHAKES_PER_ADDRESS, 1, 65_536),
    (HISTORY_SIZE, 1, 100_000),
    (HISTORY_TTL_SEC, 1, 86_400),
];

/// Parses `value` as a whole number within `key`'s range (see [`RANGES`]).
pub(super) fn parse_in_range(key: &str, value: &str) -> Result<u64, ConfigError> {
    let (lo, hi) = RANGES
        .iter()
        .find(|(k, _, _)| *k == key)
        .map_or((0, u64::MAX), |(_, lo, hi)| (*lo, *hi));
    let n = value
        .parse::<u64>()
        .map_err(|_| err(key, format!("{value:?} is not a whole number")))?;
    if n < lo || n > hi {
        return Err(err(key, format!("{n} is out of range: use {lo} to {hi}")));
    }
    Ok(n)
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(err(key, format!("{value:?} is not true or false"))),
    }
}

/// A comma-separated list, each item trimmed, empty items dropped.
pub(super) fn list(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

/// One link's config after the merge (link over provider, keys upper-cased), read by key.
pub(super) struct Values<'a> {
    /// Provider config with the link's config over it.
    pub merged: &'a HashMap<String, String>,
    /// The link's own config.
    pub link: &'a HashMap<String, String>,
}

impl Values<'_> {
    /// The trimmed value of `key`; `None` when unset or blank.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.merged
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The value of `key` lower-cased, for keys that name one of a few choices.
    pub fn choice(&self, key: &str) -> Option<String> {
        self.get(key).map(str::to_ascii_lowercase)
    }

    /// A whole number within `key`'s range held in a `usize`, or `default` when unset.
    pub fn count(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        match self.get(key) {
            Some(v) => usize::try_from(parse_in_range(key, v)?).map_err(|_| err(key, "too large")),
            None => Ok(default),
        }
    }

    /// Milliseconds within `key`'s range, or `default` when unset.
    pub fn millis(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(match self.get(key) {
            Some(v) => Duration::from_millis(parse_in_range(key, v)?),
            None => default,
        })
    }

    /// Seconds within `key`'s range, or `default` when unset.
    pub fn seconds(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(match self.get(key) {
            Some(v) => Duration::from_secs(parse_in_range(key, v)?),
            None => default,
        })
    }

    /// Seconds where 0 turns the timer off (`None`), or `default` when unset.
    pub fn seconds_or_off(
        &self,
        key: &str,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match parse_in_range(key, v)? {
                0 => Ok(None),
                n => Ok(Some(Duration::from_secs(n))),
            },
        }
    }

    /// A true/false value, or `default` when unset.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            Some(v) => parse_bool(key, v),
            None => Ok(default),
        }
    }

    /// True when the link's own config (not the provider default) sets `key`.
    pub fn set_on_link(&self, key: &str) -> bool {
        self.link.get(key).is_some_and(|v| !v.trim().is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_whole_and_within_their_range() {
        assert_eq!(parse_in_range(MAX_IN_FLIGHT, "256"), Ok(256));
        let e = parse_in_range(MAX_IN_FLIGHT, "257").expect_err("above");
        assert_eq!(
            e.to_string(),
            "invalid config MAX_IN_FLIGHT: 257 is out of range: use 1 to 256"
        );
        let e = parse_in_range(MAX_IN_FLIGHT, "-1").expect_err("negative");
        assert_eq!(e.reason, "\"-1\" is not a whole number");
        // A key without a range takes any u64.
        assert_eq!(
            parse_in_range("OTHER", "18446744073709551615"),
            Ok(u64::MAX)
        );
    }

    #[test]
    fn blank_values_count_as_unset_and_lists_drop_empty_items() {
        let merged: HashMap<String, String> = [(SUBJECT, "  "), (FORMAT, " JSON ")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let v = Values {
            merged: &merged,
            link: &HashMap::new(),
        };
        assert_eq!(v.get(SUBJECT), None);
        assert_eq!(v.choice(FORMAT).as_deref(), Some("json"));
        assert!(!v.set_on_link(FORMAT));
        assert_eq!(list(Some(" a, ,b,")), ["a", "b"]);
        assert!(list(None).is_empty());
        for (value, expected) in [("on", true), ("NO", false), ("1", true), ("off", false)] {
            assert_eq!(parse_bool(LIFECYCLE_EVENTS, value), Ok(expected));
        }
        assert!(parse_bool(LIFECYCLE_EVENTS, "maybe").is_err());
    }
}
