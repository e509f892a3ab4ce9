//! `outpost-controller`: fleet state, the scheduler and dispatch (Outpost's nova-scheduler,
//! nova-conductor and placement in one lean service).
//!
//! It owns the fleet's durable state and placement decisions. [`scheduler`] is a pure,
//! synchronous core (no I/O, no clock reads). It must never depend on the agent: the two meet
//! only in `outpost-protocol`.

pub mod action;
pub mod api;
pub mod blobs;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod consoles;
pub mod fleet;
#[cfg(feature = "embedded-broker")]
pub mod gate;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod origin;
pub mod scheduler;
pub mod secret;
pub mod service;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod views;
