//! Where a component's publish goes: a pure function over what the link table holds for the
//! caller, unit-tested here without a host (one test per row of the README's publish rules).
//!
//! The provider gathers a [`CallerLinks`] under its link-table lock and resolves the
//! [`Destination`] to sessions: a named session through the registry (which checks the
//! owner), a server link's clients through the registry, a connection as it is.

use uuid::Uuid;

use crate::session::parse_session_subject;

/// What the link table holds for one caller (a component calling on one of its links). `S` is
/// the handle of a client connection's session (`Arc<Session>` in the provider).
#[derive(Debug)]
pub struct CallerLinks<'a, S> {
    /// The caller's server-mode links: (link name, the subject that names all its clients).
    pub server_links: Vec<(&'a str, &'a str)>,
    /// The own connection of the consumer link called on, when its config set `URI`.
    pub consumer_connection: Option<S>,
    /// The caller's client connections (of its handler links), one per socket.
    pub connections: Vec<S>,
}

/// Where one publish goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination<'p, S> {
    /// The session a session subject names (if the caller owns it), with the subject to write
    /// (the peer's own subject after the session part, else the whole subject).
    Session { id: Uuid, subject: &'p str },
    /// Every client of the caller's server link of this name.
    ServerLink(String),
    /// One client connection.
    Connection(S),
}

/// Chooses where `component`'s publish to `subject`, made on its link `link_name`, goes.
///
/// 1. A session subject (`ws.session.<id>[.<peer subject>]`) names that session.
/// 2. The subject of one of the caller's server links names every client of that link (the
///    first link by name, when several share a subject).
/// 3. Otherwise the consumer link's own connection, else the caller's only client connection;
///    none or several are an error that says what to do.
///
/// `links` is asked for only when the subject is not a session subject: replies to a session,
/// the most common publish, need nothing from the link table.
pub fn route<'l, 'p, S>(
    links: impl FnOnce() -> CallerLinks<'l, S>,
    component: &str,
    link_name: &str,
    subject: &'p str,
) -> Result<Destination<'p, S>, String> {
    if let Some(named) = parse_session_subject(subject) {
        return Ok(Destination::Session {
            id: named.id,
            subject: named.peer_subject.unwrap_or(subject),
        });
    }
    let links = links();
    let server_link = links
        .server_links
        .iter()
        .filter(|(_, s)| *s == subject)
        .map(|(link, _)| *link)
        .min();
    if let Some(link) = server_link {
        return Ok(Destination::ServerLink(link.to_string()));
    }
    if let Some(conn) = links.consumer_connection {
        return Ok(Destination::Connection(conn));
    }
    let mut connections = links.connections;
    match connections.len() {
        0 if !links.server_links.is_empty() => Err(format!(
            "subject {subject:?} names no session or server link of {component}: publish to a session subject, or to a server link's subject to reach all its clients"
        )),
        0 => Err(format!(
            "component {component} has no WebSocket connection: link a handler with URI, or set URI on the consumer link {link_name:?}"
        )),
        1 => Ok(Destination::Connection(connections.remove(0))),
        n => Err(format!(
            "component {component} has {n} WebSocket connections; publish to a session subject (the reply_to of an inbound message) to choose one"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0f5c6a2e-8a4b-4f7e-9a56-3f1d2c4b5a69";

    /// A caller with `connections` client connections (named by their link), optionally a
    /// consumer link with its own connection, and server links (link, subject).
    fn links<'a>(
        server_links: &[(&'a str, &'a str)],
        consumer_connection: Option<&'a str>,
        connections: &[&'a str],
    ) -> CallerLinks<'a, &'a str> {
        CallerLinks {
            server_links: server_links.to_vec(),
            consumer_connection,
            connections: connections.to_vec(),
        }
    }

    fn go<'p>(
        links: CallerLinks<'_, &'static str>,
        subject: &'p str,
    ) -> Result<Destination<'p, &'static str>, String> {
        route(|| links, "comp", "default", subject)
    }

    #[test]
    fn a_session_subject_names_that_session_whatever_the_links() {
        let subject = format!("ws.session.{ID}");
        let id = Uuid::parse_str(ID).expect("uuid");
        for table in [
            links(&[], None, &[]),
            links(&[("srv", "ws.srv")], Some("own"), &["a", "b"]),
        ] {
            assert_eq!(
                go(table, &subject),
                Ok(Destination::Session {
                    id,
                    subject: subject.as_str()
                })
            );
        }
    }

    #[test]
    fn a_reply_subject_names_the_session_and_writes_the_peers_own_subject() {
        let subject = format!("ws.session.{ID}.inbox.42");
        assert_eq!(
            go(links(&[], None, &["a"]), &subject),
            Ok(Destination::Session {
                id: Uuid::parse_str(ID).expect("uuid"),
                subject: "inbox.42"
            })
        );
    }

    #[test]
    fn a_malformed_session_subject_is_an_ordinary_subject() {
        let subject = format!("ws.session.{ID}.");
        assert_eq!(
            go(links(&[], None, &["a"]), &subject),
            Ok(Destination::Connection("a"))
        );
    }

    #[test]
    fn a_server_links_subject_names_all_its_clients_first_link_by_name() {
        let table = links(
            &[
                ("zeta", "ws.room"),
                ("alpha", "ws.room"),
                ("other", "ws.other"),
            ],
            Some("own"),
            &["a"],
        );
        assert_eq!(
            go(table, "ws.room"),
            Ok(Destination::ServerLink("alpha".to_string()))
        );
    }

    #[test]
    fn the_consumer_links_own_connection_comes_before_handler_connections() {
        assert_eq!(
            go(links(&[], Some("own"), &["a", "b"]), "anything"),
            Ok(Destination::Connection("own"))
        );
    }

    #[test]
    fn the_only_client_connection_takes_any_other_subject() {
        assert_eq!(
            go(links(&[("srv", "ws.srv")], None, &["a"]), "chat.out"),
            Ok(Destination::Connection("a"))
        );
    }

    #[test]
    fn several_connections_ask_for_a_session_subject() {
        let e = go(links(&[], None, &["a", "b", "c"]), "chat.out").expect_err("ambiguous");
        assert!(e.contains("has 3 WebSocket connections"), "{e}");
        assert!(e.contains("session subject"), "{e}");
    }

    #[test]
    fn no_connection_says_how_to_get_one() {
        let e = go(links(&[], None, &[]), "chat.out").expect_err("nothing");
        assert!(
            e.contains("component comp has no WebSocket connection"),
            "{e}"
        );
        assert!(e.contains("\"default\""), "{e}");
    }

    #[test]
    fn a_server_only_component_is_told_which_subjects_reach_clients() {
        let e = go(links(&[("srv", "ws.srv")], None, &[]), "chat.out").expect_err("nothing");
        assert!(e.contains("names no session or server link of comp"), "{e}");
    }
}
