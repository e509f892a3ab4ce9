//! The real backend: libvirt through the `virt` crate. It writes the domain XML itself
//! ([`super::xml`]), makes a copy-on-write overlay on the cached base image (or a blank data
//! disk for direct kernel boot) with `qemu-img`, and touches only domains carrying Outpost's
//! metadata.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_protocol::{
    Arch, Boot, HypervisorKind, Image, InstanceId, InstanceSpec, IpNet, Nic, NodeId, PowerMode,
};
use virt::connect::Connect;
use virt::domain::{Domain as VirDomain, DomainShutoffReason, DomainState as VirState};
use virt::enumutil::Enum;

use super::xml::{
    BootDef, DomainDef, METADATA_NS, domain_xml, guest_agent_connected, interface_macs,
    metadata_node,
};
use super::{DOMAIN_PREFIX, Domain, DomainState, HostInfo, Hypervisor, HypervisorError, Outcome};
use crate::config::KindChoice;

/// How long the KVM probe guest must stay up to count KVM as usable.
const KVM_PROBE_SETTLE: Duration = Duration::from_millis(1500);
/// How long a probe guest booting the host's kernel has to print its first console line.
const KVM_PROBE_KERNEL: Duration = Duration::from_secs(6);

/// The host's own kernel, if one is readable in `/boot` (the KVM probe boots it).
fn host_kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz") || n == "Image")
        })
        .filter(|p| std::fs::File::open(p).is_ok())
        .collect();
    found.sort();
    found.pop()
}

/// What the libvirt backend needs to know.
#[derive(Debug, Clone)]
pub struct LibvirtConfig {
    /// This agent's node: its domains carry it, and domains of other nodes sharing the same
    /// libvirt are never touched.
    pub node: NodeId,
    /// Connection URI (`qemu:///system`, `test:///default`...).
    pub uri: String,
    /// Probe for KVM, or force a choice.
    pub kind: KindChoice,
    /// Image cache.
    pub image_dir: PathBuf,
    /// Per-instance files.
    pub instance_dir: PathBuf,
    /// Clean shutdown allowance before a forced stop.
    pub stop_timeout: Duration,
}

/// A libvirt connection and what Outpost learned about the host through it. The connection
/// is reopened when libvirtd restarts (guests keep running meanwhile; calls fail until it
/// answers again).
pub struct LibvirtHypervisor {
    conn: std::sync::Mutex<Connect>,
    cfg: LibvirtConfig,
    arch: Arch,
    kind: HypervisorKind,
}

/// What pressing the power button did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Button {
    /// Not pressed: forced, or no grace.
    NotPressed,
    /// The domain went off within the grace.
    Off,
    /// The domain was still running after this grace.
    Ignored(Duration),
}

fn lv(e: virt::error::Error) -> HypervisorError {
    HypervisorError::Libvirt(e.message().to_owned())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HypervisorError {
    let what = what.into();
    move |source| HypervisorError::Io { what, source }
}

/// The host architecture named in libvirt's capabilities XML (`<host><cpu><arch>`).
fn host_arch(caps: &str) -> Option<Arch> {
    let host = &caps[caps.find("<host>")?..];
    let start = host.find("<arch>")? + "<arch>".len();
    let end = start + host[start..].find("</arch>")?;
    Arch::parse(&host[start..end])
}

fn is_qcow2(file: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb"
}

/// What [`LibvirtHypervisor::make_disk`] made.
enum MadeDisk {
    /// No disk (diskless direct kernel boot).
    None,
    /// A blank qcow2 disk.
    Blank,
    /// A qcow2 overlay on this image, of this format.
    Overlay(PathBuf, &'static str),
}

/// Checks a qcow2 image's header (see [`outpost_protocol::qcow2`]).
fn check_qcow2(file: &Path) -> Result<(), String> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(outpost_protocol::qcow2::HEAD);
    std::fs::File::open(file)
        .and_then(|f| {
            f.take(outpost_protocol::qcow2::HEAD as u64)
                .read_to_end(&mut head)
        })
        .map_err(|e| format!("cannot read it: {e}"))?;
    outpost_protocol::qcow2::check(&head).map_err(|e| e.to_string())
}

fn qemu_img(args: &[&str]) -> Result<(), HypervisorError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| HypervisorError::Disk(format!("cannot run qemu-img: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HypervisorError::Disk(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

impl LibvirtHypervisor {
    /// Connects and learns the host's architecture and whether KVM works.
    pub fn open(cfg: LibvirtConfig) -> Result<Self, HypervisorError> {
        // Errors are returned to us; libvirt need not also print them to stderr.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&cfg.uri)).map_err(lv)?;
        let caps = conn.capabilities().map_err(lv)?;
        let arch = host_arch(&caps)
            .or_else(Arch::native)
            .ok_or_else(|| HypervisorError::Libvirt("unsupported host architecture".into()))?;
        let kind = match cfg.kind {
            KindChoice::Kvm => HypervisorKind::Kvm,
            KindChoice::Emulated => HypervisorKind::Emulated,
            KindChoice::Auto if probe_kvm(&conn, &caps, arch, &cfg.instance_dir) => {
                HypervisorKind::Kvm
            }
            KindChoice::Auto => HypervisorKind::Emulated,
        };
        tracing::info!(uri = %cfg.uri, %arch, %kind, "libvirt connected");
        Ok(Self {
            conn: std::sync::Mutex::new(conn),
            cfg,
            arch,
            kind,
        })
    }

    /// The connection, reopened first if libvirtd went away since the last call.
    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connect>, HypervisorError> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| HypervisorError::Libvirt("connection lock poisoned".into()))?;
        if !c.is_alive().unwrap_or(false) {
            let fresh = Connect::open(Some(&self.cfg.uri)).map_err(lv)?;
            tracing::info!(uri = %self.cfg.uri, "reconnected to libvirt");
            // The dead connection is released when dropped.
            drop(std::mem::replace(&mut *c, fresh));
        }
        Ok(c)
    }

    fn lookup(&self, id: InstanceId) -> Result<Option<VirDomain>, HypervisorError> {
        match self.conn()?.lookup_domain_by_name(&super::domain_name(id)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == Enum::Known(virt::error::ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(lv(e)),
        }
    }

    fn get(&self, id: InstanceId) -> Result<VirDomain, HypervisorError> {
        self.lookup(id)?.ok_or(HypervisorError::NotFound(id))
    }

    /// Writes the instance's cloud-init seed volume from its cached parts.
    fn write_seed(
        &self,
        id: InstanceId,
        seed: &outpost_protocol::Seed,
        dir: &Path,
    ) -> Result<PathBuf, HypervisorError> {
        let cache = crate::images::Cache::new(&self.cfg.image_dir);
        let part =
            |b: &Option<outpost_protocol::BlobRef>| -> Result<Option<Vec<u8>>, HypervisorError> {
                b.as_ref()
                    .map(|b| {
                        std::fs::read(cache.blob(&b.digest))
                            .map_err(io(format!("reading the seed part {}", b.digest.short())))
                    })
                    .transpose()
            };
        let files = crate::seed::SeedFiles {
            instance_id: format!("{id}-{}", self.cfg.node),
            hostname: seed
                .hostname
                .as_ref()
                .map_or_else(|| super::domain_name(id), ToString::to_string),
            ssh_keys: String::from_utf8_lossy(&part(&seed.ssh_keys)?.unwrap_or_default())
                .into_owned(),
            user_data: part(&seed.user_data)?.unwrap_or_default(),
            network_config: part(&seed.network_config)?,
        };
        let path = dir.join("seed.img");
        crate::seed::write(&path, &files).map_err(io("writing the cloud-init seed"))?;
        Ok(path)
    }

    /// How long the guest has to act on the power button.
    fn grace(&self, mode: PowerMode) -> Duration {
        match mode.stop_timeout_secs {
            0 => self.cfg.stop_timeout,
            s => Duration::from_secs(u64::from(s)),
        }
    }

    /// Presses the power button (unless forced) and waits the grace for the domain to go off.
    fn shut_down(&self, dom: &VirDomain, mode: PowerMode) -> Result<Button, HypervisorError> {
        let grace = self.grace(mode);
        if mode.force || grace.is_zero() || dom.shutdown().is_err() {
            return Ok(Button::NotPressed);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !dom.is_active().map_err(lv)? {
                return Ok(Button::Off);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Button::Ignored(grace))
    }

    fn instance_dir(&self, id: InstanceId) -> PathBuf {
        self.cfg.instance_dir.join(id.to_string())
    }

    fn image(&self, image: &Image) -> Result<PathBuf, HypervisorError> {
        let cache = crate::images::Cache::new(&self.cfg.image_dir);
        let p = cache.path(image);
        if p.is_file() {
            if let Image::Blob(b) = image {
                cache.touch(&b.digest);
            }
            std::path::absolute(&p).map_err(io("resolving the image path"))
        } else {
            Err(HypervisorError::MissingImage(image.to_string()))
        }
    }

    /// Makes the instance's disk if it does not exist yet; says what it is.
    fn make_disk(&self, spec: &InstanceSpec, disk: &Path) -> Result<MadeDisk, HypervisorError> {
        let size = format!("{}G", spec.disk_gib);
        let disk_s = disk.to_string_lossy();
        match &spec.boot {
            Boot::Disk { image } => {
                let base = self.image(image)?;
                let fmt = if is_qcow2(&base) {
                    // Before anything opens it (qemu-img, QEMU): it names no other file.
                    check_qcow2(&base)
                        .map_err(|e| HypervisorError::Disk(format!("image {image}: {e}")))?;
                    "qcow2"
                } else {
                    "raw"
                };
                if !disk.exists() {
                    let base = base.to_string_lossy();
                    qemu_img(&[
                        "create", "-q", "-f", "qcow2", "-F", fmt, "-b", &base, &disk_s, &size,
                    ])?;
                }
                Ok(MadeDisk::Overlay(base, fmt))
            }
            Boot::Kernel { .. } if spec.disk_gib > 0 => {
                if !disk.exists() {
                    qemu_img(&["create", "-q", "-f", "qcow2", &disk_s, &size])?;
                }
                Ok(MadeDisk::Blank)
            }
            Boot::Kernel { .. } => Ok(MadeDisk::None),
        }
    }
}

/// KVM counts as usable if libvirt offers a `kvm` domain type for the host architecture and a
/// tiny transient KVM guest with the host CPU actually starts and stays up; where the host's
/// kernel is readable, that guest boots it and must print on its serial console within a few
/// seconds (under nested virtualisation KVM can start a guest that then hangs or stops on an
/// internal error: such a host runs its instances under emulation instead).
fn probe_kvm(conn: &Connect, caps: &str, arch: Arch, scratch: &Path) -> bool {
    if !(caps.contains("<domain type='kvm'") || caps.contains("<domain type=\"kvm\""))
        || std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
    {
        return false;
    }
    let machine = match arch {
        Arch::X86_64 => "q35",
        Arch::Aarch64 => "virt",
    };
    let console = scratch.join(format!(".kvm-probe-{}.log", std::process::id()));
    // x86_64 only: there the host's vmlinuz boots directly and prints on ttyS0 (an arm64
    // vmlinuz is compressed and its console differs; KVM on ARM hardware keeps the plain probe).
    let kernel = host_kernel().filter(|_| {
        arch == Arch::X86_64
            && std::fs::create_dir_all(scratch).is_ok()
            && std::fs::write(&console, b"").is_ok()
    });
    let (os, devices, settle) = match &kernel {
        Some(k) => (
            format!(
                "<kernel>{}</kernel><cmdline>console=ttyS0 earlyprintk=serial panic=0</cmdline>",
                super::xml::esc(&k.to_string_lossy())
            ),
            format!(
                "<serial type='file'><source path='{}'/><target port='0'/></serial>",
                super::xml::esc(&console.to_string_lossy())
            ),
            KVM_PROBE_KERNEL,
        ),
        None => (String::new(), String::new(), KVM_PROBE_SETTLE),
    };
    let memory = if kernel.is_some() { 128 } else { 32 };
    let xml = format!(
        "<domain type='kvm'><name>outpost-kvm-probe-{pid}</name><memory unit='MiB'>{memory}</memory>\
         <os><type arch='{arch}' machine='{machine}'>hvm</type>{os}</os>\
         <cpu mode='host-passthrough'/><devices>{devices}<memballoon model='none'/></devices></domain>",
        pid = std::process::id()
    );
    // A probe left behind by an agent killed while probing would run on: remove those of
    // processes that are gone.
    for old in conn.list_all_domains(0).unwrap_or_default() {
        let pid = old.name().ok().and_then(|n| {
            n.strip_prefix("outpost-kvm-probe-")
                .and_then(|p| p.parse::<u32>().ok())
        });
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = old.destroy();
        }
    }
    let Ok(dom) = conn.create_domain_xml(&xml, 0) else {
        tracing::info!("KVM probe guest did not start: using software emulation");
        let _ = std::fs::remove_file(&console);
        return false;
    };
    // The kernel proper prints its banner at once with earlyprintk; a guest stuck in KVM never
    // gets that far (the real-mode stub's lines do not count).
    let printed =
        || std::fs::read(&console).is_ok_and(|b| b.windows(13).any(|w| w == b"Linux version"));
    let deadline = Instant::now() + settle;
    let mut up = true;
    let mut spoke = false;
    while up && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        up = dom.is_active().unwrap_or(false)
            && matches!(dom.state(), Ok((Enum::Known(VirState::Running), _)));
        spoke = kernel.is_some() && printed();
        if spoke {
            break;
        }
    }
    for _ in 0..3 {
        if dom.destroy().is_ok() || !dom.is_active().unwrap_or(false) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(&console);
    let ok = if kernel.is_some() { up && spoke } else { up };
    if !ok {
        tracing::info!(
            kernel_probe = kernel.is_some(),
            "KVM probe guest died or never printed: using software emulation"
        );
    }
    ok
}

fn reduce(dom: &VirDomain) -> Result<DomainState, HypervisorError> {
    let (state, reason) = dom.state().map_err(lv)?;
    Ok(match state {
        Enum::Known(VirState::Running | VirState::Blocked) => DomainState::Running,
        Enum::Known(VirState::Paused | VirState::PMSuspended) => DomainState::Paused,
        Enum::Known(VirState::Crashed) => DomainState::Off { crashed: true },
        Enum::Known(VirState::Shutoff) => DomainState::Off {
            crashed: matches!(
                reason,
                Enum::Known(virt::domain::DomainStateReason::Shutoff(Enum::Known(
                    DomainShutoffReason::Crashed
                )))
            ),
        },
        _ => DomainState::Transient,
    })
}

impl Hypervisor for LibvirtHypervisor {
    fn host(&self) -> Result<HostInfo, HypervisorError> {
        let info = self.conn()?.node_info().map_err(lv)?;
        Ok(HostInfo {
            arch: self.arch,
            kind: self.kind,
            vcpus: u16::try_from(info.cpus).unwrap_or(u16::MAX),
            memory_mib: u32::try_from(info.memory / 1024).unwrap_or(u32::MAX),
        })
    }

    fn list(&self) -> Result<Vec<Domain>, HypervisorError> {
        let mut out = Vec::new();
        for dom in self.conn()?.list_all_domains(0).map_err(lv)? {
            let Ok(name) = dom.name() else { continue };
            let Some(Ok(id)) = name
                .strip_prefix(DOMAIN_PREFIX)
                .map(str::parse::<InstanceId>)
            else {
                continue;
            };
            // A look-alike name is not enough: this agent's domains carry Outpost's metadata
            // with its own node id (another agent may share this libvirt).
            let Ok(meta) = dom.metadata(2, Some(METADATA_NS), 0) else {
                continue;
            };
            if metadata_node(&meta) != Some(self.cfg.node.as_str()) {
                continue;
            }
            out.push(Domain {
                id,
                state: reduce(&dom)?,
            });
        }
        Ok(out)
    }

    fn create(
        &self,
        id: InstanceId,
        spec: &InstanceSpec,
        start: bool,
    ) -> Result<(), HypervisorError> {
        let dom = match self.lookup(id)? {
            Some(dom) => dom,
            None => {
                let dir = self.instance_dir(id);
                std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
                let dir =
                    std::path::absolute(&dir).map_err(io("resolving the instance directory"))?;
                let disk = dir.join("disk.qcow2");
                let made = self.make_disk(spec, &disk)?;
                let kernel_files = match &spec.boot {
                    Boot::Kernel { kernel, initrd, .. } => Some((
                        self.image(kernel)?,
                        initrd.as_ref().map(|i| self.image(i)).transpose()?,
                    )),
                    Boot::Disk { .. } => None,
                };
                let boot = match (&spec.boot, &kernel_files) {
                    (Boot::Kernel { cmdline, .. }, Some((k, i))) => BootDef::Kernel {
                        kernel: k,
                        initrd: i.as_deref(),
                        cmdline: cmdline.as_str(),
                    },
                    _ => BootDef::Disk,
                };
                let console = dir.join("console.log");
                let seed = match &spec.seed {
                    Some(s) => Some(self.write_seed(id, s, &dir)?),
                    None => None,
                };
                let xml = domain_xml(&DomainDef {
                    id,
                    node: &self.cfg.node,
                    kvm: self.kind == HypervisorKind::Kvm,
                    arch: self.arch,
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    boot,
                    disk: (!matches!(made, MadeDisk::None)).then_some(disk.as_path()),
                    backing: match &made {
                        MadeDisk::Overlay(base, fmt) => Some((base.as_path(), *fmt)),
                        _ => None,
                    },
                    seed: seed.as_deref(),
                    network: &spec.network,
                    console_log: &console,
                });
                self.conn()?.define_domain_xml(&xml).map_err(lv)?
            }
        };
        if start && !dom.is_active().map_err(lv)? {
            dom.create().map_err(lv)?;
        }
        Ok(())
    }

    fn start(&self, id: InstanceId) -> Result<(), HypervisorError> {
        let dom = self.get(id)?;
        if !dom.is_active().map_err(lv)? {
            dom.create().map_err(lv)?;
        }
        Ok(())
    }

    fn stop(&self, id: InstanceId, mode: PowerMode) -> Result<Outcome, HypervisorError> {
        let dom = self.get(id)?;
        if !dom.is_active().map_err(lv)? {
            return Ok(Outcome::Done);
        }
        let outcome = match self.shut_down(&dom, mode)? {
            Button::Off => return Ok(Outcome::Done),
            Button::NotPressed => Outcome::Done,
            Button::Ignored(grace) => {
                tracing::info!(%id, "guest ignored the power button: forcing it off");
                Outcome::Ignored(grace)
            }
        };
        match dom.destroy() {
            Ok(()) => Ok(outcome),
            // It may have stopped between the check and the destroy.
            Err(_) if !dom.is_active().map_err(lv)? => Ok(Outcome::Done),
            Err(e) => Err(lv(e)),
        }
    }

    fn reboot(&self, id: InstanceId, mode: PowerMode) -> Result<Outcome, HypervisorError> {
        let dom = self.get(id)?;
        if !dom.is_active().map_err(lv)? {
            dom.create().map_err(lv)?;
            return Ok(Outcome::Done);
        }
        let button = self.shut_down(&dom, mode)?;
        if button == Button::Off {
            // Off cleanly: boot it again.
            dom.create().map_err(lv)?;
            return Ok(Outcome::Done);
        }
        // A hard reset: deterministic whether or not the guest listens to ACPI.
        dom.reset().map_err(lv)?;
        Ok(match button {
            Button::Ignored(grace) => {
                tracing::info!(%id, "guest ignored the power button: reset it");
                Outcome::Ignored(grace)
            }
            _ => Outcome::Done,
        })
    }

    fn delete(&self, id: InstanceId) -> Result<(), HypervisorError> {
        if let Some(dom) = self.lookup(id)? {
            if dom.is_active().map_err(lv)? {
                dom.destroy().map_err(lv)?;
            }
            dom.undefine().map_err(lv)?;
        }
        let dir = self.instance_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("removing {}", dir.display()))(e))
            }
            _ => Ok(()),
        }
    }

    fn addresses(&self, id: InstanceId) -> Result<Vec<Nic>, HypervisorError> {
        let dom = self.get(id)?;
        let xml = dom.xml_desc(0).map_err(lv)?;
        let mut nics: Vec<Nic> = interface_macs(&xml)
            .into_iter()
            .map(|mac| Nic {
                mac,
                ips: heapless::Vec::new(),
            })
            .collect();
        // DHCP leases of libvirt networks, then the host's ARP table (bridges), then the guest
        // agent (asked only while it is connected, so the call cannot hang on a silent guest).
        let mut sources = vec![
            virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
        ];
        if guest_agent_connected(&xml) {
            sources.push(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT);
        }
        for source in sources {
            if nics.iter().all(|n| !n.ips.is_empty()) {
                break;
            }
            let Ok(found) = dom.interface_addresses(source, 0) else {
                continue;
            };
            for iface in found {
                let Some(mac) = iface.hwaddr.and_then(|m| m.parse().ok()) else {
                    continue;
                };
                let Some(nic) = nics.iter_mut().find(|n| n.mac == mac) else {
                    continue;
                };
                for a in iface.addrs {
                    let Ok(ip) = a.addr.parse::<std::net::IpAddr>() else {
                        continue;
                    };
                    let net = IpNet::new(ip, u8::try_from(a.prefix).unwrap_or(u8::MAX));
                    if !nic.ips.contains(&net) {
                        let _ = nic.ips.push(net);
                    }
                }
                nic.ips.sort_by_key(|ip| matches!(ip, IpNet::V6(..)));
            }
        }
        Ok(nics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_arch_is_read_from_capabilities() {
        let caps = "<capabilities><host><uuid>x</uuid><cpu><arch>aarch64</arch></cpu></host>\
                    <guest><arch name='x86_64'/></guest></capabilities>";
        assert_eq!(host_arch(caps), Some(Arch::Aarch64));
        assert_eq!(host_arch("<capabilities/>"), None);
    }
}
