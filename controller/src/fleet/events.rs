//! The history: what happened to each instance and node, when, and who asked. Recorded by the
//! fleet as it decides and observes, stored with the other changes, kept after an instance is
//! deleted (as Nova keeps instance actions), and bounded.

use std::collections::VecDeque;

use outpost_protocol::{InstanceId, NodeId};

use super::Fleet;

/// Most events kept (in memory and in the store); older ones are dropped first.
pub const MAX_EVENTS: usize = 50_000;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Its place in the history (grows by one per event).
    pub seq: u64,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The instance it is about, if any (id and name: the name stays after a delete).
    pub instance: Option<(InstanceId, String)>,
    /// The node it is about, if any.
    pub node: Option<NodeId>,
    /// What happened: `requested`, `scheduled`, `downloading`, `running`, `moved`, `up`...
    pub kind: String,
    /// In words.
    pub detail: String,
    /// Who asked (the API's token name, or `local`), or `controller` / `node` for what they
    /// decided or saw.
    pub actor: String,
}

/// The kept history.
#[derive(Debug, Default)]
pub struct History {
    events: VecDeque<EventRecord>,
    next: u64,
}

impl History {
    /// The history restored from the store (oldest first).
    pub fn restore(events: Vec<EventRecord>) -> Self {
        let next = events.last().map_or(1, |e| e.seq + 1);
        let mut events: VecDeque<EventRecord> = events.into();
        while events.len() > MAX_EVENTS {
            events.pop_front();
        }
        Self { events, next }
    }

    /// Every event after `since` (a sequence number), oldest first, matching `keep`.
    pub fn after<'a>(
        &'a self,
        since: u64,
        keep: impl Fn(&EventRecord) -> bool + 'a,
    ) -> impl Iterator<Item = &'a EventRecord> + 'a {
        // Sequence numbers grow by one: start where `since` is.
        let first = self.events.front().map_or(0, |e| e.seq);
        let skip =
            usize::try_from(since.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        self.events.iter().skip(skip).filter(move |e| keep(e))
    }

    /// The newest sequence number (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next - 1
    }

    fn push(&mut self, mut e: EventRecord) -> EventRecord {
        e.seq = self.next;
        self.next += 1;
        self.events.push_back(e.clone());
        if self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
        e
    }
}

impl Fleet {
    /// Records an event about an instance (and its node).
    pub(super) fn instance_event(&mut self, id: InstanceId, kind: &str, detail: String) {
        let (name, node) = match self.instances.get(&id) {
            Some(i) => (i.name.clone(), i.node.clone()),
            None => (id.to_string(), None),
        };
        self.record(Some((id, name)), node, kind, detail);
    }

    /// Records an event about a node.
    pub(super) fn node_event(&mut self, node: &NodeId, kind: &str, detail: String) {
        self.record(None, Some(node.clone()), kind, detail);
    }

    fn record(
        &mut self,
        instance: Option<(InstanceId, String)>,
        node: Option<NodeId>,
        kind: &str,
        detail: String,
    ) {
        let e = self.history.push(EventRecord {
            seq: 0,
            at_ms: self.clock_ms,
            instance,
            node,
            kind: kind.to_owned(),
            detail,
            actor: self.actor.clone(),
        });
        self.journal.events.push(e);
    }

    /// Runs `f` with events attributed to `who` (what a node reported, say), then restores the
    /// actor.
    pub(super) fn actor_as(&mut self, who: &str, f: impl FnOnce(&mut Self)) {
        let before = std::mem::replace(&mut self.actor, who.to_owned());
        f(self);
        self.actor = before;
    }

    /// Who the next changes are for (`controller` between requests).
    pub fn set_actor(&mut self, actor: &str) {
        actor.clone_into(&mut self.actor);
    }

    /// The time the next events carry.
    pub fn set_clock(&mut self, now_ms: u64) {
        self.clock_ms = now_ms;
    }

    /// The history.
    pub fn history(&self) -> &History {
        &self.history
    }
}
