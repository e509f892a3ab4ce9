//! What the HTTP API and the CLI show, and the body of a create request: plain serde structs,
//! converted from and into the fleet's types here.

use std::collections::BTreeMap;

use outpost_protocol::limits::MAX_LABELS;
use outpost_protocol::{
    Arch, Boot, Cmdline, DesiredInstance, IdError, Image, InstanceId, InstanceName, InstanceSpec,
    Label, Labels, NetName, Network, NodeId, PowerMode, PowerState, RestartPolicy,
};
use serde::{Deserialize, Serialize};

use crate::fleet::events::EventRecord;
use crate::fleet::images::{ImageFormat, ImageRecord, Resolved};
use crate::fleet::{CreateRequest, Fleet, InstanceRecord, NodeRecord};
use crate::scheduler::GroupPolicy;

/// A node as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// up, down, cordoned or draining.
    pub state: String,
    /// Architecture.
    pub arch: Option<String>,
    /// kvm, emulated or fake.
    pub hypervisor: Option<String>,
    /// Allocatable (total minus reservations), before allocation ratios.
    pub allocatable: ResourcesView,
    /// What can be claimed: allocatable times the allocation ratios.
    #[serde(default)]
    pub capacity: ResourcesView,
    /// The allocation ratios (virtual per physical).
    #[serde(default)]
    pub ratios: RatiosView,
    /// Claimed by its instances.
    pub claimed: ResourcesView,
    /// Used by its instances, as its last report said.
    #[serde(default)]
    pub used: ResourcesView,
    /// Labels.
    pub labels: Vec<String>,
    /// Images present.
    pub images: Vec<String>,
    /// Instances placed on it.
    pub instances: usize,
    /// Desired-state generations.
    pub generation: GenerationView,
    /// Last heard from (ms since the epoch).
    pub last_seen_ms: u64,
    /// When its agent's current connection began (ms since the epoch; 0: never connected).
    #[serde(default)]
    pub connected_since_ms: u64,
    /// The version of its agent.
    #[serde(default)]
    pub agent_version: Option<String>,
    /// The fleet its agent is bound to when that is another fleet (state `foreign`): it takes
    /// no placements and keeps its instances until `outpost nodes adopt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<String>,
    /// Instances it reports that this controller does not know and did not delete: kept as
    /// they are, adopted once the agent hands back their specs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unaccounted: Vec<String>,
    /// Labels set or removed on the controller over the flashed ones (`key=value`, `key-`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_overrides: Vec<String>,
    /// The latest notice from its agent (unreadable state, hypervisor down...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The agent install bound to it (16 hex digits; absent: none connected yet, or an agent
    /// of an earlier release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<String>,
    /// Other agent installs seen with its identity (state `conflict`): `outpost nodes resolve
    /// NODE --keep BOOT-ID` chooses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflict: Vec<String>,
}

/// An instance as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceView {
    /// Instance id (16 hex digits).
    pub id: String,
    /// Name.
    pub name: String,
    /// Phase.
    pub phase: String,
    /// Node, once placed.
    pub node: Option<String>,
    /// vCPUs.
    pub vcpus: u16,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// Disk (GiB).
    pub disk_gib: u32,
    /// Architecture.
    pub arch: String,
    /// Image, or kernel for direct kernel boot.
    pub image: String,
    /// running or stopped, as asked.
    pub power: String,
    /// Reboots asked.
    pub reboot_count: u32,
    /// Server group.
    pub group: Option<String>,
    /// Latest reason.
    pub reason: String,
    /// Failed build attempts (`node: reason`): why it is not where it was first placed.
    pub failures: Vec<String>,
    /// How it boots: `image NAME`, or `kernel NAME [initrd NAME] cmdline "..."`.
    #[serde(default)]
    pub boot: String,
    /// Its network: `none`, `network NAME` or `bridge NAME`.
    #[serde(default)]
    pub network: String,
    /// What happens when it stops by itself: `never`, `on-failure` or `always`.
    #[serde(default)]
    pub restart: String,
    /// Refuses software emulation.
    #[serde(default)]
    pub require_kvm: bool,
    /// Its labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Labels its node must carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selector: Vec<String>,
    /// How its last stop or reboot was asked: `forced`, or `stop timeout N s` (absent: the power
    /// button with the agent's default grace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mode: Option<String>,
    /// Why it is on its node: the attempt, the scheduler's score and how many hosts it
    /// weighed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub placement: String,
    /// Its images' downloads on its node, while they run (or after they failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub downloads: Vec<DownloadView>,
    /// Its first IP address (without prefix), once its node has found one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Its network interfaces, as its node reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NicView>,
    /// When it was created (ms since the epoch; 0 when not known).
    #[serde(default)]
    pub created_ms: u64,
    /// Adopted from the node that held it (unknown to the store): pinned to that node.
    #[serde(default)]
    pub adopted: bool,
}

/// A network interface as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicView {
    /// Its MAC address.
    pub mac: String,
    /// Its IP addresses with their prefix lengths (`192.168.122.10/24`), IPv4 first.
    pub ips: Vec<String>,
}

/// Resources as shown: named fields.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResourcesView {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
}

impl From<outpost_protocol::Resources> for ResourcesView {
    fn from(r: outpost_protocol::Resources) -> Self {
        Self {
            vcpus: u64::from(r.vcpus),
            memory_mib: u64::from(r.memory_mib),
            disk_gib: u64::from(r.disk_gib),
        }
    }
}

/// Allocation ratios as shown.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RatiosView {
    /// Virtual CPUs per physical one.
    pub cpu: f64,
    /// Memory.
    pub memory: f64,
    /// Disk.
    pub disk: f64,
}

/// A node's desired-state generations.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationView {
    /// The generation of the desired state published to it.
    pub desired: u64,
    /// The generation it last reported holding.
    pub reported: u64,
}

impl NodeView {
    /// The view of a node, with the number of instances it holds.
    pub fn of(n: &NodeRecord, fleet: &Fleet, instances: usize) -> Self {
        let inv = n.inventory.as_ref();
        Self {
            id: n.id.to_string(),
            state: if n.foreign.is_some() {
                "foreign".to_owned()
            } else if !n.conflict.is_empty() {
                "conflict".to_owned()
            } else {
                n.availability().as_str().to_owned()
            },
            arch: inv.map(|i| i.arch.to_string()),
            hypervisor: inv.map(|i| i.hypervisor.to_string()),
            allocatable: inv.map(|i| i.allocatable().into()).unwrap_or_default(),
            capacity: fleet.capacity(&n.id).into(),
            ratios: {
                let r = fleet.ratios();
                RatiosView {
                    cpu: r.cpu,
                    memory: r.memory,
                    disk: r.disk,
                }
            },
            claimed: fleet.claimed(&n.id).into(),
            used: n.used.into(),
            labels: n.labels().iter().map(ToString::to_string).collect(),
            label_overrides: n
                .label_overrides
                .iter()
                .map(|(k, v)| crate::fleet::records::format_label_override(k, v.as_ref()))
                .collect(),
            images: inv
                .map(|i| i.images.iter().map(|l| l.to_string()).collect())
                .unwrap_or_default(),
            instances,
            generation: GenerationView {
                desired: n.generation,
                reported: n.reported_generation,
            },
            last_seen_ms: n.last_seen_ms,
            connected_since_ms: n.session,
            agent_version: inv
                .map(|i| i.agent_version.as_str())
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
            bound_to: n
                .foreign
                .as_ref()
                .and_then(|h| h.held)
                .map(|v| v.fleet.to_string()),
            unaccounted: fleet
                .unaccounted(&n.id)
                .iter()
                .map(ToString::to_string)
                .collect(),
            notice: n.notice.clone(),
            install: n.boot.map(|b| b.to_string()),
            conflict: n.conflict.iter().map(ToString::to_string).collect(),
        }
    }
}

impl InstanceView {
    /// An instance held by a node bound to another fleet: shown, not managed, until the node
    /// is adopted.
    pub fn held(node: &NodeId, di: &DesiredInstance) -> Self {
        let mut v = Self::of_spec(di.id, di.name.as_str(), &di.spec, di.power);
        v.phase = "held".into();
        v.node = Some(node.to_string());
        v.reboot_count = di.reboot_count;
        v.reason = format!("on {node}, bound to another fleet: outpost nodes adopt {node}");
        v
    }

    fn of_spec(id: InstanceId, name: &str, s: &InstanceSpec, power: PowerState) -> Self {
        Self {
            id: id.to_string(),
            name: name.to_owned(),
            phase: String::new(),
            node: None,
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
            disk_gib: s.disk_gib,
            arch: s.arch.to_string(),
            image: match &s.boot {
                Boot::Disk { image } => image.to_string(),
                Boot::Kernel { kernel, .. } => format!("kernel:{kernel}"),
            },
            power: power.as_str().to_owned(),
            reboot_count: 0,
            group: None,
            reason: String::new(),
            failures: Vec::new(),
            boot: match &s.boot {
                Boot::Disk { image } => format!("image {image}"),
                Boot::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                } => format!(
                    "kernel {kernel}{} cmdline {:?}",
                    initrd
                        .as_ref()
                        .map(|i| format!(" initrd {i}"))
                        .unwrap_or_default(),
                    cmdline.as_str()
                ),
            },
            network: match &s.network {
                Network::None => "none".into(),
                Network::Libvirt { network } => format!("network {network}"),
                Network::Bridge { bridge } => format!("bridge {bridge}"),
            },
            restart: match s.restart {
                RestartPolicy::Never => "never",
                RestartPolicy::OnFailure => "on-failure",
                RestartPolicy::Always => "always",
            }
            .into(),
            require_kvm: s.require_kvm,
            labels: s.labels.iter().map(ToString::to_string).collect(),
            selector: Vec::new(),
            power_mode: None,
            placement: String::new(),
            downloads: Vec::new(),
            ip: None,
            addresses: Vec::new(),
            created_ms: 0,
            adopted: false,
        }
    }
}

/// An event as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventView {
    /// Its place in the history.
    pub seq: u64,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The instance's name, if it is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The instance's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The node, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What happened.
    pub kind: String,
    /// In words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Who asked, or who saw it.
    pub actor: String,
}

impl From<&EventRecord> for EventView {
    fn from(e: &EventRecord) -> Self {
        Self {
            seq: e.seq,
            at_ms: e.at_ms,
            instance: e.instance.as_ref().map(|(_, n)| n.clone()),
            instance_id: e.instance.as_ref().map(|(i, _)| i.to_string()),
            node: e.node.as_ref().map(ToString::to_string),
            kind: e.kind.clone(),
            detail: e.detail.clone(),
            actor: e.actor.clone(),
        }
    }
}

/// An image of the catalogue as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageView {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its architecture, when known.
    pub arch: Option<String>,
    /// qcow2, raw, kernel or initrd.
    pub format: String,
    /// Where nodes fetch it: `controller` or the URL.
    pub source: String,
    /// When it was added (ms since the epoch).
    pub created_ms: u64,
    /// Instances booting from its content.
    pub used_by: Vec<String>,
    /// Nodes that hold it in their cache.
    pub cached_on: Vec<String>,
    /// Its downloads under way (or failed), per node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub downloads: Vec<NodeDownloadView>,
}

/// One node's download of an image, as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeDownloadView {
    /// The node.
    pub node: String,
    /// Bytes received.
    pub done: u64,
    /// Its size.
    pub total: u64,
    /// Bytes per second lately.
    pub rate: u32,
    /// running or failed.
    pub state: String,
    /// Why it failed.
    pub reason: String,
}

impl ImageView {
    /// The view of a catalogue image.
    pub fn of(i: &ImageRecord, fleet: &Fleet) -> Self {
        Self {
            name: i.name.clone(),
            version: i.version.clone(),
            sha256: i.blob.digest.to_string(),
            size: i.blob.size,
            arch: i.arch.map(|a| a.to_string()),
            format: i.format.as_str().to_owned(),
            source: i.url.clone().unwrap_or_else(|| "controller".into()),
            created_ms: i.created_ms,
            used_by: fleet
                .instances()
                .filter(|x| x.spec.boot.blobs().any(|b| b.digest == i.blob.digest))
                .map(|x| x.name.clone())
                .collect(),
            cached_on: fleet
                .nodes()
                .filter(|n| {
                    n.inventory
                        .as_ref()
                        .is_some_and(|inv| inv.cached.contains(&i.blob.digest))
                })
                .map(|n| n.id.to_string())
                .collect(),
            downloads: fleet
                .fetches_of_blob(&i.blob.digest)
                .into_iter()
                .map(|(n, p)| NodeDownloadView {
                    node: n.to_string(),
                    done: p.done,
                    total: p.total,
                    rate: p.rate,
                    state: p.state.as_str().to_owned(),
                    reason: p.reason.clone(),
                })
                .collect(),
        }
    }
}

impl InstanceView {
    /// The view of an instance, with its images' catalogue names and its downloads.
    pub fn of(i: &InstanceRecord, fleet: &Fleet) -> Self {
        let mut v = Self::from(i);
        let name = |img: &Image| match img {
            Image::Blob(b) => fleet
                .image_name(&b.digest)
                .unwrap_or_else(|| format!("sha256:{}", b.digest.short())),
            Image::File(f) => f.to_string(),
        };
        let (image, boot) = match &i.spec.boot {
            Boot::Disk { image } => (name(image), format!("image {}", name(image))),
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => (
                format!("kernel:{}", name(kernel)),
                format!(
                    "kernel {}{} cmdline {:?}",
                    name(kernel),
                    initrd
                        .as_ref()
                        .map(|x| format!(" initrd {}", name(x)))
                        .unwrap_or_default(),
                    cmdline.as_str()
                ),
            ),
        };
        v.image = image;
        v.boot = boot;
        let nics = fleet.addresses_of(i);
        v.ip = nics
            .iter()
            .flat_map(|n| n.ips.iter())
            .next()
            .map(|ip| ip.addr().to_string());
        v.addresses = nics
            .iter()
            .map(|n| NicView {
                mac: n.mac.to_string(),
                ips: n.ips.iter().map(ToString::to_string).collect(),
            })
            .collect();
        v.downloads = fleet
            .fetches_of(i)
            .into_iter()
            .map(|(d, p)| DownloadView {
                blob: fleet
                    .image_name(&d)
                    .unwrap_or_else(|| format!("sha256:{}", d.short())),
                done: p.done,
                total: p.total,
                rate: p.rate,
                state: p.state.as_str().to_owned(),
                reason: p.reason.clone(),
            })
            .collect();
        v
    }
}

/// One of an instance's downloads as shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DownloadView {
    /// The image (`name:version`).
    pub blob: String,
    /// Bytes received.
    pub done: u64,
    /// Its size.
    pub total: u64,
    /// Bytes per second lately.
    pub rate: u32,
    /// running or failed.
    pub state: String,
    /// Why it failed, or what it waits for.
    pub reason: String,
}

impl From<&InstanceRecord> for InstanceView {
    fn from(i: &InstanceRecord) -> Self {
        Self {
            phase: i.phase.as_str().to_owned(),
            node: i.node.as_ref().map(|n| n.to_string()),
            reboot_count: i.reboot_count,
            group: i.group.clone(),
            reason: i.reason.clone(),
            failures: i
                .failures
                .iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect(),
            selector: i.selector.iter().map(ToString::to_string).collect(),
            power_mode: match i.power_mode {
                PowerMode { force: true, .. } => Some("forced".into()),
                PowerMode {
                    stop_timeout_secs: 0,
                    force: false,
                } => None,
                PowerMode {
                    stop_timeout_secs, ..
                } => Some(format!("stop timeout {stop_timeout_secs} s")),
            },
            placement: i.placement.clone(),
            created_ms: i.created_ms,
            adopted: i.adopted,
            ..Self::of_spec(i.id, &i.name, &i.spec, i.power)
        }
    }
}

/// vCPUs of an instance created without saying.
pub const DEFAULT_VCPUS: u16 = 1;
/// Memory (MiB) of an instance created without saying.
pub const DEFAULT_MEMORY_MIB: u32 = 256;

/// The body of `POST /v1/instances`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Name (default: `i-` and the id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// vCPUs (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u16>,
    /// Memory in MiB (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Disk in GiB (default 0 for kernel boot, 1 for disk boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u32>,
    /// `x86_64` or `aarch64` (default: the controller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Refuse software emulation.
    #[serde(default)]
    pub require_kvm: bool,
    /// Disk image to boot (exclusive with `kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Kernel for direct kernel boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initrd for direct kernel boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A libvirt network to attach to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// A host bridge to attach to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// `never`, `on-failure` (default) or `always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// The instance's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Labels the node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Server group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `affinity` or `anti-affinity` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_policy: Option<String>,
    /// cloud-init `user-data` (at most 64 KiB), on a NoCloud seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// cloud-init `network-config` (at most 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
    /// SSH public keys for the seed's `meta-data`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// The guest's host name (default: the instance's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The seed's parts once stored (set by the API from the fields above, never by a client).
    #[serde(skip)]
    pub seed: Option<outpost_protocol::Seed>,
}

/// The most cloud-init user-data (or network-config) an instance takes, as Nova's limit.
pub const MAX_USER_DATA: usize = 64 * 1024;

/// Checks one SSH public key entry: exactly one `TYPE BASE64 [comment]` line, whose base64
/// decodes to a key blob of that type (as `ssh-keygen -l` reads it), with a printable comment:
/// nothing in it can add a second key or break the `meta-data` it is written into.
pub fn check_ssh_key(k: &str) -> Result<(), String> {
    use base64::Engine as _;
    const TYPES: [&str; 7] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if k.contains(['\n', '\r']) {
        return Err("one key per entry: it holds a line break".into());
    }
    if k.chars().any(char::is_control) {
        return Err("it holds control characters".into());
    }
    if k.len() > 16 * 1024 {
        return Err("longer than 16 KiB".into());
    }
    let mut f = k.split_whitespace();
    let (Some(t), Some(b)) = (f.next(), f.next()) else {
        return Err("expected `TYPE BASE64 [comment]`".into());
    };
    if !TYPES.contains(&t) {
        return Err(format!("unknown key type {t:?}"));
    }
    let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(b) else {
        return Err("its key is not base64".into());
    };
    // The blob starts with its own type, as a length-prefixed string.
    let named = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    if named != Some(t.as_bytes()) {
        return Err(format!("its key is not a {t} key"));
    }
    Ok(())
}

/// Why a create request is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// This controller's architecture has no default.
    #[error("this controller's architecture is unsupported: give arch")]
    NoDefaultArch,
    /// Unknown architecture.
    #[error("unknown arch {0:?} (x86_64 or aarch64)")]
    Arch(String),
    /// A field is not a valid value of its kind.
    #[error("{field}: {source}")]
    Field {
        /// Which field.
        field: &'static str,
        /// Why.
        source: IdError,
    },
    /// Neither or both of image and kernel.
    #[error("give exactly one of image or kernel")]
    Boot,
    /// Both a network and a bridge.
    #[error("give at most one of network or bridge")]
    Network,
    /// Unknown restart policy.
    #[error("unknown restart policy {0:?} (never, on-failure, always)")]
    Restart(String),
    /// A label is invalid.
    #[error("label {key}: {source}")]
    Label {
        /// Its key.
        key: String,
        /// Why.
        source: IdError,
    },
    /// More labels than an instance may carry.
    #[error("too many labels (at most {MAX_LABELS})")]
    TooManyLabels,
    /// A group policy without a group.
    #[error("group_policy needs a group")]
    PolicyWithoutGroup,
    /// Unknown group policy.
    #[error("unknown group policy {0:?} (affinity or anti-affinity)")]
    GroupPolicy(String),
    /// A group name out of bounds.
    #[error("group names are 1 to 64 bytes")]
    GroupName,
    /// A catalogue image of the wrong kind for the field.
    #[error("{field}: image {image} is a {format} image")]
    ImageFormat {
        /// Which field.
        field: &'static str,
        /// The image asked.
        image: String,
        /// What it is.
        format: &'static str,
    },
    /// The images are built for another architecture than the one asked (or each other).
    #[error("image {image} is {arch}: it cannot run as {asked}")]
    ImageArch {
        /// The image.
        image: String,
        /// Its architecture.
        arch: Arch,
        /// The architecture asked.
        asked: Arch,
    },
    /// The cloud-init seed is wrong.
    #[error("{0}")]
    Seed(String),
    /// The name breaks the naming rule.
    #[error(
        "name {name:?}: {source} (names are DNS labels: lowercase letters, digits and '-', a letter first, at most 63)"
    )]
    Name {
        /// The name given.
        name: String,
        /// Why.
        source: IdError,
    },
}

fn labels(m: &BTreeMap<String, String>) -> Result<Vec<Label>, CreateError> {
    m.iter()
        .map(|(k, v)| {
            Label::parse(&format!("{k}={v}")).map_err(|source| CreateError::Label {
                key: k.clone(),
                source,
            })
        })
        .collect()
}

/// What a boot file's name resolves to: catalogue content (with its architecture, when known,
/// and its format), or a file in the node's image directory.
pub type Resolve<'a> = &'a dyn Fn(&str) -> Result<Resolved, IdError>;

impl CreateBody {
    /// Checks the body and makes the fleet's request, with `id`; boot files are looked up in
    /// the catalogue with `resolve` (an image's architecture becomes the instance's).
    pub fn into_request(
        self,
        id: InstanceId,
        resolve: Resolve<'_>,
    ) -> Result<CreateRequest, CreateError> {
        let e = |field: &'static str| move |source| CreateError::Field { field, source };
        let asked = match self.arch.as_deref() {
            None => None,
            Some(a) => Some(Arch::parse(a).ok_or_else(|| CreateError::Arch(a.to_owned()))?),
        };
        // Each boot file, checked for its kind; the first known architecture wins.
        let mut image_arch: Option<(String, Arch)> = None;
        let mut file = |field: &'static str, name: &str, want: &[ImageFormat]| {
            let (image, meta) = resolve(name).map_err(e(field))?;
            if let Some((arch, format)) = meta {
                if !want.contains(&format) {
                    return Err(CreateError::ImageFormat {
                        field,
                        image: name.to_owned(),
                        format: format.as_str(),
                    });
                }
                if let Some(a) = arch {
                    match (&image_arch, asked) {
                        (_, Some(x)) if x != a => {
                            return Err(CreateError::ImageArch {
                                image: name.to_owned(),
                                arch: a,
                                asked: x,
                            });
                        }
                        (Some((other, x)), None) if *x != a => {
                            return Err(CreateError::ImageArch {
                                image: format!("{name} (with {other})"),
                                arch: a,
                                asked: *x,
                            });
                        }
                        _ => image_arch = Some((name.to_owned(), a)),
                    }
                }
            }
            Ok(image)
        };
        let disk = [ImageFormat::Qcow2, ImageFormat::Raw];
        let boot = match (self.image, self.kernel) {
            (Some(image), None) => Boot::Disk {
                image: file("image", &image, &disk)?,
            },
            (None, Some(kernel)) => Boot::Kernel {
                kernel: file("kernel", &kernel, &[ImageFormat::Kernel])?,
                initrd: self
                    .initrd
                    .map(|i| file("initrd", &i, &[ImageFormat::Initrd]))
                    .transpose()?,
                cmdline: Cmdline::new(self.cmdline.as_deref().unwrap_or("console=ttyS0"))
                    .map_err(e("cmdline"))?,
            },
            _ => return Err(CreateError::Boot),
        };
        let arch = match (asked, &image_arch) {
            (Some(a), _) => a,
            (None, Some((_, a))) => *a,
            (None, None) => Arch::native().ok_or(CreateError::NoDefaultArch)?,
        };
        let network = match (self.network, self.bridge) {
            (None, None) => Network::None,
            (Some(n), None) => Network::Libvirt {
                network: NetName::new(&n).map_err(e("network"))?,
            },
            (None, Some(b)) => Network::Bridge {
                bridge: NetName::new(&b).map_err(e("bridge"))?,
            },
            _ => return Err(CreateError::Network),
        };
        let restart = match self.restart.as_deref() {
            None | Some("on-failure") => RestartPolicy::OnFailure,
            Some("never") => RestartPolicy::Never,
            Some("always") => RestartPolicy::Always,
            Some(o) => return Err(CreateError::Restart(o.to_owned())),
        };
        let mut spec_labels = Labels::new();
        for l in labels(&self.labels)? {
            spec_labels
                .push(l)
                .map_err(|_| CreateError::TooManyLabels)?;
        }
        let disk_default = u32::from(matches!(boot, Boot::Disk { .. }));
        let wants_seed = self.user_data.is_some()
            || self.network_config.is_some()
            || !self.ssh_keys.is_empty()
            || self.hostname.is_some();
        let seed = match (wants_seed, self.seed) {
            (false, _) => None,
            (true, None) => {
                return Err(CreateError::Seed(
                    "the seed's parts were not stored (the API stores them)".into(),
                ));
            }
            (true, Some(mut s)) => {
                let host = self.hostname.clone().or_else(|| self.name.clone());
                if let Some(h) = host {
                    s.hostname = Some(
                        InstanceName::new(&h)
                            .map_err(|e| CreateError::Seed(format!("hostname {h:?}: {e}")))?,
                    );
                }
                Some(s)
            }
        };
        let spec = InstanceSpec {
            vcpus: self.vcpus.unwrap_or(DEFAULT_VCPUS),
            memory_mib: self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            disk_gib: self.disk_gib.unwrap_or(disk_default),
            arch,
            require_kvm: self.require_kvm,
            boot,
            network,
            restart,
            labels: spec_labels,
            seed,
        };
        let group = match (self.group, self.group_policy.as_deref()) {
            (None, None) => None,
            (None, Some(_)) => return Err(CreateError::PolicyWithoutGroup),
            (Some(g), p) => {
                let policy = match p {
                    None => GroupPolicy::AntiAffinity,
                    Some(p) => GroupPolicy::parse(p)
                        .ok_or_else(|| CreateError::GroupPolicy(p.to_owned()))?,
                };
                if g.is_empty() || g.len() > 64 {
                    return Err(CreateError::GroupName);
                }
                Some((g, policy))
            }
        };
        let name = self.name.unwrap_or_else(|| format!("i-{id}"));
        if let Err(source) = InstanceName::new(&name) {
            return Err(CreateError::Name { name, source });
        }
        Ok(CreateRequest {
            any_arch: asked.is_none() && image_arch.is_none(),
            id,
            name,
            spec,
            selector: labels(&self.selector)?,
            group,
        })
    }
}

/// The fleet at a glance (`GET /v1/overview`, the metrics and the status page): every node,
/// instances by phase, and the scheduler's decisions since the controller started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OverviewView {
    /// Every node.
    pub nodes: Vec<NodeView>,
    /// How many instances are in each phase.
    pub phases: BTreeMap<String, u64>,
    /// The scheduler's decisions.
    pub scheduler: SchedulerView,
}

/// The scheduler's decisions since the controller started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SchedulerView {
    /// Instances placed (created or moved).
    pub placements: u64,
    /// Decisions where no host fitted.
    pub failures: u64,
    /// Per filter: failed decisions in which it removed hosts.
    pub refusals: BTreeMap<String, u64>,
    /// The latest refusals, newest last: when (ms since the epoch) and why.
    pub last_refusals: Vec<RefusalView>,
}

/// One refusal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusalView {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Why no host fitted, filter by filter.
    pub why: String,
}

impl OverviewView {
    /// The overview of `fleet`.
    pub fn of(fleet: &Fleet) -> Self {
        let counts = fleet.instance_counts();
        let mut phases: BTreeMap<String, u64> = crate::fleet::records::Phase::ALL
            .iter()
            .map(|p| (p.as_str().to_owned(), 0))
            .collect();
        for i in fleet.instances() {
            *phases.entry(i.phase.as_str().to_owned()).or_default() += 1;
        }
        let s = fleet.scheduler_stats();
        Self {
            nodes: fleet
                .nodes()
                .map(|n| NodeView::of(n, fleet, counts.get(&n.id).copied().unwrap_or(0)))
                .collect(),
            phases,
            scheduler: SchedulerView {
                placements: s.placements,
                failures: s.failures,
                refusals: s
                    .refusals
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), *v))
                    .collect(),
                last_refusals: s
                    .last_refusals
                    .iter()
                    .map(|(at_ms, why)| RefusalView {
                        at_ms: *at_ms,
                        why: why.clone(),
                    })
                    .collect(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_ssh_key;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f";

    #[test]
    fn one_checked_key_per_entry() {
        assert_eq!(check_ssh_key(KEY), Ok(()));
        assert_eq!(check_ssh_key(&format!("{KEY} me@laptop")), Ok(()));
        // Two keys in one entry, or a line break that would end the quoted YAML string.
        assert!(check_ssh_key(&format!("{KEY}\n{KEY}")).is_err());
        assert!(check_ssh_key(&format!("{KEY} x\"\ninstance-id: evil")).is_err());
        assert!(check_ssh_key(&format!("{KEY} a\rb")).is_err());
        assert!(check_ssh_key(&format!("{KEY} a\u{1b}]0;t\u{7}")).is_err());
        // The blob must be a key of the type named.
        assert!(
            check_ssh_key(
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"
            )
            .is_err()
        );
        assert!(check_ssh_key("ssh-ed25519 AAAAAAAAAAAAAAAAAAAA").is_err());
        assert!(check_ssh_key("ssh-ed25519 not-base64!!").is_err());
        assert!(check_ssh_key("ssh-ed25519").is_err());
    }
}
