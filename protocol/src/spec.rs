//! What an instance is asked to be, and what it is.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::blob::{BlobRef, Image};
use crate::ids::{Cmdline, ImageName, InstanceName, Labels, NetName};
use crate::node::{Arch, Resources};

/// How an instance boots.
#[expect(
    clippy::large_enum_variant,
    reason = "no_std wire type without a heap: every variant is a bounded value"
)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// From a disk image: the agent makes a copy-on-write overlay on the cached base image.
    Disk {
        /// The base image.
        image: Image,
    },
    /// Direct kernel boot: a kernel (and an initrd), with a command line.
    Kernel {
        /// The kernel.
        kernel: Image,
        /// The initrd, if any.
        initrd: Option<Image>,
        /// The kernel command line.
        cmdline: Cmdline,
    },
}

impl Boot {
    /// Every image this boot method needs on the node.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        let (a, b) = match self {
            Self::Disk { image } => (image, None),
            Self::Kernel { kernel, initrd, .. } => (kernel, initrd.as_ref()),
        };
        core::iter::once(a).chain(b)
    }

    /// The image files it needs in the node's image directory.
    pub fn files(&self) -> impl Iterator<Item = &ImageName> {
        self.images().filter_map(Image::file)
    }

    /// The blobs it needs fetched and cached.
    pub fn blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.images().filter_map(Image::blob)
    }
}

/// An instance's network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Network {
    /// No network interface.
    #[default]
    None,
    /// A NIC on a libvirt virtual network (such as `default`).
    Libvirt {
        /// The libvirt network's name.
        network: NetName,
    },
    /// A NIC on an existing host bridge.
    Bridge {
        /// The bridge's name.
        bridge: NetName,
    },
}

/// What the agent does when an instance that should run is found not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Leave it stopped and report it.
    Never,
    /// Restart it if it crashed (not if the guest shut itself down).
    #[default]
    OnFailure,
    /// Restart it whenever it is not running.
    Always,
}

/// Whether an instance should be running or stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PowerState {
    /// Running.
    #[default]
    Running,
    /// Defined but stopped; keeps its resources.
    Stopped,
}

impl PowerState {
    /// Lowercase name (`running`, `stopped`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }

    /// Parses [`PowerState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Running, Self::Stopped]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// How an agent carries out a stop, or the reboot an operator asked: politely (the ACPI power
/// button, then force after a grace) or at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PowerMode {
    /// Power off (or reset) at once, without asking the guest.
    pub force: bool,
    /// Seconds the guest has to act on the power button before it is forced off (stop) or reset
    /// (reboot); 0: the agent's configured default.
    pub stop_timeout_secs: u16,
}

/// A cloud-init NoCloud seed: the agent writes its parts onto a small read-only disk labelled
/// `cidata` (`user-data`, `meta-data` with the instance id and host name and the SSH keys,
/// `network-config`). The parts travel as blobs, fetched like images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed {
    /// `user-data` (a cloud-config, a script...), at most 64 KiB.
    pub user_data: Option<BlobRef>,
    /// `network-config`.
    pub network_config: Option<BlobRef>,
    /// SSH public keys, one per line, for `meta-data`'s `public-keys`.
    pub ssh_keys: Option<BlobRef>,
    /// `local-hostname` (default: the instance's name).
    pub hostname: Option<InstanceName>,
}

impl Seed {
    /// Its parts.
    pub fn blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.user_data
            .iter()
            .chain(&self.network_config)
            .chain(&self.ssh_keys)
    }
}

/// Everything an agent needs to build an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Virtual CPUs.
    pub vcpus: u16,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Root disk size in GiB (0 for diskless direct kernel boot).
    pub disk_gib: u32,
    /// The guest architecture; must match the host's.
    pub arch: Arch,
    /// Refuse to run under software emulation.
    pub require_kvm: bool,
    /// How it boots.
    pub boot: Boot,
    /// Its network.
    pub network: Network,
    /// What to do when it stops on its own.
    pub restart: RestartPolicy,
    /// Its labels.
    pub labels: Labels,
    /// A cloud-init NoCloud seed to attach (read-only, labelled `cidata`), if any.
    pub seed: Option<Seed>,
}

/// Why an instance spec is impossible on its face (before any node is considered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// vCPUs must be at least 1.
    #[error("an instance needs at least one vCPU")]
    NoVcpus,
    /// Memory must be at least 16 MiB.
    #[error("an instance needs at least 16 MiB of memory")]
    TooLittleMemory,
    /// A disk-booted instance needs a disk.
    #[error("an instance booted from a disk image needs a disk size of at least 1 GiB")]
    NoDisk,
}

impl InstanceSpec {
    /// The smallest memory Outpost will ask libvirt for.
    pub const MIN_MEMORY_MIB: u32 = 16;

    /// Checks what can be checked without a node.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.vcpus == 0 {
            return Err(SpecError::NoVcpus);
        }
        if self.memory_mib < Self::MIN_MEMORY_MIB {
            return Err(SpecError::TooLittleMemory);
        }
        if matches!(self.boot, Boot::Disk { .. }) && self.disk_gib == 0 {
            return Err(SpecError::NoDisk);
        }
        Ok(())
    }

    /// Every blob it needs on its node: its boot images and its seed's parts.
    pub fn blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.boot
            .blobs()
            .chain(self.seed.iter().flat_map(Seed::blobs))
    }

    /// The resources this instance claims on its node.
    pub const fn resources(&self) -> Resources {
        Resources {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
        }
    }
}

/// Why an agent could not build or keep an instance. Small and typed so that reports stay
/// compact; the event that announces the error also carries a human-readable reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// A needed image is not in the agent's image directory.
    UnknownImage,
    /// The spec requires KVM and the node only has software emulation.
    KvmUnavailable,
    /// The guest architecture differs from the host's.
    ArchMismatch,
    /// The node lacks the memory, vCPUs or disk.
    InsufficientResources,
    /// The spec is invalid.
    InvalidSpec,
    /// The hypervisor refused or failed.
    Hypervisor,
    /// The node is at its instance limit.
    TooManyInstances,
    /// An image could not be fetched or did not verify.
    Fetch,
}

impl ErrorKind {
    /// Lowercase name for tables and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownImage => "unknown-image",
            Self::KvmUnavailable => "kvm-unavailable",
            Self::ArchMismatch => "arch-mismatch",
            Self::InsufficientResources => "insufficient-resources",
            Self::InvalidSpec => "invalid-spec",
            Self::Hypervisor => "hypervisor",
            Self::TooManyInstances => "too-many-instances",
            Self::Fetch => "fetch",
        }
    }
}

/// An instance's actual state as its agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstanceState {
    /// Waiting for its images to be fetched and verified.
    Downloading,
    /// Being created (overlay, define, first start).
    Building,
    /// Running.
    Running,
    /// Defined and stopped (asked to, or shut down by the guest).
    Stopped,
    /// Stopped by a crash; restarted or not per its policy.
    Crashed,
    /// Could not be built or kept; see the kind and the event's reason.
    Error(ErrorKind),
    /// Removed from the node: nothing left of it.
    Deleted,
}

impl InstanceState {
    /// Lowercase name for tables and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Building => "building",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
            Self::Error(_) => "error",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Error(kind) => write!(f, "error({})", kind.as_str()),
            other => f.write_str(other.as_str()),
        }
    }
}
