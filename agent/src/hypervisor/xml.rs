//! The libvirt domain XML Outpost writes for an instance: a pure function, tested without
//! libvirt.

use std::fmt::Write as _;
use std::path::Path;

use outpost_protocol::{Arch, InstanceId, Mac, Network, NodeId};

/// The XML namespace of Outpost's domain metadata; a domain without it is not Outpost's, and
/// one whose metadata names another node belongs to another agent on the same libvirt.
pub const METADATA_NS: &str = "urn:outpost:instance:1";

/// The node named in a domain's Outpost metadata element (`<instance id=".." node=".."/>`).
pub fn metadata_node(element: &str) -> Option<&str> {
    let start = element.find("node=")? + "node=".len();
    let quote = element[start..].chars().next()?;
    let rest = &element[start + 1..];
    rest.find(quote).map(|end| &rest[..end])
}

/// How the guest boots.
#[derive(Debug, Clone, Copy)]
pub enum BootDef<'a> {
    /// From the first disk (firmware boot).
    Disk,
    /// Direct kernel boot.
    Kernel {
        /// Kernel file.
        kernel: &'a Path,
        /// Initrd file.
        initrd: Option<&'a Path>,
        /// Command line.
        cmdline: &'a str,
    },
}

/// Everything the XML is made from.
#[derive(Debug, Clone, Copy)]
pub struct DomainDef<'a> {
    /// The instance.
    pub id: InstanceId,
    /// The node (agent) that owns the domain.
    pub node: &'a NodeId,
    /// `kvm` (hardware) or `qemu` (TCG emulation).
    pub kvm: bool,
    /// Guest (= host) architecture.
    pub arch: Arch,
    /// vCPUs.
    pub vcpus: u16,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Boot method.
    pub boot: BootDef<'a>,
    /// The root (or data) disk, a qcow2 file.
    pub disk: Option<&'a Path>,
    /// The image the disk is an overlay on, and its format (`qcow2` or `raw`); none: a blank
    /// disk. The chain is written out whole and ends there (an empty `<backingStore/>`), so
    /// nothing a file's header names is ever opened.
    pub backing: Option<(&'a Path, &'static str)>,
    /// The cloud-init seed volume (raw FAT), attached read-only, if any.
    pub seed: Option<&'a Path>,
    /// Network.
    pub network: &'a Network,
    /// Where the serial console is written.
    pub console_log: &'a Path,
}

/// Escapes text for XML content and attribute values.
/// Escapes text for an XML attribute or element.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn path(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

/// Writes the domain XML.
pub fn domain_xml(d: &DomainDef<'_>) -> String {
    let mut x = String::with_capacity(2048);
    let (machine, efi) = match d.arch {
        Arch::X86_64 => ("q35", false),
        // aarch64 guests boot from disk through UEFI.
        Arch::Aarch64 => ("virt", matches!(d.boot, BootDef::Disk)),
    };
    // `write!` to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(x, "<domain type='{}'>", if d.kvm { "kvm" } else { "qemu" });
    let _ = writeln!(x, "  <name>{}</name>", super::domain_name(d.id));
    let _ = writeln!(
        x,
        "  <metadata><outpost:instance xmlns:outpost='{METADATA_NS}' id='{}' node='{}'/></metadata>",
        d.id,
        esc(d.node.as_str())
    );
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", d.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", d.vcpus);
    let _ = writeln!(x, "  <os{}>", if efi { " firmware='efi'" } else { "" });
    let _ = writeln!(
        x,
        "    <type arch='{}' machine='{machine}'>hvm</type>",
        d.arch
    );
    match d.boot {
        BootDef::Disk => x.push_str("    <boot dev='hd'/>\n"),
        BootDef::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let _ = writeln!(x, "    <kernel>{}</kernel>", path(kernel));
            if let Some(initrd) = initrd {
                let _ = writeln!(x, "    <initrd>{}</initrd>", path(initrd));
            }
            let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(cmdline));
        }
    }
    x.push_str("  </os>\n  <features><acpi/></features>\n");
    match (d.kvm, d.arch) {
        (true, _) => x.push_str("  <cpu mode='host-passthrough'/>\n"),
        (false, Arch::Aarch64) => {
            x.push_str("  <cpu mode='custom' match='exact'><model fallback='allow'>cortex-a57</model></cpu>\n");
        }
        (false, Arch::X86_64) => {}
    }
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n");
    x.push_str("  <on_crash>destroy</on_crash>\n  <devices>\n");
    if let Some(disk) = d.disk {
        let chain = match d.backing {
            Some((base, fmt)) => format!(
                "<backingStore type='file'><format type='{fmt}'/><source file='{}'/><backingStore/></backingStore>",
                path(base)
            ),
            None => "<backingStore/>".to_owned(),
        };
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>{chain}<target dev='vda' bus='virtio'/></disk>",
            path(disk)
        );
    }
    if let Some(seed) = d.seed {
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/><readonly/></disk>",
            path(seed)
        );
    }
    match d.network {
        Network::None => {}
        Network::Libvirt { network } => {
            let _ = writeln!(
                x,
                "    <interface type='network'><source network='{}'/><model type='virtio'/></interface>",
                esc(network.as_str())
            );
        }
        Network::Bridge { bridge } => {
            let _ = writeln!(
                x,
                "    <interface type='bridge'><source bridge='{}'/><model type='virtio'/></interface>",
                esc(bridge.as_str())
            );
        }
    }
    // A PTY, so that `virsh console` works, logged by virtlogd (which rotates it by size).
    let _ = writeln!(
        x,
        "    <serial type='pty'><log file='{}' append='on'/><target port='0'/></serial>",
        path(d.console_log)
    );
    x.push_str("    <console type='pty'><target type='serial' port='0'/></console>\n");
    // Where the guest runs qemu-guest-agent, it reports the guest's own addresses.
    x.push_str("    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n");
    x.push_str("    <memballoon model='none'/>\n  </devices>\n</domain>\n");
    x
}

/// The MAC addresses of a domain definition's interfaces, in order.
pub fn interface_macs(xml: &str) -> Vec<Mac> {
    xml.split("<interface")
        .skip(1)
        .filter_map(|rest| {
            let body = &rest[..rest.find("</interface>").unwrap_or(rest.len())];
            let at = body.find("<mac address=")? + "<mac address=".len();
            let quoted = body.get(at..)?;
            let q = quoted.chars().next()?;
            let end = quoted[1..].find(q)?;
            quoted[1..=end].parse().ok()
        })
        .collect()
}

/// Whether the domain's guest agent is connected (a live definition says so on its channel).
pub fn guest_agent_connected(xml: &str) -> bool {
    xml.split("<channel")
        .skip(1)
        .map(|c| &c[..c.find("</channel>").unwrap_or(c.len())])
        .any(|c| c.contains("org.qemu.guest_agent.0") && c.contains("state='connected'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::NetName;

    fn node() -> &'static NodeId {
        static NODE: std::sync::OnceLock<NodeId> = std::sync::OnceLock::new();
        NODE.get_or_init(|| NodeId::new("edge-1").expect("valid"))
    }

    fn def<'a>(boot: BootDef<'a>, net: &'a Network) -> DomainDef<'a> {
        DomainDef {
            id: InstanceId::from_u64(0xab),
            node: node(),
            kvm: false,
            arch: Arch::X86_64,
            vcpus: 2,
            memory_mib: 256,
            boot,
            disk: None,
            backing: None,
            seed: None,
            network: net,
            console_log: Path::new("/var/lib/outpost/instances/x/console.log"),
        }
    }

    #[test]
    fn direct_kernel_boot_under_tcg() {
        let net = Network::None;
        let x = domain_xml(&def(
            BootDef::Kernel {
                kernel: Path::new("/img/vmlinuz"),
                initrd: Some(Path::new("/img/initrd.img")),
                cmdline: "console=ttyS0 quiet",
            },
            &net,
        ));
        assert!(x.starts_with("<domain type='qemu'>"));
        assert!(x.contains("<name>outpost-00000000000000ab</name>"));
        assert!(x.contains("<type arch='x86_64' machine='q35'>hvm</type>"));
        assert!(x.contains("<kernel>/img/vmlinuz</kernel>"));
        assert!(x.contains("<initrd>/img/initrd.img</initrd>"));
        assert!(x.contains("<cmdline>console=ttyS0 quiet</cmdline>"));
        assert!(
            x.contains("<serial type='pty'><log file='/var/lib/outpost/instances/x/console.log'")
        );
        assert!(x.contains("name='org.qemu.guest_agent.0'"));
        assert!(x.contains(METADATA_NS));
        assert!(x.contains("node='edge-1'"));
        assert_eq!(
            metadata_node("<instance id=\"ab\" node=\"edge-1\"/>"),
            Some("edge-1")
        );
        assert_eq!(metadata_node("<instance id='ab'/>"), None);
        assert!(!x.contains("host-passthrough"));
        assert!(!x.contains("<interface"));
    }

    #[test]
    fn kvm_disk_boot_on_aarch64_uses_virt_machine_and_uefi() {
        let net = Network::Bridge {
            bridge: NetName::new("br0").expect("valid"),
        };
        let mut d = def(BootDef::Disk, &net);
        d.kvm = true;
        d.arch = Arch::Aarch64;
        d.disk = Some(Path::new("/i/disk.qcow2"));
        d.backing = Some((Path::new("/c/base"), "qcow2"));
        let x = domain_xml(&d);
        // The disk chain is pinned: the overlay, its base, and nothing after it.
        assert!(x.contains("<source file='/i/disk.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/c/base'/><backingStore/></backingStore>"), "{x}");
        assert!(x.starts_with("<domain type='kvm'>"));
        assert!(x.contains("<os firmware='efi'>"));
        assert!(x.contains("machine='virt'"));
        assert!(x.contains("<cpu mode='host-passthrough'/>"));
        assert!(x.contains("<source file='/i/disk.qcow2'/>"));
        assert!(x.contains("<source bridge='br0'/>"));
    }

    #[test]
    fn text_is_escaped() {
        let net = Network::None;
        let x = domain_xml(&def(
            BootDef::Kernel {
                kernel: Path::new("/a'b/k"),
                initrd: None,
                cmdline: "x=<y> & 'z'",
            },
            &net,
        ));
        assert!(x.contains("<kernel>/a&apos;b/k</kernel>"));
        assert!(x.contains("<cmdline>x=&lt;y&gt; &amp; &apos;z&apos;</cmdline>"));
    }

    #[test]
    fn macs_and_the_guest_agent_are_read_from_a_live_definition() {
        let live = "<domain><devices><disk/><interface type='network'>\n<mac address='52:54:00:0a:0b:0c'/>\n<source network='default'/></interface>\
            <interface type=\"bridge\"><mac address=\"52:54:00:FF:00:01\"/></interface><interface type='user'></interface>\
            <channel type='unix'><source mode='bind' path='/x'/><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel></devices></domain>";
        let macs: Vec<String> = interface_macs(live)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(macs, ["52:54:00:0a:0b:0c", "52:54:00:ff:00:01"]);
        assert!(guest_agent_connected(live));
        assert!(!guest_agent_connected(
            &live.replace("state='connected'", "state='disconnected'")
        ));
        assert!(interface_macs("<domain><devices/></domain>").is_empty());
    }
}
