//! What time does: nodes that stop reporting go down, and the instances of nodes down for
//! longer than the lost-after delay are rebuilt elsewhere.

use outpost_protocol::{InstanceId, NodeId};

use super::Fleet;

impl Fleet {
    /// Periodic work: nodes that stopped reporting go down.
    pub fn tick(&mut self, now_ms: u64) {
        let (mut changed, mut down) = (Vec::new(), Vec::new());
        for n in self.nodes.values_mut() {
            if n.online && now_ms.saturating_sub(n.last_seen_ms) > self.cfg.liveness_timeout_ms {
                n.online = false;
                self.journal.nodes.insert(n.id.clone());
                changed.push(n.id.clone());
                down.push(n.id.clone());
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
        for id in down {
            let secs = self.cfg.liveness_timeout_ms / 1000;
            self.node_event(
                &id,
                "down",
                format!("no report for {secs} s; its VMs are left alone"),
            );
        }
        self.evacuate_lost(now_ms);
    }

    /// The controller saw nothing for `blind_ms` (its broker link was down, or the process
    /// was frozen or starved): that time is not counted against any node. Every node's last
    /// report moves forward by it (never past `now_ms`), so a node goes down, or is lost, only
    /// after the full delay *observed*, whatever happened to the controller meanwhile.
    pub fn unobserved(&mut self, now_ms: u64, blind_ms: u64) {
        for n in self.nodes.values_mut() {
            n.last_seen_ms = n.last_seen_ms.saturating_add(blind_ms).min(now_ms);
        }
    }

    /// Moves the instances of nodes down for longer than the lost-after delay to other nodes.
    /// Those that fit nowhere stay where they are, and are tried again on the next tick.
    pub(super) fn evacuate_lost(&mut self, now_ms: u64) {
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
            if let Some(n) = self.nodes.get_mut(&node)
                && !n.lost
            {
                n.lost = true;
                let after = self.cfg.lost_after_ms / 1000;
                self.node_event(
                    &node,
                    "lost",
                    format!("down for more than {after} s: its instances are rebuilt elsewhere"),
                );
            }
            for id in ids {
                let _ = self.relocate(id, None);
            }
        }
    }
}
