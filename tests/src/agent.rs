//! Agent processes (fake or real libvirt), the desired states a stand-in controller sends
//! them, and a one-agent bench on the real libvirtd.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_protocol::*;

use crate::broker::{Link, Mosquitto, TestController};
use crate::guest::{ensure_libvirtd, install_test_guest};
use crate::process::{Proc, aarch64_agent, bin};

/// An agent process with its own state and image directories.
pub struct Agent {
    /// The node id.
    pub node: NodeId,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// The process, once started.
    pub proc: Option<Proc>,
    /// Extra command-line arguments (`--metrics-listen ...`).
    pub args: Vec<String>,
    /// Extra environment (a [`FakeClock`](crate::FakeClock)'s).
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Writes a config for `node` under `dir`, with `extra` TOML appended, but does not start.
    pub fn configure(dir: &Path, node: &str, broker_port: u16, extra: &str) -> Self {
        let state_dir = dir.join(node);
        std::fs::create_dir_all(state_dir.join("images")).unwrap();
        let config = dir.join(format!("{node}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = \"{node}\"\nbrokers = [\"mqtt://127.0.0.1:{broker_port}\"]\n\
                 state_dir = \"{}\"\nreport_interval_secs = 1\nreconcile_interval_secs = 1\n{extra}",
                state_dir.display()
            ),
        )
        .unwrap();
        Self {
            node: NodeId::new(node).unwrap(),
            state_dir,
            config,
            proc: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// An agent with the fake hypervisor backend (`memory_mib` of memory, label
    /// `zone=ZONE`), with a kernel and initrd in its image directory.
    pub fn fake(dir: &Path, node: &str, broker_port: u16, memory_mib: u32, zone: &str) -> Self {
        Self::fake_sized(dir, node, broker_port, memory_mib, None, zone)
    }

    /// [`Agent::fake`] with `vcpus` vCPUs (none: the fake backend's default).
    pub fn fake_sized(
        dir: &Path,
        node: &str,
        broker_port: u16,
        memory_mib: u32,
        vcpus: Option<u16>,
        zone: &str,
    ) -> Self {
        let vcpus = vcpus
            .map(|v| format!("fake_vcpus = {v}\n"))
            .unwrap_or_default();
        let a = Self::configure(
            dir,
            node,
            broker_port,
            &format!(
                "[labels]\nzone = \"{zone}\"\n[hypervisor]\nbackend = \"fake\"\nfake_memory_mib = {memory_mib}\n{vcpus}"
            ),
        );
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::write(a.state_dir.join("images").join(f), b"x").unwrap();
        }
        a
    }

    /// An agent driving the real libvirtd (`qemu:///system`), label `zone=ZONE`, with the tiny
    /// test guest in its image directory.
    pub fn real(dir: &Path, node: &str, broker_port: u16, zone: &str) -> Self {
        let a = Self::configure(
            dir,
            node,
            broker_port,
            &format!(
                "[labels]\nzone = \"{zone}\"\n[hypervisor]\nbackend = \"libvirt\"\nuri = \"qemu:///system\"\nstop_timeout_secs = 1\n"
            ),
        );
        install_test_guest(&a.state_dir.join("images"));
        // QEMU runs as libvirt's unprivileged user on a stock host: it must reach the files.
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
        a
    }

    /// How many hypervisor operations named `op` (`create`, `delete`...) its log shows, for
    /// instance `id` if given.
    pub fn ops(&self, op: &str, id: Option<&str>) -> usize {
        let log = std::fs::read_to_string(self.state_dir.with_extension("log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(" hypervisor id="))
            .filter(|l| l.contains(&format!("op=\"{op}\"")) || l.contains(&format!("op={op} ")))
            .filter(|l| id.is_none_or(|i| l.contains(i)))
            .count()
    }

    /// Starts (or restarts) the agent process.
    pub fn start(&mut self) {
        self.start_cmd(Command::new(bin("outpost-agent")));
    }

    /// Starts the aarch64 agent under qemu-user (see [`aarch64_agent`]).
    pub fn start_aarch64(&mut self) {
        let mut cmd = Command::new("qemu-aarch64");
        cmd.arg("-L").arg("/").arg(aarch64_agent());
        self.start_cmd(cmd);
    }

    fn start_cmd(&mut self, mut cmd: Command) {
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("debug")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn(cmd, self.state_dir.with_extension("log")));
    }

    /// The running process.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().unwrap()
    }
}

/// A desired instance with these resources, booting `boot`.
pub fn instance(id: u64, boot: Boot, memory_mib: u32) -> DesiredInstance {
    DesiredInstance {
        id: InstanceId::from_u64(id),
        name: InstanceName::new(&format!("vm-{id}")).unwrap(),
        power: PowerState::Running,
        reboot_count: 0,
        power_mode: PowerMode::default(),
        spec: InstanceSpec {
            vcpus: 1,
            memory_mib,
            disk_gib: 0,
            arch: Arch::native().unwrap(),
            require_kvm: false,
            boot,
            network: Network::None,
            restart: RestartPolicy::OnFailure,
            labels: Labels::new(),
            seed: None,
        },
    }
}

/// The fleet identity the stand-in controller uses.
pub const TEST_FLEET: FleetId = FleetId(0x7e57);

/// A desired state of `generation` with `instances` (fleet [`TEST_FLEET`], no lease).
pub fn desired(generation: u64, instances: Vec<DesiredInstance>) -> DesiredState {
    DesiredState {
        fleet: TEST_FLEET,
        generation,
        instances: instances.into_iter().collect(),
        ..Default::default()
    }
}

/// A desired state that also says `gone` were deleted by the controller.
pub fn desired_gone(
    generation: u64,
    instances: Vec<DesiredInstance>,
    gone: &[u64],
) -> DesiredState {
    DesiredState {
        gone: gone.iter().map(|&g| InstanceId::from_u64(g)).collect(),
        ..desired(generation, instances)
    }
}

/// Direct kernel boot of `vmlinuz` + `initrd.img` from the image directory.
pub fn kernel_boot(cmdline: &str) -> Boot {
    Boot::Kernel {
        kernel: ImageName::new("vmlinuz").unwrap().into(),
        initrd: Some(ImageName::new("initrd.img").unwrap().into()),
        cmdline: Cmdline::new(cmdline).unwrap(),
    }
}

/// One agent on the real libvirtd, its own mosquitto (reached through a cuttable [`Link`]) and
/// a stand-in controller, started and announced.
pub struct RealBench {
    /// The agent.
    pub agent: Agent,
    /// Its node id.
    pub node: NodeId,
    /// The stand-in controller.
    pub ctl: TestController,
    /// The agent's link to the broker.
    pub link: Link,
    /// The broker.
    pub broker: Mosquitto,
    /// Where everything lives.
    pub dir: tempfile::TempDir,
}

impl RealBench {
    /// Starts it all for node `node`; panics if libvirtd cannot be had.
    pub fn start(node: &str) -> Self {
        assert!(ensure_libvirtd(), "libvirtd could not be started");
        let dir = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start(dir.path());
        let link = Link::new(broker.port);
        let ctl = TestController::connect(broker.port);
        let mut agent = Agent::real(dir.path(), node, link.port, "real");
        let node = agent.node.clone();
        agent.start();
        ctl.wait(Duration::from_secs(60), "inventory", |s| {
            s.inventory_of(&node)
        });
        Self {
            agent,
            node,
            ctl,
            link,
            broker,
            dir,
        }
    }

    /// Publishes `d` and waits until instance `id` runs.
    pub fn run(&self, d: &DesiredState, id: u64) {
        self.ctl.publish_desired(&self.node, d);
        self.ctl
            .wait(Duration::from_secs(60), "the guest running", |s| {
                (s.states(&self.node, InstanceId::from_u64(id)).last()
                    == Some(&InstanceState::Running))
                .then_some(())
            });
    }
}
