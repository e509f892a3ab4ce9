//! The fleet: every node and instance the controller knows, and the decisions about them. A
//! pure core: time comes in as milliseconds, changes go out through [`Fleet::take_changes`],
//! which the shell stores durably *before* it publishes any desired state.
//!
//! Level-triggered: each node's desired state is derived from the instances assigned to it;
//! any change bumps the node's generation, and agents converge to the latest one. Reports and
//! events correct the controller's view; nothing depends on one message arriving exactly once.
//!
//! One concern a file: [`records`] (what is stored), this file (the state and its indexes),
//! [`journal`] (what changed, and each node's desired state), [`commands`] (what operators
//! ask), [`reports`] (what agents say), [`timed`] (what time does).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use outpost_protocol::{Digest, FetchState, FleetId, InstanceId, InstanceName, NodeId, Resources};

use outpost_firmware_config::enrolled::Enrolled;

use crate::scheduler::{GroupPolicy, HostState, HostTable, Scheduler};

pub mod commands;
mod error;
pub mod events;
pub mod images;
pub mod journal;
pub mod records;
pub mod reports;
pub mod timed;

pub use journal::{Changes, Journal};
pub use records::{
    CreateRequest, FleetConfig, FleetError, InstanceRecord, NodeRecord, Phase, Snapshot,
};

/// The controller's view of the fleet.
#[derive(Debug)]
pub struct Fleet {
    /// This fleet's identity, carried in every desired state.
    id: FleetId,
    /// Instances this store created and deleted: the only ones a node is told are gone
    /// without being placed elsewhere.
    tombstones: HashSet<InstanceId>,
    /// Nodes an operator removed: never re-admitted from what the broker kept of them, only
    /// when their agent connects anew.
    removed: HashSet<NodeId>,
    /// The capacity each device was enrolled with (the provisioning registry's word): a node's
    /// first ceiling, over its first report (not stored: read from the registry).
    enrolled: BTreeMap<NodeId, Enrolled>,
    /// The scheduler's view of the nodes, kept up to date as they change.
    table: HostTable,
    nodes: BTreeMap<NodeId, NodeRecord>,
    instances: BTreeMap<InstanceId, InstanceRecord>,
    /// Index: instance name to id (names are unique).
    by_name: HashMap<String, InstanceId>,
    /// Index: the members of each server group.
    by_group: HashMap<String, BTreeSet<InstanceId>>,
    /// Index: the instances each node holds.
    by_node: HashMap<NodeId, BTreeSet<InstanceId>>,
    groups: BTreeMap<String, GroupPolicy>,
    scheduler: Scheduler,
    cfg: FleetConfig,
    /// What changed since the shell last took the changes.
    journal: Journal,
    /// The image catalogue, by name and version.
    images: BTreeMap<(String, String), images::ImageRecord>,
    /// The key node blob tokens are derived from.
    blob_key: [u8; 32],
    /// The devices' broker credentials, hashed (when the controller reads the password file):
    /// part of each node's blob token.
    credentials: Option<BTreeMap<NodeId, [u8; 32]>>,
    /// Downloads under way (or failed), per node and blob, as their agents report them.
    fetches: HashMap<(NodeId, Digest), FetchProgress>,
    /// Prefetch jobs under way (not stored: a restart ends them).
    prefetches: Vec<images::PrefetchJob>,
    /// What happened, when, and who asked.
    history: events::History,
    /// The time events carry (set by the shell each turn).
    clock_ms: u64,
    /// Who the changes being made are for.
    actor: String,
    /// Placement decisions so far (since this process started).
    stats: SchedulerStats,
    /// The leader epoch this controller writes in: every generation it gives is at least
    /// [`outpost_protocol::epoch_floor`] of it.
    epoch: u64,
}

/// How many of the latest refusals [`SchedulerStats`] keeps.
pub const LAST_REFUSALS: usize = 20;

/// The scheduler's decisions since the controller started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Instances placed (created or moved).
    pub placements: u64,
    /// Decisions where no host fitted.
    pub failures: u64,
    /// Per filter: failed decisions in which it removed hosts.
    pub refusals: BTreeMap<&'static str, u64>,
    /// The latest refusals: when (ms since the epoch) and why ("no host fits (3 hosts): ...").
    pub last_refusals: std::collections::VecDeque<(u64, String)>,
}

/// A blob's download on one node, as last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchProgress {
    /// Bytes received.
    pub done: u64,
    /// Its size.
    pub total: u64,
    /// Bytes per second lately.
    pub rate: u32,
    /// Running or failed.
    pub state: FetchState,
    /// Why it failed, or what it waits for.
    pub reason: String,
    /// When it was reported (ms since the epoch).
    pub at_ms: u64,
}

impl Fleet {
    /// The scheduler's decisions since the controller started.
    pub fn scheduler_stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// A fleet restored from the store (or empty), at `now_ms`. Every node's desired state is
    /// republished, and every node that had reported gets the liveness timeout from now to
    /// report again before it counts as down (as a new Nomad leader resets heartbeats).
    pub fn new(scheduler: Scheduler, cfg: FleetConfig, snap: Snapshot, now_ms: u64) -> Self {
        let Snapshot {
            fleet,
            nodes,
            instances,
            groups,
            tombstones,
            images,
            blob_key,
            events,
            removed_nodes,
        } = snap;
        let mut f = Self {
            id: fleet,
            tombstones: tombstones.into_iter().collect(),
            removed: removed_nodes.into_iter().collect(),
            enrolled: BTreeMap::new(),
            table: scheduler.table(),
            scheduler,
            cfg,
            nodes: BTreeMap::new(),
            by_name: HashMap::new(),
            by_group: HashMap::new(),
            by_node: HashMap::new(),
            instances: BTreeMap::new(),
            groups: groups.into_iter().collect(),
            journal: Journal::default(),
            images: images
                .into_iter()
                .map(|i| ((i.name.clone(), i.version.clone()), i))
                .collect(),
            blob_key,
            credentials: None,
            fetches: HashMap::new(),
            prefetches: Vec::new(),
            history: events::History::restore(events),
            clock_ms: now_ms,
            actor: "controller".to_owned(),
            stats: SchedulerStats::default(),
            epoch: 0,
        };
        for i in instances {
            f.by_name.insert(i.name.clone(), i.id);
            if let Some(n) = &i.node {
                index(&mut f.by_node, n, i.id);
            }
            if let Some(g) = &i.group {
                index(&mut f.by_group, g, i.id);
            }
            f.instances.insert(i.id, i);
        }
        for mut n in nodes {
            // Liveness is learnt again from the broker (retained status) and reports; until
            // then a node that had reported keeps its place for one liveness timeout.
            n.online = n.inventory.is_some();
            n.last_seen_ms = now_ms;
            // What the node has confirmed holding is current: published again only if not.
            if n.reported_generation < n.generation {
                f.journal.publish.insert(n.id.clone());
            }
            let id = n.id.clone();
            f.nodes.insert(id.clone(), n);
            f.sync_host(&id, 0);
        }
        f
    }

    /// Brings the node's row of the scheduler's table up to date (claims are kept
    /// incrementally; they are computed here only when the node first enters the table).
    fn sync_host(&mut self, id: &NodeId, now_ms: u64) {
        let Some(n) = self.nodes.get(id) else { return };
        let Some(inv) = &n.inventory else { return };
        let claimed = match self.table.index_of(id) {
            Some(_) => self.claimed(id),
            // From this node's own instances (the index), not the whole fleet's: a fleet
            // loaded at start-up enters the table one node at a time.
            None => self
                .on_node(id)
                .filter(|i| i.holds())
                .fold(Resources::default(), |r, i| {
                    r.saturating_add(i.spec.resources())
                }),
        };
        let host = HostState {
            id: id.clone(),
            availability: n.availability(),
            arch: inv.arch,
            hypervisor: inv.hypervisor,
            capacity: inv.allocatable(),
            claimed,
            labels: n.labels(),
            images: inv.images.iter().cloned().collect(),
            cached: inv.cached.iter().copied().collect(),
            recent_failures: self.recent_failures(n, now_ms),
            instances: self.count_on(id),
        };
        self.table.upsert(&host);
    }

    fn recent_failures(&self, n: &NodeRecord, now_ms: u64) -> u32 {
        n.failures_ms
            .iter()
            .filter(|&&t| now_ms.saturating_sub(t) < self.cfg.failure_memory_ms)
            .count() as u32
    }

    /// Refreshes a node's availability in the table.
    fn sync_availability(&mut self, id: &NodeId) {
        if let (Some(n), Some(idx)) = (self.nodes.get(id), self.table.index_of(id)) {
            self.table.set_availability(idx, n.availability());
        }
    }

    /// Moves an instance's claim from one node to another in the table.
    /// Moves an instance (its claim and its place in the per-node index) between nodes.
    fn move_instance(
        &mut self,
        id: InstanceId,
        r: Resources,
        from: Option<&NodeId>,
        to: Option<&NodeId>,
    ) {
        if let Some(n) = from {
            unindex(&mut self.by_node, n, id);
            if let Some(idx) = self.table.index_of(n) {
                self.table.release(idx, r);
                self.table.set_instances(idx, self.count_on(n));
            }
        }
        if let Some(n) = to {
            index(&mut self.by_node, n, id);
            if let Some(idx) = self.table.index_of(n) {
                self.table.claim(idx, r);
                self.table.set_instances(idx, self.count_on(n));
            }
        }
    }

    /// How many instances a node holds (those it is deleting too: they are in its desired
    /// state's `gone` list, as bounded as its instances).
    pub(crate) fn count_on(&self, node: &NodeId) -> u32 {
        self.by_node.get(node).map_or(0, |s| s.len() as u32)
    }

    /// Whether a node holds as many instances as a desired state can carry.
    pub(crate) fn is_full(&self, node: &NodeId) -> bool {
        self.count_on(node) as usize >= outpost_protocol::limits::MAX_INSTANCES_PER_NODE
    }

    /// Whether an operator removed this node (and it has not connected anew since).
    pub fn is_removed(&self, node: &NodeId) -> bool {
        self.removed.contains(node)
    }

    /// A removed node's agent connected anew (a live online status: it holds valid
    /// credentials, so it was provisioned again): it is a node of this fleet again.
    pub fn readmit(&mut self, node: &NodeId) {
        if self.removed.remove(node) {
            self.journal.removed_nodes.remove(node);
            self.journal.readmitted.insert(node.clone());
            tracing::warn!(%node, "a removed node connected anew: admitted again");
            self.actor_as("node", |f| {
                f.node_event(
                    node,
                    "readmitted",
                    "its agent connected anew after it was removed".into(),
                );
            });
        }
    }

    /// This fleet's identity.
    pub fn id(&self) -> FleetId {
        self.id
    }

    /// Every node.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// One node.
    pub fn node(&self, id: &NodeId) -> Option<&NodeRecord> {
        self.nodes.get(id)
    }

    /// One node, to change it (an operator's command: a node it names must exist).
    pub(super) fn node_mut(&mut self, id: &NodeId) -> Result<&mut NodeRecord, FleetError> {
        self.nodes
            .get_mut(id)
            .ok_or_else(|| FleetError::NoNode(id.to_string()))
    }

    /// Every instance.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.instances.values()
    }

    /// One instance, by id.
    pub fn get(&self, id: InstanceId) -> Option<&InstanceRecord> {
        self.instances.get(&id)
    }

    /// One instance, by id or name.
    pub fn instance(&self, key: &str) -> Option<&InstanceRecord> {
        key.parse::<InstanceId>()
            .ok()
            .and_then(|id| self.get(id))
            .or_else(|| self.by_name.get(key).and_then(|id| self.get(*id)))
    }

    /// Resources claimed on one node, as the scheduler holds them (kept incrementally).
    pub fn claimed(&self, node: &NodeId) -> Resources {
        self.table
            .index_of(node)
            .map_or_else(Resources::default, |idx| self.table.claimed(idx))
    }

    /// What can be claimed on one node: allocatable times the allocation ratios.
    pub fn capacity(&self, node: &NodeId) -> Resources {
        self.table
            .index_of(node)
            .map_or_else(Resources::default, |idx| self.table.effective(idx))
    }

    /// The downloads an instance waits for on its node, as reported.
    pub fn fetches_of(&self, i: &InstanceRecord) -> Vec<(Digest, &FetchProgress)> {
        let Some(node) = &i.node else {
            return Vec::new();
        };
        i.spec
            .blobs()
            .filter_map(|b| {
                self.fetches
                    .get(&(node.clone(), b.digest))
                    .map(|p| (b.digest, p))
            })
            .collect()
    }

    /// The downloads of a blob, per node, as reported.
    pub fn fetches_of_blob(&self, d: &Digest) -> Vec<(&NodeId, &FetchProgress)> {
        let mut v: Vec<_> = self
            .fetches
            .iter()
            .filter(|((_, x), _)| x == d)
            .map(|((n, _), p)| (n, p))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// The scheduler's allocation ratios.
    pub fn ratios(&self) -> crate::scheduler::Ratios {
        self.scheduler.ratios()
    }

    /// The instances a node holds (including those it is deleting), by id.
    pub(crate) fn on_node<'a>(
        &'a self,
        node: &NodeId,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.instances.get(id))
    }

    /// How many instances each node holds.
    pub fn instance_counts(&self) -> BTreeMap<NodeId, usize> {
        self.by_node
            .iter()
            .map(|(n, set)| (n.clone(), set.len()))
            .collect()
    }

    /// Resources claimed on each node by its instances, summed from the instances.
    pub fn claims(&self) -> BTreeMap<NodeId, Resources> {
        let mut m: BTreeMap<NodeId, Resources> = BTreeMap::new();
        for i in self.instances.values().filter(|i| i.holds()) {
            if let Some(n) = &i.node {
                let e = m.entry(n.clone()).or_default();
                *e = e.saturating_add(i.spec.resources());
            }
        }
        m
    }
}

/// Adds `id` under `key` in one of the fleet's indexes.
fn index<K: Eq + std::hash::Hash + Clone>(
    map: &mut HashMap<K, BTreeSet<InstanceId>>,
    key: &K,
    id: InstanceId,
) {
    map.entry(key.clone()).or_default().insert(id);
}

/// Removes `id` from under `key` (and the key once nothing is left under it).
fn unindex<K: Eq + std::hash::Hash>(
    map: &mut HashMap<K, BTreeSet<InstanceId>>,
    key: &K,
    id: InstanceId,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// A valid name for an instance whose stored name predates the naming rule.
fn fallback_name(id: InstanceId) -> InstanceName {
    InstanceName::new(&format!("i-{id}")).unwrap_or_default()
}
