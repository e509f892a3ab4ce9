//! The scheduler: a pure, synchronous function of (hosts, request) → a placement with ranked
//! alternates, or the reason nothing fits, naming how many hosts each filter removed.
//!
//! Filters and weighers in the manner of Nova: every host is checked (no sampling) in one pass,
//! O(hosts); claims are applied by the caller at decision time ([`HostState::claim`]), so two
//! requests decided one after the other can never over-commit a host.

use std::fmt;

use outpost_protocol::{Arch, HypervisorKind, ImageName, InstanceSpec, Label, NodeId, Resources};

/// Index of a host in the slice given to [`Scheduler::place`].
pub type HostIdx = usize;

/// Whether a host takes new instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Availability {
    /// Up and schedulable.
    Up,
    /// Offline or not reporting.
    Down,
    /// Up, but an operator stopped new placements.
    Cordoned,
    /// Up, cordoned, and its instances are being moved away.
    Draining,
}

/// What the scheduler knows about one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    /// The node.
    pub id: NodeId,
    /// Whether it takes new instances.
    pub availability: Availability,
    /// Its architecture.
    pub arch: Arch,
    /// KVM, emulation or fake.
    pub hypervisor: HypervisorKind,
    /// Allocatable resources (total minus host reservations), before allocation ratios.
    pub capacity: Resources,
    /// Resources claimed by instances placed on it.
    pub claimed: Resources,
    /// Its labels.
    pub labels: Vec<Label>,
    /// Images present on it, sorted.
    pub images: Vec<ImageName>,
    /// Builds that failed on it recently (a weigher penalty).
    pub recent_failures: u32,
}

impl HostState {
    /// Adds a claim.
    pub fn claim(&mut self, r: Resources) {
        self.claimed = self.claimed.saturating_add(r);
    }

    /// Removes a claim.
    pub fn release(&mut self, r: Resources) {
        self.claimed = self.claimed.saturating_sub(r);
    }

    fn has_label(&self, l: &Label) -> bool {
        self.labels.iter().any(|h| h == l)
    }

    fn has_image(&self, i: &ImageName) -> bool {
        self.images.binary_search(i).is_ok()
    }
}

/// Server-group policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupPolicy {
    /// All members on one host.
    Affinity,
    /// Every member on a different host.
    AntiAffinity,
}

/// A server-group constraint: the policy and the hosts that already hold members.
#[derive(Debug, Clone, Copy)]
pub struct GroupConstraint<'a> {
    /// The policy.
    pub policy: GroupPolicy,
    /// Hosts holding members of the group now.
    pub members_on: &'a [HostIdx],
}

/// One placement request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// What to place.
    pub spec: &'a InstanceSpec,
    /// Labels the host must carry (`zone=north`).
    pub selector: &'a [Label],
    /// A server group, if any.
    pub group: Option<GroupConstraint<'a>>,
    /// Hosts already tried for this instance (a retry goes elsewhere).
    pub exclude: &'a [HostIdx],
}

/// Weigher multipliers. Positive resource multipliers spread (prefer emptier hosts), negative
/// ones pack (prefer fuller hosts).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Free vCPU fraction.
    pub cpu: f64,
    /// Free memory fraction.
    pub memory: f64,
    /// Free disk fraction.
    pub disk: f64,
    /// Bonus for a host that already has the instance's images (when not required).
    pub image: f64,
    /// Penalty per recent build failure on the host.
    pub failure: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            cpu: 1.0,
            memory: 1.0,
            disk: 0.5,
            image: 2.0,
            failure: 10.0,
        }
    }
}

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// vCPU allocation ratio (virtual per physical).
    pub cpu_ratio: f64,
    /// Memory allocation ratio.
    pub memory_ratio: f64,
    /// Disk allocation ratio.
    pub disk_ratio: f64,
    /// Whether a host must already hold the images (Outpost agents do not fetch images, so yes
    /// by default); when false, having them is only a weigher bonus.
    pub require_image: bool,
    /// Weigher multipliers.
    pub weights: Weights,
    /// How many ranked alternates to return with a placement (for retries).
    pub alternates: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            cpu_ratio: 4.0,
            memory_ratio: 1.0,
            disk_ratio: 1.0,
            require_image: true,
            weights: Weights::default(),
            alternates: 3,
        }
    }
}

/// The filters, in the order they are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Filter {
    /// The host is down, cordoned or draining.
    Availability,
    /// The host was already tried for this instance.
    Retry,
    /// Wrong architecture.
    Architecture,
    /// KVM required, host has none.
    Kvm,
    /// Not enough vCPUs (after the allocation ratio).
    Vcpus,
    /// Not enough memory.
    Memory,
    /// Not enough disk.
    Disk,
    /// Missing a required label.
    Labels,
    /// Missing an image.
    Image,
    /// Not the host of the group's members.
    Affinity,
    /// Already holds a member of the group.
    AntiAffinity,
}

impl Filter {
    /// Every filter, in order.
    pub const ALL: [Self; 11] = [
        Self::Availability,
        Self::Retry,
        Self::Architecture,
        Self::Kvm,
        Self::Vcpus,
        Self::Memory,
        Self::Disk,
        Self::Labels,
        Self::Image,
        Self::Affinity,
        Self::AntiAffinity,
    ];

    /// A name for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Availability => "availability (down/cordoned)",
            Self::Retry => "already tried",
            Self::Architecture => "architecture",
            Self::Kvm => "kvm",
            Self::Vcpus => "vcpus",
            Self::Memory => "memory",
            Self::Disk => "disk",
            Self::Labels => "labels",
            Self::Image => "image",
            Self::Affinity => "affinity",
            Self::AntiAffinity => "anti-affinity",
        }
    }
}

/// Nothing fits: how many hosts there were and how many each filter removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NoValidHost {
    /// Hosts considered.
    pub hosts: usize,
    /// Hosts removed by each filter (only filters that removed some), in filter order.
    pub removed: Vec<(Filter, usize)>,
}

impl fmt::Display for NoValidHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hosts == 0 {
            return f.write_str("no host fits: the fleet has no nodes");
        }
        write!(f, "no host fits ({} hosts):", self.hosts)?;
        for (i, (filter, n)) in self.removed.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep} {} removed {n}", filter.name())?;
        }
        Ok(())
    }
}

/// The chosen host and the next best ones, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Where to build.
    pub host: HostIdx,
    /// Where to retry if the build fails, best first.
    pub alternates: Vec<HostIdx>,
}

/// The scheduler: its configuration and the pure placement function.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    /// Settings.
    pub config: SchedulerConfig,
}

fn scaled(v: u32, ratio: f64) -> u64 {
    // Capacities are at most u32::MAX and ratios small: the product fits in f64 exactly enough.
    (f64::from(v) * ratio).floor() as u64
}

fn free_fraction(capacity: u64, claimed: u32, want: u32) -> f64 {
    if capacity == 0 {
        return 0.0;
    }
    let left = capacity.saturating_sub(u64::from(claimed) + u64::from(want));
    left as f64 / capacity as f64
}

impl Scheduler {
    /// A scheduler with these settings.
    pub fn new(config: SchedulerConfig) -> Self {
        Self { config }
    }

    /// The effective capacity of a host after allocation ratios.
    pub fn effective(&self, h: &HostState) -> (u64, u64, u64) {
        let c = &self.config;
        (
            scaled(u32::from(h.capacity.vcpus), c.cpu_ratio),
            scaled(h.capacity.memory_mib, c.memory_ratio),
            scaled(h.capacity.disk_gib, c.disk_ratio),
        )
    }

    /// The first filter that rejects `h` for `req`, if any.
    pub fn reject(&self, idx: HostIdx, h: &HostState, req: &Request<'_>) -> Option<Filter> {
        let spec = req.spec;
        if h.availability != Availability::Up {
            return Some(Filter::Availability);
        }
        if req.exclude.contains(&idx) {
            return Some(Filter::Retry);
        }
        if h.arch != spec.arch {
            return Some(Filter::Architecture);
        }
        if spec.require_kvm && h.hypervisor != HypervisorKind::Kvm {
            return Some(Filter::Kvm);
        }
        let (cpu, mem, disk) = self.effective(h);
        if u64::from(h.claimed.vcpus) + u64::from(spec.vcpus) > cpu {
            return Some(Filter::Vcpus);
        }
        if u64::from(h.claimed.memory_mib) + u64::from(spec.memory_mib) > mem {
            return Some(Filter::Memory);
        }
        if u64::from(h.claimed.disk_gib) + u64::from(spec.disk_gib) > disk {
            return Some(Filter::Disk);
        }
        if !req.selector.iter().all(|l| h.has_label(l)) {
            return Some(Filter::Labels);
        }
        if self.config.require_image && !spec.boot.images().all(|i| h.has_image(i)) {
            return Some(Filter::Image);
        }
        if let Some(g) = req.group {
            let holds = g.members_on.contains(&idx);
            match g.policy {
                GroupPolicy::Affinity if !g.members_on.is_empty() && !holds => {
                    return Some(Filter::Affinity);
                }
                GroupPolicy::AntiAffinity if holds => return Some(Filter::AntiAffinity),
                _ => {}
            }
        }
        None
    }

    /// The weight of a host that passed every filter (higher is better).
    pub fn weigh(&self, h: &HostState, spec: &InstanceSpec) -> f64 {
        let w = &self.config.weights;
        let (cpu, mem, disk) = self.effective(h);
        let mut score = w.cpu
            * free_fraction(cpu, u32::from(h.claimed.vcpus), u32::from(spec.vcpus))
            + w.memory * free_fraction(mem, h.claimed.memory_mib, spec.memory_mib)
            + w.disk * free_fraction(disk, h.claimed.disk_gib, spec.disk_gib)
            - w.failure * f64::from(h.recent_failures);
        if !self.config.require_image && spec.boot.images().all(|i| h.has_image(i)) {
            score += w.image;
        }
        score
    }

    /// Places one request: every host filtered and weighed, the best chosen, ties broken by
    /// node id. Deterministic for the same input.
    pub fn place(&self, hosts: &[HostState], req: &Request<'_>) -> Result<Placement, NoValidHost> {
        let mut removed = [0usize; Filter::ALL.len()];
        let keep = 1 + self.config.alternates;
        // The best `keep` hosts, best first.
        let mut best: Vec<(f64, HostIdx)> = Vec::with_capacity(keep + 1);
        for (idx, h) in hosts.iter().enumerate() {
            if let Some(f) = self.reject(idx, h, req) {
                removed[f as usize] += 1;
                continue;
            }
            let score = self.weigh(h, req.spec);
            let better =
                |a: &(f64, HostIdx)| score > a.0 || (score == a.0 && hosts[idx].id < hosts[a.1].id);
            if best.len() == keep && !best.last().is_some_and(better) {
                continue;
            }
            let at = best.iter().position(better).unwrap_or(best.len());
            best.insert(at, (score, idx));
            best.truncate(keep);
        }
        let mut ranked = best.into_iter().map(|(_, i)| i);
        match ranked.next() {
            Some(host) => Ok(Placement {
                host,
                alternates: ranked.collect(),
            }),
            None => Err(NoValidHost {
                hosts: hosts.len(),
                removed: Filter::ALL
                    .into_iter()
                    .zip(removed)
                    .filter(|(_, n)| *n > 0)
                    .collect(),
            }),
        }
    }
}
