//! The fleet's records: what the store keeps of each node and instance, the settings, the
//! requests and the refusals.

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocol::{
    BaseUrl, BlobRef, BootId, FleetId, Holding, InstanceId, InstanceSpec, Inventory, Label,
    LabelKey, LabelValue, Nic, NodeId, PowerMode, PowerState, Resources, Version,
};

pub use super::error::FleetError;
use super::images::ImageRecord;

use crate::scheduler::{Availability, GroupPolicy};

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
    /// The URL nodes fetch images from (the controller's API as they reach it); `None`: no
    /// fetching (instances boot only from files already on their nodes).
    pub image_url: Option<BaseUrl>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            liveness_timeout_ms: 30_000,
            max_attempts: 3,
            failure_memory_ms: 600_000,
            lost_after_ms: 300_000,
            image_url: None,
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
    /// The node is fetching its images.
    Downloading,
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
    /// Every phase.
    pub const ALL: [Self; 9] = [
        Self::Pending,
        Self::Scheduled,
        Self::Downloading,
        Self::Building,
        Self::Running,
        Self::Stopped,
        Self::Crashed,
        Self::Error,
        Self::Deleting,
    ];

    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Downloading => "downloading",
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
            Self::Downloading,
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
    /// How the last stop or reboot asked is carried out (forced, grace).
    pub power_mode: PowerMode,
    /// Why it is on its node: the scheduler's score and how many hosts it weighed.
    pub placement: String,
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
    /// Adopted from the node that held it, unknown to the store (a store behind its nodes):
    /// pinned to that node, never rebuilt or moved elsewhere by the controller on its own.
    pub adopted: bool,
}

impl InstanceRecord {
    /// Whether it holds resources on its node (an instance that failed in place keeps them:
    /// its node keeps trying; one that failed everywhere has no node).
    pub(super) fn holds(&self) -> bool {
        self.node.is_some()
    }

    /// Whether its node should have it.
    pub(super) fn wanted_on_node(&self) -> bool {
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
    pub foreign: Option<Box<Holding>>,
    /// The state its agent holds that our next desired state replaces (an adoption, or a
    /// generation past ours); not stored.
    pub replaces: Option<Version>,
    /// The instance ids it last reported (not stored).
    pub reported: BTreeSet<InstanceId>,
    /// The `gone` list of the desired state last published to it (not stored).
    pub published_gone: Vec<InstanceId>,
    /// The latest notice from its agent (not stored).
    pub notice: Option<String>,
    /// Labels set (`Some`) or removed (`None`) by an operator on the controller, over the
    /// ones flashed onto the device (stored).
    pub label_overrides: Vec<(LabelKey, Option<LabelValue>)>,
    /// What its instances use, as its last report said (not stored).
    pub used: Resources,
    /// Blobs it is asked to cache ahead of any instance (not stored).
    pub prefetch: Vec<BlobRef>,
    /// Its instances' interfaces, as its agent last said (retained on the broker; not stored).
    pub addresses: BTreeMap<InstanceId, Vec<Nic>>,
    /// The most it may offer (its first report, or what an operator approved since): a larger
    /// report is clamped to it until `outpost nodes approve-capacity` (stored).
    pub ceiling: Option<Resources>,
    /// What it reported above its ceiling, awaiting an operator (not stored: reported again).
    pub over_ceiling: Option<Resources>,
    /// The agent install bound to it: the first to connect, or the one an operator kept with
    /// `outpost nodes resolve` (stored). Its desired states are for that install only.
    pub boot: Option<BootId>,
    /// Other installs seen using its identity, at most [`MAX_CONFLICTING`]: while there are
    /// any, the node is in conflict and takes no placements (not stored: they connect again).
    pub conflict: Vec<BootId>,
}

/// Most other agent installs remembered for one node in conflict.
pub const MAX_CONFLICTING: usize = 8;

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
            addresses: BTreeMap::new(),
            notice: None,
            label_overrides: Vec::new(),
            used: Resources::default(),
            prefetch: Vec::new(),
            ceiling: None,
            over_ceiling: None,
            boot: None,
            conflict: Vec::new(),
        }
    }

    /// Its labels: the flashed ones with the operator's overrides applied.
    pub fn labels(&self) -> Vec<Label> {
        let mut out: Vec<Label> = self
            .inventory
            .iter()
            .flat_map(|i| i.labels.iter().cloned())
            .filter(|l| !self.label_overrides.iter().any(|(k, _)| *k == l.key))
            .collect();
        out.extend(self.label_overrides.iter().filter_map(|(key, v)| {
            v.clone().map(|value| Label {
                key: key.clone(),
                value,
            })
        }));
        out.sort();
        out
    }

    /// Up, down, cordoned or draining (a node bound to another fleet, or whose identity two
    /// agent installs use, takes no placements: it counts as down for the scheduler).
    pub fn availability(&self) -> Availability {
        if !self.online
            || self.inventory.is_none()
            || self.foreign.is_some()
            || !self.conflict.is_empty()
        {
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
    /// No architecture was asked for: `spec.arch` is only the first choice, and any other
    /// architecture the fleet has will do.
    pub any_arch: bool,
}

/// One label change as an operator writes it and the store keeps it: `key=value` sets the
/// label, `key-` removes it.
pub fn parse_label_override(s: &str) -> Result<(LabelKey, Option<LabelValue>), String> {
    match s.strip_suffix('-') {
        Some(k) if !s.contains('=') => Ok((LabelKey::new(k).map_err(|e| e.to_string())?, None)),
        _ if !s.contains('=') => Err("no value".into()),
        _ => Label::parse(s)
            .map(|l| (l.key, Some(l.value)))
            .map_err(|e| e.to_string()),
    }
}

/// The written form of a label change (see [`parse_label_override`]).
pub fn format_label_override(key: &LabelKey, value: Option<&LabelValue>) -> String {
    match value {
        Some(v) => format!("{key}={v}"),
        None => format!("{key}-"),
    }
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
    /// The image catalogue.
    pub images: Vec<ImageRecord>,
    /// The key that node blob tokens are derived from (made with the store).
    pub blob_key: [u8; 32],
    /// The newest events, oldest first.
    pub events: Vec<super::events::EventRecord>,
    /// Nodes an operator removed (see [`super::Fleet::is_removed`]).
    pub removed_nodes: Vec<NodeId>,
}
