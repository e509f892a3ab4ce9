//! The action layer between the HTTP API and the service loop (like Firecracker's
//! `rpc_interface`): the API turns each request into one [`Action`]; the service loop runs it
//! against the fleet with [`execute`] and answers with a typed [`Reply`] or an
//! [`ActionError`]. Only the API knows HTTP status codes; nothing here reads a clock or a random
//! source (the loop passes the time and the id of a new instance in), so executing an action is
//! deterministic.

use outpost_protocol::{Arch, BlobRef, Digest, InstanceId, NodeId, PowerMode, PowerState};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::fleet::images::{BlobSource, ImageFormat, ImageRecord};
use crate::fleet::{Fleet, FleetError};
use crate::views::{CreateBody, CreateError, EventView, ImageView, InstanceView, NodeView};

/// What an API caller asks of the fleet. Names and ids are as the caller typed them.
#[derive(Debug)]
pub enum Action {
    /// Blobs a refused create stored (its cloud-init parts): removed unless something else
    /// refers to them.
    ForgetBlobs(Vec<outpost_protocol::Digest>),
    /// All nodes.
    ListNodes,
    /// One node.
    GetNode(String),
    /// Stop placements on a node.
    CordonNode(String),
    /// Resume placements on a node.
    UncordonNode(String),
    /// Cordon a node and move its instances elsewhere.
    DrainNode(String),
    /// Adopt a node bound to another fleet, with the instances it holds.
    AdoptNode(String),
    /// Accept the capacity a node reports above its ceiling.
    ApproveCapacity(String),
    /// End a node's identity conflict: bind it to this agent install (its boot id).
    ResolveNode(String, String),
    /// Remove a node for good (`force`: move its instances elsewhere first).
    RemoveNode(String, bool),
    /// Set (`key=value`) or remove (`key-`) a node's labels on the controller.
    LabelNode(String, Vec<String>),
    /// All instances (and those held by nodes of another fleet).
    ListInstances,
    /// One instance, by name or id.
    GetInstance(String),
    /// Create an instance.
    CreateInstance(Box<CreateBody>),
    /// Stop an instance (forced, or with the guest's grace).
    StopInstance(String, PowerMode),
    /// Start an instance.
    StartInstance(String),
    /// Reboot an instance (a reset when forced).
    RebootInstance(String, PowerMode),
    /// Delete an instance; `force`: at once if its node is down.
    DeleteInstance(String, bool),
    /// The image catalogue.
    ListImages,
    /// One image, by `name[:version]`.
    GetImage(String),
    /// Add an image (its version `None`: the next number for its name).
    AddImage(Box<NewImage>),
    /// Delete an image (refused while instances use it).
    DeleteImage(String),
    /// Seed the nodes carrying every label of `selector` (`key=value`) with an image.
    PrefetchImage {
        /// The image.
        key: String,
        /// Labels the nodes must carry.
        selector: Vec<String>,
        /// At most this many nodes fetching at once.
        concurrency: usize,
    },
    /// Where an instance's console is: its id, its node, and whether that node is up.
    ConsoleTarget(String),
    /// The history of one instance (by name or id; kept after it is deleted).
    InstanceEvents(String),
    /// The fleet at a glance: every node, instances by phase, the scheduler's decisions.
    Overview,
    /// The fleet's history after sequence number `since`, optionally only one node's.
    Events {
        /// Only events after this one.
        since: u64,
        /// Only this node's (and its instances').
        node: Option<String>,
    },
    /// May `node`, showing `token`, fetch this blob, and from where?
    BlobAccess {
        /// The node.
        node: String,
        /// Its bearer token.
        token: Vec<u8>,
        /// The blob.
        digest: Digest,
    },
}

/// An image to add to the catalogue: its content is already in the blob store (or at `url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    /// Its name.
    pub name: String,
    /// Its version (`None`: the next number).
    pub version: Option<String>,
    /// Its content.
    pub blob: BlobRef,
    /// Its architecture, when known.
    pub arch: Option<Arch>,
    /// What it is.
    pub format: ImageFormat,
    /// Where nodes fetch it, if not from the controller.
    pub url: Option<String>,
}

impl Action {
    /// Whether it changes the fleet (refused while the store cannot be written).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Self::ListNodes
                | Self::GetNode(_)
                | Self::ListInstances
                | Self::GetInstance(_)
                | Self::ListImages
                | Self::GetImage(_)
                | Self::BlobAccess { .. }
                | Self::InstanceEvents(_)
                | Self::Overview
                | Self::ConsoleTarget(_)
                | Self::Events { .. }
        )
    }
}

/// The answer to an action, serialized as the API's JSON body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// Nodes.
    Nodes(Vec<NodeView>),
    /// One node.
    Node(Box<NodeView>),
    /// A drain: how many instances moved, and the ones that could not (`id: why`).
    Drained {
        /// Moved.
        moved: usize,
        /// Could not move.
        stuck: Vec<String>,
    },
    /// An adopted node and how many instances it brought.
    Adopted {
        /// The node.
        #[serde(flatten)]
        node: Box<NodeView>,
        /// Instances adopted.
        adopted: usize,
    },
    /// Instances.
    Instances(Vec<InstanceView>),
    /// One instance.
    Instance(Box<InstanceView>),
    /// A node removed, and how many instances moved off it.
    RemovedNode {
        /// The node.
        id: String,
        /// Instances moved elsewhere first.
        moved: usize,
        /// Instances that could not move, deleted with the (down) node.
        deleted: Vec<String>,
    },
    /// An instance deleted at once (it had no node).
    Deleted {
        /// Its id.
        id: String,
        /// Always `deleted`.
        phase: &'static str,
    },
    /// Images.
    Images(Vec<ImageView>),
    /// One image.
    Image(Box<ImageView>),
    /// An image removed from the catalogue.
    ImageDeleted {
        /// `name:version`.
        image: String,
        /// Its content, when no other image refers to it any more (the shell deletes it).
        #[serde(skip)]
        unreferenced: Option<Digest>,
    },
    /// Where a node fetches a blob.
    #[serde(skip)]
    Blob(BlobSource),
    /// Events.
    Events(Vec<EventView>),
    /// The fleet at a glance.
    Overview(Box<crate::views::OverviewView>),
    /// Where an instance's console is.
    #[serde(skip)]
    ConsoleTarget {
        /// The instance.
        id: InstanceId,
        /// Its node.
        node: NodeId,
        /// Whether the node is connected.
        up: bool,
    },
    /// A prefetch started.
    Prefetch {
        /// `name:version`.
        image: String,
        /// Nodes that will fetch it.
        queued: Vec<String>,
        /// Nodes that hold it already.
        cached: Vec<String>,
    },
    /// Done, nothing to say.
    #[serde(skip)]
    Done,
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The fleet refused it.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] CreateError),
    /// The store cannot be written; the change was not made.
    #[error(
        "the store cannot be written ({0}): changes are refused until it can; reads still work"
    )]
    StoreDown(String),
    /// The store failed while storing this change: it is not stored (it may still be, if the
    /// store recovers while this controller leads); retrying is safe.
    #[error(
        "the store failed while storing this change ({0}): not stored, retry (safe: names are unique and deletes and power changes are idempotent, so a change stored meanwhile is not made twice)"
    )]
    NotStored(String),
    /// The controller has lost its broker: a change could not reach its nodes.
    #[error(
        "this controller has lost its MQTT broker ({0}): changes are refused until it is back (or a standby that reaches the broker takes over); retry"
    )]
    BrokerDown(String),
    /// The controller is starting (its store is loading): nothing is answered yet.
    #[error("the controller is starting up: try again in a moment")]
    Starting,
    /// This controller is a standby: another leads (its name and API URL, if known).
    #[error("{}", not_leader(.0))]
    NotLeader(Option<(String, String)>),
    /// The service loop is gone.
    #[error("the controller is shutting down")]
    ShuttingDown,
}

fn not_leader(leader: &Option<(String, String)>) -> String {
    match leader {
        Some((name, api)) => {
            format!("this controller is a standby: the leader is {name} at {api}")
        }
        None => "this controller is a standby and no controller leads right now (a takeover is under way): try again in a few seconds".to_owned(),
    }
}

/// Where an action's answer goes.
pub type Responder = oneshot::Sender<Result<Reply, ActionError>>;

/// An action, who asks, where to send its answer, and when it arrived.
pub type Call = (Action, String, Responder, std::time::Instant);

fn node_id(s: &str) -> Result<NodeId, FleetError> {
    NodeId::new(s).map_err(|_| FleetError::NoNode(s.to_owned()))
}

fn node_view(fleet: &Fleet, id: &NodeId) -> Result<Box<NodeView>, FleetError> {
    let n = fleet
        .node(id)
        .ok_or_else(|| FleetError::NoNode(id.to_string()))?;
    let held = fleet.instance_counts().get(id).copied().unwrap_or(0);
    Ok(Box::new(NodeView::of(n, fleet, held)))
}

fn instance_reply(fleet: &Fleet, id: InstanceId) -> Reply {
    match fleet.get(id) {
        Some(i) => Reply::Instance(Box::new(InstanceView::of(i, fleet))),
        None => Reply::Deleted {
            id: id.to_string(),
            phase: "deleted",
        },
    }
}

/// Runs one action against the fleet at `now` (ms since the epoch); `new_id` is the id a
/// created instance gets.
pub fn execute(
    fleet: &mut Fleet,
    now: u64,
    new_id: InstanceId,
    action: Action,
) -> Result<Reply, ActionError> {
    Ok(match action {
        Action::ListNodes => {
            let counts = fleet.instance_counts();
            Reply::Nodes(
                fleet
                    .nodes()
                    .map(|n| NodeView::of(n, fleet, counts.get(&n.id).copied().unwrap_or(0)))
                    .collect(),
            )
        }
        Action::GetNode(id) => Reply::Node(node_view(fleet, &node_id(&id)?)?),
        Action::CordonNode(id) => {
            let n = node_id(&id)?;
            fleet.cordon(&n, true)?;
            Reply::Node(node_view(fleet, &n)?)
        }
        Action::UncordonNode(id) => {
            let n = node_id(&id)?;
            fleet.cordon(&n, false)?;
            Reply::Node(node_view(fleet, &n)?)
        }
        Action::DrainNode(id) => {
            let (moved, stuck) = fleet.drain(&node_id(&id)?)?;
            Reply::Drained { moved, stuck }
        }
        Action::AdoptNode(id) => {
            let n = node_id(&id)?;
            let adopted = fleet.adopt(now, &n)?;
            tracing::warn!(node = %n, adopted, "operator adopted a node from another fleet");
            Reply::Adopted {
                node: node_view(fleet, &n)?,
                adopted,
            }
        }
        Action::ApproveCapacity(id) => {
            let n = node_id(&id)?;
            let approved = fleet.approve_capacity(&n)?;
            tracing::warn!(node = %n, ?approved, "operator approved a node's capacity");
            Reply::Node(node_view(fleet, &n)?)
        }
        Action::ResolveNode(id, keep) => {
            let n = node_id(&id)?;
            let keep = keep
                .parse()
                .map_err(|_| FleetError::NoSuchInstall(n.clone(), keep.clone()))?;
            fleet.resolve(&n, keep)?;
            tracing::warn!(node = %n, %keep, "operator resolved a node's identity conflict");
            Reply::Node(node_view(fleet, &n)?)
        }
        Action::LabelNode(id, changes) => {
            let n = node_id(&id)?;
            fleet.label(&n, &changes)?;
            Reply::Node(node_view(fleet, &n)?)
        }
        Action::RemoveNode(id, force) => {
            let (moved, deleted) = fleet.remove_node(&node_id(&id)?, force)?;
            Reply::RemovedNode { id, moved, deleted }
        }
        Action::ListInstances => Reply::Instances(
            fleet
                .instances()
                .map(|i| InstanceView::of(i, fleet))
                .chain(
                    fleet
                        .held_elsewhere()
                        .map(|(n, di)| InstanceView::held(n, di)),
                )
                .collect(),
        ),
        Action::GetInstance(key) => Reply::Instance(Box::new(InstanceView::of(
            fleet.instance(&key).ok_or(FleetError::NoInstance(key))?,
            fleet,
        ))),
        Action::ForgetBlobs(digests) => {
            fleet.forget_blobs(&digests);
            Reply::Done
        }
        Action::CreateInstance(body) => {
            let req = (*body).into_request(new_id, &|name| fleet.resolve_image(name))?;
            let id = fleet.create(now, req)?;
            instance_reply(fleet, id)
        }
        Action::StopInstance(key, mode) => {
            let id = fleet.set_power(&key, PowerState::Stopped, mode)?;
            instance_reply(fleet, id)
        }
        Action::StartInstance(key) => {
            let id = fleet.set_power(&key, PowerState::Running, PowerMode::default())?;
            instance_reply(fleet, id)
        }
        Action::RebootInstance(key, mode) => {
            let id = fleet.reboot(&key, mode)?;
            instance_reply(fleet, id)
        }
        Action::DeleteInstance(key, force) => {
            let id = fleet.delete(&key, force)?;
            instance_reply(fleet, id)
        }
        Action::ListImages => {
            Reply::Images(fleet.images().map(|i| ImageView::of(i, fleet)).collect())
        }
        Action::GetImage(key) => Reply::Image(Box::new(ImageView::of(
            fleet.image(&key).ok_or(FleetError::NoImage(key))?,
            fleet,
        ))),
        Action::AddImage(n) => {
            let version = n.version.unwrap_or_else(|| fleet.next_version(&n.name));
            let rec = ImageRecord {
                name: n.name,
                version,
                blob: n.blob,
                arch: n.arch,
                format: n.format,
                url: n.url,
                created_ms: now,
            };
            let key = rec.key();
            fleet.add_image(rec)?;
            Reply::Image(Box::new(ImageView::of(
                fleet.image(&key).ok_or(FleetError::NoImage(key))?,
                fleet,
            )))
        }
        Action::DeleteImage(key) => {
            let (rec, unreferenced) = fleet.delete_image(&key)?;
            Reply::ImageDeleted {
                image: rec.key(),
                unreferenced: (unreferenced && rec.url.is_none()).then_some(rec.blob.digest),
            }
        }
        Action::BlobAccess {
            node,
            token,
            digest,
        } => Reply::Blob(fleet.blob_access(&node_id(&node)?, &token, &digest)?),
        Action::ConsoleTarget(key) => {
            let i = fleet
                .instance(&key)
                .ok_or_else(|| FleetError::NoInstance(key.clone()))?;
            let node = i
                .node
                .clone()
                .ok_or_else(|| FleetError::NotPlaced(i.name.clone()))?;
            let up = fleet.node(&node).is_some_and(|n| n.online);
            Reply::ConsoleTarget { id: i.id, node, up }
        }
        Action::InstanceEvents(key) => {
            let id = fleet.instance(&key).map(|i| i.id);
            let list: Vec<EventView> = fleet
                .history()
                .after(0, |e| {
                    e.instance.as_ref().is_some_and(|(i, name)| {
                        Some(*i) == id || *name == key || i.to_string() == key
                    })
                })
                .map(EventView::from)
                .collect();
            if list.is_empty() && id.is_none() {
                return Err(FleetError::NoInstance(key).into());
            }
            Reply::Events(list)
        }
        Action::Overview => Reply::Overview(Box::new(crate::views::OverviewView::of(fleet))),
        Action::Events { since, node } => Reply::Events(
            fleet
                .history()
                .after(since, |e| {
                    node.as_ref()
                        .is_none_or(|n| e.node.as_ref().is_some_and(|x| x.as_str() == n))
                })
                .map(EventView::from)
                .collect(),
        ),
        Action::PrefetchImage {
            key,
            selector,
            concurrency,
        } => {
            let selector = selector
                .iter()
                .map(|l| {
                    outpost_protocol::Label::parse(l)
                        .map_err(|e| FleetError::BadLabel(l.clone(), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let image = fleet
                .image(&key)
                .map(ImageRecord::key)
                .ok_or_else(|| FleetError::NoImage(key.clone()))?;
            let s = fleet.prefetch(&key, &selector, concurrency)?;
            Reply::Prefetch {
                image,
                queued: s.queued.iter().map(ToString::to_string).collect(),
                cached: s.cached.iter().map(ToString::to_string).collect(),
            }
        }
    })
}
