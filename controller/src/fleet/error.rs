//! Why a fleet operation was refused.

use crate::scheduler::NoValidHost;
use outpost_protocol::{Arch, InstanceId, NodeId, SpecError};

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
    /// A label change is not `key=value` or `key-`.
    #[error("label {0:?}: {1} (give key=value to set, key- to remove)")]
    BadLabel(String, String),
    /// A node still holds instances: it is not removed.
    #[error("node {0} still holds {1}: drain it first, or remove it with --force to move them")]
    NodeNotEmpty(NodeId, String),
    /// No node carries the labels asked for (or none runs the image's architecture).
    #[error("no node matches selector {0} (check the labels: outpost nodes list)")]
    NoNodeMatches(String),
    /// A forced removal of a node that is up found instances it cannot move.
    #[error(
        "node {0} is up and still runs {1}, which cannot move anywhere (nothing fits, or a group's policy; {2} other instance(s) moved): stop its agent first (then they are deleted with it), or delete them"
    )]
    CannotMove(NodeId, String, usize),
    /// Adopt was asked of a node that is not bound to another fleet.
    #[error("node {0} is not bound to another fleet: nothing to adopt")]
    NotForeign(NodeId),
    /// The catalogue has this `name:version` already.
    #[error("image {0} exists: give another --version, or delete it first")]
    ImageExists(String),
    /// The catalogue has no such image.
    #[error("no image {0} (outpost images list)")]
    NoImage(String),
    /// Instances boot from the image's content.
    #[error("image {image} is used by {}: delete them first", users.join(", "))]
    ImageInUse {
        /// `name:version`.
        image: String,
        /// The instances' names.
        users: Vec<String>,
    },
    /// A catalogue name or version breaks the rule.
    #[error("{0}")]
    BadImageName(String),
    /// A node may not fetch this blob (wrong token, or none of its instances needs it).
    #[error("not a blob this node may fetch")]
    BlobDenied,
    /// The instance has no node (so no console).
    #[error("instance {0} is on no node")]
    NotPlaced(String),
    /// Approve-capacity was asked of a node that reports nothing above its ceiling.
    #[error("node {0} reports nothing above its capacity ceiling: nothing to approve")]
    NothingToApprove(NodeId),
    /// Resolve named an agent install the node was never seen with.
    #[error(
        "node {0} has seen no agent install {1}: `outpost nodes show {0}` lists its installs (16 hex digits)"
    )]
    NoSuchInstall(NodeId, String),
    /// Resolve was asked of a node with one agent install.
    #[error("node {0} is not in conflict: one agent install uses its identity")]
    NoConflict(NodeId),
    /// An adopted instance stays on the node that held it.
    #[error(
        "instance {0} was adopted from its node and is pinned there: delete it, or create it anew elsewhere"
    )]
    Pinned(String),
    /// An instance's image has another architecture than the one asked.
    #[error("image {0} is {1}: it cannot run as {2}")]
    ImageArch(String, Arch, Arch),
}
