//! Resume tokens: what a client presents to get its session back after a reconnect.
//!
//! A token names a session, the link it belongs to and the connection it was issued to (a
//! generation counted per session), and carries an HMAC-SHA256 tag under a key that this
//! provider process drew at random: it cannot be forged, nor moved to another session or link.
//! The session keeps the generation of its newest token; an older one (already used for a
//! resume) is refused. A token expires with its session's resume window (`HISTORY_TTL_SEC` after
//! its socket dropped), which the session record, not the token, keeps.

use base64::Engine as _;
use ring::hmac;
use uuid::Uuid;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Bytes of a token before its tag: session (16), link tag (8), generation (4).
const BODY: usize = 28;
/// Bytes of the tag kept (of SHA-256's 32).
const TAG: usize = 16;

/// The key tokens are signed with, drawn once per provider process.
pub struct Tokens {
    key: hmac::Key,
}

/// What a valid token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub session: Uuid,
    pub generation: u32,
}

impl Tokens {
    /// A new random key; an error only when the system has no randomness to give.
    pub fn new() -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| "no randomness for the resume token key".to_string())?;
        Ok(Self { key })
    }

    /// The token of connection `generation` of `session` on the link tagged `link`.
    pub fn issue(&self, session: Uuid, link: [u8; 8], generation: u32) -> String {
        let mut bytes = Vec::with_capacity(BODY + TAG);
        bytes.extend_from_slice(session.as_bytes());
        bytes.extend_from_slice(&link);
        bytes.extend_from_slice(&generation.to_be_bytes());
        let tag = hmac::sign(&self.key, &bytes);
        bytes.extend_from_slice(&tag.as_ref()[..TAG]);
        B64.encode(bytes)
    }

    /// What `token` says, if this process issued it for the link tagged `link`. The error says
    /// why not, never what the token held.
    pub fn verify(&self, token: &str, link: [u8; 8]) -> Result<Claims, &'static str> {
        let bytes = B64
            .decode(token.as_bytes())
            .map_err(|_| "the resume token is not valid")?;
        if bytes.len() != BODY + TAG {
            return Err("the resume token is not valid");
        }
        let (body, tag) = bytes.split_at(BODY);
        let expected = hmac::sign(&self.key, body);
        // Constant time: ring's verify compares the whole tag; compare our truncated one so.
        if !constant_time_eq(&expected.as_ref()[..TAG], tag) {
            return Err("the resume token is not valid (not issued by this provider, or altered)");
        }
        if body[16..24] != link {
            return Err("the resume token belongs to another link");
        }
        let session = Uuid::from_slice(&body[..16]).map_err(|_| "the resume token is not valid")?;
        let mut generation = [0u8; 4];
        generation.copy_from_slice(&body[24..28]);
        Ok(Claims {
            session,
            generation: u32::from_be_bytes(generation),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The 8-byte tag of a link: (component, link name) hashed, so a token of one link is refused
/// by another.
pub fn link_tag(component: &str, link_name: &str) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(component.as_bytes());
    ctx.update(&[0]);
    ctx.update(link_name.as_bytes());
    let digest = ctx.finish();
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&digest.as_ref()[..8]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_forgery_other_links_and_other_keys() {
        let tokens = Tokens::new().expect("key");
        let (a, b) = (link_tag("c", "a"), link_tag("c", "b"));
        let id = Uuid::new_v4();
        let token = tokens.issue(id, a, 7);
        assert_eq!(
            tokens.verify(&token, a),
            Ok(Claims {
                session: id,
                generation: 7
            })
        );
        assert!(tokens.verify(&token, b).is_err(), "another link");
        assert!(
            Tokens::new().expect("key").verify(&token, a).is_err(),
            "another key"
        );
        // Any altered byte is refused.
        let mut bytes = B64.decode(token.as_bytes()).expect("b64");
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            assert!(tokens.verify(&B64.encode(&bytes), a).is_err(), "byte {i}");
            bytes[i] ^= 1;
        }
        for junk in ["", "x", "!!!", &"A".repeat(59), &token[..token.len() - 1]] {
            assert!(tokens.verify(junk, a).is_err(), "{junk:?}");
        }
        assert_ne!(link_tag("ca", "b"), link_tag("c", "ab"));
    }
}
