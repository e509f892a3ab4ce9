//! What agents say: status, inventory, reports, holdings, events and notices, folded into the
//! fleet's view. A node that holds what the store does not know is adopted, never wiped.

use std::collections::{BTreeMap, BTreeSet};

use outpost_firmware_config::enrolled::Enrolled;

use outpost_protocol::{
    AckResult, Addresses, AgentEvent, BootId, DesiredInstance, Digest, ErrorKind, FetchState,
    Holding, InstanceId, InstanceState, Inventory, Nic, NodeId, NodeReport, NodeStatus, Presence,
    Version,
};

use super::records::{InstanceRecord, MAX_CONFLICTING, NodeRecord, Phase};
use super::{FetchProgress, Fleet};

impl Fleet {
    /// A node's retained status (online on connect, offline as its Last Will).
    pub fn on_status(&mut self, now_ms: u64, node: &NodeId, st: NodeStatus) {
        if st.presence == Presence::Offline && !self.nodes.contains_key(node) {
            // The Last Will of a node this fleet does not know (or just removed): nothing to
            // register.
            return;
        }
        self.nodes
            .entry(node.clone())
            .or_insert_with(|| NodeRecord::new(node.clone()));
        if st.presence == Presence::Online && st.boot.0 != 0 {
            // Before the session order: a copy's connection may carry the older session.
            self.check_install(node, st.boot);
        }
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        // Sessions are compared for equality only, never by size: a device's numbers may
        // come from a clock that is wrong. A connection's online status makes it the node's
        // current one; a Last Will counts only for the current connection (a late one of an
        // older connection, delivered after the new one came up, says nothing).
        if st.presence == Presence::Offline && n.session != 0 && st.session != n.session {
            return;
        }
        n.session = st.session;
        let was = n.online;
        n.online = st.presence == Presence::Online;
        if n.online {
            n.lost = false;
        }
        let now_online = n.online;
        n.last_seen_ms = now_ms;
        self.journal.nodes.insert(node.clone());
        if n.online {
            // Whatever it holds, it gets the latest desired state again.
            self.journal.publish.insert(node.clone());
        }
        self.sync_availability(node);
        if was != now_online {
            let kind = if now_online {
                "connected"
            } else {
                "disconnected"
            };
            self.actor_as("node", |f| f.node_event(node, kind, String::new()));
        }
    }

    /// The capacity each device was enrolled with (from the provisioning registry): a node's
    /// first ceiling, where its first report would otherwise be trusted. A node that already
    /// has a ceiling keeps it (raised only by `outpost nodes approve-capacity`).
    pub fn set_enrolled(&mut self, enrolled: BTreeMap<NodeId, Enrolled>) {
        self.enrolled = enrolled;
    }

    /// An agent install connected as `node`. The first one is bound to it (its desired states
    /// name that install); any other puts the node in conflict: the same flashed identity on
    /// two boxes (a copied SD card), or an agent reinstalled without its state. Nothing new is
    /// placed there, an install that holds none of the node's state builds nothing, and an
    /// operator chooses with `outpost nodes resolve`.
    fn check_install(&mut self, node: &NodeId, boot: BootId) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        let bound = match n.boot {
            None => {
                n.boot = Some(boot);
                self.bump(node);
                return;
            }
            Some(b) if b == boot || n.conflict.contains(&boot) => return,
            Some(b) => b,
        };
        if n.conflict.len() >= MAX_CONFLICTING {
            return;
        }
        n.conflict.push(boot);
        let what = format!(
            "two agent installs use this node's identity: {bound} (bound) and {boot}; nothing new is placed here and an install without the node's state builds nothing until `outpost nodes resolve {node} --keep BOOT-ID`"
        );
        tracing::error!(%node, %bound, other = %boot, "node identity in use by two agent installs");
        n.notice = Some(format!("conflict: {what}"));
        self.sync_availability(node);
        self.actor_as("node", |f| f.node_event(node, "identity-conflict", what));
    }

    /// A node's instances' addresses (retained; each message replaces the one before). Shown
    /// only with instances placed on that node, so a node cannot speak for another's.
    pub fn on_addresses(&mut self, node: &NodeId, a: Addresses) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.addresses = a
                .instances
                .into_iter()
                .map(|i| (i.id, i.nics.into_iter().collect()))
                .collect();
        }
    }

    /// An instance's interfaces, as its node last said.
    pub fn addresses_of(&self, i: &InstanceRecord) -> &[Nic] {
        i.node
            .as_ref()
            .and_then(|n| self.nodes.get(n))
            .and_then(|n| n.addresses.get(&i.id))
            .map_or(&[], Vec::as_slice)
    }

    /// A node's inventory. Its capacity counts only up to the node's ceiling (the capacity it
    /// was enrolled with, else its first report; or what an operator approved since): a device claiming more (to draw every placement
    /// and its cloud-init secrets) is clamped, with a notice and an event, until an operator
    /// says `outpost nodes approve-capacity`.
    pub fn on_inventory(&mut self, now_ms: u64, node: &NodeId, mut inv: Inventory) {
        let n = self
            .nodes
            .entry(node.clone())
            .or_insert_with(|| NodeRecord::new(node.clone()));
        n.last_seen_ms = now_ms;
        let first = self
            .enrolled
            .get(node)
            .map_or(inv.total, |e| e.ceiling(inv.total));
        let ceiling = *n.ceiling.get_or_insert(first);
        if !ceiling.contains(inv.total) {
            let claimed = inv.total;
            inv.total = claimed.min(ceiling);
            let new = n.over_ceiling != Some(claimed);
            n.over_ceiling = Some(claimed);
            let what = format!(
                "reports {} vCPUs, {} MiB, {} GiB, above its ceiling of {} vCPUs, {} MiB, {} GiB: counted at the ceiling until `outpost nodes approve-capacity {node}`",
                claimed.vcpus,
                claimed.memory_mib,
                claimed.disk_gib,
                ceiling.vcpus,
                ceiling.memory_mib,
                ceiling.disk_gib
            );
            n.notice = Some(format!("capacity: {what}"));
            if new {
                tracing::warn!(%node, "{what}");
                self.journal.nodes.insert(node.clone());
                self.actor_as("node", |f| {
                    f.node_event(node, "capacity-above-ceiling", what)
                });
            }
        } else if n.over_ceiling.take().is_some() {
            n.notice = None;
        }
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        if n.inventory.as_ref() != Some(&inv) {
            let done: Vec<Digest> = n
                .prefetch
                .iter()
                .map(|b| b.digest)
                .filter(|d| inv.cached.contains(d))
                .collect();
            n.inventory = Some(inv);
            self.journal.nodes.insert(node.clone());
            self.sync_host(node, now_ms);
            for d in done {
                self.fetches.remove(&(node.clone(), d));
                self.prefetch_ended(node, &d);
            }
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
        n.used = r.usage.used;
        let behind = r.generation < n.generation;
        let came_back = !n.online && n.session > 0;
        let foreign = n.foreign.is_some();
        if came_back {
            n.online = true;
            self.journal.nodes.insert(node.clone());
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
            self.journal.publish.insert(node.clone());
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
                n.foreign = Some(Box::new(h));
                self.journal.nodes.insert(node.clone());
                self.sync_availability(node);
                return;
            }
            _ => {}
        }
        let ahead = h.held.filter(|v| v.generation > n.generation);
        if n.foreign.take().is_some() {
            self.journal.nodes.insert(node.clone());
            self.sync_availability(node);
        }
        let adopted = self.adopt_from(now_ms, node, &h.instances);
        if let Some(v) = ahead {
            tracing::warn!(%node, held = v.generation, ours = self.nodes.get(node).map_or(0, |n| n.generation),
                "node holds a newer desired state than the store (restored backup or lost log): replacing it, keeping its instances");
            if let Some(n) = self.nodes.get_mut(node) {
                n.replaces = Some(v);
                n.generation = v.generation;
            }
        }
        if adopted > 0 || ahead.is_some() {
            self.bump(node);
        }
    }

    /// Adopts the instances of `held` that this store neither knows nor deleted, onto `node`
    /// (the store is behind its nodes: an older backup, a lost log, or an operator's `nodes
    /// adopt`). Returns how many.
    ///
    /// A node can only ever affect itself this way: an adopted instance is pinned to the node
    /// that held it (never rebuilt or moved elsewhere without an operator), counts against
    /// the node's instance cap, never takes a name in use, and may name only blobs the node
    /// already holds verified (so that it cannot unlock catalogue images or other instances'
    /// cloud-init parts). What breaks a rule is not adopted: it keeps running on its node,
    /// listed as unaccounted, with an event saying why.
    pub(super) fn adopt_from(
        &mut self,
        now_ms: u64,
        node: &NodeId,
        held: &[DesiredInstance],
    ) -> usize {
        let mut adopted = 0;
        for di in held {
            if self.instances.contains_key(&di.id) || self.tombstones.contains(&di.id) {
                continue;
            }
            if let Err(why) = self.may_adopt(node, di) {
                tracing::warn!(%node, id = %di.id, name = %di.name, %why, "not adopting an instance the node holds");
                self.actor_as("node", |f| {
                    f.node_event(
                        node,
                        "adoption-refused",
                        format!("{} ({}): {why}", di.name, di.id),
                    );
                });
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
                    power_mode: di.power_mode,
                    placement: format!("adopted from {node}"),
                    phase: Phase::Scheduled,
                    node: Some(node.clone()),
                    failures: Vec::new(),
                    reason: format!(
                        "adopted from {node}: it held this instance, unknown to the store"
                    ),
                    created_ms: now_ms,
                    adopted: true,
                },
            );
            self.touch_instance(di.id);
            self.actor_as("node", |f| {
                f.instance_event(
                    di.id,
                    "adopted",
                    format!("held by {node}, unknown to the store: pinned there"),
                );
            });
            adopted += 1;
        }
        adopted
    }

    /// Why `node` may not hand `di` to this fleet, if it may not.
    fn may_adopt(&self, node: &NodeId, di: &DesiredInstance) -> Result<(), String> {
        if self.is_full(node) {
            return Err(format!(
                "the node is at its limit of {} instances",
                outpost_protocol::limits::MAX_INSTANCES_PER_NODE
            ));
        }
        let cached = self
            .nodes
            .get(node)
            .and_then(|n| n.inventory.as_ref())
            .map(|i| &i.cached);
        if let Some(b) = di
            .spec
            .blobs()
            .find(|b| !cached.is_some_and(|c| c.contains(&b.digest)))
        {
            return Err(format!(
                "it names blob {} that the node does not hold",
                b.digest
            ));
        }
        Ok(())
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

    /// A node sent more than its share of messages (see [`crate::inbound`]): `dropped` of
    /// them were dropped before they were handled. Said on the node (a notice), and in its
    /// history once per flood.
    pub fn on_flood(&mut self, node: &NodeId, dropped: u64) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        let first = !n
            .notice
            .as_deref()
            .is_some_and(|x| x.starts_with("flooding"));
        n.notice = Some(format!(
            "flooding: {dropped} messages dropped in the last seconds (past its rate limit)"
        ));
        tracing::warn!(%node, dropped, "node past its message rate limit: messages dropped");
        if first {
            self.node_event(
                node,
                "flooding",
                format!("{dropped} messages dropped past its rate limit"),
            );
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
                    // Past the held generation: an equal one would read as a replay of what
                    // the node holds, whatever ours contains.
                    n.generation = *current;
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
                    n.foreign = Some(Box::new(Holding {
                        held: Some(*held),
                        ..Holding::default()
                    }));
                    self.journal.nodes.insert(node.clone());
                    self.sync_availability(node);
                }
            }
            AgentEvent::Ack {
                result: AckResult::OtherInstall { mine },
                ..
            } => {
                if mine.0 != 0 {
                    self.check_install(node, *mine);
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
            AgentEvent::Fetch {
                digest,
                done,
                total,
                rate,
                state,
                reason,
            } => {
                // Kept only for a blob the node was asked for: what a node says of others
                // would grow this table without bound.
                if !self.asks_for(node, digest) {
                    return;
                }
                let p = FetchProgress {
                    done: *done,
                    total: *total,
                    rate: *rate,
                    state: *state,
                    reason: reason.as_str().to_owned(),
                    at_ms: now_ms,
                };
                match state {
                    FetchState::Cached => {
                        self.fetches.remove(&(node.clone(), *digest));
                        self.prefetch_ended(node, digest);
                    }
                    FetchState::Failed => {
                        self.fetches.insert((node.clone(), *digest), p);
                        self.prefetch_ended(node, digest);
                    }
                    FetchState::Running => {
                        self.fetches.insert((node.clone(), *digest), p);
                    }
                }
            }
        }
    }

    /// Folds one observed instance state into the view.
    pub(super) fn observe(
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
            InstanceState::Downloading => Phase::Downloading,
            InstanceState::Building => Phase::Building,
            InstanceState::Running => Phase::Running,
            InstanceState::Stopped => Phase::Stopped,
            InstanceState::Crashed => Phase::Crashed,
            InstanceState::Deleted => {
                if i.phase == Phase::Deleting {
                    self.actor_as("node", |f| {
                        f.instance_event(id, "deleted", format!("{node} removed it"));
                    });
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
                if build_failure(kind)
                    && matches!(
                        i.phase,
                        Phase::Scheduled | Phase::Downloading | Phase::Building
                    )
                {
                    if let Some(n) = self.nodes.get_mut(node) {
                        n.failures_ms.push(now_ms);
                        self.journal.nodes.insert(node.clone());
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
            let new_phase = i.phase != phase;
            i.phase = phase;
            if !reason.is_empty() {
                i.reason = reason.to_owned();
            } else if phase == Phase::Running {
                i.reason.clear();
            }
            self.touch_instance(id);
            if new_phase || !reason.is_empty() {
                self.actor_as("node", |f| {
                    f.instance_event(id, phase.as_str(), reason.to_owned());
                });
            }
        }
    }
}

/// Whether an error kind means "this node could not build it" (retry elsewhere).
pub(super) fn build_failure(kind: ErrorKind) -> bool {
    !matches!(kind, ErrorKind::InvalidSpec)
}
