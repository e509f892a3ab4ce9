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
//! tests.

pub mod place;
pub mod table;

pub use place::{
    Filter, GroupConstraint, GroupPolicy, NoValidHost, Placement, Request, Scheduler,
    SchedulerConfig, Weights,
};
pub use table::{Availability, HostIdx, HostState, HostTable, Ratios};
