//! Typed configuration for one link.
//!
//! Provider-level config (named config given when the provider starts) supplies defaults, and the
//! link's own config overrides them. Keys are case-insensitive. `AUTH_TOKEN` is read from secrets
//! first (link secrets, then provider secrets); taking it from plain config works but logs a
//! warning. Parsing is pure: a bad value is a [`ConfigError`] naming the key, never a panic, and
//! secrets never appear in `Debug` output or errors.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use tracing::warn;

pub const URI: &str = "URI";
pub const AUTH_TOKEN: &str = "AUTH_TOKEN";
pub const CONNECT_TIMEOUT_SEC: &str = "CONNECT_TIMEOUT_SEC";
pub const ENABLE_SESSION_TRACKING: &str = "ENABLE_SESSION_TRACKING";
pub const HEADER_PREFIX: &str = "HEADER_";
pub const SUBJECT: &str = "SUBJECT";
pub const FRAME_TYPE: &str = "FRAME_TYPE";
pub const FORMAT: &str = "FORMAT";
pub const MODE: &str = "MODE";
pub const LISTEN_ADDRESS: &str = "LISTEN_ADDRESS";
pub const PATH: &str = "PATH";
pub const ALLOWED_ORIGINS: &str = "ALLOWED_ORIGINS";
pub const MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
pub const SUBPROTOCOLS: &str = "SUBPROTOCOLS";
pub const TLS_CERT_FILE: &str = "TLS_CERT_FILE";
pub const TLS_KEY_FILE: &str = "TLS_KEY_FILE";
pub const LIFECYCLE_EVENTS: &str = "LIFECYCLE_EVENTS";
pub const SESSION_HEADERS: &str = "SESSION_HEADERS";
pub const PING_INTERVAL_SEC: &str = "PING_INTERVAL_SEC";
pub const PONG_TIMEOUT_SEC: &str = "PONG_TIMEOUT_SEC";
pub const IDLE_TIMEOUT_SEC: &str = "IDLE_TIMEOUT_SEC";
pub const PUBLISH_WAIT_MS: &str = "PUBLISH_WAIT_MS";
pub const SLOW_CONSUMER: &str = "SLOW_CONSUMER";
pub const WRITE_TIMEOUT_MS: &str = "WRITE_TIMEOUT_MS";
pub const HANDLER_TIMEOUT_MS: &str = "HANDLER_TIMEOUT_MS";
pub const RECONNECT_MIN_MS: &str = "RECONNECT_MIN_MS";
pub const RECONNECT_MAX_MS: &str = "RECONNECT_MAX_MS";
pub const MAX_MESSAGE_BYTES: &str = "MAX_MESSAGE_BYTES";
pub const SEND_QUEUE_LEN: &str = "SEND_QUEUE_LEN";
pub const MAX_IN_FLIGHT: &str = "MAX_IN_FLIGHT";
pub const FANOUT_TIMEOUT_MS: &str = "FANOUT_TIMEOUT_MS";
pub const HANDLER_WAIT_MS: &str = "HANDLER_WAIT_MS";
/// Provider config only: the provider-wide budget of inbound bytes waiting for components.
pub const MAX_INBOUND_BYTES: &str = "MAX_INBOUND_BYTES";
pub const HANDSHAKE_TIMEOUT_SEC: &str = "HANDSHAKE_TIMEOUT_SEC";
pub const MAX_PENDING_HANDSHAKES: &str = "MAX_PENDING_HANDSHAKES";
pub const MAX_HANDSHAKES_PER_ADDRESS: &str = "MAX_HANDSHAKES_PER_ADDRESS";

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

/// A secret string whose `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

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

/// What a server-mode link listens with (`MODE=server`).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    pub listen_address: std::net::SocketAddr,
    /// The request path clients must use.
    pub path: String,
    /// Allowed `Origin` values; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
    pub max_connections: usize,
    /// Subprotocols the server accepts, in order of preference.
    pub subprotocols: Vec<String>,
    /// PEM certificate chain and private key for `wss://`.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Deliver `ws.lifecycle.connected` / `ws.lifecycle.disconnected` messages.
    pub lifecycle_events: bool,
    /// Request headers (lower-case names) kept in session info.
    pub session_headers: Vec<String>,
    /// One deadline for a client's TLS handshake and HTTP upgrade together, from TCP accept.
    pub handshake_timeout: Duration,
    /// Connections accepted but not yet admitted; when full, the oldest one is dropped.
    pub max_pending_handshakes: usize,
    /// Pending handshakes from one remote IP; a connection beyond it is closed at once.
    pub max_handshakes_per_address: usize,
}

/// Default of `HANDSHAKE_TIMEOUT_SEC`; range 1..=300.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `MAX_PENDING_HANDSHAKES`; range 1..=65536.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 256;
/// Default of `MAX_HANDSHAKES_PER_ADDRESS`; range 1..=65536.
pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

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

/// The parts of a link's settings that identify a socket: links of one component whose
/// endpoints are equal share one connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub uri: String,
    pub auth_token: Option<Secret>,
    /// Extra upgrade-request headers, sorted by lower-cased name.
    pub headers: BTreeMap<String, String>,
}

/// Everything one link's config says, after defaults and overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSettings {
    pub endpoint: Endpoint,
    /// True when the link's own config (not the provider default) named `URI`.
    pub uri_set_on_link: bool,
    pub connect_timeout: Duration,
    pub session_tracking: bool,
    /// Subject given to inbound messages; `None` means the default `ws.<link name>`.
    pub subject: Option<String>,
    pub frame_type: FrameType,
    pub format: Format,
    pub handler_timeout: Duration,
    /// `handle-message` calls one session may have running at once.
    pub max_in_flight: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub max_message_bytes: usize,
    pub send_queue_len: usize,
    /// Set when `MODE=server`: the link listens instead of connecting.
    pub server: Option<ServerSettings>,
    pub keepalive: Keepalive,
    /// How long a publish waits for a disconnected client connection to come back.
    pub publish_wait: Duration,
    /// What to do with a peer that does not read: `true` closes it, `false` fails publishes.
    pub close_slow_consumers: bool,
    /// How long a publish waits for its frame to be written before the peer counts as slow.
    pub write_timeout: Duration,
    /// One deadline for a whole fan-out made on this (consumer) link.
    pub fanout_timeout: Duration,
    /// How long a socket without a handler link waits, unread, for one.
    pub handler_wait: Duration,
}

impl LinkSettings {
    /// Builds what the provider builds from these settings when it opens the link's sockets
    /// (the send queue and its waiters, every deadline from now), so tests and the config fuzz
    /// target check that no accepted value can make them panic.
    pub fn build_runtime_objects(&self) {
        let (_queue, _rx) = tokio::sync::mpsc::channel::<()>(self.send_queue_len);
        let _waiting = tokio::sync::Semaphore::new(self.send_queue_len);
        let keepalive = &self.keepalive;
        let dead_after = keepalive.ping_interval.unwrap_or_default() + keepalive.pong_timeout;
        let now = std::time::Instant::now();
        for wait in [
            self.connect_timeout,
            self.handler_timeout,
            self.reconnect_min,
            self.reconnect_max,
            self.publish_wait,
            self.write_timeout,
            self.fanout_timeout,
            self.handler_wait,
            dead_after,
            keepalive.idle_timeout.unwrap_or_default(),
        ] {
            let _deadline = now + wait;
        }
        let _write_buffer = self.max_message_bytes.saturating_mul(4);
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

/// Secrets as strings (the provider converts the SDK's secret values; bytes must be UTF-8).
pub type Secrets = HashMap<String, String>;

fn secret_string(secrets: &Secrets, key: &str) -> Option<String> {
    secrets
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
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
            Some(v) => parse_in_range(MAX_INBOUND_BYTES, v),
        }
    }

    /// Parses the settings of one link: link config over provider config, secrets first.
    pub fn link_settings(
        &self,
        link_config: &HashMap<String, String>,
        link_secrets: &Secrets,
    ) -> Result<LinkSettings, ConfigError> {
        let link = normalize(link_config);
        let mut merged = self.config.clone();
        merged.extend(link.iter().map(|(k, v)| (k.clone(), v.clone())));
        let get = |key: &str| merged.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());

        let uri = get(URI).unwrap_or(DEFAULT_URI).to_string();
        validate_uri(&uri)?;

        // An empty token would admit everyone (server) or send an empty bearer (client).
        let empty_token = merged.get(AUTH_TOKEN).is_some_and(|v| v.trim().is_empty())
            || secret_string(link_secrets, AUTH_TOKEN).is_some_and(|v| v.trim().is_empty())
            || secret_string(&self.secrets, AUTH_TOKEN).is_some_and(|v| v.trim().is_empty());
        if empty_token {
            return Err(err(
                AUTH_TOKEN,
                "is empty: set a token, or remove the key to turn authentication off",
            ));
        }
        let auth_token = match secret_string(link_secrets, AUTH_TOKEN)
            .or_else(|| secret_string(&self.secrets, AUTH_TOKEN))
        {
            Some(token) => Some(token),
            None => {
                let plain = get(AUTH_TOKEN).map(str::to_string);
                if plain.is_some() {
                    warn!("AUTH_TOKEN was read from plain config; prefer passing it as a secret");
                }
                plain
            }
        };
        if let Some(token) = &auth_token {
            validate_header_value(AUTH_TOKEN, token)?;
        }

        let mut headers = BTreeMap::new();
        for (key, value) in &merged {
            if let Some(name) = key.strip_prefix(HEADER_PREFIX) {
                // HTTP header names are case-insensitive; they go out lower-cased.
                let name = name.to_ascii_lowercase();
                if name.is_empty() {
                    return Err(err(key, "header name is empty"));
                }
                validate_header_name(key, &name)?;
                validate_header_value(key, value)?;
                if name == "authorization" && auth_token.is_some() {
                    return Err(err(key, "conflicts with AUTH_TOKEN"));
                }
                headers.insert(name, value.clone());
            }
        }

        let connect_timeout = match get(CONNECT_TIMEOUT_SEC) {
            Some(v) => Duration::from_secs(parse_in_range(CONNECT_TIMEOUT_SEC, v)?),
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let session_tracking = match get(ENABLE_SESSION_TRACKING) {
            Some(v) => parse_bool(ENABLE_SESSION_TRACKING, v)?,
            None => true,
        };
        let frame_type = match get(FRAME_TYPE).map(str::to_ascii_lowercase).as_deref() {
            None | Some("auto") => FrameType::Auto,
            Some("text") => FrameType::Text,
            Some("binary") => FrameType::Binary,
            Some(other) => {
                return Err(err(
                    FRAME_TYPE,
                    format!("expected auto, text or binary, got {other:?}"),
                ))
            }
        };
        let format = match get(FORMAT).map(str::to_ascii_lowercase).as_deref() {
            None | Some("raw") => Format::Raw,
            Some("json") => Format::Json,
            Some(other) => return Err(err(FORMAT, format!("expected raw or json, got {other:?}"))),
        };
        let ms = |key: &str, default: Duration| -> Result<Duration, ConfigError> {
            Ok(match get(key) {
                Some(v) => Duration::from_millis(parse_in_range(key, v)?),
                None => default,
            })
        };
        let handler_timeout = ms(HANDLER_TIMEOUT_MS, DEFAULT_HANDLER_TIMEOUT)?;
        let reconnect_min = ms(RECONNECT_MIN_MS, DEFAULT_RECONNECT_MIN)?;
        let reconnect_max = ms(RECONNECT_MAX_MS, DEFAULT_RECONNECT_MAX)?;
        if reconnect_max < reconnect_min {
            return Err(err(
                RECONNECT_MAX_MS,
                "must not be less than RECONNECT_MIN_MS",
            ));
        }
        let max_message_bytes = match get(MAX_MESSAGE_BYTES) {
            Some(v) => parse_count(MAX_MESSAGE_BYTES, v)?,
            None => DEFAULT_MAX_MESSAGE_BYTES,
        };
        let max_in_flight = match get(MAX_IN_FLIGHT) {
            Some(v) => parse_count(MAX_IN_FLIGHT, v)?,
            None => DEFAULT_MAX_IN_FLIGHT,
        };
        let send_queue_len = match get(SEND_QUEUE_LEN) {
            Some(v) => parse_count(SEND_QUEUE_LEN, v)?,
            None => DEFAULT_SEND_QUEUE_LEN,
        };

        // 0 turns a keepalive timer off.
        let seconds_or_off =
            |key: &str, default: Option<Duration>| -> Result<Option<Duration>, ConfigError> {
                match get(key) {
                    None => Ok(default),
                    Some(v) => match parse_in_range(key, v)? {
                        0 => Ok(None),
                        n => Ok(Some(Duration::from_secs(n))),
                    },
                }
            };
        let keepalive = Keepalive {
            ping_interval: seconds_or_off(PING_INTERVAL_SEC, Some(DEFAULT_PING_INTERVAL))?,
            pong_timeout: match get(PONG_TIMEOUT_SEC) {
                Some(v) => Duration::from_secs(parse_in_range(PONG_TIMEOUT_SEC, v)?),
                None => DEFAULT_PONG_TIMEOUT,
            },
            idle_timeout: seconds_or_off(IDLE_TIMEOUT_SEC, None)?,
        };
        let server = match get(MODE).map(str::to_ascii_lowercase).as_deref() {
            None | Some("client") => None,
            Some("server") => Some(server_settings(&get)?),
            Some(other) => {
                return Err(err(
                    MODE,
                    format!("expected client or server, got {other:?}"),
                ))
            }
        };

        let publish_wait = ms(PUBLISH_WAIT_MS, DEFAULT_PUBLISH_WAIT)?;
        let write_timeout = ms(WRITE_TIMEOUT_MS, DEFAULT_WRITE_TIMEOUT)?;
        let fanout_timeout = ms(FANOUT_TIMEOUT_MS, DEFAULT_FANOUT_TIMEOUT)?;
        let handler_wait = match get(HANDLER_WAIT_MS) {
            Some(v) => Duration::from_millis(parse_in_range(HANDLER_WAIT_MS, v)?),
            None => DEFAULT_HANDLER_WAIT,
        };
        let close_slow_consumers = match get(SLOW_CONSUMER).map(str::to_ascii_lowercase).as_deref()
        {
            None | Some("error") => false,
            Some("close") => true,
            Some(other) => {
                return Err(err(
                    SLOW_CONSUMER,
                    format!("expected error or close, got {other:?}"),
                ))
            }
        };
        Ok(LinkSettings {
            write_timeout,
            fanout_timeout,
            handler_wait,
            close_slow_consumers,
            server,
            keepalive,
            publish_wait,
            endpoint: Endpoint {
                uri,
                auth_token: auth_token.map(Secret::new),
                headers,
            },
            uri_set_on_link: link.get(URI).is_some_and(|v| !v.trim().is_empty()),
            connect_timeout,
            session_tracking,
            subject: get(SUBJECT).map(str::to_string),
            frame_type,
            format,
            handler_timeout,
            max_in_flight,
            reconnect_min,
            reconnect_max,
            max_message_bytes,
            send_queue_len,
        })
    }
}

fn list(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

fn server_settings<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<ServerSettings, ConfigError> {
    let listen_address =
        get(LISTEN_ADDRESS).ok_or_else(|| err(LISTEN_ADDRESS, "is required with MODE=server"))?;
    let listen_address = listen_address.parse().map_err(|_| {
        err(
            LISTEN_ADDRESS,
            format!("{listen_address:?} is not an IP:port address, e.g. 0.0.0.0:8080"),
        )
    })?;
    let path = get(PATH).unwrap_or("/").to_string();
    if !path.starts_with('/') {
        return Err(err(PATH, format!("{path:?} must start with /")));
    }
    let origins = list(get(ALLOWED_ORIGINS));
    let allowed_origins =
        (!origins.is_empty() && !origins.iter().any(|o| o == "*")).then_some(origins);
    let max_connections = match get(MAX_CONNECTIONS) {
        Some(v) => parse_count(MAX_CONNECTIONS, v)?,
        None => DEFAULT_MAX_CONNECTIONS,
    };
    let tls = match (get(TLS_CERT_FILE), get(TLS_KEY_FILE)) {
        (Some(cert), Some(key)) => Some((cert.into(), key.into())),
        (None, None) => None,
        (Some(_), None) => return Err(err(TLS_KEY_FILE, "is required with TLS_CERT_FILE")),
        (None, Some(_)) => return Err(err(TLS_CERT_FILE, "is required with TLS_KEY_FILE")),
    };
    let lifecycle_events = match get(LIFECYCLE_EVENTS) {
        Some(v) => parse_bool(LIFECYCLE_EVENTS, v)?,
        None => false,
    };
    let session_headers = list(Some(
        get(SESSION_HEADERS).unwrap_or(DEFAULT_SESSION_HEADERS),
    ))
    .into_iter()
    .map(|h| h.to_ascii_lowercase())
    .collect();
    let handshake_timeout = Duration::from_secs(server_ranged(
        get,
        HANDSHAKE_TIMEOUT_SEC,
        DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
    )?);
    let max_pending_handshakes = server_ranged(
        get,
        MAX_PENDING_HANDSHAKES,
        DEFAULT_MAX_PENDING_HANDSHAKES as u64,
    )? as usize;
    let max_handshakes_per_address = server_ranged(
        get,
        MAX_HANDSHAKES_PER_ADDRESS,
        DEFAULT_MAX_HANDSHAKES_PER_ADDRESS as u64,
    )? as usize;
    Ok(ServerSettings {
        handshake_timeout,
        max_pending_handshakes,
        max_handshakes_per_address,
        listen_address,
        path,
        allowed_origins,
        max_connections,
        subprotocols: list(get(SUBPROTOCOLS)),
        tls,
        lifecycle_events,
        session_headers,
    })
}

/// A server-mode whole number within its range (see [`RANGES`]), or `default` when unset.
fn server_ranged<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    key: &str,
    default: u64,
) -> Result<u64, ConfigError> {
    match get(key) {
        None => Ok(default),
        Some(value) => parse_in_range(key, value),
    }
}

fn validate_uri(uri: &str) -> Result<(), ConfigError> {
    let shown = redact_uri(uri);
    let parsed: tokio_tungstenite::tungstenite::http::Uri = uri
        .parse()
        .map_err(|_| err(URI, format!("{shown:?} is not a URI")))?;
    match parsed.scheme_str() {
        Some("ws") | Some("wss") => {}
        _ => {
            return Err(err(
                URI,
                format!("{shown:?} must start with ws:// or wss://"),
            ))
        }
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err(err(URI, format!("{shown:?} has no host")));
    }
    Ok(())
}

/// `uri` as logs, health and components may see it: credentials in the user-info part and the
/// whole query (which often carries a token) are replaced by `<redacted>`.
pub fn redact_uri(uri: &str) -> String {
    let (before_query, query) = match uri.split_once('?') {
        Some((b, _)) => (b, true),
        None => (uri.split_once('#').map_or(uri, |(b, _)| b), false),
    };
    let (scheme, rest) = match before_query.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, before_query),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}"),
        None => authority.to_string(),
    };
    let mut shown = String::with_capacity(uri.len());
    if let Some(scheme) = scheme {
        shown.push_str(scheme);
        shown.push_str("://");
    }
    shown.push_str(&authority);
    shown.push_str(path);
    if query {
        shown.push_str("?<redacted>");
    }
    shown
}

impl Endpoint {
    /// The URI without credentials (see [`redact_uri`]).
    pub fn redacted_uri(&self) -> String {
        redact_uri(&self.uri)
    }
}

fn validate_header_name(key: &str, name: &str) -> Result<(), ConfigError> {
    tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| err(key, format!("{name:?} is not a valid header name")))
}

/// Checks a header value without echoing it (it may be a secret).
fn validate_header_value(key: &str, value: &str) -> Result<(), ConfigError> {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_str(value)
        .map(|_| ())
        .map_err(|_| err(key, "value contains characters not allowed in a header"))
}

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
    (MAX_CONNECTIONS, 1, 1_000_000),
    (HANDSHAKE_TIMEOUT_SEC, 1, 300),
    (MAX_PENDING_HANDSHAKES, 1, 65_536),
    (MAX_HANDSHAKES_PER_ADDRESS, 1, 65_536),
];

/// Parses `value` as a whole number within `key`'s range (see [`RANGES`]).
fn parse_in_range(key: &str, value: &str) -> Result<u64, ConfigError> {
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

/// [`parse_in_range`] for a count held in a `usize`.
fn parse_count(key: &str, value: &str) -> Result<usize, ConfigError> {
    usize::try_from(parse_in_range(key, value)?).map_err(|_| err(key, "too large"))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(err(key, format!("{value:?} is not true or false"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(
        provider: &[(&str, &str)],
        link: &[(&str, &str)],
    ) -> Result<LinkSettings, ConfigError> {
        ProviderDefaults::new(&map(provider), &HashMap::new())
            .link_settings(&map(link), &HashMap::new())
    }

    #[test]
    fn defaults_apply_without_config() {
        let s = parse(&[], &[]).expect("defaults parse");
        assert_eq!(s.endpoint.uri, DEFAULT_URI);
        assert!(!s.uri_set_on_link);
        assert_eq!(s.connect_timeout, Duration::from_secs(30));
        assert!(s.session_tracking);
        assert_eq!(s.inbound_subject("chat"), "ws.chat");
        assert_eq!(s.frame_type, FrameType::Auto);
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
        assert_eq!(s.endpoint.uri, "wss://b:2/x");
        assert!(s.uri_set_on_link);
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert!(!s.session_tracking);
        assert_eq!(s.inbound_subject("x"), "in");
    }

    #[test]
    fn headers_keep_their_name_and_tokens_come_from_secrets_first() {
        let mut secrets = HashMap::new();
        secrets.insert("auth_token".to_string(), "from-secret".to_string());
        let s = ProviderDefaults::default()
            .link_settings(
                &map(&[("HEADER_X-Trace", "t1"), ("AUTH_TOKEN", "plain")]),
                &secrets,
            )
            .expect("parse");
        assert_eq!(
            s.endpoint.headers.get("x-trace").map(String::as_str),
            Some("t1")
        );
        assert_eq!(
            s.endpoint.auth_token.as_ref().map(Secret::expose),
            Some("from-secret")
        );
        assert!(!format!("{s:?}").contains("from-secret"));
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
    fn server_mode_settings() {
        let s = parse(
            &[],
            &[
                ("mode", "server"),
                ("listen_address", "127.0.0.1:9000"),
                ("allowed_origins", "https://a.example, https://b.example"),
                ("subprotocols", "chat.v2,chat.v1"),
                ("lifecycle_events", "true"),
            ],
        )
        .expect("parse");
        let server = s.server.expect("server mode");
        assert_eq!(server.listen_address.to_string(), "127.0.0.1:9000");
        assert_eq!(server.path, "/");
        assert_eq!(server.allowed_origins.expect("origins").len(), 2);
        assert_eq!(server.subprotocols, ["chat.v2", "chat.v1"]);
        assert_eq!(server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert!(server.lifecycle_events);
        assert_eq!(server.session_headers, ["origin", "user-agent"]);
        for bad in [
            vec![("MODE", "server")],
            vec![("MODE", "server"), ("LISTEN_ADDRESS", "nowhere")],
            vec![
                ("MODE", "server"),
                ("LISTEN_ADDRESS", "127.0.0.1:1"),
                ("PATH", "x"),
            ],
            vec![
                ("MODE", "server"),
                ("LISTEN_ADDRESS", "127.0.0.1:1"),
                ("TLS_CERT_FILE", "c.pem"),
            ],
            vec![
                ("MODE", "server"),
                ("LISTEN_ADDRESS", "127.0.0.1:1"),
                ("MAX_CONNECTIONS", "0"),
            ],
        ] {
            assert!(parse(&[], &bad).is_err(), "{bad:?}");
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

    #[test]
    fn every_numeric_key_has_a_range_and_refuses_values_outside_it() {
        let server_keys = [
            MAX_CONNECTIONS,
            HANDSHAKE_TIMEOUT_SEC,
            MAX_PENDING_HANDSHAKES,
            MAX_HANDSHAKES_PER_ADDRESS,
        ];
        for (key, lo, hi) in RANGES {
            if *key == MAX_INBOUND_BYTES {
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

    #[test]
    fn an_empty_token_is_refused_wherever_it_comes_from() {
        let e = parse(&[], &[("AUTH_TOKEN", "")]).expect_err("empty in config");
        assert_eq!(e.key, AUTH_TOKEN);
        let e = parse(&[("auth_token", " ")], &[]).expect_err("empty in provider config");
        assert_eq!(e.key, AUTH_TOKEN);
        let mut secrets = HashMap::new();
        secrets.insert("AUTH_TOKEN".to_string(), String::new());
        let e = ProviderDefaults::default()
            .link_settings(&HashMap::new(), &secrets)
            .expect_err("empty secret");
        assert_eq!(e.key, AUTH_TOKEN);
    }

    #[test]
    fn uris_are_shown_without_credentials() {
        assert_eq!(
            redact_uri("wss://user:pa55@example.com:9/x?access_token=t0k"),
            "wss://<redacted>@example.com:9/x?<redacted>"
        );
        assert_eq!(redact_uri("ws://127.0.0.1:1/ws"), "ws://127.0.0.1:1/ws");
        assert_eq!(redact_uri("ws://h?t=1"), "ws://h?<redacted>");
        let e = parse(&[], &[("URI", "http://u:secretpw@h/?k=secretq")]).expect_err("http");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn token_value_never_appears_in_errors() {
        let e = parse(&[], &[("AUTH_TOKEN", "sek\u{7}rit")]).expect_err("bad token");
        assert!(!e.to_string().contains("sekrit"));
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
