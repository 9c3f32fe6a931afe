//! Server mode (`MODE=server`): the address and path to listen on, who is admitted (the token
//! clients must present, allowed origins, subprotocols, connection cap), TLS, lifecycle events,
//! the request headers kept per session, and the bounds on pending handshakes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::keys::*;
use super::secrets::Secret;
use super::{err, ConfigError};

/// What a server-mode link listens with (`MODE=server`).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    pub listen_address: SocketAddr,
    /// The request path clients must use.
    pub path: String,
    /// The token clients must present (`AUTH_TOKEN`); `None` admits clients without one.
    pub auth_token: Option<Secret>,
    /// Allowed `Origin` values; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
    pub max_connections: usize,
    /// Subprotocols the server accepts, in order of preference.
    pub subprotocols: Vec<String>,
    /// PEM certificate chain and private key for `wss://`.
    pub tls: Option<(PathBuf, PathBuf)>,
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

/// Parses the server keys; `auth_token` is the link's `AUTH_TOKEN`, read with the secrets.
pub(super) fn parse(
    values: &Values<'_>,
    auth_token: Option<Secret>,
) -> Result<ServerSettings, ConfigError> {
    let (listen_address, path) = address_and_path(values)?;
    let origins = list(values.get(ALLOWED_ORIGINS));
    let allowed_origins =
        (!origins.is_empty() && !origins.iter().any(|o| o == "*")).then_some(origins);
    let max_connections = values.count(MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS)?;
    let tls = tls(values)?;
    let lifecycle_events = values.flag(LIFECYCLE_EVENTS, false)?;
    let session_headers = list(Some(
        values
            .get(SESSION_HEADERS)
            .unwrap_or(DEFAULT_SESSION_HEADERS),
    ))
    .into_iter()
    .map(|h| h.to_ascii_lowercase())
    .collect();
    Ok(ServerSettings {
        handshake_timeout: values.seconds(HANDSHAKE_TIMEOUT_SEC, DEFAULT_HANDSHAKE_TIMEOUT)?,
        max_pending_handshakes: values
            .count(MAX_PENDING_HANDSHAKES, DEFAULT_MAX_PENDING_HANDSHAKES)?,
        max_handshakes_per_address: values.count(
            MAX_HANDSHAKES_PER_ADDRESS,
            DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
        )?,
        listen_address,
        path,
        auth_token,
        allowed_origins,
        max_connections,
        subprotocols: list(values.get(SUBPROTOCOLS)),
        tls,
        lifecycle_events,
        session_headers,
    })
}

/// `LISTEN_ADDRESS` (required, `IP:port`) and `PATH` (default `/`).
fn address_and_path(values: &Values<'_>) -> Result<(SocketAddr, String), ConfigError> {
    let address = values
        .get(LISTEN_ADDRESS)
        .ok_or_else(|| err(LISTEN_ADDRESS, "is required with MODE=server"))?;
    let address = address.parse().map_err(|_| {
        err(
            LISTEN_ADDRESS,
            format!("{address:?} is not an IP:port address, e.g. 0.0.0.0:8080"),
        )
    })?;
    let path = values.get(PATH).unwrap_or("/").to_string();
    if !path.starts_with('/') {
        return Err(err(PATH, format!("{path:?} must start with /")));
    }
    Ok((address, path))
}

/// `TLS_CERT_FILE` and `TLS_KEY_FILE`: both or neither.
fn tls(values: &Values<'_>) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (values.get(TLS_CERT_FILE), values.get(TLS_KEY_FILE)) {
        (Some(cert), Some(key)) => Ok(Some((cert.into(), key.into()))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(err(TLS_KEY_FILE, "is required with TLS_CERT_FILE")),
        (None, Some(_)) => Err(err(TLS_CERT_FILE, "is required with TLS_KEY_FILE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{map, parse};
    use crate::config::ProviderDefaults;

    fn server(extra: &[(&str, &str)]) -> Result<ServerSettings, ConfigError> {
        let mut pairs = vec![("MODE", "server"), ("LISTEN_ADDRESS", "127.0.0.1:1")];
        pairs.extend_from_slice(extra);
        let s = parse(&[], &pairs)?;
        assert!(s.client().is_none(), "a server link has no client part");
        Ok(s.server().cloned().expect("server mode"))
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
        let server = s.server().expect("server mode");
        assert_eq!(server.listen_address.to_string(), "127.0.0.1:9000");
        assert_eq!(server.path, "/");
        assert_eq!(server.allowed_origins.as_ref().expect("origins").len(), 2);
        assert_eq!(server.subprotocols, ["chat.v2", "chat.v1"]);
        assert_eq!(server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert!(server.lifecycle_events);
        assert_eq!(server.session_headers, ["origin", "user-agent"]);
        assert_eq!(server.auth_token, None);
        assert_eq!(server.tls, None);
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
    fn the_server_token_is_the_one_clients_must_present() {
        let secrets = map(&[("AUTH_TOKEN", "t0k")]);
        let s = ProviderDefaults::default()
            .link_settings(
                &map(&[("MODE", "server"), ("LISTEN_ADDRESS", "127.0.0.1:1")]),
                &secrets,
            )
            .expect("parse");
        let server = s.server().expect("server mode");
        assert_eq!(server.auth_token.as_ref().map(Secret::expose), Some("t0k"));
        assert!(!format!("{s:?}").contains("t0k"));
    }

    #[test]
    fn origins_paths_tls_and_session_headers() {
        let s = server(&[
            ("ALLOWED_ORIGINS", "https://a.example,*"),
            ("PATH", "/ws"),
            ("TLS_CERT_FILE", "c.pem"),
            ("TLS_KEY_FILE", "k.pem"),
            ("SESSION_HEADERS", "X-Room, ,Cookie"),
        ])
        .expect("parse");
        assert_eq!(s.allowed_origins, None, "* allows any origin");
        assert_eq!(s.path, "/ws");
        assert_eq!(s.tls, Some(("c.pem".into(), "k.pem".into())));
        assert_eq!(s.session_headers, ["x-room", "cookie"]);
        let e = server(&[("TLS_KEY_FILE", "k.pem")]).expect_err("key without cert");
        assert_eq!(e.key, TLS_CERT_FILE);
        let e = server(&[("LIFECYCLE_EVENTS", "sometimes")]).expect_err("not a flag");
        assert_eq!(e.key, LIFECYCLE_EVENTS);
        let e = parse(&[], &[("MODE", "server")]).expect_err("no address");
        assert_eq!(
            e.to_string(),
            "invalid config LISTEN_ADDRESS: is required with MODE=server"
        );
    }

    #[test]
    fn handshake_keys_have_defaults_and_ranges() {
        let s = server(&[]).expect("defaults");
        assert_eq!(s.handshake_timeout, Duration::from_secs(10));
        assert_eq!(s.max_pending_handshakes, 256);
        assert_eq!(s.max_handshakes_per_address, 16);
        assert_eq!(s.max_connections, DEFAULT_MAX_CONNECTIONS);
        let s = server(&[
            ("handshake_timeout_sec", "300"),
            ("max_pending_handshakes", "65536"),
            ("max_handshakes_per_address", "1"),
        ])
        .expect("in range");
        assert_eq!(s.handshake_timeout, Duration::from_secs(300));
        assert_eq!(
            (s.max_pending_handshakes, s.max_handshakes_per_address),
            (65_536, 1)
        );
        for (key, bad) in [
            ("HANDSHAKE_TIMEOUT_SEC", "0"),
            ("HANDSHAKE_TIMEOUT_SEC", "301"),
            ("HANDSHAKE_TIMEOUT_SEC", "18446744073709551616"),
            ("MAX_PENDING_HANDSHAKES", "0"),
            ("MAX_PENDING_HANDSHAKES", "65537"),
            ("MAX_HANDSHAKES_PER_ADDRESS", "-1"),
            ("MAX_HANDSHAKES_PER_ADDRESS", "many"),
        ] {
            let e = server(&[(key, bad)]).expect_err(bad);
            assert_eq!(e.key, key, "{e}");
        }
    }
}
