//! End-to-end test harness for Outpost: real processes, the real broker (mosquitto), real
//! libvirt. The tests themselves live in `tests/tests/`.
//!
//! It provides a mosquitto started on a free loopback port, the workspace's binaries, an agent
//! process with its own state directory, a test controller (a real MQTT client that publishes
//! desired states and records what agents send), a libvirtd started the way
//! `shared/PLATFORM.md` describes, and a tiny guest (Debian's cloud kernel and a busybox
//! initramfs that prints a line on the serial console).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use outpost_protocol::topics::{self, Channel};
use outpost_protocol::*;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The workspace root.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
}

/// Runs `cmd` in the workspace once per test process (per `once`), then returns `path` under
/// the target directory.
fn built(once: &'static OnceLock<()>, mut cmd: Command, what: &str, path: &str) -> PathBuf {
    once.get_or_init(|| {
        let st = cmd.current_dir(workspace()).status().unwrap();
        assert!(st.success(), "{what} failed");
    });
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"))
        .join(path)
}

/// The path of a workspace binary, built once per test process.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-q", "--bins"]);
    built(
        &BUILT,
        cmd,
        "building the workspace binaries",
        &format!("debug/{name}"),
    )
}

/// The agent cross-compiled for aarch64 (debug) by `cross/build-aarch64`, which also checks
/// that it links only against the C library and libvirt. Built once per test process.
pub fn aarch64_agent() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let mut cmd = Command::new(workspace().join("cross/build-aarch64"));
    cmd.arg("--debug");
    built(
        &BUILT,
        cmd,
        "cross/build-aarch64",
        "aarch64-unknown-linux-gnu/debug/outpost-agent",
    )
}

/// Waits until `f` returns `Some`, polling every 50 ms, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    child: Option<Child>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            log,
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().unwrap()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mosquitto broker on loopback.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    /// Its process.
    pub proc: Proc,
    dir: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto with anonymous access on a free port, in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port())
    }

    /// Starts mosquitto on `port` (to restart it where agents expect it).
    pub fn start_on(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, "")
    }

    /// Starts mosquitto with a plain loopback listener on `port` and `extra` configuration
    /// (more listeners...).
    pub fn start_with(dir: &Path, port: u16, extra: &str) -> Self {
        Self::start_conf(
            dir,
            port,
            &format!(
                "per_listener_settings false\nallow_anonymous true\nlistener {port} 127.0.0.1\n{extra}"
            ),
        )
    }

    /// Starts mosquitto with exactly `conf` (plus running as root, no persistence, logs to
    /// stderr); `port` is where it is expected to listen.
    pub fn start_conf(dir: &Path, port: u16, conf_text: &str) -> Self {
        Self::start_raw(dir, port, &format!("user root\n{conf_text}"))
    }

    /// Starts mosquitto with `conf` as Debian runs it: started as root, it drops to the
    /// `mosquitto` user before it reads the password file and ACL.
    pub fn start_as_debian(dir: &Path, port: u16, conf_text: &str) -> Self {
        Self::start_raw(dir, port, conf_text)
    }

    fn start_raw(dir: &Path, port: u16, conf_text: &str) -> Self {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("persistence false\nlog_dest stderr\n{conf_text}"),
        )
        .unwrap();
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(cmd, dir.join("mosquitto.log"));
        wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Self {
            port,
            proc,
            dir: dir.to_owned(),
        }
    }

    /// Stops it (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.proc.kill();
        *self = Self::start_on(&self.dir.clone(), self.port);
    }
}

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
        }
    }

    /// An agent with the fake hypervisor backend (`memory_mib` of memory, label
    /// `zone=ZONE`), with a kernel and initrd in its image directory.
    pub fn fake(dir: &Path, node: &str, broker_port: u16, memory_mib: u32, zone: &str) -> Self {
        let a = Self::configure(
            dir,
            node,
            broker_port,
            &format!(
                "[labels]\nzone = \"{zone}\"\n[hypervisor]\nbackend = \"fake\"\nfake_memory_mib = {memory_mib}\n"
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
            .arg("debug");
        self.proc = Some(Proc::spawn(cmd, self.state_dir.with_extension("log")));
    }

    /// The running process.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().unwrap()
    }
}

/// Everything a test controller has received.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Latest status per node.
    pub status: Vec<(NodeId, NodeStatus)>,
    /// Latest inventory per node.
    pub inventory: Vec<(NodeId, Inventory)>,
    /// Latest report per node.
    pub report: Vec<(NodeId, NodeReport)>,
    /// Every event, in arrival order.
    pub events: Vec<(NodeId, AgentEvent)>,
    /// Latest holding per node.
    pub holding: Vec<(NodeId, Holding)>,
    /// Payloads that did not decode.
    pub malformed: usize,
}

fn upsert<T>(v: &mut Vec<(NodeId, T)>, node: NodeId, t: T) {
    match v.iter_mut().find(|(n, _)| *n == node) {
        Some(slot) => slot.1 = t,
        None => v.push((node, t)),
    }
}

impl Seen {
    /// Latest holding of `node`.
    pub fn holding_of(&self, node: &NodeId) -> Option<Holding> {
        self.holding
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, h)| h.clone())
    }

    /// Latest status of `node`.
    pub fn status_of(&self, node: &NodeId) -> Option<NodeStatus> {
        self.status.iter().find(|(n, _)| n == node).map(|(_, s)| *s)
    }

    /// Latest inventory of `node`.
    pub fn inventory_of(&self, node: &NodeId) -> Option<Inventory> {
        self.inventory
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
    }

    /// Latest report of `node`.
    pub fn report_of(&self, node: &NodeId) -> Option<NodeReport> {
        self.report
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
    }

    /// The states `node` announced for `id`, in order.
    pub fn states(&self, node: &NodeId, id: InstanceId) -> Vec<InstanceState> {
        self.events
            .iter()
            .filter(|(n, _)| n == node)
            .filter_map(|(_, e)| match e {
                AgentEvent::Instance { id: i, state, .. } if *i == id => Some(*state),
                _ => None,
            })
            .collect()
    }

    /// The acks `node` sent.
    pub fn acks(&self, node: &NodeId) -> Vec<(u64, AckResult)> {
        self.events
            .iter()
            .filter(|(n, _)| n == node)
            .filter_map(|(_, e)| match e {
                AgentEvent::Ack { generation, result } => Some((*generation, *result)),
                _ => None,
            })
            .collect()
    }
}

/// A stand-in controller: a real MQTT client subscribed to every node's topics.
pub struct TestController {
    client: AsyncClient,
    /// What it has received.
    pub seen: Arc<Mutex<Seen>>,
    rt: tokio::runtime::Runtime,
}

impl TestController {
    /// Connects to the broker on `port` and subscribes to every agent channel.
    pub fn connect(port: u16) -> Self {
        Self::connect_as(port, None)
    }

    /// Connects with a username and password.
    pub fn connect_as(port: u16, credentials: Option<(&str, &str)>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = MqttOptions::new(
            format!("test-controller-{}", free_port()),
            "127.0.0.1",
            port,
        );
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = credentials {
            opts.set_credentials(u, p);
        }
        let (client, mut el) = AsyncClient::new(opts, 1024);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = Arc::clone(&seen);
        let c = client.clone();
        rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for ch in [
                            Channel::Status,
                            Channel::Inventory,
                            Channel::Report,
                            Channel::Event,
                            Channel::Holding,
                        ] {
                            c.subscribe(ch.all_nodes(), QoS::AtLeastOnce).await.unwrap();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => record(&s, &p.topic, &p.payload),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { client, seen, rt }
    }

    /// A snapshot of what was received.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Publishes raw bytes on `node`'s `channel`, retained or not.
    pub fn publish_raw(&self, node: &NodeId, channel: Channel, payload: Vec<u8>, retain: bool) {
        let t = topics::topic(node, channel).to_string();
        let c = self.client.clone();
        self.rt
            .block_on(async move { c.publish(t, QoS::AtLeastOnce, retain, payload).await })
            .unwrap();
    }

    /// Publishes `node`'s desired state, retained, as the real controller does.
    pub fn publish_desired(&self, node: &NodeId, d: &DesiredState) {
        self.publish_raw(node, Channel::Desired, d.to_vec().unwrap(), true);
    }

    /// Waits until `f` holds for what was received.
    pub fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Seen) -> Option<T>,
    ) -> T {
        wait_for(timeout, what, || f(&self.seen.lock().unwrap()))
    }
}

fn record(seen: &Mutex<Seen>, topic: &str, payload: &[u8]) {
    let mut s = seen.lock().unwrap();
    let Ok((node, ch)) = topics::parse(topic) else {
        return;
    };
    let ok = match ch {
        Channel::Status => NodeStatus::decode(payload)
            .map(|m| upsert(&mut s.status, node, m))
            .is_ok(),
        Channel::Inventory => Inventory::decode(payload)
            .map(|m| upsert(&mut s.inventory, node, m))
            .is_ok(),
        Channel::Report => NodeReport::decode(payload)
            .map(|m| upsert(&mut s.report, node, m))
            .is_ok(),
        Channel::Event => AgentEvent::decode(payload)
            .map(|m| s.events.push((node, m)))
            .is_ok(),
        Channel::Holding => Holding::decode(payload)
            .map(|m| upsert(&mut s.holding, node, m))
            .is_ok(),
        Channel::Desired => true,
    };
    if !ok {
        s.malformed += 1;
    }
}

/// A desired instance with these resources, booting `boot`.
pub fn instance(id: u64, boot: Boot, memory_mib: u32) -> DesiredInstance {
    DesiredInstance {
        id: InstanceId::from_u64(id),
        name: InstanceName::new(&format!("vm-{id}")).unwrap(),
        power: PowerState::Running,
        reboot_count: 0,
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
        kernel: ImageName::new("vmlinuz").unwrap(),
        initrd: Some(ImageName::new("initrd.img").unwrap()),
        cmdline: Cmdline::new(cmdline).unwrap(),
    }
}

/// Starts libvirtd (and virtlogd) as `shared/PLATFORM.md` describes, unless one answers.
/// Returns false (and says why) when libvirtd cannot be had on this machine.
pub fn ensure_libvirtd() -> bool {
    let answers = || {
        Command::new("virsh")
            .args(["-c", "qemu:///system", "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if answers() {
        return true;
    }
    // scripts/setup configures QEMU to run as root, so guests can read the test's files.
    for d in ["/var/log/libvirt", "/var/run/libvirt"] {
        let _ = std::fs::create_dir_all(d);
    }
    for daemon in ["virtlogd", "libvirtd"] {
        let _ = Command::new(daemon)
            .arg("-d")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let mut ok = false;
    for _ in 0..100 {
        if answers() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ok
}

/// `cp -a FROM TO`.
pub fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// `virsh -c qemu:///system ARGS`, its output trimmed.
pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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

/// A test PKI made with openssl: a CA, a server certificate for `localhost`/127.0.0.1 and a
/// client certificate, all in `dir` (`ca.pem`, `server.pem`, `server.key`, `client.pem`,
/// `client.key`).
pub fn make_pki(dir: &Path, ca_name: &str) {
    let run = |args: &str| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("openssl {args} 2>/dev/null"))
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(st.success(), "openssl {args}");
    };
    // Version-3 certificates with the usual extensions: rustls (webpki) accepts nothing else.
    std::fs::write(dir.join("ca.ext"), "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n").unwrap();
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n").unwrap();
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n").unwrap();
    run(&format!(
        "req -new -newkey rsa:2048 -nodes -subj '/CN={ca_name}' -keyout ca.key -out ca.csr"
    ));
    run("x509 -req -in ca.csr -signkey ca.key -days 2 -extfile ca.ext -out ca.pem");
    for who in ["server", "client"] {
        let cn = if who == "server" {
            "localhost"
        } else {
            "client"
        };
        run(&format!(
            "req -newkey rsa:2048 -nodes -subj /CN={cn} -keyout {who}.key -out {who}.csr"
        ));
        run(&format!(
            "x509 -req -in {who}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile {who}.ext -out {who}.pem"
        ));
    }
}

/// The marker the test guest prints on its serial console.
pub const GUEST_MARKER: &str = "OUTPOST-GUEST-BOOTED";

/// Puts the tiny test guest (Debian's cloud kernel and a busybox initramfs whose init prints
/// [`GUEST_MARKER`]) into `image_dir` as `vmlinuz` and `initrd.img`.
pub fn install_test_guest(image_dir: &Path) {
    let kernel = std::fs::read_dir("/boot")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
                && p.to_string_lossy().ends_with("-cloud-amd64")
        })
        .expect("Debian's cloud kernel (linux-image-cloud-amd64) is installed by scripts/setup");
    std::fs::copy(&kernel, image_dir.join("vmlinuz")).unwrap();

    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["bin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", r.join("bin/sh")).unwrap();
    let init = format!(
        "#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox mount -t devtmpfs dev /dev\n\
         echo {GUEST_MARKER} > /dev/ttyS0\nwhile true; do /bin/busybox sleep 3600; done\n"
    );
    std::fs::write(r.join("init"), init).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x init && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            image_dir.join("initrd.img").display()
        ))
        .current_dir(r)
        .status()
        .unwrap();
    assert!(st.success(), "building the test initramfs failed");
}

/// A controller process with its own data directory and ports.
pub struct Controller {
    /// Its HTTP API, `http://127.0.0.1:PORT`.
    pub api: String,
    /// The MQTT port agents use (embedded broker, or the external one).
    pub mqtt_port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Extra arguments (`--broker ...`).
    pub args: Vec<String>,
    /// The process.
    pub proc: Option<Proc>,
}

impl Controller {
    /// A controller with an embedded broker on a free port.
    pub fn embedded(dir: &Path) -> Self {
        let port = free_port();
        Self::new(
            dir,
            port,
            vec!["--mqtt-listen".into(), format!("127.0.0.1:{port}")],
        )
    }

    /// A controller using the broker on `port`.
    pub fn external(dir: &Path, port: u16) -> Self {
        Self::new(
            dir,
            port,
            vec!["--broker".into(), format!("mqtt://127.0.0.1:{port}")],
        )
    }

    fn new(dir: &Path, mqtt_port: u16, args: Vec<String>) -> Self {
        Self {
            api: format!("http://127.0.0.1:{}", free_port()),
            mqtt_port,
            data_dir: dir.join("controller-data"),
            args,
            proc: None,
        }
    }

    /// Starts (or restarts) the process and waits for its API.
    pub fn start(&mut self) {
        let mut cmd = Command::new(bin("outpost-controller"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api-listen")
            .arg(self.api.trim_start_matches("http://"))
            .arg("--liveness-timeout")
            .arg("5")
            .args(&self.args);
        self.proc = Some(Proc::spawn(cmd, self.data_dir.with_extension("log")));
        wait_for(Duration::from_secs(20), "the controller's API", || {
            self.cli(&["nodes", "list"]).ok()
        });
    }

    /// Runs the `outpost` CLI against this controller with `--json`; Ok(JSON) or Err(stderr).
    pub fn cli(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = Command::new(bin("outpost"))
            .arg("--api")
            .arg(&self.api)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Creates a direct-kernel-boot instance of the tiny guest (256 MiB unless `extra` says
    /// `--memory`), with `extra` arguments.
    pub fn create(&self, name: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
        let mut args = vec![
            "instances",
            "create",
            name,
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd.img",
            "--cmdline",
            "console=ttyS0 quiet",
        ];
        if !extra.contains(&"--memory") {
            args.extend_from_slice(&["--memory", "256"]);
        }
        args.extend_from_slice(extra);
        self.cli(&args)
    }

    /// The phase of an instance (by name), if it exists.
    pub fn phase(&self, name: &str) -> Option<String> {
        let v = self.cli(&["instances", "show", name]).ok()?;
        v["phase"].as_str().map(str::to_owned)
    }

    /// Waits until instance `name` is in `phase`.
    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) {
        wait_for(timeout, &format!("{name} to be {phase}"), || {
            (self.phase(name).as_deref() == Some(phase)).then_some(())
        });
    }

    /// Waits until `n` nodes are up.
    pub fn wait_nodes_up(&self, n: usize) {
        wait_for(Duration::from_secs(30), &format!("{n} nodes up"), || {
            let v = self.cli(&["nodes", "list"]).ok()?;
            let up = v.as_array()?.iter().filter(|n| n["state"] == "up").count();
            (up >= n).then_some(())
        });
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().unwrap()
    }
}

/// A TCP link between an agent and its broker that a test can cut: it forwards
/// `127.0.0.1:port` to the broker, and while cut it drops every connection and refuses new
/// ones, like a network partition (the agent itself keeps running).
pub struct Link {
    /// The port agents connect to.
    pub port: u16,
    state: Arc<LinkState>,
}

/// What the link's forwarding threads share with the test.
#[derive(Default)]
struct LinkState {
    cut: std::sync::atomic::AtomicBool,
    /// Bumped by every cut: forwarders of an older generation stop.
    generation: std::sync::atomic::AtomicU64,
    latency_ms: std::sync::atomic::AtomicU64,
    accepted: std::sync::atomic::AtomicU64,
}

impl Link {
    /// A link to the broker on `upstream`.
    pub fn new(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(LinkState::default());
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                if st.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let born = st.generation.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let st = Arc::clone(&st);
                    std::thread::spawn(move || {
                        use std::io::{Read as _, Write as _};
                        let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            if st.cut.load(Ordering::SeqCst)
                                || st.generation.load(Ordering::SeqCst) != born
                            {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    let delay = st.latency_ms.load(Ordering::SeqCst);
                                    if delay > 0 {
                                        std::thread::sleep(Duration::from_millis(delay));
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, state }
    }

    /// Delays every chunk forwarded (each way) by `d`: a slow link, like a satellite hop.
    pub fn set_latency(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.state
            .latency_ms
            .store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cuts the link: open connections die, new ones are refused.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
