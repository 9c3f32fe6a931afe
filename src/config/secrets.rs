//! Secrets: the [`Secret`] type (never shown by `Debug`), looking up `AUTH_TOKEN` (link secrets,
//! then provider secrets, then plain config with a warning), and [`redact_uri`], which removes
//! credentials from a URI before logs, health or components see it.

use std::collections::HashMap;
use std::fmt;

use tracing::warn;

use super::keys::{Values, AUTH_TOKEN};
use super::{err, ConfigError};

/// A secret string whose `Debug` never shows the value.
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

/// Secrets as strings (the provider converts the SDK's secret values; bytes must be UTF-8).
pub type Secrets = HashMap<String, String>;

/// The secret called `key`, whatever the case of its name.
fn secret_string(secrets: &Secrets, key: &str) -> Option<String> {
    secrets
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
}

/// `AUTH_TOKEN` from the link's secrets, then the provider's, then plain config (which logs a
/// warning). An empty token anywhere is refused: it would admit everyone (server) or send an
/// empty bearer (client). The value must fit in a header; errors never echo it.
pub(super) fn auth_token(
    values: &Values<'_>,
    link_secrets: &Secrets,
    provider_secrets: &Secrets,
) -> Result<Option<Secret>, ConfigError> {
    let from_link = secret_string(link_secrets, AUTH_TOKEN);
    let from_provider = secret_string(provider_secrets, AUTH_TOKEN);
    let is_empty = |v: &Option<String>| v.as_deref().is_some_and(|v| v.trim().is_empty());
    let empty_in_config = values
        .merged
        .get(AUTH_TOKEN)
        .is_some_and(|v| v.trim().is_empty());
    if empty_in_config || is_empty(&from_link) || is_empty(&from_provider) {
        return Err(err(
            AUTH_TOKEN,
            "is empty: set a token, or remove the key to turn authentication off",
        ));
    }
    let token = match from_link.or(from_provider) {
        Some(token) => Some(token),
        None => {
            let plain = values.get(AUTH_TOKEN).map(str::to_string);
            if plain.is_some() {
                warn!("AUTH_TOKEN was read from plain config; prefer passing it as a secret");
            }
            plain
        }
    };
    if let Some(token) = &token {
        super::client::validate_header_value(AUTH_TOKEN, token)?;
    }
    Ok(token.map(Secret::new))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{map, parse};
    use crate::config::ProviderDefaults;

    #[test]
    fn secrets_never_show_in_debug() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn link_secrets_come_before_provider_secrets_and_plain_config() {
        let provider_secrets = map(&[("AUTH_TOKEN", "from-provider")]);
        let defaults = ProviderDefaults::new(&HashMap::new(), &provider_secrets);
        let token = |link: &[(&str, &str)], secrets: &[(&str, &str)]| {
            let s = defaults
                .link_settings(&map(link), &map(secrets))
                .expect("parse");
            let token = s.client().and_then(|c| c.endpoint.auth_token.clone());
            token.map(|t| t.expose().to_string())
        };
        assert_eq!(
            token(&[("AUTH_TOKEN", "plain")], &[("Auth_Token", "from-link")]).as_deref(),
            Some("from-link")
        );
        assert_eq!(
            token(&[("AUTH_TOKEN", "plain")], &[]).as_deref(),
            Some("from-provider")
        );
        let plain = parse(&[], &[("auth_token", "plain")]).expect("plain config works");
        let plain = plain.client().and_then(|c| c.endpoint.auth_token.clone());
        assert_eq!(plain.as_ref().map(Secret::expose), Some("plain"));
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
        let e = ProviderDefaults::new(&HashMap::new(), &secrets)
            .link_settings(&HashMap::new(), &HashMap::new())
            .expect_err("empty provider secret");
        assert_eq!(e.key, AUTH_TOKEN);
    }

    #[test]
    fn token_value_never_appears_in_errors() {
        let e = parse(&[], &[("AUTH_TOKEN", "sek\u{7}rit")]).expect_err("bad token");
        assert!(!e.to_string().contains("sekrit"));
    }

    #[test]
    fn uris_are_shown_without_credentials() {
        assert_eq!(
            redact_uri("wss://user:pa55@example.com:9/x?access_token=t0k"),
            "wss://<redacted>@example.com:9/x?<redacted>"
        );
        assert_eq!(redact_uri("ws://127.0.0.1:1/ws"), "ws://127.0.0.1:1/ws");
        assert_eq!(redact_uri("ws://h?t=1"), "ws://h?<redacted>");
        assert_eq!(redact_uri("ws://h/p#frag"), "ws://h/p");
        let e = parse(&[], &[("URI", "http://u:secretpw@h/?k=secretq")]).expect_err("http");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
