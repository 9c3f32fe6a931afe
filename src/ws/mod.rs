//! WebSocket transport: sockets, frames, reconnects and listeners. Nothing here knows about
//! wasmCloud or the provider's config: callers hand each part its own options
//! ([`client::ClientOptions`], [`server::ServerOptions`], [`socket::Keepalive`]).

use std::fmt;

pub mod client;
pub mod server;
pub mod socket;

/// An auth token (the one a client sends, or the one a server's clients must present) whose
/// `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_token_never_shows_in_debug() {
        let token = super::Token::new("t0k");
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        assert_eq!(token.expose(), "t0k");
    }
}
