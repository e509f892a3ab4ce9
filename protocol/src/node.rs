//! What a node is (its inventory) and what it uses (its usage).

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::blob::Digest;
use crate::ids::{AgentVersion, ImageName, Labels};
use crate::limits::{MAX_CACHED, MAX_IMAGES};

/// A CPU architecture, of a host or of the guest an instance needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// 64-bit x86.
    X86_64,
    /// 64-bit ARM.
    Aarch64,
}

impl Arch {
    /// The architecture this program was compiled for, if Outpost supports it.
    pub const fn native() -> Option<Self> {
        if cfg!(target_arch = "x86_64") {
            Some(Self::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Self::Aarch64)
        } else {
            None
        }
    }

    /// The name libvirt and Linux use (`x86_64`, `aarch64`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// Parses the libvirt/Linux name (also `amd64` and `arm64`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "x86_64" | "amd64" => Some(Self::X86_64),
            "aarch64" | "arm64" => Some(Self::Aarch64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a node runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HypervisorKind {
    /// Hardware virtualization through KVM.
    Kvm,
    /// Software emulation (QEMU TCG): works everywhere, much slower.
    Emulated,
    /// Outpost's fake, in-memory hypervisor (simulation and tests only).
    Fake,
}

impl HypervisorKind {
    /// Lowercase name for tables and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Emulated => "emulated",
            Self::Fake => "fake",
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount of the three scheduled resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u16,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disk in GiB.
    pub disk_gib: u32,
}

impl Resources {
    /// `self - other`, floored at zero in each dimension.
    pub const fn saturating_sub(self, other: Self) -> Self {
        Self {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }

    /// `self + other`, capped at the maximum in each dimension.
    pub const fn saturating_add(self, other: Self) -> Self {
        Self {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            disk_gib: self.disk_gib.saturating_add(other.disk_gib),
        }
    }

    /// The smaller of `self` and `other` in each dimension.
    pub const fn min(self, other: Self) -> Self {
        Self {
            vcpus: if self.vcpus < other.vcpus {
                self.vcpus
            } else {
                other.vcpus
            },
            memory_mib: if self.memory_mib < other.memory_mib {
                self.memory_mib
            } else {
                other.memory_mib
            },
            disk_gib: if self.disk_gib < other.disk_gib {
                self.disk_gib
            } else {
                other.disk_gib
            },
        }
    }

    /// Whether `other` fits inside `self` in every dimension.
    pub const fn contains(self, other: Self) -> bool {
        other.vcpus <= self.vcpus
            && other.memory_mib <= self.memory_mib
            && other.disk_gib <= self.disk_gib
    }
}

/// What a node is: published retained on start and whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Host CPU architecture.
    pub arch: Arch,
    /// How the host runs guests.
    pub hypervisor: HypervisorKind,
    /// The host's total resources (disk: free space in the instance directory at start).
    pub total: Resources,
    /// Resources kept for the host itself; the scheduler never places into them.
    pub reserved: Resources,
    /// Labels such as `zone` and `site`.
    pub labels: Labels,
    /// Images present in the agent's image directory.
    pub images: heapless::Vec<ImageName, MAX_IMAGES>,
    /// The agent's version.
    pub agent_version: AgentVersion,
    /// Blobs in its cache (fetched and verified), most recently used first.
    pub cached: heapless::Vec<Digest, MAX_CACHED>,
}

impl Inventory {
    /// What the scheduler may place onto: total minus reserved.
    pub const fn allocatable(&self) -> Resources {
        self.total.saturating_sub(self.reserved)
    }
}

/// What a node's instances use right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Resources held by the node's instances (running or stopped: stopped keeps its claim).
    pub used: Resources,
    /// Number of instances the node holds.
    pub instances: u16,
}
