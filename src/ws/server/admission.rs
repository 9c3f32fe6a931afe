//! Admission happens during the HTTP upgrade, before a session exists, checked in this order:
//! the request path must match (404), the token must match when one is configured (401;
//! `Authorization: Bearer` or the `access_token` query parameter for browsers, compared in
//! constant time), the `Origin` must be allowed (403), an offered subprotocol must be one we
//! speak (400), and the link must have room (503). The `access_token` query parameter never
//! reaches [`PeerInfo`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};

use super::{
    PeerInfo, Resume, ServerOptions, LAST_SEQ_QUERY_PARAM, RESUME_QUERY_PARAM, TOKEN_QUERY_PARAM,
};
use crate::ws::Token;

/// Releases a connection slot when dropped.
pub(super) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn refuse(status: StatusCode, message: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(message.to_string()));
    *response.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks one upgrade request; on success returns the peer's info, its slot and the response.
#[allow(clippy::result_large_err)]
pub(super) fn admit(
    request: &Request,
    mut response: Response,
    addr: SocketAddr,
    options: &ServerOptions,
    active: &Arc<AtomicUsize>,
) -> Result<(PeerInfo, Slot, Response), ErrorResponse> {
    let uri = request.uri();
    if uri.path() != options.path {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "no WebSocket endpoint at this path",
        ));
    }
    if let Some(token) = &options.token {
        check_token(request, token)?;
    }
    if let Some(allowed) = &options.allowed_origins {
        check_origin(request, allowed)?;
    }
    let subprotocol = choose_subprotocol(request, &mut response, &options.subprotocols)?;
    let resume = match options.resume {
        true => resume(uri.query())?,
        false => None,
    };
    let slot = take_slot(active, options.max_connections)?;
    let peer = PeerInfo {
        addr,
        resume,
        path: uri.path().to_string(),
        query: strip_token(uri.query(), options.resume),
        headers: session_headers(request, &options.session_headers),
        subprotocol,
    };
    Ok((peer, slot, response))
}

/// 401 unless the request presents `token`: `Authorization: Bearer`, or else the
/// `access_token` query parameter; compared in constant time.
#[allow(clippy::result_large_err)]
fn check_token(request: &Request, token: &Token) -> Result<(), ErrorResponse> {
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let from_query = request.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == TOKEN_QUERY_PARAM)
            .map(|(_, v)| v.into_owned())
    });
    let presented = from_header.or(from_query).unwrap_or_default();
    if !constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "missing or wrong token"));
    }
    Ok(())
}

/// The `resume` and `last_seq` query parameters (a client resuming its session); 400 when
/// `last_seq` is not a whole number or comes without `resume`.
#[allow(clippy::result_large_err)]
fn resume(query: Option<&str>) -> Result<Option<Resume>, ErrorResponse> {
    let Some(query) = query else {
        return Ok(None);
    };
    let (mut token, mut last_seq) = (None, None);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == RESUME_QUERY_PARAM {
            token = Some(v.into_owned());
        } else if k == LAST_SEQ_QUERY_PARAM {
            last_seq = Some(v.parse::<u64>().map_err(|_| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "last_seq must be a whole number (the last seq the client saw)",
                )
            })?);
        }
    }
    match (token, last_seq) {
        (Some(token), last_seq) => Ok(Some(Resume {
            token,
            last_seq: last_seq.unwrap_or(0),
        })),
        (None, Some(_)) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "last_seq needs resume (the resume token)",
        )),
        (None, None) => Ok(None),
    }
}

/// 403 unless the request's `Origin` (none counts as empty) is one of `allowed`.
#[allow(clippy::result_large_err)]
fn check_origin(request: &Request, allowed: &[String]) -> Result<(), ErrorResponse> {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !allowed.iter().any(|a| a == origin) {
        return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    Ok(())
}

/// The first of `ours` (in our order of preference) that the request offers, set on the
/// response; `None` when we speak none or the client offered none; 400 when it offered only
/// others.
#[allow(clippy::result_large_err)]
fn choose_subprotocol(
    request: &Request,
    response: &mut Response,
    ours: &[String],
) -> Result<Option<String>, ErrorResponse> {
    if ours.is_empty() {
        return Ok(None);
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let chosen = ours
        .iter()
        .find(|ours| offered.contains(&ours.as_str()))
        .cloned();
    match (&chosen, offered.is_empty()) {
        (Some(p), _) => {
            let value = HeaderValue::from_str(p)
                .map_err(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "bad subprotocol"))?;
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
        (None, false) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "none of the offered subprotocols is supported",
            ))
        }
        (None, true) => {}
    }
    Ok(chosen)
}

/// Takes one of `max_connections` slots; 503 when all are taken.
#[allow(clippy::result_large_err)]
fn take_slot(active: &Arc<AtomicUsize>, max_connections: usize) -> Result<Slot, ErrorResponse> {
    let previous = active.fetch_add(1, Ordering::AcqRel);
    let slot = Slot(Arc::clone(active));
    if previous >= max_connections {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections",
        ));
    }
    Ok(slot)
}

/// The configured session headers (lower-case names) that the request carries.
fn session_headers(request: &Request, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|name| {
            request
                .headers()
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(|v| (name.clone(), v.to_string()))
        })
        .collect()
}

/// The query string without the `access_token` parameter (and, on a link with recovery, the
/// `resume` and `last_seq` parameters): the other parameters in order, re-encoded, or `None`
/// when nothing else is left. A query without them is kept as is.
fn strip_token(query: Option<&str>, resume: bool) -> Option<String> {
    let query = query?;
    let pairs = form_urlencoded::parse(query.as_bytes());
    let ours = |k: &str| {
        k == TOKEN_QUERY_PARAM || (resume && (k == RESUME_QUERY_PARAM || k == LAST_SEQ_QUERY_PARAM))
    };
    if !pairs.clone().any(|(k, _)| ours(&k)) {
        return Some(query.to_string());
    }
    let kept: Vec<_> = pairs.filter(|(k, _)| !ours(k)).collect();
    if kept.is_empty() {
        return None;
    }
    Some(
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(kept)
            .finish(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::ws::socket::Keepalive;

    fn options() -> ServerOptions {
        ServerOptions {
            listen_address: "127.0.0.1:0".parse().expect("addr"),
            path: "/ws".into(),
            token: Some(Token::new("t0k")),
            allowed_origins: Some(vec!["https://ok.example".into()]),
            max_connections: 1,
            subprotocols: vec!["v2".into(), "v1".into()],
            tls: None,
            session_headers: vec!["user-agent".into()],
            handshake_timeout: Duration::from_secs(1),
            max_pending_handshakes: 4,
            max_handshakes_per_address: 2,
            max_message_bytes: 1024,
            keepalive: Keepalive::default(),
            resume: false,
        }
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request")
    }

    fn status(result: Result<(PeerInfo, Slot, Response), ErrorResponse>) -> u16 {
        match result {
            Ok(_) => 101,
            Err(e) => e.status().as_u16(),
        }
    }

    #[test]
    fn admission_checks_path_token_origin_subprotocol_and_capacity() {
        let o = options();
        let addr = "127.0.0.1:1".parse().expect("addr");
        let active = Arc::new(AtomicUsize::new(0));
        let good = [
            ("origin", "https://ok.example"),
            ("authorization", "Bearer t0k"),
        ];
        let check = |uri: &str, headers: &[(&str, &str)]| {
            status(admit(
                &request(uri, headers),
                Response::default(),
                addr,
                &o,
                &active,
            ))
        };
        assert_eq!(check("/other", &good), 404);
        assert_eq!(check("/ws", &[("origin", "https://ok.example")]), 401);
        assert_eq!(
            check(
                "/ws",
                &[
                    ("origin", "https://ok.example"),
                    ("authorization", "Bearer nope")
                ]
            ),
            401
        );
        assert_eq!(
            check(
                "/ws",
                &[
                    ("authorization", "Bearer t0k"),
                    ("origin", "https://evil.example")
                ]
            ),
            403
        );
        assert_eq!(
            check("/ws", &[good[0], good[1], ("sec-websocket-protocol", "v9")]),
            400
        );
        assert_eq!(check("/ws?access_token=t0k", &[good[0]]), 101);

        let (peer, slot, response) = admit(
            &request(
                "/ws?x=1",
                &[
                    good[0],
                    good[1],
                    ("sec-websocket-protocol", "v1, v2"),
                    ("user-agent", "ua"),
                ],
            ),
            Response::default(),
            addr,
            &o,
            &active,
        )
        .expect("admitted");
        assert_eq!(peer.subprotocol.as_deref(), Some("v2"));
        assert_eq!(response.headers()["sec-websocket-protocol"], "v2");
        assert_eq!(peer.query.as_deref(), Some("x=1"));
        assert_eq!(peer.headers, [("user-agent".to_string(), "ua".to_string())]);
        // The one slot is taken: the next client is turned away until it is released.
        assert_eq!(check("/ws", &good), 503);
        drop(slot);
        assert_eq!(check("/ws", &good), 101);
    }

    #[test]
    fn resume_parameters_are_read_checked_and_kept_from_the_query() {
        assert_eq!(resume(None).ok(), Some(None));
        assert_eq!(resume(Some("room=7")).ok(), Some(None));
        assert_eq!(
            resume(Some("resume=tok-1&last_seq=42&room=7")).ok(),
            Some(Some(Resume {
                token: "tok-1".into(),
                last_seq: 42
            }))
        );
        assert_eq!(
            resume(Some("resume=tok-1")).ok(),
            Some(Some(Resume {
                token: "tok-1".into(),
                last_seq: 0
            }))
        );
        for bad in ["resume=t&last_seq=-1", "resume=t&last_seq=x", "last_seq=3"] {
            let refused = resume(Some(bad)).expect_err(bad);
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            strip_token(Some("resume=tok&last_seq=3&room=7"), true).as_deref(),
            Some("room=7")
        );
        // Without recovery on the link they are the application's own parameters.
        assert_eq!(
            strip_token(Some("resume=tok&last_seq=3&room=7"), false).as_deref(),
            Some("resume=tok&last_seq=3&room=7")
        );
        assert!(!format!(
            "{:?}",
            Resume {
                token: "s3cret".into(),
                last_seq: 1
            }
        )
        .contains("s3cret"));
    }

    #[test]
    fn the_access_token_never_reaches_the_query() {
        assert_eq!(
            strip_token(Some("access_token=t0k&room=7"), false).as_deref(),
            Some("room=7")
        );
        assert_eq!(
            strip_token(
                Some("a=1&access_token=t0k&b=x%20y&access_token=again"),
                false
            )
            .as_deref(),
            Some("a=1&b=x+y")
        );
        // An encoded name is still the token parameter (admission decodes it the same way).
        assert_eq!(
            strip_token(Some("access%5Ftoken=t0k&z=1"), false).as_deref(),
            Some("z=1")
        );
        assert_eq!(strip_token(Some("access_token=t0k"), false), None);
        assert_eq!(strip_token(Some("access_token="), false), None);
        assert_eq!(strip_token(None, false), None);
        // Without the parameter the query is kept exactly as sent.
        assert_eq!(
            strip_token(Some("flag&x=%41"), false).as_deref(),
            Some("flag&x=%41")
        );
        assert_eq!(
            strip_token(Some("access_tokens=1"), false).as_deref(),
            Some("access_tokens=1")
        );

        let o = options();
        let (peer, _slot, _) = admit(
            &request(
                "/ws?room=7&access_token=t0k",
                &[("origin", "https://ok.example")],
            ),
            Response::default(),
            "127.0.0.1:1".parse().expect("addr"),
            &o,
            &Arc::new(AtomicUsize::new(0)),
        )
        .expect("admitted with the query token");
        assert_eq!(peer.query.as_deref(), Some("room=7"));
    }

    #[test]
    fn token_comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
