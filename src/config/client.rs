//! Client mode (`MODE=client`, the default): where to connect (`URI`, checked here with plain
//! code as the transport will read it), the upgrade request's `HEADER_*` headers and bearer
//! token, the connect timeout, the reconnect backoff and how long a publish waits for a lost
//! connection to come back.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::keys::*;
use super::secrets::{redact_uri, Secret};
use super::{err, ConfigError};

/// The parts of a link's settings that identify a socket: links of one component whose
/// endpoints are equal share one connection.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub uri: String,
    pub auth_token: Option<Secret>,
    /// Extra upgrade-request headers, sorted by lower-cased name.
    pub headers: BTreeMap<String, String>,
}

impl Endpoint {
    /// The URI without credentials (see [`redact_uri`]).
    pub fn redacted_uri(&self) -> String {
        redact_uri(&self.uri)
    }
}

/// Shows the URI without credentials and the headers by name only (a value may be a secret).
impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("uri", &self.redacted_uri())
            .field("auth_token", &self.auth_token)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a client-mode link connects with.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSettings {
    pub endpoint: Endpoint,
    /// True when the link's own config (not the provider default) named `URI`.
    pub uri_set_on_link: bool,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long a publish waits for a disconnected connection to come back.
    pub publish_wait: Duration,
}

/// Parses the client keys. They are checked in server mode too (a bad value is refused there
/// as well), so a link's config is valid or not whatever its mode.
pub(super) fn parse(
    values: &Values<'_>,
    auth_token: Option<Secret>,
) -> Result<ClientSettings, ConfigError> {
    let uri = values.get(URI).unwrap_or(DEFAULT_URI).to_string();
    validate_uri(&uri)?;
    let headers = headers(values, auth_token.is_some())?;
    let connect_timeout = values.seconds(CONNECT_TIMEOUT_SEC, DEFAULT_CONNECT_TIMEOUT)?;
    let reconnect_min = values.millis(RECONNECT_MIN_MS, DEFAULT_RECONNECT_MIN)?;
    let reconnect_max = values.millis(RECONNECT_MAX_MS, DEFAULT_RECONNECT_MAX)?;
    if reconnect_max < reconnect_min {
        return Err(err(
            RECONNECT_MAX_MS,
            "must not be less than RECONNECT_MIN_MS",
        ));
    }
    Ok(ClientSettings {
        endpoint: Endpoint {
            uri,
            auth_token,
            headers,
        },
        uri_set_on_link: values.set_on_link(URI),
        connect_timeout,
        reconnect_min,
        reconnect_max,
        publish_wait: values.millis(PUBLISH_WAIT_MS, DEFAULT_PUBLISH_WAIT)?,
    })
}

/// The `HEADER_<name>` keys as lower-cased header names and their values.
fn headers(values: &Values<'_>, has_token: bool) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut headers = BTreeMap::new();
    for (key, value) in values.merged {
        let Some(name) = key.strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        // HTTP header names are case-insensitive; they go out lower-cased.
        let name = name.to_ascii_lowercase();
        if name.is_empty() {
            return Err(err(key, "header name is empty"));
        }
        validate_header_name(key, &name)?;
        validate_header_value(key, value)?;
        if name == "authorization" && has_token {
            return Err(err(key, "conflicts with AUTH_TOKEN"));
        }
        headers.insert(name, value.clone());
    }
    Ok(headers)
}

/// The longest header name HTTP implementations take.
const MAX_HEADER_NAME_LEN: usize = (1 << 16) - 1;

/// A header name is a non-empty token (RFC 9110): letters, digits and ``!#$%&'*+-.^_`|~``.
fn validate_header_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let token_char = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN || !name.bytes().all(|b| token_char(&b))
    {
        return Err(err(key, format!("{name:?} is not a valid header name")));
    }
    Ok(())
}

/// Checks a header value without echoing it (it may be a secret): visible characters, spaces
/// and tabs; no other control character.
pub(super) fn validate_header_value(key: &str, value: &str) -> Result<(), ConfigError> {
    if value
        .bytes()
        .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
    {
        Ok(())
    } else {
        Err(err(
            key,
            "value contains characters not allowed in a header",
        ))
    }
}

fn validate_uri(uri: &str) -> Result<(), ConfigError> {
    let shown = redact_uri(uri);
    let parsed = uri::parse(uri).ok_or_else(|| err(URI, format!("{shown:?} is not a URI")))?;
    match parsed.scheme {
        Some("ws") | Some("wss") => {}
        _ => {
            return Err(err(
                URI,
                format!("{shown:?} must start with ws:// or wss://"),
            ))
        }
    }
    if parsed.host.is_none_or(str::is_empty) {
        return Err(err(URI, format!("{shown:?} has no host")));
    }
    Ok(())
}

/// The URI grammar of the HTTP request the transport sends (the `http` crate's `Uri`), so a
/// `URI` accepted here is one the connection can be opened with.
mod uri {
    /// The longest URI accepted.
    const MAX_LEN: usize = u16::MAX as usize - 1;
    /// The longest scheme accepted.
    const MAX_SCHEME_LEN: usize = 64;

    /// What a URI that parses says: its scheme and host, when it has them.
    pub struct Parts<'a> {
        pub scheme: Option<&'a str>,
        pub host: Option<&'a str>,
    }

    const NONE: Parts<'static> = Parts {
        scheme: None,
        host: None,
    };

    /// `None` when `s` is not a URI.
    pub fn parse(s: &str) -> Option<Parts<'_>> {
        let bytes = s.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_LEN {
            return None;
        }
        match bytes {
            [b'/'] | [b'*'] => return Some(NONE),
            [_] => return (authority_end(bytes)? == 1).then_some(NONE),
            [b'/', ..] => return path_and_query(bytes).then_some(NONE),
            _ => {}
        }
        let (scheme, rest) = scheme(s)?;
        let end = authority_end(rest.as_bytes())?;
        let Some(scheme) = scheme else {
            // An authority alone, like `host:port`.
            return (end == rest.len()).then_some(NONE);
        };
        if end == 0 {
            return None;
        }
        let (authority, path) = rest.split_at(end);
        if !path.is_empty() && !path_and_query(path.as_bytes()) {
            return None;
        }
        Some(Parts {
            scheme: Some(scheme),
            host: Some(host(authority)),
        })
    }

    /// Splits off `scheme://`; `None` when the scheme is too long.
    fn scheme(s: &str) -> Option<(Option<&str>, &str)> {
        let bytes = s.as_bytes();
        for (prefix, scheme) in [("http://", "http"), ("https://", "https")] {
            if bytes.len() >= prefix.len()
                && bytes[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            {
                return Some((Some(scheme), &s[prefix.len()..]));
            }
        }
        if bytes.len() > 3 {
            for (i, &b) in bytes.iter().enumerate() {
                if b == b':' {
                    if bytes.len() < i + 3 || &bytes[i + 1..i + 3] != b"//" {
                        break;
                    }
                    if i > MAX_SCHEME_LEN {
                        return None;
                    }
                    return Some((Some(&s[..i]), &s[i + 3..]));
                }
                if !(b.is_ascii_alphanumeric() || b"+-.~".contains(&b)) {
                    break;
                }
            }
        }
        Some((None, s))
    }

    /// Where the authority ends (at the first `/`, `?` or `#`); `None` when it is malformed.
    fn authority_end(s: &[u8]) -> Option<usize> {
        if s.is_empty() {
            return None;
        }
        let (mut colons, mut open, mut close, mut percent) = (0u32, false, false, false);
        let mut end = s.len();
        let mut at = s.len();
        for (i, &b) in s.iter().enumerate() {
            match b {
                b'/' | b'?' | b'#' => {
                    end = i;
                    break;
                }
                b':' if colons >= 8 => return None,
                b':' => colons += 1,
                b'[' if percent || open => return None,
                b'[' => open = true,
                b']' if !open || close => return None,
                b']' | b'@' => {
                    // IPv6 colons and user-info colons are not port colons.
                    if b == b']' {
                        close = true;
                    } else {
                        at = i;
                    }
                    colons = 0;
                    percent = false;
                }
                b'%' => percent = true,
                b if is_authority_char(b) => {}
                _ => return None,
            }
        }
        let bad = open != close || colons > 1 || (end > 0 && at == end - 1) || percent;
        (!bad).then_some(end)
    }

    fn is_authority_char(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!$&'()*+,-.;=_~".contains(&b)
    }

    /// Whether `s` (starting with `/`, `?` or `#`) is a valid path and query.
    fn path_and_query(s: &[u8]) -> bool {
        let path_char = |b: u8| {
            matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E)
                || matches!(b, b'"' | b'{' | b'}' | 0x80..=0xFF)
        };
        let query_char = |b: u8| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E | 0x80..=0xFF);
        let mut i = 0;
        while let Some(&b) = s.get(i) {
            match b {
                b'#' => return true,
                b'?' => break,
                b if path_char(b) => i += 1,
                _ => return false,
            }
        }
        for &b in s.iter().skip(i + 1) {
            match b {
                b'#' => return true,
                b if query_char(b) => {}
                _ => return false,
            }
        }
        true
    }

    /// The host of a valid authority: after the user-info, before the port.
    fn host(authority: &str) -> &str {
        let host_port = authority.rsplit('@').next().unwrap_or(authority);
        if host_port.starts_with('[') {
            host_port.find(']').map_or(host_port, |i| &host_port[..=i])
        } else {
            host_port.split(':').next().unwrap_or(host_port)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::tests::{map, parse};
    use crate::config::ProviderDefaults;

    fn client(link: &[(&str, &str)]) -> Result<ClientSettings, ConfigError> {
        let s = parse(&[], link)?;
        assert!(s.server().is_none(), "a client link has no server part");
        Ok(s.client().cloned().expect("client mode"))
    }

    #[test]
    fn client_defaults_apply_without_config() {
        let c = client(&[]).expect("defaults parse");
        assert_eq!(c.endpoint.uri, DEFAULT_URI);
        assert_eq!(c.endpoint.auth_token, None);
        assert!(c.endpoint.headers.is_empty());
        assert!(!c.uri_set_on_link);
        assert_eq!(c.connect_timeout, Duration::from_secs(30));
        assert_eq!(c.reconnect_min, DEFAULT_RECONNECT_MIN);
        assert_eq!(c.reconnect_max, DEFAULT_RECONNECT_MAX);
        assert_eq!(c.publish_wait, DEFAULT_PUBLISH_WAIT);
    }

    #[test]
    fn client_keys_are_read() {
        let c = client(&[
            ("uri", "wss://example.com/ws"),
            ("connect_timeout_sec", "3"),
            ("reconnect_min_ms", "10"),
            ("reconnect_max_ms", "10"),
            ("publish_wait_ms", "1"),
        ])
        .expect("parse");
        assert!(c.uri_set_on_link);
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(
            (c.reconnect_min, c.reconnect_max),
            (Duration::from_millis(10), Duration::from_millis(10))
        );
        assert_eq!(c.publish_wait, Duration::from_millis(1));
        let e = client(&[("RECONNECT_MIN_MS", "20"), ("RECONNECT_MAX_MS", "10")])
            .expect_err("max below min");
        assert_eq!(
            e.to_string(),
            "invalid config RECONNECT_MAX_MS: must not be less than RECONNECT_MIN_MS"
        );
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
        let endpoint = &s.client().expect("client mode").endpoint;
        assert_eq!(
            endpoint.headers.get("x-trace").map(String::as_str),
            Some("t1")
        );
        assert_eq!(
            endpoint.auth_token.as_ref().map(Secret::expose),
            Some("from-secret")
        );
        assert!(!format!("{s:?}").contains("from-secret"));
    }

    #[test]
    fn debug_shows_no_credentials() {
        let c = client(&[
            ("URI", "wss://user:pw0rd@example.com/?access_token=qu3ry"),
            ("HEADER_X-Api-Key", "k3y"),
            ("AUTH_TOKEN", "t0k"),
        ])
        .expect("parse");
        let shown = format!("{c:?}");
        for secret in ["pw0rd", "qu3ry", "k3y", "t0k"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("x-api-key"), "{shown}");
    }

    #[test]
    fn headers_are_checked() {
        for (key, value, reason) in [
            ("HEADER_", "v", "header name is empty"),
            (
                "HEADER_bad name",
                "v",
                "\"bad name\" is not a valid header name",
            ),
            ("HEADER_x:y", "v", "\"x:y\" is not a valid header name"),
            ("HEADER_é", "v", "\"é\" is not a valid header name"),
            (
                "HEADER_X",
                "line\nbreak",
                "value contains characters not allowed in a header",
            ),
            (
                "HEADER_X",
                "del\u{7f}",
                "value contains characters not allowed in a header",
            ),
        ] {
            let e = client(&[(key, value)]).expect_err(key);
            assert_eq!(
                (e.key.as_str(), e.reason.as_str()),
                (key.to_ascii_uppercase().as_str(), reason)
            );
        }
        let c = client(&[
            ("HEADER_X-Odd!#$%&'*+.^_`|~9", "tab\tand é and \"quotes\""),
            ("HEADER_Authorization", "Basic abc"),
        ])
        .expect("valid headers");
        assert_eq!(c.endpoint.headers.len(), 2);
        let e = client(&[("HEADER_Authorization", "Basic abc"), ("AUTH_TOKEN", "t")])
            .expect_err("both");
        assert_eq!(e.reason, "conflicts with AUTH_TOKEN");
        assert!(validate_header_name("K", &"a".repeat(MAX_HEADER_NAME_LEN)).is_ok());
        assert!(validate_header_name("K", &"a".repeat(MAX_HEADER_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn uris_are_checked_as_the_transport_reads_them() {
        const NOT: &str = "is not a URI";
        const SCHEME: &str = "must start with ws:// or wss://";
        const HOST: &str = "has no host";
        for (uri, outcome) in [
            ("ws://127.0.0.1:1", None),
            ("wss://[::1]:9/x", None),
            ("ws://h/p?q=1#frag", None),
            ("ws://u:p@h:1/a%20b?x={}", None),
            ("ws://h/é?é", None),
            ("ws://h#<>", None),
            ("ws://h?/?", None),
            ("ws://", Some(NOT)),
            ("ws:///path", Some(NOT)),
            ("ws://h/a b", Some(NOT)),
            ("ws://h/<", Some(NOT)),
            ("ws://h?\"", Some(NOT)),
            ("ws://h:1:2", Some(NOT)),
            ("ws://[::1", Some(NOT)),
            ("ws://::1]", Some(NOT)),
            ("ws://h@", Some(NOT)),
            ("ws://h%41", Some(NOT)),
            ("ws://u%41@h", None),
            ("ws://é", Some(NOT)),
            ("ws://a:b:c:d:e:f:g:h:i", Some(NOT)),
            ("ws:/x", Some(NOT)),
            ("not a uri", Some(NOT)),
            ("\u{0}", Some(NOT)),
            ("?", Some(NOT)),
            ("http://x", Some(SCHEME)),
            ("HTTPS://x", Some(SCHEME)),
            ("WS://x", Some(SCHEME)),
            ("://x", Some(SCHEME)),
            ("host:80", Some(SCHEME)),
            ("/ok", Some(SCHEME)),
            ("*", Some(SCHEME)),
            ("x", Some(SCHEME)),
            ("ws://:80", Some(HOST)),
            ("ws://u@:80/", Some(HOST)),
        ] {
            let shown = format!("{:?} {}", redact_uri(uri), outcome.unwrap_or_default());
            match (validate_uri(uri), outcome) {
                (Ok(()), None) => {}
                (Err(e), Some(_)) => assert_eq!((e.key.as_str(), e.reason), (URI, shown), "{uri}"),
                (got, _) => panic!("{uri:?}: {got:?}, expected {outcome:?}"),
            }
        }
        let long = format!("ws://h/{}", "a".repeat(65_534 - 7));
        assert!(validate_uri(&long).is_ok());
        assert!(validate_uri(&format!("{long}a")).is_err());
        let scheme = format!("{}://h", "w".repeat(65));
        assert_eq!(
            validate_uri(&scheme).expect_err("long scheme").reason,
            format!("{scheme:?} is not a URI")
        );
    }
}
