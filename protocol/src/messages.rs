//! The messages, one per topic channel (see [`crate::topics`]), with their size caps.

use serde::{Deserialize, Serialize};

use crate::blob::{BlobRef, Digest, FetchFrom};
use crate::codec::Message;
use crate::ids::{BootId, FleetId, InstanceId, InstanceName, Reason};
use crate::limits::{MAX_CONSOLE_CHUNK, MAX_INSTANCES_PER_NODE, MAX_PREFETCH};
use crate::node::{Inventory, Usage};
use crate::spec::{InstanceSpec, InstanceState, PowerMode, PowerState};

/// Whether a node's agent is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Presence {
    /// The broker published the agent's Last Will: its connection died.
    Offline,
    /// The agent connected and announced itself.
    Online,
}

/// A node's liveness, published retained by the agent on connect (online) and registered as
/// its MQTT Last Will (offline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Online or offline.
    pub presence: Presence,
    /// Names one connection of the agent: a counter kept in its state directory, one more
    /// for every connection, whatever the device's clock says. Readers compare sessions for
    /// equality only: a Last Will counts only when it names the connection that last said
    /// online (a late one of an older connection says nothing).
    pub session: u64,
    /// The agent install that connected (see [`BootId`]).
    pub boot: BootId,
}

impl Message for NodeStatus {
    const NAME: &'static str = "status";
    const MAX_SIZE: usize = 32;
}

impl Message for Inventory {
    const NAME: &'static str = "inventory";
    const MAX_SIZE: usize = 4096;
}

/// One instance the controller wants on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredInstance {
    /// Its identity.
    pub id: InstanceId,
    /// Its name, so that a controller that lost its store can adopt it under the same name.
    pub name: InstanceName,
    /// Running or stopped.
    pub power: PowerState,
    /// Level-triggered (re)boot: whenever this grows past the value the agent last applied,
    /// the agent reboots the instance once if it runs, or starts it if it stopped by itself.
    pub reboot_count: u32,
    /// How the current power state or the last reboot asked is carried out.
    pub power_mode: PowerMode,
    /// What to build.
    pub spec: InstanceSpec,
}

/// How far a generation's leader epoch is shifted: the high 24 bits of a generation are the
/// epoch of the controller that wrote it (0 for a fleet with one controller), the low 40 bits
/// count changes within that epoch. A state from an older leader is therefore always older
/// than one from a newer leader, and agents (which never take an older generation) refuse it.
pub const EPOCH_SHIFT: u32 = 40;

/// The lowest generation a leader of `epoch` writes.
pub const fn epoch_floor(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT
}

/// Which desired state: the fleet that wrote it and its generation there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Version {
    /// The fleet (the controller's store) that wrote it.
    pub fleet: FleetId,
    /// Its generation in that fleet.
    pub generation: u64,
}

/// Everything the controller wants on one node, published retained so that a reconnecting
/// agent always finds the latest.
///
/// An agent applies it only if it comes from the fleet the agent is bound to and its
/// generation is newer than the one held, or if `replaces` names exactly the state held (a
/// controller taking over a node after it has seen what the node holds). An instance absent
/// from it is not wanted there, but the agent deletes a domain only when its id is listed in
/// `gone`: omission alone never destroys anything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DesiredState {
    /// The fleet this state belongs to.
    pub fleet: FleetId,
    /// Grows with every change the controller makes to this node's desired state.
    pub generation: u64,
    /// The state held by the agent that this one replaces even though it is not newer (set
    /// only when the controller adopts a node from another fleet or past its own generation).
    pub replaces: Option<Version>,
    /// How long (seconds) the agent may keep starting instances on its own without hearing
    /// from the controller; past that, after a restart, it starts nothing until it hears again
    /// (the controller may have rebuilt them elsewhere). 0: no limit.
    pub lease_secs: u32,
    /// The instances, at most [`MAX_INSTANCES_PER_NODE`].
    pub instances: heapless::Vec<DesiredInstance, MAX_INSTANCES_PER_NODE>,
    /// Instances the controller knows to be deleted or moved away from this node: the agent
    /// removes their domains. Nothing else is ever removed.
    pub gone: heapless::Vec<InstanceId, MAX_INSTANCES_PER_NODE>,
    /// Where the node fetches the blobs its instances name (none: the controller has no
    /// catalogue to serve).
    pub fetch: Option<FetchFrom>,
    /// Blobs to cache ahead of any instance (`outpost images prefetch`).
    pub prefetch: heapless::Vec<BlobRef, MAX_PREFETCH>,
    /// The agent install this state is for (the node's bound [`BootId`]; none: any). An agent
    /// of another install takes it only if it already holds a state of this node that named
    /// no install (it ran before installs had identities): a copy of the node's identity on a
    /// second box, holding nothing of the node's, builds nothing and answers
    /// [`AckResult::OtherInstall`].
    pub boot: Option<BootId>,
}

impl Version {
    /// The leader epoch it was written in (see [`EPOCH_SHIFT`]).
    pub const fn epoch(&self) -> u64 {
        self.generation >> EPOCH_SHIFT
    }
}

impl DesiredState {
    /// Its version.
    pub const fn version(&self) -> Version {
        Version {
            fleet: self.fleet,
            generation: self.generation,
        }
    }
}

impl Message for DesiredState {
    const NAME: &'static str = "desired";
    const MAX_SIZE: usize = 48 * 1024;
}

/// One instance's actual state, as reported periodically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Which instance.
    pub id: InstanceId,
    /// Its state.
    pub state: InstanceState,
}

/// A node's periodic report: usage and every instance's actual state. Small by design (a node
/// with 4 instances reports in under 128 bytes), sent at QoS 0 since the next one supersedes it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeReport {
    /// The desired-state generation the agent holds and converges to.
    pub generation: u64,
    /// What the instances use.
    pub usage: Usage,
    /// Every instance on the node that Outpost manages.
    pub instances: heapless::Vec<InstanceReport, MAX_INSTANCES_PER_NODE>,
}

impl Message for NodeReport {
    const NAME: &'static str = "report";
    const MAX_SIZE: usize = 512;
}

/// What an agent did with a desired state it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckResult {
    /// Stored durably; the agent now converges to it.
    Accepted,
    /// Older than (or equal to) what the agent holds: ignored.
    Stale {
        /// The generation the agent holds.
        current: u64,
    },
    /// From another fleet than the one the agent is bound to: ignored. The agent keeps its
    /// instances and publishes what it holds ([`Holding`]) until an operator adopts the node.
    OtherFleet {
        /// What the agent holds.
        held: Version,
    },
    /// For another agent install than this one (see [`DesiredState::boot`]): ignored. The
    /// node's identity runs on two boxes, or the agent was reinstalled without its state; an
    /// operator chooses with `outpost nodes resolve NODE --keep BOOT-ID`.
    OtherInstall {
        /// This agent's install.
        mine: BootId,
    },
}

/// Something about the node as a whole that an operator must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// The stored desired state could not be read (corrupt, unreadable): the agent touches
    /// nothing until the controller sends one.
    StateUnreadable,
    /// The desired state could not be stored (disk full, read-only): not accepted.
    StateNotStored,
    /// The hypervisor does not answer; instances keep running, nothing is changed.
    HypervisorUnavailable,
    /// The hypervisor answers again.
    HypervisorBack,
    /// The agent restarted after its lease ran out: it starts nothing until it hears from the
    /// controller.
    LeaseExpired,
}

impl NoticeKind {
    /// Lowercase name for tables and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::StateUnreadable => "state-unreadable",
            Self::StateNotStored => "state-not-stored",
            Self::HypervisorUnavailable => "hypervisor-unavailable",
            Self::HypervisorBack => "hypervisor-back",
            Self::LeaseExpired => "lease-expired",
        }
    }
}

/// Something that happened on a node, sent at QoS 1 (at least once: handlers are idempotent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentEvent {
    /// The agent's answer to a desired state.
    Ack {
        /// The generation received.
        generation: u64,
        /// What the agent did with it.
        result: AckResult,
    },
    /// An instance changed state.
    Instance {
        /// Which instance.
        id: InstanceId,
        /// The desired-state generation the agent held when it happened.
        generation: u64,
        /// The new state.
        state: InstanceState,
        /// Why, in words (empty when there is nothing to say).
        reason: Reason,
    },
    /// Something about the node as a whole.
    Notice {
        /// What.
        kind: NoticeKind,
        /// In words.
        reason: Reason,
    },
    /// A blob's download: about once a second while it runs, and once when it ends.
    Fetch {
        /// Which blob.
        digest: Digest,
        /// Bytes received so far.
        done: u64,
        /// Its size.
        total: u64,
        /// Bytes per second lately.
        rate: u32,
        /// Running, cached or failed.
        state: FetchState,
        /// Why it failed, or what it waits for (empty when there is nothing to say).
        reason: Reason,
    },
}

/// The controller asks a node for an instance's console output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleRequest {
    /// Matches the answer to the question.
    pub request: u32,
    /// Which instance.
    pub id: InstanceId,
    /// From this byte of the console log on (`None`: its last `lines` lines).
    pub from: Option<u64>,
    /// How many lines of the tail, when `from` is `None`.
    pub lines: u16,
}

impl Message for ConsoleRequest {
    const NAME: &'static str = "console-req";
    const MAX_SIZE: usize = 32;
}

/// A node's answer: console bytes (control characters and terminal escapes removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleChunk {
    /// The request answered.
    pub request: u32,
    /// Which instance.
    pub id: InstanceId,
    /// Where in the log the bytes start.
    pub start: u64,
    /// Where the next request should start (the end of what was read).
    pub next: u64,
    /// The bytes, at most [`MAX_CONSOLE_CHUNK`].
    pub data: heapless::Vec<u8, MAX_CONSOLE_CHUNK>,
    /// Why there is nothing to read (no such instance here, no log yet).
    pub error: Option<Reason>,
}

impl Message for ConsoleChunk {
    const NAME: &'static str = "console";
    const MAX_SIZE: usize = MAX_CONSOLE_CHUNK + 256;
}

/// Where one blob's download stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchState {
    /// Transferring (or waiting to retry).
    Running,
    /// Verified and in the cache.
    Cached,
    /// Given up; the instances that need it are in error.
    Failed,
}

impl FetchState {
    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Cached => "cached",
            Self::Failed => "failed",
        }
    }
}

/// What an agent holds: the version of its desired state and the specs of its instances (those
/// wanted, then those it keeps because no controller accounted for them). Sent after every
/// connect and whenever the agent refuses a desired state, so that a controller whose store is
/// older than the node adopts what the node runs instead of deleting it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Holding {
    /// The desired state held (none: never bound, or its file was unreadable).
    pub held: Option<Version>,
    /// The instances held, at most [`MAX_INSTANCES_PER_NODE`].
    pub instances: heapless::Vec<DesiredInstance, MAX_INSTANCES_PER_NODE>,
}

impl Message for Holding {
    const NAME: &'static str = "holding";
    const MAX_SIZE: usize = 48 * 1024;
}

impl Message for AgentEvent {
    const NAME: &'static str = "event";
    const MAX_SIZE: usize = 256;
}
