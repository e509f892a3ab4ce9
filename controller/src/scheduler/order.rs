//! What lets a decision at 100,000 hosts look at a few hosts instead of all of them, while
//! choosing exactly what the full scan would:
//!
//! - [`Order`]: hosts ranked by the part of their weight that does not depend on the request.
//!   A host's score is `Σ w_k·(headroom_k − want_k)/capacity_k − w_f·failures (+ bonuses)`,
//!   that is its *base* `Σ w_k·headroom_k/capacity_k − w_f·failures` minus a request term
//!   `Σ w_k·want_k/capacity_k` shared by every host of the same capacity (a *class*). Within a
//!   class, hosts ordered by base are ordered by score; walking the classes' orders merged by
//!   `base − request term` visits hosts best bound first, and the walk stops once the bound
//!   falls below the worst score kept. Kept up to date one host at a time, O(log n) a change.
//! - [`Shapes`]: for the request shapes (vCPUs, MiB, GiB) recently asked for, one bit per host
//!   that has room for it, so that the hosts passing every filter are counted exactly with
//!   popcounts, 64 hosts a word.

use std::collections::{BTreeSet, HashMap};

use outpost_protocol::Arch;

use super::bits::{Bits, HostIdx};

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

impl Weights {
    /// Whether the two rank hosts alike (the same multipliers but for the image bonus).
    fn same_base(&self, o: &Self) -> bool {
        [self.cpu, self.memory, self.disk, self.failure] == [o.cpu, o.memory, o.disk, o.failure]
    }
}

/// Beyond this many capacity classes the walk's merge costs more than it saves: decisions
/// score every candidate instead (still exact).
pub const MAX_CLASSES: usize = 64;

/// What a host is ranked by besides its weight: only hosts that take new instances are
/// ranked, apart by architecture and KVM (so that hosts a request can never use, and which
/// therefore stay emptiest, do not crowd the top of every walk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kind {
    /// Its architecture.
    pub arch: Arch,
    /// Whether it has KVM.
    pub kvm: bool,
}

/// One capacity class: hosts of one kind with the same reciprocal capacities, best base
/// first.
#[derive(Debug, Clone)]
struct Class {
    kind: Kind,
    inverse: [f64; 3],
    /// (descending key of the base score, host).
    hosts: BTreeSet<(u64, HostIdx)>,
}

/// Hosts ranked by base score within their capacity class.
#[derive(Debug, Clone)]
pub struct Order {
    weights: Weights,
    classes: Vec<Class>,
    by_inverse: HashMap<(Kind, [u64; 3]), usize>,
    /// Per host: its class and key (`None` until first set).
    at: Vec<Option<(usize, u64)>>,
}

/// A key that sorts descending scores ascending (total order on finite floats).
fn key(score: f64) -> u64 {
    let b = score.to_bits();
    let ascending = if b >> 63 == 1 { !b } else { b | 1 << 63 };
    !ascending
}

fn unkey(k: u64) -> f64 {
    let ascending = !k;
    f64::from_bits(if ascending >> 63 == 1 {
        ascending & !(1 << 63)
    } else {
        !ascending
    })
}

impl Order {
    /// An empty order for these weights.
    pub fn new(weights: Weights) -> Self {
        Self {
            weights,
            classes: Vec::new(),
            by_inverse: HashMap::new(),
            at: Vec::new(),
        }
    }

    /// Whether a walk ranks hosts as a scheduler with `weights` does, and is worth it (few
    /// enough capacity classes).
    pub fn walkable(&self, weights: &Weights) -> bool {
        self.weights.same_base(weights) && self.classes.len() <= MAX_CLASSES
    }

    /// The same hosts, ranked for other weights.
    pub fn reweighed(&self, weights: Weights, host: impl Fn(HostIdx) -> Ranked) -> Self {
        let mut o = Self::new(weights);
        for i in 0..self.at.len() {
            o.set(i, host(i));
        }
        o
    }

    /// Σ weight × amount / capacity over vCPUs, memory and disk: of a host's headroom, its
    /// base score (before the failure penalty); of a request, its class's request term.
    fn fractions(&self, amounts: &[i64; 3], inverse: &[f64; 3]) -> f64 {
        let w = &self.weights;
        w.cpu * (amounts[0] as f64 * inverse[0])
            + w.memory * (amounts[1] as f64 * inverse[1])
            + w.disk * (amounts[2] as f64 * inverse[2])
    }

    /// The base score of a host.
    fn base(&self, headroom: &[i64; 3], inverse: &[f64; 3], failures: u32) -> f64 {
        self.fractions(headroom, inverse) - self.weights.failure * f64::from(failures)
    }

    /// Files host `i` anew after its headroom, capacity, failures, availability or kind
    /// changed.
    pub fn set(&mut self, i: HostIdx, h: Ranked) {
        if self.at.len() <= i {
            self.at.resize(i + 1, None);
        }
        if let Some((c, k)) = self.at[i].take() {
            self.classes[c].hosts.remove(&(k, i));
        }
        let Some(kind) = h.kind else { return };
        let c = *self
            .by_inverse
            .entry((kind, h.inverse.map(f64::to_bits)))
            .or_insert_with(|| {
                self.classes.push(Class {
                    kind,
                    inverse: h.inverse,
                    hosts: BTreeSet::new(),
                });
                self.classes.len() - 1
            });
        let k = key(self.base(&h.headroom, &h.inverse, h.failures));
        self.classes[c].hosts.insert((k, i));
        self.at[i] = Some((c, k));
    }

    /// Every ranked host of architecture `arch` (and KVM if `kvm`), highest upper bound on
    /// its score for a request of `want` first: the bound is the host's base minus its
    /// class's request term (plus a margin for rounding, so that it is never below the score
    /// computed directly).
    pub fn walk(&self, want: &[i64; 3], arch: Arch, kvm: bool) -> Walk<'_> {
        let mut heads = Vec::with_capacity(self.classes.len());
        for c in &self.classes {
            if c.kind.arch != arch || (kvm && !c.kind.kvm) {
                continue;
            }
            let term = self.fractions(want, &c.inverse);
            let mut head = Head {
                term,
                it: c.hosts.iter(),
                next: None,
                bound: f64::NEG_INFINITY,
            };
            head.advance();
            heads.push(head);
        }
        Walk { heads }
    }
}

/// A host as the order ranks it.
#[derive(Debug, Clone, Copy)]
pub struct Ranked {
    /// Its kind; `None` while it takes no new instances (not ranked).
    pub kind: Option<Kind>,
    /// Claimable left: vCPUs, MiB, GiB.
    pub headroom: [i64; 3],
    /// 1 / claimable capacity (0 where none).
    pub inverse: [f64; 3],
    /// Recent build failures.
    pub failures: u32,
}

struct Head<'a> {
    term: f64,
    it: std::collections::btree_set::Iter<'a, (u64, HostIdx)>,
    next: Option<HostIdx>,
    /// The next host's bound (-inf once done).
    bound: f64,
}

impl Head<'_> {
    fn advance(&mut self) {
        match self.it.next() {
            Some(&(k, i)) => {
                let b = unkey(k) - self.term;
                self.next = Some(i);
                self.bound = b + 1e-9 * (1.0 + b.abs() + self.term.abs());
            }
            None => {
                self.next = None;
                self.bound = f64::NEG_INFINITY;
            }
        }
    }
}

/// Hosts in descending order of their score's upper bound (see [`Order::walk`]).
pub struct Walk<'a> {
    heads: Vec<Head<'a>>,
}

impl Iterator for Walk<'_> {
    /// (upper bound on the host's score, host).
    type Item = (f64, HostIdx);

    fn next(&mut self) -> Option<(f64, HostIdx)> {
        let mut at = 0;
        for (c, h) in self.heads.iter().enumerate().skip(1) {
            if h.bound > self.heads[at].bound {
                at = c;
            }
        }
        let h = self.heads.get_mut(at)?;
        let (bound, i) = (h.bound, h.next?);
        h.advance();
        Some((bound, i))
    }
}

/// The most request shapes kept (the least recently asked for goes first).
pub const MAX_SHAPES: usize = 64;

#[derive(Debug, Clone)]
struct Shape {
    want: [i64; 3],
    room: Bits,
    used: u64,
}

/// For the request shapes recently asked for: which hosts have room for one more.
#[derive(Debug, Clone, Default)]
pub struct Shapes {
    shapes: Vec<Shape>,
    clock: u64,
}

impl Shapes {
    /// The hosts with room for `want`, if that shape is kept.
    pub fn room(&self, want: &[i64; 3]) -> Option<&Bits> {
        self.shapes
            .iter()
            .find(|s| &s.want == want)
            .map(|s| &s.room)
    }

    /// Keeps shape `want` (a request of it is about to be decided): built from every host's
    /// headroom when new, replacing the least recently asked for when full.
    pub fn keep(&mut self, want: [i64; 3], headroom: &[[i64; 3]]) {
        self.clock += 1;
        if let Some(s) = self.shapes.iter_mut().find(|s| s.want == want) {
            s.used = self.clock;
            return;
        }
        let mut room = Bits::default();
        for (i, h) in headroom.iter().enumerate() {
            if fits(h, &want) {
                room.set(i, true);
            }
        }
        let shape = Shape {
            want,
            room,
            used: self.clock,
        };
        if self.shapes.len() < MAX_SHAPES {
            self.shapes.push(shape);
        } else if let Some(old) = self.shapes.iter_mut().min_by_key(|s| s.used) {
            *old = shape;
        }
    }

    /// Host `i`'s headroom changed.
    pub fn set(&mut self, i: HostIdx, headroom: &[i64; 3]) {
        for s in &mut self.shapes {
            s.room.set(i, fits(headroom, &s.want));
        }
    }
}

fn fits(headroom: &[i64; 3], want: &[i64; 3]) -> bool {
    want[0] <= headroom[0] && want[1] <= headroom[1] && want[2] <= headroom[2]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_scores_descending() {
        let xs = [-12.5, -1.0, -0.0, 0.0, 1e-12, 0.25, 2.5, 1e9];
        for w in xs.windows(2) {
            assert!(key(w[0]) >= key(w[1]), "{} {}", w[0], w[1]);
        }
        for x in xs {
            assert_eq!(unkey(key(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn the_walk_merges_classes_by_bound() {
        let w = Weights {
            cpu: 1.0,
            memory: 1.0,
            disk: 0.0,
            image: 0.0,
            failure: 1.0,
        };
        let mut o = Order::new(w);
        let kind = Some(Kind {
            arch: Arch::X86_64,
            kvm: true,
        });
        let host = |headroom: [i64; 3], inverse: [f64; 3], failures| Ranked {
            kind,
            headroom,
            inverse,
            failures,
        };
        // Class a: capacity 4/4; class b: capacity 8/8.
        o.set(0, host([4, 4, 0], [0.25, 0.25, 0.0], 0)); // base 2
        o.set(1, host([1, 1, 0], [0.25, 0.25, 0.0], 0)); // base 0.5
        o.set(2, host([4, 4, 0], [0.125, 0.125, 0.0], 0)); // base 1
        o.set(3, host([8, 8, 0], [0.125, 0.125, 0.0], 1)); // base 1
        o.set(1, host([2, 2, 0], [0.25, 0.25, 0.0], 0)); // base 1, moved
        // want 2/2: class a's term 1, class b's 0.5.
        let walk = |kvm| o.walk(&[2, 2, 0], Arch::X86_64, kvm);
        let order: Vec<HostIdx> = walk(true).map(|(_, i)| i).collect();
        assert_eq!(order[0], 0); // 2 - 1 = 1
        assert_eq!(order.len(), 4);
        let bounds: Vec<f64> = walk(false).map(|(b, _)| b).collect();
        assert!(bounds.windows(2).all(|p| p[0] >= p[1]));
        // Not ranked while unavailable, nor walked for another architecture.
        o.set(
            0,
            Ranked {
                kind: None,
                ..host([4, 4, 0], [0.25, 0.25, 0.0], 0)
            },
        );
        assert_eq!(o.walk(&[2, 2, 0], Arch::X86_64, true).count(), 3);
        assert_eq!(o.walk(&[2, 2, 0], Arch::Aarch64, false).count(), 0);
    }

    #[test]
    fn shapes_follow_headroom() {
        let mut s = Shapes::default();
        s.keep([2, 1024, 10], &[[4, 2048, 20], [1, 4096, 20]]);
        let room = s.room(&[2, 1024, 10]).unwrap();
        assert!(room.get(0) && !room.get(1));
        s.set(1, &[2, 1024, 10]);
        assert!(s.room(&[2, 1024, 10]).unwrap().get(1));
        assert!(s.room(&[1, 1, 1]).is_none());
        for k in 0..MAX_SHAPES as i64 + 5 {
            s.keep([k, 0, 0], &[[4, 2048, 20]]);
        }
        assert_eq!(s.shapes.len(), MAX_SHAPES);
    }
}
