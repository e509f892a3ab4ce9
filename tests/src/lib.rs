//! End-to-end test harness for Outpost: real processes, the real broker (mosquitto), real
//! libvirt. The tests themselves live in `tests/tests/`.
//!
//! It provides a mosquitto started on a free loopback port, the workspace's binaries, an agent
//! process with its own state directory, a test controller (a real MQTT client that publishes
//! desired states and records what agents send), a libvirtd started in the foreground when
//! none runs, a wall clock that can be stepped (libfaketime), and a tiny guest (Debian's cloud kernel and a busybox
//! initramfs that prints a line on the serial console).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod agent;
pub mod broker;
pub mod browser;
pub mod controller;
pub mod faketime;
pub mod guest;
pub mod http;
pub mod metrics;
pub mod postgres;
pub mod process;

pub use agent::*;
pub use broker::*;
pub use browser::*;
pub use controller::*;
pub use faketime::*;
pub use guest::*;
pub use metrics::*;
pub use postgres::*;
pub use process::*;
