//! What operators ask of the fleet: create, power, reboot, delete, cordon, drain, adopt; and
//! the placement that serves them.

use outpost_protocol::{
    Arch, BootId, InstanceId, InstanceSpec, Label, NodeId, PowerMode, PowerState, Resources,
};

use super::records::{CreateRequest, FleetError, InstanceRecord, Phase};
use super::{Fleet, LAST_REFUSALS, index, unindex};
use crate::scheduler::{GroupConstraint, GroupPolicy, NoValidHost, Request};

/// How a stop or reboot was asked, in words.
fn power_how(mode: PowerMode) -> String {
    match mode {
        PowerMode { force: true, .. } => "forced".into(),
        PowerMode {
            stop_timeout_secs: 0,
            ..
        } => String::new(),
        PowerMode {
            stop_timeout_secs: s,
            ..
        } => format!("stop timeout {s} s"),
    }
}

impl Fleet {
    /// Chooses a node for `spec` (the pure scheduler over the current table).
    pub(super) fn choose(
        &self,
        spec: &InstanceSpec,
        selector: &[Label],
        group: Option<(&str, GroupPolicy)>,
        exclude: &[NodeId],
        except: Option<InstanceId>,
    ) -> Result<(NodeId, String), NoValidHost> {
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
        self.scheduler.place(&self.table, &req).map(|p| {
            let why = format!(
                "score {:.3}, the best of {} hosts that passed the filters ({} hosts)",
                p.score,
                p.candidates,
                self.table.len()
            );
            (self.table.id(p.host).clone(), why)
        })
    }

    /// Counts a placement decision (for the metrics and the status page).
    fn tally(&mut self, outcome: Result<(), &NoValidHost>) {
        let s = &mut self.stats;
        match outcome {
            Ok(()) => s.placements += 1,
            Err(e) => {
                s.failures += 1;
                for (filter, _) in &e.removed {
                    *s.refusals.entry(filter.name()).or_default() += 1;
                }
                if s.last_refusals.len() == LAST_REFUSALS {
                    s.last_refusals.pop_front();
                }
                s.last_refusals.push_back((self.clock_ms, e.to_string()));
            }
        }
    }

    /// Creates and places an instance, or says at once why nothing fits (nothing is stored).
    pub fn create(
        &mut self,
        now_ms: u64,
        mut req: CreateRequest,
    ) -> Result<InstanceId, FleetError> {
        req.spec.validate()?;
        if self.instances.contains_key(&req.id) || self.by_name.contains_key(&req.name) {
            return Err(FleetError::Exists(req.name));
        }
        if let Some((g, p)) = &req.group
            && self.groups.get(g).is_some_and(|q| q != p)
        {
            return Err(FleetError::GroupPolicy(g.clone()));
        }
        self.table.track(req.spec.resources());
        let group = req.group.clone();
        let group = group.as_ref().map(|(g, p)| (g.as_str(), *p));
        let (node, placement) = match self.choose(&req.spec, &req.selector, group, &[], None) {
            Ok(n) => n,
            // Any architecture will do: the other ones, before the first refusal stands.
            Err(first) if req.any_arch => {
                let mut found = None;
                for arch in [Arch::X86_64, Arch::Aarch64] {
                    if arch == req.spec.arch {
                        continue;
                    }
                    let spec = InstanceSpec {
                        arch,
                        ..req.spec.clone()
                    };
                    if let Ok(n) = self.choose(&spec, &req.selector, group, &[], None) {
                        found = Some((n, spec));
                        break;
                    }
                }
                let Some((n, spec)) = found else {
                    self.tally(Err(&first));
                    return Err(first.into());
                };
                req.spec = spec;
                n
            }
            Err(e) => {
                self.tally(Err(&e));
                return Err(e.into());
            }
        };
        self.tally(Ok(()));
        if let Some((g, p)) = req.group.clone()
            && self.groups.insert(g.clone(), p).is_none()
        {
            self.journal.groups.insert(g);
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
                power_mode: PowerMode::default(),
                placement: format!("attempt 1: {placement}"),
                phase: Phase::Scheduled,
                node: Some(node.clone()),
                failures: Vec::new(),
                reason: String::new(),
                created_ms: now_ms,
                adopted: false,
            },
        );
        self.touch_instance(id);
        self.bump(&node);
        let what = {
            let i = &self.instances[&id];
            format!(
                "{} vCPUs, {} MiB, {} GiB, {}",
                i.spec.vcpus, i.spec.memory_mib, i.spec.disk_gib, i.spec.arch
            )
        };
        self.instance_event(id, "requested", what);
        self.instance_event(
            id,
            "scheduled",
            format!("on {node}: attempt 1: {placement}"),
        );
        Ok(id)
    }

    pub(super) fn get_mut(&mut self, key: &str) -> Result<&mut InstanceRecord, FleetError> {
        let id = self
            .instance(key)
            .map(|i| i.id)
            .ok_or_else(|| FleetError::NoInstance(key.to_owned()))?;
        self.instances
            .get_mut(&id)
            .ok_or_else(|| FleetError::NoInstance(key.to_owned()))
    }

    /// Changes an instance and republishes its node.
    pub(super) fn update(
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

    /// Asks for an instance to run or stop. Start means running: an instance already asked to
    /// run that stopped or crashed by itself gets a boot request (level-triggered, like a
    /// reboot), so its node starts it whatever its restart policy.
    /// `mode` says how a stop is carried out (forced, or the guest's grace).
    pub fn set_power(
        &mut self,
        key: &str,
        power: PowerState,
        mode: PowerMode,
    ) -> Result<InstanceId, FleetError> {
        let id = self.update(key, |i| {
            let down = matches!(i.phase, Phase::Stopped | Phase::Crashed);
            if power == PowerState::Running && i.power == PowerState::Running && down {
                i.reboot_count = i.reboot_count.saturating_add(1);
            }
            i.power = power;
            i.power_mode = mode;
        })?;
        let (kind, how) = match power {
            PowerState::Running => ("start-requested", String::new()),
            PowerState::Stopped => ("stop-requested", power_how(mode)),
        };
        self.instance_event(id, kind, how);
        Ok(id)
    }

    /// Asks for one reboot: a clean one (the power button, then a reset past the grace), or
    /// a reset at once when `mode.force`.
    pub fn reboot(&mut self, key: &str, mode: PowerMode) -> Result<InstanceId, FleetError> {
        let id = self.update(key, |i| {
            i.reboot_count = i.reboot_count.saturating_add(1);
            i.power = PowerState::Running;
            i.power_mode = mode;
        })?;
        self.instance_event(id, "reboot-requested", power_how(mode));
        Ok(id)
    }

    /// Deletes an instance: removed from its node's desired state; gone once the node confirms
    /// (or at once if it never had a node). With `force`, an instance whose node is down is
    /// gone at once (Nova's local delete): tombstoned, so that the node, if it ever returns,
    /// is told it is gone and deletes it. On a node that is up, `force` changes nothing: the
    /// node confirms as usual.
    pub fn delete(&mut self, key: &str, force: bool) -> Result<InstanceId, FleetError> {
        let i = self.get_mut(key)?;
        let (id, on) = (i.id, i.node.clone());
        let down = on
            .as_ref()
            .is_some_and(|n| self.nodes.get(n).is_none_or(|r| !r.online));
        match on {
            Some(node) if force && down => {
                self.instance_event(
                    id,
                    "deleted",
                    format!("forced while {node} is down: {node} is told it is gone if it returns"),
                );
                self.forget(id);
                self.bump(&node);
            }
            Some(node) => {
                let i = self.get_mut(key)?;
                i.phase = Phase::Deleting;
                self.touch_instance(id);
                self.bump(&node);
                self.instance_event(id, "deleting", format!("removing it from {node}"));
            }
            None => {
                self.instance_event(id, "deleted", String::new());
                self.forget(id);
            }
        }
        Ok(id)
    }

    /// Whether an instance or the image catalogue refers to blob `d`.
    pub fn blob_referenced(&self, d: &outpost_protocol::Digest) -> bool {
        self.instances
            .values()
            .any(|x| x.spec.blobs().any(|y| y.digest == *d))
            || self.images.values().any(|r| r.blob.digest == *d)
    }

    /// Every blob an instance or the catalogue refers to (what the blob store keeps).
    pub fn referenced_blobs(&self) -> std::collections::HashSet<outpost_protocol::Digest> {
        self.instances
            .values()
            .flat_map(|x| x.spec.blobs().map(|b| b.digest))
            .chain(self.images.values().map(|r| r.blob.digest))
            .collect()
    }

    /// Of `digests` (a refused create's cloud-init parts, a forgotten instance's), those
    /// nothing refers to are removed by the shell once the batch is stored.
    pub fn forget_blobs(&mut self, digests: &[outpost_protocol::Digest]) {
        for d in digests {
            if !self.blob_referenced(d) && !self.journal.dropped_blobs.contains(d) {
                self.journal.dropped_blobs.push(*d);
            }
        }
    }

    pub(super) fn forget(&mut self, id: InstanceId) {
        if let Some(i) = self.instances.remove(&id) {
            self.move_instance(id, i.spec.resources(), i.node.as_ref(), None);
            self.by_name.remove(&i.name);
            if let Some(g) = &i.group {
                unindex(&mut self.by_group, g, id);
            }
            // Its cloud-init parts, once nothing else refers to them: the shell deletes them.
            let parts: Vec<_> = i
                .spec
                .seed
                .iter()
                .flat_map(outpost_protocol::Seed::blobs)
                .map(|b| b.digest)
                .collect();
            self.forget_blobs(&parts);
        }
        self.journal.instances.remove(&id);
        self.journal.removed.insert(id);
        if self.tombstones.insert(id) {
            self.journal.tombstones.push(id);
        }
    }

    /// Cordons or uncordons a node.
    pub fn cordon(&mut self, node: &NodeId, on: bool) -> Result<(), FleetError> {
        let n = self.node_mut(node)?;
        n.cordoned = on;
        if !on {
            n.draining = false;
        }
        self.journal.nodes.insert(node.clone());
        self.sync_availability(node);
        let kind = if on { "cordoned" } else { "uncordoned" };
        self.node_event(node, kind, String::new());
        Ok(())
    }

    /// Drains a node: cordons it and moves each of its instances to another node (cold move:
    /// built there, then removed here). Returns how many moved and the ones that could not.
    pub fn drain(&mut self, node: &NodeId) -> Result<(usize, Vec<String>), FleetError> {
        let n = self.node_mut(node)?;
        n.cordoned = true;
        n.draining = true;
        self.journal.nodes.insert(node.clone());
        self.sync_availability(node);
        let ids: Vec<InstanceId> = self
            .on_node(node)
            .filter(|i| i.wanted_on_node())
            .map(|i| i.id)
            .collect();
        self.node_event(
            node,
            "draining",
            format!("moving {} instance(s)", ids.len()),
        );
        let (mut moved, mut stuck) = (0, Vec::new());
        for id in ids {
            match self.relocate(id, None) {
                Ok(()) => moved += 1,
                Err(e) => stuck.push(format!("{id}: {e}")),
            }
        }
        Ok((moved, stuck))
    }

    /// Sets (`key=value`) or removes (`key-`) labels of a node from the controller, over the
    /// ones flashed onto it, without re-flashing; placements see them at once.
    pub fn label(&mut self, node: &NodeId, changes: &[String]) -> Result<(), FleetError> {
        let mut parsed = Vec::new();
        for c in changes {
            parsed.push(
                super::records::parse_label_override(c)
                    .map_err(|e| FleetError::BadLabel(c.clone(), e))?,
            );
        }
        let n = self.node_mut(node)?;
        for (k, v) in parsed {
            n.label_overrides.retain(|(key, _)| *key != k);
            n.label_overrides.push((k, v));
        }
        if n.labels().len() > outpost_protocol::limits::MAX_LABELS {
            return Err(FleetError::BadLabel(
                changes.join(" "),
                format!("at most {} labels", outpost_protocol::limits::MAX_LABELS),
            ));
        }
        self.journal.nodes.insert(node.clone());
        self.sync_host(node, 0);
        self.node_event(node, "labeled", changes.join(" "));
        Ok(())
    }

    /// Removes a node an operator says is gone for good: refused while it holds instances,
    /// unless `force`, which first moves what can move elsewhere (rebuilt from its image);
    /// what cannot move (nothing fits, a group's policy) is deleted with the node if the node
    /// is down (tombstoned, each named in its history), and keeps the node if it is up (its
    /// agent still runs them: stop it first). Revoke its credentials too (`outpost-provision
    /// revoke`), or it comes back as new when it reports again. Returns how many instances
    /// moved, and the names of those deleted with the node.
    pub fn remove_node(
        &mut self,
        node: &NodeId,
        force: bool,
    ) -> Result<(usize, Vec<String>), FleetError> {
        let Some(rec) = self.nodes.get(node) else {
            return Err(FleetError::NoNode(node.to_string()));
        };
        let (was_cordoned, was_draining, up) = (rec.cordoned, rec.draining, rec.online);
        let held: Vec<String> = self.on_node(node).map(|i| i.name.clone()).collect();
        let mut moved = 0;
        let mut deleted = Vec::new();
        if !held.is_empty() {
            if !force {
                return Err(FleetError::NodeNotEmpty(node.clone(), held.join(", ")));
            }
            let (m, _) = self.drain(node)?;
            moved = m;
            let still: Vec<(InstanceId, String)> =
                self.on_node(node).map(|i| (i.id, i.name.clone())).collect();
            if !still.is_empty() && up {
                // Nothing is taken from a node that still runs it: put it back as it was.
                if let Some(n) = self.nodes.get_mut(node) {
                    n.cordoned = was_cordoned;
                    n.draining = was_draining;
                }
                self.sync_availability(node);
                let names: Vec<String> = still.into_iter().map(|(_, n)| n).collect();
                return Err(FleetError::CannotMove(
                    node.clone(),
                    names.join(", "),
                    moved,
                ));
            }
            for (id, name) in still {
                self.instance_event(
                    id,
                    "deleted",
                    format!("could not move off {node}, removed while down: rebuilt nowhere; {node} is told it is gone if it returns"),
                );
                self.forget(id);
                deleted.push(name);
            }
        }
        self.nodes.remove(node);
        if let Some(idx) = self.table.index_of(node) {
            // Its row stays (the table never shrinks) but takes no placements.
            self.table
                .set_availability(idx, crate::scheduler::Availability::Down);
        }
        self.journal.nodes.remove(node);
        self.journal.publish.remove(node);
        self.journal.removed_nodes.insert(node.clone());
        self.journal.readmitted.remove(node);
        self.removed.insert(node.clone());
        let detail = if deleted.is_empty() {
            format!("{moved} instance(s) moved first")
        } else {
            format!(
                "{moved} instance(s) moved first; deleted with it: {}",
                deleted.join(", ")
            )
        };
        self.node_event(node, "removed", detail);
        tracing::warn!(%node, moved, deleted = deleted.len(), "node removed by an operator");
        Ok((moved, deleted))
    }

    /// An operator ends a node's identity conflict by keeping agent install `keep` (one it
    /// was seen with): its desired states are for that install from now on (a new
    /// generation), and any other install that connects puts it in conflict again.
    pub fn resolve(&mut self, node: &NodeId, keep: BootId) -> Result<(), FleetError> {
        let n = self.node_mut(node)?;
        if n.conflict.is_empty() {
            return Err(FleetError::NoConflict(node.clone()));
        }
        if n.boot != Some(keep) && !n.conflict.contains(&keep) {
            return Err(FleetError::NoSuchInstall(node.clone(), keep.to_string()));
        }
        let dropped: Vec<String> = std::iter::once(n.boot)
            .flatten()
            .chain(n.conflict.drain(..))
            .filter(|b| *b != keep)
            .map(|b| b.to_string())
            .collect();
        n.boot = Some(keep);
        if n.notice
            .as_deref()
            .is_some_and(|x| x.starts_with("conflict"))
        {
            n.notice = None;
        }
        self.bump(node);
        self.sync_availability(node);
        self.node_event(
            node,
            "identity-resolved",
            format!("kept agent install {keep}; refused {}", dropped.join(", ")),
        );
        Ok(())
    }

    /// An operator accepts the capacity a node reports above its ceiling (new hardware, a
    /// changed reservation): it becomes the node's ceiling and counts at once.
    pub fn approve_capacity(&mut self, node: &NodeId) -> Result<Resources, FleetError> {
        let n = self.node_mut(node)?;
        let approved = n
            .over_ceiling
            .take()
            .ok_or_else(|| FleetError::NothingToApprove(node.clone()))?;
        n.ceiling = Some(approved);
        if let Some(inv) = &mut n.inventory {
            inv.total = approved;
        }
        n.notice = None;
        self.journal.nodes.insert(node.clone());
        self.sync_host(node, self.clock_ms);
        self.node_event(
            node,
            "capacity-approved",
            format!(
                "{} vCPUs, {} MiB, {} GiB",
                approved.vcpus, approved.memory_mib, approved.disk_gib
            ),
        );
        Ok(approved)
    }

    /// Moves an instance to a new node (excluding where it failed), or fails it for good.
    pub(super) fn relocate(
        &mut self,
        id: InstanceId,
        failed_on: Option<(NodeId, String)>,
    ) -> Result<(), FleetError> {
        let Some(i) = self.instances.get(&id) else {
            return Ok(());
        };
        if i.adopted {
            // Only its node ever said it exists: it is not rebuilt on another.
            let name = i.name.clone();
            if let Some((node, why)) = failed_on {
                let reason = format!(
                    "failed on {node}, which it was adopted from: {why} (pinned there, not rebuilt elsewhere)"
                );
                if let Some(i) = self.instances.get_mut(&id) {
                    i.phase = Phase::Error;
                    i.reason = reason.clone();
                }
                self.touch_instance(id);
                self.instance_event(id, "error", reason);
                return Ok(());
            }
            return Err(FleetError::Pinned(name));
        }
        self.table.track(i.spec.resources());
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
        if let Some(c) = &choice {
            self.tally(c.as_ref().map(|_| ()));
        }
        let i = self
            .instances
            .get_mut(&id)
            .ok_or(FleetError::NoInstance(id.to_string()))?;
        if let Some(f) = failed_on {
            i.failures.push(f);
        }
        let r = i.spec.resources();
        let result = match choice {
            Some(Ok((node, why))) => {
                i.node = Some(node.clone());
                i.phase = Phase::Scheduled;
                i.placement = format!("attempt {}: {why}", attempts + 1);
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
        match (&old, &now_on) {
            (_, Some(n)) if now_on != old => {
                let p = self
                    .instances
                    .get(&id)
                    .map(|i| i.placement.clone())
                    .unwrap_or_default();
                let from = old
                    .as_ref()
                    .map(|o| format!("from {o} "))
                    .unwrap_or_default();
                self.instance_event(id, "moved", format!("{from}to {n}: {p}"));
            }
            (Some(_), None) => {
                let why = self
                    .instances
                    .get(&id)
                    .map(|i| i.reason.clone())
                    .unwrap_or_default();
                self.instance_event(id, "failed", why);
            }
            _ => {}
        }
        if now_on != old {
            self.touch_instance(id);
            if let Some(o) = old {
                self.bump(&o);
            }
        }
        result
    }

    /// An operator adopts a node bound to another fleet: its instances join this fleet as
    /// they are, and its agent is sent a desired state that replaces the one it holds.
    /// Returns how many instances were adopted.
    pub fn adopt(&mut self, now_ms: u64, node: &NodeId) -> Result<usize, FleetError> {
        let n = self.node_mut(node)?;
        let h = n
            .foreign
            .take()
            .ok_or_else(|| FleetError::NotForeign(node.clone()))?;
        n.replaces = h.held;
        self.journal.nodes.insert(node.clone());
        self.sync_availability(node);
        let adopted = self.adopt_from(now_ms, node, &h.instances);
        self.bump(node);
        self.node_event(
            node,
            "adopted",
            format!("{adopted} instance(s) joined this fleet"),
        );
        Ok(adopted)
    }
}
