//! What changed since the shell last looked (one journal for nodes, instances, groups,
//! removals, tombstones and the desired states to publish), and each node's desired state.

use std::collections::BTreeSet;

use outpost_protocol::limits::MAX_PREFETCH;
use outpost_protocol::{
    DesiredInstance, DesiredState, Digest, FetchFrom, InstanceId, InstanceName, NodeId, Version,
};

use super::events::EventRecord;
use super::images::ImageRecord;
use super::records::{InstanceRecord, NodeRecord, Phase};
use super::{Fleet, fallback_name};
use crate::scheduler::GroupPolicy;

/// The ids of what changed since the last [`Fleet::take_changes`].
#[derive(Debug, Default)]
pub struct Journal {
    /// Nodes to store.
    pub nodes: BTreeSet<NodeId>,
    /// Instances to store.
    pub instances: BTreeSet<InstanceId>,
    /// Instances to remove from the store.
    pub removed: BTreeSet<InstanceId>,
    /// Server groups to store.
    pub groups: BTreeSet<String>,
    /// Nodes whose desired state to publish.
    pub publish: BTreeSet<NodeId>,
    /// Instances deleted for good.
    pub tombstones: Vec<InstanceId>,
    /// Nodes removed by an operator.
    pub removed_nodes: BTreeSet<NodeId>,
    /// Removed nodes whose agent connected anew.
    pub readmitted: BTreeSet<NodeId>,
    /// Catalogue images to store, by name and version.
    pub images: BTreeSet<(String, String)>,
    /// Catalogue images to remove.
    pub removed_images: BTreeSet<(String, String)>,
    /// Events to store.
    pub events: Vec<EventRecord>,
    /// Blobs nothing refers to any more (deleted instances' seed parts).
    pub dropped_blobs: Vec<Digest>,
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
    /// Nodes to remove from the store (their tombstones kept: see
    /// [`Fleet::is_removed`]); the shell clears their retained topics once stored.
    pub removed_nodes: Vec<NodeId>,
    /// Removed nodes admitted again: their tombstones go.
    pub readmitted: Vec<NodeId>,
    /// Catalogue images to upsert.
    pub images: Vec<ImageRecord>,
    /// Catalogue images to remove (name, version).
    pub removed_images: Vec<(String, String)>,
    /// Events to store (and stream once stored).
    pub events: Vec<EventRecord>,
    /// Blobs to delete from the blob store once the rest is stored.
    pub dropped_blobs: Vec<Digest>,
}

impl Changes {
    /// Something to write to the store (anything but desired states to publish).
    pub fn stores_anything(&self) -> bool {
        !(self.nodes.is_empty()
            && self.instances.is_empty()
            && self.removed.is_empty()
            && self.groups.is_empty()
            && self.tombstones.is_empty()
            && self.removed_nodes.is_empty()
            && self.readmitted.is_empty()
            && self.images.is_empty()
            && self.removed_images.is_empty()
            && self.events.is_empty())
    }

    /// Nothing to store or publish.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.removed_nodes.is_empty()
            && self.readmitted.is_empty()
            && self.instances.is_empty()
            && self.removed.is_empty()
            && self.groups.is_empty()
            && self.publish.is_empty()
            && self.images.is_empty()
            && self.removed_images.is_empty()
            && self.events.is_empty()
    }
}

impl Fleet {
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
                    power_mode: i.power_mode,
                    spec: i.spec.clone(),
                })
                // The instance cap is a scheduler filter and adoption keeps to it: never more
                // than the wire carries (the rest would be a bug, not a panic).
                .take(outpost_protocol::limits::MAX_INSTANCES_PER_NODE)
                .collect(),
            gone: self.gone_for(node).into_iter().collect(),
            fetch: self.cfg.image_url.clone().map(|url| FetchFrom {
                url,
                // A revoked device gets no token (all zeros: refused).
                token: self.blob_token(node).unwrap_or([0; 32]),
            }),
            prefetch: n
                .map(|n| n.prefetch.iter().copied().take(MAX_PREFETCH).collect())
                .unwrap_or_default(),
            boot: n.and_then(|n| n.boot),
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
        let mut publish = std::mem::take(&mut self.journal.publish);
        // A node bound to another fleet would refuse anything we send until it is adopted.
        publish.retain(|n| self.nodes.get(n).is_none_or(|n| n.foreign.is_none()));
        for n in &publish {
            let gone = self.gone_for(n);
            if let Some(rec) = self.nodes.get_mut(n) {
                rec.published_gone = gone;
            }
        }
        let tombstones = std::mem::take(&mut self.journal.tombstones);
        let removed_nodes = std::mem::take(&mut self.journal.removed_nodes)
            .into_iter()
            .collect();
        Changes {
            removed_nodes,
            readmitted: std::mem::take(&mut self.journal.readmitted)
                .into_iter()
                .collect(),
            tombstones,
            images: std::mem::take(&mut self.journal.images)
                .into_iter()
                .filter_map(|k| self.images.get(&k).cloned())
                .collect(),
            removed_images: std::mem::take(&mut self.journal.removed_images)
                .into_iter()
                .collect(),
            events: std::mem::take(&mut self.journal.events),
            dropped_blobs: std::mem::take(&mut self.journal.dropped_blobs),
            nodes: std::mem::take(&mut self.journal.nodes)
                .iter()
                .filter_map(|n| self.nodes.get(n).cloned())
                .collect(),
            instances: std::mem::take(&mut self.journal.instances)
                .iter()
                .filter_map(|i| self.instances.get(i).cloned())
                .collect(),
            removed: std::mem::take(&mut self.journal.removed)
                .into_iter()
                .collect(),
            groups: std::mem::take(&mut self.journal.groups)
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
        self.journal.nodes.extend(c.nodes.into_iter().map(|n| n.id));
        for i in c.instances {
            if self.instances.contains_key(&i.id) {
                self.journal.instances.insert(i.id);
            }
        }
        self.journal.removed.extend(c.removed);
        self.journal
            .groups
            .extend(c.groups.into_iter().map(|(g, _)| g));
        self.journal.tombstones.extend(c.tombstones);
        self.journal.removed_nodes.extend(c.removed_nodes);
        self.journal.readmitted.extend(c.readmitted);
        for i in c.images {
            let k = (i.name, i.version);
            if self.images.contains_key(&k) {
                self.journal.images.insert(k);
            }
        }
        self.journal.removed_images.extend(c.removed_images);
        // Before any taken since (a commit may be in flight while the next batch runs).
        let newer = std::mem::replace(&mut self.journal.events, c.events);
        self.journal.events.extend(newer);
        self.journal.dropped_blobs.extend(c.dropped_blobs);
        self.journal
            .publish
            .extend(c.publish.into_iter().map(|(n, _)| n));
    }

    pub(super) fn touch_instance(&mut self, id: InstanceId) {
        self.journal.instances.insert(id);
    }

    /// The leader epoch the next generations are written in (see
    /// [`outpost_protocol::EPOCH_SHIFT`]).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Desired states that could not be published (the broker is away): published again with
    /// the next batch.
    pub fn publish_again(&mut self, nodes: impl IntoIterator<Item = NodeId>) {
        self.journal.publish.extend(nodes);
    }

    /// A node's desired state changed: new generation, publish it.
    pub(super) fn bump(&mut self, node: &NodeId) {
        if let Some(n) = self.nodes.get_mut(node) {
            match n.generation.checked_add(1) {
                Some(g) => n.generation = g.max(outpost_protocol::epoch_floor(self.epoch)),
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
            self.journal.nodes.insert(node.clone());
            self.journal.publish.insert(node.clone());
        }
    }
}
