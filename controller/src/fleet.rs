//! The fleet: every node and instance the controller knows, and the decisions about them. A
//! pure core: time comes in as milliseconds, changes go out through [`Fleet::take_changes`],
//! which the shell stores durably *before* it publishes any desired state.
//!
//! Level-triggered: each node's desired state is derived from the instances assigned to it;
//! any change bumps the node's generation, and agents converge to the latest one. Reports and
//! events correct the controller's view; nothing depends on one message arriving exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use outpost_protocol::{
    AckResult, AgentEvent, DesiredInstance, DesiredState, ErrorKind, FleetId, Holding, InstanceId,
    InstanceName, InstanceSpec, InstanceState, Inventory, Label, NodeId, NodeReport, NodeStatus,
    PowerState, Presence, Resources, SpecError, Version,
};

use crate::scheduler::{
    Availability, GroupConstraint, GroupPolicy, HostState, HostTable, NoValidHost, Request,
    Scheduler,
};

/// Fleet settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// A node that has not reported for this long is down.
    pub liveness_timeout_ms: u64,
    /// Build attempts per instance (the first one and retries on other nodes).
    pub max_attempts: u32,
    /// How long a build failure counts against a node in the weighers.
    pub failure_memory_ms: u64,
    /// A node down for this long is lost: its instances are rebuilt elsewhere. If it comes
    /// back, its newer desired state (without them) makes it delete its stale copies.
    pub lost_after_ms: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            liveness_timeout_ms: 30_000,
            max_attempts: 3,
            failure_memory_ms: 600_000,
            lost_after_ms: 300_000,
        }
    }
}

/// Where an instance is in its life, as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted, not yet placed (only during a retry with no host free yet).
    Pending,
    /// Placed on a node; the node has not started building it yet.
    Scheduled,
    /// The node is building it.
    Building,
    /// Running.
    Running,
    /// Stopped (asked to, or the guest shut down).
    Stopped,
    /// Crashed, and not (yet) restarted.
    Crashed,
    /// Failed: could not be built anywhere, or failed in place.
    Error,
    /// Being deleted: removed from its node's desired state, waiting for the node to confirm.
    Deleting,
}

impl Phase {
    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Building => "building",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
            Self::Error => "error",
            Self::Deleting => "deleting",
        }
    }

    /// Parses [`Phase::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Scheduled,
            Self::Building,
            Self::Running,
            Self::Stopped,
            Self::Crashed,
            Self::Error,
            Self::Deleting,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// One instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    /// Its id.
    pub id: InstanceId,
    /// Its human name.
    pub name: String,
    /// What it is.
    pub spec: InstanceSpec,
    /// Labels its node must carry.
    pub selector: Vec<Label>,
    /// Its server group.
    pub group: Option<String>,
    /// Running or stopped, as asked.
    pub power: PowerState,
    /// Reboots asked so far.
    pub reboot_count: u32,
    /// Its phase.
    pub phase: Phase,
    /// Its node, once placed.
    pub node: Option<NodeId>,
    /// Nodes where a build failed, with why.
    pub failures: Vec<(NodeId, String)>,
    /// The latest reason (error text, scheduler answer...).
    pub reason: String,
    /// Creation time (ms since the epoch).
    pub created_ms: u64,
}

impl InstanceRecord {
    /// Whether it holds resources on its node (an instance that failed in place keeps them:
    /// its node keeps trying; one that failed everywhere has no node).
    fn holds(&self) -> bool {
        self.node.is_some()
    }

    /// Whether its node should have it.
    fn wanted_on_node(&self) -> bool {
        self.holds() && self.phase != Phase::Deleting
    }
}

/// One node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// Its id.
    pub id: NodeId,
    /// What it reported about itself.
    pub inventory: Option<Inventory>,
    /// Connected (retained status / Last Will) and reporting.
    pub online: bool,
    /// The latest status session seen.
    pub session: u64,
    /// No new placements.
    pub cordoned: bool,
    /// Cordoned, and its instances are being moved.
    pub draining: bool,
    /// Its desired-state generation.
    pub generation: u64,
    /// The generation it last reported holding.
    pub reported_generation: u64,
    /// Last report or status (ms since the epoch).
    pub last_seen_ms: u64,
    /// Times of recent build failures on it.
    pub failures_ms: Vec<u64>,
    /// Down for longer than the lost-after delay; its instances were moved (not stored: a
    /// restarted controller decides again).
    pub lost: bool,
    /// What its agent last said it holds (not stored: every agent says it again on connect).
    pub held: Option<Version>,
    /// Bound to another fleet, with what it holds: no placements, nothing published that it
    /// would take, until an operator adopts it (not stored).
    pub foreign: Option<Holding>,
    /// The state its agent holds that our next desired state replaces (an adoption, or a
    /// generation past ours); not stored.
    pub replaces: Option<Version>,
    /// The instance ids it last reported (not stored).
    pub reported: BTreeSet<InstanceId>,
    /// The `gone` list of the desired state last published to it (not stored).
    pub published_gone: Vec<InstanceId>,
    /// The latest notice from its agent (not stored).
    pub notice: Option<String>,
}

impl NodeRecord {
    /// A node seen for the first time.
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            inventory: None,
            online: false,
            session: 0,
            cordoned: false,
            draining: false,
            generation: 0,
            reported_generation: 0,
            last_seen_ms: 0,
            failures_ms: Vec::new(),
            lost: false,
            held: None,
            foreign: None,
            replaces: None,
            reported: BTreeSet::new(),
            published_gone: Vec::new(),
            notice: None,
        }
    }

    /// Up, down, cordoned or draining (a node bound to another fleet takes no placements:
    /// it counts as down for the scheduler).
    pub fn availability(&self) -> Availability {
        if !self.online || self.inventory.is_none() || self.foreign.is_some() {
            Availability::Down
        } else if self.draining {
            Availability::Draining
        } else if self.cordoned {
            Availability::Cordoned
        } else {
            Availability::Up
        }
    }
}

/// A request to create an instance.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The id to give it (random, chosen by the caller).
    pub id: InstanceId,
    /// Its name.
    pub name: String,
    /// What to build.
    pub spec: InstanceSpec,
    /// Labels its node must carry.
    pub selector: Vec<Label>,
    /// A server group and its policy (the policy is fixed by the group's first member).
    pub group: Option<(String, GroupPolicy)>,
}

/// Why an API request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The spec is impossible on its face.
    #[error("invalid instance: {0}")]
    Spec(#[from] SpecError),
    /// Nothing fits.
    #[error("{0}")]
    NoValidHost(#[from] NoValidHost),
    /// No such instance.
    #[error("no instance {0}")]
    NoInstance(String),
    /// No such node.
    #[error("no node {0}")]
    NoNode(String),
    /// The id or name is taken.
    #[error("an instance named {0:?} already exists")]
    Exists(String),
    /// The group exists with the other policy.
    #[error("group {0:?} exists with a different policy")]
    GroupPolicy(String),
    /// The instance is being deleted.
    #[error("instance {0} is being deleted")]
    Deleting(InstanceId),
    /// Adopt was asked of a node that is not bound to another fleet.
    #[error("node {0} is not bound to another fleet: nothing to adopt")]
    NotForeign(NodeId),
}

/// Everything the store holds, as the fleet is restored from it.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The fleet's identity, created with the store.
    pub fleet: FleetId,
    /// Nodes.
    pub nodes: Vec<NodeRecord>,
    /// Instances.
    pub instances: Vec<InstanceRecord>,
    /// Server groups.
    pub groups: Vec<(String, GroupPolicy)>,
    /// Instances this store created and later deleted (once their node confirmed).
    pub tombstones: Vec<InstanceId>,
}

/// What changed since the last [`Fleet::take_changes`]: store it, then publish.
#[derive(Debug, Default)]
pub struct Changes {
    /// Nodes to upsert.
    pub nodes: Vec<NodeRecord>,
    /// Instances to upsert.
    pub instances: Vec<InstanceRecord>,
    /// Instances to remove.
    pub removed: Vec<InstanceId>,
    /// Instances deleted for good (their node confirmed): remembered so that a node still
    /// holding one may be told it is gone.
    pub tombstones: Vec<InstanceId>,
    /// Groups to upsert.
    pub groups: Vec<(String, GroupPolicy)>,
    /// Desired states to publish (retained), after the above is stored.
    pub publish: Vec<(NodeId, DesiredState)>,
}

impl Changes {
    /// Nothing to store or publish.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.instances.is_empty()
            && self.removed.is_empty()
            && self.groups.is_empty()
            && self.publish.is_empty()
    }
}

/// The controller's view of the fleet.
#[derive(Debug)]
pub struct Fleet {
    /// This fleet's identity, carried in every desired state.
    id: FleetId,
    /// Instances this store created and deleted: the only ones a node is told are gone
    /// without being placed elsewhere.
    tombstones: HashSet<InstanceId>,
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
    dirty_nodes: BTreeSet<NodeId>,
    dirty_instances: BTreeSet<InstanceId>,
    removed: BTreeSet<InstanceId>,
    dirty_groups: BTreeSet<String>,
    publish: BTreeSet<NodeId>,
    new_tombstones: Vec<InstanceId>,
}

impl Fleet {
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
        } = snap;
        let mut f = Self {
            id: fleet,
            tombstones: tombstones.into_iter().collect(),
            table: HostTable::new(scheduler.ratios()),
            scheduler,
            cfg,
            nodes: BTreeMap::new(),
            by_name: HashMap::new(),
            by_group: HashMap::new(),
            by_node: HashMap::new(),
            instances: BTreeMap::new(),
            groups: groups.into_iter().collect(),
            dirty_nodes: BTreeSet::new(),
            dirty_instances: BTreeSet::new(),
            removed: BTreeSet::new(),
            dirty_groups: BTreeSet::new(),
            publish: BTreeSet::new(),
            new_tombstones: Vec::new(),
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
            f.publish.insert(n.id.clone());
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
            None => self.claims().get(id).copied().unwrap_or_default(),
        };
        let host = HostState {
            id: id.clone(),
            availability: n.availability(),
            arch: inv.arch,
            hypervisor: inv.hypervisor,
            capacity: inv.allocatable(),
            claimed,
            labels: inv.labels.iter().cloned().collect(),
            images: inv.images.iter().cloned().collect(),
            recent_failures: self.recent_failures(n, now_ms),
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
            if let Some(idx) = self.table.index_of(n) {
                self.table.release(idx, r);
            }
            unindex(&mut self.by_node, n, id);
        }
        if let Some(n) = to {
            if let Some(idx) = self.table.index_of(n) {
                self.table.claim(idx, r);
            }
            index(&mut self.by_node, n, id);
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
            .map_or_else(Resources::default, |idx| {
                let (_, c) = self.table.usage(idx);
                Resources {
                    vcpus: u16::try_from(c[0]).unwrap_or(u16::MAX),
                    memory_mib: u32::try_from(c[1]).unwrap_or(u32::MAX),
                    disk_gib: u32::try_from(c[2]).unwrap_or(u32::MAX),
                }
            })
    }

    /// The instances a node holds (including those it is deleting), by id.
    fn on_node<'a>(&'a self, node: &NodeId) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
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

    /// The desired state of a node.
    pub fn desired_for(&self, node: &NodeId) -> DesiredState {
        let n = self.nodes.get(node);
        DesiredState {
            fleet: self.id,
            generation: n.map_or(0, |n| n.generation),
            replaces: n.and_then(|n| n.replaces),
            lease_secs: u32::try_from(self.cfg.lost_after_ms / 1000).unwrap_or(u32::MAX),
            instances: self
                .on_node(node)
                .filter(|i| i.wanted_on_node())
                .map(|i| DesiredInstance {
                    id: i.id,
                    name: InstanceName::new(&i.name).unwrap_or_else(|_| fallback_name(i.id)),
                    power: i.power,
                    reboot_count: i.reboot_count,
                    spec: i.spec.clone(),
                })
                .collect(),
            gone: self.gone_for(node).into_iter().collect(),
        }
    }

    /// The instances `node` must remove: those it holds (or last reported) that this store
    /// deleted or placed elsewhere. Never one this store does not know: what it cannot
    /// account for, it adopts instead.
    pub fn gone_for(&self, node: &NodeId) -> Vec<InstanceId> {
        let deleting = self
            .on_node(node)
            .filter(|i| i.phase == Phase::Deleting)
            .map(|i| i.id);
        let reported = self.nodes.get(node).into_iter().flat_map(|n| {
            n.reported
                .iter()
                .copied()
                .filter(|id| match self.instances.get(id) {
                    Some(i) => i.node.as_ref() != Some(node) || i.phase == Phase::Deleting,
                    None => self.tombstones.contains(id),
                })
        });
        let mut gone: Vec<InstanceId> = deleting.chain(reported).collect();
        gone.sort_unstable();
        gone.dedup();
        gone.truncate(outpost_protocol::limits::MAX_INSTANCES_PER_NODE);
        gone
    }

    /// Takes what changed: store it durably, then publish the desired states.
    pub fn take_changes(&mut self) -> Changes {
        let mut publish = std::mem::take(&mut self.publish);
        // A node bound to another fleet would refuse anything we send until it is adopted.
        publish.retain(|n| self.nodes.get(n).is_none_or(|n| n.foreign.is_none()));
        for n in &publish {
            let gone = self.gone_for(n);
            if let Some(rec) = self.nodes.get_mut(n) {
                rec.published_gone = gone;
            }
        }
        let tombstones = std::mem::take(&mut self.new_tombstones);
        Changes {
            tombstones,
            nodes: std::mem::take(&mut self.dirty_nodes)
                .iter()
                .filter_map(|n| self.nodes.get(n).cloned())
                .collect(),
            instances: std::mem::take(&mut self.dirty_instances)
                .iter()
                .filter_map(|i| self.instances.get(i).cloned())
                .collect(),
            removed: std::mem::take(&mut self.removed).into_iter().collect(),
            groups: std::mem::take(&mut self.dirty_groups)
                .into_iter()
                .filter_map(|g| self.groups.get(&g).map(|p| (g, *p)))
                .collect(),
            publish: publish
                .into_iter()
                .map(|n| {
                    let d = self.desired_for(&n);
                    (n, d)
                })
                .collect(),
        }
    }

    /// Puts back changes that could not be stored: the next [`take_changes`](Self::take_changes)
    /// offers them again (with whatever the records are by then), and nothing is published
    /// before it is durable.
    pub fn requeue(&mut self, c: Changes) {
        self.dirty_nodes.extend(c.nodes.into_iter().map(|n| n.id));
        for i in c.instances {
            if self.instances.contains_key(&i.id) {
                self.dirty_instances.insert(i.id);
            }
        }
        self.removed.extend(c.removed);
        self.dirty_groups
            .extend(c.groups.into_iter().map(|(g, _)| g));
        self.new_tombstones.extend(c.tombstones);
        self.publish.extend(c.publish.into_iter().map(|(n, _)| n));
    }

    fn touch_instance(&mut self, id: InstanceId) {
        self.dirty_instances.insert(id);
    }

    /// A node's desired state changed: new generation, publish it.
    fn bump(&mut self, node: &NodeId) {
        if let Some(n) = self.nodes.get_mut(node) {
            match n.generation.checked_add(1) {
                Some(g) => n.generation = g,
                None => {
                    // Start over from 1, replacing what the node holds by name: the node takes
                    // it because it names exactly the state held.
                    n.replaces = Some(Version {
                        fleet: self.id,
                        generation: n.generation,
                    });
                    n.generation = 1;
                }
            }
            self.dirty_nodes.insert(node.clone());
            self.publish.insert(node.clone());
        }
    }

    /// Chooses a node for `spec` (the pure scheduler over the current table).
    fn choose(
        &self,
        spec: &InstanceSpec,
        selector: &[Label],
        group: Option<(&str, GroupPolicy)>,
        exclude: &[NodeId],
        except: Option<InstanceId>,
    ) -> Result<NodeId, NoValidHost> {
        let excluded: Vec<usize> = exclude
            .iter()
            .filter_map(|n| self.table.index_of(n))
            .collect();
        let members: Vec<usize> = group
            .map(|(g, _)| {
                self.by_group
                    .get(g)
                    .into_iter()
                    .flatten()
                    .filter(|id| Some(**id) != except)
                    .filter_map(|id| self.instances.get(id))
                    .filter_map(|i| i.node.as_ref().and_then(|n| self.table.index_of(n)))
                    .collect()
            })
            .unwrap_or_default();
        let req = Request {
            spec,
            selector,
            group: group.map(|(_, policy)| GroupConstraint {
                policy,
                members_on: &members,
            }),
            exclude: &excluded,
        };
        self.scheduler
            .place(&self.table, &req)
            .map(|p| self.table.id(p.host).clone())
    }

    /// Creates and places an instance, or says at once why nothing fits (nothing is stored).
    pub fn create(&mut self, now_ms: u64, req: CreateRequest) -> Result<InstanceId, FleetError> {
        req.spec.validate()?;
        if self.instances.contains_key(&req.id) || self.by_name.contains_key(&req.name) {
            return Err(FleetError::Exists(req.name));
        }
        if let Some((g, p)) = &req.group
            && self.groups.get(g).is_some_and(|q| q != p)
        {
            return Err(FleetError::GroupPolicy(g.clone()));
        }
        let group = req.group.as_ref().map(|(g, p)| (g.as_str(), *p));
        let node = self.choose(&req.spec, &req.selector, group, &[], None)?;
        if let Some((g, p)) = req.group.clone()
            && self.groups.insert(g.clone(), p).is_none()
        {
            self.dirty_groups.insert(g);
        }
        let id = req.id;
        self.move_instance(id, req.spec.resources(), None, Some(&node));
        self.by_name.insert(req.name.clone(), id);
        if let Some((g, _)) = &req.group {
            index(&mut self.by_group, g, id);
        }
        self.instances.insert(
            id,
            InstanceRecord {
                id,
                name: req.name,
                spec: req.spec,
                selector: req.selector,
                group: req.group.map(|(g, _)| g),
                power: PowerState::Running,
                reboot_count: 0,
                phase: Phase::Scheduled,
                node: Some(node.clone()),
                failures: Vec::new(),
                reason: String::new(),
                created_ms: now_ms,
            },
        );
        self.touch_instance(id);
        self.bump(&node);
        Ok(id)
    }

    fn get_mut(&mut self, key: &str) -> Result<&mut InstanceRecord, FleetError> {
        let id = self
            .instance(key)
            .map(|i| i.id)
            .ok_or_else(|| FleetError::NoInstance(key.to_owned()))?;
        self.instances
            .get_mut(&id)
            .ok_or_else(|| FleetError::NoInstance(key.to_owned()))
    }

    /// Changes an instance and republishes its node.
    fn update(
        &mut self,
        key: &str,
        f: impl FnOnce(&mut InstanceRecord),
    ) -> Result<InstanceId, FleetError> {
        let i = self.get_mut(key)?;
        if i.phase == Phase::Deleting {
            return Err(FleetError::Deleting(i.id));
        }
        f(i);
        let (id, node) = (i.id, i.node.clone());
        self.touch_instance(id);
        if let Some(n) = node {
            self.bump(&n);
        }
        Ok(id)
    }

    /// Asks for an instance to run or stop.
    pub fn set_power(&mut self, key: &str, power: PowerState) -> Result<InstanceId, FleetError> {
        self.update(key, |i| i.power = power)
    }

    /// Asks for one reboot.
    pub fn reboot(&mut self, key: &str) -> Result<InstanceId, FleetError> {
        self.update(key, |i| {
            i.reboot_count += 1;
            i.power = PowerState::Running;
        })
    }

    /// Deletes an instance: removed from its node's desired state; gone once the node confirms
    /// (or at once if it never had a node).
    pub fn delete(&mut self, key: &str) -> Result<InstanceId, FleetError> {
        let i = self.get_mut(key)?;
        let id = i.id;
        match i.node.clone() {
            Some(node) => {
                i.phase = Phase::Deleting;
                self.touch_instance(id);
                self.bump(&node);
            }
            None => self.forget(id),
        }
        Ok(id)
    }

    fn forget(&mut self, id: InstanceId) {
        if let Some(i) = self.instances.remove(&id) {
            self.move_instance(id, i.spec.resources(), i.node.as_ref(), None);
            self.by_name.remove(&i.name);
            if let Some(g) = &i.group {
                unindex(&mut self.by_group, g, id);
            }
        }
        self.dirty_instances.remove(&id);
        self.removed.insert(id);
        if self.tombstones.insert(id) {
            self.new_tombstones.push(id);
        }
    }

    /// Cordons or uncordons a node.
    pub fn cordon(&mut self, node: &NodeId, on: bool) -> Result<(), FleetError> {
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| FleetError::NoNode(node.to_string()))?;
        n.cordoned = on;
        if !on {
            n.draining = false;
        }
        self.dirty_nodes.insert(node.clone());
        self.sync_availability(node);
        Ok(())
    }

    /// Drains a node: cordons it and moves each of its instances to another node (cold move:
    /// built there, then removed here). Returns how many moved and the ones that could not.
    pub fn drain(&mut self, node: &NodeId) -> Result<(usize, Vec<String>), FleetError> {
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| FleetError::NoNode(node.to_string()))?;
        n.cordoned = true;
        n.draining = true;
        self.dirty_nodes.insert(node.clone());
        self.sync_availability(node);
        let ids: Vec<InstanceId> = self
            .on_node(node)
            .filter(|i| i.wanted_on_node())
            .map(|i| i.id)
            .collect();
        let (mut moved, mut stuck) = (0, Vec::new());
        for id in ids {
            match self.relocate(id, None) {
                Ok(()) => moved += 1,
                Err(e) => stuck.push(format!("{id}: {e}")),
            }
        }
        Ok((moved, stuck))
    }

    /// Moves an instance to a new node (excluding where it failed), or fails it for good.
    fn relocate(
        &mut self,
        id: InstanceId,
        failed_on: Option<(NodeId, String)>,
    ) -> Result<(), FleetError> {
        let Some(i) = self.instances.get(&id) else {
            return Ok(());
        };
        let old = i.node.clone();
        let mut exclude: Vec<NodeId> = i.failures.iter().map(|(n, _)| n.clone()).collect();
        exclude.extend(failed_on.iter().map(|(n, _)| n.clone()));
        exclude.extend(old.clone());
        let attempts = i.failures.len() as u32 + u32::from(failed_on.is_some());
        let group = i
            .group
            .as_deref()
            .and_then(|g| self.groups.get(g).map(|p| (g, *p)));
        let choice = if failed_on.is_some() && attempts >= self.cfg.max_attempts {
            None
        } else {
            Some(self.choose(&i.spec, &i.selector, group, &exclude, Some(id)))
        };
        let i = self
            .instances
            .get_mut(&id)
            .ok_or(FleetError::NoInstance(id.to_string()))?;
        if let Some(f) = failed_on {
            i.failures.push(f);
        }
        let r = i.spec.resources();
        let result = match choice {
            Some(Ok(node)) => {
                i.node = Some(node.clone());
                i.phase = Phase::Scheduled;
                self.move_instance(id, r, old.as_ref(), Some(&node));
                self.bump(&node);
                Ok(())
            }
            Some(Err(e)) if i.failures.is_empty() => Err(FleetError::NoValidHost(e)),
            other => {
                let why = match other {
                    Some(Err(e)) => format!("no other host: {e}"),
                    _ => format!("{attempts} attempts failed"),
                };
                i.phase = Phase::Error;
                let history: Vec<String> = i
                    .failures
                    .iter()
                    .map(|(n, r)| format!("{n}: {r}"))
                    .collect();
                i.reason = format!("{why} [{}]", history.join("; "));
                i.node = None;
                self.move_instance(id, r, old.as_ref(), None);
                Ok(())
            }
        };
        // Only a move (or a final failure) changes the old node's desired state.
        let now_on = self.instances.get(&id).and_then(|i| i.node.clone());
        if now_on != old {
            self.touch_instance(id);
            if let Some(o) = old {
                self.bump(&o);
            }
        }
        result
    }

    /// A node's retained status (online on connect, offline as its Last Will).
    pub fn on_status(&mut self, now_ms: u64, node: &NodeId, st: NodeStatus) {
        let n = self
            .nodes
            .entry(node.clone())
            .or_insert_with(|| NodeRecord::new(node.clone()));
        if st.session < n.session {
            return; // a late Last Will of an older connection
        }
        n.session = st.session;
        n.online = st.presence == Presence::Online;
        if n.online {
            n.lost = false;
        }
        n.last_seen_ms = now_ms;
        self.dirty_nodes.insert(node.clone());
        if n.online {
            // Whatever it holds, it gets the latest desired state again.
            self.publish.insert(node.clone());
        }
        self.sync_availability(node);
    }

    /// A node's inventory.
    pub fn on_inventory(&mut self, now_ms: u64, node: &NodeId, inv: Inventory) {
        let n = self
            .nodes
            .entry(node.clone())
            .or_insert_with(|| NodeRecord::new(node.clone()));
        n.last_seen_ms = now_ms;
        if n.inventory.as_ref() != Some(&inv) {
            n.inventory = Some(inv);
            self.dirty_nodes.insert(node.clone());
            self.sync_host(node, now_ms);
        }
    }

    /// A node's periodic report: liveness, generation held, each instance's state.
    pub fn on_report(&mut self, now_ms: u64, node: &NodeId, r: &NodeReport) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        n.last_seen_ms = now_ms;
        n.reported_generation = r.generation;
        n.reported = r.instances.iter().map(|i| i.id).collect();
        let behind = r.generation < n.generation;
        let came_back = !n.online && n.session > 0;
        let foreign = n.foreign.is_some();
        if came_back {
            n.online = true;
            self.dirty_nodes.insert(node.clone());
            self.sync_availability(node);
        }
        if foreign {
            return; // its instances are another fleet's until an operator adopts the node
        }
        for ir in &r.instances {
            self.observe(now_ms, node, ir.id, ir.state, "");
        }
        // Instances this node should be deleting and no longer lists are gone.
        let listed: BTreeSet<InstanceId> = r.instances.iter().map(|i| i.id).collect();
        // Instances it should run at the generation it holds, and does not list: say so.
        if !behind {
            let missing: Vec<InstanceId> = self
                .on_node(node)
                .filter(|i| i.wanted_on_node() && !listed.contains(&i.id))
                .filter(|i| matches!(i.phase, Phase::Running | Phase::Stopped | Phase::Crashed))
                .map(|i| i.id)
                .collect();
            for id in missing {
                if let Some(i) = self.instances.get_mut(&id) {
                    let why = format!("its node {node} does not report it");
                    if i.reason != why {
                        i.reason = why;
                        self.touch_instance(id);
                    }
                }
            }
        }
        let gone: Vec<InstanceId> = self
            .on_node(node)
            .filter(|i| i.phase == Phase::Deleting && !listed.contains(&i.id))
            .map(|i| i.id)
            .collect();
        if !behind {
            for id in gone {
                self.forget(id);
            }
        } else {
            self.publish.insert(node.clone());
        }
        // It holds something this store deleted or moved away and has not told it so yet.
        let told = self.nodes.get(node).map(|n| &n.published_gone);
        if told.is_some_and(|t| *t != self.gone_for(node)) {
            self.bump(node);
        }
    }

    /// What a node's agent holds: sent after every connect and whenever it refuses a desired
    /// state. A node of another fleet is held for an operator; in this fleet, instances the
    /// store does not know are adopted (never deleted), and a node ahead of the store gets a
    /// desired state that replaces what it holds.
    pub fn on_holding(&mut self, now_ms: u64, node: &NodeId, h: Holding) {
        let fleet = self.id;
        let n = self
            .nodes
            .entry(node.clone())
            .or_insert_with(|| NodeRecord::new(node.clone()));
        n.last_seen_ms = now_ms;
        n.held = h.held;
        match h.held {
            Some(v) if v.fleet != fleet => {
                if n.foreign.as_ref().is_none_or(|f| f.held != h.held) {
                    tracing::warn!(%node, held = %v.fleet, ours = %fleet, instances = h.instances.len(),
                        "node is bound to another fleet: held for an operator (outpost nodes adopt)");
                }
                n.foreign = Some(h);
                self.dirty_nodes.insert(node.clone());
                self.sync_availability(node);
                return;
            }
            _ => {}
        }
        let ahead = h.held.filter(|v| v.generation > n.generation);
        if n.foreign.take().is_some() {
            self.dirty_nodes.insert(node.clone());
            self.sync_availability(node);
        }
        let adopted = self.adopt_from(now_ms, node, &h.instances);
        if let Some(v) = ahead {
            tracing::warn!(%node, held = v.generation, ours = self.nodes.get(node).map_or(0, |n| n.generation),
                "node holds a newer desired state than the store (restored backup or lost log): replacing it, keeping its instances");
            if let Some(n) = self.nodes.get_mut(node) {
                n.replaces = Some(v);
            }
        }
        if adopted > 0 || ahead.is_some() {
            self.bump(node);
        }
    }

    /// Adopts the instances of `held` that this store neither knows nor deleted, onto `node`.
    /// Returns how many.
    fn adopt_from(&mut self, now_ms: u64, node: &NodeId, held: &[DesiredInstance]) -> usize {
        let mut adopted = 0;
        for di in held {
            if self.instances.contains_key(&di.id) || self.tombstones.contains(&di.id) {
                continue;
            }
            let mut name = di.name.to_string();
            if self.by_name.contains_key(&name) {
                name = format!("{}-{}", &name[..name.len().min(46)], di.id);
            }
            tracing::warn!(%node, id = %di.id, %name, "adopting an instance the store did not know");
            self.move_instance(di.id, di.spec.resources(), None, Some(node));
            self.by_name.insert(name.clone(), di.id);
            self.instances.insert(
                di.id,
                InstanceRecord {
                    id: di.id,
                    name,
                    spec: di.spec.clone(),
                    selector: Vec::new(),
                    group: None,
                    power: di.power,
                    reboot_count: di.reboot_count,
                    phase: Phase::Scheduled,
                    node: Some(node.clone()),
                    failures: Vec::new(),
                    reason: format!(
                        "adopted from {node}: it held this instance, unknown to the store"
                    ),
                    created_ms: now_ms,
                },
            );
            self.touch_instance(di.id);
            adopted += 1;
        }
        adopted
    }

    /// An operator adopts a node bound to another fleet: its instances join this fleet as
    /// they are, and its agent is sent a desired state that replaces the one it holds.
    /// Returns how many instances were adopted.
    pub fn adopt(&mut self, now_ms: u64, node: &NodeId) -> Result<usize, FleetError> {
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| FleetError::NoNode(node.to_string()))?;
        let h = n
            .foreign
            .take()
            .ok_or_else(|| FleetError::NotForeign(node.clone()))?;
        n.replaces = h.held;
        self.dirty_nodes.insert(node.clone());
        self.sync_availability(node);
        let adopted = self.adopt_from(now_ms, node, &h.instances);
        self.bump(node);
        Ok(adopted)
    }

    /// What a node holds that the fleet cannot place: instances of a node bound to another
    /// fleet, awaiting an operator (node, instance).
    pub fn held_elsewhere(&self) -> impl Iterator<Item = (&NodeId, &DesiredInstance)> {
        self.nodes.values().flat_map(|n| {
            n.foreign
                .iter()
                .flat_map(move |h| h.instances.iter().map(move |i| (&n.id, i)))
        })
    }

    /// Instances a node reports that the store does not know and did not delete (kept as they
    /// are by its agent; adopted once the agent hands back their specs).
    pub fn unaccounted(&self, node: &NodeId) -> Vec<InstanceId> {
        self.nodes.get(node).map_or_else(Vec::new, |n| {
            n.reported
                .iter()
                .copied()
                .filter(|id| !self.instances.contains_key(id) && !self.tombstones.contains(id))
                .collect()
        })
    }

    /// A notice from a node's agent about the node as a whole.
    pub fn on_notice(&mut self, node: &NodeId, kind: outpost_protocol::NoticeKind, reason: &str) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        tracing::warn!(%node, notice = kind.as_str(), reason, "node notice");
        n.notice = match kind {
            outpost_protocol::NoticeKind::HypervisorBack => None,
            _ => Some(format!("{}: {reason}", kind.as_str())),
        };
        // Instances waiting on that node say why they do not move (a full disk...).
        if kind == outpost_protocol::NoticeKind::StateNotStored {
            let waiting: Vec<InstanceId> = self
                .on_node(node)
                .filter(|i| i.phase == Phase::Scheduled)
                .map(|i| i.id)
                .collect();
            for id in waiting {
                if let Some(i) = self.instances.get_mut(&id) {
                    i.reason = format!("node {node}: {reason}");
                    self.touch_instance(id);
                }
            }
        }
    }

    /// An event from a node.
    pub fn on_event(&mut self, now_ms: u64, node: &NodeId, ev: &AgentEvent) {
        match ev {
            AgentEvent::Ack {
                result: AckResult::Stale { current },
                ..
            } => {
                // The node holds a newer generation of this fleet than the store (a restored
                // backup, a lost log, a forged state): replace it by name. Nothing is lost:
                // the node keeps whatever we do not list as gone, and hands it back.
                let fleet = self.id;
                if let Some(n) = self.nodes.get_mut(node)
                    && *current >= n.generation
                    && n.foreign.is_none()
                {
                    n.replaces = Some(Version {
                        fleet,
                        generation: *current,
                    });
                    self.bump(node);
                }
            }
            AgentEvent::Ack {
                result: AckResult::OtherFleet { held },
                ..
            } => {
                if let Some(n) = self.nodes.get_mut(node)
                    && n.foreign.is_none()
                {
                    n.held = Some(*held);
                    n.foreign = Some(Holding {
                        held: Some(*held),
                        ..Holding::default()
                    });
                    self.dirty_nodes.insert(node.clone());
                    self.sync_availability(node);
                }
            }
            AgentEvent::Ack {
                generation,
                result: AckResult::Accepted,
            } => {
                if let Some(n) = self.nodes.get_mut(node)
                    && *generation == n.generation
                {
                    n.replaces = None;
                }
            }
            AgentEvent::Instance {
                id, state, reason, ..
            } => {
                self.observe(now_ms, node, *id, *state, reason.as_str());
            }
            AgentEvent::Notice { kind, reason } => self.on_notice(node, *kind, reason.as_str()),
        }
    }

    /// Folds one observed instance state into the view.
    fn observe(
        &mut self,
        now_ms: u64,
        node: &NodeId,
        id: InstanceId,
        state: InstanceState,
        reason: &str,
    ) {
        let Some(i) = self.instances.get_mut(&id) else {
            return;
        };
        if i.node.as_ref() != Some(node) {
            return; // a stale copy on a node it was moved away from: that node deletes it
        }
        let phase = match state {
            InstanceState::Building => Phase::Building,
            InstanceState::Running => Phase::Running,
            InstanceState::Stopped => Phase::Stopped,
            InstanceState::Crashed => Phase::Crashed,
            InstanceState::Deleted => {
                if i.phase == Phase::Deleting {
                    self.forget(id);
                }
                return;
            }
            InstanceState::Error(kind) => {
                if i.phase == Phase::Deleting {
                    return;
                }
                let why = if reason.is_empty() {
                    kind.as_str().to_owned()
                } else {
                    reason.to_owned()
                };
                if build_failure(kind) && matches!(i.phase, Phase::Scheduled | Phase::Building) {
                    if let Some(n) = self.nodes.get_mut(node) {
                        n.failures_ms.push(now_ms);
                        self.dirty_nodes.insert(node.clone());
                        let count = n.failures_ms.len() as u32;
                        if let Some(idx) = self.table.index_of(node) {
                            self.table.set_failures(idx, count);
                        }
                    }
                    let _ = self.relocate(id, Some((node.clone(), why)));
                    return;
                }
                i.reason = why;
                Phase::Error
            }
        };
        if i.phase == Phase::Deleting {
            return;
        }
        let stale_reason = phase == Phase::Running && reason.is_empty() && !i.reason.is_empty();
        if i.phase != phase || (!reason.is_empty() && i.reason != reason) || stale_reason {
            i.phase = phase;
            if !reason.is_empty() {
                i.reason = reason.to_owned();
            } else if phase == Phase::Running {
                i.reason.clear();
            }
            self.touch_instance(id);
        }
    }

    /// Periodic work: nodes that stopped reporting go down.
    pub fn tick(&mut self, now_ms: u64) {
        let mut changed = Vec::new();
        for n in self.nodes.values_mut() {
            if n.online && now_ms.saturating_sub(n.last_seen_ms) > self.cfg.liveness_timeout_ms {
                n.online = false;
                self.dirty_nodes.insert(n.id.clone());
                changed.push(n.id.clone());
            }
            let before = n.failures_ms.len();
            n.failures_ms
                .retain(|&t| now_ms.saturating_sub(t) < self.cfg.failure_memory_ms);
            if n.failures_ms.len() != before {
                changed.push(n.id.clone());
            }
        }
        for id in changed {
            self.sync_availability(&id);
            if let (Some(n), Some(idx)) = (self.nodes.get(&id), self.table.index_of(&id)) {
                self.table.set_failures(idx, n.failures_ms.len() as u32);
            }
        }
        self.evacuate_lost(now_ms);
    }

    /// Moves the instances of nodes down for longer than the lost-after delay to other nodes.
    /// Those that fit nowhere stay where they are, and are tried again on the next tick.
    fn evacuate_lost(&mut self, now_ms: u64) {
        let lost: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.online && n.inventory.is_some())
            .filter(|n| now_ms.saturating_sub(n.last_seen_ms) > self.cfg.lost_after_ms)
            .map(|n| n.id.clone())
            .collect();
        for node in lost {
            let ids: Vec<InstanceId> = self
                .on_node(&node)
                .filter(|i| i.wanted_on_node())
                .map(|i| i.id)
                .collect();
            if let Some(n) = self.nodes.get_mut(&node) {
                n.lost = true;
            }
            for id in ids {
                let _ = self.relocate(id, None);
            }
        }
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

/// Whether an error kind means "this node could not build it" (retry elsewhere).
fn build_failure(kind: ErrorKind) -> bool {
    !matches!(kind, ErrorKind::InvalidSpec)
}
