//! Typed configuration for one link.
//!
//! Provider-level config (named config given when the provider starts) supplies defaults, and the
//! link's own config overrides them. Keys are case-insensitive. `AUTH_TOKEN` is read from secrets
//! first (link secrets, then provider secrets); taking it from plain config works but logs a
//! warning. Parsing is pure: a bad value is a [`ConfigError`] naming the key, never a panic, and
//! secrets never appear in `Debug` output or errors.
//!
//! This file owns the public surface: [`LinkSettings`] (the common settings plus the [`Mode`]'s
//! own part), [`ProviderDefaults`] (where parsing starts) and [`ConfigError`]. The rest is split
//! by concern: `keys` (every key, default and range, and typed reading), `common` (settings of
//! every mode), `client` and `server` (each mode's own settings), `secrets` (the token, secret
//! lookup, URI redaction). Nothing here knows the transport.

mod client;
mod common;
mod keys;
mod secrets;
mod server;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

pub use client::{ClientSettings, Endpoint};
pub use common::{Format, FrameType, Keepalive, Recovery};
pub use keys::*;
pub use secrets::{redact_uri, Secret, Secrets};
pub use server::ServerSettings;

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// What a link does with its socket(s): connect to a server, or listen for clients.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// `MODE=client` (the default): the link connects to `URI`.
    Client(ClientSettings),
    /// `MODE=server`: the link listens, one session per client.
    Server(ServerSettings),
}

/// Everything one link's config says, after defaults and overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSettings {
    /// The mode's own settings.
    pub mode: Mode,
    pub session_tracking: bool,
    /// Subject given to inbound messages; `None` means the default `ws.<link name>`.
    pub subject: Option<String>,
    pub frame_type: FrameType,
    pub format: Format,
    pub handler_timeout: Duration,
    /// `handle-message` calls one session may have running at once.
    pub max_in_flight: usize,
    pub max_message_bytes: usize,
    pub send_queue_len: usize,
    pub keepalive: Keepalive,
    /// What to do with a peer that does not read: `true` closes it, `false` fails publishes.
    pub close_slow_consumers: bool,
    /// How long a publish waits for its frame to be written before the peer counts as slow.
    pub write_timeout: Duration,
    /// One deadline for a whole fan-out made on this (consumer) link.
    pub fanout_timeout: Duration,
    /// How long a socket without a handler link waits, unread, for one.
    pub handler_wait: Duration,
    /// `RECOVERY=true` (`FORMAT=json` only): sequence numbers, history and resume tokens.
    pub recovery: Option<Recovery>,
}

impl LinkSettings {
    /// The client part, when the link is in client mode.
    pub fn client(&self) -> Option<&ClientSettings> {
        match &self.mode {
            Mode::Client(client) => Some(client),
            Mode::Server(_) => None,
        }
    }

    /// The server part, when the link is in server mode (`MODE=server`).
    pub fn server(&self) -> Option<&ServerSettings> {
        match &self.mode {
            Mode::Server(server) => Some(server),
            Mode::Client(_) => None,
        }
    }

    /// Builds what the provider builds from these settings when it opens the link's sockets
    /// (the send queue and its waiters, every deadline from now), so tests and the config fuzz
    /// target check that no accepted value can make them panic.
    pub fn build_runtime_objects(&self) {
        let (_queue, _rx) = tokio::sync::mpsc::channel::<()>(self.send_queue_len);
        let _waiting = tokio::sync::Semaphore::new(self.send_queue_len);
        let keepalive = &self.keepalive;
        let dead_after = keepalive.ping_interval.unwrap_or_default() + keepalive.pong_timeout;
        let mode_waits = match &self.mode {
            Mode::Client(c) => [
                c.connect_timeout,
                c.reconnect_min,
                c.reconnect_max,
                c.publish_wait,
            ],
            Mode::Server(s) => [s.handshake_timeout; 4],
        };
        let now = std::time::Instant::now();
        for wait in mode_waits.into_iter().chain([
            self.handler_timeout,
            self.write_timeout,
            self.fanout_timeout,
            self.handler_wait,
            dead_after,
            keepalive.idle_timeout.unwrap_or_default(),
            self.recovery.map(|r| r.history_ttl).unwrap_or_default(),
        ]) {
            let _deadline = now + wait;
        }
        let _write_buffer = self.max_message_bytes.saturating_mul(4);
        if let Some(recovery) = self.recovery {
            // A resume's queue: the send queue plus every message missed.
            let (_replay, _rx) = tokio::sync::mpsc::channel::<()>(
                self.send_queue_len
                    .saturating_add(recovery.history_size)
                    .saturating_add(1),
            );
            let _per_subject = i64::try_from(recovery.history_size).unwrap_or(i64::MAX);
        }
    }

    /// The subject of inbound messages on a link called `link_name`.
    pub fn inbound_subject(&self, link_name: &str) -> String {
        self.subject
            .clone()
            .unwrap_or_else(|| format!("ws.{link_name}"))
    }
}

/// Upper-cases every key so lookups are case-insensitive.
pub fn normalize(map: &HashMap<String, String>) -> HashMap<String, String> {
    map.iter()
        .map(|(k, v)| (k.to_ascii_uppercase(), v.clone()))
        .collect()
}

/// The provider's own defaults: its config and secrets, kept for every link to start from.
#[derive(Clone, Debug, Default)]
pub struct ProviderDefaults {
    config: HashMap<String, String>,
    secrets: Secrets,
}

impl ProviderDefaults {
    pub fn new(config: &HashMap<String, String>, secrets: &Secrets) -> Self {
        Self {
            config: normalize(config),
            secrets: secrets.clone(),
        }
    }

    /// The provider-wide budget of inbound bytes (`MAX_INBOUND_BYTES`, provider config only).
    pub fn inbound_budget(&self) -> Result<u64, ConfigError> {
        match self.config.get(MAX_INBOUND_BYTES).map(|v| v.trim()) {
            None | Some("") => Ok(DEFAULT_MAX_INBOUND_BYTES),
            Some(v) => keys::parse_in_range(MAX_INBOUND_BYTES, v),
        }
    }

    /// The lease time of a client connection that several replicas share (`LEASE_TTL_MS`).
    pub fn lease_ttl(&self) -> Result<std::time::Duration, ConfigError> {
        match self.config.get(LEASE_TTL_MS).map(|v| v.trim()) {
            None | Some("") => Ok(DEFAULT_LEASE_TTL),
            Some(v) => keys::parse_in_range(LEASE_TTL_MS, v).map(std::time::Duration::from_millis),
        }
    }

    /// Parses the settings of one link: link config over provider config, secrets first.
    ///
    /// The client keys are checked in either mode, so whether a config is refused does not
    /// depend on `MODE`; a server link keeps only its own part, with `AUTH_TOKEN` as the token
    /// its clients must present.
    pub fn link_settings(
        &self,
        link_config: &HashMap<String, String>,
        link_secrets: &Secrets,
    ) -> Result<LinkSettings, ConfigError> {
        let link = normalize(link_config);
        let mut merged = self.config.clone();
        merged.extend(link.iter().map(|(k, v)| (k.clone(), v.clone())));
        let values = Values {
            merged: &merged,
            link: &link,
        };
        let auth_token = secrets::auth_token(&values, link_secrets, &self.secrets)?;
        let client = client::parse(&values, auth_token.clone())?;
        let mode = match values.choice(MODE).as_deref() {
            None | Some("client") => Mode::Client(client),
            Some("server") => Mode::Server(server::parse(&values, auth_token)?),
            Some(other) => {
                return Err(err(
                    MODE,
                    format!("expected client or server, got {other:?}"),
                ))
            }
        };
        common::parse(&values, mode)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Parses `link` config over `provider` config, without secrets.
    pub(crate) fn parse(
        provider: &[(&str, &str)],
        link: &[(&str, &str)],
    ) -> Result<LinkSettings, ConfigError> {
        ProviderDefaults::new(&map(provider), &HashMap::new())
            .link_settings(&map(link), &HashMap::new())
    }

    #[test]
    fn link_overrides_provider_and_keys_ignore_case() {
        let s = parse(
            &[("uri", "ws://a:1"), ("connect_timeout_sec", "5")],
            &[
                ("Uri", "wss://b:2/x"),
                ("subject", "in"),
                ("Enable_Session_Tracking", "false"),
            ],
        )
        .expect("parse");
        let client = s.client().expect("client mode");
        assert_eq!(client.endpoint.uri, "wss://b:2/x");
        assert!(client.uri_set_on_link);
        assert_eq!(client.connect_timeout, Duration::from_secs(5));
        assert!(!s.session_tracking);
        assert_eq!(s.inbound_subject("x"), "in");
    }

    #[test]
    fn the_mode_decides_which_part_a_link_has() {
        let s = parse(&[], &[("MODE", "Client")]).expect("client");
        assert!(s.client().is_some() && s.server().is_none());
        let s = parse(
            &[("MODE", "server"), ("LISTEN_ADDRESS", "127.0.0.1:1")],
            &[],
        )
        .expect("server from provider config");
        assert!(s.server().is_some() && s.client().is_none());
        let e = parse(&[], &[("MODE", "peer")]).expect_err("peer");
        assert_eq!(
            e.to_string(),
            "invalid config MODE: expected client or server, got \"peer\""
        );
        // A client key is checked in server mode too.
        let e = parse(
            &[],
            &[
                ("MODE", "server"),
                ("LISTEN_ADDRESS", "127.0.0.1:1"),
                ("CONNECT_TIMEOUT_SEC", "0"),
            ],
        )
        .expect_err("bad client key in server mode");
        assert_eq!(e.key, CONNECT_TIMEOUT_SEC);
    }

    #[test]
    fn a_consumer_link_config_alone_is_a_client_part() {
        // Consumer links carry only their own keys (URI when they have a connection of their
        // own, FRAME_TYPE, FANOUT_TIMEOUT_MS) over the provider's defaults.
        let defaults = ProviderDefaults::new(&map(&[("URI", "ws://default:1")]), &HashMap::new());
        let s = defaults
            .link_settings(&map(&[("fanout_timeout_ms", "250")]), &HashMap::new())
            .expect("consumer link");
        let client = s.client().expect("client mode");
        assert_eq!(client.endpoint.uri, "ws://default:1");
        assert!(!client.uri_set_on_link, "the URI came from the provider");
        assert_eq!(s.fanout_timeout, Duration::from_millis(250));
        let s = defaults
            .link_settings(
                &map(&[("URI", "ws://own:2"), ("FRAME_TYPE", "text")]),
                &HashMap::new(),
            )
            .expect("consumer link with its own URI");
        let client = s.client().expect("client mode");
        assert!(client.uri_set_on_link);
        assert_eq!(client.endpoint.uri, "ws://own:2");
        assert_eq!(s.frame_type, FrameType::Text);
        let e = defaults
            .link_settings(&map(&[("FANOUT_TIMEOUT_MS", "0")]), &HashMap::new())
            .expect_err("out of range");
        assert_eq!(e.key, FANOUT_TIMEOUT_MS);
    }

    #[test]
    fn lease_ttl_is_provider_config_with_a_default_and_a_range() {
        let ttl = |pairs: &[(&str, &str)]| {
            ProviderDefaults::new(&map(pairs), &HashMap::new()).lease_ttl()
        };
        assert_eq!(ttl(&[]), Ok(DEFAULT_LEASE_TTL));
        assert_eq!(ttl(&[("lease_ttl_ms", "3000")]), Ok(Duration::from_secs(3)));
        assert!(ttl(&[("LEASE_TTL_MS", "999")]).is_err());
        assert!(ttl(&[("LEASE_TTL_MS", "soon")]).is_err());
    }

    #[test]
    fn inbound_budget_is_provider_config_only() {
        let budget = |pairs: &[(&str, &str)]| {
            ProviderDefaults::new(&map(pairs), &HashMap::new()).inbound_budget()
        };
        assert_eq!(budget(&[]), Ok(DEFAULT_MAX_INBOUND_BYTES));
        assert_eq!(
            budget(&[("max_inbound_bytes", " ")]),
            Ok(DEFAULT_MAX_INBOUND_BYTES)
        );
        assert_eq!(budget(&[("MAX_INBOUND_BYTES", "1048576")]), Ok(1 << 20));
        let e = budget(&[("MAX_INBOUND_BYTES", "1")]).expect_err("too small");
        assert_eq!(e.key, MAX_INBOUND_BYTES);
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        for (key, value) in [
            ("URI", "not a uri"),
            ("URI", "http://x"),
            ("CONNECT_TIMEOUT_SEC", "soon"),
            ("CONNECT_TIMEOUT_SEC", "0"),
            ("ENABLE_SESSION_TRACKING", "maybe"),
            ("FRAME_TYPE", "morse"),
            ("FORMAT", "xml"),
            ("MODE", "peer"),
            ("PING_INTERVAL_SEC", "often"),
            ("PONG_TIMEOUT_SEC", "0"),
            ("SLOW_CONSUMER", "drop"),
            ("HEADER_bad name", "v"),
            ("HEADER_X", "line\nbreak"),
        ] {
            let e = parse(&[], &[(key, value)]).expect_err(key);
            assert_eq!(e.key.to_ascii_uppercase(), key.to_ascii_uppercase(), "{e}");
        }
    }

    #[test]
    fn every_numeric_key_has_a_range_and_refuses_values_outside_it() {
        let server_keys = [
            MAX_CONNECTIONS,
            HANDSHAKE_TIMEOUT_SEC,
            MAX_PENDING_HANDSHAKES,
            MAX_HANDSHAKES_PER_ADDRESS,
        ];
        for (key, lo, hi) in RANGES {
            if *key == MAX_INBOUND_BYTES || *key == LEASE_TTL_MS {
                continue; // provider config only
            }
            let mode: &[(&str, &str)] = if server_keys.contains(key) {
                &[("MODE", "server"), ("LISTEN_ADDRESS", "127.0.0.1:1")]
            } else {
                &[]
            };
            let with = |value: String| {
                let mut pairs: Vec<(&str, String)> =
                    mode.iter().map(|(k, v)| (*k, v.to_string())).collect();
                pairs.push((key, value));
                let pairs: Vec<(String, String)> =
                    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                ProviderDefaults::default()
                    .link_settings(&pairs.into_iter().collect(), &HashMap::new())
            };
            let e = with((hi + 1).to_string()).expect_err(key);
            assert_eq!(e.key, *key, "{e}");
            assert!(e.to_string().contains("out of range"), "{e}");
            if *lo > 0 {
                let e = with((lo - 1).to_string()).expect_err(key);
                assert_eq!(e.key, *key, "{e}");
            }
            let top = hi.to_string();
            let mut pairs = vec![(*key, top.as_str())];
            pairs.extend_from_slice(mode);
            if *key == RECONNECT_MIN_MS {
                pairs.push((RECONNECT_MAX_MS, "86400000"));
            }
            parse(&[], &pairs)
                .expect("the top of the range is fine")
                .build_runtime_objects();
        }
        for (key, value) in [
            (SEND_QUEUE_LEN, "2305843009213693951"),
            (PING_INTERVAL_SEC, "18446744073709551615"),
            (PONG_TIMEOUT_SEC, "18446744073709551614"),
        ] {
            let e = parse(&[], &[(key, value)]).expect_err(key);
            assert_eq!(e.key, key, "{e}");
        }
    }
}

#[cfg(test)]
mod robustness {
    //! Randomized config maps (fixed seed): every one parses or is refused with an error that
    //! names a key; none panics.
    use super::*;

    #[test]
    fn arbitrary_config_never_panics() {
        let keys = [
            URI,
            AUTH_TOKEN,
            CONNECT_TIMEOUT_SEC,
            ENABLE_SESSION_TRACKING,
            "HEADER_X",
            "HEADER_",
            SUBJECT,
            FRAME_TYPE,
            FORMAT,
            MODE,
            LISTEN_ADDRESS,
            PATH,
            MAX_CONNECTIONS,
            TLS_CERT_FILE,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            MAX_MESSAGE_BYTES,
            SEND_QUEUE_LEN,
            MAX_IN_FLIGHT,
            PING_INTERVAL_SEC,
            PONG_TIMEOUT_SEC,
            IDLE_TIMEOUT_SEC,
            WRITE_TIMEOUT_MS,
            PUBLISH_WAIT_MS,
            HANDLER_TIMEOUT_MS,
            FANOUT_TIMEOUT_MS,
            HANDLER_WAIT_MS,
            SLOW_CONSUMER,
            "unknown",
        ];
        let values = [
            "",
            " ",
            "0",
            "1",
            "-1",
            "18446744073709551616",
            "18446744073709551615",
            "2305843009213693951",
            "86400",
            "true",
            "maybe",
            "ws://127.0.0.1:1",
            "wss://[::1]:9/x",
            "ws://",
            "http://x",
            "server",
            "client",
            "json",
            "text",
            "close",
            "127.0.0.1:0",
            "/ok",
            "a\nb",
            "é",
            "\u{0}",
        ];
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20_000 {
            let mut map = HashMap::new();
            for _ in 0..rng.usize(0..6) {
                map.insert(
                    keys[rng.usize(0..keys.len())].to_string(),
                    values[rng.usize(0..values.len())].to_string(),
                );
            }
            match ProviderDefaults::default().link_settings(&map, &HashMap::new()) {
                Ok(settings) => settings.build_runtime_objects(),
                Err(e) => assert!(!e.key.is_empty(), "{e}"),
            }
        }
    }
}
