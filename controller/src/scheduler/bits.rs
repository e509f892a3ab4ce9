//! Host indexes and host bitsets (one bit per host, 64 hosts a word): what the table, the
//! ranked order and placement share.

/// Index of a host in the [`HostTable`](super::HostTable) given to
/// [`Scheduler::place`](super::Scheduler::place).
pub type HostIdx = usize;

/// A growable bitset, one bit per host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Bits(pub(super) Vec<u64>);

impl Bits {
    pub(super) fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    pub(super) fn set(&mut self, i: usize, on: bool) {
        if self.0.len() <= i / 64 {
            self.0.resize(i / 64 + 1, 0);
        }
        let bit = 1u64 << (i % 64);
        if on {
            self.0[i / 64] |= bit;
        } else {
            self.0[i / 64] &= !bit;
        }
    }

    /// Word `w` (hosts 64w..64w+63); words past the end are empty.
    #[inline]
    pub(super) fn word(&self, w: usize) -> u64 {
        self.0.get(w).copied().unwrap_or(0)
    }

    pub(super) fn of(idx: &[HostIdx]) -> Self {
        let mut b = Self::default();
        for &i in idx {
            b.set(i, true);
        }
        b
    }
}
