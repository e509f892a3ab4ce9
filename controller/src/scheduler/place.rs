//! Placement: the filters and weighers in the manner of Nova, over a [`HostTable`]. A pure
//! function of (table, request) -> the chosen host, or how many hosts each filter removed.

use std::fmt;

use outpost_protocol::{Arch, InstanceSpec, Label};

use super::bits::{Bits, HostIdx};
use super::order::Weights;
use super::table::{HostTable, Ratios, want};

/// Server-group policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupPolicy {
    /// All members on one host.
    Affinity,
    /// Every member on a different host.
    AntiAffinity,
}

impl GroupPolicy {
    /// Lowercase name (`affinity`, `anti-affinity`), as stored and in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Affinity => "affinity",
            Self::AntiAffinity => "anti-affinity",
        }
    }

    /// Parses [`GroupPolicy::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Affinity, Self::AntiAffinity]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
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
    /// How many ranked alternates to return with a placement. The fleet retries a failed build
    /// by placing again against the claims of that moment (excluding where it failed), so it
    /// asks for none and the hot path keeps only the best host.
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
            alternates: 0,
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
    /// At its instance limit ([`outpost_protocol::limits::MAX_INSTANCES_PER_NODE`]).
    Instances,
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
    pub const ALL: [Self; 12] = [
        Self::Availability,
        Self::Retry,
        Self::Architecture,
        Self::Kvm,
        Self::Vcpus,
        Self::Memory,
        Self::Disk,
        Self::Instances,
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
            Self::Instances => "instances",
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

/// The chosen host and the next best ones, best first, and why it won.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Where to build.
    pub host: HostIdx,
    /// Where to retry if the build fails, best first.
    pub alternates: Vec<HostIdx>,
    /// Its weighed score (the highest).
    pub score: f64,
    /// How many hosts passed every filter and were weighed.
    pub candidates: usize,
}

/// Whether host `i` is in every set (`None`: a value no host has).
#[inline]
fn has_all(sets: &Option<Vec<&Bits>>, i: HostIdx) -> bool {
    sets.as_ref().is_some_and(|s| s.iter().all(|b| b.get(i)))
}

/// The capacity filter (vCPUs, memory, disk, in that order) that rejects asking `want` of a
/// host with `headroom` left, if any.
#[inline(always)]
fn capacity_filter(headroom: &[i64; 3], want: &[i64; 3]) -> Option<Filter> {
    if want[0] > headroom[0] {
        Some(Filter::Vcpus)
    } else if want[1] > headroom[1] {
        Some(Filter::Memory)
    } else if want[2] > headroom[2] {
        Some(Filter::Disk)
    } else {
        None
    }
}

/// One request, prepared against a table: interned selectors and images, group and retry sets.
struct Prepared<'a> {
    want: [i64; 3],
    arch: Arch,
    kvm: bool,
    /// `None`: some selector label or image is on no host.
    labels: Option<Vec<&'a Bits>>,
    images: Option<Vec<&'a Bits>>,
    require_images: bool,
    /// The blobs it boots from (`None`: none, or one no host has cached).
    cached: Option<Vec<&'a Bits>>,
    members: Option<(GroupPolicy, bool, Bits)>,
    exclude: Bits,
}

/// The scheduler: its configuration and the pure placement function.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    /// Settings.
    pub config: SchedulerConfig,
}

impl Scheduler {
    /// A scheduler with these settings.
    pub fn new(config: SchedulerConfig) -> Self {
        Self { config }
    }

    /// The allocation ratios of this scheduler, for its [`HostTable`].
    pub fn ratios(&self) -> Ratios {
        Ratios {
            cpu: self.config.cpu_ratio,
            memory: self.config.memory_ratio,
            disk: self.config.disk_ratio,
        }
    }

    /// An empty host table for this scheduler (its allocation ratios, hosts ranked for its
    /// weights).
    pub fn table(&self) -> HostTable {
        let mut t = HostTable::new(self.ratios());
        t.weigh_by(self.config.weights);
        t
    }

    fn prepare<'a>(&self, t: &'a HostTable, req: &Request<'_>) -> Prepared<'a> {
        let s = req.spec;
        Prepared {
            want: want(s.resources()),
            arch: s.arch,
            kvm: s.require_kvm,
            labels: t.labels.all(req.selector.iter()),
            images: t.images.all(s.boot.files()),
            require_images: self.config.require_image,
            cached: if s.boot.blobs().next().is_some() {
                t.cached.all(s.boot.blobs().map(|b| &b.digest))
            } else {
                None
            },
            members: req
                .group
                .map(|g| (g.policy, !g.members_on.is_empty(), Bits::of(g.members_on))),
            exclude: Bits::of(req.exclude),
        }
    }

    #[inline]
    fn reject_prepared(&self, t: &HostTable, i: HostIdx, p: &Prepared<'_>) -> Option<Filter> {
        if !t.up.get(i) {
            return Some(Filter::Availability);
        }
        if p.exclude.get(i) {
            return Some(Filter::Retry);
        }
        if t.arch[i] != p.arch {
            return Some(Filter::Architecture);
        }
        if p.kvm && !t.kvm.get(i) {
            return Some(Filter::Kvm);
        }
        if let Some(f) = capacity_filter(&t.headroom[i], &p.want) {
            return Some(f);
        }
        if t.full.get(i) {
            return Some(Filter::Instances);
        }
        if !has_all(&p.labels, i) {
            return Some(Filter::Labels);
        }
        if p.require_images && !has_all(&p.images, i) {
            return Some(Filter::Image);
        }
        if let Some((policy, any, members)) = &p.members {
            let holds = members.get(i);
            match policy {
                GroupPolicy::Affinity if *any && !holds => return Some(Filter::Affinity),
                GroupPolicy::AntiAffinity if holds => return Some(Filter::AntiAffinity),
                _ => {}
            }
        }
        None
    }

    /// The first filter that rejects host `idx` for `req`, if any.
    pub fn reject(&self, t: &HostTable, idx: HostIdx, req: &Request<'_>) -> Option<Filter> {
        self.reject_prepared(t, idx, &self.prepare(t, req))
    }

    /// The weight of a host that passed every filter (higher is better).
    #[inline(always)]
    fn weigh(&self, t: &HostTable, i: HostIdx, p: &Prepared<'_>) -> f64 {
        let w = &self.config.weights;
        let (h, inv) = (&t.headroom[i], &t.inverse[i]);
        // Filters passed: want <= headroom, so the difference is never negative.
        let free = |k: usize| (h[k] - p.want[k]) as f64 * inv[k];
        let mut score = w.cpu * free(0) + w.memory * free(1) + w.disk * free(2)
            - w.failure * f64::from(t.failures[i]);
        if !p.require_images && has_all(&p.images, i) {
            score += w.image;
        }
        if has_all(&p.cached, i) {
            score += w.image;
        }
        score
    }

    /// Places one request: every host filtered and weighed, the best chosen, ties broken by
    /// node id. Deterministic for the same input.
    ///
    /// The fast path filters 64 hosts at a time with the table's bitsets (availability,
    /// architecture, KVM, labels, images, retries, group), then checks capacity and weighs only
    /// the hosts left. When nothing fits, [`Scheduler::place_by_scan`] explains why.
    pub fn place(&self, t: &HostTable, req: &Request<'_>) -> Result<Placement, NoValidHost> {
        let p = self.prepare(t, req);
        let none = Bits::default();
        let arch = t
            .arch_bits
            .iter()
            .find(|(a, _)| *a == p.arch)
            .map_or(&none, |(_, b)| b);
        let images = if p.require_images {
            p.images.as_deref()
        } else {
            Some(&[][..])
        };
        let (Some(labels), Some(images)) = (p.labels.as_deref(), images) else {
            // A selector label or a required image no host has: explain.
            return self.place_by_scan(t, req);
        };
        self.place_fast(t, &p, arch, labels, images, req)
    }

    fn place_fast(
        &self,
        t: &HostTable,
        p: &Prepared<'_>,
        arch: &Bits,
        labels: &[&Bits],
        images: &[&Bits],
        req: &Request<'_>,
    ) -> Result<Placement, NoValidHost> {
        // Hosts passing every filter but capacity, 64 at a time.
        let mask = |w: usize| {
            let mut m = t.up.word(w) & arch.word(w) & !p.exclude.word(w) & !t.full.word(w);
            if p.kvm {
                m &= t.kvm.word(w);
            }
            for b in labels.iter().chain(images) {
                m &= b.word(w);
            }
            match &p.members {
                Some((GroupPolicy::AntiAffinity, _, b)) => m &= !b.word(w),
                Some((GroupPolicy::Affinity, true, b)) => m &= b.word(w),
                _ => {}
            }
            m
        };
        let room = if t.order.walkable(&self.config.weights) {
            t.shapes.room(&p.want)
        } else {
            None
        };
        let placed = match room {
            Some(room) => self.place_ranked(t, p, &mask, room),
            None => {
                let mut best = Best::new(1 + self.config.alternates);
                let n = self.offer_all(t, p, &mut best, mask, true);
                best.into_placement(n)
            }
        };
        #[cfg(debug_assertions)]
        if let Some(p) = &placed {
            // Debug builds (every test) hold each decision to the reference scan's.
            debug_assert_eq!(Ok(p), self.place_by_scan(t, req).as_ref());
        }
        placed.map_or_else(
            || {
                let refused = self.place_by_scan(t, req);
                debug_assert!(refused.is_err(), "the fast path missed a host");
                refused
            },
            Ok,
        )
    }

    /// Weighs every host of `mask` (checking capacity first when `check` is set) and offers
    /// it to `best`; returns how many were weighed.
    fn offer_all(
        &self,
        t: &HostTable,
        p: &Prepared<'_>,
        best: &mut Best,
        mask: impl Fn(usize) -> u64,
        check: bool,
    ) -> usize {
        (0..t.len().div_ceil(64))
            .map(|w| self.offer_word(t, p, best, w, mask(w), check))
            .sum()
    }

    /// [`Scheduler::offer_all`] for the hosts of word `w` in `m`.
    fn offer_word(
        &self,
        t: &HostTable,
        p: &Prepared<'_>,
        best: &mut Best,
        w: usize,
        mut m: u64,
        check: bool,
    ) -> usize {
        let mut weighed = 0;
        while m != 0 {
            let i = w * 64 + m.trailing_zeros() as usize;
            m &= m - 1;
            if check && capacity_filter(&t.headroom[i], &p.want).is_some() {
                continue;
            }
            weighed += 1;
            self.offer(t, p, best, i);
        }
        weighed
    }

    /// Weighs host `i` (it passed every filter) and offers it to `best`.
    #[inline]
    fn offer(&self, t: &HostTable, p: &Prepared<'_>, best: &mut Best, i: HostIdx) {
        let score = self.weigh(t, i, p);
        if score >= best.floor {
            best.offer(t, score, i);
        }
    }

    /// Word `w` of the hosts whose image bonus may lift them above the walk's bound: those
    /// with a positive bonus that not every host gets.
    fn bonus_word(&self, p: &Prepared<'_>, w: usize) -> u64 {
        if self.config.weights.image <= 0.0 {
            return 0;
        }
        let all = |sets: &[&Bits]| sets.iter().fold(!0u64, |m, b| m & b.word(w));
        let mut m = 0;
        if let Some(c) = &p.cached {
            m |= all(c);
        }
        if !p.require_images
            && let Some(i) = p.images.as_deref().filter(|i| !i.is_empty())
        {
            m |= all(i);
        }
        m
    }

    /// A decision for a request shape the table tracks: candidates counted 64 hosts at a
    /// time (filters and room), then the hosts walked best bound first (see
    /// [`super::order`]) until no host left can beat the ones kept; hosts with an image bonus
    /// are weighed up front. Chooses exactly what scoring every candidate would.
    fn place_ranked(
        &self,
        t: &HostTable,
        p: &Prepared<'_>,
        mask: &impl Fn(usize) -> u64,
        room: &Bits,
    ) -> Option<Placement> {
        let keep = 1 + self.config.alternates;
        let mut best = Best::new(keep);
        let mut candidates = 0;
        for w in 0..t.len().div_ceil(64) {
            let m = mask(w) & room.word(w);
            candidates += m.count_ones() as usize;
            self.offer_word(t, p, &mut best, w, m & self.bonus_word(p, w), false);
        }
        if candidates == 0 {
            return None;
        }
        let rest = |w: usize| mask(w) & room.word(w) & !self.bonus_word(p, w);
        if candidates * DIRECT_BELOW < t.len() {
            // Few candidates: weighing them all costs less than a walk past the others.
            self.offer_all(t, p, &mut best, rest, false);
            return best.into_placement(candidates);
        }
        // What every host gets (the image bonus when the request names no image).
        let flat = if !p.require_images && p.images.as_ref().is_some_and(Vec::is_empty) {
            self.config.weights.image
        } else {
            0.0
        };
        // A walk costs several times what weighing one candidate does: past this many hosts
        // (the best-ranked ones filtered out, as a selector on a busy zone does), weighing
        // every candidate is cheaper.
        let limit = (candidates / WALK_SHARE).max(16);
        for (visited, (bound, i)) in t.order.walk(&p.want, p.arch, p.kvm).enumerate() {
            if bound + flat < best.floor {
                return best.into_placement(candidates);
            }
            if visited == limit {
                // An unlucky order (the best-ranked hosts all filtered out): weigh them all.
                let mut best = Best::new(keep);
                self.offer_all(t, p, &mut best, |w| mask(w) & room.word(w), false);
                return best.into_placement(candidates);
            }
            if rest(i / 64) >> (i % 64) & 1 == 1 {
                self.offer(t, p, &mut best, i);
            }
        }
        best.into_placement(candidates)
    }

    /// The reference placement: every host through every filter one at a time, counting which
    /// filter removed it. [`Scheduler::place`] agrees with it (a property test holds them
    /// equal); it is what explains a refusal.
    pub fn place_by_scan(
        &self,
        t: &HostTable,
        req: &Request<'_>,
    ) -> Result<Placement, NoValidHost> {
        let p = self.prepare(t, req);
        let mut removed = [0usize; Filter::ALL.len()];
        let mut best = Best::new(1 + self.config.alternates);
        let mut candidates = 0;
        for i in 0..t.len() {
            if let Some(f) = self.reject_prepared(t, i, &p) {
                removed[f as usize] += 1;
                continue;
            }
            candidates += 1;
            best.offer(t, self.weigh(t, i, &p), i);
        }
        best.into_placement(candidates).ok_or_else(|| NoValidHost {
            hosts: t.len(),
            removed: Filter::ALL
                .into_iter()
                .zip(removed)
                .filter(|(_, n)| *n > 0)
                .collect(),
        })
    }
}

/// Below one candidate in this many hosts, a ranked decision weighs every candidate instead
/// of walking.
const DIRECT_BELOW: usize = 64;

/// A ranked decision walks at most one host per this many candidates before it weighs every
/// candidate instead.
const WALK_SHARE: usize = 8;

/// The best few hosts so far, highest score first, ties broken by node id.
struct Best {
    keep: usize,
    ranked: Vec<(f64, HostIdx)>,
    /// Scores below this cannot enter (the last kept score once full). Derivable from
    /// `ranked`, but kept in a field: reading it from the vector in the hot loop cost 20%.
    floor: f64,
}

impl Best {
    fn new(keep: usize) -> Self {
        Self {
            keep,
            ranked: Vec::with_capacity(keep + 1),
            floor: f64::NEG_INFINITY,
        }
    }

    #[inline]
    fn offer(&mut self, t: &HostTable, score: f64, i: HostIdx) {
        let better = |a: &(f64, HostIdx)| {
            score > a.0
                || (score == a.0
                    && match t.keys[i].cmp(&t.keys[a.1]) {
                        std::cmp::Ordering::Equal => t.ids[i] < t.ids[a.1],
                        o => o.is_lt(),
                    })
        };
        if self.ranked.len() == self.keep && !self.ranked.last().is_some_and(better) {
            return;
        }
        let at = self
            .ranked
            .iter()
            .position(better)
            .unwrap_or(self.ranked.len());
        self.ranked.insert(at, (score, i));
        self.ranked.truncate(self.keep);
        if self.ranked.len() == self.keep {
            self.floor = self.ranked.last().map_or(f64::NEG_INFINITY, |l| l.0);
        }
    }

    fn into_placement(self, candidates: usize) -> Option<Placement> {
        let mut ranked = self.ranked.into_iter();
        ranked.next().map(|(score, host)| Placement {
            host,
            alternates: ranked.map(|(_, i)| i).collect(),
            score,
            candidates,
        })
    }
}
