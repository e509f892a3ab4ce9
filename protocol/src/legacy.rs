//! The layouts of earlier wire versions that stored state still holds: the controller's store
//! and the agent's state file read what the previous release wrote, and convert it. Only
//! decoded, never written. (Messages of an earlier version on the wire are refused.)
//!
//! Version 4: desired states named no agent install.
//!
//! Version 2: instances had no power mode, boot files were only file names, inventories had no
//! agent version or cache, desired states no fetch source or prefetch list.

use serde::{Deserialize, Serialize};

use crate::blob::{BlobRef, FetchFrom, Image};
use crate::ids::{Cmdline, FleetId, ImageName, InstanceId, InstanceName, Labels};
use crate::limits::{MAX_IMAGES, MAX_INSTANCES_PER_NODE, MAX_PREFETCH};
use crate::messages::{DesiredInstance, DesiredState, Version};
use crate::node::{Arch, HypervisorKind, Inventory, Resources};
use crate::spec::{Boot, InstanceSpec, Network, PowerMode, PowerState, RestartPolicy};

/// Version 2's boot: file names only.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(clippy::large_enum_variant, missing_docs)]
pub enum BootV2 {
    Disk {
        image: ImageName,
    },
    Kernel {
        kernel: ImageName,
        initrd: Option<ImageName>,
        cmdline: Cmdline,
    },
}

/// Version 2's instance spec.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct SpecV2 {
    pub vcpus: u16,
    pub memory_mib: u32,
    pub disk_gib: u32,
    pub arch: Arch,
    pub require_kvm: bool,
    pub boot: BootV2,
    pub network: Network,
    pub restart: RestartPolicy,
    pub labels: Labels,
}

impl From<SpecV2> for InstanceSpec {
    fn from(s: SpecV2) -> Self {
        Self {
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
            disk_gib: s.disk_gib,
            arch: s.arch,
            require_kvm: s.require_kvm,
            boot: match s.boot {
                BootV2::Disk { image } => Boot::Disk {
                    image: Image::File(image),
                },
                BootV2::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                } => Boot::Kernel {
                    kernel: Image::File(kernel),
                    initrd: initrd.map(Image::File),
                    cmdline,
                },
            },
            network: s.network,
            restart: s.restart,
            labels: s.labels,
            seed: None,
        }
    }
}

/// Version 2's desired instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct DesiredInstanceV2 {
    pub id: InstanceId,
    pub name: InstanceName,
    pub power: PowerState,
    pub reboot_count: u32,
    pub spec: SpecV2,
}

impl From<DesiredInstanceV2> for DesiredInstance {
    fn from(i: DesiredInstanceV2) -> Self {
        Self {
            id: i.id,
            name: i.name,
            power: i.power,
            reboot_count: i.reboot_count,
            power_mode: PowerMode::default(),
            spec: i.spec.into(),
        }
    }
}

/// Version 2's desired state.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct DesiredStateV2 {
    pub fleet: FleetId,
    pub generation: u64,
    pub replaces: Option<Version>,
    pub lease_secs: u32,
    pub instances: heapless::Vec<DesiredInstanceV2, MAX_INSTANCES_PER_NODE>,
    pub gone: heapless::Vec<InstanceId, MAX_INSTANCES_PER_NODE>,
}

impl From<DesiredStateV2> for DesiredState {
    fn from(d: DesiredStateV2) -> Self {
        Self {
            fleet: d.fleet,
            generation: d.generation,
            replaces: d.replaces,
            lease_secs: d.lease_secs,
            instances: d.instances.into_iter().map(Into::into).collect(),
            gone: d.gone,
            fetch: None,
            prefetch: heapless::Vec::new(),
            boot: None,
        }
    }
}

/// Version 4's desired state: no agent install named.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct DesiredStateV4 {
    pub fleet: FleetId,
    pub generation: u64,
    pub replaces: Option<Version>,
    pub lease_secs: u32,
    pub instances: heapless::Vec<DesiredInstance, MAX_INSTANCES_PER_NODE>,
    pub gone: heapless::Vec<InstanceId, MAX_INSTANCES_PER_NODE>,
    pub fetch: Option<FetchFrom>,
    pub prefetch: heapless::Vec<BlobRef, MAX_PREFETCH>,
}

impl From<DesiredStateV4> for DesiredState {
    fn from(d: DesiredStateV4) -> Self {
        Self {
            fleet: d.fleet,
            generation: d.generation,
            replaces: d.replaces,
            lease_secs: d.lease_secs,
            instances: d.instances,
            gone: d.gone,
            fetch: d.fetch,
            prefetch: d.prefetch,
            boot: None,
        }
    }
}

/// Version 2's inventory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct InventoryV2 {
    pub arch: Arch,
    pub hypervisor: HypervisorKind,
    pub total: Resources,
    pub reserved: Resources,
    pub labels: Labels,
    pub images: heapless::Vec<ImageName, MAX_IMAGES>,
}

impl From<InventoryV2> for Inventory {
    fn from(v: InventoryV2) -> Self {
        Self {
            arch: v.arch,
            hypervisor: v.hypervisor,
            total: v.total,
            reserved: v.reserved,
            labels: v.labels,
            images: v.images,
            agent_version: Default::default(),
            cached: heapless::Vec::new(),
        }
    }
}
