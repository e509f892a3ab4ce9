//! The messages, one per topic channel (see [`crate::topics`]), with their size caps.

use serde::{Deserialize, Serialize};

use crate::codec::Message;
use crate::ids::{InstanceId, Reason};
use crate::limits::MAX_INSTANCES_PER_NODE;
use crate::node::{Inventory, Usage};
use crate::spec::{InstanceSpec, InstanceState, PowerState};

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
    /// Grows with every connection the agent makes (it is the connect time in milliseconds
    /// since the Unix epoch). A late Last Will of an older connection carries a smaller
    /// session than the newer connection's online status, so readers keep the largest.
    pub session: u64,
}

impl Message for NodeStatus {
    const NAME: &'static str = "status";
    const MAX_SIZE: usize = 16;
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
    /// Running or stopped.
    pub power: PowerState,
    /// Level-triggered reboot: whenever this grows past the value the agent last applied,
    /// the agent reboots the instance once.
    pub reboot_count: u32,
    /// What to build.
    pub spec: InstanceSpec,
}

/// Everything the controller wants on one node, published retained so that a reconnecting
/// agent always finds the latest. An agent applies it only if its generation is newer than the
/// one it holds; an instance absent from it is deleted from the node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DesiredState {
    /// Grows with every change the controller makes to this node's desired state.
    pub generation: u64,
    /// The instances, at most [`MAX_INSTANCES_PER_NODE`].
    pub instances: heapless::Vec<DesiredInstance, MAX_INSTANCES_PER_NODE>,
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
}

impl Message for AgentEvent {
    const NAME: &'static str = "event";
    const MAX_SIZE: usize = 256;
}
