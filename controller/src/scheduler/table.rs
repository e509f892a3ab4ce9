//! The host table: the scheduler's view of every host as a struct of arrays (capacities after
//! allocation ratios, claims, headroom, flags), with labels and images interned into one host
//! bitset per distinct value. Claims are kept incrementally as instances come and go.

use outpost_protocol::limits::MAX_INSTANCES_PER_NODE;
use outpost_protocol::{Arch, Digest, HypervisorKind, ImageName, Label, NodeId, Resources};

use super::bits::Bits;
pub use super::bits::HostIdx;
use super::order::{Kind, Order, Ranked, Shapes, Weights};

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

impl Availability {
    /// Lowercase name, as the API shows it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
        }
    }

    /// Parses [`Availability::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Up, Self::Down, Self::Cordoned, Self::Draining]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// One host, as given to [`HostTable::upsert`].
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
    /// Blobs in its cache (a weigher bonus for instances that boot from them).
    pub cached: Vec<Digest>,
    /// Builds that failed on it recently (a weigher penalty).
    pub recent_failures: u32,
    /// Instances placed on it (those it is deleting too): a node takes at most
    /// [`MAX_INSTANCES_PER_NODE`], the most its desired state can carry.
    pub instances: u32,
}

/// Where the allocation ratios turn capacities into what can be claimed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    /// vCPU allocation ratio (virtual per physical).
    pub cpu: f64,
    /// Memory allocation ratio.
    pub memory: f64,
    /// Disk allocation ratio.
    pub disk: f64,
}

/// Interned values (labels or images) with one host bitset each.
#[derive(Debug, Clone)]
pub(super) struct Interned<T: Ord> {
    pub(super) ids: std::collections::BTreeMap<T, usize>,
    bits: Vec<Bits>,
    per_host: Vec<Vec<usize>>,
}

impl<T: Ord> Default for Interned<T> {
    fn default() -> Self {
        Self {
            ids: std::collections::BTreeMap::new(),
            bits: Vec::new(),
            per_host: Vec::new(),
        }
    }
}

impl<T: Ord + Clone> Interned<T> {
    pub(super) fn set_host(&mut self, host: HostIdx, values: &[T]) {
        if self.per_host.len() <= host {
            self.per_host.resize(host + 1, Vec::new());
        }
        for &v in &self.per_host[host] {
            self.bits[v].set(host, false);
        }
        let mut now = Vec::with_capacity(values.len());
        for v in values {
            let id = match self.ids.get(v) {
                Some(&id) => id,
                None => {
                    self.ids.insert(v.clone(), self.bits.len());
                    self.bits.push(Bits::default());
                    self.bits.len() - 1
                }
            };
            self.bits[id].set(host, true);
            now.push(id);
        }
        self.per_host[host] = now;
    }

    /// The bitsets of every value in `want`; `None` if one is on no host at all.
    pub(super) fn all<'a>(&self, want: impl Iterator<Item = &'a T>) -> Option<Vec<&Bits>>
    where
        T: 'a,
    {
        want.map(|v| self.ids.get(v).map(|&id| &self.bits[id]))
            .collect()
    }
}

/// The scheduler's view of every host, as parallel arrays indexed by [`HostIdx`].
#[derive(Debug, Clone)]
pub struct HostTable {
    pub(super) ratios: Ratios,
    pub(super) ids: Vec<NodeId>,
    pub(super) index: std::collections::HashMap<NodeId, HostIdx>,
    /// Node ids' first 16 bytes, big-endian: orders like the ids unless two share them.
    pub(super) keys: Vec<u128>,
    pub(super) arch: Vec<Arch>,
    /// Claimable after allocation ratios: vCPUs, MiB, GiB.
    pub(super) effective: Vec<[u64; 3]>,
    /// 1 / effective (0 where nothing is claimable): weighing multiplies, never divides.
    pub(super) inverse: Vec<[f64; 3]>,
    pub(super) claimed: Vec<[u64; 3]>,
    /// effective - claimed (negative if over-claimed): the one array the capacity filters
    /// and the weighers read.
    pub(super) headroom: Vec<[i64; 3]>,
    pub(super) failures: Vec<u32>,
    /// Instances placed on each host.
    pub(super) instances: Vec<u32>,
    /// Hosts holding [`MAX_INSTANCES_PER_NODE`] instances: they take no more (the
    /// `instances` filter).
    pub(super) full: Bits,
    pub(super) labels: Interned<Label>,
    pub(super) images: Interned<ImageName>,
    pub(super) cached: Interned<Digest>,
    /// Availability, KVM and architecture as bitsets, 64 hosts a word: the fast path of
    /// [`Scheduler::place`] ANDs them; the reference scan tests one bit.
    pub(super) up: Bits,
    pub(super) kvm: Bits,
    pub(super) arch_bits: Vec<(Arch, Bits)>,
    /// Hosts ranked by the request-independent part of their weight.
    pub(super) order: Order,
    /// Which hosts have room for each request shape recently claimed.
    pub(super) shapes: Shapes,
}

/// The ordering key of a node id (its first 16 bytes, zero-padded, big-endian).
fn order_key(id: &NodeId) -> u128 {
    let mut b = [0u8; 16];
    let s = id.as_str().as_bytes();
    let n = s.len().min(16);
    b[..n].copy_from_slice(&s[..n]);
    u128::from_be_bytes(b)
}

fn scaled(v: u32, ratio: f64) -> u64 {
    // Capacities are at most u32::MAX and ratios small: exact enough in f64.
    (f64::from(v) * ratio).floor() as u64
}

impl HostTable {
    /// An empty table with these allocation ratios, ranking hosts for the default weights
    /// (see [`HostTable::weigh_by`]).
    pub fn new(ratios: Ratios) -> Self {
        Self {
            ratios,
            ids: Vec::new(),
            index: std::collections::HashMap::new(),
            keys: Vec::new(),
            arch: Vec::new(),
            effective: Vec::new(),
            inverse: Vec::new(),
            claimed: Vec::new(),
            headroom: Vec::new(),
            failures: Vec::new(),
            instances: Vec::new(),
            full: Bits::default(),
            labels: Interned::default(),
            images: Interned::default(),
            cached: Interned::default(),
            up: Bits::default(),
            kvm: Bits::default(),
            arch_bits: Vec::new(),
            order: Order::new(Weights::default()),
            shapes: Shapes::default(),
        }
    }

    /// Ranks hosts for a scheduler with these weights (decisions by a scheduler with other
    /// weights are still exact, but score every candidate).
    pub fn weigh_by(&mut self, weights: Weights) {
        self.order = self.order.reweighed(weights, |i| self.ranked(i));
    }

    /// Host `idx` as the order ranks it.
    fn ranked(&self, idx: HostIdx) -> Ranked {
        Ranked {
            kind: self.up.get(idx).then(|| Kind {
                arch: self.arch[idx],
                kvm: self.kvm.get(idx),
            }),
            headroom: self.headroom[idx],
            inverse: self.inverse[idx],
            failures: self.failures[idx],
        }
    }

    /// Ranks host `idx` anew.
    fn rank(&mut self, idx: HostIdx) {
        let r = self.ranked(idx);
        self.order.set(idx, r);
    }

    /// A table of these hosts (index = position in the slice).
    pub fn from_hosts(ratios: Ratios, hosts: &[HostState]) -> Self {
        let mut t = Self::new(ratios);
        for h in hosts {
            t.upsert(h);
        }
        t
    }

    /// Adds or replaces a host; returns its index (stable for the table's life).
    pub fn upsert(&mut self, h: &HostState) -> HostIdx {
        let idx = match self.index.get(&h.id) {
            Some(&i) => i,
            None => {
                let i = self.ids.len();
                self.ids.push(h.id.clone());
                self.index.insert(h.id.clone(), i);
                self.keys.push(order_key(&h.id));
                self.arch.push(h.arch);
                self.effective.push([0; 3]);
                self.inverse.push([0.0; 3]);
                self.claimed.push([0; 3]);
                self.headroom.push([0; 3]);
                self.failures.push(0);
                self.instances.push(0);
                i
            }
        };
        self.set_availability(idx, h.availability);
        let old = self.arch[idx];
        if let Some((_, b)) = self.arch_bits.iter_mut().find(|(a, _)| *a == old) {
            b.set(idx, false);
        }
        match self.arch_bits.iter_mut().find(|(a, _)| *a == h.arch) {
            Some((_, b)) => b.set(idx, true),
            None => self.arch_bits.push((h.arch, Bits::of(&[idx]))),
        }
        self.arch[idx] = h.arch;
        self.kvm.set(idx, h.hypervisor == HypervisorKind::Kvm);
        let e = [
            scaled(u32::from(h.capacity.vcpus), self.ratios.cpu),
            scaled(h.capacity.memory_mib, self.ratios.memory),
            scaled(h.capacity.disk_gib, self.ratios.disk),
        ];
        self.effective[idx] = e;
        self.inverse[idx] = e.map(|v| if v == 0 { 0.0 } else { 1.0 / v as f64 });
        self.claimed[idx] = [
            u64::from(h.claimed.vcpus),
            u64::from(h.claimed.memory_mib),
            u64::from(h.claimed.disk_gib),
        ];
        self.failures[idx] = h.recent_failures;
        self.set_instances(idx, h.instances);
        self.sync_headroom(idx);
        self.labels.set_host(idx, &h.labels);
        let mut images = h.images.clone();
        images.sort();
        self.images.set_host(idx, &images);
        let mut cached = h.cached.clone();
        cached.sort();
        self.cached.set_host(idx, &cached);
        idx
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no hosts.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The node at `idx`.
    pub fn id(&self, idx: HostIdx) -> &NodeId {
        &self.ids[idx]
    }

    /// The index of a node.
    pub fn index_of(&self, id: &NodeId) -> Option<HostIdx> {
        self.index.get(id).copied()
    }

    /// Sets a host's availability.
    pub fn set_availability(&mut self, idx: HostIdx, a: Availability) {
        self.up.set(idx, a == Availability::Up);
        self.rank(idx);
    }

    /// Sets a host's recent build failures.
    pub fn set_failures(&mut self, idx: HostIdx, n: u32) {
        self.failures[idx] = n;
        self.rank(idx);
    }

    /// Sets how many instances a host holds (at [`MAX_INSTANCES_PER_NODE`] it takes no more).
    pub fn set_instances(&mut self, idx: HostIdx, n: u32) {
        self.instances[idx] = n;
        self.full.set(idx, n as usize >= MAX_INSTANCES_PER_NODE);
    }

    /// How many instances a host holds.
    pub fn instances(&self, idx: HostIdx) -> u32 {
        self.instances[idx]
    }

    /// Keeps track of which hosts have room for requests of this size, from now on (the
    /// fleet does so before each decision; a decision for a size tracked counts its
    /// candidates 64 hosts at a time and walks the ranked hosts). At most
    /// 64 sizes, the least recently asked for go first.
    pub fn track(&mut self, r: Resources) {
        self.shapes.keep(want(r), &self.headroom);
    }

    /// Adds a claim on a host.
    pub fn claim(&mut self, idx: HostIdx, r: Resources) {
        let c = &mut self.claimed[idx];
        c[0] += u64::from(r.vcpus);
        c[1] += u64::from(r.memory_mib);
        c[2] += u64::from(r.disk_gib);
        self.sync_headroom(idx);
    }

    fn sync_headroom(&mut self, idx: HostIdx) {
        let (e, c) = (self.effective[idx], self.claimed[idx]);
        let h = [0, 1, 2].map(|k| {
            i64::try_from(e[k]).unwrap_or(i64::MAX) - i64::try_from(c[k]).unwrap_or(i64::MAX)
        });
        self.headroom[idx] = h;
        self.rank(idx);
        self.shapes.set(idx, &h);
    }

    /// Removes a claim from a host.
    pub fn release(&mut self, idx: HostIdx, r: Resources) {
        let c = &mut self.claimed[idx];
        c[0] = c[0].saturating_sub(u64::from(r.vcpus));
        c[1] = c[1].saturating_sub(u64::from(r.memory_mib));
        c[2] = c[2].saturating_sub(u64::from(r.disk_gib));
        self.sync_headroom(idx);
    }

    /// What can be claimed on a host after allocation ratios.
    pub fn effective(&self, idx: HostIdx) -> Resources {
        resources(self.effective[idx])
    }

    /// What is claimed on a host.
    pub fn claimed(&self, idx: HostIdx) -> Resources {
        resources(self.claimed[idx])
    }
}

/// What a request of `r` asks of a host's headroom: vCPUs, MiB, GiB.
pub(super) fn want(r: Resources) -> [i64; 3] {
    [
        i64::from(r.vcpus),
        i64::from(r.memory_mib),
        i64::from(r.disk_gib),
    ]
}

/// A vCPUs/MiB/GiB triple as [`Resources`] (saturating at each field's bound).
fn resources(v: [u64; 3]) -> Resources {
    Resources {
        vcpus: u16::try_from(v[0]).unwrap_or(u16::MAX),
        memory_mib: u32::try_from(v[1]).unwrap_or(u32::MAX),
        disk_gib: u32::try_from(v[2]).unwrap_or(u32::MAX),
    }
}
