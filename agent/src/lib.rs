//! `outpost-agent`: the edge compute agent (Outpost's nova-compute).
//!
//! It owns the host side of Outpost: reading its config, fingerprinting the host, the
//! hypervisor backends (libvirt, and a fake one for simulation and tests), the durable copy of the
//! node's desired state, and the reconciler that converges the host to it. It must never depend
//! on the controller: the two meet only in `outpost-protocol`.
//!
//! Layout: [`reconcile`] is the pure core (no I/O, no clock reads); [`shell`] is the async I/O
//! around it (the hypervisor on blocking threads, disk, timers) and [`link`] its MQTT link.

pub mod admission;
pub mod config;
pub mod console;
pub mod fingerprint;
pub mod hypervisor;
pub mod images;
pub mod link;
pub mod metrics;
pub mod reconcile;
pub mod seed;
pub mod shell;

pub mod store;
