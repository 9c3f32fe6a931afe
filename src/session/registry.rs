//! The registry: every live session by ID, and the groups of each component. The only state
//! the wRPC exports and the sockets share. Lookups by ID check the owner, so a component never
//! reaches another's session.

use std::collections::BTreeSet;
use std::sync::Arc;

use dashmap::DashMap;
use uuid::Uuid;

use super::{Mode, Session, SessionInfo};

/// Group limits: name length, and groups one session may be in.
pub const MAX_GROUP_NAME_BYTES: usize = 128;
pub const MAX_GROUPS_PER_SESSION: usize = 64;

/// All live sessions, keyed by ID, and the groups of each component (the registry is their
/// only keeper: a session does not know its groups).
#[derive(Default)]
pub struct Registry {
    sessions: DashMap<Uuid, Arc<Session>>,
    /// (component, group) -> member sessions.
    groups: DashMap<(String, String), BTreeSet<Uuid>>,
    /// session -> the groups it is in.
    memberships: DashMap<Uuid, BTreeSet<String>>,
    /// Told of every session that comes and goes (the lattice's directory: a replica
    /// answers for the sessions it holds).
    observer: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(Uuid, bool)>>,
}

impl Registry {
    pub fn insert(&self, session: Arc<Session>) {
        let id = session.id;
        self.sessions.insert(id, session);
        self.tell(id, true);
    }

    /// Sends `(id, true)` for each session inserted from now on and those already
    /// here, and `(id, false)` for each removed one. Set once.
    pub fn observe(&self, observer: tokio::sync::mpsc::UnboundedSender<(Uuid, bool)>) {
        if self.observer.set(observer).is_ok() {
            for session in self.sessions.iter() {
                self.tell(session.id, true);
            }
        }
    }

    fn tell(&self, id: Uuid, present: bool) {
        if let Some(observer) = self.observer.get() {
            let _ = observer.send((id, present));
        }
    }

    /// Removes `session` if the registry holds this very session (not another handle under the
    /// same ID: a client connection deleted and put again shares its ID).
    pub fn remove_same(&self, session: &Arc<Session>) {
        let same = self
            .sessions
            .get(&session.id)
            .is_some_and(|s| Arc::ptr_eq(s.value(), session));
        if same {
            self.remove(&session.id);
        }
    }

    /// A client-mode session of `component_id`, tracked or not (a publish on a link's own
    /// connection names it by ID between replicas).
    pub fn connection_of(&self, component_id: &str, id: &Uuid) -> Option<Arc<Session>> {
        self.sessions
            .get(id)
            .filter(|s| s.component_id == component_id && s.mode == Mode::Client)
            .map(|s| Arc::clone(s.value()))
    }

    /// Whether session `id` is here, whoever owns it.
    pub fn holds(&self, id: &Uuid) -> bool {
        self.sessions.contains_key(id)
    }

    /// The groups `id` is in, sorted.
    pub fn groups_of(&self, id: &Uuid) -> Vec<String> {
        self.memberships
            .get(id)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Removes a session, and with it its group memberships.
    pub fn remove(&self, id: &Uuid) {
        let Some((_, session)) = self.sessions.remove(id) else {
            return;
        };
        self.tell(*id, false);
        // Requests waiting for this session's peer fail now, not at their timeout.
        session.replies.end_all();
        let groups = self
            .memberships
            .remove(id)
            .map(|(_, groups)| groups)
            .unwrap_or_default();
        for group in groups {
            let key = (session.component_id.clone(), group);
            self.groups.remove_if_mut(&key, |_, members| {
                members.remove(id);
                members.is_empty()
            });
        }
    }

    /// Adds `session` to its component's group `group`.
    pub fn join(&self, session: &Session, group: &str) -> Result<(), String> {
        if group.is_empty() || group.len() > MAX_GROUP_NAME_BYTES {
            return Err(format!(
                "group names must be 1 to {MAX_GROUP_NAME_BYTES} bytes"
            ));
        }
        {
            let mut groups = self.memberships.entry(session.id).or_default();
            if !groups.contains(group) && groups.len() >= MAX_GROUPS_PER_SESSION {
                return Err(format!(
                    "a session may be in at most {MAX_GROUPS_PER_SESSION} groups"
                ));
            }
            groups.insert(group.to_string());
        }
        self.groups
            .entry((session.component_id.clone(), group.to_string()))
            .or_default()
            .insert(session.id);
        // The session may have ended meanwhile: do not leave a dangling member behind.
        if !self.sessions.contains_key(&session.id) {
            self.memberships.remove(&session.id);
            self.remove_member(session, group);
        }
        Ok(())
    }

    /// Removes `session` from its component's group `group` (absent is fine).
    pub fn leave(&self, session: &Session, group: &str) {
        self.memberships.remove_if_mut(&session.id, |_, groups| {
            groups.remove(group);
            groups.is_empty()
        });
        self.remove_member(session, group);
    }

    fn remove_member(&self, session: &Session, group: &str) {
        let key = (session.component_id.clone(), group.to_string());
        self.groups.remove_if_mut(&key, |_, members| {
            members.remove(&session.id);
            members.is_empty()
        });
    }

    /// What the session API shows of `session`, with its groups.
    pub fn info(&self, session: &Session) -> SessionInfo {
        let groups = self
            .memberships
            .get(&session.id)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default();
        session.info(groups)
    }

    /// The live sessions in `component_id`'s group `group`.
    pub fn group_members(&self, component_id: &str, group: &str) -> Vec<Arc<Session>> {
        let ids: Vec<Uuid> = self
            .groups
            .get(&(component_id.to_string(), group.to_string()))
            .map(|m| m.iter().copied().collect())
            .unwrap_or_default();
        ids.iter()
            .filter_map(|id| self.get_owned(component_id, id))
            .collect()
    }

    /// The session `id` if it belongs to `component_id` and is tracked. A foreign, untracked
    /// or unknown ID gives the same `None`, so IDs of other components cannot be probed.
    pub fn get_owned(&self, component_id: &str, id: &Uuid) -> Option<Arc<Session>> {
        self.sessions
            .get(id)
            .filter(|s| s.component_id == component_id && s.tracking)
            .map(|s| Arc::clone(s.value()))
    }

    /// Every session (tracked or not) that server link `link_name` of `component_id` accepted.
    pub fn clients_of_link(&self, component_id: &str, link_name: &str) -> Vec<Arc<Session>> {
        let mut sessions: Vec<Arc<Session>> = self
            .sessions
            .iter()
            .filter(|s| {
                s.component_id == component_id && s.link_name == link_name && s.mode == Mode::Server
            })
            .map(|s| Arc::clone(s.value()))
            .collect();
        sessions.sort_by_key(|s| s.id);
        sessions
    }

    /// Every session (tracked or not) of `component_id` that takes frames from `link_name`.
    pub fn routed_to(&self, component_id: &str, link_name: &str) -> Vec<Arc<Session>> {
        self.sessions
            .iter()
            .filter(|s| s.component_id == component_id && s.has_route(link_name))
            .map(|s| Arc::clone(s.value()))
            .collect()
    }

    /// The tracked sessions of `component_id`, ordered by ID.
    pub fn owned_by(&self, component_id: &str) -> Vec<Arc<Session>> {
        let mut sessions: Vec<Arc<Session>> = self
            .sessions
            .iter()
            .filter(|s| s.component_id == component_id && s.tracking)
            .map(|s| Arc::clone(s.value()))
            .collect();
        sessions.sort_by_key(|s| s.id);
        sessions
    }
}
