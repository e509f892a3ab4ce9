//! The `Hypervisor` trait, in Outpost's own types, and its backends: libvirt (the real one) and
//! a fake in-memory one with failure injection, the way Nova ships `nova/virt/fake.py`.
//!
//! Calls are blocking; the shell runs them on blocking threads, never on the async runtime.

use std::time::Duration;

use outpost_protocol::{Arch, HypervisorKind, InstanceId, InstanceSpec, Nic, PowerMode};

pub mod fake;
#[cfg(feature = "libvirt")]
pub mod libvirt;
#[cfg(feature = "libvirt")]
pub mod xml;

/// The prefix of every domain name Outpost creates (`outpost-{instance id}`).
pub const DOMAIN_PREFIX: &str = "outpost-";

/// The libvirt domain name of an instance.
pub fn domain_name(id: InstanceId) -> String {
    format!("{DOMAIN_PREFIX}{id}")
}

/// An operation on one instance: what the reconciler asks of the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Build it, and start it if `start`.
    Create {
        /// What to build.
        spec: Box<InstanceSpec>,
        /// Start it once built.
        start: bool,
    },
    /// Start it.
    Start,
    /// Stop it, asking the guest first unless forced.
    Stop(PowerMode),
    /// Reboot it: a clean shutdown and a fresh start, or a reset when forced (or when the
    /// guest ignores the power button).
    Reboot(PowerMode),
    /// Remove it and its files.
    Delete,
}

impl Op {
    /// A name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Start => "start",
            Self::Stop(_) => "stop",
            Self::Reboot(_) => "reboot",
            Self::Delete => "delete",
        }
    }
}

/// How a stop or a reboot went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// As asked: the guest acted on the power button, or the operator forced it.
    Done,
    /// The guest ignored the power button for this long, so it was forced off (or reset).
    Ignored(Duration),
}

/// What the host offers, as the hypervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostInfo {
    /// Host CPU architecture.
    pub arch: Arch,
    /// KVM, emulation or fake.
    pub kind: HypervisorKind,
    /// Host CPUs.
    pub vcpus: u16,
    /// Host memory in MiB.
    pub memory_mib: u32,
}

/// A domain's state, reduced to what the reconciler needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// Running (or blocked in the guest: still running).
    Running,
    /// Paused or suspended.
    Paused,
    /// Not running. `crashed` tells a crash from a clean shutdown or a stop.
    Off {
        /// It stopped because it crashed.
        crashed: bool,
    },
    /// Shutting down, or a state libvirt could not name.
    Transient,
}

/// One Outpost domain found on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Domain {
    /// Its instance.
    pub id: InstanceId,
    /// Its state.
    pub state: DomainState,
}

/// Why a hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// libvirt refused or failed.
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// A needed image file is missing from the image directory.
    #[error("image {0:?} is not in the image directory")]
    MissingImage(String),
    /// qemu-img could not make the instance's disk.
    #[error("creating the instance disk failed: {0}")]
    Disk(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The instance has no domain on this host.
    #[error("instance {0} has no domain on this host")]
    NotFound(InstanceId),
    /// The fake backend was told to fail this call.
    #[error("injected failure")]
    Injected,
}

/// A hypervisor backend. Object-safe; every method is blocking.
pub trait Hypervisor: Send + Sync {
    /// What the host offers.
    fn host(&self) -> Result<HostInfo, HypervisorError>;

    /// Every domain Outpost created on this host (and only those).
    fn list(&self) -> Result<Vec<Domain>, HypervisorError>;

    /// Builds the instance (disk, definition) and starts it if `start`. Idempotent: a domain
    /// that already exists is left as it is.
    fn create(
        &self,
        id: InstanceId,
        spec: &InstanceSpec,
        start: bool,
    ) -> Result<(), HypervisorError>;

    /// Starts a defined, stopped domain.
    fn start(&self, id: InstanceId) -> Result<(), HypervisorError>;

    /// Stops a running domain: the power button, forced off after the grace (`mode.stop_timeout_secs`,
    /// else the configured one); at once when `mode.force`.
    fn stop(&self, id: InstanceId, mode: PowerMode) -> Result<Outcome, HypervisorError>;

    /// Reboots a running domain: a clean shutdown then a start (as Nova's soft reboot), reset
    /// when the guest ignores the power button for the grace; a reset at once when `mode.force`.
    fn reboot(&self, id: InstanceId, mode: PowerMode) -> Result<Outcome, HypervisorError>;

    /// Removes the domain and its files. Idempotent: an absent domain is not an error.
    fn delete(&self, id: InstanceId) -> Result<(), HypervisorError>;

    /// A running domain's network interfaces: each MAC with the IP addresses found for it
    /// (none yet is normal while the guest boots).
    fn addresses(&self, id: InstanceId) -> Result<Vec<Nic>, HypervisorError>;
}

impl HypervisorError {
    /// The wire error kind this failure is reported as.
    pub fn kind(&self) -> outpost_protocol::ErrorKind {
        match self {
            Self::MissingImage(_) => outpost_protocol::ErrorKind::UnknownImage,
            _ => outpost_protocol::ErrorKind::Hypervisor,
        }
    }
}

/// What a completed operation leaves to say: nothing, or why it did not go as asked (the
/// instance's reason until its next change).
pub type Note = Option<String>;

/// Runs one reconciler operation on a backend (blocking), in the form the reconciler takes
/// back.
pub fn execute(
    hv: &dyn Hypervisor,
    id: InstanceId,
    op: &Op,
) -> Result<Note, (outpost_protocol::ErrorKind, String)> {
    let ignored = |what: &str, o: Outcome| match o {
        Outcome::Done => None,
        Outcome::Ignored(d) => Some(format!(
            "the guest ignored the power button for {} s: {what}",
            d.as_secs()
        )),
    };
    let r = match op {
        Op::Create { spec, start } => hv.create(id, spec, *start).map(|()| None),
        Op::Start => hv.start(id).map(|()| None),
        Op::Stop(mode) => hv.stop(id, *mode).map(|o| ignored("forced off", o)),
        Op::Reboot(mode) => hv.reboot(id, *mode).map(|o| ignored("reset", o)),
        Op::Delete => hv.delete(id).map(|()| None),
    };
    r.map_err(|e| (e.kind(), e.to_string()))
}
