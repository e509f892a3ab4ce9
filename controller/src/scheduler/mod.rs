//! The scheduler: a pure, synchronous function of (hosts, request) → a placement, or the
//! reason nothing fits, naming how many hosts each filter removed.
//!
//! Filters and weighers in the manner of Nova: every host is checked (no sampling) in one pass,
//! O(hosts); claims are applied by the caller at decision time ([`HostTable::claim`]), so two
//! requests decided one after the other can never over-commit a host.
//!
//! Built for 100,000 hosts: [`table`] keeps hosts as a struct of arrays (capacities after
//! allocation ratios, claims, flags) and interns labels and images into one bitset per distinct
//! value, so the per-host work of a decision in [`place`] is a few integer comparisons and bit
//! tests. The table also keeps, one host at a time as claims change, which hosts have room for
//! each request size recently claimed and every host's rank by the request-independent part of
//! its weight (`order`): a decision counts its candidates 64 hosts a word and weighs only the
//! best-ranked ones until none left can win. It chooses exactly what weighing every candidate
//! would (a property test holds both equal to the host-by-host scan).

mod bits;
mod order;
pub mod place;
pub mod table;

pub use order::Weights;
pub use place::{
    Filter, GroupConstraint, GroupPolicy, NoValidHost, Placement, Request, Scheduler,
    SchedulerConfig,
};
pub use table::{Availability, HostIdx, HostState, HostTable, Ratios};
