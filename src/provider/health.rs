//! The health text: counts of links, connections and listeners, and one line per link that is
//! not connected or was refused.

use std::sync::Arc;

use super::table::Direction;
use super::WsProvider;
use crate::link::client::ClientSocket;
use crate::ws::socket::ConnState;

impl WsProvider {
    /// Counts of links, connections and listeners, for health reports.
    pub(super) fn summary(&self) -> String {
        let links = self.links();
        let (conns, elsewhere): (Vec<&Arc<ClientSocket>>, Vec<&Arc<ClientSocket>>) = links
            .handlers
            .values()
            .map(|h| &h.conn)
            .chain(links.consumers.values().filter_map(|c| c.conn.as_ref()))
            .partition(|c| c.session.is_here());
        let connected = conns
            .iter()
            .filter(|c| c.session.outbox.is_connected())
            .count();
        let clients: usize = links
            .servers
            .keys()
            .map(|(component, link)| self.server_clients(component, link).len())
            .sum();
        format!(
            "links: {} handler, {} consumer, {} refused; connections: {} connected, {} reconnecting, {} held by another replica; listeners: {} with {} clients",
            links.handlers.len() + links.servers.len(),
            links.consumers.len(),
            links.errors.len(),
            connected,
            conns.len() - connected,
            elsewhere.len(),
            links.servers.len(),
            clients
        )
    }

    /// One line per link that is not connected or was refused; empty when all is well.
    pub(super) fn problems(&self) -> Vec<String> {
        let links = self.links();
        let mut problems: Vec<String> = links
            .errors
            .iter()
            .map(|((dir, (component, link)), e)| {
                format!("{} link {link:?} of {component}: {e}", dir.as_str())
            })
            .collect();
        problems.extend(
            self.inner
                .config_problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|p| format!("provider config: {p}")),
        );
        let conns =
            links
                .handlers
                .iter()
                .map(|(k, h)| (Direction::Handler, k, &h.conn))
                .chain(links.consumers.iter().filter_map(|(k, c)| {
                    c.conn.as_ref().map(|conn| (Direction::Consumer, k, conn))
                }));
        for (dir, (component, link), conn) in conns {
            if !conn.session.is_here() {
                // Another replica holds it (its health reports on it).
                continue;
            }
            match conn.session.outbox.state() {
                ConnState::Connected { .. } => {}
                ConnState::Connecting => problems.push(format!(
                    "{} link {link:?} of {component}: connecting to {}",
                    dir.as_str(),
                    conn.session.remote
                )),
                ConnState::Disconnected { error } => problems.push(format!(
                    "{} link {link:?} of {component}: {error}",
                    dir.as_str()
                )),
            }
        }
        problems.sort();
        problems
    }
}
